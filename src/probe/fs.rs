//! Filesystem identity (blkid) and how much of it is used: statvfs when it is
//! mounted, else the filesystem's own allocation counters, read without ever
//! opening the device for writing.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FsInfo {
    pub filesystem: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub label: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// Bytes in use as `df` counts them; None when nothing could tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// Filesystem metadata that `df` leaves out (ext inode tables, journal, FATs):
    /// a restore into a new filesystem needs room for it too.
    pub overhead_bytes: u64,
    /// Where `used_bytes` came from: statvfs, ext-superblock, fat, ntfs-bitmap.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub used_from: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub mountpoint: String,
}

/// Identifies the filesystem on `dev` (a partition or whole disk). None when
/// there is no recognisable signature.
pub fn identify(dev: &Path) -> Result<Option<FsInfo>> {
    let probe = blkid::prober::Prober::new_from_filename(dev)
        .map_err(|e| anyhow!("blkid cannot open {}: {e}", dev.display()))?;
    match probe
        .do_safe_probe()
        .map_err(|e| anyhow!("blkid probing {}: {e}", dev.display()))?
    {
        blkid::prober::ProbeState::Success => {}
        blkid::prober::ProbeState::Ambivalent => {
            return Err(anyhow!(
                "{} carries signatures of more than one filesystem; wipe the stale one (wipefs)",
                dev.display()
            ))
        }
        _ => return Ok(None),
    }
    let values = probe
        .get_values_map()
        .map_err(|e| anyhow!("blkid values of {}: {e}", dev.display()))?;
    let Some(fstype) = values.get("TYPE") else {
        return Ok(None);
    };
    Ok(Some(FsInfo {
        filesystem: fstype.clone(),
        uuid: values.get("UUID").cloned().unwrap_or_default(),
        label: values.get("LABEL").cloned().unwrap_or_default(),
        block_size: values.get("BLOCK_SIZE").and_then(|b| b.parse().ok()),
        ..FsInfo::default()
    }))
}

/// Fills in used and overhead bytes: from the mounted filesystem when there
/// is one, else from the on-disk counters of the filesystems we understand.
pub fn measure(dev: &Path, info: &mut FsInfo, mounted_at: Option<&Path>) {
    let counted = match info.filesystem.as_str() {
        "ext2" | "ext3" | "ext4" => ext_usage(dev).map(|u| (u, "ext-superblock")),
        "vfat" => fat_usage(dev).map(|u| (u, "fat")),
        "ntfs" => ntfs_usage(dev).map(|u| (u, "ntfs-bitmap")),
        "swap" => Ok((
            Usage {
                used: 0,
                overhead: 0,
            },
            "swap",
        )),
        _ => Err(anyhow!("no counters known for {}", info.filesystem)),
    };
    if let Ok((usage, _)) = &counted {
        info.overhead_bytes = usage.overhead;
    }
    if let Some(dir) = mounted_at {
        info.mountpoint = dir.display().to_string();
        if let Ok(st) = nix::sys::statvfs::statvfs(dir) {
            let frsize = st.fragment_size();
            info.used_bytes = Some(st.blocks().saturating_sub(st.blocks_free()) * frsize);
            info.used_from = "statvfs".into();
            return;
        }
    }
    if let Ok((usage, from)) = counted {
        info.used_bytes = Some(usage.used);
        info.used_from = from.into();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub used: u64,
    pub overhead: u64,
}

fn read_at(f: &mut File, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut buf)?;
    Ok(buf)
}

fn le16(b: &[u8], o: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[o], b[o + 1]]))
}
fn le32(b: &[u8], o: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]))
}

/// ext2/3/4 from the superblock. `df` leaves out what the kernel calls
/// overhead (group metadata and the internal journal), so we compute it the
/// way ext4_calculate_overhead does, unless mke2fs recorded it.
pub fn ext_usage(dev: &Path) -> Result<Usage> {
    let mut f = File::open(dev)?;
    let sb = read_at(&mut f, 1024, 1024)?;
    anyhow::ensure!(le16(&sb, 0x38) == 0xEF53, "no ext superblock");
    let block = 1024u64 << le32(&sb, 0x18);
    let incompat = le32(&sb, 0x60);
    let ro_compat = le32(&sb, 0x64);
    let is64 = incompat & 0x80 != 0;
    let hi = |o: usize| if is64 { le32(&sb, o) << 32 } else { 0 };
    let blocks = le32(&sb, 0x04) | hi(0x150);
    let free = le32(&sb, 0x0C) | hi(0x158);
    let first_data = le32(&sb, 0x14);
    let per_group = le32(&sb, 0x20);
    let inodes_per_group = le32(&sb, 0x28);
    let inode_size = if le32(&sb, 0x4C) == 0 {
        128
    } else {
        le16(&sb, 0x58)
    };
    let desc_size = if is64 { le16(&sb, 0xFE).max(32) } else { 32 };
    let reserved_gdt = le16(&sb, 0xCE);
    anyhow::ensure!(
        per_group > 0 && blocks > first_data,
        "implausible ext superblock"
    );
    let groups = (blocks - first_data).div_ceil(per_group);
    let recorded = le32(&sb, 0x248);
    let overhead_blocks = if recorded != 0 {
        recorded
    } else {
        let gdt_blocks = (groups * desc_size).div_ceil(block);
        let itable = (inodes_per_group * inode_size).div_ceil(block);
        let compat = le32(&sb, 0x5C);
        let backup_bgs = [le32(&sb, 0x24C), le32(&sb, 0x250)];
        let meta_bg = incompat & 0x10 != 0;
        let mut total = first_data;
        for g in 0..groups {
            if crate::image::used::ext_has_super(g, compat, ro_compat, backup_bgs) {
                // meta_bg spreads descriptors over groups; counting them per
                // backup is close enough for sizing and rare in practice.
                total += 1 + if meta_bg {
                    0
                } else {
                    gdt_blocks + reserved_gdt
                };
            }
            total += 2 + itable;
        }
        total + journal_blocks(&mut f, &sb, block, desc_size, is64).unwrap_or(0)
    };
    let used_blocks = blocks.saturating_sub(free).saturating_sub(overhead_blocks);
    Ok(Usage {
        used: used_blocks * block,
        overhead: overhead_blocks * block,
    })
}

/// Blocks of the internal journal (inode 8), which `df` does not count as used.
fn journal_blocks(f: &mut File, sb: &[u8], block: u64, desc_size: u64, is64: bool) -> Result<u64> {
    if le32(sb, 0x5C) & 0x4 == 0 || le32(sb, 0xE0) != 8 {
        return Ok(0);
    }
    let gdt = (le32(sb, 0x14) + 1) * block;
    let desc = read_at(f, gdt, desc_size as usize)?;
    let table = le32(&desc, 0x08)
        | if is64 && desc_size >= 64 {
            le32(&desc, 0x28) << 32
        } else {
            0
        };
    let inode_size = if le32(sb, 0x4C) == 0 {
        128
    } else {
        le16(sb, 0x58)
    };
    let inode = read_at(f, table * block + 7 * inode_size, 0x70)?;
    let size = le32(&inode, 0x04) | (le32(&inode, 0x6C) << 32);
    Ok(size.div_ceil(block))
}

/// FAT12/16/32 through `fatfs`, opened read-only.
pub fn fat_usage(dev: &Path) -> Result<Usage> {
    let mut f = File::open(dev)?;
    let boot = read_at(&mut f, 0, 512)?;
    let sector = le16(&boot, 11);
    let reserved = le16(&boot, 14);
    let fats = u64::from(boot[16]);
    let root_entries = le16(&boot, 17);
    let fat_sectors = match le16(&boot, 22) {
        0 => le32(&boot, 36),
        n => n,
    };
    let overhead = (reserved + fats * fat_sectors) * sector + root_entries * 32;
    let fs = crate::medium::open_fat_readonly(dev)?;
    let stats = fs.stats()?;
    let used = u64::from(stats.total_clusters().saturating_sub(stats.free_clusters()))
        * u64::from(stats.cluster_size());
    Ok(Usage { used, overhead })
}

/// NTFS: set bits of $Bitmap times the cluster size, as ntfs-3g's df reports.
pub fn ntfs_usage(dev: &Path) -> Result<Usage> {
    let mut f = std::io::BufReader::new(File::open(dev)?);
    let ntfs = ntfs::Ntfs::new(&mut f).map_err(|e| anyhow!("reading the NTFS boot sector: {e}"))?;
    let bitmap = ntfs
        .file(&mut f, ntfs::KnownNtfsFileRecordNumber::Bitmap as u64)
        .map_err(|e| anyhow!("reading $Bitmap: {e}"))?;
    let item = bitmap
        .data(&mut f, "")
        .ok_or_else(|| anyhow!("$Bitmap has no data"))?
        .map_err(|e| anyhow!("reading $Bitmap data: {e}"))?;
    let attr = item
        .to_attribute()
        .map_err(|e| anyhow!("$Bitmap attribute: {e}"))?;
    let value = attr
        .value(&mut f)
        .map_err(|e| anyhow!("$Bitmap value: {e}"))?;
    let clusters = ntfs.size() / u64::from(ntfs.cluster_size());
    let mut reader = value.attach(&mut f);
    let mut buf = vec![0u8; 64 * 1024];
    let (mut seen, mut used) = (0u64, 0u64);
    while seen < clusters {
        let n = reader.read(&mut buf).context("reading $Bitmap")?;
        if n == 0 {
            break;
        }
        for &byte in &buf[..n] {
            let bits = (clusters - seen).min(8);
            let mask = if bits == 8 {
                0xFF
            } else {
                (1u16 << bits) as u8 - 1
            };
            used += u64::from((byte & mask).count_ones());
            seen += bits;
            if seen >= clusters {
                break;
            }
        }
    }
    Ok(Usage {
        used: used * u64::from(ntfs.cluster_size()),
        overhead: 0,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn sparse_super_groups() {
        let has_super =
            |g, sparse: bool| crate::image::used::ext_has_super(g, 0, u64::from(sparse), [0, 0]);
        let with: Vec<u64> = (0..60).filter(|&g| has_super(g, true)).collect();
        assert_eq!(with, vec![0, 1, 3, 5, 7, 9, 25, 27, 49]);
        assert!((0..10).all(|g| has_super(g, false)));
    }
}
