//! The disks of this machine as restore targets: probed, with the ones that
//! must never be written marked protected and why. The planner takes these;
//! apply checks them again before writing.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::plan::{ExistingPartition, TargetDisk};
use crate::probe::{self, mounts};

/// The whole-disk name (`sda`) of the block device numbered `major:minor`.
pub fn disk_of_devnum(major: u32, minor: u32) -> Option<String> {
    let sys = fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    let disk = if sys.join("partition").exists() {
        sys.parent()?.to_path_buf()
    } else {
        sys
    };
    Some(disk.file_name()?.to_string_lossy().into_owned())
}

/// The disk holding `path`: the device itself, or the disk under the
/// filesystem that holds the file.
pub fn disk_holding(path: &Path) -> Option<String> {
    let meta = fs::metadata(path).ok()?;
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    disk_of_devnum(
        nix::sys::stat::major(dev) as u32,
        nix::sys::stat::minor(dev) as u32,
    )
}

/// Why each disk is busy: mounted filesystems, active swap, device-mapper or
/// md holders. Writing under any of them would corrupt a live system.
pub fn disks_in_use() -> HashMap<String, String> {
    let mut busy = HashMap::new();
    for m in mounts::mounts().unwrap_or_default() {
        if m.major == 0 {
            continue;
        }
        if let Some(d) = disk_of_devnum(m.major, m.minor) {
            busy.entry(d).or_insert_with(|| {
                format!("in use: {} mounted at {}", m.source, m.mountpoint.display())
            });
        }
    }
    for (major, minor) in mounts::active_swaps() {
        if let Some(d) = disk_of_devnum(major, minor) {
            busy.entry(d)
                .or_insert_with(|| "in use: active swap".to_string());
        }
    }
    if let Ok(entries) = fs::read_dir("/sys/class/block") {
        for e in entries.flatten() {
            let holders = e.path().join("holders");
            let held = fs::read_dir(&holders)
                .map(|mut h| h.next().is_some())
                .unwrap_or(false);
            if held {
                let name = e.file_name().to_string_lossy().into_owned();
                let disk = if e.path().join("partition").exists() {
                    fs::canonicalize(e.path()).ok().and_then(|p| {
                        p.parent()
                            .and_then(|d| d.file_name())
                            .map(|n| n.to_string_lossy().into_owned())
                    })
                } else {
                    Some(name.clone())
                };
                if let Some(d) = disk {
                    busy.entry(d).or_insert_with(|| {
                        format!("in use: {name} is held by device-mapper or md")
                    });
                }
            }
        }
    }
    busy
}

/// The disk holding the recovery medium, as apply's protected list wants it.
pub fn medium_protection(medium: &Path) -> Vec<(String, String)> {
    disk_holding(medium)
        .map(|d| (d, MEDIUM.to_string()))
        .into_iter()
        .collect()
}

pub const MEDIUM: &str = "holds the recovery medium";

/// Probes this machine's disks (all, or those named) with the medium's disk
/// protected, and plans the saved layout onto them: what `bmr plan`, the
/// rescue system's guided view and unattended recovery all start from.
/// Probe warnings go to `warn` before planning, so they are seen also
/// when the plan fails.
pub fn plan_here(
    m: &crate::manifest::Manifest,
    disks: &[PathBuf],
    medium: &Path,
    map: &[(String, String)],
    policy: crate::plan::Policy,
    warn: &mut dyn FnMut(&str),
) -> Result<(Vec<TargetDisk>, crate::plan::Plan)> {
    let (targets, warnings) = targets(disks, &[(medium.to_path_buf(), MEDIUM)])?;
    for w in &warnings {
        warn(w);
    }
    let plan = crate::plan::plan(m, &targets, map, policy)?;
    Ok((targets, plan))
}

/// A USB stick (or disk) carrying the rescue ISO written raw: the system
/// the operator booted from must survive a mistaken mapping.
fn rescue_stick(dev: &Path) -> Option<String> {
    let fs = crate::probe::fs::identify(dev).ok()??;
    (fs.filesystem == "iso9660" && fs.label == crate::rescue::iso::VOLID)
        .then(|| "holds the bmr rescue system (ISO written to it)".to_string())
}

/// Probes the target disks (all, or those named) and marks the protected ones.
/// `protect` pairs paths whose disks must not be written with the reason.
pub fn targets(
    named: &[PathBuf],
    protect: &[(PathBuf, &str)],
) -> Result<(Vec<TargetDisk>, Vec<String>)> {
    let report = probe::probe(named)?;
    let busy = disks_in_use();
    let guarded: Vec<(String, &str)> = protect
        .iter()
        .filter_map(|(p, why)| disk_holding(p).map(|d| (d, *why)))
        .collect();
    let disks = report
        .disks
        .iter()
        .map(|d| {
            let i = &d.info;
            let protected = guarded
                .iter()
                .find(|(name, _)| *name == i.name)
                .map(|(_, why)| (*why).to_string())
                .or_else(|| busy.get(&i.name).cloned())
                .or_else(|| rescue_stick(Path::new(&i.device)));
            TargetDisk {
                device: i.device.clone(),
                name: i.name.clone(),
                size_bytes: i.size_bytes,
                logical_sector_size: i.logical_sector_size,
                physical_sector_size: i.physical_sector_size,
                wwn: i.wwn.clone(),
                serial: i.serial.clone(),
                model: i.model.clone(),
                protected,
                existing: d
                    .partitions
                    .iter()
                    .filter_map(|p| {
                        let f = p.filesystem.as_ref()?;
                        Some(ExistingPartition {
                            number: p.entry.number,
                            start_bytes: p.entry.start_bytes,
                            size_bytes: p.entry.size_bytes,
                            filesystem: f.filesystem.clone(),
                            uuid: f.uuid.clone(),
                        })
                    })
                    .collect(),
            }
        })
        .collect();
    Ok((disks, report.warnings))
}
