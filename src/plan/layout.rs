//! One target disk: its table type, where every partition lands and how big
//! each volume becomes. Boot-critical volumes are sized first; data volumes
//! are dropped, lowest priority first, when the minimums do not all fit.

use uuid::{uuid, Uuid};

use super::{
    Action, Adjust, Dropped, PlanError, PlannedPartition, Policy, Sizing, TargetDisk, TargetPlan,
    VolumePlan, MIB,
};
use crate::manifest::{Firmware, Manifest, MbrKind, Partition, Role, TableType, Volume};
use crate::probe::disks::partition_name;
use crate::report::size;

pub const BIOS_BOOT: Uuid = uuid!("21686148-6449-6E6F-744E-656564454649");
const GPT_LINUX: Uuid = uuid!("0FC63DAF-8483-4772-8E79-3D69D8477DE4");
const GPT_SWAP: Uuid = uuid!("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F");
const GPT_BASIC_DATA: Uuid = uuid!("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7");
const GPT_ESP: Uuid = uuid!("C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
const GPT_LVM: Uuid = uuid!("E6D6D379-F507-44C2-A23C-238F2A3DF928");
const GPT_RAID: Uuid = uuid!("A19D880F-05FC-4D3B-A006-743F0F84911E");
/// GPT's partition entry array, reserved at both ends of the disk.
const GPT_ENTRIES: u64 = 16384;

/// Restore priority of a volume: ESP, boot, system, data in saved order, swap.
pub fn priority(m: &Manifest, id: &str) -> (u8, usize) {
    let idx = m
        .volumes
        .iter()
        .position(|v| v.id == id)
        .unwrap_or(usize::MAX);
    (m.volumes.get(idx).map_or(u8::MAX, |v| v.role.rank()), idx)
}

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn round_down(x: u64, a: u64) -> u64 {
    x / a * a
}

/// Partitions start on 1 MiB boundaries, which are also physical-sector boundaries.
fn align_of(t: &TargetDisk) -> u64 {
    MIB.max(u64::from(t.physical_sector_size))
        .max(u64::from(t.logical_sector_size))
}

/// First and last usable byte (aligned) for partitions.
fn bounds(t: &TargetDisk, table: TableType) -> (u64, u64) {
    let align = align_of(t);
    let sector = u64::from(t.logical_sector_size);
    let end = match table {
        TableType::Gpt => t
            .size_bytes
            .saturating_sub(sector + round_up(GPT_ENTRIES, sector)),
        _ => t.size_bytes,
    };
    (align, round_down(end, align).max(align))
}

/// Space a target offers for partitions (assuming GPT, the larger overhead).
pub fn usable_bytes(t: &TargetDisk) -> u64 {
    let (s, e) = bounds(t, TableType::Gpt);
    e - s
}

pub fn saved_parts(m: &Manifest, s: usize) -> Vec<&Partition> {
    let id = &m.disks[s].id;
    let mut parts: Vec<&Partition> = m
        .partitions
        .iter()
        .filter(|p| &p.disk == id && p.mbr_kind != Some(MbrKind::Extended))
        .collect();
    parts.sort_by_key(|p| p.number);
    parts
}

/// The least a saved disk's partitions need: each volume's minimum, other
/// partitions as they were. Comparable with `usable_bytes`, which already
/// leaves out the leading gap and the backup GPT.
pub fn demand(m: &Manifest, s: usize) -> u64 {
    saved_parts(m, s)
        .iter()
        .map(|p| {
            round_up(
                p.volume
                    .as_deref()
                    .and_then(|v| m.volume(v))
                    .map_or(p.size_bytes, |v| v.min_size_bytes),
                MIB,
            ) + ebr_gap(p)
        })
        .sum::<u64>()
}

/// What a saved disk's partitions took.
pub fn ideal(m: &Manifest, s: usize) -> u64 {
    saved_parts(m, s)
        .iter()
        .map(|p| round_up(p.size_bytes, MIB) + ebr_gap(p))
        .sum::<u64>()
}

/// A logical partition's EBR takes an alignment step before it.
fn ebr_gap(p: &Partition) -> u64 {
    if p.mbr_kind == Some(MbrKind::Logical) {
        MIB
    } else {
        0
    }
}

fn gpt_type_for_mbr(t: u8) -> Uuid {
    match t {
        0x82 => GPT_SWAP,
        0xEF => GPT_ESP,
        0x8E => GPT_LVM,
        0xFD => GPT_RAID,
        0x01 | 0x04 | 0x06 | 0x07 | 0x0B | 0x0C | 0x0E => GPT_BASIC_DATA,
        _ => GPT_LINUX,
    }
}

fn parse_hex(s: &Option<String>) -> Option<u64> {
    s.as_deref()
        .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
}

/// A GUID that is new on every manifest but the same on every run of the
/// same plan (plans are deterministic).
fn derived_guid(m: &Manifest, what: &str) -> Uuid {
    let h = blake3::hash(
        format!(
            "{}:{}:{what}",
            m.manifest.checksum.as_deref().unwrap_or(""),
            m.system.hostname
        )
        .as_bytes(),
    );
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.as_bytes()[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

struct Item<'m> {
    part: Option<&'m Partition>,
    vol: Option<&'m Volume>,
    size: u64,
    dropped: bool,
    kind: Option<MbrKind>,
    number: u32,
    start: u64,
}

pub struct Out {
    pub target: TargetPlan,
    pub volumes: Vec<VolumePlan>,
    pub dropped: Vec<Dropped>,
}

fn choose_table(m: &Manifest, t: &TargetDisk, saved: &[usize]) -> (TableType, String) {
    let kinds: Vec<TableType> = saved
        .iter()
        .map(|&s| m.disks[s].table)
        .filter(|k| *k != TableType::None)
        .collect();
    let mbr_limit = (1u64 << 32) * u64::from(t.logical_sector_size);
    if kinds.iter().all(|k| *k == TableType::Mbr) && !kinds.is_empty() {
        if t.size_bytes > mbr_limit {
            return (
                TableType::Gpt,
                format!(
                    "saved as MBR, but {} ({}) is larger than the {} MBR can address: GPT",
                    t.device,
                    size(t.size_bytes),
                    size(mbr_limit)
                ),
            );
        }
        return (TableType::Mbr, "MBR, as saved".into());
    }
    if kinds.iter().all(|k| *k == TableType::Gpt) {
        return (TableType::Gpt, "GPT, as saved".into());
    }
    (
        TableType::Gpt,
        "GPT: consolidates disks saved with GPT and MBR".into(),
    )
}

pub fn layout(
    m: &Manifest,
    t: &TargetDisk,
    saved: &[usize],
    policy: Policy,
    adjust: &Adjust,
    warnings: &mut Vec<String>,
) -> Result<Out, PlanError> {
    let align = align_of(t);
    let (table, mut reason) = choose_table(m, t, saved);
    let single = if saved.len() == 1 {
        Some(&m.disks[saved[0]])
    } else {
        None
    };
    let converted =
        table == TableType::Gpt && saved.iter().any(|&s| m.disks[s].table == TableType::Mbr);

    let mut items: Vec<Item> = Vec::new();
    let needs_bios_boot = converted
        && m.system.firmware == Firmware::Bios
        && !m.partitions.iter().any(|p| p.type_guid == Some(BIOS_BOOT));
    if needs_bios_boot {
        reason.push_str("; a 1 MiB BIOS boot partition is added for GRUB on GPT");
        items.push(Item {
            part: None,
            vol: None,
            size: MIB,
            dropped: false,
            kind: None,
            number: 0,
            start: 0,
        });
    }
    for &s in saved {
        for p in saved_parts(m, s) {
            let vol = p.volume.as_deref().and_then(|v| m.volume(v));
            items.push(Item {
                part: Some(p),
                vol,
                size: round_up(p.size_bytes, align),
                dropped: false,
                kind: None,
                number: 0,
                start: 0,
            });
        }
    }

    let keep_numbers = single.is_some_and(|d| d.table == table) && !needs_bios_boot;
    assign_kinds(&mut items, table, keep_numbers);
    let (start, end) = bounds(t, table);
    let room = end - start;

    let exact = single.is_some_and(|d| {
        d.size_bytes == t.size_bytes
            && d.logical_sector_size == t.logical_sector_size
            && d.table == table
            && !needs_bios_boot
    }) && items.iter().all(|i| {
        i.part
            .is_some_and(|p| p.start_bytes % align == 0 && p.start_bytes >= start)
            && !i.vol.is_some_and(|v| adjust.touches(&v.id))
    });
    let mut dropped = Vec::new();
    if exact {
        reason.push_str("; same size as the saved disk: the saved layout is kept as it was");
        for i in &mut items {
            if let Some(p) = i.part {
                i.start = p.start_bytes;
                i.size = p.size_bytes;
            }
        }
    } else {
        size_items(m, t, &mut items, room, align, policy, adjust, &mut dropped)?;
        place(&mut items, start, align);
    }
    if table == TableType::Mbr {
        // The kernel numbers logical partitions by their place in the EBR
        // chain (5, 6, ... without gaps), whatever was dropped before them.
        let logical = items
            .iter_mut()
            .filter(|i| !i.dropped && i.kind == Some(MbrKind::Logical));
        for (n, i) in (5..).zip(logical) {
            i.number = n;
        }
    }

    let mut partitions = Vec::new();
    let disk_name = |n: u32| format!("/dev/{}", partition_name(&t.name, n));
    for i in items.iter().filter(|i| !i.dropped) {
        let p = i.part;
        let (type_guid, guid, name, attributes) = match (table, p) {
            (TableType::Gpt, Some(p)) if p.type_guid.is_some() => (
                p.type_guid,
                p.guid,
                p.name.clone(),
                parse_hex(&p.attributes),
            ),
            (TableType::Gpt, Some(p)) => {
                let mbr = parse_hex(&p.mbr_type).unwrap_or(0x83) as u8;
                let name = p.volume.clone().unwrap_or_default();
                (
                    Some(gpt_type_for_mbr(mbr)),
                    Some(derived_guid(m, &format!("{}:{}", p.disk, p.number))),
                    name,
                    None,
                )
            }
            (TableType::Gpt, None) => (
                Some(BIOS_BOOT),
                Some(derived_guid(m, "bios-boot")),
                "BIOS boot".to_string(),
                None,
            ),
            _ => (None, None, String::new(), None),
        };
        let (mbr_type, bootable) = match (table, p) {
            (TableType::Mbr, Some(p)) => (parse_hex(&p.mbr_type).map(|t| t as u8), p.bootable),
            _ => (None, false),
        };
        partitions.push(PlannedPartition {
            number: i.number,
            device: disk_name(i.number),
            start_bytes: i.start,
            size_bytes: i.size,
            type_guid,
            guid,
            name,
            attributes,
            mbr_type,
            mbr_kind: i.kind,
            bootable,
            volume: i.vol.map(|v| v.id.clone()),
            from: p.map(|p| format!("{}:{}", p.disk, p.number)),
        });
    }
    if let Some(ext) = extended(m, &items, single, align, exact) {
        partitions.push(PlannedPartition {
            device: disk_name(ext.number),
            ..ext
        });
    }
    partitions.sort_by_key(|p| p.number);

    for i in items.iter().filter(|i| !i.dropped) {
        if let (Some(p), Some(v)) = (i.part, i.vol) {
            if p.number != i.number || saved.len() > 1 {
                warnings.push(format!(
                    "{}: was partition {} of {}, now {}; references to device names (fstab) must follow",
                    v.id,
                    p.number,
                    p.disk,
                    disk_name(i.number)
                ));
            }
        }
    }

    let volumes = items
        .iter()
        .filter_map(|i| i.vol.map(|v| (i, v)))
        .map(|(i, v)| {
            volume_plan(
                t,
                i,
                v,
                policy,
                adjust.size_of(&v.id),
                &disk_name(i.number),
                dropped.iter().find(|d: &&Dropped| d.id == v.id),
            )
        })
        .collect();

    let (guid, signature) = match table {
        TableType::Gpt => (
            Some(
                single
                    .and_then(|d| d.guid)
                    .unwrap_or_else(|| derived_guid(m, &t.device)),
            ),
            None,
        ),
        TableType::Mbr => (
            None,
            saved.iter().find_map(|&s| m.disks[s].signature.clone()),
        ),
        TableType::None => (None, None),
    };
    let target = TargetPlan {
        device: t.device.clone(),
        name: t.name.clone(),
        size_bytes: t.size_bytes,
        logical_sector_size: t.logical_sector_size,
        physical_sector_size: t.physical_sector_size,
        wwn: t.wwn.clone(),
        serial: t.serial.clone(),
        saved: saved.iter().map(|&s| m.disks[s].id.clone()).collect(),
        table,
        guid,
        signature,
        partitions,
        reason,
    };
    Ok(Out {
        target,
        volumes,
        dropped,
    })
}

/// Partition numbers and, for MBR, which are logical.
fn assign_kinds(items: &mut [Item], table: TableType, keep_numbers: bool) {
    if keep_numbers {
        for i in items.iter_mut() {
            let p = i.part.expect("kept numbering has no added partitions");
            i.number = p.number;
            i.kind = if table == TableType::Mbr {
                Some(p.mbr_kind.unwrap_or(MbrKind::Primary))
            } else {
                None
            };
        }
        // Logicals sit together at the end, inside one extended partition.
        items.sort_by_key(|i| (i.kind == Some(MbrKind::Logical), i.number));
        return;
    }
    let many = table == TableType::Mbr && items.len() > 4;
    for (n, i) in items.iter_mut().enumerate() {
        let n = n as u32;
        (i.number, i.kind) = match table {
            TableType::Mbr if many && n >= 3 => (n + 2, Some(MbrKind::Logical)),
            TableType::Mbr => (n + 1, Some(MbrKind::Primary)),
            _ => (n + 1, None),
        };
    }
}

fn vol<'m>(items: &[Item<'m>], i: usize) -> &'m Volume {
    items[i].vol.expect("only volume items are ordered")
}

#[allow(clippy::too_many_arguments)]
fn size_items(
    m: &Manifest,
    t: &TargetDisk,
    items: &mut [Item],
    room: u64,
    align: u64,
    policy: Policy,
    adjust: &Adjust,
    dropped: &mut Vec<Dropped>,
) -> Result<(), PlanError> {
    // Each logical partition costs its EBR's alignment step too; dropping it frees both.
    let ebr = |i: &Item| {
        if i.kind == Some(MbrKind::Logical) {
            align
        } else {
            0
        }
    };
    let fixed: u64 = items
        .iter()
        .filter(|i| i.vol.is_none())
        .map(|i| i.size + ebr(i))
        .sum();
    let budget = room.saturating_sub(fixed);
    // A size the operator asked for is exactly what the volume gets.
    let min = |v: &Volume| match adjust.size_of(&v.id) {
        Some(s) => round_up(s.max(align), align),
        None => round_up(v.min_size_bytes.max(align), align),
    };
    for i in items.iter_mut() {
        if let Some(v) = i.vol.filter(|v| adjust.excluded(&v.id)) {
            i.dropped = true;
            dropped.push(Dropped {
                id: v.id.clone(),
                role: v.role,
                needed_bytes: round_up(v.min_size_bytes.max(align), align),
                reason: "excluded by the operator".into(),
            });
        }
    }
    let mut order: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].vol.is_some() && !items[i].dropped)
        .collect();
    order.sort_by_key(|&i| priority(m, &items[i].vol.map(|v| v.id.clone()).unwrap_or_default()));

    let critical: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&i| vol(items, i).role.is_critical())
        .collect();
    let need: u64 = critical
        .iter()
        .map(|&i| min(vol(items, i)) + ebr(&items[i]))
        .sum();
    if need > budget {
        if let Some(e) = asked_too_big(items, &critical, adjust, budget, need, align, t) {
            return Err(e);
        }
        let list: Vec<String> = critical
            .iter()
            .map(|&i| format!("{} {}", vol(items, i).id, size(min(vol(items, i)))))
            .collect();
        return Err(PlanError::CriticalTooBig(format!(
            "{} ({}) cannot hold the boot-critical volumes: they need {} = {} MiB ({}) but only {} = {} MiB is usable after partition tables, alignment and other partitions; use a larger disk",
            t.device,
            size(t.size_bytes),
            size(need),
            need / MIB,
            list.join(", "),
            size(budget),
            budget / MIB
        )));
    }
    for &i in &order {
        items[i].size = min(vol(items, i));
    }
    let mut total: u64 = order.iter().map(|&i| items[i].size + ebr(&items[i])).sum();
    // Room for an asked-for size is never made by dropping another volume:
    // only what would not fit anyway (the asked volumes at their minimum)
    // is dropped, and never an asked one.
    let extra: u64 = order
        .iter()
        .filter_map(|&i| {
            let v = vol(items, i);
            adjust
                .size_of(&v.id)
                .map(|_| items[i].size - round_up(v.min_size_bytes.max(align), align))
        })
        .sum();
    if total > budget && total - extra <= budget {
        if let Some(e) = asked_too_big(items, &order, adjust, budget, total, align, t) {
            return Err(e);
        }
    }
    for &i in order.iter().rev() {
        if total <= budget {
            break;
        }
        let v = vol(items, i);
        if v.role.is_critical() || adjust.size_of(&v.id).is_some() {
            continue;
        }
        total -= items[i].size + ebr(&items[i]);
        items[i].dropped = true;
        dropped.push(Dropped {
            id: v.id.clone(),
            role: v.role,
            needed_bytes: items[i].size,
            reason: format!(
                "not enough room on {}: {} usable, and the volumes before it in priority already need {}",
                t.device,
                size(budget),
                size(total)
            ),
        });
    }
    if total > budget {
        // Only asked-for sizes can leave it over: the rest was dropped.
        return Err(
            asked_too_big(items, &order, adjust, budget, total, align, t).unwrap_or_else(|| {
                PlanError::Adjust(format!("the volumes do not fit on {}", t.device))
            }),
        );
    }
    let mut spare = budget - total;
    let kept: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&i| !items[i].dropped && adjust.size_of(&vol(items, i).id).is_none())
        .collect();
    // Up to the saved size: boot-critical volumes first, then the rest in priority order.
    for pass_critical in [true, false] {
        let pass: Vec<usize> = kept
            .iter()
            .copied()
            .filter(|&i| vol(items, i).role.is_critical() == pass_critical)
            .collect();
        for i in pass {
            let goal = round_up(vol(items, i).size_bytes, align);
            let add = goal
                .saturating_sub(items[i].size)
                .min(round_down(spare, align));
            items[i].size += add;
            spare -= add;
        }
    }
    let mut growable: Vec<usize> = kept
        .iter()
        .copied()
        .filter(|&i| matches!(vol(items, i).role, Role::System | Role::Data))
        .collect();
    growable.sort();
    match policy.sizing {
        Sizing::Keep => {}
        Sizing::GrowLast => {
            if let Some(&last) = growable.last() {
                items[last].size += round_down(spare, align);
            }
        }
        Sizing::Proportional => {
            let weights: u128 = growable
                .iter()
                .map(|&i| u128::from(vol(items, i).size_bytes))
                .sum();
            let pool = spare;
            for &i in &growable {
                let share = (u128::from(pool) * u128::from(vol(items, i).size_bytes)
                    / weights.max(1)) as u64;
                let add = round_down(share, align).min(round_down(spare, align));
                items[i].size += add;
                spare -= add;
            }
            if let Some(&last) = growable.last() {
                items[last].size += round_down(spare, align);
            }
        }
    }
    Ok(())
}

/// The error for an asked-for size that leaves `total` over `budget`,
/// naming the most that volume could have.
fn asked_too_big(
    items: &[Item],
    order: &[usize],
    adjust: &Adjust,
    budget: u64,
    total: u64,
    align: u64,
    t: &TargetDisk,
) -> Option<PlanError> {
    let &i = order
        .iter()
        .find(|&&i| adjust.size_of(&vol(items, i).id).is_some())?;
    let v = vol(items, i);
    let asked = round_up(adjust.size_of(&v.id)?.max(align), align);
    let most = round_down(budget.saturating_sub(total.saturating_sub(asked)), align);
    Some(PlanError::Adjust(format!(
        "{}: {} does not fit on {}; at most {}",
        v.id,
        size(asked),
        t.device,
        size(most)
    )))
}

fn place(items: &mut [Item], start: u64, align: u64) {
    let mut pos = start;
    for i in items.iter_mut().filter(|i| !i.dropped) {
        if i.kind == Some(MbrKind::Logical) {
            pos += align;
        }
        i.start = pos;
        pos += i.size;
    }
}

/// The extended partition around the logical ones, when there are any.
fn extended(
    m: &Manifest,
    items: &[Item],
    single: Option<&crate::manifest::Disk>,
    align: u64,
    exact: bool,
) -> Option<PlannedPartition> {
    let logical: Vec<&Item> = items
        .iter()
        .filter(|i| !i.dropped && i.kind == Some(MbrKind::Logical))
        .collect();
    let first = logical.iter().map(|i| i.start).min()?;
    let end = logical.iter().map(|i| i.start + i.size).max()?;
    let saved = single.and_then(|d| {
        m.partitions
            .iter()
            .find(|p| p.disk == d.id && p.mbr_kind == Some(MbrKind::Extended))
    });
    let (start_bytes, size_bytes) = match saved {
        // The same disk keeps its layout, the extended partition included.
        Some(p) if exact => (p.start_bytes, p.size_bytes),
        _ => (first - align, end - (first - align)),
    };
    Some(PlannedPartition {
        number: saved.map_or(4, |p| p.number),
        device: String::new(),
        start_bytes,
        size_bytes,
        type_guid: None,
        guid: None,
        name: String::new(),
        attributes: None,
        mbr_type: Some(
            saved
                .and_then(|p| parse_hex(&p.mbr_type))
                .map_or(0x05, |t| t as u8),
        ),
        mbr_kind: Some(MbrKind::Extended),
        bootable: false,
        volume: None,
        from: saved.map(|p| format!("{}:{}", p.disk, p.number)),
    })
}

fn volume_plan(
    t: &TargetDisk,
    i: &Item,
    v: &Volume,
    policy: Policy,
    asked: Option<u64>,
    device: &str,
    dropped: Option<&Dropped>,
) -> VolumePlan {
    let mut plan = VolumePlan {
        id: v.id.clone(),
        role: v.role,
        filesystem: v.filesystem.clone(),
        uuid: v.uuid.clone(),
        label: v.label.clone(),
        action: Action::Drop,
        target_device: String::new(),
        target_disk: t.device.clone(),
        partition_number: 0,
        start_bytes: 0,
        size_bytes: 0,
        saved_size_bytes: v.size_bytes,
        min_size_bytes: v.min_size_bytes,
        used_bytes: v.used_bytes,
        reason: String::new(),
    };
    if let Some(d) = dropped {
        plan.reason = d.reason.clone();
        return plan;
    }
    plan.target_device = device.to_string();
    plan.partition_number = i.number;
    plan.start_bytes = i.start;
    plan.size_bytes = i.size;
    let intact = t.existing.iter().any(|e| {
        e.start_bytes == i.start
            && e.size_bytes == i.size
            && !v.uuid.is_empty()
            && e.uuid.eq_ignore_ascii_case(&v.uuid)
            && e.filesystem == v.filesystem
    });
    let block = u64::from(v.block_size.unwrap_or(0));
    let sector = u64::from(t.logical_sector_size);
    (plan.action, plan.reason) = if policy.keep_intact && intact && !v.role.is_critical() {
        (Action::Skip, format!("already intact on {device} (same UUID, start and size); kept as --keep-intact asks"))
    } else if v.role == Role::Swap {
        (
            Action::Create,
            "swap holds nothing to restore: made new with its UUID and label".into(),
        )
    } else if block != 0 && block < sector {
        (
            Action::RestoreFiles,
            format!("{} has {sector}-byte sectors, larger than the filesystem's {block}-byte blocks: new filesystem, files copied", t.device),
        )
    } else if i.size >= v.size_bytes {
        let how = if i.size > v.size_bytes {
            format!("then grown from {} to {}", size(v.size_bytes), size(i.size))
        } else {
            "same size".to_string()
        };
        (Action::RestoreImage, format!("fits: image restored, {how}"))
    } else {
        (
            Action::RestoreFiles,
            format!("{} is smaller than the filesystem ({}) but holds its data (minimum {}): new filesystem, files copied", size(i.size), size(v.size_bytes), size(v.min_size_bytes)),
        )
    };
    if asked.is_some() && matches!(plan.action, Action::RestoreImage | Action::RestoreFiles) {
        plan.reason = format!(
            "size set by the operator: {}; {}",
            size(i.size),
            plan.reason
        );
    }
    plan
}
