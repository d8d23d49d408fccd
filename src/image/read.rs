//! Opening an image and everything it depends on (its parents, its
//! repository, its key), checked whole before a single byte is restored.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::codec;
use super::crypto::{self, Key};
use super::format::{self, Entry, Header, Kind};
use super::http::{self, HttpStore};
use super::store::{ChunkStore, DirStore, Store};

pub struct Image {
    pub path: PathBuf,
    pub header: Header,
    pub entries: Vec<Entry>,
    pub index_hash: [u8; 32],
    /// Files that changed while the volume was read.
    pub exceptions: Vec<String>,
    file: File,
    key: Option<Key>,
    store: Option<Store>,
    pub parent: Option<Box<Image>>,
    /// Where a remote image was downloaded to; removed with the Image.
    _download: Option<tempfile::TempDir>,
}

/// The key an image's header asks for: a wrong one is refused here, from
/// the header's key check, before anything is written.
pub fn key_for(header: &Header, secret: Option<&[u8]>, what: &str) -> Result<Option<Key>> {
    match (&header.encryption, secret) {
        (None, _) => Ok(None),
        (Some(p), Some(s)) => Ok(Some(crypto::open(s, p).with_context(|| what.to_string())?)),
        (Some(_), None) => bail!("{what} is encrypted: give --key-file or --passphrase-env"),
    }
}

/// A stored chunk's plain bytes: decrypted, decompressed and checked
/// against its id. `at` names the chunk in errors. For a medium read front
/// to back, which carries no parent to take a delta's base from.
pub fn decode(
    key: Option<&Key>,
    raw_len: u32,
    id: &[u8; 32],
    flags: u8,
    payload: Vec<u8>,
    at: &str,
) -> Result<Vec<u8>> {
    let mut out = vec![0u8; raw_len as usize];
    let no_base = |_: &codec::BaseRef| -> Result<Vec<u8>> {
        bail!("a delta of a parent's chunk, but this medium carries full images only")
    };
    codec::decode_into(key, id, flags, &payload, &mut out, &no_base, at)?;
    Ok(out)
}

/// Deltas of deltas are bounded by the chain; a repository that claims a
/// deeper one is damaged (or built to loop).
const MAX_DELTA_DEPTH: usize = 64;

impl Image {
    /// Opens `path` and its parent chain. A missing or wrong parent, a wrong
    /// key or a damaged index is an error here, before anything is written.
    pub fn open(path: &Path, secret: Option<&[u8]>) -> Result<Image> {
        let name = path.to_string_lossy().into_owned();
        if !http::is_url(&name) {
            return Image::open_at(path, secret, None);
        }
        let dir = tempfile::tempdir().context("creating a download directory")?;
        let local = dir.path().join("image.bmri");
        HttpStore::fetch(&name, &local)?;
        let mut img = Image::open_at(&local, secret, Some(&name))?;
        img.path = path.to_path_buf();
        img._download = Some(dir);
        Ok(img)
    }

    fn open_at(path: &Path, secret: Option<&[u8]>, url: Option<&str>) -> Result<Image> {
        let mut file =
            File::open(path).with_context(|| format!("opening image {}", path.display()))?;
        let (header, _) = format::read_header(&mut BufReader::new(&mut file))
            .with_context(|| format!("{}", path.display()))?;
        let len = file.metadata()?.len();
        ensure!(
            len >= format::TRAILER_LEN as u64,
            "{}: the image is truncated (no trailer)",
            path.display()
        );
        let mut tb = vec![0u8; format::TRAILER_LEN];
        file.read_exact_at(&mut tb, len - format::TRAILER_LEN as u64)?;
        let trailer = format::decode_trailer(&tb).with_context(|| format!("{}", path.display()))?;
        ensure!(
            trailer
                .index_pos
                .checked_add(trailer.index_len)
                .is_some_and(|e| e <= len - format::TRAILER_LEN as u64)
                && trailer.index_len < 1 << 32,
            "{}: the trailer points outside the image: damaged",
            path.display()
        );
        let mut index = vec![0u8; trailer.index_len as usize];
        file.read_exact_at(&mut index, trailer.index_pos)?;
        ensure!(
            blake3::hash(&index).as_bytes() == &trailer.index_hash,
            "{}: the image index is damaged (checksum mismatch)",
            path.display()
        );
        let (entries, exceptions) = format::decode_index(&index, header.volume.size_bytes)
            .with_context(|| format!("{}", path.display()))?;
        for e in &entries {
            ensure!(
                !e.kind.has_payload()
                    || e.pos
                        .checked_add(u64::from(e.stored_len))
                        .is_some_and(|end| end <= trailer.index_pos),
                "{}: index entry at volume offset {} points outside the records: damaged",
                path.display(),
                e.offset
            );
        }
        let key = key_for(&header, secret, &path.display().to_string())?;
        let store = match (entries.iter().any(|e| e.kind == Kind::External), url) {
            (false, _) => None,
            (true, Some(u)) => Some(Store::Http(HttpStore::of_image(u)?)),
            (true, None) => Some(Store::Dir(DirStore::of_image(path).ok_or_else(|| {
                anyhow!("{} refers to a repository's chunks but is not inside a repository's images/ directory", path.display())
            })?)),
        };
        let parent = match &header.parent {
            None => None,
            Some(p) => {
                let candidate = match url {
                    Some(u) => PathBuf::from(format!(
                        "{}/{}",
                        u.rsplit_once('/').map_or(u, |(d, _)| d),
                        p.file
                    )),
                    None => path.parent().unwrap_or(Path::new(".")).join(&p.file),
                };
                let parent = Image::open(&candidate, secret).with_context(|| {
                    format!(
                        "{} is incremental on image {} ({}), which cannot be opened",
                        path.display(),
                        p.image_id,
                        candidate.display()
                    )
                })?;
                ensure!(
                    parent.header.image_id == p.image_id
                        && format::hex(&parent.index_hash) == p.index_hash,
                    "{}: its parent {} is not the image it was made from (id or index differs)",
                    path.display(),
                    candidate.display()
                );
                Some(Box::new(parent))
            }
        };
        Ok(Image {
            path: path.to_path_buf(),
            header,
            entries,
            index_hash: trailer.index_hash,
            exceptions,
            file,
            key,
            store,
            parent,
            _download: None,
        })
    }

    pub fn chain_len(&self) -> usize {
        1 + self.parent.as_ref().map_or(0, |p| p.chain_len())
    }

    pub fn entry_at(&self, offset: u64) -> Option<&Entry> {
        self.entries
            .binary_search_by_key(&offset, |e| e.offset)
            .ok()
            .map(|i| &self.entries[i])
    }

    /// The chunk's plain bytes, checked against its id.
    pub fn chunk(&self, e: &Entry) -> Result<Vec<u8>> {
        let mut out = vec![0u8; e.raw_len as usize];
        self.chunk_into(e, &mut out)?;
        Ok(out)
    }

    /// The chunk's plain bytes into `out` (exactly its raw length), checked
    /// against its id: a restore decodes into buffers it reuses.
    pub fn chunk_into(&self, e: &Entry, out: &mut [u8]) -> Result<()> {
        self.chunk_at_depth(e, out, 0)
    }

    fn chunk_at_depth(&self, e: &Entry, out: &mut [u8], depth: usize) -> Result<()> {
        ensure!(
            out.len() == e.raw_len as usize,
            "chunk at volume offset {}: {} bytes asked for a {}-byte chunk",
            e.offset,
            out.len(),
            e.raw_len
        );
        match e.kind {
            Kind::Zero => {
                out.fill(0);
                Ok(())
            }
            Kind::Parent => {
                let parent = self.parent.as_ref().ok_or_else(|| {
                    anyhow!(
                        "chunk at {} refers to a parent this image does not have",
                        e.offset
                    )
                })?;
                let pe = parent.entry_at(e.offset).ok_or_else(|| {
                    anyhow!("the parent has no chunk at volume offset {}", e.offset)
                })?;
                ensure!(
                    pe.id == e.id || pe.kind == Kind::Zero,
                    "the parent's chunk at volume offset {} is not the one recorded",
                    e.offset
                );
                parent.chunk_at_depth(pe, out, depth)
            }
            Kind::External => {
                let store = self
                    .store
                    .as_ref()
                    .ok_or_else(|| anyhow!("no repository for chunk at {}", e.offset))?;
                let (flags, payload) = store.get(&e.id)?;
                self.decode_into(e, flags, &payload, out, depth)
            }
            Kind::Meta | Kind::Data => {
                let payload = self.payload(e)?;
                self.decode_into(e, e.flags, &payload, out, depth)
            }
        }
    }

    pub(super) fn file(&self) -> &File {
        &self.file
    }

    /// The stored bytes of a chunk held in this image file.
    pub fn payload(&self, e: &Entry) -> Result<Vec<u8>> {
        let mut payload = vec![0u8; e.stored_len as usize];
        self.file
            .read_exact_at(&mut payload, e.pos)
            .with_context(|| format!("reading the chunk at volume offset {}", e.offset))?;
        Ok(payload)
    }

    /// Decodes a chunk's stored bytes (read by the caller, e.g. ahead of
    /// time in file order) into `out`.
    pub fn decode_payload(&self, e: &Entry, payload: &[u8], out: &mut [u8]) -> Result<()> {
        self.decode_into(e, e.flags, payload, out, 0)
    }

    fn decode_into(
        &self,
        e: &Entry,
        flags: u8,
        payload: &[u8],
        out: &mut [u8],
        depth: usize,
    ) -> Result<()> {
        let at = format!(
            "chunk at volume offset {} ({})",
            e.offset,
            self.path.display()
        );
        let base = |r: &codec::BaseRef| self.base(e.offset, r, depth + 1);
        codec::decode_into(self.key.as_ref(), &e.id, flags, payload, out, &base, &at)
    }

    /// The base chunk a delta at `offset` was made against: the parent's
    /// chunk there, else (a chunk another image of the repository stored)
    /// the repository's chunk of that id.
    fn base(&self, offset: u64, r: &codec::BaseRef, depth: usize) -> Result<Vec<u8>> {
        ensure!(
            depth <= MAX_DELTA_DEPTH,
            "deltas nested deeper than {MAX_DELTA_DEPTH}: damaged"
        );
        // A damaged length must not become an allocation of gigabytes. (Not
        // this image's chunk size: older incrementals could be cut unlike
        // their parents.)
        ensure!(
            r.len <= format::MAX_CHUNK,
            "a delta of a {}-byte chunk: damaged",
            r.len
        );
        let mut out = vec![0u8; r.len as usize];
        if let Some((img, pe)) = self.parent.as_deref().and_then(|p| {
            p.entry_at(offset)
                .filter(|pe| pe.id == r.id && pe.raw_len == r.len && pe.kind != Kind::Zero)
                .map(|pe| (p, pe))
        }) {
            img.chunk_at_depth(pe, &mut out, depth)?;
            return Ok(out);
        }
        let store = self.store.as_ref().ok_or_else(|| {
            anyhow!(
                "a delta of chunk {}, which neither the parent nor a repository holds",
                format::hex(&r.id)
            )
        })?;
        let (flags, payload) = store.get(&r.id)?;
        let e = Entry {
            kind: Kind::External,
            offset,
            raw_len: r.len,
            flags,
            id: r.id,
            pos: 0,
            stored_len: 0,
        };
        self.decode_into(&e, flags, &payload, &mut out, depth)?;
        Ok(out)
    }

    /// Bytes stored in this image file for chunks (not counting parents or repository).
    pub fn stored_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kind.has_payload())
            .map(|e| u64::from(e.stored_len))
            .sum()
    }

    /// Reads the records front to back, as a tape would, checking that they
    /// match the index: a sequential reader needs nothing from the end.
    pub fn sequential_check(&self) -> Result<()> {
        let mut file = self.file.try_clone()?;
        file.seek(SeekFrom::Start(0))?;
        let mut f = BufReader::new(file);
        let (_, start) = format::read_header(&mut f)?;
        f.seek(SeekFrom::Start(start))?;
        let mut seen = Vec::new();
        while let Some(rec) = format::read_record(&mut f)? {
            seen.push((rec.offset, rec.kind, rec.id));
        }
        seen.sort_by_key(|s| s.0);
        ensure!(
            seen.len() == self.entries.len(),
            "{} records but {} index entries",
            seen.len(),
            self.entries.len()
        );
        for (s, e) in seen.iter().zip(&self.entries) {
            ensure!(
                *s == (e.offset, e.kind, e.id),
                "the record at volume offset {} does not match the index",
                s.0
            );
        }
        Ok(())
    }
}
