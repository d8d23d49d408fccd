//! `bmr image restore`: every chunk decoded and checked on both cores, written
//! in large writes inside the partition's bounds, the first chunk (where
//! filesystems keep their superblock or boot sector) last; then the
//! filesystem is grown to fill the partition.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use super::aligned::{direct_ok, AlignedBuf};
use super::chunker::recv_shared;
use super::create::device_size;
use super::format::{Entry, Kind};
use super::progress::Progress;
use super::read::Image;
use super::window::{Window, Windows};
use crate::report::size;
use crate::tool::run;

/// A writer that cannot write past the end of its partition (STYLE.md habit 5).
pub struct Bounded {
    file: File,
    /// The same target opened O_DIRECT, where it allows it: aligned chunks
    /// go to the disk without passing through (and filling) the page cache,
    /// so the writes run beside decoding instead of in one flush at the end.
    direct: Option<File>,
    limit: u64,
}

impl Bounded {
    pub fn new(file: File, limit: u64) -> Bounded {
        Bounded {
            file,
            direct: None,
            limit,
        }
    }

    /// The bounds guard every write and zeroing passes: `verb` names which.
    fn check(&self, verb: &str, len: u64, offset: u64) -> Result<()> {
        let end = offset.saturating_add(len);
        if end > self.limit {
            bail!(
                "refusing to {verb} {offset}..{end}: past the end of the partition ({} bytes)",
                self.limit
            );
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros, asking the device or
    /// filesystem to zero them itself (WRITE ZEROES, unwritten extents): a
    /// used but empty chunk, such as a new journal, then costs a request
    /// instead of its size in writes. Where neither can, zeros are written.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.check("zero", len, offset)?;
        let end = offset + len;
        let fd = self.file.as_fd();
        let asked = if self.file.metadata()?.file_type().is_block_device() {
            crate::sys::zero_out(fd, offset, len)
        } else {
            use nix::fcntl::{fallocate, FallocateFlags};
            fallocate(
                fd.as_raw_fd(),
                FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
            .map_err(std::io::Error::from)
        };
        match asked {
            Ok(()) => return Ok(()),
            // Not offered here (or not for this alignment): zeros are written.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(
                        nix::libc::EOPNOTSUPP
                            | nix::libc::EINVAL
                            | nix::libc::ENOTTY
                            | nix::libc::ENOSYS
                    )
                ) => {}
            Err(e) => return Err(e).with_context(|| format!("zeroing {offset}..{end}")),
        }
        let mut zeros = AlignedBuf::new(len.min(1 << 20) as usize);
        let mut at = offset;
        while at < end {
            let n = (end - at).min(zeros.capacity() as u64) as usize;
            self.write_chunk(zeros.take(n), at)?;
            at += n as u64;
        }
        Ok(())
    }

    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.check("write", data.len() as u64, offset)?;
        self.file
            .write_all_at(data, offset)
            .with_context(|| format!("writing at {offset}"))
    }

    /// Writes O_DIRECT when the target takes it and `data` is aligned, else
    /// through the page cache; the same bounds either way.
    pub fn write_chunk(&self, data: &[u8], offset: u64) -> Result<()> {
        match &self.direct {
            Some(d) if direct_ok(data, offset) => {
                self.check("write", data.len() as u64, offset)?;
                d.write_all_at(data, offset)
                    .with_context(|| format!("writing at {offset}"))
            }
            _ => self.write_at(data, offset),
        }
    }

    /// Zeroes the first MiB, where filesystems keep their superblock or
    /// boot sector: a half-restored volume must not look mountable.
    pub fn zero_start(&self) -> Result<()> {
        self.write_at(&vec![0u8; (1u64 << 20).min(self.limit) as usize], 0)
    }

    pub fn sync(&self) -> Result<()> {
        Ok(self.file.sync_all()?)
    }
}

/// The restore target, checked unused and big enough, opened for writing
/// within its own size.
pub fn open_target(dev: &Path, vol: &super::format::VolumeInfo) -> Result<Bounded> {
    ensure_unused(dev)?;
    let target = device_size(dev)?;
    if target < vol.size_bytes {
        bail!(
            "{} ({}) is smaller than the filesystem in the image ({}); restore file by file with --files onto a partition of at least the used size",
            dev.display(),
            size(target),
            size(vol.size_bytes)
        );
    }
    let file = OpenOptions::new()
        .write(true)
        .open(dev)
        .with_context(|| format!("opening {} for writing", dev.display()))?;
    let mut out = Bounded::new(file, target);
    // Not every target takes O_DIRECT (tmpfs does not); those are written
    // through the page cache.
    out.direct = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(dev)
        .ok();
    Ok(out)
}

#[derive(Debug)]
pub struct Restored {
    pub written: u64,
    pub seconds: f64,
    pub grown: Option<String>,
}

/// Restores `img` onto `dev`, which must be at least the volume's size.
/// Refuses a target that is mounted or swapped on: writing under a live
/// filesystem destroys it and what is on it.
pub fn ensure_unused(dev: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if !std::fs::metadata(dev).is_ok_and(|m| m.file_type().is_block_device()) {
        return Ok(());
    }
    let num = crate::probe::mounts::devnum(dev)?;
    if let Some(m) = crate::probe::mounts::mountpoint_of(&crate::probe::mounts::mounts()?, num) {
        bail!(
            "{} is mounted at {}; unmount it first, nothing was written",
            dev.display(),
            m.mountpoint.display()
        );
    }
    if crate::probe::mounts::active_swaps().contains(&num) {
        bail!(
            "{} is in use as swap; swapoff first, nothing was written",
            dev.display()
        );
    }
    Ok(())
}

pub fn restore(img: &Image, dev: &Path, grow: bool) -> Result<Restored> {
    let vol = &img.header.volume;
    let out = open_target(dev, vol)?;
    // Chunks stored in this file in file order (one pass over the image),
    // then the rest; the boot sector / superblock last: until everything
    // else is in, the target does not look like a filesystem.
    let mut entries: Vec<&Entry> = img.entries.iter().collect();
    entries.sort_by_key(|e| {
        (
            !e.kind.has_payload(),
            if e.kind.has_payload() {
                e.pos
            } else {
                e.offset
            },
        )
    });
    let first = entries
        .iter()
        .position(|e| e.offset == 0)
        .map(|i| entries.remove(i));
    // Chunks in use but all zeros are zeroed in place, runs at a time.
    let (zeros, entries): (Vec<&Entry>, Vec<&Entry>) =
        entries.into_iter().partition(|e| e.kind == Kind::Zero);
    let total: u64 = img.entries.iter().map(|e| u64::from(e.raw_len)).sum();
    let mut progress = Progress::new(&format!("restoring {}", dev.display()), total);
    let result = (|| -> Result<u64> {
        // The start is zeroed first, so an interrupted restore leaves no mountable filesystem.
        out.zero_start()?;
        for (offset, len) in runs(&zeros) {
            out.zero_range(offset, len)?;
            progress.add(len);
        }
        pipeline(img, &entries, &out, &mut progress)?;
        if let Some(e) = first {
            let data = img.chunk(e)?;
            out.file.sync_data()?;
            out.write_at(&data, 0)?;
            progress.add(u64::from(e.raw_len));
        }
        out.file
            .sync_all()
            .context("flushing the restored volume")?;
        Ok(total)
    })();
    finish(result, &out, dev, vol, grow, &mut progress)
}

/// Chunks decoded at once where a whole batch is held in memory (verify, a
/// restore from a stream): 32 MiB of them, at least one per core.
pub(super) fn batch_len(chunk_size: u32) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    ((32 << 20) / chunk_size.max(1) as usize).max(cores)
}

/// The most zeroed at once: a device that zeroes by writing takes a while
/// over a large run, and progress moves between runs.
const ZERO_RUN: u64 = 64 << 20;

/// Adjacent chunks merged into (offset, length) runs of at most
/// [`ZERO_RUN`] (or one chunk, if larger), in offset order.
fn runs(entries: &[&Entry]) -> Vec<(u64, u64)> {
    let mut sorted: Vec<(u64, u64)> = entries
        .iter()
        .map(|e| (e.offset, u64::from(e.raw_len)))
        .collect();
    sorted.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (offset, len) in sorted {
        match out.last_mut() {
            Some((o, l)) if *o + *l == offset && *l + len <= ZERO_RUN => *l += len,
            _ => out.push((offset, len)),
        }
    }
    out
}

/// Writes in flight at once: a virtual disk completes them unevenly, and
/// with two the decoders often sat waiting for a buffer to come back
/// (restores took 1.0-1.2 s instead of 0.8-0.9 here).
const WRITERS: usize = 4;

/// Reads, decodes and writes `entries` at once: one thread reads the
/// image file front to back in windows, one hands their chunks out with
/// buffers from a fixed pool (memory stays bounded, no chunk is allocated
/// anew), one decoder per core, and [`WRITERS`] writers. `entries` holds
/// the chunks stored in the image first, in file order.
fn pipeline(img: &Image, entries: &[&Entry], out: &Bounded, progress: &mut Progress) -> Result<()> {
    use std::sync::mpsc::{channel, sync_channel, Receiver};
    use std::sync::{Arc, Mutex};

    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let Some(chunk) = entries.iter().map(|e| e.raw_len as usize).max() else {
        // A swap area's header, or a volume of one chunk: nothing but the
        // first chunk, which the caller writes.
        return Ok(());
    };
    // Enough for every decoder and writer to hold one and two more queued,
    // and at least 16 MiB: more only waits for the disk. Counted by the
    // chunk size the header says (4 KiB at least), not by a record's length.
    let per = (img.header.chunk_size as usize).max(chunk).max(4096);
    let buffers = (cores + WRITERS + 2).max((16 << 20) / per);
    let (pool_tx, pool_rx) = sync_channel::<AlignedBuf>(buffers);
    for _ in 0..buffers {
        let _ = pool_tx.send(AlignedBuf::new(chunk));
    }
    let stored = entries.partition_point(|e| e.kind.has_payload());
    type Job<'e> = (&'e Entry, Option<Arc<Window>>, AlignedBuf);
    let (win_tx, win_rx) = sync_channel::<(Arc<Window>, std::ops::Range<usize>)>(1);
    let (job_tx, job_rx) = sync_channel::<Job>(buffers);
    let (done_tx, done_rx) = sync_channel::<(u64, AlignedBuf)>(buffers);
    let (report_tx, report_rx) = channel::<Result<u64>>();
    let job_rx: Arc<Mutex<Receiver<Job>>> = Arc::new(Mutex::new(job_rx));
    let done_rx: Arc<Mutex<Receiver<(u64, AlignedBuf)>>> = Arc::new(Mutex::new(done_rx));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let stopped = || stop.load(std::sync::atomic::Ordering::Relaxed);

    std::thread::scope(|scope| -> Result<()> {
        let report = report_tx.clone();
        let stop = &stop;
        // Windows in use: one being read, one queued, one handed out and
        // one whose last chunks are still being decoded.
        scope.spawn(move || {
            let mut windows = Windows::new(img, &entries[..stored], 4);
            while let Some(w) = windows.next(&stopped) {
                match w {
                    Ok(w) => {
                        if win_tx.send(w).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        let _ = report.send(Err(err));
                        return;
                    }
                }
            }
        });
        scope.spawn(move || {
            let held = win_rx
                .iter()
                .flat_map(|(w, range)| entries[range].iter().map(move |&e| (e, Some(w.clone()))));
            for (e, w) in held.chain(entries[stored..].iter().map(|&e| (e, None))) {
                let Ok(buf) = pool_rx.recv() else { return };
                if stopped() || job_tx.send((e, w, buf)).is_err() {
                    return;
                }
            }
        });
        for _ in 0..cores {
            let (job_rx, done_tx, report) = (job_rx.clone(), done_tx.clone(), report_tx.clone());
            scope.spawn(move || loop {
                let Some((e, payload, mut buf)) = recv_shared(&job_rx) else {
                    return;
                };
                if stopped() {
                    return;
                }
                let into = buf.take(e.raw_len as usize);
                let decoded = match payload {
                    Some(w) => img.decode_payload(e, w.payload(e), into),
                    None => img.chunk_into(e, into),
                };
                if let Err(err) = decoded {
                    let _ = report.send(Err(err));
                    return;
                }
                if done_tx.send((e.offset, buf)).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        for _ in 0..WRITERS {
            let (done_rx, pool_tx, report) = (done_rx.clone(), pool_tx.clone(), report_tx.clone());
            scope.spawn(move || loop {
                let Some((offset, buf)) = recv_shared(&done_rx) else {
                    return;
                };
                if stopped() {
                    return;
                }
                let n = buf.bytes().len() as u64;
                let r = out.write_chunk(buf.bytes(), offset).map(|()| n);
                let failed = r.is_err();
                let _ = report.send(r);
                if failed {
                    return;
                }
                // Once the reader is done the pool is closed; later buffers just go.
                let _ = pool_tx.send(buf);
            });
        }
        drop(report_tx);
        drop(pool_tx);
        let mut written = 0usize;
        let mut failure = None;
        for r in report_rx {
            match r {
                Ok(n) => {
                    written += 1;
                    progress.add(n);
                    if written == entries.len() {
                        break;
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        // Wind every stage down: the reader sees the flag, the channels close.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match failure {
            Some(e) => Err(e),
            None if written == entries.len() => Ok(()),
            None => bail!(
                "the restore stopped after {written} of {} chunks",
                entries.len()
            ),
        }
    })
}

/// The end of every restore: on failure the start is zeroed (unmountable
/// rather than silently wrong); on success the filesystem is grown to the
/// partition, and a failed grow is reported, not fatal (the filesystem is
/// good at its saved size).
pub fn finish(
    result: Result<u64>,
    out: &Bounded,
    dev: &Path,
    vol: &super::format::VolumeInfo,
    grow: bool,
    progress: &mut Progress,
) -> Result<Restored> {
    let written = match result {
        Ok(w) => w,
        Err(e) => {
            let _ = out.zero_start();
            let _ = out.file.sync_all();
            return Err(e.context(format!(
                "the restore of {} stopped; its start was zeroed so it cannot be mounted half-restored",
                dev.display()
            )));
        }
    };
    let seconds = progress.finish();
    let grown = (grow && out.limit > vol.size_bytes).then(|| {
        grow_fs(&vol.filesystem, dev)
            .unwrap_or_else(|e| format!("not grown ({e:#}); the filesystem keeps its saved size"))
    });
    Ok(Restored {
        written,
        seconds,
        grown,
    })
}

/// Grows the restored filesystem to the partition with the filesystem's own tool.
pub fn grow_fs(fs: &str, dev: &Path) -> Result<String> {
    match fs {
        "ext2" | "ext3" | "ext4" => {
            // resize2fs insists on a freshly checked filesystem.
            let status = Command::new("e2fsck")
                .args(["-f", "-p"])
                .arg(dev)
                .stdin(Stdio::null())
                .status()
                .context("running e2fsck")?;
            if status.code().unwrap_or(8) >= 4 {
                bail!(
                    "e2fsck found errors it could not fix on {}; not growing it",
                    dev.display()
                );
            }
            run(Command::new("resize2fs").arg(dev))?;
            Ok("grown with resize2fs".into())
        }
        "ntfs" => {
            run(Command::new("ntfsresize")
                .args(["--force", "--no-action"])
                .arg(dev))
            .context("checking the NTFS before growing")?;
            run(Command::new("ntfsresize").args(["--force"]).arg(dev))?;
            Ok("grown with ntfsresize".into())
        }
        "vfat" => {
            if crate::tool::exists("fatresize") {
                run(Command::new("fatresize").args(["--size", "max"]).arg(dev))?;
                Ok("grown with fatresize".into())
            } else {
                Ok("not grown: fatresize is not installed, the FAT keeps its size".into())
            }
        }
        "swap" => Ok("swap keeps its size".into()),
        other => Ok(format!("not grown: bmr does not know how to grow {other}")),
    }
}

/// Checks every chunk of the image (and its parents) against its hash.
pub fn verify(img: &Image) -> Result<u64> {
    img.sequential_check()?;
    let mut entries: Vec<&Entry> = img.entries.iter().collect();
    entries.sort_by_key(|e| e.offset);
    let mut progress = Progress::new(
        &format!("verifying {}", img.path.display()),
        img.entries.iter().map(|e| u64::from(e.raw_len)).sum(),
    );
    let mut n = 0;
    for batch in entries.chunks(batch_len(img.header.chunk_size)) {
        let results: Vec<Result<Vec<u8>>> = batch.par_iter().map(|e| img.chunk(e)).collect();
        for (e, r) in batch.iter().zip(results) {
            r.with_context(|| {
                format!("first bad chunk: volume offset {} ({:?})", e.offset, e.kind)
            })?;
            n += 1;
            progress.add(u64::from(e.raw_len));
        }
    }
    progress.finish();
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64, raw_len: u32) -> Entry {
        Entry {
            kind: Kind::Zero,
            offset,
            raw_len,
            flags: 0,
            id: [0; 32],
            pos: 0,
            stored_len: 0,
        }
    }

    #[test]
    fn zero_chunks_merge_into_runs() {
        let e = [
            entry(8 << 20, 1 << 20),
            entry(0, 4096),
            entry(9 << 20, 1 << 20),
            entry(4096, 4096),
            entry(20 << 20, 100),
        ];
        let refs: Vec<&Entry> = e.iter().collect();
        assert_eq!(
            runs(&refs),
            vec![(0, 8192), (8 << 20, 2 << 20), (20 << 20, 100)]
        );
        assert!(runs(&[]).is_empty());
        let many: Vec<Entry> = (0..100).map(|i| entry(i << 20, 1 << 20)).collect();
        let refs: Vec<&Entry> = many.iter().collect();
        assert_eq!(
            runs(&refs),
            vec![(0, ZERO_RUN), (ZERO_RUN, (100 << 20) - ZERO_RUN)]
        );
    }

    #[test]
    fn an_empty_pipeline_allocates_nothing_and_succeeds() {
        // An image whose only chunk is the first (a swap header): the
        // pipeline has nothing to do and must not size buffers from it.
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("swap.img");
        std::fs::File::create(&vol)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        assert!(std::process::Command::new("mkswap")
            .arg(&vol)
            .output()
            .unwrap()
            .status
            .success());
        let img = dir.path().join("swap.bmri");
        crate::image::create::create(&crate::image::create::CreateOptions {
            device: vol.clone(),
            to: img.clone(),
            parent: None,
            secret: None,
            level: 3,
            chunk_size: None,
            name: None,
            watch: None,
        })
        .unwrap();
        let image = Image::open(&img, None).unwrap();
        assert_eq!(image.entries.len(), 1, "one chunk: {:?}", image.entries);
        let target = dir.path().join("t.img");
        std::fs::write(&target, vec![0x55u8; 8 << 20]).unwrap();
        restore(&image, &target, false).unwrap();
        let got = std::fs::read(&target).unwrap();
        let want = std::fs::read(&vol).unwrap();
        assert!(got[..4096] == want[..4096], "the swap header is back");
    }

    #[test]
    fn a_zeroed_range_reads_as_zeros_and_stays_in_bounds() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), vec![0xAAu8; 4 << 20]).unwrap();
        let file = OpenOptions::new().write(true).open(f.path()).unwrap();
        let out = Bounded::new(file, 4 << 20);
        out.zero_range(1 << 20, (2 << 20) + 4096).unwrap();
        let got = std::fs::read(f.path()).unwrap();
        assert_eq!(got.len(), 4 << 20, "the file keeps its size");
        assert!(got[..1 << 20].iter().all(|&b| b == 0xAA));
        assert!(got[1 << 20..(3 << 20) + 4096].iter().all(|&b| b == 0));
        assert!(got[(3 << 20) + 4096..].iter().all(|&b| b == 0xAA));
        let err = out.zero_range(3 << 20, 2 << 20).unwrap_err();
        assert!(
            err.to_string().contains("past the end of the partition"),
            "{err}"
        );
        assert!(std::fs::read(f.path()).unwrap()[(3 << 20) + 4096..]
            .iter()
            .all(|&b| b == 0xAA));
    }
}
