//! `bmr image mount|ls|extract`: the image served as a read-only file through
//! FUSE, attached to a read-only loop device, and mounted with the kernel's
//! own filesystem driver (ntfs-3g for NTFS). Nothing is unpacked to disk.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use fuser::{
    FileAttr, FileType, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, Request,
};

use super::read::Image;
use crate::tool::run;

const TTL: Duration = Duration::from_secs(3600);
const ROOT: u64 = 1;
const VOLUME: u64 = 2;
/// Decoded chunks kept: 32 MiB of them, at least 4.
const CACHE_BYTES: usize = 32 << 20;

struct VolumeFs {
    img: Image,
    size: u64,
    chunk: u64,
    /// The last chunks read: the kernel reads a chunk in many small pieces.
    cache: Vec<(u64, Vec<u8>)>,
}

fn attr(ino: u64, size: u64, kind: FileType) -> FileAttr {
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm: if kind == FileType::Directory {
            0o555
        } else {
            0o444
        },
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl VolumeFs {
    fn chunk_at(&mut self, start: u64) -> Result<&[u8]> {
        if let Some(i) = self.cache.iter().position(|(s, _)| *s == start) {
            let hit = self.cache.remove(i);
            self.cache.push(hit);
        } else {
            let data = match self.img.entry_at(start) {
                Some(e) => self.img.chunk(e)?,
                None => vec![0u8; self.chunk.min(self.size - start) as usize],
            };
            if self.cache.len() >= (CACHE_BYTES / self.chunk.max(1) as usize).max(4) {
                self.cache.remove(0);
            }
            self.cache.push((start, data));
        }
        Ok(&self.cache[self.cache.len() - 1].1)
    }
}

impl fuser::Filesystem for VolumeFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == "volume" {
            reply.entry(&TTL, &attr(VOLUME, self.size, FileType::RegularFile), 0);
        } else {
            reply.error(libc_enoent());
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT => reply.attr(&TTL, &attr(ROOT, 0, FileType::Directory)),
            VOLUME => reply.attr(&TTL, &attr(VOLUME, self.size, FileType::RegularFile)),
            _ => reply.error(libc_enoent()),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        if ino != VOLUME || offset < 0 {
            return reply.error(libc_enoent());
        }
        let start = (offset as u64).min(self.size);
        let end = (start + u64::from(size)).min(self.size);
        let mut out = Vec::with_capacity((end - start) as usize);
        let mut pos = start;
        while pos < end {
            let c = pos / self.chunk * self.chunk;
            let chunk = self.chunk;
            match self.chunk_at(c) {
                Ok(data) => {
                    let from = (pos - c) as usize;
                    let to = ((end - c).min(chunk) as usize).min(data.len());
                    out.extend_from_slice(&data[from..to]);
                    pos = c + to as u64;
                }
                Err(e) => {
                    eprintln!("bmr: reading the image at {pos}: {e:#}");
                    return reply.error(5); // EIO
                }
            }
        }
        reply.data(&out);
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(libc_enoent());
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (VOLUME, FileType::RegularFile, "volume"),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

fn libc_enoent() -> i32 {
    2
}

/// A mounted image; everything is undone on drop, in reverse order.
pub struct MountedImage {
    pub dir: PathBuf,
    loopdev: String,
    _session: fuser::BackgroundSession,
    _fuse_dir: tempfile::TempDir,
}

impl Drop for MountedImage {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
    }
}

pub fn mount(img: Image, dir: &Path) -> Result<MountedImage> {
    let fs = img.header.volume.filesystem.clone();
    let size = img.header.volume.size_bytes;
    let chunk = u64::from(img.header.chunk_size);
    let fuse_dir = tempfile::Builder::new().prefix("bmr-image-").tempdir()?;
    let session = fuser::spawn_mount2(
        VolumeFs {
            img,
            size,
            chunk,
            cache: Vec::new(),
        },
        fuse_dir.path(),
        &[MountOption::RO, MountOption::FSName("bmr-image".into())],
    )
    .context("serving the image through FUSE (is /dev/fuse there?)")?;
    let loopdev = run(Command::new("losetup")
        .args(["-r", "-f", "--show"])
        .arg(fuse_dir.path().join("volume")))?;
    let mounted = MountedImage {
        dir: dir.to_path_buf(),
        loopdev: loopdev.clone(),
        _session: session,
        _fuse_dir: fuse_dir,
    };
    std::fs::create_dir_all(dir)?;
    let result = match fs.as_str() {
        "ntfs" => run(Command::new("ntfs-3g")
            .args(["-o", "ro", &loopdev])
            .arg(dir)),
        // noload: a read-only device cannot have its journal replayed.
        "ext3" | "ext4" => run(Command::new("mount")
            .args(["-t", &fs, "-o", "ro,noload", &loopdev])
            .arg(dir)),
        other => run(Command::new("mount")
            .args(["-t", other, "-o", "ro", &loopdev])
            .arg(dir)),
    };
    result.with_context(|| {
        format!("mounting the {fs} filesystem of the image (does this kernel have a {fs} driver?)")
    })?;
    Ok(mounted)
}

/// Copies `paths` (relative to the image's root) into `to`, in the order
/// their data lies in the volume, so a sequential medium is read once.
pub fn extract(root: &Path, paths: &[PathBuf], to: &Path) -> Result<usize> {
    let mut files = Vec::new();
    for p in paths {
        let rel = p.strip_prefix("/").unwrap_or(p);
        let full = root.join(rel);
        if !full.exists() && full.symlink_metadata().is_err() {
            bail!("{} is not in the image", p.display());
        }
        walk(root, &full, &mut files)?;
    }
    files.sort_by_key(|(pos, _)| *pos);
    std::fs::create_dir_all(to)?;
    let to = std::fs::canonicalize(to)?;
    for batch in files.chunks(512) {
        let mut cmd = Command::new("cp");
        cmd.args(["-a", "--parents", "--sparse=always"])
            .current_dir(root);
        cmd.args(batch.iter().map(|(_, p)| p));
        cmd.arg(&to);
        run(&mut cmd).context("copying files out of the image")?;
    }
    Ok(files.len())
}

fn walk(root: &Path, p: &Path, out: &mut Vec<(u64, PathBuf)>) -> Result<()> {
    let meta = p.symlink_metadata()?;
    if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(p)?.flatten().map(|e| e.path()).collect();
        entries.sort();
        if entries.is_empty() {
            out.push((0, p.strip_prefix(root).unwrap_or(p).to_path_buf()));
        }
        for e in entries {
            walk(root, &e, out)?;
        }
    } else {
        let pos = if meta.is_file() {
            File::open(p)
                .ok()
                .and_then(|f| crate::sys::first_physical(f.as_fd()).ok().flatten())
                .unwrap_or(0)
        } else {
            0
        };
        out.push((pos, p.strip_prefix(root).unwrap_or(p).to_path_buf()));
    }
    Ok(())
}
