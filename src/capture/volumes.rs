//! Probed disks -> the manifest's disks, partitions and volumes: which
//! volume is where, what it is for (role) and how small a restore may make it.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Result};
use uuid::{uuid, Uuid};

use super::system::{spec_matches, FstabEntry};
use crate::manifest::{Disk, MbrKind, Partition, Role, Volume};
use crate::probe::{FsInfo, ProbedDisk, ProbedPartition};

pub const ESP_GUID: Uuid = uuid!("C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
const MIB: u64 = 1 << 20;
/// Swap holds nothing to restore; it may shrink to this when space is short.
const SWAP_MIN: u64 = 512 * MIB;

type Built = (Vec<Disk>, Vec<Partition>, Vec<Volume>);

pub fn build(
    probed: &[ProbedDisk],
    root: &Path,
    fstab: &[FstabEntry],
    notes: &mut Vec<String>,
) -> Result<Built> {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let mut disks = Vec::new();
    let mut partitions = Vec::new();
    let mut volumes: Vec<Volume> = Vec::new();
    let mut ids = HashSet::new();
    for (n, d) in probed.iter().enumerate() {
        let disk_id = format!("disk{n}");
        disks.push(super::disk_entry(disk_id.clone(), d));
        if d.filesystem.is_some() {
            notes.push(format!(
                "{}: a filesystem on the whole disk (no partition table) is not recorded yet",
                d.info.device
            ));
        }
        for p in &d.partitions {
            let volume = p.filesystem.as_ref().map(|fs| {
                let mountpoint = mountpoint(fs, p, &root, fstab);
                let role = role(fs, p, &mountpoint);
                let id = unique_id(&mut ids, &base_id(role, &mountpoint, &fs.label));
                new_volume(id, fs, role, mountpoint, p.entry.size_bytes)
            });
            partitions.push(partition_entry(
                &disk_id,
                p,
                volume.as_ref().map(|v| v.id.clone()),
            ));
            volumes.extend(volume);
        }
    }
    if !volumes.iter().any(|v| v.role == Role::System) {
        bail!(
            "no recorded volume is mounted at {} (the system volume); the disks recorded were {}: \
             add --disk for the disk that holds it, or point --system-root at the mounted system",
            root.display(),
            probed
                .iter()
                .map(|d| d.info.device.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok((disks, partitions, volumes))
}

/// Where the saved system mounts this filesystem: from the live mount table
/// when it is mounted inside the system root, else from the system's fstab.
fn mountpoint(fs: &FsInfo, p: &ProbedPartition, root: &Path, fstab: &[FstabEntry]) -> String {
    if !fs.mountpoint.is_empty() {
        if let Ok(rel) = Path::new(&fs.mountpoint).strip_prefix(root) {
            return format!("/{}", rel.display());
        }
    }
    let dev = p.device.clone().unwrap_or_default();
    let partuuid = p.entry.guid.map(|g| g.to_string());
    fstab
        .iter()
        .find(|e| {
            spec_matches(
                &e.spec,
                &fs.uuid,
                &fs.label,
                partuuid.as_deref(),
                &p.entry.name,
                &dev,
            )
        })
        .map(|e| {
            if e.mountpoint == "none" || e.fstype == "swap" {
                String::new()
            } else {
                e.mountpoint.clone()
            }
        })
        .unwrap_or_default()
}

fn role(fs: &FsInfo, p: &ProbedPartition, mountpoint: &str) -> Role {
    let esp_type = p.entry.type_guid == Some(ESP_GUID) || p.entry.mbr_type == Some(0xEF);
    if fs.filesystem == "swap" {
        Role::Swap
    } else if mountpoint == "/" {
        Role::System
    } else if esp_type || (fs.filesystem == "vfat" && matches!(mountpoint, "/boot/efi" | "/efi")) {
        Role::Esp
    } else if mountpoint == "/boot" {
        Role::Boot
    } else {
        Role::Data
    }
}

fn base_id(role: Role, mountpoint: &str, label: &str) -> String {
    let slug = |s: &str| {
        let s: String = s
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        s.split('-')
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("-")
    };
    match role {
        Role::System => "root".into(),
        Role::Boot => "boot".into(),
        Role::Esp => "esp".into(),
        Role::Swap => "swap".into(),
        Role::Data => [slug(mountpoint), slug(label)]
            .into_iter()
            .find(|s| !s.is_empty())
            .unwrap_or_else(|| "data".into()),
    }
}

fn unique_id(taken: &mut HashSet<String>, base: &str) -> String {
    let id = (1..)
        .map(|n| {
            if n == 1 {
                base.to_string()
            } else {
                format!("{base}{n}")
            }
        })
        .find(|c| !taken.contains(c))
        .unwrap_or_default();
    taken.insert(id.clone());
    id
}

/// The smallest size a restore may give a volume: its data, the metadata a
/// new filesystem needs, and headroom to keep working (10%, at least 64 MiB).
pub fn min_size(role: Role, size: u64, used: Option<u64>, overhead: u64) -> u64 {
    match (role, used) {
        (Role::Esp, _) => size,
        (Role::Swap, _) => size.min(SWAP_MIN),
        (_, Some(used)) => (used + overhead + (used / 10).max(64 * MIB))
            .div_ceil(MIB)
            .saturating_mul(MIB)
            .min(size),
        (_, None) => size,
    }
}

fn new_volume(id: String, fs: &FsInfo, role: Role, mountpoint: String, size: u64) -> Volume {
    Volume {
        id,
        filesystem: fs.filesystem.clone(),
        uuid: fs.uuid.clone(),
        label: fs.label.clone(),
        mountpoint,
        role,
        size_bytes: size,
        used_bytes: fs.used_bytes,
        min_size_bytes: min_size(role, size, fs.used_bytes, fs.overhead_bytes),
        block_size: fs.block_size,
        image: None,
    }
}

fn partition_entry(disk: &str, p: &ProbedPartition, volume: Option<String>) -> Partition {
    let e = &p.entry;
    Partition {
        disk: disk.to_string(),
        number: e.number,
        start_bytes: e.start_bytes,
        size_bytes: e.size_bytes,
        type_guid: e.type_guid,
        guid: e.guid,
        name: e.name.clone(),
        attributes: e.attributes.map(|a| format!("0x{a:016x}")),
        mbr_type: e.mbr_type.map(|t| format!("0x{t:02x}")),
        mbr_kind: e.mbr_kind,
        bootable: e.bootable,
        volume: volume.filter(|_| e.mbr_kind != Some(MbrKind::Extended)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimum_sizes() {
        let g = 1 << 30;
        assert_eq!(min_size(Role::Esp, 512 * MIB, Some(MIB), 0), 512 * MIB);
        assert_eq!(min_size(Role::Swap, 4 * g, Some(0), 0), SWAP_MIN);
        assert_eq!(min_size(Role::Swap, 100 * MIB, Some(0), 0), 100 * MIB);
        assert_eq!(min_size(Role::System, 20 * g, None, 0), 20 * g);
        // 3 GiB used + 100 MiB metadata + 10% headroom.
        let m = min_size(Role::System, 20 * g, Some(3 * g), 100 * MIB);
        assert_eq!(m, 3 * g + 100 * MIB + (3 * g / 10).div_ceil(MIB) * MIB);
        // Small volumes get at least 64 MiB of headroom, never more than their size.
        assert_eq!(
            min_size(Role::Data, 1024 * MIB, Some(10 * MIB), 0),
            74 * MIB
        );
        assert_eq!(min_size(Role::Data, 50 * MIB, Some(10 * MIB), 0), 50 * MIB);
    }

    #[test]
    fn ids_are_readable_and_unique() {
        let mut taken = HashSet::new();
        assert_eq!(
            unique_id(&mut taken, &base_id(Role::Data, "/srv/My Data", "")),
            "srv-my-data"
        );
        assert_eq!(
            unique_id(&mut taken, &base_id(Role::Data, "", "ARCHIVE")),
            "archive"
        );
        assert_eq!(unique_id(&mut taken, &base_id(Role::Data, "", "")), "data");
        assert_eq!(unique_id(&mut taken, &base_id(Role::Data, "", "")), "data2");
        assert_eq!(
            unique_id(&mut taken, &base_id(Role::System, "/", "x")),
            "root"
        );
    }
}
