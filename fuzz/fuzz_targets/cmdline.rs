//! /proc/cmdline as PID 1 reads it: whatever the boot loader was given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let _ = bmr::boot::cmdline::parse(&line);
});
