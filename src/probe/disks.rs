//! Disks as the kernel and udev see them: identity, size and sector sizes from
//! sysfs and the udev database, never by opening a device for writing.

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DiskInfo {
    /// /dev/sda
    pub device: String,
    /// sda
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub model: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub serial: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub wwn: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub by_path: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub by_id: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub transport: String,
    pub size_bytes: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub removable: bool,
    pub rotational: bool,
}

fn attr(dev: &udev::Device, name: &str) -> String {
    dev.attribute_value(name)
        .map(|v| v.to_string_lossy().trim().to_string())
        .unwrap_or_default()
}

fn prop(dev: &udev::Device, name: &str) -> String {
    dev.property_value(name)
        .map(|v| v.to_string_lossy().trim().to_string())
        .unwrap_or_default()
}

/// Kinds of block device that never hold a system to recover.
fn ignored(name: &str, dev: &udev::Device) -> Option<&'static str> {
    let prefixes = [
        ("ram", "RAM disk"),
        ("zram", "compressed RAM"),
        ("loop", "loop device"),
        ("sr", "optical drive"),
        ("fd", "floppy drive"),
    ];
    if let Some((_, why)) = prefixes.iter().find(|(p, _)| name.starts_with(p)) {
        return Some(why);
    }
    // SCSI type 5 is a CD/DVD drive whatever its name.
    if attr(dev, "device/type") == "5" || prop(dev, "ID_CDROM") == "1" {
        return Some("optical drive");
    }
    None
}

/// Every disk on the machine worth recovering onto or from; loop, RAM,
/// optical and empty devices are left out (list a loop device explicitly).
pub fn all() -> Result<Vec<DiskInfo>> {
    let mut en = udev::Enumerator::new().context("starting a udev enumeration")?;
    en.match_subsystem("block")?;
    en.match_property("DEVTYPE", "disk")?;
    let mut disks = Vec::new();
    for dev in en.scan_devices().context("scanning block devices")? {
        let name = dev.sysname().to_string_lossy().into_owned();
        if ignored(&name, &dev).is_some() {
            continue;
        }
        let info = describe(&dev)?;
        if info.size_bytes > 0 {
            disks.push(info);
        }
    }
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(disks)
}

/// One disk named by the user (`/dev/sdb`, a by-id link, or a loop device).
pub fn named(path: &Path) -> Result<DiskInfo> {
    let real = fs::canonicalize(path).with_context(|| {
        format!(
            "{}: no such device; `bmr probe` lists the disks",
            path.display()
        )
    })?;
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sys = PathBuf::from("/sys/class/block").join(&name);
    if !sys.exists() {
        bail!(
            "{} is not a block device; `bmr probe` lists the disks",
            path.display()
        );
    }
    let dev =
        udev::Device::from_syspath(&sys).with_context(|| format!("reading udev data of {name}"))?;
    if dev.devtype().is_some_and(|t| t == "partition") {
        bail!(
            "{} is a partition; name the whole disk it is on",
            path.display()
        );
    }
    let mut info = describe(&dev)?;
    if info.size_bytes == 0 {
        bail!("{} has no medium or size 0", path.display());
    }
    // Sizes as the opened device reports them, which is what a write would meet.
    if let Ok(f) = fs::File::open(&real) {
        if let (Ok(size), Ok(l), Ok(p)) = (
            crate::sys::block_size_bytes(f.as_fd()),
            crate::sys::logical_sector_size(f.as_fd()),
            crate::sys::physical_sector_size(f.as_fd()),
        ) {
            (
                info.size_bytes,
                info.logical_sector_size,
                info.physical_sector_size,
            ) = (size, l, p);
        }
    }
    Ok(info)
}

fn describe(dev: &udev::Device) -> Result<DiskInfo> {
    let name = dev.sysname().to_string_lossy().into_owned();
    let num = |a: &str| attr(dev, a).parse::<u64>().unwrap_or(0);
    let logical = num("queue/logical_block_size").max(512) as u32;
    let physical = (num("queue/physical_block_size") as u32).max(logical);
    let links = links_of(dev, &name);
    let mut wwn = prop(dev, "ID_WWN_WITH_EXTENSION");
    if wwn.is_empty() {
        wwn = prop(dev, "ID_WWN");
    }
    if wwn.is_empty() {
        wwn = first_nonempty(&[attr(dev, "wwid"), attr(dev, "device/wwid")]);
    }
    Ok(DiskInfo {
        device: format!("/dev/{name}"),
        model: first_nonempty(&[prop(dev, "ID_MODEL"), attr(dev, "device/model")]),
        serial: first_nonempty(&[
            prop(dev, "ID_SERIAL_SHORT"),
            attr(dev, "device/serial"),
            attr(dev, "serial"),
        ]),
        wwn,
        by_path: links
            .iter()
            .find(|l| l.starts_with("/dev/disk/by-path/"))
            .cloned()
            .unwrap_or_default(),
        by_id: links
            .iter()
            .filter(|l| l.starts_with("/dev/disk/by-id/"))
            .cloned()
            .collect(),
        transport: transport(dev),
        size_bytes: num("size") * 512,
        logical_sector_size: logical,
        physical_sector_size: physical,
        removable: attr(dev, "removable") == "1",
        rotational: attr(dev, "queue/rotational") == "1",
        name,
    })
}

fn first_nonempty(values: &[String]) -> String {
    values
        .iter()
        .find(|v| !v.is_empty())
        .cloned()
        .unwrap_or_default()
}

/// /dev/disk links from the udev database, or from /dev/disk itself when
/// udevd has not run (a bare initramfs, a container).
fn links_of(dev: &udev::Device, name: &str) -> Vec<String> {
    let from_db: Vec<String> = prop(dev, "DEVLINKS")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if !from_db.is_empty() {
        return from_db;
    }
    let mut links = Vec::new();
    for dir in ["/dev/disk/by-id", "/dev/disk/by-path"] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            if fs::canonicalize(e.path())
                .ok()
                .and_then(|p| p.file_name().map(|n| n == name))
                .unwrap_or(false)
            {
                links.push(e.path().display().to_string());
            }
        }
    }
    links.sort();
    links
}

fn transport(dev: &udev::Device) -> String {
    let bus = prop(dev, "ID_BUS");
    let path = dev.syspath().to_string_lossy().into_owned();
    let t = if path.contains("/usb") {
        "usb"
    } else if path.contains("/nvme") {
        "nvme"
    } else if path.contains("/virtio") {
        "virtio"
    } else if path.contains("/ata") || bus == "ata" {
        "sata"
    } else if path.contains("/mmc") {
        "mmc"
    } else if path.contains("/host") || bus == "scsi" {
        "scsi"
    } else if path.contains("/virtual/") {
        "virtual"
    } else {
        ""
    };
    t.to_string()
}

/// The kernel's name for partition `n` of a disk: sda1, nvme0n1p1, loop0p1.
pub fn partition_name(disk: &str, n: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{n}")
    } else {
        format!("{disk}{n}")
    }
}

/// The device node of a partition when the kernel knows it at that offset.
pub fn partition_node(disk: &str, n: u32, start_bytes: u64) -> Option<PathBuf> {
    let part = partition_name(disk, n);
    let start = fs::read_to_string(format!("/sys/class/block/{disk}/{part}/start")).ok()?;
    (start.trim().parse::<u64>().ok()? * 512 == start_bytes)
        .then(|| PathBuf::from(format!("/dev/{part}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names() {
        assert_eq!(partition_name("sda", 1), "sda1");
        assert_eq!(partition_name("nvme0n1", 2), "nvme0n1p2");
        assert_eq!(partition_name("loop7", 5), "loop7p5");
        assert_eq!(partition_name("vda", 12), "vda12");
    }
}
