//! Which parts of a volume hold data, read from the filesystem's own
//! allocation structures: the block bitmaps of ext2/3/4, the FAT of
//! FAT12/16/32, NTFS's `$Bitmap`, the header page of a swap area. Alongside,
//! the parts a reader needs first to mount the filesystem and walk its
//! directories (the metadata section of an image). Anything else is read
//! whole. The device is only ever opened read-only, and a corrupt filesystem
//! gives an error naming the device and the structure at fault, never a panic.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};

/// Which parts of a volume hold data, from the filesystem's own allocation data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedMap {
    /// Size of the volume in bytes (the device or image file size).
    pub size: u64,
    /// Allocation unit in bytes (fs block or cluster size; 4096 for "whole").
    pub unit: u64,
    /// Sorted, non-overlapping, merged byte ranges [start, end) in use, within 0..size.
    pub used: Vec<Range<u64>>,
    /// Sorted, merged byte ranges a reader needs to mount the filesystem and
    /// walk its directories; always a subset of `used`.
    pub metadata: Vec<Range<u64>>,
    /// What the map was read from, for messages: "ext4 block bitmaps", "FAT", "NTFS $Bitmap", "swap header", "whole device (xfs: no allocation reader)".
    pub source: String,
}

/// `fstype` is blkid's TYPE (ext2, ext3, ext4, vfat, ntfs, swap, anything else).
/// `dev` is a block device or a regular file holding exactly the volume; open it read-only only.
pub fn used_map(dev: &Path, fstype: &str) -> anyhow::Result<UsedMap> {
    let file = File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    let dev_name = dev.display();
    let read = || -> Result<UsedMap> {
        let mut file = file;
        let size = file.seek(SeekFrom::End(0)).context("finding the size")?;
        let d = Dev { file, size };
        match fstype {
            "ext2" | "ext3" | "ext4" => ext_map(&d, fstype),
            "vfat" | "msdos" | "fat" | "fat12" | "fat16" | "fat32" => fat_map(&d),
            "ntfs" => ntfs_map(&d),
            "swap" => Ok(finish(
                size,
                4096,
                Ranges::from(0..4096),
                Ranges::from(0..4096),
                "swap header".into(),
            )),
            other => Ok(whole(
                size,
                format!("whole device ({other}: no allocation reader)"),
            )),
        }
    };
    read().map_err(|e| anyhow!("{dev_name}: {e:#}"))
}

const UNIT_WHOLE: u64 = 4096;

fn whole(size: u64, source: String) -> UsedMap {
    finish(
        size,
        UNIT_WHOLE,
        Ranges::from(0..size),
        Ranges::default(),
        source,
    )
}

/// Clamps, sorts and merges both lists, and keeps metadata within `used`.
fn finish(size: u64, unit: u64, used: Ranges, metadata: Ranges, source: String) -> UsedMap {
    let used = used.normalise(size);
    let metadata = intersect(&metadata.normalise(size), &used);
    UsedMap {
        size,
        unit,
        used,
        metadata,
        source,
    }
}

/// A list of byte ranges under construction; `push` merges with the last one
/// when they touch, so runs pushed in order stay compact.
#[derive(Debug, Default)]
struct Ranges(Vec<Range<u64>>);

impl From<Range<u64>> for Ranges {
    fn from(r: Range<u64>) -> Self {
        let mut out = Ranges::default();
        out.push(r.start, r.end);
        out
    }
}

impl Ranges {
    fn push(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        if let Some(last) = self.0.last_mut() {
            if start >= last.start && start <= last.end {
                last.end = last.end.max(end);
                return;
            }
        }
        self.0.push(start..end);
    }

    fn extend(&mut self, other: &Ranges) {
        for r in &other.0 {
            self.push(r.start, r.end);
        }
    }

    fn normalise(self, size: u64) -> Vec<Range<u64>> {
        let mut v: Vec<Range<u64>> = self
            .0
            .into_iter()
            .map(|r| r.start.min(size)..r.end.min(size))
            .filter(|r| r.start < r.end)
            .collect();
        v.sort_unstable_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        out
    }
}

/// Intersection of two sorted, merged range lists.
fn intersect(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let (mut i, mut j) = (0, 0);
    let mut out: Vec<Range<u64>> = Vec::new();
    while i < a.len() && j < b.len() {
        let start = a[i].start.max(b[j].start);
        let end = a[i].end.min(b[j].end);
        if start < end {
            out.push(start..end);
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Pushes one range per run of set bits among the first `bits` bits of
/// `map` (least significant bit first), bit i standing for the bytes
/// `base + i * unit .. base + (i + 1) * unit`.
fn push_bit_runs(map: &[u8], bits: u64, base: u64, unit: u64, out: &mut Ranges) {
    let bits = bits.min(map.len() as u64 * 8);
    let at = |i: u64| base.saturating_add(i.saturating_mul(unit));
    let mut run: Option<u64> = None;
    let mut i = 0u64;
    while i < bits {
        let byte = map[(i / 8) as usize];
        if i % 8 == 0 && i + 8 <= bits && (byte == 0 || byte == 0xFF) {
            match (byte, run) {
                (0, Some(s)) => {
                    out.push(at(s), at(i));
                    run = None;
                }
                (0xFF, None) => run = Some(i),
                _ => {}
            }
            i += 8;
            continue;
        }
        let set = (byte >> (i % 8)) & 1 == 1;
        match (set, run) {
            (true, None) => run = Some(i),
            (false, Some(s)) => {
                out.push(at(s), at(i));
                run = None;
            }
            _ => {}
        }
        i += 1;
    }
    if let Some(s) = run {
        out.push(at(s), at(bits));
    }
}

fn le16(b: &[u8], o: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[o], b[o + 1]]))
}
fn le32(b: &[u8], o: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]))
}
fn le64(b: &[u8], o: usize) -> u64 {
    le32(b, o) | (le32(b, o + 4) << 32)
}

/// The volume, opened read-only.
struct Dev {
    file: File,
    size: u64,
}

impl Dev {
    /// `len` bytes at `off`; an error naming `what` when they are not all on the volume.
    fn read(&self, off: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        let end = off.checked_add(len);
        ensure!(
            end.is_some_and(|e| e <= self.size),
            "{what} (bytes {off}..{}) lies beyond the end of the volume ({} bytes)",
            end.map_or_else(|| "overflow".to_string(), |e| e.to_string()),
            self.size
        );
        ensure!(len <= 1 << 30, "{what} is implausibly large ({len} bytes)");
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, off)
            .with_context(|| format!("reading {what} at byte {off}"))?;
        Ok(buf)
    }
}

// ---------------------------------------------------------------- ext2/3/4

const EXT_COMPAT_HAS_JOURNAL: u64 = 0x4;
const EXT_COMPAT_SPARSE_SUPER2: u64 = 0x200;
const EXT_INCOMPAT_RECOVER: u64 = 0x4;
const EXT_INCOMPAT_META_BG: u64 = 0x10;
const EXT_INCOMPAT_64BIT: u64 = 0x80;
const EXT_INCOMPAT_MMP: u64 = 0x100;
const EXT_RO_SPARSE_SUPER: u64 = 0x1;
const EXT_RO_GDT_CSUM: u64 = 0x10;
const EXT_RO_BIGALLOC: u64 = 0x200;
const EXT_RO_METADATA_CSUM: u64 = 0x400;
const EXT_BG_INODE_UNINIT: u64 = 0x1;
const EXT_BG_BLOCK_UNINIT: u64 = 0x2;
const EXT_EXTENTS_FL: u64 = 0x8_0000;
const EXT_INLINE_DATA_FL: u64 = 0x1000_0000;

/// Whether ext group `g` holds a copy of the superblock (ext4_bg_has_super),
/// from the superblock's compat and ro_compat features and, for
/// sparse_super2, its two backup groups.
pub(crate) fn ext_has_super(g: u64, compat: u64, ro_compat: u64, backup_bgs: [u64; 2]) -> bool {
    if g == 0 {
        return true;
    }
    if compat & EXT_COMPAT_SPARSE_SUPER2 != 0 {
        return g == backup_bgs[0] || g == backup_bgs[1];
    }
    if g <= 1 || ro_compat & EXT_RO_SPARSE_SUPER == 0 {
        return true;
    }
    if g & 1 == 0 {
        return false;
    }
    [3u64, 5, 7].iter().any(|&base| {
        let mut n = base;
        while n < g {
            n *= base;
        }
        n == g
    })
}

#[derive(Debug, Clone, Copy)]
struct ExtDesc {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    flags: u64,
    itable_unused: u64,
}

struct Ext<'a> {
    dev: &'a Dev,
    name: &'a str,
    block: u64,
    blocks: u64,
    inodes: u64,
    first_data: u64,
    per_group: u64,
    inodes_per_group: u64,
    inode_size: u64,
    desc_size: u64,
    groups: u64,
    gdt_blocks: u64,
    reserved_gdt: u64,
    first_meta_bg: u64,
    compat: u64,
    incompat: u64,
    ro_compat: u64,
    backup_bgs: [u64; 2],
    itable_blocks: u64,
    /// Whether group descriptors carry checksums, which makes the
    /// BLOCK_UNINIT / INODE_UNINIT flags and itable_unused meaningful.
    csum: bool,
    descs: Vec<ExtDesc>,
}

fn ext_map(dev: &Dev, name: &str) -> Result<UsedMap> {
    let sb = dev.read(1024, 1024, &format!("{name} superblock"))?;
    ensure!(
        le16(&sb, 0x38) == 0xEF53,
        "no {name} superblock (bad magic number)"
    );
    let ro_compat = le32(&sb, 0x64);
    if ro_compat & EXT_RO_BIGALLOC != 0 {
        return Ok(whole(
            dev.size,
            format!("whole device ({name} bigalloc: no allocation reader)"),
        ));
    }
    let log_block = le32(&sb, 0x18);
    ensure!(
        log_block <= 6,
        "{name} superblock gives an impossible block size (log {log_block})"
    );
    let block = 1024u64 << log_block;
    let incompat = le32(&sb, 0x60);
    let is64 = incompat & EXT_INCOMPAT_64BIT != 0;
    let blocks = le32(&sb, 0x04) | if is64 { le32(&sb, 0x150) << 32 } else { 0 };
    let first_data = le32(&sb, 0x14);
    let per_group = le32(&sb, 0x20);
    let inodes_per_group = le32(&sb, 0x28);
    let inode_size = if le32(&sb, 0x4C) == 0 {
        128
    } else {
        le16(&sb, 0x58)
    };
    let desc_size = if is64 { le16(&sb, 0xFE) } else { 32 };
    ensure!(
        blocks > first_data && first_data <= 1 && blocks.checked_mul(block).is_some(),
        "{name} superblock gives an impossible block count ({blocks}, first data block {first_data})"
    );
    ensure!(
        per_group > 0 && per_group <= 8 * block,
        "{name} superblock gives an impossible blocks-per-group ({per_group})"
    );
    ensure!(
        inodes_per_group > 0 && inodes_per_group <= 8 * block,
        "{name} superblock gives an impossible inodes-per-group ({inodes_per_group})"
    );
    ensure!(
        inode_size >= 128 && inode_size <= block && inode_size.is_power_of_two(),
        "{name} superblock gives an impossible inode size ({inode_size})"
    );
    ensure!(
        desc_size >= 32 && desc_size <= block && desc_size.is_power_of_two(),
        "{name} superblock gives an impossible group descriptor size ({desc_size})"
    );
    let groups = (blocks - first_data).div_ceil(per_group);
    let dpb = block / desc_size;
    let mut ext = Ext {
        dev,
        name,
        block,
        blocks,
        inodes: le32(&sb, 0x00),
        first_data,
        per_group,
        inodes_per_group,
        inode_size,
        desc_size,
        groups,
        gdt_blocks: groups.div_ceil(dpb),
        reserved_gdt: le16(&sb, 0xCE),
        first_meta_bg: le32(&sb, 0x104),
        compat: le32(&sb, 0x5C),
        incompat,
        ro_compat,
        backup_bgs: [le32(&sb, 0x24C), le32(&sb, 0x250)],
        itable_blocks: (inodes_per_group * inode_size).div_ceil(block),
        csum: ro_compat & (EXT_RO_GDT_CSUM | EXT_RO_METADATA_CSUM) != 0,
        descs: Vec::new(),
    };
    ext.read_descriptors()?;

    let mut used = Ranges::default();
    let mut meta = Ranges::default();
    used.push(0, first_data * block);
    meta.push(0, first_data * block);
    for g in 0..groups {
        let d = ext.descs[g as usize];
        let first = ext.group_first(g);
        let count = per_group.min(blocks - first);
        let base = ext.base_meta(g).min(count);
        let own = [
            (first, base),
            (d.block_bitmap, 1),
            (d.inode_bitmap, 1),
            (d.inode_table, ext.itable_blocks),
        ];
        for (start, n) in own {
            ext.push_blocks(&mut meta, start, n);
        }
        if ext.csum && d.flags & EXT_BG_BLOCK_UNINIT != 0 {
            for (start, n) in own {
                ext.push_blocks(&mut used, start, n);
            }
        } else {
            let bitmap = ext.read_block(d.block_bitmap, &format!("block bitmap of group {g}"))?;
            push_bit_runs(&bitmap, count, first * block, block, &mut used);
        }
    }
    ext.directories(&mut meta)?;
    // The journal is optional metadata: its superblock always, all of it
    // when it holds transactions still to be replayed. A journal we cannot
    // follow costs nothing but ordering, so it is not an error.
    if let Ok(journal) = ext.journal() {
        meta.extend(&journal);
    }
    if incompat & EXT_INCOMPAT_MMP != 0 {
        let mmp = le64(&sb, 0x168);
        if mmp < blocks {
            ext.push_blocks(&mut meta, mmp, 1);
        }
    }
    let source = if incompat & EXT_INCOMPAT_META_BG != 0 {
        format!("{name} block bitmaps (meta_bg)")
    } else {
        format!("{name} block bitmaps")
    };
    Ok(finish(dev.size, block, used, meta, source))
}

impl Ext<'_> {
    fn meta_bg(&self) -> bool {
        self.incompat & EXT_INCOMPAT_META_BG != 0
    }

    fn descs_per_block(&self) -> u64 {
        self.block / self.desc_size
    }

    fn group_first(&self, g: u64) -> u64 {
        self.first_data + g * self.per_group
    }

    fn push_blocks(&self, out: &mut Ranges, start: u64, n: u64) {
        out.push(
            start.saturating_mul(self.block),
            start.saturating_add(n).saturating_mul(self.block),
        );
    }

    fn read_block(&self, b: u64, what: &str) -> Result<Vec<u8>> {
        ensure!(
            b < self.blocks,
            "{} {what} is at block {b}, outside the volume ({} blocks)",
            self.name,
            self.blocks
        );
        self.dev
            .read(b * self.block, self.block, &format!("{} {what}", self.name))
    }

    /// Whether group `g` holds a copy of the superblock (ext4_bg_has_super).
    fn has_super(&self, g: u64) -> bool {
        ext_has_super(g, self.compat, self.ro_compat, self.backup_bgs)
    }

    /// Blocks at the start of group `g` taken by the superblock copy, group
    /// descriptors and reserved descriptor blocks (ext4_num_base_meta_blocks).
    fn base_meta(&self, g: u64) -> u64 {
        let sup = u64::from(self.has_super(g));
        let dpb = self.descs_per_block();
        if !self.meta_bg() || g < self.first_meta_bg.saturating_mul(dpb) {
            if sup == 0 {
                return 0;
            }
            let gdt = if self.meta_bg() {
                self.first_meta_bg
            } else {
                self.gdt_blocks
            };
            sup + gdt + self.reserved_gdt
        } else {
            let first = g / dpb * dpb;
            let gdt = u64::from(g == first || g == first + 1 || g == first + dpb - 1);
            sup + gdt
        }
    }

    /// Where the `i`th block of group descriptors is (the kernel's descriptor_loc).
    fn descriptor_block(&self, i: u64) -> u64 {
        if !self.meta_bg() || i < self.first_meta_bg {
            return self.first_data + i + 1;
        }
        let g = i * self.descs_per_block();
        let mut sup = u64::from(self.has_super(g));
        if self.block == 1024 && i == 0 && self.first_data == 0 {
            sup += 1;
        }
        self.group_first(g) + sup
    }

    fn read_descriptors(&mut self) -> Result<()> {
        let dpb = self.descs_per_block();
        let ds = self.desc_size as usize;
        let mut descs = Vec::with_capacity(self.groups.min(1 << 20) as usize);
        for i in 0..self.gdt_blocks {
            let b = self.descriptor_block(i);
            let data = self.read_block(b, &format!("group descriptor block {i}"))?;
            for j in 0..dpb {
                let g = i * dpb + j;
                if g >= self.groups {
                    break;
                }
                let d = &data[j as usize * ds..(j as usize + 1) * ds];
                let wide = ds >= 64;
                let hi = |o: usize| if wide { le32(d, o) << 32 } else { 0 };
                let desc = ExtDesc {
                    block_bitmap: le32(d, 0x00) | hi(0x20),
                    inode_bitmap: le32(d, 0x04) | hi(0x24),
                    inode_table: le32(d, 0x08) | hi(0x28),
                    flags: le16(d, 0x12),
                    itable_unused: le16(d, 0x1C) | if wide { le16(d, 0x32) << 16 } else { 0 },
                };
                ensure!(
                    desc.block_bitmap < self.blocks
                        && desc.inode_bitmap < self.blocks
                        && desc
                            .inode_table
                            .checked_add(self.itable_blocks)
                            .is_some_and(|end| end <= self.blocks),
                    "{} group descriptor {g} points outside the volume",
                    self.name
                );
                descs.push(desc);
            }
        }
        self.descs = descs;
        Ok(())
    }

    /// Adds the blocks of every directory (and of the extent-tree or
    /// indirect blocks that lead to them) to `meta`, walking the used inodes
    /// of each group's inode table.
    fn directories(&self, meta: &mut Ranges) -> Result<()> {
        let ipg = self.inodes_per_group;
        let isz = self.inode_size;
        let chunk = ((4 << 20) / isz).max(1);
        for g in 0..self.groups {
            let d = self.descs[g as usize];
            if self.csum && d.flags & EXT_BG_INODE_UNINIT != 0 {
                continue;
            }
            let bitmap = self.read_block(d.inode_bitmap, &format!("inode bitmap of group {g}"))?;
            let limit = if self.csum {
                ipg.saturating_sub(d.itable_unused)
            } else {
                ipg
            };
            let bit = |i: u64| (bitmap[(i / 8) as usize] >> (i % 8)) & 1 == 1;
            let Some(last) = (0..limit).rev().find(|&i| bit(i)) else {
                continue;
            };
            let mut start = 0;
            while start <= last {
                let n = chunk.min(last + 1 - start);
                if (start..start + n).any(bit) {
                    let table = self.dev.read(
                        d.inode_table * self.block + start * isz,
                        n * isz,
                        &format!("{} inode table of group {g}", self.name),
                    )?;
                    for i in (start..start + n).filter(|&i| bit(i)) {
                        let off = ((i - start) * isz) as usize;
                        let inode = &table[off..off + isz as usize];
                        if le16(inode, 0) & 0xF000 == 0x4000 {
                            let ino = g * ipg + i + 1;
                            let mut data = Ranges::default();
                            self.file_blocks(inode, ino, meta, &mut data)?;
                            meta.extend(&data);
                        }
                    }
                }
                start += n;
            }
        }
        Ok(())
    }

    fn read_inode(&self, ino: u64) -> Result<Vec<u8>> {
        ensure!(
            ino >= 1 && ino <= self.inodes,
            "{} inode {ino} does not exist",
            self.name
        );
        let g = (ino - 1) / self.inodes_per_group;
        let i = (ino - 1) % self.inodes_per_group;
        let d = self
            .descs
            .get(g as usize)
            .ok_or_else(|| anyhow!("{} inode {ino} lies beyond the last group", self.name))?;
        self.dev.read(
            d.inode_table * self.block + i * self.inode_size,
            self.inode_size,
            &format!("{} inode {ino}", self.name),
        )
    }

    /// The journal's blocks that a mount needs: its extent map and first
    /// block (the journal superblock), or all of it when recovery is pending.
    fn journal(&self) -> Result<Ranges> {
        let mut out = Ranges::default();
        let sb_inum = {
            let sb = self.dev.read(1024, 1024, "superblock")?;
            le32(&sb, 0xE0)
        };
        if self.compat & EXT_COMPAT_HAS_JOURNAL == 0 || sb_inum == 0 {
            return Ok(out);
        }
        let inode = self.read_inode(sb_inum)?;
        let mut data = Ranges::default();
        self.file_blocks(&inode, sb_inum, &mut out, &mut data)?;
        if self.incompat & EXT_INCOMPAT_RECOVER != 0 {
            out.extend(&data);
        } else if let Some(first) = data.0.first() {
            out.push(first.start, first.start + self.block);
        }
        Ok(out)
    }

    /// The blocks of one file: extent-tree or indirect blocks to `map`, data
    /// blocks to `data` in logical order.
    fn file_blocks(
        &self,
        inode: &[u8],
        ino: u64,
        map: &mut Ranges,
        data: &mut Ranges,
    ) -> Result<()> {
        let flags = le32(inode, 0x20);
        if flags & EXT_INLINE_DATA_FL != 0 {
            return Ok(());
        }
        let iblock = &inode[0x28..0x28 + 60];
        if flags & EXT_EXTENTS_FL != 0 {
            return self.extent_node(iblock, ino, None, map, data);
        }
        let size = le32(inode, 0x04) | (le32(inode, 0x6C) << 32);
        let mut remaining = size.div_ceil(self.block).min(self.blocks);
        let per = self.block / 4;
        for k in 0..12 {
            if remaining == 0 {
                return Ok(());
            }
            let b = le32(iblock, 4 * k);
            if b != 0 {
                self.check_blocks(b, 1, ino)?;
                self.push_blocks(data, b, 1);
            }
            remaining -= 1;
        }
        for level in 1..=3u32 {
            if remaining == 0 {
                break;
            }
            let b = le32(iblock, 4 * (11 + level as usize));
            if b == 0 {
                remaining = remaining.saturating_sub(per.saturating_pow(level));
            } else {
                self.indirect(b, level, &mut remaining, ino, map, data)?;
            }
        }
        Ok(())
    }

    fn indirect(
        &self,
        b: u64,
        level: u32,
        remaining: &mut u64,
        ino: u64,
        map: &mut Ranges,
        data: &mut Ranges,
    ) -> Result<()> {
        self.check_blocks(b, 1, ino)?;
        self.push_blocks(map, b, 1);
        let table = self.read_block(b, &format!("indirect block of inode {ino}"))?;
        let per = self.block / 4;
        for k in 0..per as usize {
            if *remaining == 0 {
                break;
            }
            let p = le32(&table, 4 * k);
            if level == 1 {
                if p != 0 {
                    self.check_blocks(p, 1, ino)?;
                    self.push_blocks(data, p, 1);
                }
                *remaining -= 1;
            } else if p == 0 {
                *remaining = remaining.saturating_sub(per.saturating_pow(level - 1));
            } else {
                self.indirect(p, level - 1, remaining, ino, map, data)?;
            }
        }
        Ok(())
    }

    fn extent_node(
        &self,
        node: &[u8],
        ino: u64,
        expect_depth: Option<u64>,
        map: &mut Ranges,
        data: &mut Ranges,
    ) -> Result<()> {
        let name = self.name;
        ensure!(
            node.len() >= 12 && le16(node, 0) == 0xF30A,
            "{name} inode {ino}: extent tree node without its magic number"
        );
        let entries = le16(node, 2) as usize;
        let depth = le16(node, 6);
        ensure!(
            12 + entries * 12 <= node.len(),
            "{name} inode {ino}: extent node claims {entries} entries"
        );
        ensure!(
            depth <= 5 && expect_depth.is_none_or(|e| e == depth),
            "{name} inode {ino}: extent tree has an impossible depth ({depth})"
        );
        for k in 0..entries {
            let e = &node[12 + 12 * k..24 + 12 * k];
            if depth == 0 {
                let mut len = le16(e, 4);
                if len > 32768 {
                    len -= 32768;
                }
                let start = (le16(e, 6) << 32) | le32(e, 8);
                self.check_blocks(start, len, ino)?;
                self.push_blocks(data, start, len);
            } else {
                let leaf = (le16(e, 8) << 32) | le32(e, 4);
                self.check_blocks(leaf, 1, ino)?;
                self.push_blocks(map, leaf, 1);
                let child = self.read_block(leaf, &format!("extent block of inode {ino}"))?;
                self.extent_node(&child, ino, Some(depth - 1), map, data)?;
            }
        }
        Ok(())
    }

    fn check_blocks(&self, start: u64, n: u64, ino: u64) -> Result<()> {
        ensure!(
            start
                .checked_add(n)
                .is_some_and(|end| start > 0 && end <= self.blocks),
            "{} inode {ino} points to blocks {start}..+{n}, outside the volume ({} blocks)",
            self.name,
            self.blocks
        );
        Ok(())
    }
}

// ---------------------------------------------------------------- FAT

fn fat_map(dev: &Dev) -> Result<UsedMap> {
    let boot = dev.read(0, 512, "FAT boot sector")?;
    let bps = le16(&boot, 11);
    let spc = u64::from(boot[13]);
    let reserved = le16(&boot, 14);
    let nfats = u64::from(boot[16]);
    let root_entries = le16(&boot, 17);
    let total = match le16(&boot, 19) {
        0 => le32(&boot, 32),
        n => n,
    };
    let fat16_size = le16(&boot, 22);
    let fat_size = if fat16_size != 0 {
        fat16_size
    } else {
        le32(&boot, 36)
    };
    ensure!(
        matches!(bps, 512 | 1024 | 2048 | 4096),
        "FAT boot sector gives an impossible sector size ({bps})"
    );
    ensure!(
        spc.is_power_of_two(),
        "FAT boot sector gives an impossible cluster size ({spc} sectors)"
    );
    ensure!(
        reserved >= 1 && nfats >= 1 && fat_size >= 1,
        "FAT boot sector is corrupt ({reserved} reserved sectors, {nfats} FATs of {fat_size} sectors)"
    );
    let is32 = fat16_size == 0;
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let first_data = reserved + nfats * fat_size + root_sectors;
    ensure!(
        total > first_data,
        "FAT boot sector is corrupt: {total} sectors in all, {first_data} before the data area"
    );
    let mut clusters = (total - first_data) / spc;
    let bits: u64 = if is32 {
        32
    } else if clusters < 4085 {
        12
    } else {
        16
    };
    // Like the kernel: a FAT too small for the data area limits it.
    clusters = clusters.min((fat_size * bps * 8 / bits).saturating_sub(2));
    ensure!(clusters > 0, "FAT has no data clusters");
    let active = if is32 && le16(&boot, 40) & 0x80 != 0 {
        le16(&boot, 40) & 0xF
    } else {
        0
    };
    ensure!(active < nfats, "FAT32 names FAT {active} active of {nfats}");
    let fat_bytes = ((clusters + 2) * bits).div_ceil(8);
    let fat = dev.read(
        (reserved + active * fat_size) * bps,
        fat_bytes,
        "file allocation table",
    )?;
    let cs = spc * bps;
    let data_start = first_data * bps;
    let entry = |c: u64| -> u64 {
        match bits {
            12 => {
                let v = le16(&fat, (c + c / 2) as usize);
                if c & 1 == 1 {
                    v >> 4
                } else {
                    v & 0xFFF
                }
            }
            16 => le16(&fat, 2 * c as usize),
            _ => le32(&fat, 4 * c as usize) & 0x0FFF_FFFF,
        }
    };
    let eoc = match bits {
        12 => 0xFF8,
        16 => 0xFFF8,
        _ => 0x0FFF_FFF8,
    };
    let cluster_at = |c: u64| data_start + (c - 2) * cs;

    let mut used = Ranges::default();
    let mut meta = Ranges::default();
    // Boot sector, FSInfo and backup boot (FAT32), every FAT copy, and the
    // fixed root directory of FAT12/16.
    used.push(0, data_start);
    meta.push(0, data_start);
    // Bad-cluster marks are not 0, so bad clusters count as used, as
    // fsck.fat counts them.
    for c in 2..clusters + 2 {
        if entry(c) != 0 {
            used.push(cluster_at(c), cluster_at(c) + cs);
        }
    }

    // Directories: the root, then every subdirectory found, each followed
    // through its cluster chain. A cluster reached twice is corruption.
    let mut visited = vec![0u64; (clusters + 2).div_ceil(64) as usize];
    let mut pending: Vec<Option<u64>> = vec![if is32 { Some(le32(&boot, 44)) } else { None }];
    while let Some(dir) = pending.pop() {
        let content = match dir {
            None => dev.read(
                (reserved + nfats * fat_size) * bps,
                root_sectors * bps,
                "FAT root directory",
            )?,
            Some(start) => {
                let mut content = Vec::new();
                let mut c = start;
                loop {
                    ensure!(
                        (2..clusters + 2).contains(&c),
                        "FAT directory starting at cluster {start} runs to cluster {c}, outside the volume"
                    );
                    let (w, b) = ((c / 64) as usize, c % 64);
                    ensure!(
                        visited[w] & (1 << b) == 0,
                        "FAT directory starting at cluster {start} reaches cluster {c} a second time"
                    );
                    visited[w] |= 1 << b;
                    meta.push(cluster_at(c), cluster_at(c) + cs);
                    content.extend(dev.read(cluster_at(c), cs, "FAT directory cluster")?);
                    ensure!(
                        content.len() <= 1 << 30,
                        "FAT directory starting at cluster {start} is implausibly long"
                    );
                    let next = entry(c);
                    if next >= eoc {
                        break;
                    }
                    c = next;
                }
                content
            }
        };
        for e in content.chunks_exact(32) {
            match e[0] {
                0 => break,
                0xE5 | b'.' => continue,
                _ => {}
            }
            let attr = e[11];
            if attr == 0x0F || attr & 0x08 != 0 || attr & 0x10 == 0 {
                continue;
            }
            let hi = if is32 { le16(e, 20) << 16 } else { 0 };
            let first = hi | le16(e, 26);
            if first != 0 {
                pending.push(Some(first));
            }
        }
    }
    Ok(finish(dev.size, cs, used, meta, format!("FAT{bits}")))
}

// ---------------------------------------------------------------- NTFS

fn ntfs_map(dev: &Dev) -> Result<UsedMap> {
    let file = dev.file.try_clone().context("duplicating the handle")?;
    // The ntfs crate validates what it reads, but a panic on some corrupt
    // structure must still end as an error.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ntfs_read(dev, file))) {
        Ok(result) => result,
        Err(_) => bail!("the NTFS structures are corrupt (the NTFS reader gave up)"),
    }
}

fn ntfs_read(dev: &Dev, file: File) -> Result<UsedMap> {
    use ntfs::{KnownNtfsFileRecordNumber as Known, Ntfs};

    let mut f = BufReader::new(file);
    let ntfs = Ntfs::new(&mut f).map_err(|e| anyhow!("NTFS boot sector: {e}"))?;
    let cs = u64::from(ntfs.cluster_size());
    let sector = u64::from(ntfs.sector_size());
    let clusters = ntfs.size() / cs;
    ensure!(clusters > 0, "NTFS volume has no clusters");
    let mut used = Ranges::default();
    let mut meta = Ranges::default();

    let mut bitmap = Vec::new();
    let bitmap_bytes = clusters.div_ceil(8);
    let runs = ntfs_data(&ntfs, &mut f, Known::Bitmap as u64, "$Bitmap", |chunk| {
        let room = (bitmap_bytes - bitmap.len() as u64).min(chunk.len() as u64);
        bitmap.extend_from_slice(&chunk[..room as usize]);
        Ok(bitmap.len() as u64 >= bitmap_bytes)
    })?;
    ensure!(
        bitmap.len() as u64 == bitmap_bytes,
        "NTFS $Bitmap holds {} bytes for {clusters} clusters",
        bitmap.len()
    );
    push_bit_runs(&bitmap, clusters, 0, cs, &mut used);
    meta.extend(&runs);

    // The boot sector, and the backup boot sector after the last cluster:
    // at the sector just past the volume as the boot sector counts it, which
    // is also the device's last sector when the two agree.
    let end = ntfs.size();
    for (start, stop) in [
        (0, cs),
        (end, end + sector),
        (dev.size.saturating_sub(sector), dev.size),
    ] {
        used.push(start, stop);
        meta.push(start, stop);
    }

    // The MFT, and from its records everything a reader needs to mount and
    // walk directories: the data of the system files ($MFT, $MFTMirr,
    // $LogFile, $AttrDef, $Bitmap, $Boot, $UpCase, $Secure), every
    // directory's index allocation and bitmap, and attribute lists.
    let record_size = u64::from(ntfs.file_record_size());
    ensure!(
        (256..=65536).contains(&record_size),
        "NTFS file records of {record_size} bytes"
    );
    let mut recno = 0u64;
    let mut carry: Vec<u8> = Vec::new();
    let mft_runs = ntfs_data(&ntfs, &mut f, Known::MFT as u64, "$MFT", |chunk| {
        carry.extend_from_slice(chunk);
        let whole = carry.len() / record_size as usize * record_size as usize;
        for rec in carry[..whole].chunks_exact(record_size as usize) {
            mft_record(rec, recno, cs, clusters, &mut meta)?;
            recno += 1;
        }
        carry.drain(..whole);
        Ok(false)
    })?;
    meta.extend(&mft_runs);
    Ok(finish(dev.size, cs, used, meta, "NTFS $Bitmap".into()))
}

/// The data runs (byte ranges, sparse runs left out) of the unnamed $DATA
/// of file record `record`, after passing its content in chunks to `each`
/// until that returns true.
fn ntfs_data(
    ntfs: &ntfs::Ntfs,
    f: &mut BufReader<File>,
    record: u64,
    what: &str,
    mut each: impl FnMut(&[u8]) -> Result<bool>,
) -> Result<Ranges> {
    use ntfs::attribute_value::NtfsAttributeValue;

    let file = ntfs
        .file(f, record)
        .map_err(|e| anyhow!("NTFS {what} file record: {e}"))?;
    let item = file
        .data(f, "")
        .ok_or_else(|| anyhow!("NTFS {what} has no data"))?
        .map_err(|e| anyhow!("NTFS {what} data attribute: {e}"))?;
    let attr = item
        .to_attribute()
        .map_err(|e| anyhow!("NTFS {what} data attribute: {e}"))?;
    let value = attr
        .value(f)
        .map_err(|e| anyhow!("NTFS {what} data: {e}"))?;
    let mut runs = Ranges::default();
    // With an attribute list, the runs are spread over extension records;
    // the MFT scan picks them up from there.
    if let NtfsAttributeValue::NonResident(v) = &value {
        for run in v.data_runs() {
            let run = run.map_err(|e| anyhow!("NTFS {what} data runs: {e}"))?;
            if let Some(pos) = run.data_position().value() {
                runs.push(pos.get(), pos.get().saturating_add(run.allocated_size()));
            }
        }
    }
    let mut reader = value.attach(f);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = reader
                .read(&mut buf[filled..])
                .with_context(|| format!("reading NTFS {what}"))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 || each(&buf[..filled])? || filled < buf.len() {
            break;
        }
    }
    Ok(runs)
}

/// Adds to `meta` the clusters one MFT record points at that a reader needs.
fn mft_record(raw: &[u8], recno: u64, cs: u64, clusters: u64, meta: &mut Ranges) -> Result<()> {
    if &raw[0..4] != b"FILE" || le16(raw, 0x16) & 1 == 0 {
        return Ok(());
    }
    let mut r = raw.to_vec();
    // Update sequence: the last two bytes of every 512-byte stride were
    // saved in the array at usa_ofs and replaced by the sequence number.
    let usa = le16(&r, 4) as usize;
    let count = le16(&r, 6) as usize;
    ensure!(
        count >= 1 && usa + 2 * count <= r.len() && (count - 1) * 512 <= r.len(),
        "NTFS MFT record {recno} has a corrupt update sequence"
    );
    for i in 1..count {
        let p = i * 512 - 2;
        ensure!(
            r[p..p + 2] == r[usa..usa + 2],
            "NTFS MFT record {recno} fails its update-sequence check (torn write)"
        );
        r[p] = r[usa + 2 * i];
        r[p + 1] = r[usa + 2 * i + 1];
    }
    let base = le64(&r, 0x20) & 0xFFFF_FFFF_FFFF;
    let owner = if base != 0 { base } else { recno };
    let limit = (le32(&r, 0x18) as usize).min(r.len());
    let mut off = le16(&r, 0x14) as usize;
    while off + 8 <= limit {
        let ty = le32(&r, off);
        if ty == 0xFFFF_FFFF {
            break;
        }
        let len = le32(&r, off + 4) as usize;
        ensure!(
            len >= 16 && off + len <= limit,
            "NTFS MFT record {recno}: attribute at offset {off} has an impossible length ({len})"
        );
        let wanted = match ty {
            // $ATTRIBUTE_LIST, $INDEX_ALLOCATION, $BITMAP
            0x20 | 0xA0 | 0xB0 => true,
            // $DATA of the system files, except $BadClus
            0x80 => owner < 16 && owner != 8,
            _ => false,
        };
        if wanted && r[off + 8] != 0 && len >= 0x40 {
            let runs = le16(&r, off + 0x20) as usize;
            ensure!(
                runs < len,
                "NTFS MFT record {recno}: data runs at offset {runs} of a {len}-byte attribute"
            );
            ntfs_runs(&r[off + runs..off + len], recno, cs, clusters, meta)?;
        }
        off += len;
    }
    Ok(())
}

/// Decodes an NTFS run list into byte ranges, sparse runs left out.
fn ntfs_runs(b: &[u8], recno: u64, cs: u64, clusters: u64, out: &mut Ranges) -> Result<()> {
    let mut lcn: i64 = 0;
    let mut i = 0;
    while i < b.len() && b[i] != 0 {
        let len_bytes = (b[i] & 0xF) as usize;
        let off_bytes = (b[i] >> 4) as usize;
        ensure!(
            (1..=8).contains(&len_bytes)
                && off_bytes <= 8
                && i + 1 + len_bytes + off_bytes <= b.len(),
            "NTFS MFT record {recno}: corrupt data run list"
        );
        let mut count = 0u64;
        for k in 0..len_bytes {
            count |= u64::from(b[i + 1 + k]) << (8 * k);
        }
        if off_bytes > 0 {
            let mut delta = 0u64;
            for k in 0..off_bytes {
                delta |= u64::from(b[i + 1 + len_bytes + k]) << (8 * k);
            }
            // Sign-extend the little-endian offset of `off_bytes` bytes.
            let shift = 64 - 8 * off_bytes as u32;
            let delta = ((delta << shift) as i64) >> shift;
            lcn = lcn
                .checked_add(delta)
                .ok_or_else(|| anyhow!("NTFS MFT record {recno}: data run overflows"))?;
            let start = u64::try_from(lcn).ok();
            ensure!(
                start.is_some_and(|s| s.checked_add(count).is_some_and(|e| e <= clusters)),
                "NTFS MFT record {recno}: data run of {count} clusters at {lcn} lies outside the volume ({clusters} clusters)"
            );
            let s = lcn as u64;
            out.push(s * cs, (s + count) * cs);
        }
        i += 1 + len_bytes + off_bytes;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::process::Command;

    const MIB: u64 = 1 << 20;
    /// The test file: 3 MiB, every 4 KiB block opening with its own marker.
    const MARKED_BLOCKS: usize = 768;

    fn run(cmd: &str, args: &[&str]) -> String {
        let out = Command::new(cmd)
            .args(args)
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn image(mib: u64) -> tempfile::NamedTempFile {
        let f = tempfile::Builder::new()
            .prefix("bmr-used-")
            .suffix(".img")
            .tempfile()
            .unwrap();
        f.as_file().set_len(mib * MIB).unwrap();
        f
    }

    fn path(f: &tempfile::NamedTempFile) -> &str {
        f.path().to_str().unwrap()
    }

    /// A mounted test filesystem, unmounted (and its loop device detached)
    /// when dropped, also when an assertion fails.
    struct Mounted {
        dir: tempfile::TempDir,
        loopdev: Option<String>,
    }

    impl Mounted {
        fn ext(img: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            run("mount", &["-o", "loop", img, dir.path().to_str().unwrap()]);
            Mounted { dir, loopdev: None }
        }

        /// ntfs-3g on a loop device: a fuseblk mount, whose unmount waits
        /// until ntfs-3g has written everything.
        fn ntfs(img: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let dev = run("losetup", &["-f", "--show", img]).trim().to_string();
            let m = Mounted {
                dir,
                loopdev: Some(dev.clone()),
            };
            run("ntfs-3g", &[&dev, m.dir.path().to_str().unwrap()]);
            m
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.dir.path()).status();
            if let Some(dev) = &self.loopdev {
                let _ = Command::new("losetup").args(["-d", dev]).status();
            }
        }
    }

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn marked_file() -> Vec<u8> {
        let mut v = noise(0x5eed, MARKED_BLOCKS * 4096);
        for k in 0..MARKED_BLOCKS {
            let m = format!("BMRMARK{k:08}");
            v[k * 4096..k * 4096 + m.len()].copy_from_slice(m.as_bytes());
        }
        v
    }

    fn find_all(hay: &[u8], needle: &[u8], align: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let mut i = 0;
        while i + needle.len() <= hay.len() {
            if hay[i] == needle[0] && &hay[i..i + needle.len()] == needle {
                out.push(i as u64);
            }
            i += align;
        }
        out
    }

    fn inside(ranges: &[Range<u64>], start: u64, len: u64) -> bool {
        ranges
            .iter()
            .any(|r| r.start <= start && start + len <= r.end)
    }

    fn total(ranges: &[Range<u64>]) -> u64 {
        ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Sorted, merged, non-empty, within the volume; metadata within used.
    fn check_shape(m: &UsedMap) {
        for list in [&m.used, &m.metadata] {
            for r in list.iter() {
                assert!(r.start < r.end && r.end <= m.size, "{r:?} in {m:?}");
            }
            for w in list.windows(2) {
                assert!(w[0].end < w[1].start, "{w:?} not sorted and merged");
            }
        }
        for r in &m.metadata {
            assert!(inside(&m.used, r.start, r.end - r.start), "{r:?} not used");
        }
        assert!(m.unit.is_power_of_two() && m.unit >= 512);
    }

    /// Every 4 KiB block of the marked file is found in the image, in `used`.
    fn check_markers(img: &Path, map: &UsedMap) {
        let data = std::fs::read(img).unwrap();
        let hits = find_all(&data, b"BMRMARK", 512);
        let mut seen = BTreeSet::new();
        for h in hits {
            assert!(
                inside(&map.used, h, 15),
                "file data at byte {h} not in used"
            );
            let n = &data[h as usize + 7..h as usize + 15];
            seen.insert(std::str::from_utf8(n).unwrap().parse::<usize>().unwrap());
        }
        assert_eq!(seen.len(), MARKED_BLOCKS, "markers found");
    }

    fn grew_by_file(before: &UsedMap, after: &UsedMap, slack: u64) {
        let grown = total(&after.used) - total(&before.used);
        let file = MARKED_BLOCKS as u64 * 4096;
        assert!(
            grown >= file && grown <= file + slack,
            "used grew by {grown} bytes for a {file}-byte file (slack {slack})"
        );
    }

    // ---------------------------------------------------------------- ext

    fn ext_reported(img: &str) -> u64 {
        let out = run("dumpe2fs", &["-h", img]);
        let field = |name: &str| -> u64 {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("dumpe2fs: no {name}"))
                .trim()
                .parse()
                .unwrap()
        };
        (field("Block count:") - field("Free blocks:")) * field("Block size:")
    }

    fn debugfs_blocks(img: &str, what: &str) -> Vec<u64> {
        run("debugfs", &["-R", &format!("blocks {what}"), img])
            .split_whitespace()
            .map(|b| b.parse().unwrap())
            .collect()
    }

    fn ext_case(mkfs: &str, args: &[&str], mib: u64, fstype: &str, source: &str) {
        let img = image(mib);
        let dev = path(&img);
        let mut a = vec!["-q", "-F"];
        a.extend(args);
        a.push(dev);
        run(mkfs, &a);
        let before = used_map(img.path(), fstype).unwrap();
        check_shape(&before);
        assert_eq!(before.source, source);
        assert_eq!(total(&before.used), ext_reported(dev), "empty {fstype}");
        {
            let m = Mounted::ext(dev);
            std::fs::write(m.path().join("big.bin"), marked_file()).unwrap();
            let dir = m.path().join("manydir");
            std::fs::create_dir(&dir).unwrap();
            for i in 0..300 {
                std::fs::File::create(dir.join(format!("bmr-entry-{i:04}"))).unwrap();
            }
        }
        let after = used_map(img.path(), fstype).unwrap();
        check_shape(&after);
        assert_eq!(total(&after.used), ext_reported(dev), "filled {fstype}");
        assert_eq!(after.unit, before.unit);
        // The file, its indirect blocks (ext2) and the directory's blocks.
        grew_by_file(&before, &after, 64 * 1024);
        check_markers(img.path(), &after);

        let bs = after.unit;
        let dir_blocks = debugfs_blocks(dev, "/manydir");
        assert!(dir_blocks.len() >= 2, "{dir_blocks:?}");
        for b in &dir_blocks {
            assert!(inside(&after.metadata, b * bs, bs), "directory block {b}");
        }
        // The name is in the directory's blocks, and perhaps in the
        // journal's copies of them, which are used but not metadata.
        let journal: BTreeSet<u64> = if fstype == "ext2" {
            BTreeSet::new()
        } else {
            debugfs_blocks(dev, "<8>").into_iter().collect()
        };
        let data = std::fs::read(dev).unwrap();
        let hits = find_all(&data, b"bmr-entry-0123", 4);
        assert!(hits.iter().any(|&h| inside(&after.metadata, h, 14)));
        for h in hits {
            assert!(
                inside(&after.metadata, h, 14) || journal.contains(&(h / bs)),
                "directory entry at byte {h} outside the metadata"
            );
            assert!(inside(&after.used, h, 14));
        }
        // The metadata holds superblock, descriptors, bitmaps, inode
        // tables: at least the inode table of group 0.
        assert!(total(&after.metadata) > 4 * bs);
    }

    #[test]
    fn ext4_4k_flex_bg() {
        // 8 MiB groups: several groups, most of them BLOCK_UNINIT with
        // their bitmaps and inode tables in group 0.
        ext_case(
            "mkfs.ext4",
            &["-b", "4096", "-g", "2048"],
            64,
            "ext4",
            "ext4 block bitmaps",
        );
    }

    #[test]
    fn ext4_without_flex_bg() {
        ext_case(
            "mkfs.ext4",
            &["-b", "4096", "-g", "2048", "-O", "^flex_bg"],
            64,
            "ext4",
            "ext4 block bitmaps",
        );
    }

    #[test]
    fn ext2_1k_blocks() {
        ext_case(
            "mkfs.ext2",
            &["-b", "1024"],
            32,
            "ext2",
            "ext2 block bitmaps",
        );
    }

    #[test]
    fn ext4_meta_bg() {
        // 256 groups of 256 KiB, 16 descriptors per block: 16 meta groups,
        // each with its own descriptor block and two backups.
        ext_case(
            "mkfs.ext4",
            &["-b", "1024", "-g", "256", "-O", "meta_bg,^resize_inode"],
            64,
            "ext4",
            "ext4 block bitmaps (meta_bg)",
        );
    }

    #[test]
    fn ext_corrupt_descriptor_is_an_error() {
        let img = image(32);
        run(
            "mkfs.ext4",
            &["-q", "-F", "-b", "4096", "-g", "2048", path(&img)],
        );
        let sb = std::fs::read(img.path()).unwrap()[1024..2048].to_vec();
        let ds = if le32(&sb, 0x60) & EXT_INCOMPAT_64BIT != 0 {
            le16(&sb, 0xFE)
        } else {
            32
        };
        img.as_file()
            .write_all_at(&0xFFFF_FFF0u32.to_le_bytes(), 4096 + 3 * ds)
            .unwrap();
        let err = used_map(img.path(), "ext4").unwrap_err().to_string();
        assert!(err.contains(path(&img)), "{err}");
        assert!(
            err.contains("ext4 group descriptor 3 points outside the volume"),
            "{err}"
        );
    }

    // ---------------------------------------------------------------- FAT

    fn fsck_fat(img: &str) -> String {
        run("fsck.fat", &["-n", "-v", img])
    }

    fn fat_data_start(img: &str) -> u64 {
        fsck_fat(img)
            .lines()
            .find_map(|l| l.strip_prefix("Data area starts at byte "))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Data area start plus used clusters, as fsck.fat counts them.
    fn fat_reported(img: &str) -> u64 {
        let out = fsck_fat(img);
        let cluster: u64 = out
            .lines()
            .find(|l| l.contains("bytes per cluster"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        // "IMG: 1 files, 1543/16343 clusters"
        let counts = out
            .lines()
            .rev()
            .find(|l| l.ends_with(" clusters"))
            .unwrap();
        let used: u64 = counts
            .rsplit(", ")
            .next()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        fat_data_start(img) + used * cluster
    }

    fn fat_case(bits: &str, mib: u64, source: &str) {
        let img = image(mib);
        let dev = path(&img);
        run("mkfs.vfat", &["-F", bits, dev]);
        let before = used_map(img.path(), "vfat").unwrap();
        check_shape(&before);
        assert_eq!(before.source, source);
        assert_eq!(total(&before.used), fat_reported(dev), "empty {source}");

        let tmp = tempfile::tempdir().unwrap();
        let big = tmp.path().join("BIG.BIN");
        std::fs::write(&big, marked_file()).unwrap();
        run("mcopy", &["-i", dev, big.to_str().unwrap(), "::BIG.BIN"]);
        run("mmd", &["-i", dev, "::MANY"]);
        let many = tmp.path().join("many");
        std::fs::create_dir(&many).unwrap();
        let mut args = vec!["-i".to_string(), dev.to_string()];
        for i in 0..300 {
            let f = many.join(format!("BMR{i:05}.TXT"));
            std::fs::File::create(&f).unwrap();
            args.push(f.to_str().unwrap().to_string());
        }
        args.push("::MANY/".into());
        run(
            "mcopy",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );

        let after = used_map(img.path(), "vfat").unwrap();
        check_shape(&after);
        assert_eq!(total(&after.used), fat_reported(dev), "filled {source}");
        // The file and the directory's clusters (300 entries of 32 bytes).
        grew_by_file(&before, &after, 32 * 1024);
        check_markers(img.path(), &after);
        let data = std::fs::read(dev).unwrap();
        let hits = find_all(&data, b"BMR00123TXT", 32);
        assert_eq!(hits.len(), 1);
        for h in hits {
            assert!(inside(&after.metadata, h, 11), "entry at byte {h}");
        }
        let dirs = find_all(&data, b"MANY       ", 32);
        assert!(!dirs.is_empty());
        for h in dirs {
            assert!(inside(&after.metadata, h, 11), "entry at byte {h}");
        }
        // Boot sector, FATs (and the root directory of FAT12/16) are metadata.
        let data_start = fat_data_start(dev);
        assert!(inside(&after.metadata, 0, data_start));
    }

    #[test]
    fn fat12() {
        fat_case("12", 8, "FAT12");
    }

    #[test]
    fn fat16() {
        fat_case("16", 32, "FAT16");
    }

    #[test]
    fn fat32() {
        fat_case("32", 64, "FAT32");
    }

    // ---------------------------------------------------------------- NTFS

    #[test]
    fn ntfs() {
        let img = image(64);
        let dev = path(&img);
        run("mkntfs", &["-q", "-F", "-Q", dev]);
        // $Bitmap's clusters plus the backup boot sector, which lies after
        // the last cluster.
        let reported = || crate::probe::fs::ntfs_usage(img.path()).unwrap().used + 512;
        let before = used_map(img.path(), "ntfs").unwrap();
        check_shape(&before);
        assert_eq!(before.source, "NTFS $Bitmap");
        assert_eq!(before.unit, 4096);
        assert_eq!(total(&before.used), reported());
        assert!(inside(&before.metadata, 0, 4096));
        assert!(inside(&before.metadata, before.size - 512, 512));
        {
            let m = Mounted::ntfs(dev);
            std::fs::write(m.path().join("big.bin"), marked_file()).unwrap();
            let dir = m.path().join("manydir");
            std::fs::create_dir(&dir).unwrap();
            for i in 0..300 {
                std::fs::File::create(dir.join(format!("bmr-entry-{i:04}"))).unwrap();
            }
        }
        let after = used_map(img.path(), "ntfs").unwrap();
        check_shape(&after);
        assert_eq!(total(&after.used), reported());
        // The file, the directory's index blocks and the MFT grown for 302
        // more records.
        grew_by_file(&before, &after, MIB);
        check_markers(img.path(), &after);
        // The name is in the file's MFT record and the directory's index.
        let name: Vec<u8> = "bmr-entry-0123"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let data = std::fs::read(dev).unwrap();
        let hits = find_all(&data, &name, 2);
        assert!(hits.len() >= 2, "{hits:?}");
        let in_index = |h: &u64| data[(h & !4095) as usize..].starts_with(b"INDX");
        let in_mft = |h: &u64| data[(h & !1023) as usize..].starts_with(b"FILE");
        assert!(hits.iter().any(in_index), "no index block names the file");
        assert!(hits.iter().any(in_mft), "no MFT record names the file");
        for h in hits {
            assert!(inside(&after.metadata, h, 28), "name at byte {h}");
        }
    }

    // ---------------------------------------------------------------- others

    #[test]
    fn swap_is_its_header() {
        let img = image(16);
        run("mkswap", &[path(&img)]);
        let m = used_map(img.path(), "swap").unwrap();
        assert_eq!(m.used, vec![0..4096]);
        assert_eq!(m.metadata, vec![0..4096]);
        assert_eq!((m.size, m.unit), (16 * MIB, 4096));
        assert_eq!(m.source, "swap header");
    }

    #[test]
    fn other_filesystems_are_read_whole() {
        let img = image(0);
        let size = 5 * MIB + 1000;
        img.as_file()
            .write_all_at(&noise(7, size as usize), 0)
            .unwrap();
        let m = used_map(img.path(), "xfs").unwrap();
        assert_eq!(m.used, vec![0..size]);
        assert!(m.metadata.is_empty());
        assert_eq!((m.size, m.unit), (size, 4096));
        assert_eq!(m.source, "whole device (xfs: no allocation reader)");
        // Random bytes are no filesystem: errors, not panics.
        for fs in ["ext4", "vfat", "ntfs"] {
            let err = used_map(img.path(), fs).unwrap_err().to_string();
            assert!(err.contains(path(&img)), "{err}");
        }
    }

    /// Random damage to the first structures of real filesystems gives maps
    /// or errors, never a panic or a hang. Half the damage goes to the
    /// structures read first (superblock and descriptors, boot sector and
    /// FAT, boot sector and the first MFT records), the rest anywhere in the
    /// first `span` bytes.
    #[test]
    fn damaged_filesystems_do_not_panic() {
        type Case<'a> = (&'a str, &'a [&'a str], &'a str, u64);
        let cases: [Case; 3] = [
            (
                "mkfs.ext4",
                &["-q", "-F", "-b", "1024", "-g", "1024"],
                "ext4",
                160 * 1024,
            ),
            ("mkfs.vfat", &["-F", "12"], "vfat", 64 * 1024),
            ("mkntfs", &["-q", "-F", "-Q"], "ntfs", 96 * 1024),
        ];
        for (k, (mkfs, args, fstype, span)) in cases.into_iter().enumerate() {
            let img = image(8);
            let mut a = args.to_vec();
            a.push(path(&img));
            run(mkfs, &a);
            let hot = match fstype {
                "ext4" => 1024..3072,
                "vfat" => 0..48,
                _ => {
                    let mut f = BufReader::new(File::open(img.path()).unwrap());
                    let mft = ntfs::Ntfs::new(&mut f)
                        .unwrap()
                        .mft_position()
                        .value()
                        .unwrap();
                    mft.get()..mft.get() + 16 * 1024
                }
            };
            let pristine = std::fs::read(img.path()).unwrap();
            let mut rng = noise(k as u64 + 11, 4096).into_iter().cycle();
            let mut next = || rng.next().unwrap() as u64;
            let (mut maps, mut errors) = (0, 0);
            for _ in 0..200 {
                let mut touched = Vec::new();
                for _ in 0..1 + next() % 4 {
                    let r = next() << 16 | next() << 8 | next();
                    let at = if next() % 2 == 0 {
                        hot.start + r % (hot.end - hot.start)
                    } else {
                        r % span
                    };
                    let value = match next() % 4 {
                        0 => 0,
                        1 => 0xFF,
                        2 => 1 << (next() % 8),
                        _ => next() as u8,
                    };
                    img.as_file().write_all_at(&[value], at).unwrap();
                    touched.push(at);
                }
                match used_map(img.path(), fstype) {
                    Ok(m) => {
                        check_shape(&m);
                        maps += 1;
                    }
                    Err(e) => {
                        assert!(e.to_string().starts_with(path(&img)), "{e}");
                        errors += 1;
                    }
                }
                for at in touched {
                    img.as_file()
                        .write_all_at(&pristine[at as usize..at as usize + 1], at)
                        .unwrap();
                }
            }
            eprintln!("damaged {fstype}: {maps} maps, {errors} errors");
            assert!(errors > 0, "{fstype}: no damage was noticed");
        }
    }

    #[test]
    fn ranges_merge_and_intersect() {
        let mut r = Ranges::default();
        r.push(10, 20);
        r.push(20, 30);
        r.push(5, 8);
        r.push(25, 40);
        r.push(50, 50);
        r.push(90, 200);
        assert_eq!(r.normalise(100), vec![5..8, 10..40, 90..100]);
        assert_eq!(
            intersect(&[0..10, 20..30], &[5..25, 28..40]),
            vec![5..10, 20..25, 28..30]
        );
        let mut out = Ranges::default();
        push_bit_runs(&[0b1111_0001, 0xFF, 0x00, 0x01], 25, 100, 10, &mut out);
        assert_eq!(out.normalise(1000), vec![100..110, 140..260, 340..350]);
    }
}
