//! An image read front to back, as from a tape: header, records (each
//! payload decoded as a restore would), index, trailer. Damage must be an
//! error, never a panic, a hang or a huge allocation. The header and index
//! carry BLAKE3 sums a fuzzer cannot forge, so records and the index are
//! also parsed from the raw input.
#![no_main]

use bmr::image::{format, read};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = format::read_header(&mut &data[..]);
    let mut r = data;
    for _ in 0..64 {
        match format::read_record(&mut r) {
            Ok(Some(rec)) => {
                let _ = read::decode(None, rec.raw_len, &rec.id, rec.flags, rec.payload, "fuzz");
            }
            Ok(None) => {
                let _ = format::read_index_stream(&mut r);
                break;
            }
            Err(_) => break,
        }
    }
    let _ = format::decode_index(data, 1 << 40);
    if data.len() >= format::TRAILER_LEN {
        let _ = format::decode_trailer(&data[data.len() - format::TRAILER_LEN..]);
    }
});
