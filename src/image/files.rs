//! `bmr image restore --files`: onto a partition smaller than the saved
//! filesystem but big enough for its data. A new filesystem with the saved
//! UUID and label is made, and every file is copied with owners, modes,
//! times, xattrs/ACLs, hard links, symlinks, device nodes and holes.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use super::create::device_size;
use super::read::Image;
use super::restore;
use crate::apply::mkfs::{self, NewFs};
use crate::manifest::Role;
use crate::report::size;

/// A mount that is undone when dropped, also on error paths.
struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn new(fs: &str, source: &Path, dir: &Path, read_only: bool) -> Result<Mount> {
        fs::create_dir_all(dir)?;
        let mut cmd = if fs == "ntfs" {
            let mut c = Command::new("ntfs-3g");
            if read_only {
                c.args(["-o", "ro"]);
            }
            c
        } else {
            let mut c = Command::new("mount");
            c.args(["-t", fs, "-o", if read_only { "ro,loop" } else { "rw" }]);
            c
        };
        let out = cmd
            .arg(source)
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("mounting {}", source.display()))?;
        if !out.status.success() {
            bail!(
                "cannot mount the {fs} filesystem {}: {} (does this kernel have a {fs} driver?)",
                source.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Mount {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

pub fn restore_files(img: &Image, dev: &Path) -> Result<u64> {
    let vol = &img.header.volume;
    let target = device_size(dev)?;
    if target < img.header.used_bytes {
        bail!(
            "{} ({}) cannot hold the {} of data in the image",
            dev.display(),
            size(target),
            size(img.header.used_bytes)
        );
    }
    if !matches!(
        vol.filesystem.as_str(),
        "ext2" | "ext3" | "ext4" | "vfat" | "ntfs" | "xfs" | "btrfs"
    ) {
        bail!("a file-level restore of {} is not supported; restore the image onto a partition of at least {}", vol.filesystem, size(vol.size_bytes));
    }
    // The image, materialised sparsely, is the source the kernel's own driver reads.
    let work = tempfile::Builder::new()
        .prefix("bmr-files-")
        .tempdir()
        .context("creating a work directory (set TMPDIR to a roomy place)")?;
    let source = work.path().join("source.img");
    OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&source)?
        .set_len(vol.size_bytes)?;
    restore::restore(img, &source, false).context("unpacking the image for the file copy")?;

    let sector = crate::probe::disks::named(dev)
        .map(|d| d.logical_sector_size)
        .unwrap_or(512);
    let new = NewFs {
        filesystem: &vol.filesystem,
        uuid: &vol.uuid,
        label: &vol.label,
        role: Role::Data,
        size_bytes: target,
    };
    mkfs::run(&new, &dev.to_string_lossy(), sector, 0)
        .with_context(|| format!("making the new {} on {}", vol.filesystem, dev.display()))?;

    let from = Mount::new(&vol.filesystem, &source, &work.path().join("from"), true)?;
    let to = Mount::new(&vol.filesystem, dev, &work.path().join("to"), false)?;
    // lost+found comes with the new ext filesystem; the copy brings the saved one.
    let out = Command::new("cp")
        .args(["-a", "--sparse=always", "--no-target-directory"])
        .arg(from.dir.join("."))
        .arg(&to.dir)
        .stdin(Stdio::null())
        .output()
        .context("running cp")?;
    if !out.status.success() {
        bail!(
            "copying the files failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let copied = walk_size(&to.dir);
    drop(to);
    drop(from);
    Ok(copied)
}

fn walk_size(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk_size(&e.path()),
                    Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
