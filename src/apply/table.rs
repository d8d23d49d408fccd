//! Partition tables from a `TargetPlan`, written with the `gpt` and `mbrman`
//! crates, and compared after reading them back.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::manifest::{MbrKind, TableType};
use crate::plan::TargetPlan;
use crate::probe::table;

fn lbas(bytes: u64, sector: u64) -> Result<u32> {
    u32::try_from(bytes / sector).map_err(|_| anyhow!("{bytes} bytes do not fit an MBR entry"))
}

/// Zeroes what lies outside the planned partitions: old table copies (the
/// primary at the front, a GPT backup at the end) and boot code, never a byte
/// inside a partition the plan keeps.
pub fn zap(f: &mut File, t: &TargetPlan) -> Result<()> {
    let first = t
        .partitions
        .iter()
        .map(|p| p.start_bytes)
        .min()
        .unwrap_or(t.size_bytes)
        .min(t.size_bytes);
    let last = t
        .partitions
        .iter()
        .map(|p| p.end_bytes())
        .max()
        .unwrap_or(0);
    zero(f, 0, first)?;
    zero(f, last, t.size_bytes - last)?;
    f.sync_all().context("flushing")
}

fn zero(f: &mut File, at: u64, len: u64) -> Result<()> {
    let buf = vec![0u8; 1 << 20];
    f.seek(SeekFrom::Start(at))?;
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])
            .with_context(|| format!("zeroing {len} bytes at {at}"))?;
        left -= n as u64;
    }
    Ok(())
}

/// Writes the table the plan describes onto `f` (a disk, or a rehearsal file
/// of the disk's size).
pub fn write(f: &mut File, t: &TargetPlan) -> Result<()> {
    match t.table {
        TableType::Gpt => write_gpt(f, t),
        TableType::Mbr => write_mbr(f, t),
        TableType::None => Ok(()),
    }?;
    f.sync_all().context("flushing the partition table")
}

fn write_gpt(f: &mut File, t: &TargetPlan) -> Result<()> {
    let sector = u64::from(t.logical_sector_size);
    let lb = match t.logical_sector_size {
        512 => gpt::disk::LogicalBlockSize::Lb512,
        4096 => gpt::disk::LogicalBlockSize::Lb4096,
        n => bail!("GPT on {n}-byte sectors is not supported"),
    };
    let blocks = u32::try_from(t.size_bytes / sector - 1).unwrap_or(u32::MAX);
    gpt::mbr::ProtectiveMBR::with_lb_size(blocks)
        .overwrite_lba0(f)
        .map_err(|e| anyhow!("writing the protective MBR: {e}"))?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(lb)
        .create_from_device(f.try_clone()?, t.guid)
        .map_err(|e| anyhow!("preparing the GPT: {e}"))?;
    let mut parts = BTreeMap::new();
    for p in &t.partitions {
        let type_guid = p
            .type_guid
            .ok_or_else(|| anyhow!("partition {} has no type GUID", p.number))?;
        parts.insert(
            p.number,
            gpt::partition::Partition {
                part_type_guid: gpt::partition_types::Type {
                    guid: type_guid,
                    os: gpt::partition_types::OperatingSystem::None,
                },
                part_guid: p.guid.unwrap_or_default(),
                first_lba: p.start_bytes / sector,
                last_lba: p.end_bytes() / sector - 1,
                flags: p.attributes.unwrap_or(0),
                name: p.name.clone(),
            },
        );
    }
    disk.update_partitions(parts)
        .map_err(|e| anyhow!("laying out the GPT: {e}"))?;
    disk.write().map_err(|e| anyhow!("writing the GPT: {e}"))?;
    Ok(())
}

fn write_mbr(f: &mut File, t: &TargetPlan) -> Result<()> {
    let sector = u64::from(t.logical_sector_size);
    let sig = t
        .signature
        .as_deref()
        .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0);
    let mut mbr = mbrman::MBR::new_from(f, t.logical_sector_size, sig.to_le_bytes())
        .map_err(|e| anyhow!("preparing the MBR: {e}"))?;
    let entry = |p: &crate::plan::PlannedPartition| -> Result<mbrman::MBRPartitionEntry> {
        Ok(mbrman::MBRPartitionEntry {
            boot: if p.bootable {
                mbrman::BOOT_ACTIVE
            } else {
                mbrman::BOOT_INACTIVE
            },
            first_chs: mbrman::CHS::empty(),
            sys: p
                .mbr_type
                .ok_or_else(|| anyhow!("partition {} has no MBR type", p.number))?,
            last_chs: mbrman::CHS::empty(),
            starting_lba: lbas(p.start_bytes, sector)?,
            sectors: lbas(p.size_bytes, sector)?,
        })
    };
    let mut logical: Vec<&crate::plan::PlannedPartition> = Vec::new();
    for p in &t.partitions {
        match p.mbr_kind {
            Some(MbrKind::Logical) => logical.push(p),
            _ => {
                if !(1..=4).contains(&p.number) {
                    bail!("MBR primary partition number {} is not 1-4", p.number);
                }
                mbr[p.number as usize] = entry(p)?;
            }
        }
    }
    logical.sort_by_key(|p| p.number);
    // Each logical partition's EBR sits one alignment step before it; the
    // first EBR is at the start of the extended partition.
    for p in &logical {
        let ebr_gap = 1 << 20;
        let ebr = lbas(p.start_bytes - ebr_gap, sector)?;
        let first = mbr.logical_partitions.is_empty();
        mbr.logical_partitions.push(mbrman::LogicalPartition {
            partition: entry(p)?,
            absolute_ebr_lba: ebr,
            ebr_sectors: if first {
                None
            } else {
                Some(lbas(p.size_bytes + ebr_gap, sector)?)
            },
            ebr_first_chs: mbrman::CHS::empty(),
            ebr_last_chs: if first {
                None
            } else {
                Some(mbrman::CHS::empty())
            },
            bootstrap_code: [0; 446],
        });
    }
    mbr.write_into(f)
        .map_err(|e| anyhow!("writing the MBR: {e}"))?;
    Ok(())
}

/// Reads the table back from `path` and checks it says what the plan says.
pub fn verify(path: &Path, t: &TargetPlan) -> Result<()> {
    let got = table::read(path, t.logical_sector_size);
    if let Some(e) = got.error {
        bail!(
            "{}: the table just written does not read back: {e}",
            path.display()
        );
    }
    if got.kind != t.table {
        bail!(
            "{}: wrote {} but read back {}",
            path.display(),
            t.table,
            got.kind
        );
    }
    let mut want: Vec<_> = t.partitions.iter().collect();
    want.sort_by_key(|p| p.number);
    if got.partitions.len() != want.len() {
        bail!(
            "{}: wrote {} partitions, read back {}",
            path.display(),
            want.len(),
            got.partitions.len()
        );
    }
    for (g, w) in got.partitions.iter().zip(want) {
        let same = g.number == w.number
            && g.start_bytes == w.start_bytes
            && g.size_bytes == w.size_bytes
            && (t.table != TableType::Gpt
                || (g.type_guid == w.type_guid
                    && g.guid == w.guid
                    && g.name == w.name
                    && g.attributes.unwrap_or(0) == w.attributes.unwrap_or(0)))
            && (t.table != TableType::Mbr
                || (g.mbr_type == w.mbr_type
                    && g.bootable == w.bootable
                    && g.mbr_kind == w.mbr_kind));
        if !same {
            bail!(
                "{}: partition {} reads back as {:?}, but the plan wrote {:?}",
                path.display(),
                w.number,
                g,
                w
            );
        }
    }
    if t.table == TableType::Gpt && got.guid != t.guid {
        bail!(
            "{}: disk GUID reads back as {:?}, plan wrote {:?}",
            path.display(),
            got.guid,
            t.guid
        );
    }
    Ok(())
}

/// Writes the table to a sparse file of the target's size and reads it back:
/// a table that cannot be written or read correctly fails here, before the
/// real disk is touched (coreos-installer's habit).
pub fn rehearse(t: &TargetPlan) -> Result<()> {
    let dir = tempfile::tempdir().context("creating a rehearsal directory")?;
    let path = dir.path().join("rehearsal.img");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    f.set_len(t.size_bytes)
        .context("sizing the rehearsal file")?;
    write(&mut f, t).with_context(|| format!("rehearsing the table of {}", t.device))?;
    verify(&path, t).with_context(|| format!("rehearsing the table of {}", t.device))
}
