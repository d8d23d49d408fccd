//! A chunk's stored bytes and back: zstd on its own, or zstd against a base
//! chunk (a delta: the parent image's chunk at the same offset, so a chunk
//! where a few blocks changed costs those blocks, not the whole chunk), then
//! optionally sealed with the image key. Decoding always ends with the
//! chunk's id checked against what came out.

use anyhow::{anyhow, bail, ensure, Context, Result};
use zstd::zstd_safe::{CCtx, CParameter, DCtx};

use super::crypto::Key;
use super::format::{FLAG_COMPRESSED, FLAG_DELTA, FLAG_ENCRYPTED, FLAG_PIECES};

/// A delta payload names its base by id and length, in front of the zstd
/// frame, so a repository chunk's base is found even from another image.
const BASE_REF: usize = 32 + 4;

/// What a delta was made against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseRef {
    pub id: [u8; 32],
    pub len: u32,
}

/// Gives a delta's base chunk, checked against its id.
pub type BaseFn<'a> = &'a dyn Fn(&BaseRef) -> Result<Vec<u8>>;

/// zstd's own error names are terse; this says which chunk.
fn zerr(code: usize) -> anyhow::Error {
    anyhow!("zstd: {}", zstd::zstd_safe::get_error_name(code))
}

/// The id of a chunk's plain bytes: BLAKE3, keyed for encrypted images so
/// ids say nothing about the plaintext.
pub fn chunk_id(key: Option<&Key>, data: &[u8]) -> [u8; 32] {
    match key {
        Some(k) => k.chunk_id(data),
        None => *blake3::hash(data).as_bytes(),
    }
}

/// The stored form of `data`: flags and payload. With a base, the payload
/// is a delta against it when that is smaller than plain compression would
/// be without it (it nearly always is: the base's matches are free).
pub fn encode(
    data: &[u8],
    id: &[u8; 32],
    level: i32,
    base: Option<(&[u8; 32], &[u8])>,
    key: Option<&Key>,
) -> Result<(u8, Vec<u8>)> {
    let (mut flags, mut payload) = match base {
        Some((base_id, base)) => {
            let d = delta_pieces(data, level, base_id, base)?;
            if d.len() < data.len() {
                (FLAG_COMPRESSED | FLAG_DELTA | FLAG_PIECES, d)
            } else {
                (0, data.to_vec())
            }
        }
        None => {
            let c = compress(data, level)?;
            if c.len() < data.len() {
                (FLAG_COMPRESSED, c)
            } else {
                (0, data.to_vec())
            }
        }
    };
    if let Some(k) = key {
        payload = k.seal(id, &payload)?;
        flags |= FLAG_ENCRYPTED;
    }
    Ok((flags, payload))
}

/// Plain zstd with a context kept per thread: a fresh one per chunk costs
/// its allocation and table setup every MiB.
fn compress(data: &[u8], level: i32) -> Result<Vec<u8>> {
    use std::cell::RefCell;
    thread_local! {
        static CCTX: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    }
    CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((
                level,
                zstd::bulk::Compressor::new(level).context("setting up zstd")?,
            ));
        }
        match slot.as_mut() {
            Some((_, c)) => c.compress(data).context("compressing"),
            None => bail!("no zstd context"),
        }
    })
}

/// Deltas are made a piece of this size at a time, each against the same
/// piece of the base: filesystems change blocks in place, so that is where
/// a piece's old bytes are. An unchanged piece costs nothing to find, and a
/// changed one costs a 1 MiB delta however large the chunk (zstd over a
/// whole 4 MiB chunk and base lost the base's early bytes from its hash
/// tables, and its deltas came out 1.6 times the change).
pub const DELTA_PIECE: usize = 1 << 20;

/// `base id | base length u32 | piece count u32 | per piece: frame length
/// u32 (0: the piece is the base's) | the frames`; each frame is zstd with
/// the base's piece as its prefix.
fn delta_pieces(data: &[u8], level: i32, base_id: &[u8; 32], base: &[u8]) -> Result<Vec<u8>> {
    let base_len = u32::try_from(base.len()).context("a base chunk over 4 GiB")?;
    let pieces = data.len().div_ceil(DELTA_PIECE);
    let mut frames = Vec::with_capacity(pieces);
    for (i, piece) in data.chunks(DELTA_PIECE).enumerate() {
        let old = base_piece(base, i, piece.len());
        frames.push(if old == Some(piece) {
            Vec::new()
        } else {
            delta_frame(piece, level, old.unwrap_or_default())?
        });
    }
    let mut out =
        Vec::with_capacity(BASE_REF + 4 + 4 * pieces + frames.iter().map(Vec::len).sum::<usize>());
    out.extend_from_slice(base_id);
    out.extend_from_slice(&base_len.to_le_bytes());
    out.extend_from_slice(&(pieces as u32).to_le_bytes());
    for f in &frames {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
    }
    for f in &frames {
        out.extend_from_slice(f);
    }
    Ok(out)
}

/// Piece `i` of the base, when the base has one: as long as the new piece,
/// or shorter where the base ends.
fn base_piece(base: &[u8], i: usize, len: usize) -> Option<&[u8]> {
    let start = i * DELTA_PIECE;
    (start < base.len()).then(|| &base[start..(start + len).min(base.len())])
}

/// One zstd frame of `data` with `prefix` as its history.
fn delta_frame(data: &[u8], level: i32, prefix: &[u8]) -> Result<Vec<u8>> {
    let mut cctx = CCtx::create();
    let span = (prefix.len() + data.len())
        .next_power_of_two()
        .trailing_zeros();
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .map_err(zerr)?;
    cctx.set_parameter(CParameter::WindowLog(span.clamp(10, 27)))
        .map_err(zerr)?;
    if !prefix.is_empty() {
        cctx.ref_prefix(prefix).map_err(zerr)?;
    }
    let mut out = vec![0u8; zstd::zstd_safe::compress_bound(data.len())];
    let n = cctx
        .compress2(&mut out[..], data)
        .map_err(zerr)
        .context("compressing against the parent's chunk")?;
    out.truncate(n);
    Ok(out)
}

/// Decodes a piecewise delta's frames (after its base reference) into
/// `out`, each piece against the same piece of `base`.
fn undelta_pieces(frames: &[u8], base: &[u8], out: &mut [u8]) -> Result<()> {
    let pieces = out.len().div_ceil(DELTA_PIECE);
    ensure!(
        frames.len() >= 4
            && u32::from_le_bytes([frames[0], frames[1], frames[2], frames[3]]) as usize == pieces,
        "a delta of the wrong number of pieces: damaged"
    );
    let lens_end = 4 + 4 * pieces;
    ensure!(frames.len() >= lens_end, "a delta cut short: damaged");
    let mut at = lens_end;
    for (i, piece) in out.chunks_mut(DELTA_PIECE).enumerate() {
        let l = &frames[4 + 4 * i..8 + 4 * i];
        let len = u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize;
        let old = base_piece(base, i, piece.len());
        if len == 0 {
            let old = old
                .filter(|o| o.len() == piece.len())
                .ok_or_else(|| anyhow!("a delta piece the base does not have: damaged"))?;
            piece.copy_from_slice(old);
            continue;
        }
        let frame = at
            .checked_add(len)
            .and_then(|end| frames.get(at..end))
            .ok_or_else(|| anyhow!("a delta cut short: damaged"))?;
        at += len;
        let mut dctx = DCtx::create();
        if let Some(old) = old.filter(|o| !o.is_empty()) {
            dctx.ref_prefix(old).map_err(zerr)?;
        }
        let n = dctx.decompress(piece, frame).map_err(zerr)?;
        ensure!(
            n == piece.len(),
            "a delta piece of {n} bytes instead of {}: damaged",
            piece.len()
        );
    }
    ensure!(
        at == frames.len(),
        "a delta with bytes after its last piece: damaged"
    );
    Ok(())
}

/// A delta as bmr made them before piecewise deltas (one frame with the
/// whole base as its prefix): what the tests decode to show such images
/// still restore.
#[cfg(test)]
fn delta(data: &[u8], level: i32, base_id: &[u8; 32], base: &[u8]) -> Result<Vec<u8>> {
    let base_len = u32::try_from(base.len()).context("a base chunk over 4 GiB")?;
    let mut out = base_id.to_vec();
    out.extend_from_slice(&base_len.to_le_bytes());
    out.extend_from_slice(&delta_frame(data, level, base)?);
    Ok(out)
}

/// The base a delta payload (after decryption) was made against.
pub fn delta_base(plain: &[u8]) -> Result<BaseRef> {
    ensure!(
        plain.len() > BASE_REF,
        "a delta chunk too short to name its base"
    );
    let mut id = [0u8; 32];
    id.copy_from_slice(&plain[..32]);
    let len = u32::from_le_bytes([plain[32], plain[33], plain[34], plain[35]]);
    Ok(BaseRef { id, len })
}

/// Decompression likewise keeps its context per thread.
fn decompress(data: &[u8], out: &mut [u8]) -> Result<usize> {
    use std::cell::RefCell;
    thread_local! {
        static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    }
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().context("setting up zstd")?);
        }
        match slot.as_mut() {
            Some(d) => Ok(d.decompress_to_buffer(data, out)?),
            None => bail!("no zstd context"),
        }
    })
}

/// Decodes a stored chunk into `out` (exactly its raw length) and checks it
/// against `id`. `base` gives a delta's base chunk by id. `at` names the
/// chunk in errors.
pub fn decode_into(
    key: Option<&Key>,
    id: &[u8; 32],
    flags: u8,
    payload: &[u8],
    out: &mut [u8],
    base: BaseFn,
    at: &str,
) -> Result<()> {
    let opened;
    let plain = if flags & FLAG_ENCRYPTED != 0 {
        let key = key.ok_or_else(|| anyhow!("{at}: encrypted, but no key"))?;
        opened = key.open(id, payload).with_context(|| at.to_string())?;
        &opened[..]
    } else {
        payload
    };
    let raw_len = out.len();
    if flags & FLAG_DELTA != 0 {
        ensure!(
            flags & FLAG_COMPRESSED != 0,
            "{at}: a delta that is not compressed: damaged"
        );
        let r = delta_base(plain).with_context(|| at.to_string())?;
        let base = base(&r).with_context(|| format!("{at}: reading the chunk it is a delta of"))?;
        ensure!(
            base.len() == r.len as usize,
            "{at}: its base has {} bytes, not {}: damaged",
            base.len(),
            r.len
        );
        if flags & FLAG_PIECES != 0 {
            undelta_pieces(&plain[BASE_REF..], &base, out)
                .with_context(|| format!("{at}: does not decompress"))?;
        } else {
            let mut dctx = DCtx::create();
            dctx.ref_prefix(&base[..]).map_err(zerr)?;
            let n = dctx
                .decompress(out, &plain[BASE_REF..])
                .map_err(zerr)
                .with_context(|| format!("{at}: does not decompress"))?;
            ensure!(
                n == raw_len,
                "{at}: {n} bytes instead of {raw_len}: damaged"
            );
        }
    } else if flags & FLAG_COMPRESSED != 0 {
        let n = decompress(plain, out)
            .with_context(|| format!("{at}: does not decompress to its {raw_len} bytes"))?;
        ensure!(
            n == raw_len,
            "{at}: {n} bytes instead of {raw_len}: damaged"
        );
    } else {
        ensure!(
            plain.len() == raw_len,
            "{at}: {} bytes instead of {raw_len}: damaged",
            plain.len()
        );
        out.copy_from_slice(plain);
    }
    if chunk_id(key, out) != *id {
        bail!("{at}: content does not match its hash: damaged");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                b"abcdefgh ij\n"[(x >> 60) as usize % 12]
            })
            .collect()
    }

    fn no_base(_: &BaseRef) -> Result<Vec<u8>> {
        bail!("no base")
    }

    #[test]
    fn a_delta_costs_the_change_and_decodes_only_against_its_base() {
        let base = text(1, 1 << 20);
        let mut new = base.clone();
        new[300_000..304_096].copy_from_slice(&text(2, 4096));
        let base_id = chunk_id(None, &base);
        let id = chunk_id(None, &new);
        let (plain_flags, plain) = encode(&new, &id, 3, None, None).unwrap();
        let (flags, d) = encode(&new, &id, 3, Some((&base_id, &base)), None).unwrap();
        assert_eq!(plain_flags, FLAG_COMPRESSED);
        assert_eq!(flags, FLAG_COMPRESSED | FLAG_DELTA | FLAG_PIECES);
        assert!(
            d.len() < 4096,
            "delta of one changed 4 KiB block: {} bytes",
            d.len()
        );
        assert!(plain.len() > 100_000);

        let mut out = vec![0u8; new.len()];
        let b = base.clone();
        let by_id = move |want: &BaseRef| -> Result<Vec<u8>> {
            ensure!(
                want.id == base_id && want.len == 1 << 20,
                "asked for another base"
            );
            Ok(b.clone())
        };
        decode_into(None, &id, flags, &d, &mut out, &by_id, "t").unwrap();
        assert_eq!(out, new);

        let err = decode_into(None, &id, flags, &d, &mut out, &no_base, "t").unwrap_err();
        assert!(format!("{err:#}").contains("no base"), "{err:#}");
        let wrong = |_: &BaseRef| Ok(text(3, 1 << 20));
        let err = decode_into(None, &id, flags, &d, &mut out, &wrong, "t").unwrap_err();
        assert!(
            format!("{err:#}").contains("damaged") || format!("{err:#}").contains("decompress"),
            "{err:#}"
        );

        // A delta made as one frame, as images before piecewise deltas
        // have them, still decodes.
        let old = delta(&new, 3, &base_id, &base).unwrap();
        let mut out = vec![0u8; new.len()];
        decode_into(
            None,
            &id,
            FLAG_COMPRESSED | FLAG_DELTA,
            &old,
            &mut out,
            &by_id,
            "t",
        )
        .unwrap();
        assert_eq!(out, new);
    }

    #[test]
    fn a_large_chunk_changed_in_one_place_costs_that_piece() {
        // 4 MiB: text, then noise, as a volume has both.
        let mut base = text(4, 3 << 20);
        let mut x = 9u64;
        base.extend((0..1 << 20).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        }));
        let mut new = base.clone();
        new[(2 << 20) + 5000..(2 << 20) + 9096].copy_from_slice(&text(5, 4096));
        new[(3 << 20) + 100..(3 << 20) + 200].fill(7);
        let base_id = chunk_id(None, &base);
        let id = chunk_id(None, &new);
        let (flags, d) = encode(&new, &id, 3, Some((&base_id, &base)), None).unwrap();
        assert_eq!(flags, FLAG_COMPRESSED | FLAG_DELTA | FLAG_PIECES);
        assert!(
            d.len() < 6000,
            "two small changes in 4 MiB: {} bytes",
            d.len()
        );
        let lens: Vec<u32> = (0..4)
            .map(|i| u32::from_le_bytes(d[40 + 4 * i..44 + 4 * i].try_into().unwrap()))
            .collect();
        assert_eq!((lens[0], lens[1]), (0, 0), "unchanged pieces: {lens:?}");
        assert!(lens[2] > 0 && lens[3] > 0, "{lens:?}");
        let b = base.clone();
        let by_id = move |_: &BaseRef| -> Result<Vec<u8>> { Ok(b.clone()) };
        let mut out = vec![0u8; new.len()];
        decode_into(None, &id, flags, &d, &mut out, &by_id, "t").unwrap();
        assert!(out == new);
        // A damaged piece table or a truncated frame is an error, not a panic.
        for cut in [37, 41, 44, 55, d.len() - 1] {
            let mut bad = d.clone();
            if cut == d.len() - 1 {
                bad.truncate(cut);
            } else {
                bad[cut] ^= 0xff;
            }
            assert!(decode_into(None, &id, flags, &bad, &mut out, &by_id, "t").is_err());
        }
        // A base shorter than the chunk: the missing piece is compressed
        // on its own.
        let short = base[..2 << 20].to_vec();
        let sid = chunk_id(None, &short);
        let (f, d2) = encode(&new, &id, 3, Some((&sid, &short)), None).unwrap();
        let s = short.clone();
        let by = move |_: &BaseRef| -> Result<Vec<u8>> { Ok(s.clone()) };
        decode_into(None, &id, f, &d2, &mut out, &by, "t").unwrap();
        assert!(out == new);
    }

    #[test]
    fn plain_chunks_round_trip_and_a_wrong_length_is_damage() {
        let data = text(7, 100_000);
        let id = chunk_id(None, &data);
        let (flags, p) = encode(&data, &id, 3, None, None).unwrap();
        let mut out = vec![0u8; data.len()];
        decode_into(None, &id, flags, &p, &mut out, &no_base, "t").unwrap();
        assert_eq!(out, data);
        let mut short = vec![0u8; data.len() - 1];
        assert!(decode_into(None, &id, flags, &p, &mut short, &no_base, "t").is_err());
        let mut long = vec![0u8; data.len() + 1];
        assert!(decode_into(None, &id, flags, &p, &mut long, &no_base, "t").is_err());
        // Incompressible bytes are stored as they are.
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let nid = chunk_id(None, &noise);
        let (f, p) = encode(&noise, &nid, 3, None, None).unwrap();
        if f == 0 {
            assert_eq!(p, noise);
        }
    }
}

#[cfg(test)]
mod robustness {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// A piecewise delta's table and frames come from the image: any
        /// bytes give Ok or Err, never a panic or a read out of bounds.
        #[test]
        fn piece_tables_survive_arbitrary_bytes(
            frames in proptest::collection::vec(any::<u8>(), 0..200),
            base_len in 0usize..(3 * DELTA_PIECE),
            out_len in 1usize..(3 * DELTA_PIECE),
            pieces in 0u32..5,
        ) {
            let mut bytes = pieces.to_le_bytes().to_vec();
            bytes.extend_from_slice(&frames);
            let base = vec![3u8; base_len];
            let mut out = vec![0u8; out_len];
            let _ = undelta_pieces(&bytes, &base, &mut out);
        }
    }
}
