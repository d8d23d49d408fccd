//! `bmr image create`: read a volume's used chunks (metadata first), hash,
//! compress and seal them on both cores while the next batch is read, and
//! write the image with its index and trailer.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use uuid::Uuid;

use super::chunker::{self, Job, Source};
use super::codec;
use super::crypto::{self, Key};
use super::format::{self, Entry, Header, Kind, ParentRef, Record, Trailer, VolumeInfo};
use super::http::{self, HttpStore};
use super::progress::Progress;
use super::read::Image;
use super::store::{ChunkStore, DirStore, Store};
use super::used::{self, UsedMap};

/// Chunks of an image file or a tape. Each chunk is compressed on its own
/// (so that it can be read, restored and verified alone), and zstd starts
/// each one cold: measured against `zstd -3 -T0` over the same bytes (what
/// `partclone | zstd` stores), 1 MiB chunks cost 0.5% on the bench volume,
/// 1.6% on system binaries, 3.4% on Python's library and 14% on a tree of
/// Rust sources; 4 MiB chunks cost 0.1%, nothing, 0.1% and 2%.
pub const FILE_CHUNK: u32 = 4 << 20;
/// Chunks in a repository, which stores identical chunks of many images
/// once: smaller ones are found identical more often.
pub const REPOSITORY_CHUNK: u32 = 1 << 20;

#[derive(Clone)]
pub struct CreateOptions {
    pub device: PathBuf,
    pub to: PathBuf,
    pub parent: Option<PathBuf>,
    pub secret: Option<Vec<u8>>,
    pub level: i32,
    /// None: the parent's for an incremental image, else [`FILE_CHUNK`] or,
    /// in a repository, [`REPOSITORY_CHUNK`].
    pub chunk_size: Option<u32>,
    /// Image name inside a repository (default: from the volume).
    pub name: Option<String>,
    /// Where the volume is mounted read-write while it is read: files changed
    /// meanwhile are logged in the image (seed 004's exception log).
    pub watch: Option<PathBuf>,
}

#[derive(Debug, Default)]
pub struct Created {
    pub path: PathBuf,
    /// Whether `path` is an image file this run wrote and moved into place
    /// (not a tape spec or a URL): the one thing a refused image may delete.
    pub is_file: bool,
    pub chunks: u64,
    pub stored_chunks: u64,
    pub parent_chunks: u64,
    pub zero_chunks: u64,
    pub deduplicated: u64,
    pub used_bytes: u64,
    pub stored_bytes: u64,
    pub seconds: f64,
    /// Chunks sent to an HTTP repository.
    pub uploaded: Option<u64>,
    /// Files changed while the volume was read.
    pub exceptions: Vec<String>,
}

/// Size of a block device or a regular file holding a volume.
pub fn device_size(dev: &Path) -> Result<u64> {
    let f = File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    let meta = f.metadata()?;
    if meta.file_type().is_block_device() {
        Ok(crate::sys::block_size_bytes(f.as_fd())?)
    } else if meta.is_file() {
        Ok(meta.len())
    } else {
        bail!(
            "{} is neither a block device nor a disk-image file",
            dev.display()
        )
    }
}

fn intersects(ranges: &[Range<u64>], r: &Range<u64>) -> bool {
    let i = ranges.partition_point(|x| x.end <= r.start);
    ranges.get(i).is_some_and(|x| x.start < r.end)
}

fn seal_chunk(
    job: &Job,
    key: Option<&Key>,
    parent: Option<&Image>,
    store: Option<&dyn ChunkStore>,
    level: i32,
) -> Result<(Record, bool)> {
    let data = job.buf.bytes();
    let raw_len = data.len() as u32;
    if data.iter().all(|&b| b == 0) {
        return Ok((
            Record {
                kind: Kind::Zero,
                offset: job.offset,
                raw_len,
                flags: 0,
                id: [0; 32],
                payload: Vec::new(),
            },
            false,
        ));
    }
    let id = codec::chunk_id(key, data);
    if let Some(pe) = parent.and_then(|p| p.entry_at(job.offset)) {
        if pe.id == id && pe.raw_len == raw_len && pe.kind != Kind::Zero {
            return Ok((
                Record {
                    kind: Kind::Parent,
                    offset: job.offset,
                    raw_len,
                    flags: 0,
                    id,
                    payload: Vec::new(),
                },
                false,
            ));
        }
    }
    if let Some(s) = store {
        if s.has(&id) {
            return Ok((
                Record {
                    kind: Kind::External,
                    offset: job.offset,
                    raw_len,
                    flags: 0,
                    id,
                    payload: Vec::new(),
                },
                true,
            ));
        }
    }
    // A chunk that changed since the parent is stored as a delta of the
    // parent's chunk there: a few changed blocks cost those blocks, not the
    // whole chunk. In a repository only against a chunk the repository
    // holds, so any image that shares this chunk finds its base.
    let base = match parent.and_then(|p| p.entry_at(job.offset).map(|pe| (p, pe))) {
        Some((p, pe)) if pe.kind != Kind::Zero && store.is_none_or(|s| s.has(&pe.id)) => Some((
            pe.id,
            p.chunk(pe)
                .context("reading the parent's chunk to store a delta")?,
        )),
        _ => None,
    };
    let (flags, payload) = codec::encode(
        data,
        &id,
        level,
        base.as_ref().map(|(bid, b)| (bid, &b[..])),
        key,
    )?;
    if let Some(s) = store {
        s.put(&id, flags, &payload)?;
        return Ok((
            Record {
                kind: Kind::External,
                offset: job.offset,
                raw_len,
                flags,
                id,
                payload: Vec::new(),
            },
            false,
        ));
    }
    let kind = if job.meta { Kind::Meta } else { Kind::Data };
    Ok((
        Record {
            kind,
            offset: job.offset,
            raw_len,
            flags,
            id,
            payload,
        },
        false,
    ))
}

/// Chunk offsets in writing order: those holding metadata first, then the
/// rest of the used ones, each group ascending.
fn order(map: &UsedMap, chunk: u64) -> Vec<(u64, bool)> {
    let n = map.size.div_ceil(chunk);
    let mut meta = Vec::new();
    let mut data = Vec::new();
    for c in 0..n {
        let r = c * chunk..((c + 1) * chunk).min(map.size);
        if intersects(&map.metadata, &r) {
            meta.push((r.start, true));
        } else if intersects(&map.used, &r) {
            data.push((r.start, false));
        }
    }
    meta.extend(data);
    meta
}

fn image_name(o: &CreateOptions, volume: &VolumeInfo, dev: &Path) -> String {
    o.name.clone().unwrap_or_else(|| {
        let who = [volume.label.as_str(), volume.uuid.as_str()]
            .into_iter()
            .find(|s| !s.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| {
                dev.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "volume".into())
            });
        let stamp = time::OffsetDateTime::now_utc()
            .format(&time::macros::format_description!(
                "[year][month][day]-[hour][minute][second]"
            ))
            .unwrap_or_default();
        format!("{who}-{stamp}")
    })
}

/// Whether `o.to` names a repository (a directory or an HTTP one) rather
/// than an image file.
fn to_repository(o: &CreateOptions) -> bool {
    let to = o.to.to_string_lossy();
    http::is_url(&to) || o.to.is_dir() || to.ends_with('/')
}

/// The chunk size asked for, or the one that suits where the image goes.
/// An incremental image is cut like its parent: chunks are compared with the
/// parent's offset by offset.
fn chunk_size(o: &CreateOptions, parent: Option<&Image>, repository: bool) -> Result<u32> {
    match (o.chunk_size, parent) {
        (Some(asked), Some(p)) if asked != p.header.chunk_size => bail!(
            "the parent image is cut into {} KiB chunks, and an incremental image into the same: leave out --chunk-kib (asked for {} KiB)",
            p.header.chunk_size / 1024,
            asked / 1024
        ),
        (_, Some(p)) => Ok(p.header.chunk_size),
        (Some(asked), None) => Ok(asked),
        (None, None) if repository => Ok(REPOSITORY_CHUNK),
        (None, None) => Ok(FILE_CHUNK),
    }
}

/// Where the image goes: a file, a directory repository, or an HTTP one (the
/// image is then written locally and uploaded when complete).
struct Destination {
    path: PathBuf,
    store: Option<Store>,
    upload: Option<(String, tempfile::TempDir)>,
}

fn destination(o: &CreateOptions, volume: &VolumeInfo, dev: &Path) -> Result<Destination> {
    let to = o.to.to_string_lossy().into_owned();
    if http::is_url(&to) {
        let name = format!("{}.bmri", image_name(o, volume, dev));
        let store = HttpStore::open(&to, true)?;
        let tmp = tempfile::tempdir().context("creating a local directory for the upload")?;
        return Ok(Destination {
            path: tmp.path().join(&name),
            store: Some(Store::Http(store)),
            upload: Some((name, tmp)),
        });
    }
    if o.to.is_dir() || to.ends_with('/') {
        let store = DirStore::open(&o.to, true)?;
        let path = store
            .images_dir()
            .join(format!("{}.bmri", image_name(o, volume, dev)));
        if path.exists() {
            bail!(
                "{} already exists in the repository; choose another --name",
                path.display()
            );
        }
        return Ok(Destination {
            path,
            store: Some(Store::Dir(store)),
            upload: None,
        });
    }
    if o.to.exists() {
        bail!(
            "{} already exists; remove it or choose another name (bmr does not overwrite images)",
            o.to.display()
        );
    }
    Ok(Destination {
        path: o.to.clone(),
        store: None,
        upload: None,
    })
}

pub fn create(o: &CreateOptions) -> Result<Created> {
    create_into(o, None)
}

/// Creates the image into `sink` (a tape file) instead of the destination
/// `o.to` names, when one is given.
pub fn create_into(o: &CreateOptions, sink: Option<&mut dyn Write>) -> Result<Created> {
    let size = device_size(&o.device)?;
    let fs = crate::probe::fs::identify(&o.device)?;
    let fstype = fs
        .as_ref()
        .map_or("unknown", |f| f.filesystem.as_str())
        .to_string();
    let map = used::used_map(&o.device, &fstype)
        .with_context(|| format!("reading what is in use on {}", o.device.display()))?;
    let parent = match &o.parent {
        Some(p) => Some(
            Image::open(p, o.secret.as_deref())
                .with_context(|| format!("opening the parent image {}", p.display()))?,
        ),
        None => None,
    };
    let (key, encryption) = match (
        &o.secret,
        parent.as_ref().and_then(|p| p.header.encryption.clone()),
    ) {
        // Same key parameters as the parent, so keyed chunk ids compare.
        (Some(s), Some(params)) => (Some(crypto::open(s, &params)?), Some(params)),
        (Some(s), None) => {
            if parent.is_some() {
                bail!("the parent image is not encrypted; an incremental image uses its parent's encryption");
            }
            let (k, p) = crypto::create(s)?;
            (Some(k), Some(p))
        }
        (None, Some(_)) => {
            bail!("the parent image is encrypted: give its --key-file or --passphrase-env")
        }
        (None, None) => (None, None),
    };
    let volume = VolumeInfo {
        filesystem: fstype.clone(),
        uuid: fs.as_ref().map(|f| f.uuid.clone()).unwrap_or_default(),
        label: fs.as_ref().map(|f| f.label.clone()).unwrap_or_default(),
        size_bytes: size,
        block_size: map.unit,
    };
    if let Some(p) = &parent {
        if p.header.volume.size_bytes != size {
            bail!(
                "the parent image is of a {} byte volume, {} has {} bytes: not the same volume",
                p.header.volume.size_bytes,
                o.device.display(),
                size
            );
        }
    }
    let used_bytes: u64 = map.used.iter().map(|r| r.end - r.start).sum();
    let chunk_size = chunk_size(o, parent.as_ref(), sink.is_none() && to_repository(o))?;
    let header = Header {
        format: if parent.is_some() {
            format::FORMAT
        } else {
            format::FORMAT_WITHOUT_DELTAS
        },
        image_id: Uuid::new_v4(),
        parent: parent.as_ref().map(|p| ParentRef {
            image_id: p.header.image_id,
            file: p
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            index_hash: format::hex(&p.index_hash),
        }),
        created: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        tool: format!("bmr {}", env!("CARGO_PKG_VERSION")),
        volume,
        chunk_size,
        compression: "zstd".into(),
        level: o.level,
        encryption,
        map_source: map.source.clone(),
        used_bytes,
        imaged_bytes: {
            let chunk = u64::from(chunk_size);
            order(&map, chunk)
                .iter()
                .map(|(off, _)| chunk.min(map.size - off))
                .sum()
        },
    };

    if let Some(w) = sink {
        let mut c = write_stream(o, &map, &header, w, key.as_ref(), parent.as_ref(), None)?;
        c.path = o.to.clone();
        c.used_bytes = used_bytes;
        return Ok(c);
    }
    let Destination {
        path,
        store,
        upload,
    } = destination(o, &header.volume, &o.device)?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let result = write_image(
        o,
        &map,
        &header,
        &tmp,
        key.as_ref(),
        parent.as_ref(),
        store.as_ref().map(|s| s as &dyn ChunkStore),
    );
    match result {
        Ok(mut created) => {
            fs::rename(&tmp, &path)
                .with_context(|| format!("moving the image into place at {}", path.display()))?;
            created.path = path;
            created.is_file = upload.is_none();
            created.used_bytes = used_bytes;
            if let (Some((name, _keep)), Some(Store::Http(h))) = (&upload, &store) {
                let url = h.put_image(name, &created.path)?;
                created.uploaded = Some(h.uploaded.load(std::sync::atomic::Ordering::Relaxed));
                created.path = PathBuf::from(http::redact(&url));
            }
            Ok(created)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_image(
    o: &CreateOptions,
    map: &UsedMap,
    header: &Header,
    tmp: &Path,
    key: Option<&Key>,
    parent: Option<&Image>,
    store: Option<&dyn ChunkStore>,
) -> Result<Created> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .with_context(|| format!("creating {} (is the destination writable?)", tmp.display()))?;
    let mut w = BufWriter::with_capacity(4 << 20, Writeback::new(file));
    let c = write_stream(o, map, header, &mut w, key, parent, store)?;
    let file = w.into_inner().map_err(|e| e.into_error())?.file;
    file.sync_all().context("flushing the image")?;
    Ok(c)
}

/// Starts the disk writing what was written every [`Writeback::STEP`]
/// bytes, so that dirty pages do not pile up in memory and the closing
/// sync_all waits for the last step only, not for the whole image.
struct Writeback {
    file: File,
    written: u64,
    started: u64,
}

impl Writeback {
    const STEP: u64 = 32 << 20;

    fn new(file: File) -> Self {
        Writeback {
            file,
            written: 0,
            started: 0,
        }
    }
}

impl Write for Writeback {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.started >= Self::STEP {
            // Only a hint: a filesystem that refuses it loses nothing.
            let _ = crate::sys::start_writeback(
                self.file.as_fd(),
                self.started,
                self.written - self.started,
            );
            self.started = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The image as one front-to-back stream (header, records, index, trailer):
/// what a file and a tape both receive; nothing is ever sought back to.
pub fn write_stream(
    o: &CreateOptions,
    map: &UsedMap,
    header: &Header,
    w: &mut dyn Write,
    key: Option<&Key>,
    parent: Option<&Image>,
    store: Option<&dyn ChunkStore>,
) -> Result<Created> {
    let mut pos = format::write_header(&mut &mut *w, header)?;
    let chunk = u64::from(header.chunk_size);
    let plan = order(map, chunk);
    let total: u64 = plan.iter().map(|(off, _)| chunk.min(map.size - off)).sum();
    let mut progress = Progress::new(&format!("imaging {}", o.device.display()), total);
    let started = std::time::SystemTime::now();

    let mut entries = Vec::new();
    let mut c = Created::default();
    let source = Source::open(&o.device)?;
    chunker::run(
        &source,
        &plan,
        chunk,
        map.size,
        &map.used,
        |job| seal_chunk(job, key, parent, store, o.level),
        |rec, dedup| {
            c.chunks += 1;
            match rec.kind {
                Kind::Zero => c.zero_chunks += 1,
                Kind::Parent => c.parent_chunks += 1,
                Kind::External if dedup => c.deduplicated += 1,
                _ => c.stored_chunks += 1,
            }
            c.stored_bytes += rec.payload.len() as u64;
            entries.push(Entry {
                kind: rec.kind,
                offset: rec.offset,
                raw_len: rec.raw_len,
                flags: rec.flags,
                id: rec.id,
                pos: pos + format::record_len(&rec) - rec.payload.len() as u64,
                stored_len: rec.payload.len() as u32,
            });
            format::write_record(&mut &mut *w, &rec)?;
            pos += format::record_len(&rec);
            progress.add(u64::from(rec.raw_len));
            Ok(())
        },
    )?;
    format::write_end(&mut &mut *w)?;
    pos += 1;
    entries.sort_by_key(|e| e.offset);
    let exceptions = match &o.watch {
        Some(dir) => changed_since(dir, started),
        None => Vec::new(),
    };
    c.exceptions = exceptions.clone();
    let index = format::encode_index(&entries, &exceptions);
    w.write_all(&index)?;
    let trailer = Trailer {
        index_pos: pos,
        index_len: index.len() as u64,
        index_hash: *blake3::hash(&index).as_bytes(),
        records: entries.len() as u64,
    };
    w.write_all(&format::encode_trailer(&trailer))?;
    w.flush()?;
    c.seconds = progress.finish();
    Ok(c)
}

/// Files under `dir` (on its filesystem only) modified or changed since
/// `since`: what may be inconsistent in an image read while mounted.
pub fn changed_since(dir: &Path, since: std::time::SystemTime) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(root_dev) = fs::metadata(dir).map(|m| m.dev()) else {
        return Vec::new();
    };
    let since = since
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    let nanos = |s: i64, ns: i64| i128::from(s) * 1_000_000_000 + i128::from(ns);
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.dev() != root_dev {
                continue;
            }
            if nanos(m.mtime(), m.mtime_nsec()).max(nanos(m.ctime(), m.ctime_nsec())) >= since {
                out.push(format!(
                    "/{}",
                    e.path().strip_prefix(dir).unwrap_or(&e.path()).display()
                ));
            }
            if m.is_dir() && out.len() < 100_000 {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_chunks_come_first() {
        let map = UsedMap {
            size: 10 << 20,
            unit: 4096,
            used: vec![0..4096, (3 << 20)..(5 << 20) + 1],
            metadata: std::iter::once((4 << 20)..(4 << 20) + 10).collect(),
            source: String::new(),
        };
        let o = order(&map, 1 << 20);
        assert_eq!(
            o,
            vec![
                (4 << 20, true),
                (0, false),
                (3 << 20, false),
                (5 << 20, false)
            ]
        );
    }
}
