//! Checks before the first write: every target still is the disk the plan
//! saw, and nothing on it is in use or protected. Any failure stops apply
//! with nothing written.

use std::path::Path;

use anyhow::{bail, Result};

use crate::plan::Plan;
use crate::report::size;

pub fn check(plan: &Plan, protected: &[(String, String)]) -> Result<()> {
    let busy = crate::targets::disks_in_use();
    let mut problems = Vec::new();
    for t in &plan.targets {
        let now = match crate::probe::disks::named(Path::new(&t.device)) {
            Ok(d) => d,
            Err(e) => {
                problems.push(format!("{}: {e:#}", t.device));
                continue;
            }
        };
        if now.size_bytes != t.size_bytes {
            problems.push(format!(
                "{} is {} now, but the plan was made for {}",
                t.device,
                size(now.size_bytes),
                size(t.size_bytes)
            ));
        }
        if now.logical_sector_size != t.logical_sector_size {
            problems.push(format!(
                "{} has {}-byte sectors now, the plan saw {}",
                t.device, now.logical_sector_size, t.logical_sector_size
            ));
        }
        for (what, planned, found) in [
            ("WWN", &t.wwn, &now.wwn),
            ("serial", &t.serial, &now.serial),
        ] {
            if !planned.is_empty() && planned != found {
                problems.push(format!("{} has {what} {found:?} now, the plan saw {planned:?}: another disk took its name", t.device));
            }
        }
        if let Some(why) = busy.get(&t.name) {
            problems.push(format!(
                "{} is {why}; unmount it (and swapoff, vgchange -an, mdadm --stop) first",
                t.device
            ));
        }
        if let Some((_, why)) = protected.iter().find(|(name, _)| *name == t.name) {
            problems.push(format!(
                "{} is protected ({why}) and is never written",
                t.device
            ));
        }
    }
    if !problems.is_empty() {
        bail!(
            "preflight failed, nothing was written:\n  - {}",
            problems.join("\n  - ")
        );
    }
    Ok(())
}
