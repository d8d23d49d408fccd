//! Tests of the planner: property tests over random manifests and target
//! disk sets (the invariants every plan must keep), and scenario tests with
//! exact values for the cases issue 3 names.
//!
//! Manifests are made with `build` from compact disk/volume specs, laid out
//! contiguously from 1 MiB the way a partitioning tool would; every one is
//! checked with `manifest::validate` before it is planned.

use std::collections::HashSet;

use proptest::prelude::*;
use uuid::{uuid, Uuid};

use super::*;
use crate::manifest::{
    validate, Disk, Firmware, Manifest, MbrKind, Partition, Role, TableType, Volume,
};
use crate::report::size;

const KIB: u64 = 1024;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

const GPT_ESP: Uuid = uuid!("C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
const GPT_LINUX: Uuid = uuid!("0FC63DAF-8483-4772-8E79-3D69D8477DE4");
const GPT_SWAP: Uuid = uuid!("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F");
const GPT_BASIC_DATA: Uuid = uuid!("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7");
const GPT_BIOS_BOOT: Uuid = uuid!("21686148-6449-6E6F-744E-656564454649");
const GPT_MSR: Uuid = uuid!("E3C9E316-0B5C-4DB8-817D-F92DF00215AE");

fn up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

// ---------------------------------------------------------------------------
// Building manifests and targets
// ---------------------------------------------------------------------------

/// A volume to lay out. An empty `id` makes a partition without a volume
/// (BIOS boot when 1 MiB, otherwise a vendor/MSR partition).
#[derive(Debug, Clone)]
struct Vs {
    id: String,
    role: Role,
    fs: String,
    size: u64,
    used: Option<u64>,
    min: u64,
    block: Option<u32>,
}

/// A volume of `size` bytes that needs at least `min` (half of it used).
fn vs(id: &str, role: Role, fs: &str, size: u64, min: u64) -> Vs {
    Vs {
        id: id.into(),
        role,
        fs: fs.into(),
        size,
        used: (fs != "swap").then_some(min / 2),
        min,
        block: Some(4096),
    }
}

/// A partition of `size` bytes that holds no volume.
fn raw(size: u64) -> Vs {
    Vs {
        id: String::new(),
        role: Role::Data,
        fs: String::new(),
        size,
        used: None,
        min: 0,
        block: None,
    }
}

/// A saved disk. `size` 0: just large enough for its partitions.
#[derive(Debug, Clone)]
struct Ds {
    id: String,
    size: u64,
    ls: u32,
    ps: u32,
    table: TableType,
    wwn: String,
    serial: String,
    vols: Vec<Vs>,
}

fn disk(id: &str, table: TableType, size: u64, vols: Vec<Vs>) -> Ds {
    Ds {
        id: id.into(),
        size,
        ls: 512,
        ps: 512,
        table,
        wwn: String::new(),
        serial: String::new(),
        vols,
    }
}

fn gpt_type(v: &Vs) -> Uuid {
    if v.id.is_empty() {
        return if v.size == MIB {
            GPT_BIOS_BOOT
        } else {
            GPT_MSR
        };
    }
    match (v.role, v.fs.as_str()) {
        (Role::Esp, _) => GPT_ESP,
        (Role::Swap, _) => GPT_SWAP,
        (_, "vfat" | "ntfs") => GPT_BASIC_DATA,
        _ => GPT_LINUX,
    }
}

fn mbr_type(v: &Vs) -> u8 {
    if v.id.is_empty() {
        return 0x12;
    }
    match (v.role, v.fs.as_str()) {
        (Role::Esp, _) => 0xef,
        (Role::Swap, _) => 0x82,
        (_, "vfat") => 0x0c,
        (_, "ntfs") => 0x07,
        _ => 0x83,
    }
}

/// A manifest (header, system, commands, hardware from `sample()`) whose
/// disks, partitions and volumes are `disks`, laid out contiguously from 1 MiB
/// with MiB-aligned starts. MBR disks with more than four partitions get
/// three primaries, then an extended partition (number 4) holding logicals
/// 5, 6, ..., each 1 MiB after the end of the one before (room for its EBR).
fn build(firmware: Firmware, disks: &[Ds]) -> Manifest {
    let mut m = crate::manifest::tests::sample();
    m.system.firmware = firmware;
    m.disks.clear();
    m.partitions.clear();
    m.volumes.clear();
    for (di, d) in disks.iter().enumerate() {
        let ls = u64::from(d.ls);
        let mbr = d.table == TableType::Mbr;
        let logical_from = if mbr && d.vols.len() > 4 {
            3
        } else {
            usize::MAX
        };
        let mut pos = MIB;
        let mut ext_start = 0;
        let mut bootable_given = false;
        for (k, v) in d.vols.iter().enumerate() {
            let logical = k >= logical_from;
            if k == logical_from {
                ext_start = pos;
            }
            let start = if logical { pos + MIB } else { pos };
            let number = if logical { k as u32 + 2 } else { k as u32 + 1 };
            assert_eq!(
                v.size % ls,
                0,
                "{}: size is not a multiple of the sector size",
                v.id
            );
            let volume = (!v.id.is_empty()).then(|| v.id.clone());
            let bootable = mbr
                && !bootable_given
                && matches!(v.role, Role::Boot | Role::System)
                && volume.is_some();
            bootable_given |= bootable;
            m.partitions.push(Partition {
                disk: d.id.clone(),
                number,
                start_bytes: start,
                size_bytes: v.size,
                type_guid: (!mbr).then(|| gpt_type(v)),
                guid: (!mbr).then(|| {
                    Uuid::from_u128(
                        0x5eed_0000_0000_4000_8000_0000_0000_0000
                            | ((di as u128) << 32)
                            | u128::from(number),
                    )
                }),
                name: if mbr {
                    String::new()
                } else {
                    volume.clone().unwrap_or_else(|| "reserved".into())
                },
                attributes: None,
                mbr_type: mbr.then(|| format!("0x{:02x}", mbr_type(v))),
                mbr_kind: mbr.then_some(if logical {
                    MbrKind::Logical
                } else {
                    MbrKind::Primary
                }),
                bootable,
                volume: volume.clone(),
            });
            pos = up(start + v.size, MIB);
            if let Some(id) = volume {
                m.volumes.push(Volume {
                    id: id.clone(),
                    filesystem: v.fs.clone(),
                    uuid: format!("{di:08x}-1111-4222-8333-{k:012x}"),
                    label: id.clone(),
                    mountpoint: String::new(),
                    role: v.role,
                    size_bytes: v.size,
                    used_bytes: v.used,
                    min_size_bytes: v.min,
                    block_size: v.block,
                    image: (v.role != Role::Swap).then(|| format!("{id}.img")),
                });
            }
        }
        if ext_start != 0 {
            let end = m
                .partitions
                .iter()
                .filter(|p| p.disk == d.id)
                .map(Partition::end_bytes)
                .max()
                .unwrap();
            m.partitions.push(Partition {
                disk: d.id.clone(),
                number: 4,
                start_bytes: ext_start,
                size_bytes: end - ext_start,
                type_guid: None,
                guid: None,
                name: String::new(),
                attributes: None,
                mbr_type: Some("0x05".into()),
                mbr_kind: Some(MbrKind::Extended),
                bootable: false,
                volume: None,
            });
        }
        let tail = if mbr { 0 } else { ls + 16 * KIB };
        let needed = up(pos + tail, MIB);
        let size = if d.size == 0 { needed } else { d.size };
        assert!(
            size >= needed,
            "{}: {size} bytes is too small for its partitions ({needed})",
            d.id
        );
        m.disks.push(Disk {
            id: d.id.clone(),
            device: format!("sd{}", (b'a' + di as u8) as char),
            model: "TestDisk".into(),
            serial: d.serial.clone(),
            wwn: d.wwn.clone(),
            by_path: String::new(),
            by_id: vec![],
            transport: "sata".into(),
            size_bytes: size,
            logical_sector_size: d.ls,
            physical_sector_size: d.ps,
            rotational: false,
            removable: false,
            table: d.table,
            guid: (!mbr)
                .then(|| Uuid::from_u128(0xd15c_0000_0000_4000_8000_0000_0000_0000 | di as u128)),
            signature: mbr.then(|| format!("0x{:08x}", 0x1234_0000 + di)),
        });
    }
    let errors = validate(&m);
    assert!(
        errors.is_empty(),
        "generated manifest does not validate: {errors:#?}\n{m:#?}"
    );
    m
}

/// A target disk /dev/`name` with 512-byte sectors and no identity.
fn target(name: &str, size: u64) -> TargetDisk {
    TargetDisk {
        device: format!("/dev/{name}"),
        name: name.into(),
        size_bytes: size,
        logical_sector_size: 512,
        physical_sector_size: 512,
        model: "QEMU HARDDISK".into(),
        ..TargetDisk::default()
    }
}

/// A target that is the saved disk `id` itself: same size, sectors and identity.
fn twin(m: &Manifest, id: &str, name: &str) -> TargetDisk {
    let d = m.disk(id).unwrap();
    TargetDisk {
        logical_sector_size: d.logical_sector_size,
        physical_sector_size: d.physical_sector_size,
        wwn: d.wwn.clone(),
        serial: d.serial.clone(),
        ..target(name, d.size_bytes)
    }
}

/// What is on the saved disk `id` now, as probing would report it on its twin.
fn existing_of(m: &Manifest, id: &str) -> Vec<ExistingPartition> {
    m.partitions
        .iter()
        .filter(|p| p.disk == id)
        .filter_map(|p| {
            let v = m.volume(p.volume.as_deref()?)?;
            Some(ExistingPartition {
                number: p.number,
                start_bytes: p.start_bytes,
                size_bytes: p.size_bytes,
                filesystem: v.filesystem.clone(),
                uuid: v.uuid.clone(),
            })
        })
        .collect()
}

fn policy(sizing: Sizing) -> Policy {
    Policy {
        sizing,
        keep_intact: false,
    }
}

#[track_caller]
fn ok(m: &Manifest, targets: &[TargetDisk], map: &[(&str, &str)], policy: Policy) -> Plan {
    let map: Vec<(String, String)> = map
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    match plan(m, targets, &map, policy) {
        Ok(p) => {
            // Every plan a scenario makes must keep the invariants too.
            if let Err(e) = check_plan(m, targets, policy, &p) {
                panic!("plan breaks an invariant: {e}\n{p:#?}");
            }
            p
        }
        Err(e) => panic!("expected a plan, got: {e}"),
    }
}

#[track_caller]
fn err(m: &Manifest, targets: &[TargetDisk], map: &[(&str, &str)]) -> PlanError {
    let map: Vec<(String, String)> = map
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    match plan(m, targets, &map, Policy::default()) {
        Ok(p) => panic!("expected an error, got a plan: {p:#?}"),
        Err(e) => e,
    }
}

#[track_caller]
fn vol<'p>(p: &'p Plan, id: &str) -> &'p VolumePlan {
    p.volumes
        .iter()
        .find(|v| v.id == id)
        .unwrap_or_else(|| panic!("no volume {id} in the plan"))
}

#[track_caller]
fn tgt<'p>(p: &'p Plan, device: &str) -> &'p TargetPlan {
    p.targets
        .iter()
        .find(|t| t.device == device)
        .unwrap_or_else(|| panic!("{device} is not a planned target"))
}

#[track_caller]
fn mapped<'p>(p: &'p Plan, saved: &str) -> &'p DiskMapping {
    p.disks
        .iter()
        .find(|d| d.saved == saved)
        .unwrap_or_else(|| panic!("{saved} is not mapped"))
}

#[track_caller]
fn part_of<'p>(t: &'p TargetPlan, volume: &str) -> &'p PlannedPartition {
    t.partitions
        .iter()
        .find(|p| p.volume.as_deref() == Some(volume))
        .unwrap_or_else(|| panic!("no partition for {volume} on {}", t.device))
}

#[track_caller]
fn assert_contains(text: &str, needle: &str) {
    assert!(text.contains(needle), "expected {needle:?} in {text:?}");
}

// ---------------------------------------------------------------------------
// Invariants of every plan
// ---------------------------------------------------------------------------

/// Restore priority as issue 3 states it: ESP, boot, system, data, swap.
fn rank(role: Role) -> u8 {
    match role {
        Role::Esp => 0,
        Role::Boot => 1,
        Role::System => 2,
        Role::Data => 3,
        Role::Swap => 4,
    }
}

/// Checks the properties (a)-(f), (i), (j) of a plan `plan` made from `m`
/// onto `targets` without --map.
fn check_plan(
    m: &Manifest,
    targets: &[TargetDisk],
    policy: Policy,
    plan: &Plan,
) -> Result<(), TestCaseError> {
    let by_dev = |dev: &str| targets.iter().find(|t| t.device == dev);

    // Every saved disk mapped exactly once, in saved order, onto an
    // unprotected target that the plan writes (e).
    prop_assert_eq!(
        plan.disks
            .iter()
            .map(|d| d.saved.as_str())
            .collect::<Vec<_>>(),
        m.disks.iter().map(|d| d.id.as_str()).collect::<Vec<_>>()
    );
    for dm in &plan.disks {
        let t = by_dev(&dm.target);
        prop_assert!(t.is_some(), "{} mapped to unknown {}", dm.saved, dm.target);
        prop_assert!(
            t.unwrap().protected.is_none(),
            "{} mapped to protected {}",
            dm.saved,
            dm.target
        );
        prop_assert!(!dm.reason.is_empty());
        prop_assert!(
            plan.targets
                .iter()
                .any(|tp| tp.device == dm.target && tp.saved.contains(&dm.saved)),
            "{} -> {} but that target does not list it",
            dm.saved,
            dm.target
        );
    }
    let mut devices = HashSet::new();
    for tp in &plan.targets {
        prop_assert!(
            devices.insert(tp.device.as_str()),
            "{} planned twice",
            tp.device
        );
        let t = by_dev(&tp.device);
        prop_assert!(t.is_some(), "unknown target {}", tp.device);
        let t = t.unwrap();
        prop_assert!(t.protected.is_none(), "protected {} is written", tp.device);
        for s in &tp.saved {
            prop_assert!(plan
                .disks
                .iter()
                .any(|d| &d.saved == s && d.target == tp.device));
        }
        check_target(t, tp)?;
    }

    // Every volume exactly once, placed or dropped.
    prop_assert_eq!(plan.volumes.len(), m.volumes.len());
    for v in &m.volumes {
        prop_assert_eq!(
            plan.volumes.iter().filter(|p| p.id == v.id).count(),
            1,
            "volume {}",
            &v.id
        );
    }
    for vp in &plan.volumes {
        let v = m.volume(&vp.id).unwrap();
        prop_assert_eq!(vp.role, v.role);
        prop_assert_eq!(vp.saved_size_bytes, v.size_bytes);
        prop_assert_eq!(vp.min_size_bytes, v.min_size_bytes);
        prop_assert!(!vp.reason.is_empty(), "{} has no reason", &vp.id);
        let n_dropped = plan.dropped.iter().filter(|d| d.id == vp.id).count();
        let saved_disk = &m.partition_of(&vp.id).unwrap().disk;
        prop_assert!(
            plan.disks
                .iter()
                .any(|d| &d.saved == saved_disk && d.target == vp.target_disk),
            "{} planned on {}, not where {} went",
            &vp.id,
            &vp.target_disk,
            saved_disk
        );
        if vp.action == Action::Drop {
            // (f) boot-critical volumes are never dropped.
            prop_assert!(!v.role.is_critical(), "critical volume {} dropped", &vp.id);
            prop_assert_eq!(n_dropped, 1, "{} is Drop but not in plan.dropped", &vp.id);
            prop_assert!(vp.target_device.is_empty());
            prop_assert!(
                plan.targets
                    .iter()
                    .flat_map(|t| &t.partitions)
                    .all(|p| p.volume.as_deref() != Some(vp.id.as_str())),
                "dropped {} still has a partition",
                &vp.id
            );
            continue;
        }
        prop_assert_eq!(n_dropped, 0, "{} is placed and listed as dropped", &vp.id);
        // (d) at least the minimum, and the partition says the same as the volume plan.
        prop_assert!(
            vp.size_bytes >= v.min_size_bytes,
            "{}: {} < min {}",
            &vp.id,
            vp.size_bytes,
            v.min_size_bytes
        );
        let tp = plan
            .targets
            .iter()
            .find(|t| t.device == vp.target_disk)
            .unwrap();
        let parts: Vec<&PlannedPartition> = tp
            .partitions
            .iter()
            .filter(|p| p.volume.as_deref() == Some(vp.id.as_str()))
            .collect();
        prop_assert_eq!(parts.len(), 1, "{} has {} partitions", &vp.id, parts.len());
        let p = parts[0];
        prop_assert_eq!(
            (p.start_bytes, p.size_bytes, p.number, p.device.as_str()),
            (
                vp.start_bytes,
                vp.size_bytes,
                vp.partition_number,
                vp.target_device.as_str()
            ),
            "{}",
            &vp.id
        );
        let t = by_dev(&tp.device).unwrap();
        let small_blocks = v
            .block_size
            .is_some_and(|b| b != 0 && b < t.logical_sector_size);
        match vp.action {
            Action::RestoreImage => {
                prop_assert!(
                    vp.size_bytes >= v.size_bytes,
                    "{}: image of {} into {}",
                    &vp.id,
                    v.size_bytes,
                    vp.size_bytes
                );
                prop_assert!(!small_blocks);
            }
            Action::RestoreFiles => prop_assert!(
                vp.size_bytes < v.size_bytes || small_blocks,
                "{}: restore-files although it fits",
                &vp.id
            ),
            Action::Create => prop_assert_eq!(v.role, Role::Swap),
            Action::Skip => {
                prop_assert!(policy.keep_intact && !v.role.is_critical());
                prop_assert!(t.existing.iter().any(|e| e.uuid == v.uuid
                    && e.start_bytes == p.start_bytes
                    && e.size_bytes == p.size_bytes));
            }
            Action::Drop => unreachable!(),
        }
    }
    for d in &plan.dropped {
        let v = m.volume(&d.id);
        prop_assert!(v.is_some());
        prop_assert!(d.needed_bytes >= v.unwrap().min_size_bytes);
        prop_assert!(d.reason.contains("not enough room"), "{}", &d.reason);
    }

    // Restore priority: ESP, boot, system, data in saved order, swap.
    let keys: Vec<(u8, usize)> = plan
        .volumes
        .iter()
        .map(|vp| {
            (
                rank(vp.role),
                m.volumes.iter().position(|v| v.id == vp.id).unwrap(),
            )
        })
        .collect();
    prop_assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "volumes out of order: {:?}",
        keys
    );
    Ok(())
}

/// Properties (a), (b), (c), (i), (j) of one target's table.
fn check_target(t: &TargetDisk, tp: &TargetPlan) -> Result<(), TestCaseError> {
    let ls = u64::from(t.logical_sector_size);
    let ps = u64::from(t.physical_sector_size);
    prop_assert_eq!(
        (
            tp.size_bytes,
            tp.logical_sector_size,
            tp.physical_sector_size
        ),
        (t.size_bytes, t.logical_sector_size, t.physical_sector_size)
    );
    prop_assert_eq!((&tp.wwn, &tp.serial), (&t.wwn, &t.serial));
    let last = match tp.table {
        TableType::Gpt => t.size_bytes - (ls + 16 * KIB),
        TableType::Mbr => {
            // (j) MBR only where 32-bit sector numbers reach the end of the disk.
            prop_assert!(
                t.size_bytes / ls <= 1 << 32,
                "MBR on {} of {} sectors",
                &t.device,
                t.size_bytes / ls
            );
            t.size_bytes
        }
        TableType::None => {
            prop_assert!(tp.partitions.is_empty());
            t.size_bytes
        }
    };
    let mut numbers = HashSet::new();
    for p in &tp.partitions {
        prop_assert!(
            numbers.insert(p.number),
            "{}: number {} twice",
            &t.device,
            p.number
        );
        prop_assert_eq!(&p.device, &format!("/dev/{}{}", t.name, p.number));
        // (b) inside the disk, after the first MiB, before GPT's backup header.
        prop_assert!(p.size_bytes > 0, "{} is empty", &p.device);
        prop_assert!(
            p.start_bytes >= MIB,
            "{} starts at {}",
            &p.device,
            p.start_bytes
        );
        prop_assert!(
            p.end_bytes() <= last,
            "{} ends at {} beyond {}",
            &p.device,
            p.end_bytes(),
            last
        );
        // (c) aligned starts, whole-sector sizes.
        prop_assert!(
            p.start_bytes % MIB == 0 && p.start_bytes % ps == 0,
            "{} starts at {}, not aligned",
            &p.device,
            p.start_bytes
        );
        prop_assert!(
            p.size_bytes % ls == 0,
            "{} has {} bytes, not whole {}-byte sectors",
            &p.device,
            p.size_bytes,
            ls
        );
    }
    // (a) no overlaps; logicals inside the extended partition with room for
    // their EBRs, nothing else overlapping it.
    let outer: Vec<&PlannedPartition> = tp
        .partitions
        .iter()
        .filter(|p| p.mbr_kind != Some(MbrKind::Logical))
        .collect();
    for (i, a) in outer.iter().enumerate() {
        for b in &outer[i + 1..] {
            prop_assert!(
                a.end_bytes() <= b.start_bytes || b.end_bytes() <= a.start_bytes,
                "{} ({}..{}) overlaps {} ({}..{})",
                &a.device,
                a.start_bytes,
                a.end_bytes(),
                &b.device,
                b.start_bytes,
                b.end_bytes()
            );
        }
    }
    let mut logicals: Vec<&PlannedPartition> = tp
        .partitions
        .iter()
        .filter(|p| p.mbr_kind == Some(MbrKind::Logical))
        .collect();
    logicals.sort_by_key(|p| p.start_bytes);
    let extended: Vec<&PlannedPartition> = tp
        .partitions
        .iter()
        .filter(|p| p.mbr_kind == Some(MbrKind::Extended))
        .collect();
    prop_assert!(
        extended.len() <= 1,
        "{} extended partitions",
        extended.len()
    );
    if !logicals.is_empty() {
        prop_assert_eq!(
            extended.len(),
            1,
            "logical partitions without an extended one"
        );
        let ext = extended[0];
        let mut prev_end = ext.start_bytes;
        for l in &logicals {
            prop_assert!(
                l.start_bytes >= prev_end + ls,
                "{} at {} leaves no room for its EBR after {}",
                &l.device,
                l.start_bytes,
                prev_end
            );
            prev_end = l.end_bytes();
        }
        prop_assert!(
            prev_end <= ext.end_bytes(),
            "logicals end at {} beyond the extended partition's end {}",
            prev_end,
            ext.end_bytes()
        );
    }
    match tp.table {
        TableType::Mbr => {
            // (i) four slots for primary and extended; logicals 5, 6, ... in disk order.
            prop_assert!(outer.len() <= 4, "{} primary/extended entries", outer.len());
            for p in &outer {
                prop_assert!((1..=4).contains(&p.number), "primary {}", p.number);
                prop_assert!(p.mbr_type.is_some() && p.type_guid.is_none() && p.guid.is_none());
            }
            let got: Vec<u32> = logicals.iter().map(|p| p.number).collect();
            let want: Vec<u32> = (5..5 + logicals.len() as u32).collect();
            prop_assert_eq!(
                got,
                want,
                "logical partitions are numbered by their place in the EBR chain"
            );
        }
        TableType::Gpt => {
            let mut guids = HashSet::new();
            for p in &tp.partitions {
                prop_assert!(p.mbr_kind.is_none() && p.mbr_type.is_none());
                prop_assert!((1..=128).contains(&p.number));
                prop_assert!(p.type_guid.is_some(), "{} has no type", &p.device);
                prop_assert!(
                    p.guid.is_some_and(|g| guids.insert(g)),
                    "{} has no or a duplicate GUID",
                    &p.device
                );
            }
            prop_assert!(tp.guid.is_some());
        }
        TableType::None => {}
    }
    Ok(())
}

/// The space model of issue 3 for the saved disks `saved` on `t`, written
/// independently of layout.rs: `(alignment, bytes taken before any volume,
/// aligned end of the usable area)`. Taken: the first MiB, partitions without
/// volumes (kept at their size), an added BIOS boot partition and one
/// alignment unit of EBR room per logical partition.
fn space(m: &Manifest, t: &TargetDisk, saved: &[usize]) -> (u64, u64, u64) {
    let ls = u64::from(t.logical_sector_size);
    let align = MIB.max(u64::from(t.physical_sector_size)).max(ls);
    let tables: Vec<TableType> = saved.iter().map(|&s| m.disks[s].table).collect();
    let mbr = tables.iter().all(|k| *k == TableType::Mbr) && t.size_bytes <= (1u64 << 32) * ls;
    let end = if mbr {
        t.size_bytes
    } else {
        t.size_bytes.saturating_sub(ls + up(16 * KIB, ls))
    } / align
        * align;
    let parts: Vec<&Partition> = m
        .partitions
        .iter()
        .filter(|p| {
            saved.iter().any(|&s| m.disks[s].id == p.disk) && p.mbr_kind != Some(MbrKind::Extended)
        })
        .collect();
    let mut taken = align;
    for p in parts.iter().filter(|p| p.volume.is_none()) {
        taken += up(p.size_bytes, align);
    }
    if !mbr
        && tables.contains(&TableType::Mbr)
        && m.system.firmware == Firmware::Bios
        && !m
            .partitions
            .iter()
            .any(|p| p.type_guid == Some(GPT_BIOS_BOOT))
    {
        taken += MIB;
    }
    let logicals = match (mbr, saved.len()) {
        (false, _) => 0,
        (true, 1) => parts
            .iter()
            .filter(|p| p.mbr_kind == Some(MbrKind::Logical))
            .count(),
        (true, _) => parts.len().saturating_sub(3) * usize::from(parts.len() > 4),
    } as u64;
    taken += logicals * align;
    (align, taken, end)
}

/// The least a volume is given: its minimum, at least one alignment unit, rounded up.
fn least(v: &Volume, align: u64) -> u64 {
    up(v.min_size_bytes.max(align), align)
}

/// Whether the boot-critical volumes of the saved disks `saved` fit on `t`
/// at their minimums.
fn critical_fits(m: &Manifest, t: &TargetDisk, saved: &[usize]) -> bool {
    let (align, taken, end) = space(m, t, saved);
    let ids: Vec<&str> = saved.iter().map(|&s| m.disks[s].id.as_str()).collect();
    let need: u64 = m
        .partitions
        .iter()
        .filter(|p| ids.contains(&p.disk.as_str()))
        .filter_map(|p| m.volume(p.volume.as_deref()?))
        .filter(|v| v.role.is_critical())
        .map(|v| least(v, align))
        .sum();
    taken + need <= end
}

/// Sizing on targets that were laid out anew (not kept as saved): volumes
/// are dropped strictly from the lowest priority and only when needed; spare
/// space goes to critical volumes up to their saved size, then to the others,
/// and only then grows system and data volumes by the policy.
fn check_sizing(
    m: &Manifest,
    targets: &[TargetDisk],
    policy: Policy,
    plan: &Plan,
) -> Result<(), TestCaseError> {
    let key = |id: &str| {
        let i = m.volumes.iter().position(|v| v.id == id).unwrap();
        (rank(m.volumes[i].role), i)
    };
    for tp in &plan.targets {
        if tp.reason.contains("kept as it was") {
            continue;
        }
        let t = targets.iter().find(|t| t.device == tp.device).unwrap();
        let saved: Vec<usize> = tp
            .saved
            .iter()
            .map(|id| m.disks.iter().position(|d| &d.id == id).unwrap())
            .collect();
        let (align, taken, end) = space(m, t, &saved);
        let on: Vec<&VolumePlan> = plan
            .volumes
            .iter()
            .filter(|v| v.target_disk == tp.device)
            .collect();
        let placed: Vec<(&VolumePlan, &Volume)> = on
            .iter()
            .filter(|v| v.action != Action::Drop)
            .map(|v| (*v, m.volume(&v.id).unwrap()))
            .collect();
        let dropped: Vec<&VolumePlan> = on
            .iter()
            .copied()
            .filter(|v| v.action == Action::Drop)
            .collect();
        let goal = |v: &Volume| up(v.size_bytes, align);
        for (vp, v) in &placed {
            prop_assert!(
                vp.size_bytes % align == 0 && vp.size_bytes >= least(v, align),
                "{}: {} bytes",
                &vp.id,
                vp.size_bytes
            );
            if !matches!(v.role, Role::System | Role::Data) || policy.sizing == Sizing::Keep {
                prop_assert!(
                    vp.size_bytes <= goal(v),
                    "{} ({}) grew to {} under {:?}",
                    &vp.id,
                    v.role,
                    vp.size_bytes,
                    policy.sizing
                );
            }
        }
        let short = |critical: bool| {
            placed
                .iter()
                .any(|(vp, v)| v.role.is_critical() == critical && vp.size_bytes < goal(v))
        };
        if short(true) {
            for (vp, v) in placed.iter().filter(|(_, v)| !v.role.is_critical()) {
                prop_assert_eq!(
                    vp.size_bytes,
                    least(v, align),
                    "{} got more than its minimum while a critical volume is short",
                    &vp.id
                );
            }
        }
        if short(true) || short(false) {
            for (vp, v) in &placed {
                prop_assert!(
                    vp.size_bytes <= goal(v),
                    "{} grew while another volume is short",
                    &vp.id
                );
            }
        }
        if policy.sizing == Sizing::GrowLast {
            let mut growable: Vec<&(&VolumePlan, &Volume)> = placed
                .iter()
                .filter(|(_, v)| matches!(v.role, Role::System | Role::Data))
                .collect();
            growable.sort_by_key(|(vp, _)| vp.start_bytes);
            for (vp, v) in growable.iter().rev().skip(1) {
                prop_assert!(
                    vp.size_bytes <= goal(v),
                    "grow-last grew {}, not the last volume",
                    &vp.id
                );
            }
        }
        // Growth policies leave nothing unused once a volume can take it.
        // Known bug (see `dropped_logicals_give_back_their_ebr_room`): the EBR
        // room of a dropped logical partition stays reserved, so up to one
        // alignment unit per dropped volume is tolerated on MBR.
        if policy.sizing != Sizing::Keep
            && placed
                .iter()
                .any(|(_, v)| matches!(v.role, Role::System | Role::Data))
        {
            let last = tp
                .partitions
                .iter()
                .map(PlannedPartition::end_bytes)
                .max()
                .unwrap_or(0);
            let tolerated = if tp.table == TableType::Mbr {
                align * dropped.len() as u64
            } else {
                0
            };
            prop_assert!(
                last <= end && end - last <= tolerated,
                "{:?} left {} bytes unused on {}",
                policy.sizing,
                end.saturating_sub(last),
                &tp.device
            );
        }
        // Dropped: the lowest priorities, and the best of them would not have fit.
        if let Some(best) = dropped.iter().min_by_key(|v| key(&v.id)) {
            for (vp, _) in placed.iter().filter(|(_, v)| !v.role.is_critical()) {
                prop_assert!(
                    key(&vp.id) < key(&best.id),
                    "{} kept although {} of higher priority was dropped",
                    &vp.id,
                    &best.id
                );
            }
            let mins: u64 = placed.iter().map(|(_, v)| least(v, align)).sum();
            let best_min = least(m.volume(&best.id).unwrap(), align);
            prop_assert!(
                taken + mins + best_min > end,
                "{} dropped although it fits at its minimum ({} + {} + {} <= {})",
                &best.id,
                taken,
                mins,
                best_min,
                end
            );
            let d = plan.dropped.iter().find(|d| d.id == best.id).unwrap();
            prop_assert_eq!(d.needed_bytes, best_min);
        }
    }
    Ok(())
}

/// A saved disk whose WWN or serial is found on exactly one unprotected
/// target, which no other saved disk claims, goes there.
fn check_identity(m: &Manifest, targets: &[TargetDisk], plan: &Plan) -> Result<(), TestCaseError> {
    let same = |d: &Disk, t: &TargetDisk| {
        (!d.wwn.is_empty() && d.wwn.eq_ignore_ascii_case(&t.wwn))
            || (!d.serial.is_empty() && d.serial == t.serial)
    };
    for d in &m.disks {
        let own: Vec<&TargetDisk> = targets
            .iter()
            .filter(|t| t.protected.is_none() && same(d, t))
            .collect();
        if own.len() != 1 || m.disks.iter().any(|o| o.id != d.id && same(o, own[0])) {
            continue;
        }
        let dm = plan.disks.iter().find(|x| x.saved == d.id).unwrap();
        prop_assert_eq!(
            &dm.target,
            &own[0].device,
            "{} not restored onto its own disk",
            &d.id
        );
        prop_assert!(dm.reason.starts_with("same disk:"), "{}", &dm.reason);
    }
    Ok(())
}

/// Property (h): without --map, the only refusals are "no usable target" and
/// "the boot-critical volumes do not fit on the target their disk went to".
fn check_error(m: &Manifest, targets: &[TargetDisk], e: &PlanError) -> Result<(), TestCaseError> {
    match e {
        PlanError::NoTargets(_) => prop_assert!(
            targets.iter().all(|t| t.protected.is_some()),
            "NoTargets with usable targets: {}",
            e
        ),
        PlanError::CriticalTooBig(msg) => {
            let ti = targets
                .iter()
                .position(|t| msg.starts_with(&format!("{} (", t.device)));
            prop_assert!(ti.is_some(), "message names no target: {}", msg);
            let ti = ti.unwrap();
            let t = &targets[ti];
            prop_assert!(t.protected.is_none());
            let map = mapping::map_disks(m, targets, &[], &mut Vec::new());
            prop_assert!(map.is_ok());
            let saved: Vec<usize> = map
                .unwrap()
                .iter()
                .filter(|(_, tt, _)| *tt == ti)
                .map(|(s, _, _)| *s)
                .collect();
            prop_assert!(
                !saved.is_empty(),
                "{} refused but no saved disk maps to it",
                &t.device
            );
            prop_assert!(
                !critical_fits(m, t, &saved),
                "refused although the critical minimums fit on {}: {}",
                &t.device,
                msg
            );
            prop_assert!(
                msg.contains(&size(t.size_bytes)) && msg.contains("need") && msg.contains("usable"),
                "{}",
                msg
            );
        }
        other => prop_assert!(false, "unexpected error without --map: {}", other),
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Random manifests and targets
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct GVol {
    role: u8,
    exp: u32,
    r: u64,
    odd_sectors: u64,
    used_pct: u64,
    head_pct: u64,
    fs: u8,
    block512: bool,
}

#[derive(Debug, Clone)]
struct GDisk {
    gpt: bool,
    ls4k: bool,
    ps4k: bool,
    raw: bool,
    slack_mib: u64,
    wwn: bool,
    serial: bool,
    vols: Vec<GVol>,
}

#[derive(Debug, Clone)]
struct GTarget {
    /// Same size and sectors as this saved disk (modulo their number).
    clone_of: Option<usize>,
    identity: bool,
    exp: u32,
    r: u64,
    odd_sectors: u64,
    ls4k: bool,
    ps4k: bool,
    protected: bool,
    existing: bool,
}

#[derive(Debug, Clone)]
struct GCase {
    bios: bool,
    sys_pick: usize,
    disks: Vec<GDisk>,
    targets: Vec<GTarget>,
    sizing: u8,
    keep_intact: bool,
}

fn gvol() -> impl Strategy<Value = GVol> {
    (
        0u8..5,
        0u32..20,
        any::<u64>(),
        0u64..16,
        0u64..=100,
        0u64..=60,
        0u8..4,
        any::<bool>(),
    )
        .prop_map(
            |(role, exp, r, odd_sectors, used_pct, head_pct, fs, block512)| GVol {
                role,
                exp,
                r,
                odd_sectors,
                used_pct,
                head_pct,
                fs,
                block512,
            },
        )
}

fn gdisk() -> impl Strategy<Value = GDisk> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.2),
        0u64..4096,
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(gvol(), 1..=6),
    )
        .prop_map(
            |(gpt, ls4k, ps4k, raw, slack_mib, wwn, serial, vols)| GDisk {
                gpt,
                ls4k,
                ps4k,
                raw,
                slack_mib,
                wwn,
                serial,
                vols,
            },
        )
}

fn gtarget() -> impl Strategy<Value = GTarget> {
    (
        prop::option::weighted(0.3, 0usize..3),
        prop::bool::weighted(0.3),
        6u32..22,
        any::<u64>(),
        0u64..8,
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.25),
        any::<bool>(),
    )
        .prop_map(
            |(clone_of, identity, exp, r, odd_sectors, ls4k, ps4k, protected, existing)| GTarget {
                clone_of,
                identity,
                exp,
                r,
                odd_sectors,
                ls4k,
                ps4k,
                protected,
                existing,
            },
        )
}

fn gcase() -> impl Strategy<Value = GCase> {
    (
        any::<bool>(),
        any::<usize>(),
        prop::collection::vec(gdisk(), 1..=3),
        prop::collection::vec(gtarget(), 1..=4),
        0u8..3,
        any::<bool>(),
    )
        .prop_map(
            |(bios, sys_pick, disks, targets, sizing, keep_intact)| GCase {
                bios,
                sys_pick,
                disks,
                targets,
                sizing,
                keep_intact,
            },
        )
}

fn case_manifest(c: &GCase) -> Manifest {
    const ROLES: [Role; 5] = [Role::Esp, Role::Boot, Role::Data, Role::Swap, Role::Data];
    const FS: [&str; 4] = ["ext4", "xfs", "ntfs", "vfat"];
    let total: usize = c.disks.iter().map(|d| d.vols.len()).sum();
    let sys = c.sys_pick % total;
    let mut seen_boot = false;
    let mut flat = 0;
    let mut disks = Vec::new();
    for (di, g) in c.disks.iter().enumerate() {
        let table = if g.gpt {
            TableType::Gpt
        } else {
            TableType::Mbr
        };
        let ls: u32 = if g.ls4k { 4096 } else { 512 };
        let ps = if g.ps4k { 4096 } else { ls };
        let mut vols = Vec::new();
        if g.raw {
            vols.push(raw(if g.gpt { MIB } else { 8 * MIB }));
        }
        for (k, gv) in g.vols.iter().enumerate() {
            let mut role = if flat == sys {
                Role::System
            } else {
                ROLES[usize::from(gv.role)]
            };
            flat += 1;
            if role == Role::Boot {
                if seen_boot {
                    role = Role::Data;
                }
                seen_boot = true;
            }
            // MBR disks stay under 2^32 sectors: at most 7 partitions of < 256 GiB.
            let exp = if g.gpt { gv.exp } else { gv.exp.min(17) };
            let mib = (1u64 << exp) + gv.r % (1u64 << exp);
            let size = mib * MIB + gv.odd_sectors * u64::from(ls);
            let fs = match role {
                Role::Swap => "swap",
                Role::Esp => "vfat",
                _ => FS[usize::from(gv.fs)],
            };
            let used = (role != Role::Swap).then_some(size / 100 * gv.used_pct);
            let min = (used.unwrap_or(0) + size / 100 * gv.head_pct).min(size);
            let block = if fs == "vfat" && gv.block512 {
                512
            } else {
                4096
            };
            vols.push(Vs {
                id: format!("d{di}v{k}"),
                role,
                fs: fs.into(),
                size,
                used,
                min,
                block: Some(block),
            });
        }
        disks.push(Ds {
            id: format!("disk{di}"),
            size: 0,
            ls,
            ps,
            table,
            wwn: if g.wwn {
                format!("0x5000c500{di:08x}")
            } else {
                String::new()
            },
            serial: if g.serial {
                format!("SER{di}")
            } else {
                String::new()
            },
            vols,
        });
    }
    // Saved disks are a little larger than their partitions.
    let mut m = build(
        if c.bios {
            Firmware::Bios
        } else {
            Firmware::Uefi
        },
        &disks,
    );
    for (d, g) in m.disks.iter_mut().zip(&c.disks) {
        d.size_bytes += g.slack_mib * MIB;
    }
    let errors = validate(&m);
    assert!(errors.is_empty(), "{errors:#?}");
    m
}

fn case_targets(c: &GCase, m: &Manifest) -> Vec<TargetDisk> {
    let n = m.disks.len();
    c.targets
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let name = format!("vd{}", (b'a' + i as u8) as char);
            let mut t = match g.clone_of {
                Some(ci) => {
                    let d = &m.disks[ci % n];
                    let mut t = twin(m, &d.id, &name);
                    if g.existing {
                        t.existing = existing_of(m, &d.id);
                    }
                    t
                }
                None => {
                    let ls: u32 = if g.ls4k { 4096 } else { 512 };
                    let ps = if g.ps4k { 4096 } else { ls };
                    let mib = ((1u64 << g.exp) + g.r % (1u64 << g.exp)).clamp(64, 4 << 20);
                    TargetDisk {
                        logical_sector_size: ls,
                        physical_sector_size: ps,
                        ..target(&name, mib * MIB + g.odd_sectors * u64::from(ls))
                    }
                }
            };
            if g.clone_of.is_some() != g.identity {
                t.wwn.clear();
                t.serial.clear();
            }
            if g.identity && g.clone_of.is_none() {
                let d = &m.disks[(g.r as usize) % n];
                t.wwn = d.wwn.clone();
                t.serial = d.serial.clone();
            }
            t.protected = g.protected.then(|| "holds the recovery medium".to_string());
            t
        })
        .collect()
}

fn case_policy(c: &GCase) -> Policy {
    let sizing = [Sizing::Keep, Sizing::GrowLast, Sizing::Proportional][usize::from(c.sizing)];
    Policy {
        sizing,
        keep_intact: c.keep_intact,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// (a)-(j) on random manifests and random target sets, no --map.
    #[test]
    fn plans_keep_their_invariants(c in gcase()) {
        let m = case_manifest(&c);
        let targets = case_targets(&c, &m);
        let policy = case_policy(&c);
        let first = plan(&m, &targets, &[], policy);
        // (g) deterministic.
        prop_assert_eq!(&first, &plan(&m, &targets, &[], policy));
        match &first {
            Ok(p) => {
                check_plan(&m, &targets, policy, p)?;
                check_sizing(&m, &targets, policy, p)?;
                check_identity(&m, &targets, p)?;
            }
            Err(e) => check_error(&m, &targets, e)?,
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// --map is obeyed whenever it names a usable target; a protected one is refused.
    #[test]
    fn map_is_obeyed(c in gcase(), s in any::<prop::sample::Index>(), t in any::<prop::sample::Index>(), by_name in any::<bool>()) {
        let m = case_manifest(&c);
        let targets = case_targets(&c, &m);
        let policy = case_policy(&c);
        let saved = &m.disks[s.index(m.disks.len())].id;
        let target = &targets[t.index(targets.len())];
        let dev = if by_name { target.name.clone() } else { target.device.clone() };
        let map = vec![(saved.clone(), dev.clone())];
        let result = plan(&m, &targets, &map, policy);
        prop_assert_eq!(&result, &plan(&m, &targets, &map, policy));
        match (&target.protected, result) {
            // With nothing usable at all, "no targets" comes first.
            (Some(_), r) if targets.iter().all(|t| t.protected.is_some()) => prop_assert!(matches!(r, Err(PlanError::NoTargets(_))), "{:?}", r),
            (Some(why), r) => prop_assert_eq!(r, Err(PlanError::ProtectedTarget(saved.clone(), dev, why.clone()))),
            (None, Ok(p)) => {
                let dm = p.disks.iter().find(|d| &d.saved == saved).unwrap();
                prop_assert_eq!(&dm.target, &target.device);
                prop_assert_eq!(&dm.reason, &format!("mapped by --map {saved}={dev}"));
                check_plan(&m, &targets, policy, &p)?;
            }
            (None, Err(e)) => prop_assert!(matches!(e, PlanError::CriticalTooBig(_)), "{}", e),
        }
    }

    /// Any saved disk onto its own twin (same size, sectors, identity) comes
    /// back exactly as it was, whatever else is attached.
    #[test]
    fn same_disk_comes_back_as_saved(c in gcase(), keep_intact in any::<bool>()) {
        let mut c = c;
        c.disks.truncate(1);
        c.disks[0].serial = true;
        let m = case_manifest(&c);
        let mut targets = vec![twin(&m, "disk0", "vdz")];
        targets[0].existing = existing_of(&m, "disk0");
        let policy = Policy { sizing: Sizing::Proportional, keep_intact };
        let p = plan(&m, &targets, &[], policy);
        prop_assert!(p.is_ok(), "{:?}", p);
        let p = p.unwrap();
        check_plan(&m, &targets, policy, &p)?;
        prop_assert!(p.disks[0].reason.contains("WWN") || p.disks[0].reason.contains("serial"), "{}", &p.disks[0].reason);
        prop_assert!(p.dropped.is_empty());
        let tp = &p.targets[0];
        prop_assert_eq!(tp.table, m.disks[0].table);
        prop_assert_eq!(tp.guid, m.disks[0].guid);
        prop_assert_eq!(&tp.signature, &m.disks[0].signature);
        prop_assert_eq!(tp.partitions.len(), m.partitions.len());
        for sp in &m.partitions {
            let pp = tp.partitions.iter().find(|pp| pp.number == sp.number);
            prop_assert!(pp.is_some(), "partition {} lost", sp.number);
            let pp = pp.unwrap();
            prop_assert_eq!((pp.start_bytes, pp.size_bytes, pp.type_guid, pp.guid, &pp.name), (sp.start_bytes, sp.size_bytes, sp.type_guid, sp.guid, &sp.name));
            prop_assert_eq!((pp.mbr_type, pp.mbr_kind, pp.bootable), (sp.mbr_type.as_deref().map(|t| u8::from_str_radix(&t[2..], 16).unwrap()), sp.mbr_kind, sp.bootable));
            prop_assert_eq!(&pp.volume, &sp.volume);
        }
        for vp in &p.volumes {
            let want = match vp.role {
                r if keep_intact && !r.is_critical() => Action::Skip,
                Role::Swap => Action::Create,
                _ if m.volume(&vp.id).unwrap().block_size.unwrap_or(0) < tp.logical_sector_size => Action::RestoreFiles,
                _ => Action::RestoreImage,
            };
            prop_assert_eq!(vp.action, want, "{}: {}", &vp.id, &vp.reason);
        }
    }
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// A UEFI server on one 16 GiB GPT disk: esp, boot, root, swap, data (partitions 1-5).
fn server() -> Manifest {
    build(
        Firmware::Uefi,
        &[Ds {
            ps: 4096,
            ..disk(
                "disk0",
                TableType::Gpt,
                16 * GIB,
                vec![
                    vs("esp", Role::Esp, "vfat", 512 * MIB, 64 * MIB),
                    vs("boot", Role::Boot, "ext4", 512 * MIB, 128 * MIB),
                    vs("root", Role::System, "ext4", 4 * GIB, 2 * GIB),
                    vs("swap", Role::Swap, "swap", GIB, GIB),
                    vs("data", Role::Data, "xfs", 8 * GIB, 3 * GIB),
                ],
            )
        }],
    )
}

#[test]
fn same_disks_keep_their_layout() {
    let m = crate::manifest::tests::sample();
    // A decoy of the same size first by name: identity must win over the name order.
    let decoy = TargetDisk {
        physical_sector_size: 4096,
        ..target("vda", 20 * GIB)
    };
    let mut disk0 = twin(&m, "disk0", "vdb");
    disk0.wwn = disk0.wwn.to_uppercase().replace("0X", "0x");
    disk0.serial = "some other serial".into();
    let disk1 = twin(&m, "disk1", "vdc");
    let p = ok(&m, &[decoy, disk0, disk1], &[], Policy::default());

    assert_eq!(mapped(&p, "disk0").target, "/dev/vdb");
    assert_contains(&mapped(&p, "disk0").reason, "WWN");
    assert_eq!(mapped(&p, "disk1").target, "/dev/vdc");
    assert_contains(&mapped(&p, "disk1").reason, "serial number");
    assert_eq!(p.target_devices(), ["/dev/vdb", "/dev/vdc"]);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert!(p.dropped.is_empty());

    let t0 = tgt(&p, "/dev/vdb");
    assert_eq!(t0.table, TableType::Gpt);
    assert_eq!(t0.guid, m.disks[0].guid);
    assert_contains(&t0.reason, "same size as the saved disk");
    let t1 = tgt(&p, "/dev/vdc");
    assert_eq!(t1.table, TableType::Mbr);
    assert_eq!(t1.signature.as_deref(), Some("0x1234abcd"));
    for sp in &m.partitions {
        let t = if sp.disk == "disk0" { t0 } else { t1 };
        let pp = t
            .partitions
            .iter()
            .find(|pp| pp.number == sp.number)
            .unwrap_or_else(|| panic!("{}:{} lost", sp.disk, sp.number));
        assert_eq!(
            (pp.start_bytes, pp.size_bytes),
            (sp.start_bytes, sp.size_bytes),
            "{}:{}",
            sp.disk,
            sp.number
        );
        assert_eq!(
            (pp.type_guid, pp.guid, pp.name.as_str()),
            (sp.type_guid, sp.guid, sp.name.as_str())
        );
        assert_eq!(pp.mbr_kind, sp.mbr_kind);
        assert_eq!(pp.volume, sp.volume);
        assert_eq!(
            pp.from.as_deref(),
            Some(format!("{}:{}", sp.disk, sp.number).as_str())
        );
    }
    assert_eq!(part_of(t0, "esp").attributes, Some(0));
    let numbers: Vec<(u32, Option<MbrKind>, Option<u8>)> = t1
        .partitions
        .iter()
        .map(|p| (p.number, p.mbr_kind, p.mbr_type))
        .collect();
    assert_eq!(
        numbers,
        [
            (1, Some(MbrKind::Primary), Some(0x83)),
            (2, Some(MbrKind::Extended), Some(0x05)),
            (5, Some(MbrKind::Logical), Some(0x0c))
        ]
    );

    for v in &p.volumes {
        if v.role == Role::Swap {
            assert_eq!(v.action, Action::Create, "{}", v.id);
        } else {
            assert_eq!(v.action, Action::RestoreImage, "{}", v.id);
            assert_contains(&v.reason, "same size");
        }
        assert_eq!(v.size_bytes, v.saved_size_bytes, "{}", v.id);
    }
    assert_eq!(vol(&p, "root").target_device, "/dev/vdb2");
    assert_eq!(vol(&p, "archive").target_device, "/dev/vdc5");
}

#[test]
fn larger_disk_grows_system_and_data_in_proportion() {
    let m = server();
    let targets = [TargetDisk {
        physical_sector_size: 4096,
        ..target("vda", 32 * GIB)
    }];
    let p = ok(&m, &targets, &[], Policy::default());
    assert_eq!(Policy::default().sizing, Sizing::Proportional);
    assert_contains(&mapped(&p, "disk0").reason, "holds the whole saved layout");

    // Usable: 32 GiB minus the first MiB and the last MiB (backup GPT, aligned
    // down) = 32766 MiB; the saved sizes take 14 GiB; spare 18430 MiB.
    // root gets 4/12 of it rounded down to a MiB (6143), data the rest (12287).
    let sizes: Vec<(&str, u64, u32, u64)> = p
        .volumes
        .iter()
        .map(|v| {
            (
                v.id.as_str(),
                v.start_bytes / MIB,
                v.partition_number,
                v.size_bytes / MIB,
            )
        })
        .collect();
    assert_eq!(
        sizes,
        [
            ("esp", 1, 1, 512),
            ("boot", 513, 2, 512),
            ("root", 1025, 3, 4096 + 6143),
            ("data", 12288, 5, 8192 + 12287),
            ("swap", 11264, 4, 1024)
        ]
    );
    assert_eq!(
        vol(&p, "data").start_bytes + vol(&p, "data").size_bytes,
        32 * GIB - MIB
    );
    for id in ["esp", "boot"] {
        assert_eq!(vol(&p, id).action, Action::RestoreImage);
        assert_contains(&vol(&p, id).reason, "same size");
    }
    for id in ["root", "data"] {
        assert_eq!(vol(&p, id).action, Action::RestoreImage);
        assert_contains(&vol(&p, id).reason, "grown");
    }
    assert_eq!(vol(&p, "swap").action, Action::Create);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);

    // keep: everything at its saved size, the rest left free.
    let p = ok(&m, &targets, &[], policy(Sizing::Keep));
    for v in &p.volumes {
        assert_eq!(v.size_bytes, v.saved_size_bytes, "{}", v.id);
        if v.role != Role::Swap {
            assert_contains(&v.reason, "same size");
        }
    }
    // grow-last: the last system/data volume on the disk (data, partition 5) takes it all.
    let p = ok(&m, &targets, &[], policy(Sizing::GrowLast));
    assert_eq!(vol(&p, "root").size_bytes, 4 * GIB);
    assert_eq!(vol(&p, "data").size_bytes, 8 * GIB + 18430 * MIB);
    assert_contains(&vol(&p, "data").reason, "grown");
}

#[test]
fn smaller_disk_that_holds_the_data_gets_file_restores() {
    let m = server();
    // 8 GiB: 8190 MiB usable. Minimums 64+128+2048+1024+3072 = 6336 MiB; the
    // 1854 MiB spare brings esp and boot back to their saved size (448 + 384)
    // and gives the remaining 1022 MiB to root; data stays at its minimum.
    let p = ok(&m, &[target("vda", 8 * GIB)], &[], Policy::default());
    assert_contains(&mapped(&p, "disk0").reason, "smaller than the saved layout");
    assert!(p.dropped.is_empty());
    let sizes: Vec<(&str, u64)> = p
        .volumes
        .iter()
        .map(|v| (v.id.as_str(), v.size_bytes / MIB))
        .collect();
    assert_eq!(
        sizes,
        [
            ("esp", 512),
            ("boot", 512),
            ("root", 2048 + 1022),
            ("data", 3072),
            ("swap", 1024)
        ]
    );
    for id in ["root", "data"] {
        let v = vol(&p, id);
        assert!(
            v.size_bytes >= v.min_size_bytes && v.size_bytes < v.saved_size_bytes,
            "{id}: {}",
            v.size_bytes
        );
        assert_eq!(v.action, Action::RestoreFiles, "{id}");
        assert_contains(&v.reason, "smaller than the filesystem");
        assert_contains(&v.reason, &size(v.saved_size_bytes));
    }
    assert_eq!(vol(&p, "esp").action, Action::RestoreImage);
}

#[test]
fn two_saved_disks_are_consolidated_onto_one() {
    // The seed's example: two 4 GiB disks, one 14 GiB disk now.
    let m = build(
        Firmware::Uefi,
        &[
            disk(
                "disk0",
                TableType::Gpt,
                4 * GIB,
                vec![
                    vs("root", Role::System, "ext4", 2 * GIB, GIB),
                    vs("data0", Role::Data, "ext4", 1536 * MIB, 512 * MIB),
                ],
            ),
            disk(
                "disk1",
                TableType::Gpt,
                4 * GIB,
                vec![vs("data1", Role::Data, "ext4", 3 * GIB, GIB)],
            ),
        ],
    );
    let p = ok(&m, &[target("vda", 14 * GIB)], &[], Policy::default());
    assert_eq!(mapped(&p, "disk0").target, "/dev/vda");
    assert_eq!(mapped(&p, "disk1").target, "/dev/vda");
    assert_contains(&mapped(&p, "disk1").reason, "consolidated with disk0");
    assert_eq!(p.targets.len(), 1);
    let t = &p.targets[0];
    assert_eq!(t.saved, ["disk0", "disk1"]);
    assert_eq!(t.table, TableType::Gpt);
    let layout: Vec<(u32, &str)> = t
        .partitions
        .iter()
        .map(|p| (p.number, p.volume.as_deref().unwrap()))
        .collect();
    assert_eq!(layout, [(1, "root"), (2, "data0"), (3, "data1")]);
    assert!(t
        .partitions
        .windows(2)
        .all(|w| w[0].end_bytes() <= w[1].start_bytes));
    // Proportional: the whole usable space (14 GiB - 2 MiB) is given out.
    assert_eq!(
        t.partitions.iter().map(|p| p.size_bytes).sum::<u64>(),
        14 * GIB - 2 * MIB
    );
    for v in &p.volumes {
        assert_eq!(v.action, Action::RestoreImage, "{}", v.id);
        assert!(v.size_bytes > v.saved_size_bytes);
    }
    for w in [
        "root: was partition 1 of disk0, now /dev/vda1",
        "data0: was partition 2 of disk0, now /dev/vda2",
        "data1: was partition 1 of disk1, now /dev/vda3",
    ] {
        assert!(
            p.warnings
                .iter()
                .any(|x| x.starts_with(w) && x.contains("fstab")),
            "no warning {w:?} in {:?}",
            p.warnings
        );
    }
    assert!(!p.is_ambiguous());
}

#[test]
fn identity_wins_over_fit_and_ties_are_reported() {
    let m = build(
        Firmware::Uefi,
        &[Ds {
            serial: "SER-A".into(),
            ..disk(
                "disk0",
                TableType::Gpt,
                10 * GIB,
                vec![vs("root", Role::System, "ext4", 8 * GIB, 2 * GIB)],
            )
        }],
    );
    // vda would fit exactly, but vdb is the saved disk itself.
    let exact = target("vda", 10 * GIB);
    let own = TargetDisk {
        serial: "SER-A".into(),
        ..target("vdb", 100 * GIB)
    };
    let p = ok(&m, &[exact.clone(), own], &[], Policy::default());
    assert_eq!(mapped(&p, "disk0").target, "/dev/vdb");
    assert_eq!(
        mapped(&p, "disk0").reason,
        "same disk: serial number matches"
    );
    assert!(!p.is_ambiguous());
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);

    // No identity, two equal candidates: the first by name, reported.
    let p = ok(
        &m,
        &[target("vdc", 20 * GIB), target("vdb", 20 * GIB)],
        &[],
        Policy::default(),
    );
    assert_eq!(mapped(&p, "disk0").target, "/dev/vdb");
    assert!(p.is_ambiguous());
    let w = p
        .warnings
        .iter()
        .find(|w| w.contains("equally suitable"))
        .unwrap();
    assert_contains(w, "/dev/vdb and /dev/vdc");
    assert_contains(w, "--map");

    // Without identity the smallest disk that holds everything is chosen.
    let p = ok(
        &m,
        &[target("vdb", 100 * GIB), exact],
        &[],
        Policy::default(),
    );
    assert_eq!(mapped(&p, "disk0").target, "/dev/vda");
    assert!(!p.is_ambiguous());
}

#[test]
fn four_k_native_target() {
    let mut esp = vs("esp", Role::Esp, "vfat", 256 * MIB, 256 * MIB);
    esp.block = Some(512);
    // 7 sectors short of 4 GiB: not a whole number of 4096-byte sectors.
    let root = vs("root", Role::System, "ext4", 4 * GIB - 7 * 512, GIB);
    let m = build(
        Firmware::Uefi,
        &[disk("disk0", TableType::Gpt, 8 * GIB, vec![esp, root])],
    );
    let t = TargetDisk {
        logical_sector_size: 4096,
        physical_sector_size: 4096,
        ..target("vda", 8 * GIB)
    };
    let p = ok(&m, &[t], &[], Policy::default());
    let tp = &p.targets[0];
    assert_eq!(tp.logical_sector_size, 4096);
    for part in &tp.partitions {
        assert_eq!(part.start_bytes % 4096, 0, "{}", part.device);
        assert_eq!(part.size_bytes % 4096, 0, "{}", part.device);
    }
    let e = vol(&p, "esp");
    assert_eq!(e.action, Action::RestoreFiles);
    assert_contains(&e.reason, "4096-byte sectors");
    assert_contains(&e.reason, "512-byte blocks");
    let r = vol(&p, "root");
    assert_eq!(r.action, Action::RestoreImage);
    assert!(r.size_bytes >= 4 * GIB);
    // The same ESP on a 512-byte-sector disk is imaged.
    let p = ok(&m, &[target("vda", 8 * GIB)], &[], Policy::default());
    assert_eq!(vol(&p, "esp").action, Action::RestoreImage);
}

fn mbr_server(firmware: Firmware) -> Manifest {
    build(
        firmware,
        &[disk(
            "disk0",
            TableType::Mbr,
            100 * GIB,
            vec![
                vs("root", Role::System, "ext4", 40 * GIB, 10 * GIB),
                vs("swap", Role::Swap, "swap", 4 * GIB, 4 * GIB),
                vs("data", Role::Data, "vfat", 50 * GIB, 20 * GIB),
            ],
        )],
    )
}

#[test]
fn mbr_onto_3_tib_becomes_gpt() {
    let m = mbr_server(Firmware::Uefi);
    let p = ok(&m, &[target("vda", 3 * TIB)], &[], Policy::default());
    let t = &p.targets[0];
    assert_eq!(t.table, TableType::Gpt);
    assert_contains(&t.reason, "MBR");
    assert_contains(&t.reason, &format!("{} MBR can address", size(2 * TIB)));
    assert!(!t.reason.contains("BIOS boot"));
    assert!(t.guid.is_some());
    assert_eq!(t.signature, None);
    let parts: Vec<(u32, Option<Uuid>, &str)> = t
        .partitions
        .iter()
        .map(|p| (p.number, p.type_guid, p.name.as_str()))
        .collect();
    assert_eq!(
        parts,
        [
            (1, Some(GPT_LINUX), "root"),
            (2, Some(GPT_SWAP), "swap"),
            (3, Some(GPT_BASIC_DATA), "data")
        ]
    );
    assert!(t
        .partitions
        .iter()
        .all(|p| p.mbr_type.is_none() && p.mbr_kind.is_none() && p.guid.is_some()));

    // BIOS firmware: GRUB needs a BIOS boot partition on GPT; it comes first.
    let m = mbr_server(Firmware::Bios);
    let p = ok(&m, &[target("vda", 3 * TIB)], &[], Policy::default());
    let t = &p.targets[0];
    assert_contains(&t.reason, "BIOS boot partition");
    let bb = &t.partitions[0];
    assert_eq!(
        (
            bb.number,
            bb.start_bytes,
            bb.size_bytes,
            bb.type_guid,
            bb.volume.as_deref()
        ),
        (1, MIB, MIB, Some(GPT_BIOS_BOOT), None)
    );
    let parts: Vec<(u32, Option<Uuid>)> = t.partitions[1..]
        .iter()
        .map(|p| (p.number, p.type_guid))
        .collect();
    assert_eq!(
        parts,
        [
            (2, Some(GPT_LINUX)),
            (3, Some(GPT_SWAP)),
            (4, Some(GPT_BASIC_DATA))
        ]
    );
    assert_eq!(vol(&p, "root").target_device, "/dev/vda2");
    assert!(
        p.warnings
            .iter()
            .any(|w| w.starts_with("root: was partition 1 of disk0, now /dev/vda2")),
        "{:?}",
        p.warnings
    );

    // With 4096-byte sectors MBR reaches 16 TiB: stays MBR.
    let t4k = TargetDisk {
        logical_sector_size: 4096,
        physical_sector_size: 4096,
        ..target("vda", 3 * TIB)
    };
    let p = ok(&m, &[t4k], &[], Policy::default());
    assert_eq!(p.targets[0].table, TableType::Mbr);
    // Exactly 2^32 512-byte sectors is still addressable; one sector more is not.
    let p = ok(&m, &[target("vda", 2 * TIB)], &[], Policy::default());
    assert_eq!(p.targets[0].table, TableType::Mbr);
    let p = ok(&m, &[target("vda", 2 * TIB + 512)], &[], Policy::default());
    assert_eq!(p.targets[0].table, TableType::Gpt);
}

/// One 20 GiB MBR disk: boot, root, data1 primary (1-3); extended 4 with
/// data2, swap, data3 as logicals 5, 6, 7.
fn mbr_logicals() -> Manifest {
    build(
        Firmware::Bios,
        &[disk(
            "disk0",
            TableType::Mbr,
            20 * GIB,
            vec![
                vs("boot", Role::Boot, "ext4", 512 * MIB, 256 * MIB),
                vs("root", Role::System, "ext4", 6 * GIB, 3 * GIB),
                vs("data1", Role::Data, "ext4", 2 * GIB, GIB),
                vs("data2", Role::Data, "ext4", 2 * GIB, GIB),
                vs("swap", Role::Swap, "swap", GIB, GIB),
                vs("data3", Role::Data, "ext4", 2 * GIB, GIB),
            ],
        )],
    )
}

#[test]
fn mbr_logical_partitions_keep_their_numbers() {
    let m = mbr_logicals();
    let p = ok(&m, &[target("vda", 20 * GIB)], &[], Policy::default());
    let t = &p.targets[0];
    assert_eq!(t.table, TableType::Mbr);
    assert_eq!(t.signature.as_deref(), Some("0x12340000"));
    let got: Vec<(u32, Option<MbrKind>, u64, u64)> = t
        .partitions
        .iter()
        .map(|p| (p.number, p.mbr_kind, p.start_bytes, p.size_bytes))
        .collect();
    let mut want: Vec<(u32, Option<MbrKind>, u64, u64)> = m
        .partitions
        .iter()
        .map(|p| (p.number, p.mbr_kind, p.start_bytes, p.size_bytes))
        .collect();
    want.sort_by_key(|w| w.0);
    assert_eq!(got, want);
    assert!(part_of(t, "boot").bootable);
    assert_eq!(t.partitions[3].mbr_type, Some(0x05));
    assert_eq!(vol(&p, "swap").target_device, "/dev/vda6");

    // A larger disk: sizes change, numbers and kinds stay.
    let p = ok(&m, &[target("vda", 40 * GIB)], &[], Policy::default());
    let kinds: Vec<(u32, Option<MbrKind>, Option<&str>)> = p.targets[0]
        .partitions
        .iter()
        .map(|p| (p.number, p.mbr_kind, p.volume.as_deref()))
        .collect();
    assert_eq!(
        kinds,
        [
            (1, Some(MbrKind::Primary), Some("boot")),
            (2, Some(MbrKind::Primary), Some("root")),
            (3, Some(MbrKind::Primary), Some("data1")),
            (4, Some(MbrKind::Extended), None),
            (5, Some(MbrKind::Logical), Some("data2")),
            (6, Some(MbrKind::Logical), Some("swap")),
            (7, Some(MbrKind::Logical), Some("data3")),
        ]
    );
    assert!(vol(&p, "root").size_bytes > 6 * GIB);
}

#[test]
fn dropped_logical_partition_does_not_leave_a_gap_in_the_numbers() {
    // 7 GiB: room 7168 - 1 - 3 (EBRs) = 7164 MiB; the minimums need 7424 MiB,
    // 6400 without swap: swap (logical 6) is dropped. The kernel numbers
    // logical partitions by their place in the EBR chain, so data3 becomes 6.
    let m = mbr_logicals();
    let p = ok(&m, &[target("vda", 7 * GIB)], &[], Policy::default());
    assert_eq!(
        p.dropped.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["swap"]
    );
    let t = &p.targets[0];
    let logicals: Vec<(u32, Option<&str>)> = t
        .partitions
        .iter()
        .filter(|p| p.mbr_kind == Some(MbrKind::Logical))
        .map(|p| (p.number, p.volume.as_deref()))
        .collect();
    assert_eq!(logicals, [(5, Some("data2")), (6, Some("data3"))]);
    assert_eq!(vol(&p, "data3").target_device, "/dev/vda6");
    assert!(
        p.warnings
            .iter()
            .any(|w| w.starts_with("data3: was partition 7 of disk0, now /dev/vda6")),
        "{:?}",
        p.warnings
    );
}

#[test]
fn same_disk_mbr_keeps_the_extended_partition_as_saved() {
    // The extended partition starts 2 MiB before its first logical and ends
    // 10 MiB after its last: kept exactly as saved on the same disk.
    let mut m = mbr_logicals();
    let first = m.partitions.iter_mut().find(|p| p.number == 5).unwrap();
    first.start_bytes += MIB;
    first.size_bytes -= MIB;
    m.volumes
        .iter_mut()
        .find(|v| v.id == "data2")
        .unwrap()
        .size_bytes -= MIB;
    let ext = m
        .partitions
        .iter_mut()
        .find(|p| p.mbr_kind == Some(MbrKind::Extended))
        .unwrap();
    ext.size_bytes += 10 * MIB;
    let saved = ext.clone();
    assert!(validate(&m).is_empty(), "{:?}", validate(&m));
    let p = ok(&m, &[target("vda", 20 * GIB)], &[], Policy::default());
    let e = p.targets[0]
        .partitions
        .iter()
        .find(|p| p.mbr_kind == Some(MbrKind::Extended))
        .unwrap();
    assert_eq!(
        (e.number, e.start_bytes, e.size_bytes),
        (saved.number, saved.start_bytes, saved.size_bytes)
    );
}

#[test]
fn same_disk_mbr_with_legacy_ebr_gap_does_not_overlap() {
    // Old partitioners put the first logical 63 sectors after the start of
    // the extended partition, which itself follows the partition before it
    // directly. The extended partition must not grow over partition 3.
    let mut m = mbr_logicals();
    let end3 = m
        .partitions
        .iter()
        .find(|p| p.number == 3)
        .unwrap()
        .end_bytes();
    for p in m.partitions.iter_mut() {
        match p.number {
            4 => {
                p.size_bytes += p.start_bytes - end3;
                p.start_bytes = end3;
            }
            5 => p.start_bytes = end3 + 63 * 512,
            _ => {}
        }
    }
    assert!(validate(&m).is_empty(), "{:?}", validate(&m));
    let t = target("vda", 20 * GIB);
    let p = plan(&m, std::slice::from_ref(&t), &[], Policy::default()).unwrap();
    let tp = &p.targets[0];
    let ext = tp.partitions.iter().find(|p| p.number == 4).unwrap();
    let third = tp.partitions.iter().find(|p| p.number == 3).unwrap();
    assert!(
        third.end_bytes() <= ext.start_bytes,
        "extended {}..{} overlaps partition 3 ending at {}",
        ext.start_bytes,
        ext.end_bytes(),
        third.end_bytes()
    );
    let five = tp.partitions.iter().find(|p| p.number == 5).unwrap();
    assert!(five.start_bytes > ext.start_bytes && five.end_bytes() <= ext.end_bytes());
}

#[test]
fn dropped_logicals_give_back_their_ebr_room() {
    // As in dropped_logical_partition_does_not_leave_a_gap_in_the_numbers:
    // swap (a logical) is dropped; proportional growth should still fill the disk.
    let m = mbr_logicals();
    let p = plan(&m, &[target("vda", 7 * GIB)], &[], Policy::default()).unwrap();
    assert_eq!(p.dropped.len(), 1);
    let last = p.targets[0]
        .partitions
        .iter()
        .map(PlannedPartition::end_bytes)
        .max()
        .unwrap();
    assert_eq!(last, 7 * GIB);
}

#[test]
fn system_fits_once_logical_data_partitions_are_dropped() {
    // root (min 100 MiB) is primary 1; data1, data2 primary; data3, data4
    // logical 5 and 6. On 101 MiB, root alone fits (1 MiB..101 MiB) once the
    // data volumes, and with them the logicals' EBRs, are dropped.
    let m = build(
        Firmware::Bios,
        &[disk(
            "disk0",
            TableType::Mbr,
            2 * GIB,
            vec![
                vs("root", Role::System, "ext4", GIB, 100 * MIB),
                vs("data1", Role::Data, "ext4", 64 * MIB, 32 * MIB),
                vs("data2", Role::Data, "ext4", 64 * MIB, 32 * MIB),
                vs("data3", Role::Data, "ext4", 64 * MIB, 32 * MIB),
                vs("data4", Role::Data, "ext4", 64 * MIB, 32 * MIB),
            ],
        )],
    );
    let p = ok(&m, &[target("vda", 101 * MIB)], &[], Policy::default());
    assert_eq!(vol(&p, "root").size_bytes, 100 * MIB);
    assert_eq!(p.dropped.len(), 4);
}

#[test]
fn same_disk_with_unaligned_partitions_is_aligned() {
    let mut m = server();
    // Partition 2 (boot) starts one 512-byte sector after a MiB boundary.
    let p2 = m.partitions.iter_mut().find(|p| p.number == 2).unwrap();
    p2.start_bytes += 512;
    p2.size_bytes -= 512;
    m.volumes[1].size_bytes -= 512;
    assert!(validate(&m).is_empty(), "{:?}", validate(&m));
    let t = TargetDisk {
        physical_sector_size: 4096,
        ..twin(&m, "disk0", "vda")
    };
    let p = plan(&m, &[t], &[], Policy::default()).unwrap();
    for part in &p.targets[0].partitions {
        assert_eq!(
            part.start_bytes % MIB,
            0,
            "{} starts at {}",
            part.device,
            part.start_bytes
        );
    }
}

#[test]
fn target_too_small_for_the_system_volume_is_refused_with_numbers() {
    let m = server();
    let e = err(&m, &[target("vda", GIB)], &[]);
    let PlanError::CriticalTooBig(msg) = &e else {
        panic!("expected CriticalTooBig, got {e:?}")
    };
    // Needed: esp 64 MiB + boot 128 MiB + root 2 GiB = 2240 MiB; usable:
    // 1 GiB minus the first and the last MiB = 1022 MiB.
    assert!(msg.starts_with("/dev/vda (1 GiB)"), "{msg}");
    for needle in [
        size(2240 * MIB),
        size(1022 * MIB),
        "esp 64 MiB".into(),
        "boot 128 MiB".into(),
        "root 2 GiB".into(),
    ] {
        assert_contains(msg, &needle);
    }
    assert_eq!(e.to_string(), *msg);
}

/// root (4 GiB, min 2 GiB), data (4 GiB, min 2 GiB + 100 KiB), swap (1 GiB).
fn droppy() -> Manifest {
    build(
        Firmware::Uefi,
        &[disk(
            "disk0",
            TableType::Gpt,
            16 * GIB,
            vec![
                vs("root", Role::System, "ext4", 4 * GIB, 2 * GIB),
                vs("data", Role::Data, "ext4", 4 * GIB, 2 * GIB + 100 * KIB),
                vs("swap", Role::Swap, "swap", GIB, GIB),
            ],
        )],
    )
}

#[test]
fn data_volume_dropped_for_lack_of_space() {
    let m = droppy();
    // 5 GiB: 5118 MiB usable; minimums 2048 + 2049 + 1024 = 5121 MiB: swap goes first.
    let p = ok(&m, &[target("vda", 5 * GIB)], &[], Policy::default());
    assert_eq!(p.dropped.len(), 1);
    assert_eq!(
        (
            p.dropped[0].id.as_str(),
            p.dropped[0].role,
            p.dropped[0].needed_bytes
        ),
        ("swap", Role::Swap, GIB)
    );
    assert_eq!(vol(&p, "data").size_bytes, 2049 * MIB);
    assert_eq!(vol(&p, "data").action, Action::RestoreFiles);
    assert_eq!(vol(&p, "root").size_bytes, 2048 * MIB + 1021 * MIB);
    assert_eq!(vol(&p, "swap").action, Action::Drop);

    // 3 GiB: 3070 MiB usable: swap, then data go; root takes the space.
    let p = ok(&m, &[target("vda", 3 * GIB)], &[], Policy::default());
    let dropped: Vec<(&str, u64)> = p
        .dropped
        .iter()
        .map(|d| (d.id.as_str(), d.needed_bytes))
        .collect();
    assert_eq!(dropped, [("swap", GIB), ("data", 2049 * MIB)]);
    let d = &p.dropped[1];
    assert_contains(&d.reason, "not enough room on /dev/vda");
    let data = vol(&p, "data");
    assert_eq!(
        (
            data.action,
            data.target_device.as_str(),
            data.size_bytes,
            data.partition_number
        ),
        (Action::Drop, "", 0, 0)
    );
    assert_eq!(data.reason, d.reason);
    assert_eq!(vol(&p, "root").size_bytes, 3070 * MIB);
    assert_eq!(p.targets[0].partitions.len(), 1);
}

#[test]
fn map_option() {
    let m = crate::manifest::tests::sample();
    let mut protected = target("vdd", 64 * GIB);
    protected.protected = Some("holds the recovery medium".into());
    let targets = [
        twin(&m, "disk0", "vda"),
        twin(&m, "disk1", "vdb"),
        target("vdc", 50 * GIB),
        protected,
    ];

    // Explicit mapping wins over identity, by device or by name.
    for dev in ["/dev/vdc", "vdc"] {
        let p = ok(&m, &targets, &[("disk0", dev)], Policy::default());
        assert_eq!(mapped(&p, "disk0").target, "/dev/vdc");
        assert_eq!(
            mapped(&p, "disk0").reason,
            format!("mapped by --map disk0={dev}")
        );
        assert_eq!(mapped(&p, "disk1").target, "/dev/vdb");
        assert!(!p.target_devices().contains(&"/dev/vda"));
    }
    // Identity when there is no --map.
    let p = ok(&m, &targets, &[], Policy::default());
    assert_eq!(mapped(&p, "disk0").target, "/dev/vda");

    assert_eq!(
        err(&m, &targets, &[("disk9", "/dev/vdc")]),
        PlanError::UnknownSavedDisk("disk9".into(), "disk0, disk1".into())
    );
    assert_contains(
        &err(&m, &targets, &[("disk9", "/dev/vdc")]).to_string(),
        "saved disks are disk0, disk1",
    );
    assert_eq!(
        err(&m, &targets, &[("disk0", "/dev/sdz")]),
        PlanError::UnknownTarget(
            "disk0".into(),
            "/dev/sdz".into(),
            "/dev/vda, /dev/vdb, /dev/vdc, /dev/vdd".into()
        )
    );
    let e = err(&m, &targets, &[("disk0", "/dev/vdd")]);
    assert_eq!(
        e,
        PlanError::ProtectedTarget(
            "disk0".into(),
            "/dev/vdd".into(),
            "holds the recovery medium".into()
        )
    );
    assert_contains(&e.to_string(), "protected (holds the recovery medium)");
    assert_eq!(
        err(
            &m,
            &targets,
            &[("disk0", "/dev/vdc"), ("disk0", "/dev/vda")]
        ),
        PlanError::MappedTwice("disk0".into())
    );

    // No usable target at all.
    let all: Vec<TargetDisk> = targets
        .iter()
        .map(|t| TargetDisk {
            protected: Some(format!("{} is busy", t.name)),
            ..t.clone()
        })
        .collect();
    let e = err(&m, &all, &[]);
    let PlanError::NoTargets(why) = &e else {
        panic!("expected NoTargets, got {e:?}")
    };
    for t in &all {
        assert_contains(
            why,
            &format!("{} is protected ({} is busy)", t.device, t.name),
        );
    }
    assert_eq!(
        err(&m, &[], &[]),
        PlanError::NoTargets("none was found".into())
    );
}

#[test]
fn protected_own_disk_is_avoided_with_a_warning() {
    let m = server();
    let mut own = twin(&m, "disk0", "vda");
    own.serial = "SER-OWN".into();
    let mut m = m;
    m.disks[0].serial = "SER-OWN".into();
    own.protected = Some("holds the rescue medium".into());
    let p = ok(&m, &[own, target("vdb", 32 * GIB)], &[], Policy::default());
    assert_eq!(mapped(&p, "disk0").target, "/dev/vdb");
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("/dev/vda is protected (holds the rescue medium)")),
        "{:?}",
        p.warnings
    );
}

#[test]
fn keep_intact_skips_only_intact_non_critical_volumes() {
    let m = crate::manifest::tests::sample();
    let mut t0 = twin(&m, "disk0", "vda");
    t0.existing = existing_of(&m, "disk0");
    let t1 = twin(&m, "disk1", "vdb");
    let keep = Policy {
        keep_intact: true,
        ..Policy::default()
    };

    let p = ok(&m, &[t0.clone(), t1.clone()], &[], keep);
    assert_eq!(vol(&p, "data").action, Action::Skip);
    assert_contains(&vol(&p, "data").reason, "already intact");
    assert_eq!(vol(&p, "swap").action, Action::Skip);
    // Boot-critical volumes are always restored, intact or not.
    assert_eq!(vol(&p, "root").action, Action::RestoreImage);
    assert_eq!(vol(&p, "esp").action, Action::RestoreImage);
    // Nothing intact on disk1's target.
    assert_eq!(vol(&p, "home").action, Action::RestoreImage);

    // Without --keep-intact nothing is skipped.
    let p = ok(&m, &[t0.clone(), t1.clone()], &[], Policy::default());
    assert!(p.volumes.iter().all(|v| v.action != Action::Skip));

    // Another filesystem UUID, or another place, is not the same volume.
    let data = m.partition_of("data").unwrap().number;
    for change in [0, 1] {
        let mut t = t0.clone();
        let e = t.existing.iter_mut().find(|e| e.number == data).unwrap();
        if change == 0 {
            e.uuid = "0000000000000000".into();
        } else {
            e.start_bytes += MIB;
        }
        let p = ok(&m, &[t, t1.clone()], &[], keep);
        assert_eq!(vol(&p, "data").action, Action::RestoreImage);
    }
}

#[test]
fn volumes_are_in_restore_priority_order() {
    let m = build(
        Firmware::Uefi,
        &[disk(
            "disk0",
            TableType::Gpt,
            0,
            vec![
                vs("data1", Role::Data, "ext4", 64 * MIB, 16 * MIB),
                vs("swap", Role::Swap, "swap", 64 * MIB, 64 * MIB),
                vs("root", Role::System, "ext4", 256 * MIB, 64 * MIB),
                vs("esp", Role::Esp, "vfat", 64 * MIB, 64 * MIB),
                vs("boot", Role::Boot, "ext4", 64 * MIB, 16 * MIB),
                vs("data2", Role::Data, "ext4", 64 * MIB, 16 * MIB),
            ],
        )],
    );
    let p = ok(&m, &[target("vda", GIB)], &[], Policy::default());
    let ids: Vec<&str> = p.volumes.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(ids, ["esp", "boot", "root", "data1", "data2", "swap"]);
}

#[test]
fn json_shape_is_stable() {
    let m = crate::manifest::tests::sample();
    let p = ok(
        &m,
        &[twin(&m, "disk0", "vda"), twin(&m, "disk1", "vdb")],
        &[],
        Policy::default(),
    );
    let j = serde_json::to_value(&p).unwrap();
    for key in ["disks", "volumes", "dropped", "warnings"] {
        assert!(j[key].is_array(), "{key} missing in {j}");
    }
    for d in j["disks"].as_array().unwrap() {
        for key in ["saved", "target", "reason"] {
            assert!(d[key].is_string(), "disks[].{key} missing in {d}");
        }
    }
    let vols = j["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 6);
    for v in vols {
        for key in ["id", "role", "action", "target_device", "reason"] {
            assert!(v[key].is_string(), "volumes[].{key} missing in {v}");
        }
        for key in ["start_bytes", "size_bytes"] {
            assert!(v[key].is_u64(), "volumes[].{key} missing in {v}");
        }
    }
    assert_eq!(vols[0]["id"], "esp");
    assert_eq!(vols[0]["role"], "esp");
    assert_eq!(vols[0]["action"], "restore-image");
    assert_eq!(vols[0]["target_device"], "/dev/vda1");
    assert_eq!(vols[0]["start_bytes"], MIB);
    assert_eq!(vols[0]["size_bytes"], 512 * MIB);
    assert_eq!(vols.last().unwrap()["action"], "create");
    assert_eq!(j["disks"][0]["saved"], "disk0");
    assert_eq!(j["disks"][0]["target"], "/dev/vda");

    // Dropped entries and the other action names.
    let p = ok(&droppy(), &[target("vda", 3 * GIB)], &[], Policy::default());
    let j = serde_json::to_value(&p).unwrap();
    let d = &j["dropped"][0];
    assert_eq!(
        (
            d["id"].as_str(),
            d["role"].as_str(),
            d["needed_bytes"].as_u64()
        ),
        (Some("swap"), Some("swap"), Some(GIB))
    );
    assert!(d["reason"].is_string());
    let actions: Vec<&str> = j["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["restore-files", "drop", "drop"]);
    for (a, s) in [
        (Action::RestoreImage, "restore-image"),
        (Action::RestoreFiles, "restore-files"),
        (Action::Create, "create"),
        (Action::Skip, "skip"),
        (Action::Drop, "drop"),
    ] {
        assert_eq!(serde_json::to_value(a).unwrap(), s);
        assert_eq!(a.to_string(), s);
    }
}

#[test]
fn saved_disk_without_partitions_writes_no_target() {
    // capture records disks it was pointed at even when they hold no table
    // (an empty disk, a whole-disk filesystem it does not record yet).
    let mut m = crate::manifest::tests::sample();
    let mut empty = m.disks[1].clone();
    empty.id = "disk2".into();
    empty.table = TableType::None;
    empty.signature = None;
    empty.serial = "EMPTY".into();
    m.disks.push(empty);
    assert!(validate(&m).is_empty(), "{:?}", validate(&m));
    let other = target("vdc", 8 * GIB);
    let p = plan(
        &m,
        &[twin(&m, "disk0", "vda"), twin(&m, "disk1", "vdb"), other],
        &[],
        Policy::default(),
    )
    .unwrap();
    assert_eq!(
        p.target_devices(),
        ["/dev/vda", "/dev/vdb"],
        "{:#?}",
        p.targets
    );
}

#[test]
fn a_disk_of_the_saved_size_holds_the_whole_saved_layout() {
    // Partitions from 1 MiB to 255 MiB of a 256 MiB GPT disk: the backup
    // GPT sits in the last MiB, as on the disk that was saved.
    let m = build(
        Firmware::Uefi,
        &[disk(
            "disk0",
            TableType::Gpt,
            256 * MIB,
            vec![
                vs("esp", Role::Esp, "vfat", 32 * MIB, 32 * MIB),
                vs("root", Role::System, "ext4", 160 * MIB, 64 * MIB),
                vs("data", Role::Data, "ext4", 62 * MIB, 16 * MIB),
            ],
        )],
    );
    let p = ok(&m, &[target("sda", 256 * MIB)], &[], Policy::default());
    assert_contains(&mapped(&p, "disk0").reason, "holds the whole saved layout");
    for v in &p.volumes {
        assert_eq!(v.size_bytes, v.saved_size_bytes, "{}", v.id);
    }
}

// ---------------------------------------------------------------------------
// The operator's adjustments (the guided plan screen)
// ---------------------------------------------------------------------------

fn adjusted(m: &Manifest, t: &[TargetDisk], sizing: Sizing, a: &Adjust) -> Result<Plan, PlanError> {
    plan_adjusted(
        m,
        t,
        &[],
        Policy {
            sizing,
            ..Policy::default()
        },
        a,
    )
}

#[test]
fn an_excluded_data_volume_frees_its_space_for_the_others() {
    let m = server();
    let t = [target("vda", 32 * GIB)];
    let before = adjusted(&m, &t, Sizing::Proportional, &Adjust::default()).unwrap();
    let a = Adjust {
        exclude: vec!["data".into()],
        ..Adjust::default()
    };
    let p = adjusted(&m, &t, Sizing::Proportional, &a).unwrap();
    assert_eq!(vol(&p, "data").action, Action::Drop);
    assert!(p
        .dropped
        .iter()
        .any(|d| d.id == "data" && d.reason.contains("excluded by the operator")));
    assert!(!tgt(&p, "/dev/vda")
        .partitions
        .iter()
        .any(|pp| pp.volume.as_deref() == Some("data")));
    assert!(vol(&p, "root").size_bytes > vol(&before, "root").size_bytes);
    assert_eq!(p.adjust, a);
}

#[test]
fn what_boots_cannot_be_excluded_and_unknown_names_are_errors() {
    let m = server();
    let t = [target("vda", 32 * GIB)];
    for (a, want) in [
        (
            Adjust {
                exclude: vec!["root".into()],
                ..Adjust::default()
            },
            "cannot be excluded",
        ),
        (
            Adjust {
                exclude: vec!["esp".into()],
                ..Adjust::default()
            },
            "cannot be excluded",
        ),
        (
            Adjust {
                exclude: vec!["nope".into()],
                ..Adjust::default()
            },
            "no volume named nope",
        ),
        (
            Adjust {
                sizes: vec![("nope".into(), GIB)],
                ..Adjust::default()
            },
            "no volume named nope",
        ),
        (
            Adjust {
                sizes: vec![("root".into(), GIB)],
                ..Adjust::default()
            },
            "needs at least 2 GiB",
        ),
    ] {
        let e = adjusted(&m, &t, Sizing::Proportional, &a)
            .unwrap_err()
            .to_string();
        assert_contains(&e, want);
    }
}

#[test]
fn an_asked_size_is_kept_and_the_rest_shares_what_is_left() {
    let m = server();
    let t = [target("vda", 32 * GIB)];
    for sizing in [Sizing::Proportional, Sizing::GrowLast] {
        let a = Adjust {
            sizes: vec![("root".into(), 5 * GIB + 1)],
            ..Adjust::default()
        };
        let p = adjusted(&m, &t, sizing, &a).unwrap();
        assert_eq!(vol(&p, "root").size_bytes, 5 * GIB + MIB, "{sizing:?}");
        assert_contains(&vol(&p, "root").reason, "size set by the operator");
        // data takes the rest of the disk: nothing is left unallocated.
        let last = tgt(&p, "/dev/vda")
            .partitions
            .iter()
            .map(|pp| pp.end_bytes())
            .max()
            .unwrap();
        assert!(
            32 * GIB - last < 2 * MIB,
            "{sizing:?}: {} left",
            32 * GIB - last
        );
        assert!(vol(&p, "data").size_bytes > 8 * GIB);
    }
    // Smaller than saved but above the minimum: files are copied.
    let a = Adjust {
        sizes: vec![("root".into(), 3 * GIB)],
        ..Adjust::default()
    };
    let p = adjusted(&m, &t, Sizing::Proportional, &a).unwrap();
    assert_eq!(vol(&p, "root").action, Action::RestoreFiles);
}

#[test]
fn a_size_too_big_is_refused_naming_the_most_it_can_have() {
    let m = server();
    let t = [target("vda", 16 * GIB)];
    let a = Adjust {
        sizes: vec![("root".into(), 15 * GIB)],
        ..Adjust::default()
    };
    let e = adjusted(&m, &t, Sizing::Proportional, &a)
        .unwrap_err()
        .to_string();
    assert_contains(&e, "root: 15 GiB does not fit on /dev/vda; at most");
}

#[test]
fn size_bounds_are_exactly_what_fits() {
    let m = server();
    let t = [target("vda", 16 * GIB)];
    let policy = Policy::default();
    let (lo, hi) = size_bounds(&m, &t, &[], policy, &Adjust::default(), "root").unwrap();
    assert_eq!(lo, 2 * GIB);
    let at = |bytes: u64| Adjust {
        sizes: vec![("root".into(), bytes)],
        ..Adjust::default()
    };
    for b in [lo, hi] {
        let p = plan_adjusted(&m, &t, &[], policy, &at(b)).unwrap();
        assert!(p.dropped.is_empty(), "{b}: {:?}", p.dropped);
        assert_eq!(vol(&p, "root").size_bytes, b);
    }
    let over = plan_adjusted(&m, &t, &[], policy, &at(hi + MIB));
    assert!(over.is_err() || !over.unwrap().dropped.is_empty());
    // The other volumes at their minimums take the rest.
    assert!(hi > 8 * GIB && hi < 16 * GIB, "{hi}");
}

#[test]
fn an_adjusted_same_size_disk_no_longer_keeps_the_saved_layout() {
    let m = crate::manifest::tests::sample();
    let t = [twin(&m, "disk0", "vda"), twin(&m, "disk1", "vdb")];
    let a = Adjust {
        exclude: vec!["data".into()],
        ..Adjust::default()
    };
    let p = plan_adjusted(&m, &t, &[], Policy::default(), &a).unwrap();
    assert!(!tgt(&p, "/dev/vda")
        .reason
        .contains("same size as the saved disk"));
    assert_contains(&tgt(&p, "/dev/vdb").reason, "same size as the saved disk");
    assert_eq!(vol(&p, "data").action, Action::Drop);
}

#[test]
fn plans_saved_before_adjustments_still_read() {
    let m = server();
    let p = ok(&m, &[target("vda", 32 * GIB)], &[], Policy::default());
    let mut v = serde_json::to_value(&p).unwrap();
    assert!(
        v.get("adjust").is_none(),
        "an empty adjustment is not written"
    );
    v.as_object_mut().unwrap().remove("adjust");
    let back: Plan = serde_json::from_value(v).unwrap();
    assert_eq!(back, p);
}

#[test]
fn on_a_disk_too_small_for_everything_the_rest_can_still_be_resized() {
    let m = server();
    // Room for esp, boot, root and swap at their minimums, not for data too.
    let t = [target("vda", 5 * GIB)];
    let before = adjusted(&m, &t, Sizing::Proportional, &Adjust::default()).unwrap();
    assert!(
        before.dropped.iter().any(|d| d.id == "data"),
        "{:?}",
        before.dropped
    );
    let (lo, hi) = size_bounds(&m, &t, &[], Policy::default(), &Adjust::default(), "root").unwrap();
    assert_eq!(lo, 2 * GIB);
    assert!(hi > lo);
    let a = Adjust {
        sizes: vec![("root".into(), hi)],
        ..Adjust::default()
    };
    let p = adjusted(&m, &t, Sizing::Proportional, &a).unwrap();
    assert_eq!(vol(&p, "root").size_bytes, hi);
    let ids = |p: &Plan| p.dropped.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&p), ids(&before), "nothing more is dropped");
    // Beyond the bound: an error, not a panic or another volume dropped.
    let a = Adjust {
        sizes: vec![("root".into(), hi + 64 * MIB)],
        ..Adjust::default()
    };
    assert!(adjusted(&m, &t, Sizing::Proportional, &a).is_err());
}

#[test]
fn an_asked_data_size_never_blames_the_boot_volumes() {
    let m = server();
    let t = [target("vda", 2 * GIB)];
    let a = Adjust {
        sizes: vec![("data".into(), 6 * GIB)],
        ..Adjust::default()
    };
    // The critical volumes alone do not fit: that is the error, said as before.
    let e = adjusted(&m, &t, Sizing::Proportional, &a).unwrap_err();
    assert!(matches!(e, PlanError::CriticalTooBig(_)), "{e}");
}
