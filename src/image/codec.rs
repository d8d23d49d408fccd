//! A chunk's stored bytes and back: zstd on its own, or zstd against a base
//! chunk (a delta: the parent image's chunk at the same offset, so a chunk
//! where a few blocks changed costs those blocks, not the whole chunk), then
//! optionally sealed with the image key. Decoding always ends with the
//! chunk's id checked against what came out.

use anyhow::{anyhow, bail, ensure, Context, Result};
use zstd::zstd_safe::{CCtx, CParameter, DCtx};

use super::crypto::Key;
use super::format::{FLAG_COMPRESSED, FLAG_DELTA, FLAG_ENCRYPTED};

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
            let d = delta(data, level, base_id, base)?;
            if d.len() < data.len() {
                (FLAG_COMPRESSED | FLAG_DELTA, d)
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

/// zstd with the base as a prefix: every byte the chunk shares with it is
/// a match, found at no entropy cost.
fn delta(data: &[u8], level: i32, base_id: &[u8; 32], base: &[u8]) -> Result<Vec<u8>> {
    let base_len = u32::try_from(base.len()).context("a base chunk over 4 GiB")?;
    let mut cctx = CCtx::create();
    // The window has to reach back over the whole base.
    let span = (base.len() + data.len())
        .next_power_of_two()
        .trailing_zeros();
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .map_err(zerr)?;
    cctx.set_parameter(CParameter::WindowLog(span.clamp(10, 27)))
        .map_err(zerr)?;
    // The level's hash tables keep only so many positions: over a large
    // base the early ones are gone before the chunk needs them (a 4 MiB
    // chunk's deltas came out 1.6 times the change). Long-distance matching
    // finds them wherever they are (1.0 times; about 3% slower at 1 MiB).
    cctx.set_parameter(CParameter::EnableLongDistanceMatching(true))
        .map_err(zerr)?;
    cctx.ref_prefix(base).map_err(zerr)?;
    let mut out = vec![0u8; BASE_REF + zstd::zstd_safe::compress_bound(data.len())];
    out[..32].copy_from_slice(base_id);
    out[32..BASE_REF].copy_from_slice(&base_len.to_le_bytes());
    let n = cctx
        .compress2(&mut out[BASE_REF..], data)
        .map_err(zerr)
        .context("compressing against the parent's chunk")?;
    out.truncate(BASE_REF + n);
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
        assert_eq!(flags, FLAG_COMPRESSED | FLAG_DELTA);
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
