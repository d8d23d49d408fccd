//! `bmr image restore --files`: onto a partition smaller than the saved
//! filesystem but big enough for its data. A new filesystem with the saved
//! UUID and label is made, and every file is copied with owners, modes,
//! times, xattrs/ACLs, hard links, symlinks, device nodes and holes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::create::device_size;
use super::mount;
use super::read::Image;
use crate::apply::mkfs::{self, NewFs};
use crate::manifest::Role;
use crate::report::size;
use crate::tool::run;

/// A mount of the new filesystem, undone when dropped, also on error paths.
struct Mount {
    dir: PathBuf,
}

impl Mount {
    /// Mounts the new filesystem read-write (ntfs-3g for NTFS).
    fn new(fs: &str, source: &Path, dir: &Path) -> Result<Mount> {
        fs::create_dir_all(dir)?;
        let mut cmd = if fs == "ntfs" {
            Command::new("ntfs-3g")
        } else {
            let mut c = Command::new("mount");
            c.args(["-t", fs]);
            c
        };
        run(cmd.arg(source).arg(dir)).with_context(|| {
            format!("mounting the new {fs} filesystem (does this kernel have a {fs} driver?)")
        })?;
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

pub fn restore_files(img: Image, dev: &Path) -> Result<u64> {
    super::restore::ensure_unused(dev)?;
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
    let work = tempfile::Builder::new()
        .prefix("bmr-files-")
        .tempdir()
        .context("creating a work directory")?;
    let sector = crate::probe::disks::named(dev)
        .map(|d| d.logical_sector_size)
        .unwrap_or(512);
    let (fs_name, uuid, label) = (vol.filesystem.clone(), vol.uuid.clone(), vol.label.clone());
    // The image is read in place through FUSE by the kernel's own driver: nothing is unpacked.
    let from = mount::mount(img, &work.path().join("from"))?;
    let new = NewFs {
        filesystem: &fs_name,
        uuid: &uuid,
        label: &label,
        role: Role::Data,
        size_bytes: target,
    };
    mkfs::run(&new, &dev.to_string_lossy(), sector, 0)
        .with_context(|| format!("making the new {fs_name} on {}", dev.display()))?;
    let to = Mount::new(&fs_name, dev, &work.path().join("to"))?;
    // lost+found comes with the new ext filesystem; the copy brings the saved one.
    run(Command::new("cp")
        .args(["-a", "--sparse=always", "--no-target-directory"])
        .arg(from.dir.join("."))
        .arg(&to.dir))
    .context("copying the files")?;
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
