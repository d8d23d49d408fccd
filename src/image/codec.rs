//! A chunk's stored bytes and back: zstd on its own, zstd against the
//! image's dictionary (samples of the volume, so each chunk need not learn
//! the volume's common strings anew), or zstd against a base chunk (a
//! delta: the parent image's chunk at the same offset, so a chunk where a
//! few blocks changed costs those blocks, not the whole chunk), then
//! optionally sealed with the image key. Decoding always ends with the
//! chunk's id checked against what came out.

use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use zstd::zstd_safe::{CCtx, CDict, CParameter, DCtx, DDict};

use super::crypto::Key;
use super::format::{FLAG_COMPRESSED, FLAG_DELTA, FLAG_DICT, FLAG_ENCRYPTED};

/// A delta or dictionary payload names what it was compressed against by
/// id and length, in front of the zstd frame, so a repository chunk's
/// reference is found even from another image.
const BASE_REF: usize = 32 + 4;

/// Every dictionary starts with this: zstd reads a dictionary that starts
/// with its own magic number as a trained one, and sampled volume bytes
/// could; these never do.
pub const DICT_TAG: &[u8; 8] = b"BMRDICT\0";

/// What a delta was made against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseRef {
    pub id: [u8; 32],
    pub len: u32,
}

/// What a payload may refer to by id, each checked against its id by the
/// implementation: a delta's base chunk, a dictionary.
pub trait Refs {
    fn base(&self, r: &BaseRef) -> Result<Vec<u8>>;
    fn dictionary(&self, r: &BaseRef) -> Result<Arc<Dictionary>>;
}

/// For a payload that must stand alone (a dictionary's own) or a medium
/// without parents: an image's own dictionary at most.
pub struct Alone<'a>(pub Option<&'a Arc<Dictionary>>);

impl Refs for Alone<'_> {
    fn base(&self, _: &BaseRef) -> Result<Vec<u8>> {
        bail!("a delta of a parent's chunk, but no parent image is at hand")
    }

    fn dictionary(&self, r: &BaseRef) -> Result<Arc<Dictionary>> {
        match self.0 {
            Some(d) if d.names(r) => Ok(d.clone()),
            _ => bail!(
                "compressed with dictionary {}, which this image does not carry",
                super::format::hex(&r.id)
            ),
        }
    }
}

/// Raw bytes zstd compresses every chunk against (a "raw content"
/// dictionary), prepared for both directions.
pub struct Dictionary {
    pub id: [u8; 32],
    pub bytes: Vec<u8>,
    cdict: Option<CDict<'static>>,
    ddict: DDict<'static>,
}

impl Dictionary {
    /// A dictionary read from an image: refused unless it is one bmr made
    /// and its bytes are those its id names.
    pub fn open(key: Option<&Key>, id: [u8; 32], bytes: Vec<u8>) -> Result<Dictionary> {
        ensure!(
            chunk_id(key, &bytes) == id,
            "the image's dictionary does not match its hash: damaged"
        );
        Dictionary::prepare(id, bytes, None)
    }

    /// A dictionary of `bytes` (which start with [`DICT_TAG`]) to compress
    /// with at `level`, and to decode with.
    pub fn new(key: Option<&Key>, bytes: Vec<u8>, level: i32) -> Result<Dictionary> {
        Dictionary::prepare(chunk_id(key, &bytes), bytes, Some(level))
    }

    /// The same dictionary prepared for compression at `level` too.
    pub fn for_level(&self, level: i32) -> Result<Dictionary> {
        Dictionary::prepare(self.id, self.bytes.clone(), Some(level))
    }

    fn prepare(id: [u8; 32], bytes: Vec<u8>, level: Option<i32>) -> Result<Dictionary> {
        ensure!(
            bytes.starts_with(DICT_TAG),
            "the image's dictionary is damaged (no tag)"
        );
        let ddict =
            DDict::try_create(&bytes).ok_or_else(|| anyhow!("zstd refused the dictionary"))?;
        let cdict = match level {
            Some(l) => Some(
                CDict::try_create(&bytes, l)
                    .ok_or_else(|| anyhow!("zstd refused the dictionary at level {l}"))?,
            ),
            None => None,
        };
        Ok(Dictionary {
            id,
            bytes,
            cdict,
            ddict,
        })
    }

    pub fn len(&self) -> u32 {
        self.bytes.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn names(&self, r: &BaseRef) -> bool {
        r.id == self.id && r.len == self.len()
    }
}

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
/// is a delta against it (the base's matches are free); else, with a
/// dictionary, compressed against that; stored as it is when neither
/// makes it smaller.
pub fn encode(
    data: &[u8],
    id: &[u8; 32],
    level: i32,
    base: Option<(&[u8; 32], &[u8])>,
    dict: Option<&Dictionary>,
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
            let (flags, c) = match dict.and_then(|d| d.cdict.as_ref().map(|c| (d, c))) {
                Some((d, cdict)) => (
                    FLAG_COMPRESSED | FLAG_DICT,
                    with_dictionary(data, d, cdict)?,
                ),
                None => (FLAG_COMPRESSED, compress(data, level)?),
            };
            if c.len() < data.len() {
                (flags, c)
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

fn reference(id: &[u8; 32], len: u32, frame_bound: usize) -> Vec<u8> {
    let mut out = vec![0u8; BASE_REF + frame_bound];
    out[..32].copy_from_slice(id);
    out[32..BASE_REF].copy_from_slice(&len.to_le_bytes());
    out
}

/// zstd against the prepared dictionary, with a context kept per thread
/// (the dictionary's tables are copied in, not rebuilt, for each chunk).
fn with_dictionary(data: &[u8], d: &Dictionary, cdict: &CDict<'static>) -> Result<Vec<u8>> {
    use std::cell::RefCell;
    thread_local! {
        static CCTX: RefCell<Option<CCtx<'static>>> = const { RefCell::new(None) };
    }
    let mut out = reference(&d.id, d.len(), zstd::zstd_safe::compress_bound(data.len()));
    let n = CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let cctx = slot.get_or_insert_with(CCtx::create);
        cctx.compress_using_cdict(&mut out[BASE_REF..], data, cdict)
            .map_err(zerr)
            .context("compressing against the image's dictionary")
    })?;
    out.truncate(BASE_REF + n);
    Ok(out)
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
    cctx.ref_prefix(base).map_err(zerr)?;
    let mut out = reference(
        base_id,
        base_len,
        zstd::zstd_safe::compress_bound(data.len()),
    );
    let n = cctx
        .compress2(&mut out[BASE_REF..], data)
        .map_err(zerr)
        .context("compressing against the parent's chunk")?;
    out.truncate(BASE_REF + n);
    Ok(out)
}

/// What a delta or dictionary payload (after decryption) was compressed
/// against.
pub fn delta_base(plain: &[u8]) -> Result<BaseRef> {
    ensure!(
        plain.len() > BASE_REF,
        "a delta or dictionary chunk too short to name what it refers to"
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

/// Decompression against a dictionary, the context kept per thread too.
fn decompress_with(dict: &Dictionary, data: &[u8], out: &mut [u8]) -> Result<usize> {
    use std::cell::RefCell;
    thread_local! {
        static DCTX: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
    }
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dctx = slot.get_or_insert_with(DCtx::create);
        dctx.decompress_using_ddict(out, data, &dict.ddict)
            .map_err(zerr)
    })
}

/// Decodes a stored chunk into `out` (exactly its raw length) and checks it
/// against `id`. `refs` gives a delta's base chunk or a dictionary by id.
/// `at` names the chunk in errors.
pub fn decode_into(
    key: Option<&Key>,
    id: &[u8; 32],
    flags: u8,
    payload: &[u8],
    out: &mut [u8],
    refs: &dyn Refs,
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
    ensure!(
        flags & (FLAG_DELTA | FLAG_DICT) == 0 || flags & FLAG_COMPRESSED != 0,
        "{at}: a delta or dictionary chunk that is not compressed: damaged"
    );
    if flags & FLAG_DELTA != 0 && flags & FLAG_DICT != 0 {
        bail!("{at}: both a delta and against a dictionary: damaged");
    } else if flags & FLAG_DICT != 0 {
        let r = delta_base(plain).with_context(|| at.to_string())?;
        let dict = refs.dictionary(&r).with_context(|| at.to_string())?;
        let n = decompress_with(&dict, &plain[BASE_REF..], out)
            .with_context(|| format!("{at}: does not decompress to its {raw_len} bytes"))?;
        ensure!(
            n == raw_len,
            "{at}: {n} bytes instead of {raw_len}: damaged"
        );
    } else if flags & FLAG_DELTA != 0 {
        let r = delta_base(plain).with_context(|| at.to_string())?;
        let base = refs
            .base(&r)
            .with_context(|| format!("{at}: reading the chunk it is a delta of"))?;
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

    /// Words drawn from a vocabulary: what a dictionary is for.
    fn prose(seed: u64, n: usize) -> Vec<u8> {
        let mut x = 7u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let words: Vec<Vec<u8>> = (0..3000)
            .map(|_| {
                (0..3 + next() % 7)
                    .map(|_| b'a' + (next() % 26) as u8)
                    .collect()
            })
            .collect();
        let mut y = seed;
        let mut out = Vec::with_capacity(n + 16);
        while out.len() < n {
            y = y
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.extend_from_slice(&words[(y >> 33) as usize % words.len()]);
            out.push(b' ');
        }
        out.truncate(n);
        out
    }

    /// A base given by a function, and at most one dictionary.
    struct Given<'a, F: Fn(&BaseRef) -> Result<Vec<u8>>>(F, Option<&'a Arc<Dictionary>>);

    impl<F: Fn(&BaseRef) -> Result<Vec<u8>>> Refs for Given<'_, F> {
        fn base(&self, r: &BaseRef) -> Result<Vec<u8>> {
            (self.0)(r)
        }

        fn dictionary(&self, r: &BaseRef) -> Result<Arc<Dictionary>> {
            Alone(self.1).dictionary(r)
        }
    }

    fn no_base(_: &BaseRef) -> Result<Vec<u8>> {
        bail!("no base")
    }

    const NONE: Alone = Alone(None);

    fn dictionary_of(samples: &[Vec<u8>], key: Option<&Key>) -> Arc<Dictionary> {
        let mut bytes = DICT_TAG.to_vec();
        for s in samples {
            bytes.extend_from_slice(&s[..8192]);
        }
        Arc::new(Dictionary::new(key, bytes, 3).unwrap())
    }

    #[test]
    fn a_dictionary_shrinks_chunks_and_they_decode_only_against_it() {
        let samples: Vec<Vec<u8>> = (100..132).map(|s| prose(s, 8192)).collect();
        let dict = dictionary_of(&samples, None);
        let mut plain_total = 0;
        let mut dict_total = 0;
        for seed in 1..5 {
            let data = prose(seed, 1 << 20);
            let id = chunk_id(None, &data);
            let (f, plain) = encode(&data, &id, 3, None, None, None).unwrap();
            assert_eq!(f, FLAG_COMPRESSED);
            let (flags, d) = encode(&data, &id, 3, None, Some(&dict), None).unwrap();
            assert_eq!(flags, FLAG_COMPRESSED | FLAG_DICT);
            plain_total += plain.len();
            dict_total += d.len();
            let mut out = vec![0u8; data.len()];
            decode_into(None, &id, flags, &d, &mut out, &Alone(Some(&dict)), "t").unwrap();
            assert!(out == data);
            let err = decode_into(None, &id, flags, &d, &mut out, &NONE, "t").unwrap_err();
            assert!(format!("{err:#}").contains("does not carry"), "{err:#}");
        }
        // Each chunk no longer learns the vocabulary from scratch.
        assert!(
            dict_total + 4 * 2048 < plain_total,
            "with a dictionary {dict_total}, without {plain_total}"
        );

        // Another dictionary of the same length is not this one.
        let data = prose(9, 1 << 20);
        let id = chunk_id(None, &data);
        let (flags, d) = encode(&data, &id, 3, None, Some(&dict), None).unwrap();
        let other = dictionary_of(
            &(200..232).map(|s| prose(s, 8192)).collect::<Vec<_>>(),
            None,
        );
        assert_eq!(other.len(), dict.len());
        let mut out = vec![0u8; data.len()];
        assert!(decode_into(None, &id, flags, &d, &mut out, &Alone(Some(&other)), "t").is_err());
        // A dictionary whose id leads the payload but whose bytes differ is
        // caught by the chunk's hash.
        let forged = Arc::new(Dictionary::prepare(dict.id, other.bytes.clone(), None).unwrap());
        let err =
            decode_into(None, &id, flags, &d, &mut out, &Alone(Some(&forged)), "t").unwrap_err();
        assert!(
            format!("{err:#}").contains("damaged") || format!("{err:#}").contains("decompress"),
            "{err:#}"
        );
        // Delta and dictionary at once is damage, not a guess.
        assert!(decode_into(
            None,
            &id,
            flags | FLAG_DELTA,
            &d,
            &mut out,
            &Alone(Some(&dict)),
            "t"
        )
        .is_err());
    }

    #[test]
    fn a_dictionary_is_checked_when_opened() {
        let samples: Vec<Vec<u8>> = (1..33).map(|s| prose(s, 8192)).collect();
        let dict = dictionary_of(&samples, None);
        let reopened = Dictionary::open(None, dict.id, dict.bytes.clone()).unwrap();
        assert_eq!(reopened.bytes, dict.bytes);
        let mut changed = dict.bytes.clone();
        changed[5000] ^= 1;
        let err = Dictionary::open(None, dict.id, changed).err().unwrap();
        assert!(err.to_string().contains("does not match its hash"), "{err}");
        let untagged = dict.bytes[8..].to_vec();
        let id = chunk_id(None, &untagged);
        assert!(Dictionary::open(None, id, untagged).is_err());
        // Encrypted images key the dictionary's id like a chunk's.
        let (key, _) = crate::image::crypto::create(b"pw").unwrap();
        let keyed = dictionary_of(&samples, Some(&key));
        assert_ne!(keyed.id, dict.id);
        assert!(Dictionary::open(None, keyed.id, keyed.bytes.clone()).is_err());
        assert!(Dictionary::open(Some(&key), keyed.id, keyed.bytes.clone()).is_ok());
        let data = prose(77, 1 << 18);
        let id = chunk_id(Some(&key), &data);
        let (flags, sealed) = encode(&data, &id, 3, None, Some(&keyed), Some(&key)).unwrap();
        assert_eq!(flags, FLAG_COMPRESSED | FLAG_DICT | FLAG_ENCRYPTED);
        let mut out = vec![0u8; data.len()];
        decode_into(
            Some(&key),
            &id,
            flags,
            &sealed,
            &mut out,
            &Alone(Some(&keyed)),
            "t",
        )
        .unwrap();
        assert!(out == data);
    }

    #[test]
    fn a_delta_costs_the_change_and_decodes_only_against_its_base() {
        let base = text(1, 1 << 20);
        let mut new = base.clone();
        new[300_000..304_096].copy_from_slice(&text(2, 4096));
        let base_id = chunk_id(None, &base);
        let id = chunk_id(None, &new);
        let (plain_flags, plain) = encode(&new, &id, 3, None, None, None).unwrap();
        let (flags, d) = encode(&new, &id, 3, Some((&base_id, &base)), None, None).unwrap();
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
        decode_into(None, &id, flags, &d, &mut out, &Given(by_id, None), "t").unwrap();
        assert_eq!(out, new);

        let err =
            decode_into(None, &id, flags, &d, &mut out, &Given(no_base, None), "t").unwrap_err();
        assert!(format!("{err:#}").contains("no base"), "{err:#}");
        let wrong = |_: &BaseRef| Ok(text(3, 1 << 20));
        let err =
            decode_into(None, &id, flags, &d, &mut out, &Given(wrong, None), "t").unwrap_err();
        assert!(
            format!("{err:#}").contains("damaged") || format!("{err:#}").contains("decompress"),
            "{err:#}"
        );
    }

    #[test]
    fn plain_chunks_round_trip_and_a_wrong_length_is_damage() {
        let data = text(7, 100_000);
        let id = chunk_id(None, &data);
        let (flags, p) = encode(&data, &id, 3, None, None, None).unwrap();
        let mut out = vec![0u8; data.len()];
        decode_into(None, &id, flags, &p, &mut out, &NONE, "t").unwrap();
        assert_eq!(out, data);
        let mut short = vec![0u8; data.len() - 1];
        assert!(decode_into(None, &id, flags, &p, &mut short, &NONE, "t").is_err());
        let mut long = vec![0u8; data.len() + 1];
        assert!(decode_into(None, &id, flags, &p, &mut long, &NONE, "t").is_err());
        // Incompressible bytes are stored as they are.
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let nid = chunk_id(None, &noise);
        let (f, p) = encode(&noise, &nid, 3, None, None, None).unwrap();
        if f == 0 {
            assert_eq!(p, noise);
        }
    }
}
