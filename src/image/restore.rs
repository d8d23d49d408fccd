//! `bmr image restore`: every chunk decoded and checked on both cores, written
//! in large writes inside the partition's bounds, the first chunk (where
//! filesystems keep their superblock or boot sector) last; then the
//! filesystem is grown to fill the partition.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use super::create::device_size;
use super::format::Entry;
use super::progress::Progress;
use super::read::Image;
use crate::report::size;
use crate::tool::run;

const BATCH: usize = 16;

/// A writer that cannot write past the end of its partition (STYLE.md habit 5).
pub struct Bounded {
    file: File,
    limit: u64,
}

impl Bounded {
    pub fn new(file: File, limit: u64) -> Bounded {
        Bounded { file, limit }
    }

    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        let end = offset.saturating_add(data.len() as u64);
        if end > self.limit {
            bail!(
                "refusing to write {}..{end}: past the end of the partition ({} bytes)",
                offset,
                self.limit
            );
        }
        self.file
            .write_all_at(data, offset)
            .with_context(|| format!("writing at {offset}"))
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
    Ok(Bounded::new(file, target))
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
    let mut entries: Vec<&Entry> = img.entries.iter().collect();
    entries.sort_by_key(|e| e.offset);
    // Boot sector / superblock last: until everything else is in, the target does not look like a filesystem.
    let first = entries
        .iter()
        .position(|e| e.offset == 0)
        .map(|i| entries.remove(i));
    let total: u64 = img.entries.iter().map(|e| u64::from(e.raw_len)).sum();
    let mut progress = Progress::new(&format!("restoring {}", dev.display()), total);
    let result = std::thread::scope(|scope| -> Result<()> {
        // The start is zeroed first, so an interrupted restore leaves no mountable filesystem.
        out.zero_start()?;
        // Decoding (both cores) overlaps writing (its own thread).
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(2 * BATCH);
        let writer = scope.spawn(|| -> Result<u64> {
            let mut written = 0;
            for (offset, data) in rx {
                out.write_at(&data, offset)?;
                written += data.len() as u64;
            }
            Ok(written)
        });
        let decoded = (|| -> Result<()> {
            for batch in entries.chunks(BATCH) {
                let chunks: Vec<Result<Vec<u8>>> = batch.par_iter().map(|e| img.chunk(e)).collect();
                for (e, data) in batch.iter().zip(chunks) {
                    if tx.send((e.offset, data?)).is_err() {
                        return Ok(()); // the writer failed; its error is reported below
                    }
                    progress.add(u64::from(e.raw_len));
                }
            }
            Ok(())
        })();
        drop(tx);
        let written = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer thread failed"))?;
        decoded?;
        written?;
        if let Some(e) = first {
            let data = img.chunk(e)?;
            out.file.sync_data()?;
            out.write_at(&data, 0)?;
            progress.add(u64::from(e.raw_len));
        }
        out.file.sync_all().context("flushing the restored volume")
    });
    finish(result.map(|()| total), &out, dev, vol, grow, &mut progress)
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
    for batch in entries.chunks(BATCH) {
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
