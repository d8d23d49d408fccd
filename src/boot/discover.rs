//! Finding the recovery medium among the block devices: the one
//! `bmr.medium=` names (device, LABEL=, UUID=), else any FAT filesystem
//! labelled BMR-STATE (a floppy, a USB stick's partition, a disk image).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::medium::LABEL;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    pub device: PathBuf,
    pub filesystem: String,
    pub label: String,
    pub uuid: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Choice {
    Found(PathBuf),
    /// Several match: the first is used, the operator is told.
    Several(Vec<PathBuf>),
    NotFound,
}

pub fn choose(spec: Option<&str>, found: &[Candidate]) -> Choice {
    let matches: Vec<PathBuf> = found
        .iter()
        .filter(|c| match spec {
            Some(s) => {
                if let Some(l) = s.strip_prefix("LABEL=") {
                    c.label == l
                } else if let Some(u) = s.strip_prefix("UUID=") {
                    c.uuid.eq_ignore_ascii_case(u)
                } else {
                    c.device == Path::new(s)
                }
            }
            None => c.filesystem == "vfat" && c.label.trim() == LABEL,
        })
        .map(|c| c.device.clone())
        .collect();
    match matches.len() {
        0 => Choice::NotFound,
        1 => Choice::Found(matches[0].clone()),
        _ => Choice::Several(matches),
    }
}

/// Every block device with a size, partitions and floppies included.
pub fn block_devices(sys: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(sys.join("class/block"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            fs::read_to_string(e.path().join("size"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .is_some_and(|s| s > 0)
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect();
    out.sort();
    out
}

/// Looks at what every block device holds (blkid; reads only).
pub fn candidates(sys: &Path) -> Vec<Candidate> {
    block_devices(sys)
        .into_iter()
        .filter_map(|dev| {
            let info = crate::probe::fs::identify(&dev).ok()??;
            Some(Candidate {
                device: dev,
                filesystem: info.filesystem,
                label: info.label,
                uuid: info.uuid,
            })
        })
        .collect()
}

/// Polls until the medium shows up or `wait` passes: a USB stick can
/// appear after udev has settled.
pub fn find(spec: Option<&str>, wait: Duration) -> (Choice, Vec<Candidate>) {
    let start = Instant::now();
    loop {
        let found = candidates(Path::new("/sys"));
        let choice = choose(spec, &found);
        if choice != Choice::NotFound || start.elapsed() >= wait {
            return (choice, found);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(dev: &str, fs: &str, label: &str, uuid: &str) -> Candidate {
        Candidate {
            device: dev.into(),
            filesystem: fs.into(),
            label: label.into(),
            uuid: uuid.into(),
        }
    }

    #[test]
    fn by_label_uuid_device_or_the_default_label() {
        let found = [
            c("/dev/sr0", "iso9660", "BMR-RESCUE", ""),
            c("/dev/vda1", "vfat", "EFI", "AAAA-BBBB"),
            c("/dev/fd0", "vfat", "BMR-STATE", "1234-ABCD"),
        ];
        assert_eq!(choose(None, &found), Choice::Found("/dev/fd0".into()));
        assert_eq!(
            choose(Some("UUID=aaaa-bbbb"), &found),
            Choice::Found("/dev/vda1".into())
        );
        assert_eq!(
            choose(Some("LABEL=EFI"), &found),
            Choice::Found("/dev/vda1".into())
        );
        assert_eq!(
            choose(Some("/dev/vda1"), &found),
            Choice::Found("/dev/vda1".into())
        );
        assert_eq!(choose(Some("LABEL=NOPE"), &found), Choice::NotFound);
    }

    #[test]
    fn the_label_alone_is_not_enough_on_another_filesystem() {
        let found = [c("/dev/sdb1", "ext4", "BMR-STATE", "")];
        assert_eq!(choose(None, &found), Choice::NotFound);
    }

    #[test]
    fn two_media_are_reported() {
        let found = [
            c("/dev/fd0", "vfat", "BMR-STATE", "1"),
            c("/dev/sdb1", "vfat", "BMR-STATE", "2"),
        ];
        assert_eq!(
            choose(None, &found),
            Choice::Several(vec!["/dev/fd0".into(), "/dev/sdb1".into()])
        );
    }

    #[test]
    fn only_devices_with_a_size_are_looked_at() {
        let dir = tempfile::tempdir().unwrap();
        for (name, size) in [("fd0", "2880"), ("sr0", "0"), ("vda", "2048")] {
            let d = dir.path().join("class/block").join(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("size"), format!("{size}\n")).unwrap();
        }
        assert_eq!(
            block_devices(dir.path()),
            [PathBuf::from("/dev/fd0"), PathBuf::from("/dev/vda")]
        );
    }
}
