//! A manifest from a recovery medium that may be damaged or hand-edited:
//! the whole load (checksum first), and the validation rules on any
//! manifest that parses, since a fuzzer cannot forge the BLAKE3 checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = bmr::manifest::Manifest::from_toml(text);
        if let Ok(m) = toml::from_str::<bmr::manifest::Manifest>(text) {
            let _ = bmr::manifest::validate(&m);
        }
    }
});
