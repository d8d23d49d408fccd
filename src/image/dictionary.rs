//! The image's dictionary: pieces of the volume's own used bytes, which
//! zstd compresses every chunk against. Each chunk is compressed on its own,
//! so that it can be read, deduplicated and verified alone; without a
//! dictionary each one starts cold and learns the volume's common strings
//! anew (on the bench volume that cold start cost 0.7% of the image, and
//! put it above one `partclone | zstd` stream).

use std::ops::Range;

use anyhow::Result;

use super::aligned::AlignedBuf;
use super::chunker::Source;
use super::codec::DICT_TAG;

/// Pieces of this size, this many: 256 KiB in all. zstd sizes its tables
/// for a dictionary by its length, and below 256 KiB it picks those for
/// small inputs, which compress 1 MiB chunks worse than no dictionary.
pub const PIECE: u64 = 8 << 10;
pub const PIECES: usize = 32;
/// Places looked at: the incompressible ones (media, archives, encrypted
/// files) teach zstd nothing and are passed over.
const CANDIDATES: u64 = 128;
/// Below this many chunks the dictionary (about 100 KiB stored) would cost
/// more than the cold starts it saves (about 3 KiB a chunk on text).
pub const MIN_CHUNKS: usize = 64;

/// The dictionary for a volume with `used` ranges imaged in `chunks`
/// chunks, or None when too little of it is worth one. Pieces come from
/// used blocks only: free blocks may hold deleted files, which an image
/// must not carry.
pub fn sample(source: &Source, used: &[Range<u64>], chunks: usize) -> Result<Option<Vec<u8>>> {
    if chunks < MIN_CHUNKS {
        return Ok(None);
    }
    let mut kept = Vec::new();
    let mut buf = AlignedBuf::new(PIECE as usize);
    for at in places(used) {
        let piece = buf.take(PIECE as usize);
        source.read_at(piece, at)?;
        if teaches(piece) {
            kept.push(piece.to_vec());
        }
    }
    if kept.len() < PIECES {
        return Ok(None);
    }
    let mut dict = DICT_TAG.to_vec();
    for i in 0..PIECES {
        dict.extend_from_slice(&kept[i * kept.len() / PIECES]);
    }
    Ok(Some(dict))
}

/// Up to [`CANDIDATES`] piece offsets spread evenly over the used bytes,
/// each piece block-aligned and inside one used range.
fn places(used: &[Range<u64>]) -> Vec<u64> {
    let total: u64 = used.iter().map(|r| r.end - r.start).sum();
    let mut out: Vec<u64> = Vec::new();
    let (mut i, mut before) = (0usize, 0u64);
    for k in 0..CANDIDATES {
        let want = total / (2 * CANDIDATES) * (2 * k + 1);
        while i < used.len() && before + (used[i].end - used[i].start) <= want {
            before += used[i].end - used[i].start;
            i += 1;
        }
        let Some(r) = used.get(i) else { break };
        let at = ((r.start + (want - before)) / PIECE * PIECE)
            .min(r.end.saturating_sub(PIECE) / PIECE * PIECE)
            .max(r.start.next_multiple_of(PIECE));
        if at + PIECE <= r.end && out.last() != Some(&at) {
            out.push(at);
        }
    }
    out
}

/// Whether a piece is worth learning from: not empty, and compressible.
fn teaches(piece: &[u8]) -> bool {
    !piece.iter().all(|&b| b == 0)
        && zstd::bulk::compress(piece, 1).is_ok_and(|c| c.len() < piece.len() * 7 / 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_aligned_inside_used_ranges_and_spread() {
        let used = vec![
            0..(1 << 20),
            (3 << 20) + 100..(3 << 20) + 5000,
            (8 << 20)..(40 << 20),
        ];
        let p = places(&used);
        assert!(p.len() > 100, "{}", p.len());
        for &at in &p {
            assert_eq!(at % PIECE, 0);
            assert!(
                used.iter().any(|r| r.start <= at && at + PIECE <= r.end),
                "{at}"
            );
        }
        // Spread in proportion to the used bytes: most in the large range.
        assert!(p.iter().filter(|&&at| at >= 8 << 20).count() > 90);
        assert!(p.windows(2).all(|w| w[0] < w[1]));
        assert!(places(&[]).is_empty());
        assert!(
            places(std::slice::from_ref(&(0..4096))).is_empty(),
            "no piece fits"
        );
    }

    #[test]
    fn only_compressible_used_bytes_are_sampled() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut x = 1u64;
        let mut noise = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        // 4 MiB of text, then 4 MiB of noise, then 4 MiB of text that no
        // used range covers (a deleted file's blocks).
        let mut bytes = Vec::new();
        while bytes.len() < 4 << 20 {
            bytes.extend_from_slice(b"the quick brown fox jumps over the lazy dog ");
        }
        bytes.truncate(4 << 20);
        bytes.extend((0..4 << 20).map(|_| noise()));
        bytes.extend(std::iter::repeat_n(b'Q', 4 << 20));
        std::io::Write::write_all(&mut f, &bytes).unwrap();
        let src = Source::open(f.path()).unwrap();
        let used = std::slice::from_ref(&(0..(8u64 << 20)));
        let dict = sample(&src, used, 100).unwrap().expect("a dictionary");
        assert!(dict.starts_with(DICT_TAG));
        assert_eq!(dict.len(), DICT_TAG.len() + PIECES * PIECE as usize);
        assert!(!dict.contains(&b'Q'), "free blocks sampled");
        assert!(
            zstd::bulk::compress(&dict, 1).unwrap().len() < dict.len() / 4,
            "noise sampled"
        );
        assert!(sample(&src, used, MIN_CHUNKS - 1).unwrap().is_none());
        // Nothing compressible: no dictionary.
        assert!(
            sample(&src, std::slice::from_ref(&((4 << 20)..(8 << 20))), 100)
                .unwrap()
                .is_none()
        );
    }
}
