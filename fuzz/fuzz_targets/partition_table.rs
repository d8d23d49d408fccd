//! A disk's first and last sectors as probing reads them: damaged MBR and
//! GPT tables must become warnings, never a panic.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile_in_shm();
    f.1.write_all(data).unwrap();
    // A disk is at least a few sectors; pad so both ends exist.
    let len = (data.len() as u64).max(64 * 512);
    f.1.set_len(len).unwrap();
    for sector in [512, 4096] {
        let _ = bmr::probe::table::read(&f.0, sector);
    }
    let _ = std::fs::remove_file(&f.0);
});

fn tempfile_in_shm() -> (std::path::PathBuf, std::fs::File) {
    let p = std::path::PathBuf::from(format!("/dev/shm/bmr-fuzz-table-{}", std::process::id()));
    let f = std::fs::File::create(&p).unwrap();
    (p, f)
}
