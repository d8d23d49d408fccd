//! Partition tables, read with the `gpt` and `mbrman` crates from a device
//! opened read-only. A missing or unreadable table is a finding, not an error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::Serialize;
use uuid::Uuid;

use crate::manifest::{MbrKind, TableType};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Table {
    pub kind: TableType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guid: Option<Uuid>,
    /// MBR disk signature as `0x` and 8 hex digits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    pub partitions: Vec<TablePartition>,
    /// Why the table could not be read, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TablePartition {
    pub number: u32,
    pub start_bytes: u64,
    pub size_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub type_guid: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guid: Option<Uuid>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mbr_type: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mbr_kind: Option<MbrKind>,
    pub bootable: bool,
}

impl Table {
    fn none() -> Table {
        Table {
            kind: TableType::None,
            guid: None,
            signature: None,
            partitions: Vec::new(),
            error: None,
        }
    }
}

const MBR_PROTECTIVE: u8 = 0xEE;

fn is_extended(sys: u8) -> bool {
    matches!(sys, 0x05 | 0x0F | 0x85)
}

/// Reads the partition table of `dev` (a block device or a disk image file).
pub fn read(dev: &Path, sector: u32) -> Table {
    match read_inner(dev, sector) {
        Ok(t) => t,
        Err(e) => Table {
            error: Some(e),
            ..Table::none()
        },
    }
}

fn read_inner(dev: &Path, sector: u32) -> Result<Table, String> {
    let mut f = File::open(dev).map_err(|e| format!("cannot open {}: {e}", dev.display()))?;
    let mut mbr = [0u8; 512];
    f.seek(SeekFrom::Start(0))
        .and_then(|_| f.read_exact(&mut mbr))
        .map_err(|e| format!("cannot read sector 0: {e}"))?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(Table::none());
    }
    let protective = (0..4).any(|i| mbr[446 + i * 16 + 4] == MBR_PROTECTIVE);
    if protective {
        gpt_table(f, sector)
    } else if (0..4).any(|i| mbr[446 + i * 16 + 4] != 0) {
        mbr_table(&mut f, sector)
    } else {
        // A boot sector with a signature but no partitions: a filesystem on the whole disk.
        Ok(Table::none())
    }
}

fn gpt_table(f: File, sector: u32) -> Result<Table, String> {
    let lb = match sector {
        512 => gpt::disk::LogicalBlockSize::Lb512,
        4096 => gpt::disk::LogicalBlockSize::Lb4096,
        n => return Err(format!("GPT on {n}-byte sectors is not supported")),
    };
    let disk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(lb)
        .open_from_device(f)
        .map_err(|e| format!("the GPT is damaged (both headers unreadable): {e}"))?;
    let mut table = Table {
        kind: TableType::Gpt,
        guid: Some(*disk.guid()),
        ..Table::none()
    };
    if disk.primary_header().is_err() || disk.backup_header().is_err() {
        table.error = Some("one of the two GPT headers is damaged; the other one was used".into());
    }
    let s = u64::from(sector);
    for (&number, p) in disk.partitions() {
        if !p.is_used() {
            continue;
        }
        table.partitions.push(TablePartition {
            number,
            start_bytes: p.first_lba * s,
            size_bytes: (p.last_lba + 1 - p.first_lba) * s,
            type_guid: Some(p.part_type_guid.guid),
            guid: Some(p.part_guid),
            name: p.name.clone(),
            attributes: Some(p.flags),
            mbr_type: None,
            mbr_kind: None,
            bootable: false,
        });
    }
    Ok(table)
}

fn mbr_table(f: &mut File, sector: u32) -> Result<Table, String> {
    f.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mbr = mbrman::MBR::read_from(f, sector)
        .map_err(|e| format!("the MBR partition table is damaged: {e}"))?;
    let sig = mbr.header.disk_signature;
    let mut table = Table {
        kind: TableType::Mbr,
        signature: Some(format!("0x{:08x}", u32::from_le_bytes(sig))),
        ..Table::none()
    };
    let s = u64::from(sector);
    for (i, p) in mbr.iter() {
        if !p.is_used() {
            continue;
        }
        let kind = if i > 4 {
            MbrKind::Logical
        } else if is_extended(p.sys) {
            MbrKind::Extended
        } else {
            MbrKind::Primary
        };
        table.partitions.push(TablePartition {
            number: i as u32,
            start_bytes: u64::from(p.starting_lba) * s,
            size_bytes: u64::from(p.sectors) * s,
            type_guid: None,
            guid: None,
            name: String::new(),
            attributes: None,
            mbr_type: Some(p.sys),
            mbr_kind: Some(kind),
            bootable: p.is_active(),
        });
    }
    Ok(table)
}
