//! Bad input gets a clear error (or a warning) and destroys nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

fn fails(cmd: &mut Command) -> String {
    refused(cmd.output().unwrap())
}

fn save(medium: &Path, root: &Path, disk: &str) -> Command {
    let mut c = bmr();
    c.args(["save", "--catalog", "none", "--medium"])
        .arg(medium)
        .arg("--system-root")
        .arg(root)
        .args(["--disk", disk]);
    c
}

#[test]
fn missing_device_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let medium = tmp.path().join("m.img");
    let err = fails(
        bmr()
            .args(["save", "--medium"])
            .arg(&medium)
            .args(["--disk", "/dev/bmr-no-such-disk"]),
    );
    assert!(
        err.contains("/dev/bmr-no-such-disk") && err.contains("no such device"),
        "{err}"
    );
    assert!(!medium.exists(), "nothing written");
    let err = fails(bmr().args(["probe", "--disk", "/dev/bmr-no-such-disk"]));
    assert!(err.contains("no such device"), "{err}");
    let err = fails(bmr().args(["probe", "--disk", "/etc/hostname"]));
    assert!(err.contains("not a block device"), "{err}");
}

#[test]
fn read_only_medium_place_unknown_driver_and_kernel() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let sys = test_system("mbr", tmp.path());
    let (disk, root) = (&sys.disk, &sys.root);

    let ro = Mounted::new(
        "tmpfs",
        &tmp.path().join("ro"),
        &["-t", "tmpfs", "-o", "ro"],
    );
    let err = fails(&mut save(&ro.dir.join("m.img"), &root.dir, &disk.dev));
    assert!(
        err.contains("choose a writable place") && err.contains("Read-only file system"),
        "{err}"
    );

    let kdir = root.dir.join("lib/modules/6.1.0-99-amd64");
    fs::create_dir_all(&kdir).unwrap();
    fs::write(kdir.join("modules.dep"), "kernel/drivers/scsi/sg.ko:\n").unwrap();
    let medium = tmp.path().join("m.img");
    let err = fails(save(&medium, &root.dir, &disk.dev).args([
        "--driver",
        "nosuchtape",
        "--kernel",
        "6.1.0-99-amd64",
    ]));
    assert!(
        err.contains("\"nosuchtape\" not found for kernel 6.1.0-99-amd64"),
        "{err}"
    );
    let err = fails(save(&medium, &root.dir, &disk.dev).args([
        "--driver",
        "st",
        "--kernel",
        "9.9.9-none",
    ]));
    assert!(
        err.contains("no modules for kernel 9.9.9-none") && err.contains("6.1.0-99-amd64"),
        "{err}"
    );
    assert!(!medium.exists(), "no medium written after an error");

    // A partition is not a disk; the system volume must be among the disks.
    let err = fails(&mut save(&medium, &root.dir, &disk.part(1)));
    assert!(err.contains("is a partition"), "{err}");
}

#[test]
fn damaged_partition_tables_are_reported_not_fatal() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("gpt.img");
    make_disk("gpt", &img);
    let disk = LoopDisk::attach(&img);

    // Primary GPT header broken: the backup is used, with a warning.
    sh(&format!(
        "printf 'XXXXXXXX' | dd of={} bs=1 seek=512 conv=notrunc status=none",
        disk.dev
    ));
    let out = stdout(bmr().args(["probe", "--disk", &disk.dev]));
    assert!(
        out.contains("one of the two GPT headers is damaged"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.contains("start")).count(),
        4,
        "partitions still read from the backup: {out}"
    );

    // Both headers broken: no table, a clear warning, and save refuses with a reason.
    let size = fs::metadata(&img).unwrap().len();
    sh(&format!(
        "printf 'XXXXXXXX' | dd of={} bs=1 seek={} conv=notrunc status=none",
        disk.dev,
        size - 512
    ));
    let out = stdout(bmr().args(["probe", "--disk", &disk.dev]));
    assert!(out.contains("the GPT is damaged"), "{out}");
    let root = Mounted::new(&disk.part(2), &tmp.path().join("root"), &["-o", "ro"]);
    let medium = tmp.path().join("m.img");
    let err = fails(&mut save(&medium, &root.dir, &disk.dev));
    assert!(
        err.contains("no recorded volume is mounted at") && err.contains(&disk.dev),
        "{err}"
    );
    assert!(!medium.exists());
}

#[test]
fn damaged_or_truncated_medium_is_refused() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let sys = test_system("mbr", tmp.path());
    let (disk, root) = (&sys.disk, &sys.root);
    let medium = tmp.path().join("m.img");
    run(&mut save(&medium, &root.dir, &disk.dev));
    let ok = stdout(bmr().args(["manifest", "check"]).arg(&medium));
    assert!(ok.contains("manifest sound"), "{ok}");

    // One changed character inside a value: the checksum catches it.
    let mut bytes = fs::read(&medium).unwrap();
    let needle = b"hostname = \"testhost-mbr\"";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("manifest text on the medium");
    bytes[at + 12] = b'T';
    let bad = tmp.path().join("bad.img");
    fs::write(&bad, &bytes).unwrap();
    let err = fails(bmr().args(["manifest", "check"]).arg(&bad));
    assert!(err.contains("checksum does not match"), "{err}");
    let err = fails(bmr().args(["manifest", "show"]).arg(&bad));
    assert!(err.contains("checksum does not match"), "{err}");

    // A truncated image: no FAT to read, said plainly.
    let short = tmp.path().join("short.img");
    fs::write(&short, &fs::read(&medium).unwrap()[..8192]).unwrap();
    let err = fails(bmr().args(["manifest", "check"]).arg(&short));
    assert!(err.contains("short.img"), "{err}");

    // A medium path that holds something else is not overwritten.
    let precious = tmp.path().join("notes.txt");
    fs::write(&precious, "keep me").unwrap();
    let err = fails(&mut save(&precious, &root.dir, &disk.dev));
    assert!(err.contains("not a bmr recovery medium"), "{err}");
    assert_eq!(fs::read_to_string(&precious).unwrap(), "keep me");
}
