//! What this machine has now: disks, their partition tables and filesystems,
//! and the hardware profile. Read-only by construction: nothing here opens a
//! device for writing.

pub mod disks;
pub mod fs;
pub mod hardware;
pub mod mounts;
pub mod table;

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

pub use disks::DiskInfo;
pub use fs::FsInfo;
pub use table::{Table, TablePartition};

use crate::manifest::Hardware;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub disks: Vec<ProbedDisk>,
    pub hardware: Hardware,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbedDisk {
    #[serde(flatten)]
    pub info: DiskInfo,
    pub table: Table,
    pub partitions: Vec<ProbedPartition>,
    /// A filesystem on the whole disk, without a partition table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<FsInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbedPartition {
    #[serde(flatten)]
    pub entry: TablePartition,
    /// The kernel's device node, when it knows the partition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<FsInfo>,
}

/// Probes the given disks, or every disk when none is given.
pub fn probe(named: &[PathBuf]) -> Result<Report> {
    let infos = if named.is_empty() {
        disks::all()?
    } else {
        named
            .iter()
            .map(|p| disks::named(p))
            .collect::<Result<Vec<_>>>()?
    };
    let mounts = mounts::mounts().unwrap_or_default();
    let mut warnings = Vec::new();
    let disks = infos
        .into_iter()
        .map(|info| probe_disk(info, &mounts, &mut warnings))
        .collect();
    Ok(Report {
        disks,
        hardware: hardware::profile(Path::new("/sys"), Path::new("/proc")),
        warnings,
    })
}

fn probe_disk(info: DiskInfo, mounts: &[mounts::Mount], warnings: &mut Vec<String>) -> ProbedDisk {
    let dev = PathBuf::from(&info.device);
    let table = table::read(&dev, info.logical_sector_size);
    if let Some(e) = &table.error {
        warnings.push(format!("{}: {e}", info.device));
    }
    let partitions = table
        .partitions
        .iter()
        .map(|entry| {
            let device = disks::partition_node(&info.name, entry.number, entry.start_bytes);
            let filesystem = match (&device, entry.mbr_kind) {
                (_, Some(crate::manifest::MbrKind::Extended)) => None,
                (Some(node), _) => filesystem(node, mounts, warnings),
                (None, _) => {
                    warnings.push(format!(
                        "{} partition {}: the kernel has no device node for it, so its filesystem is unknown \
                         (run `partx -a {}` and probe again)",
                        info.device, entry.number, info.device
                    ));
                    None
                }
            };
            ProbedPartition { entry: entry.clone(), device, filesystem }
        })
        .collect();
    let whole = if table.kind == crate::manifest::TableType::None && table.error.is_none() {
        filesystem(&dev, mounts, warnings)
    } else {
        None
    };
    ProbedDisk {
        info,
        table,
        partitions,
        filesystem: whole,
    }
}

fn filesystem(node: &Path, mounts: &[mounts::Mount], warnings: &mut Vec<String>) -> Option<FsInfo> {
    match fs::identify(node) {
        Ok(Some(mut info)) => {
            let mounted = mounts::devnum(node)
                .ok()
                .and_then(|n| mounts::mountpoint_of(mounts, n));
            fs::measure(node, &mut info, mounted.map(|m| m.mountpoint.as_path()));
            if info.used_bytes.is_none() && info.filesystem != "swap" {
                warnings.push(format!(
                    "{}: used space of {} unknown (not mounted, counters not understood)",
                    node.display(),
                    info.filesystem
                ));
            }
            Some(info)
        }
        Ok(None) => None,
        Err(e) => {
            warnings.push(format!("{e:#}"));
            None
        }
    }
}
