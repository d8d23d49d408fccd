//! The on-disk image format (docs/image-format.md): header, records, index,
//! trailer. Pure encoding and decoding; every parser bounds-checks its input
//! so a damaged or hostile image gives an error, never a panic.

use std::io::{self, Read, Write};

use anyhow::{anyhow, bail, ensure, Result};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::crypto;

pub const MAGIC: &[u8; 8] = b"BMRIMG\x00\x01";
pub const TRAILER_MAGIC: &[u8; 8] = b"BMRTRAIL";
pub const TRAILER_LEN: usize = 8 + 8 + 8 + 32 + 8;
/// The newest format this bmr reads: 2 added deltas made piece by piece
/// (FLAG_PIECES). Only incremental images hold deltas; the others are
/// written as format 1, which older bmr reads too (a rescue medium may be
/// older than the backup).
pub const FORMAT: u32 = 2;
pub const FORMAT_WITHOUT_DELTAS: u32 = 1;
/// Header JSON larger than this is refused as damaged.
const MAX_HEADER: u32 = 1 << 20;
/// A chunk's stored bytes may exceed its raw size a little (AEAD overhead).
const MAX_STORED: u32 = (64 << 20) + 64;
/// The largest chunk the format allows (docs/image-format.md): a record
/// claiming more is damage, and must not make a reader allocate it.
pub const MAX_CHUNK: u32 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: u32,
    pub image_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    pub created: String,
    pub tool: String,
    pub volume: VolumeInfo,
    pub chunk_size: u32,
    pub compression: String,
    pub level: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crypto::Params>,
    /// What the used-block map was read from.
    pub map_source: String,
    pub used_bytes: u64,
    /// Bytes of all chunks together (used blocks rounded out to chunks): what
    /// a restore writes, known before the first record on a tape.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub imaged_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    pub image_id: Uuid,
    /// File name of the parent when the child was made (looked up next to the child).
    pub file: String,
    /// BLAKE3 of the parent's index: the exact parent, not just one with its id.
    pub index_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeInfo {
    pub filesystem: String,
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub label: String,
    pub size_bytes: u64,
    pub block_size: u64,
}

/// What a record says about one chunk of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Stored here, needed to mount (metadata section).
    Meta,
    /// Stored here.
    Data,
    /// In use but all zeros: written as zeros, nothing stored.
    Zero,
    /// Unchanged since the parent image: the parent holds it.
    Parent,
    /// Stored in the repository's chunk store.
    External,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Meta => b'M',
            Kind::Data => b'D',
            Kind::Zero => b'Z',
            Kind::Parent => b'P',
            Kind::External => b'X',
        }
    }

    fn from_code(c: u8) -> Option<Kind> {
        Some(match c {
            b'M' => Kind::Meta,
            b'D' => Kind::Data,
            b'Z' => Kind::Zero,
            b'P' => Kind::Parent,
            b'X' => Kind::External,
            _ => return None,
        })
    }

    pub fn has_payload(self) -> bool {
        matches!(self, Kind::Meta | Kind::Data)
    }
}

pub const FLAG_COMPRESSED: u8 = 1;
pub const FLAG_ENCRYPTED: u8 = 2;
/// Compressed against a base chunk whose id leads the (decrypted) payload.
pub const FLAG_DELTA: u8 = 4;
/// With FLAG_DELTA: the delta is made piece by piece (codec::DELTA_PIECE).
pub const FLAG_PIECES: u8 = 8;
const END: u8 = b'E';

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub offset: u64,
    pub raw_len: u32,
    pub flags: u8,
    pub id: [u8; 32],
    /// Stored bytes for Meta/Data (compressed and/or encrypted), else empty.
    pub payload: Vec<u8>,
}

/// One index entry: a record without its payload, and where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub offset: u64,
    pub raw_len: u32,
    pub flags: u8,
    pub id: [u8; 32],
    /// Byte position of the record in the image file (0 when not stored here).
    pub pos: u64,
    pub stored_len: u32,
}

const ENTRY_LEN: usize = 1 + 8 + 4 + 1 + 32 + 8 + 4;

pub fn write_header<W: Write>(w: &mut W, h: &Header) -> io::Result<u64> {
    let json = serde_json::to_vec(h).map_err(io::Error::other)?;
    w.write_all(MAGIC)?;
    w.write_all(&(json.len() as u32).to_le_bytes())?;
    w.write_all(&json)?;
    w.write_all(blake3::hash(&json).as_bytes())?;
    Ok((8 + 4 + json.len() + 32) as u64)
}

pub fn read_header<R: Read>(r: &mut R) -> Result<(Header, u64)> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .map_err(|_| anyhow!("too short to be a bmr image"))?;
    ensure!(&magic == MAGIC, "not a bmr image (bad magic)");
    let len = read_u32(r)?;
    ensure!(
        len <= MAX_HEADER,
        "the image header claims {len} bytes: damaged"
    );
    let mut json = vec![0u8; len as usize];
    r.read_exact(&mut json)
        .map_err(|_| anyhow!("the image is truncated inside its header"))?;
    let mut sum = [0u8; 32];
    r.read_exact(&mut sum)
        .map_err(|_| anyhow!("the image is truncated inside its header"))?;
    ensure!(
        blake3::hash(&json).as_bytes() == &sum,
        "the image header is damaged (checksum mismatch)"
    );
    let h: Header = serde_json::from_slice(&json)
        .map_err(|e| anyhow!("the image header is not understood: {e}"))?;
    ensure!(
        (1..=FORMAT).contains(&h.format),
        "image format {} is not one this bmr reads (1 to {FORMAT}); use a newer bmr",
        h.format
    );
    ensure!(
        h.chunk_size >= 4096 && h.chunk_size <= 64 << 20 && h.chunk_size.is_power_of_two(),
        "implausible chunk size {}",
        h.chunk_size
    );
    Ok((h, 8 + 4 + u64::from(len) + 32))
}

fn read_u32<R: Read>(r: &mut R) -> Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Bytes a record takes in the file.
pub fn record_len(rec: &Record) -> u64 {
    (1 + 8 + 4 + 1 + 32 + 4 + rec.payload.len()) as u64
}

pub fn write_record<W: Write>(w: &mut W, rec: &Record) -> io::Result<()> {
    let mut head = [0u8; 1 + 8 + 4 + 1 + 32 + 4];
    head[0] = rec.kind.code();
    head[1..9].copy_from_slice(&rec.offset.to_le_bytes());
    head[9..13].copy_from_slice(&rec.raw_len.to_le_bytes());
    head[13] = rec.flags;
    head[14..46].copy_from_slice(&rec.id);
    head[46..50].copy_from_slice(&(rec.payload.len() as u32).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(&rec.payload)
}

/// Reads the next record; None at the end-of-records mark.
pub fn read_record<R: Read>(r: &mut R) -> Result<Option<Record>> {
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind)
        .map_err(|_| anyhow!("the image is truncated: it ends before its index"))?;
    if kind[0] == END {
        return Ok(None);
    }
    let kind = Kind::from_code(kind[0])
        .ok_or_else(|| anyhow!("damaged record (kind byte 0x{:02x})", kind[0]))?;
    let mut head = [0u8; 8 + 4 + 1 + 32 + 4];
    r.read_exact(&mut head)
        .map_err(|_| anyhow!("the image is truncated inside a record"))?;
    let offset = u64::from_le_bytes(head[0..8].try_into().unwrap_or([0; 8]));
    let raw_len = u32::from_le_bytes(head[8..12].try_into().unwrap_or([0; 4]));
    let flags = [head[12]];
    let mut id = [0u8; 32];
    id.copy_from_slice(&head[13..45]);
    let stored = u32::from_le_bytes(head[45..49].try_into().unwrap_or([0; 4]));
    ensure!(
        stored <= MAX_STORED,
        "damaged record at volume offset {offset}: {stored} stored bytes"
    );
    ensure!(
        raw_len <= MAX_CHUNK,
        "damaged record at volume offset {offset}: a {raw_len}-byte chunk"
    );
    ensure!(
        kind.has_payload() || stored == 0,
        "damaged record at volume offset {offset}: payload on a {kind:?} record"
    );
    let mut payload = vec![0u8; stored as usize];
    r.read_exact(&mut payload).map_err(|_| {
        anyhow!("the image is truncated inside the chunk at volume offset {offset}")
    })?;
    Ok(Some(Record {
        kind,
        offset,
        raw_len,
        flags: flags[0],
        id,
        payload,
    }))
}

pub fn write_end<W: Write>(w: &mut W) -> io::Result<()> {
    w.write_all(&[END])
}

/// The index: the block map, then the exception log (files that changed
/// while a mounted volume was read), which is only known at the end.
pub fn encode_index(entries: &[Entry], exceptions: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entries.len() * ENTRY_LEN);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.push(e.kind.code());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
        out.push(e.flags);
        out.extend_from_slice(&e.id);
        out.extend_from_slice(&e.pos.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
    }
    let log = serde_json::to_vec(exceptions).unwrap_or_default();
    out.extend_from_slice(&(log.len() as u32).to_le_bytes());
    out.extend_from_slice(&log);
    out
}

pub fn decode_index(b: &[u8], volume_size: u64) -> Result<(Vec<Entry>, Vec<String>)> {
    ensure!(b.len() >= 4, "the image index is truncated");
    let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let log_at = n
        .checked_mul(ENTRY_LEN)
        .and_then(|x| x.checked_add(4))
        .filter(|&x| x + 4 <= b.len());
    let log_at = log_at.ok_or_else(|| {
        anyhow!(
            "the image index has {} bytes for {n} entries: damaged",
            b.len()
        )
    })?;
    let log_len =
        u32::from_le_bytes([b[log_at], b[log_at + 1], b[log_at + 2], b[log_at + 3]]) as usize;
    ensure!(
        b.len() == log_at + 4 + log_len,
        "the image index has {} bytes for {n} entries and a {log_len}-byte log: damaged",
        b.len()
    );
    let exceptions: Vec<String> = serde_json::from_slice(&b[log_at + 4..])
        .map_err(|e| anyhow!("the exception log is damaged: {e}"))?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let e = &b[4 + i * ENTRY_LEN..4 + (i + 1) * ENTRY_LEN];
        let kind = Kind::from_code(e[0]).ok_or_else(|| anyhow!("index entry {i} is damaged"))?;
        let le64 = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
        let le32 = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap_or([0; 4]));
        let mut id = [0u8; 32];
        id.copy_from_slice(&e[14..46]);
        let entry = Entry {
            kind,
            offset: le64(&e[1..9]),
            raw_len: le32(&e[9..13]),
            flags: e[13],
            id,
            pos: le64(&e[46..54]),
            stored_len: le32(&e[54..58]),
        };
        ensure!(
            entry
                .offset
                .checked_add(u64::from(entry.raw_len))
                .is_some_and(|end| end <= volume_size),
            "index entry {i} points outside the volume ({} + {} > {volume_size})",
            entry.offset,
            entry.raw_len
        );
        ensure!(
            entry.raw_len <= MAX_CHUNK && entry.stored_len <= MAX_STORED,
            "index entry {i} claims a {}-byte chunk: damaged",
            entry.raw_len
        );
        out.push(entry);
    }
    Ok((out, exceptions))
}

/// Reads the index and trailer that follow the end-of-records mark on a
/// sequential medium, where "the last 64 bytes" is not known: the index
/// says its own length. Bytes after the trailer (tape padding) are left.
pub fn read_index_stream<R: Read>(r: &mut R) -> Result<(Vec<u8>, Trailer)> {
    let truncated = || anyhow!("the image is truncated inside its index");
    let mut index = vec![0u8; 4];
    r.read_exact(&mut index).map_err(|_| truncated())?;
    let n = u32::from_le_bytes([index[0], index[1], index[2], index[3]]) as usize;
    // Grown as bytes arrive, so a damaged count cannot ask for terabytes.
    let want = (n as u64) * ENTRY_LEN as u64 + 4;
    let mut entries = Vec::new();
    r.take(want).read_to_end(&mut entries)?;
    ensure!(entries.len() as u64 == want, "{}", truncated());
    let l = entries.len();
    let log_len = u32::from_le_bytes([
        entries[l - 4],
        entries[l - 3],
        entries[l - 2],
        entries[l - 1],
    ]);
    index.extend_from_slice(&entries);
    let mut log = Vec::new();
    r.take(u64::from(log_len)).read_to_end(&mut log)?;
    ensure!(log.len() == log_len as usize, "{}", truncated());
    index.extend_from_slice(&log);
    let mut t = [0u8; TRAILER_LEN];
    r.read_exact(&mut t)
        .map_err(|_| anyhow!("the image is truncated: no trailer after the index"))?;
    let trailer = decode_trailer(&t)?;
    ensure!(
        trailer.index_len == index.len() as u64
            && blake3::hash(&index).as_bytes() == &trailer.index_hash,
        "the image index is damaged (checksum mismatch)"
    );
    Ok((index, trailer))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub index_pos: u64,
    pub index_len: u64,
    pub index_hash: [u8; 32],
    pub records: u64,
}

pub fn encode_trailer(t: &Trailer) -> [u8; TRAILER_LEN] {
    let mut b = [0u8; TRAILER_LEN];
    b[..8].copy_from_slice(TRAILER_MAGIC);
    b[8..16].copy_from_slice(&t.index_pos.to_le_bytes());
    b[16..24].copy_from_slice(&t.index_len.to_le_bytes());
    b[24..56].copy_from_slice(&t.index_hash);
    b[56..64].copy_from_slice(&t.records.to_le_bytes());
    b
}

pub fn decode_trailer(b: &[u8]) -> Result<Trailer> {
    if b.len() != TRAILER_LEN || &b[..8] != TRAILER_MAGIC {
        bail!("the image has no trailer: it is truncated or was not finished");
    }
    let le64 = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
    let mut index_hash = [0u8; 32];
    index_hash.copy_from_slice(&b[24..56]);
    Ok(Trailer {
        index_pos: le64(&b[8..16]),
        index_len: le64(&b[16..24]),
        index_hash,
        records: le64(&b[56..64]),
    })
}

pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            format: FORMAT,
            image_id: Uuid::nil(),
            parent: None,
            created: "2026-11-22T00:00:00Z".into(),
            tool: "bmr test".into(),
            volume: VolumeInfo {
                filesystem: "ext4".into(),
                uuid: "u".into(),
                label: "l".into(),
                size_bytes: 1 << 30,
                block_size: 4096,
            },
            chunk_size: 1 << 20,
            compression: "zstd".into(),
            level: 3,
            encryption: None,
            map_source: "test".into(),
            used_bytes: 5,
            imaged_bytes: 1 << 20,
        }
    }

    #[test]
    fn header_round_trip_and_damage() {
        let mut b = Vec::new();
        let n = write_header(&mut b, &header()).unwrap();
        assert_eq!(n as usize, b.len());
        assert_eq!(read_header(&mut &b[..]).unwrap().0, header());
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert!(read_header(&mut &bad[..])
            .unwrap_err()
            .to_string()
            .contains("damaged"));
        assert!(read_header(&mut &b[..10]).is_err());
        for (format, ok) in [(1, true), (FORMAT, true), (FORMAT + 1, false)] {
            let mut b = Vec::new();
            write_header(&mut b, &Header { format, ..header() }).unwrap();
            let r = read_header(&mut &b[..]);
            assert_eq!(r.is_ok(), ok, "format {format}");
            if !ok {
                assert!(r.unwrap_err().to_string().contains("use a newer bmr"));
            }
        }
        assert!(read_header(&mut &b"NOTANIMAGE"[..])
            .unwrap_err()
            .to_string()
            .contains("not a bmr image"));
    }

    #[test]
    fn records_and_index_round_trip() {
        let rec = Record {
            kind: Kind::Data,
            offset: 1 << 20,
            raw_len: 1 << 20,
            flags: FLAG_COMPRESSED,
            id: [7; 32],
            payload: vec![1, 2, 3],
        };
        let mut b = Vec::new();
        write_record(&mut b, &rec).unwrap();
        write_end(&mut b).unwrap();
        assert_eq!(record_len(&rec) as usize, b.len() - 1);
        let mut r = &b[..];
        assert_eq!(read_record(&mut r).unwrap(), Some(rec.clone()));
        assert_eq!(read_record(&mut r).unwrap(), None);
        assert!(read_record(&mut &b[..20])
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        // A chunk larger than the format allows is damage, not an allocation.
        let huge = Record {
            kind: Kind::Zero,
            raw_len: u32::MAX,
            payload: Vec::new(),
            ..rec.clone()
        };
        let mut hb = Vec::new();
        write_record(&mut hb, &huge).unwrap();
        let err = read_record(&mut &hb[..]).unwrap_err().to_string();
        assert!(err.contains("4294967295-byte chunk"), "{err}");

        let e = Entry {
            kind: Kind::Zero,
            offset: 0,
            raw_len: 4096,
            flags: 0,
            id: [0; 32],
            pos: 0,
            stored_len: 0,
        };
        let idx = encode_index(&[e], &["/var/log/syslog".to_string()]);
        assert_eq!(
            decode_index(&idx, 1 << 20).unwrap(),
            (vec![e], vec!["/var/log/syslog".to_string()])
        );
        assert!(decode_index(&idx, 100)
            .unwrap_err()
            .to_string()
            .contains("outside the volume"));
        assert!(decode_index(&idx[..idx.len() - 1], 1 << 20).is_err());
        let t = Trailer {
            index_pos: 9,
            index_len: 62,
            index_hash: [3; 32],
            records: 1,
        };
        assert_eq!(decode_trailer(&encode_trailer(&t)).unwrap(), t);
        assert!(decode_trailer(&[0; TRAILER_LEN]).is_err());
    }
}

#[cfg(test)]
mod robustness {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any bytes at all: parsers return Ok or Err, never panic or allocate wildly.
        #[test]
        fn parsers_survive_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600), size in any::<u64>()) {
            let _ = read_header(&mut &bytes[..]);
            let _ = read_record(&mut &bytes[..]);
            let _ = decode_index(&bytes, size);
            let _ = decode_trailer(&bytes);
        }

        /// A valid record with any byte changed is read back as something or refused, never a panic.
        #[test]
        fn damaged_records_are_refused_or_read(flip in 0usize..60, to in any::<u8>()) {
            let rec = Record { kind: Kind::Meta, offset: 4096, raw_len: 4096, flags: FLAG_COMPRESSED, id: [9; 32], payload: vec![5; 7] };
            let mut b = Vec::new();
            write_record(&mut b, &rec).unwrap();
            let i = flip % b.len();
            b[i] = to;
            let _ = read_record(&mut &b[..]);
        }
    }
}
