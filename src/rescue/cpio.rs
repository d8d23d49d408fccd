//! The staging tree as the kernel unpacks it: a newc cpio archive,
//! zstd-compressed (Debian's kernel has CONFIG_RD_ZSTD). Entries are
//! sorted and dated 0, so the same inputs give the same bytes.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cpio::newc::Builder;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Character devices the kernel needs before devtmpfs is mounted: it opens
/// /dev/console for init's stdio.
const NODES: &[(&str, u32, u32, u32)] = &[("dev/console", 0o600, 5, 1), ("dev/null", 0o666, 1, 3)];

/// With `device`, directories of other filesystems are kept as empty
/// mount points: the running system's /proc, /sys and the target stay out.
fn walk(dir: &Path, rel: &Path, device: Option<u64>, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let r = rel.join(e.file_name());
        out.push(r.clone());
        if e.file_type()?.is_dir() {
            let other = device
                .is_some_and(|d| fs::symlink_metadata(e.path()).map_or(true, |m| m.dev() != d));
            if !other {
                walk(&e.path(), &r, device, out)?;
            }
        }
    }
    Ok(())
}

/// Writes `root` as a compressed newc archive to `dest`; returns the
/// uncompressed and compressed sizes.
pub fn write(root: &Path, dest: &Path, level: i32) -> Result<(u64, u64)> {
    let mut paths = Vec::new();
    walk(root, Path::new(""), None, &mut paths)?;
    write_paths(root, &paths, dest, level)
}

/// The running rescue system as an initramfs again, for phase two: the
/// files of the root filesystem only, none of what is mounted on it.
pub fn write_running(root: &Path, dest: &Path) -> Result<(u64, u64)> {
    let dev = fs::metadata(root)?.dev();
    let mut paths = Vec::new();
    walk(root, Path::new(""), Some(dev), &mut paths)?;
    write_paths(root, &paths, dest, 3)
}

fn write_paths(root: &Path, paths: &[PathBuf], dest: &Path, level: i32) -> Result<(u64, u64)> {
    let file = File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut z = zstd::Encoder::new(BufWriter::new(file), level)?;
    // Two cores on the build machine: compress on both.
    let _ = z.multithread(std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    let mut counted = Counter { inner: z, bytes: 0 };
    let mut ino = 1;
    let has_dev = paths.iter().any(|p| p == Path::new("dev"));
    if !has_dev {
        entry(&mut counted, "dev", S_IFDIR | 0o755, &mut ino, &[], (0, 0))?;
    }
    for &(name, mode, major, minor) in NODES {
        entry(
            &mut counted,
            name,
            S_IFCHR | mode,
            &mut ino,
            &[],
            (major, minor),
        )?;
    }
    for rel in paths {
        let full = root.join(rel);
        let meta = fs::symlink_metadata(&full)?;
        let name = rel.to_string_lossy();
        let perm = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&full)?;
            let t = target.to_string_lossy();
            entry(
                &mut counted,
                &name,
                S_IFLNK | 0o777,
                &mut ino,
                t.as_bytes(),
                (0, 0),
            )?;
        } else if meta.is_dir() {
            entry(&mut counted, &name, S_IFDIR | perm, &mut ino, &[], (0, 0))?;
        } else if meta.is_file() {
            let data = fs::read(&full)?;
            entry(&mut counted, &name, S_IFREG | perm, &mut ino, &data, (0, 0))?;
        }
    }
    let z = cpio::newc::trailer(counted)?;
    let raw = z.bytes;
    let mut inner = z.inner.finish()?;
    inner.flush()?;
    drop(inner);
    Ok((raw, fs::metadata(dest)?.len()))
}

fn entry<W: Write>(
    w: &mut W,
    name: &str,
    mode: u32,
    ino: &mut u32,
    data: &[u8],
    rdev: (u32, u32),
) -> Result<()> {
    *ino += 1;
    let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
    let mut wr = Builder::new(name)
        .ino(*ino)
        .mode(mode)
        .nlink(nlink)
        .rdev_major(rdev.0)
        .rdev_minor(rdev.1)
        .write(w, data.len() as u32);
    wr.write_all(data)?;
    wr.finish()?;
    Ok(())
}

struct Counter<W: Write> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Names, modes and link targets in an archive written by `write`.
#[cfg(test)]
pub fn list(archive: &Path) -> Result<Vec<(String, u32, String)>> {
    let mut r: Box<dyn io::Read> = Box::new(zstd::Decoder::new(File::open(archive)?)?);
    let mut out = Vec::new();
    loop {
        let mut rd = cpio::newc::Reader::new(r)?;
        if rd.entry().is_trailer() {
            break;
        }
        let name = rd.entry().name().to_string();
        let mode = rd.entry().mode();
        let mut data = Vec::new();
        io::Read::read_to_end(&mut rd, &mut data)?;
        let link = if mode & 0o170000 == S_IFLNK {
            String::from_utf8_lossy(&data).into_owned()
        } else {
            String::new()
        };
        out.push((name, mode, link));
        r = Box::new(rd.finish()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_console_node() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::write(root.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("usr/bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        let out = dir.path().join("initrd.img");
        let (raw, packed) = write(&root, &out, 3).unwrap();
        assert!(raw > 0 && packed > 0);
        let entries = list(&out).unwrap();
        let find = |n: &str| {
            entries
                .iter()
                .find(|e| e.0 == n)
                .unwrap_or_else(|| panic!("{n} in {entries:?}"))
        };
        assert_eq!(find("dev/console").1, S_IFCHR | 0o600);
        assert_eq!(find("usr/bin/tool").1, S_IFREG | 0o755);
        assert_eq!(find("bin").2, "usr/bin");
        // Parents come before what they hold.
        let pos = |n: &str| entries.iter().position(|e| e.0 == n).unwrap();
        assert!(pos("usr") < pos("usr/bin") && pos("usr/bin") < pos("usr/bin/tool"));
        // Same input, same bytes.
        let again = dir.path().join("again.img");
        write(&root, &again, 3).unwrap();
        assert_eq!(fs::read(&out).unwrap(), fs::read(&again).unwrap());
    }
}
