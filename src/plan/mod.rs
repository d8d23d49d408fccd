//! Saved layout + the disks this machine has now -> a `Plan`: which saved
//! disk goes where, where each partition lands, how big each volume becomes
//! and what is done to it, each decision with its reason. Pure: no I/O, so the
//! plan shown, printed and executed is the same value.

mod layout;
mod mapping;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::manifest::{Manifest, MbrKind, Role, TableType};

/// A disk this machine has, as planning needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetDisk {
    pub device: String,
    pub name: String,
    pub size_bytes: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub wwn: String,
    pub serial: String,
    pub model: String,
    /// Why this disk must never be written (holds the recovery medium, is in use, ...).
    pub protected: Option<String>,
    /// Partitions found on it now, for `skip`.
    pub existing: Vec<ExistingPartition>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExistingPartition {
    pub number: u32,
    pub start_bytes: u64,
    pub size_bytes: u64,
    pub filesystem: String,
    pub uuid: String,
}

/// How spare space is given out once every volume has its saved size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Sizing {
    /// Leave it unallocated at the end of the disk.
    Keep,
    /// Give it to the last system or data volume on the disk.
    GrowLast,
    /// Share it among system and data volumes in proportion to their saved sizes
    /// (the default: the disk is used as the admin laid it out, scaled up;
    /// ESP, /boot and swap keep their sizes since they gain nothing from growth).
    #[default]
    Proportional,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub sizing: Sizing,
    /// Keep data and swap volumes that are already intact on the target (seed 000).
    pub keep_intact: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Block restore of the image, then grow the filesystem to the partition.
    RestoreImage,
    /// New filesystem with the saved UUID and label, then a file-level copy.
    RestoreFiles,
    /// Nothing to restore (swap): made new with the saved UUID and label.
    Create,
    /// Already intact on the target; left as it is.
    Skip,
    /// Not restored.
    Drop,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Action::RestoreImage => "restore-image",
            Action::RestoreFiles => "restore-files",
            Action::Create => "create",
            Action::Skip => "skip",
            Action::Drop => "drop",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// One entry per saved disk: where it goes.
    pub disks: Vec<DiskMapping>,
    /// One entry per target disk that will be written: its new table.
    pub targets: Vec<TargetPlan>,
    pub volumes: Vec<VolumePlan>,
    pub dropped: Vec<Dropped>,
    pub warnings: Vec<String>,
    pub policy: Policy,
    /// What the operator changed (the guided screens); empty otherwise.
    #[serde(default, skip_serializing_if = "Adjust::is_empty")]
    pub adjust: Adjust,
}

/// What the operator changed on the plan screen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adjust {
    /// Non-critical volumes left out: not restored, no partition.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Volume id -> the size asked for, in bytes.
    #[serde(default)]
    pub sizes: Vec<(String, u64)>,
}

impl Adjust {
    pub fn is_empty(&self) -> bool {
        self.exclude.is_empty() && self.sizes.is_empty()
    }

    pub fn excluded(&self, id: &str) -> bool {
        self.exclude.iter().any(|v| v == id)
    }

    pub fn size_of(&self, id: &str) -> Option<u64> {
        self.sizes.iter().find(|(v, _)| v == id).map(|&(_, s)| s)
    }

    fn touches(&self, id: &str) -> bool {
        self.excluded(id) || self.size_of(id).is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskMapping {
    pub saved: String,
    pub target: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetPlan {
    pub device: String,
    pub name: String,
    pub size_bytes: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Identity the plan saw, checked again before anything is written.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub wwn: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub serial: String,
    pub saved: Vec<String>,
    pub table: TableType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guid: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    pub partitions: Vec<PlannedPartition>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedPartition {
    pub number: u32,
    /// Device node the partition will have: /dev/vdb2.
    pub device: String,
    pub start_bytes: u64,
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_guid: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guid: Option<Uuid>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mbr_type: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mbr_kind: Option<MbrKind>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bootable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The saved partition this one recreates (`disk0:2`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

impl PlannedPartition {
    pub fn end_bytes(&self) -> u64 {
        self.start_bytes + self.size_bytes
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumePlan {
    pub id: String,
    pub role: Role,
    pub filesystem: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    pub action: Action,
    /// Partition device (/dev/vdb2); empty when dropped.
    pub target_device: String,
    pub target_disk: String,
    pub partition_number: u32,
    pub start_bytes: u64,
    pub size_bytes: u64,
    pub saved_size_bytes: u64,
    pub min_size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub id: String,
    pub role: Role,
    /// The space it would have needed (its minimum size).
    pub needed_bytes: u64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("--map names {0}, but the saved disks are {1}")]
    UnknownSavedDisk(String, String),
    #[error("--map {0}={1}: {1} is not among the disks found ({2}); name it with --disk or check the name")]
    UnknownTarget(String, String, String),
    #[error("--map {0}={1}: {1} is protected ({2}) and is never written")]
    ProtectedTarget(String, String, String),
    #[error("--map maps {0} twice")]
    MappedTwice(String),
    #[error("no disk to restore onto: {0}; attach a disk or name one with --disk")]
    NoTargets(String),
    #[error("{0}")]
    CriticalTooBig(String),
    /// An operator's change the layout cannot take.
    #[error("{0}")]
    Adjust(String),
}

pub(crate) const MIB: u64 = 1 << 20;

/// Makes the plan. `map` pairs saved disk ids with target devices.
pub fn plan(
    m: &Manifest,
    targets: &[TargetDisk],
    map: &[(String, String)],
    policy: Policy,
) -> Result<Plan, PlanError> {
    plan_adjusted(m, targets, map, policy, &Adjust::default())
}

/// The plan with the operator's exclusions and sizes; a change the disks
/// cannot take is an error, never a silently dropped volume.
pub fn plan_adjusted(
    m: &Manifest,
    targets: &[TargetDisk],
    map: &[(String, String)],
    policy: Policy,
    adjust: &Adjust,
) -> Result<Plan, PlanError> {
    check_adjust(m, adjust)?;
    let mut warnings = Vec::new();
    let mapping = mapping::map_disks(m, targets, map, &mut warnings)?;
    let mut plan = Plan {
        disks: Vec::new(),
        targets: Vec::new(),
        volumes: Vec::new(),
        dropped: Vec::new(),
        warnings: Vec::new(),
        policy,
        adjust: adjust.clone(),
    };
    for (saved, target, reason) in &mapping {
        plan.disks.push(DiskMapping {
            saved: m.disks[*saved].id.clone(),
            target: targets[*target].device.clone(),
            reason: reason.clone(),
        });
    }
    // Targets in the order of the first saved disk mapped to them: boot-critical first.
    let mut order: Vec<usize> = Vec::new();
    for (_, t, _) in &mapping {
        if !order.contains(t) {
            order.push(*t);
        }
    }
    for t in order {
        let saved: Vec<usize> = mapping
            .iter()
            .filter(|(_, tt, _)| *tt == t)
            .map(|(s, _, _)| *s)
            .collect();
        let out = layout::layout(m, &targets[t], &saved, policy, adjust, &mut warnings)?;
        plan.targets.push(out.target);
        plan.volumes.extend(out.volumes);
        plan.dropped.extend(out.dropped);
    }
    // Volumes in restore priority: boot-critical first.
    plan.volumes.sort_by_key(|v| layout::priority(m, &v.id));
    plan.warnings = warnings;
    Ok(plan)
}

fn check_adjust(m: &Manifest, adjust: &Adjust) -> Result<(), PlanError> {
    let ids = adjust
        .exclude
        .iter()
        .chain(adjust.sizes.iter().map(|(v, _)| v));
    for id in ids {
        if m.volume(id).is_none() {
            return Err(PlanError::Adjust(format!(
                "no volume named {id} in the saved layout"
            )));
        }
    }
    for id in &adjust.exclude {
        if m.volume(id).is_some_and(|v| v.role.is_critical()) {
            return Err(PlanError::Adjust(format!(
                "{id} is a boot-critical volume and cannot be excluded"
            )));
        }
    }
    for (id, bytes) in &adjust.sizes {
        let Some(v) = m.volume(id) else { continue };
        if *bytes < v.min_size_bytes {
            return Err(PlanError::Adjust(format!(
                "{id} needs at least {} (its data); {} is too small",
                crate::report::size(v.min_size_bytes),
                crate::report::size(*bytes)
            )));
        }
    }
    Ok(())
}

/// The smallest and largest size `volume` can be given, with everything
/// else as `adjust` has it, without dropping a volume the plan keeps now.
pub fn size_bounds(
    m: &Manifest,
    targets: &[TargetDisk],
    map: &[(String, String)],
    policy: Policy,
    adjust: &Adjust,
    volume: &str,
) -> Result<(u64, u64), PlanError> {
    let now = plan_adjusted(m, targets, map, policy, adjust)?;
    let v = now
        .volumes
        .iter()
        .find(|v| v.id == volume)
        .ok_or_else(|| PlanError::Adjust(format!("no volume named {volume} in the plan")))?;
    if v.action == Action::Drop {
        return Err(PlanError::Adjust(format!("{volume} is not restored")));
    }
    let with = |bytes: u64| {
        let mut a = adjust.clone();
        a.sizes.retain(|(id, _)| id != volume);
        a.sizes.push((volume.to_string(), bytes));
        a
    };
    let keeps = |bytes: u64| {
        plan_adjusted(m, targets, map, policy, &with(bytes)).is_ok_and(|p| {
            p.dropped
                .iter()
                .all(|d| now.dropped.iter().any(|n| n.id == d.id))
        })
    };
    let lo = v.min_size_bytes.max(1).div_ceil(MIB) * MIB;
    if !keeps(lo) {
        return Err(PlanError::Adjust(format!(
            "{volume} cannot be resized on {}: no room besides the other volumes",
            v.target_disk
        )));
    }
    // The plan is monotonic in the size: fits up to some bound, not beyond.
    let disk = targets
        .iter()
        .find(|t| t.device == v.target_disk)
        .map_or(lo, |t| t.size_bytes);
    let (mut ok, mut bad) = (lo / MIB, disk / MIB + 1);
    while bad - ok > 1 {
        let mid = ok + (bad - ok) / 2;
        if keeps(mid * MIB) {
            ok = mid;
        } else {
            bad = mid;
        }
    }
    Ok((lo, ok * MIB))
}

impl Plan {
    /// Everything a run of apply would destroy, for confirmations.
    pub fn target_devices(&self) -> Vec<&str> {
        self.targets.iter().map(|t| t.device.as_str()).collect()
    }

    pub fn is_ambiguous(&self) -> bool {
        self.warnings.iter().any(|w| w.contains("equally suitable"))
    }
}

#[cfg(test)]
mod tests;
