//! Which target disk each saved disk goes to: the user's --map first, then
//! identity (WWN, serial), then fit, consolidating several saved disks onto
//! one target when there are fewer targets than saved disks.

use super::layout::{demand, ideal, saved_parts, usable_bytes};
use super::{PlanError, TargetDisk};
use crate::manifest::Manifest;
use crate::report::size;

/// `(saved disk index, target index, reason)` for every saved disk.
pub type Mapping = Vec<(usize, usize, String)>;

fn holds_critical(m: &Manifest, disk: &str) -> bool {
    m.partitions
        .iter()
        .filter(|p| p.disk == disk)
        .filter_map(|p| p.volume.as_deref())
        .filter_map(|v| m.volume(v))
        .any(|v| v.role.is_critical())
}

fn same_identity(m: &Manifest, saved: usize, t: &TargetDisk) -> Option<&'static str> {
    let d = &m.disks[saved];
    if !d.wwn.is_empty() && d.wwn.eq_ignore_ascii_case(&t.wwn) {
        Some("WWN")
    } else if !d.serial.is_empty() && d.serial == t.serial {
        Some("serial number")
    } else {
        None
    }
}

pub fn map_disks(
    m: &Manifest,
    targets: &[TargetDisk],
    map: &[(String, String)],
    warnings: &mut Vec<String>,
) -> Result<Mapping, PlanError> {
    let usable: Vec<usize> = (0..targets.len())
        .filter(|&t| targets[t].protected.is_none())
        .collect();
    if usable.is_empty() {
        let why = if targets.is_empty() {
            "none was found".to_string()
        } else {
            targets
                .iter()
                .map(|t| {
                    format!(
                        "{} is protected ({})",
                        t.device,
                        t.protected.as_deref().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(PlanError::NoTargets(why));
    }
    let mut result: Vec<Option<(usize, String)>> = vec![None; m.disks.len()];
    // A saved disk without partitions has nothing to restore: it claims no target.
    let empty: Vec<bool> = (0..m.disks.len())
        .map(|s| saved_parts(m, s).is_empty())
        .collect();
    for (_, d) in m.disks.iter().enumerate().filter(|(s, _)| empty[*s]) {
        warnings.push(format!(
            "{} ({}) was saved without partitions: nothing to restore on it",
            d.id, d.device
        ));
    }

    for (saved, dev) in map {
        let s = m.disks.iter().position(|d| &d.id == saved).ok_or_else(|| {
            PlanError::UnknownSavedDisk(
                saved.clone(),
                m.disks
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })?;
        let t = targets
            .iter()
            .position(|t| &t.device == dev || &t.name == dev)
            .ok_or_else(|| {
                PlanError::UnknownTarget(
                    saved.clone(),
                    dev.clone(),
                    targets
                        .iter()
                        .map(|t| t.device.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })?;
        if let Some(why) = &targets[t].protected {
            return Err(PlanError::ProtectedTarget(
                saved.clone(),
                dev.clone(),
                why.clone(),
            ));
        }
        if result[s].is_some() {
            return Err(PlanError::MappedTwice(saved.clone()));
        }
        if empty[s] {
            continue;
        }
        result[s] = Some((t, format!("mapped by --map {saved}={dev}")));
    }

    // Boot-critical disks choose first.
    let mut order: Vec<usize> = (0..m.disks.len()).collect();
    order.sort_by_key(|&s| !holds_critical(m, &m.disks[s].id));
    let taken = |result: &[Option<(usize, String)>], t: usize| {
        result.iter().flatten().any(|(tt, _)| *tt == t)
    };

    for &s in &order {
        if result[s].is_some() || empty[s] {
            continue;
        }
        if let Some(&t) = usable
            .iter()
            .find(|&&t| same_identity(m, s, &targets[t]).is_some() && !taken(&result, t))
        {
            let what = same_identity(m, s, &targets[t]).unwrap_or("identity");
            result[s] = Some((t, format!("same disk: {what} matches")));
        } else if let Some(t) = targets
            .iter()
            .position(|t| t.protected.is_some() && same_identity(m, s, t).is_some())
        {
            warnings.push(format!(
                "{}'s own disk {} is protected ({}); restoring elsewhere",
                m.disks[s].id,
                targets[t].device,
                targets[t].protected.as_deref().unwrap_or("")
            ));
        }
    }

    // Room left on each target, in bytes of saved layout it can still take.
    let mut left: Vec<u64> = targets.iter().map(usable_bytes).collect();
    for (s, r) in result.iter().enumerate() {
        if let Some((t, _)) = r {
            left[*t] = left[*t].saturating_sub(ideal(m, s));
        }
    }
    for &s in &order {
        if result[s].is_some() || empty[s] {
            continue;
        }
        let (need, want) = (demand(m, s), ideal(m, s));
        let free: Vec<usize> = usable
            .iter()
            .copied()
            .filter(|&t| !taken(&result, t))
            .collect();
        let mut pick = |cands: Vec<usize>, smallest: bool| -> Option<usize> {
            let best = if smallest {
                cands.iter().map(|&t| targets[t].size_bytes).min()?
            } else {
                cands.iter().map(|&t| targets[t].size_bytes).max()?
            };
            let mut equal: Vec<usize> = cands
                .into_iter()
                .filter(|&t| targets[t].size_bytes == best)
                .collect();
            equal.sort_by(|&a, &b| targets[a].device.cmp(&targets[b].device));
            if equal.len() > 1 {
                let names: Vec<&str> = equal.iter().map(|&t| targets[t].device.as_str()).collect();
                warnings.push(format!(
                    "{}: {} are equally suitable; chose {} (first by name); use --map to choose",
                    m.disks[s].id,
                    names.join(" and "),
                    names[0]
                ));
            }
            equal.first().copied()
        };
        let fits_all: Vec<usize> = free.iter().copied().filter(|&t| left[t] >= want).collect();
        let fits_min: Vec<usize> = free.iter().copied().filter(|&t| left[t] >= need).collect();
        let (t, reason) = if let Some(t) = pick(fits_all, true) {
            (
                t,
                format!(
                    "smallest free disk that holds the whole saved layout ({})",
                    size(want)
                ),
            )
        } else if let Some(t) = pick(fits_min, false) {
            (t, format!("largest free disk; smaller than the saved layout ({}) but holds the volumes' minimums ({})", size(want), size(need)))
        } else {
            let mut all = usable.clone();
            all.sort_by(|&a, &b| {
                left[b]
                    .cmp(&left[a])
                    .then(targets[a].device.cmp(&targets[b].device))
            });
            let t = all[0];
            let with: Vec<&str> = result
                .iter()
                .enumerate()
                .filter(|(_, r)| r.as_ref().is_some_and(|(tt, _)| *tt == t))
                .map(|(i, _)| m.disks[i].id.as_str())
                .collect();
            let how = if left[t] >= need {
                "has room for its volumes"
            } else {
                "has the most room left: boot-critical volumes first, what does not fit is dropped"
            };
            let shared = if with.is_empty() {
                String::new()
            } else {
                format!(", consolidated with {}", with.join(", "))
            };
            (t, format!("no free disk holds all of {}'s volumes at their minimum size ({}); {} {how}{shared}", m.disks[s].id, size(need), targets[t].device))
        };
        left[t] = left[t].saturating_sub(want);
        result[s] = Some((t, reason));
    }
    Ok(result
        .into_iter()
        .enumerate()
        .filter_map(|(s, r)| r.map(|(t, why)| (s, t, why)))
        .collect())
}
