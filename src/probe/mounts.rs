//! What is mounted and what swaps, from /proc: which volumes are in use and
//! where, without touching any device.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub major: u32,
    pub minor: u32,
    /// Root of the mount inside its filesystem (`/` unless a bind mount).
    pub root: String,
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undoes the octal escapes the kernel uses in mountinfo (`\040` for a space).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            let (major, minor) = f.get(2)?.split_once(':')?;
            Some(Mount {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                root: unescape(f.get(3)?),
                mountpoint: PathBuf::from(unescape(f.get(4)?)),
                fstype: (*r.first()?).to_string(),
                source: unescape(r.get(1)?),
            })
        })
        .collect()
}

pub fn mounts() -> Result<Vec<Mount>> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text))
}

/// `(major, minor)` of a block device node.
pub fn devnum(dev: &Path) -> Result<(u32, u32)> {
    let meta = fs::metadata(dev).with_context(|| format!("{}: no such device", dev.display()))?;
    anyhow::ensure!(
        meta.file_type().is_block_device(),
        "{} is not a block device",
        dev.display()
    );
    let rdev = meta.rdev();
    Ok((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    ))
}

/// Where a block device is mounted (its first whole mount, `root == "/"`).
pub fn mountpoint_of(mounts: &[Mount], devnum: (u32, u32)) -> Option<&Mount> {
    let mut of_dev = mounts.iter().filter(|m| (m.major, m.minor) == devnum);
    let all: Vec<&Mount> = of_dev.by_ref().collect();
    all.iter().find(|m| m.root == "/").or(all.first()).copied()
}

pub fn is_mounted(dev: &Path) -> Result<bool> {
    let num = devnum(dev)?;
    Ok(mountpoint_of(&mounts()?, num).is_some())
}

/// Devices in /proc/swaps that are block devices, as `(major, minor)`.
pub fn active_swaps() -> Vec<(u32, u32)> {
    let Ok(text) = fs::read_to_string("/proc/swaps") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|dev| devnum(Path::new(&unescape(dev))).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
30 22 7:1 / /mnt/sys\\040root rw shared:9 - ext4 /dev/loop1p2 rw
31 22 7:1 /srv /srv/bind rw shared:9 - ext4 /dev/loop1p2 rw
40 22 0:5 / /dev rw - devtmpfs udev rw,size=10k
";

    #[test]
    fn parses_and_unescapes() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].mountpoint, PathBuf::from("/mnt/sys root"));
        assert_eq!(
            (m[1].major, m[1].minor, m[1].fstype.as_str()),
            (7, 1, "ext4")
        );
        assert_eq!(m[3].source, "udev");
    }

    #[test]
    fn prefers_the_whole_mount_over_a_bind_mount() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(
            mountpoint_of(&m, (7, 1)).unwrap().mountpoint,
            PathBuf::from("/mnt/sys root")
        );
        assert!(mountpoint_of(&m, (8, 0)).is_none());
    }
}
