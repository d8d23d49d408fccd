//! Plan -> disks. The only code in bmr that writes to a disk, and it writes
//! only the devices the plan names: preflight, rehearsal on a scratch file,
//! partition tables (read back and compared), the kernel's view of them,
//! stale signatures wiped, and new filesystems for `create`/`restore-files`.
//! Every step is journaled so an interrupted run continues where it stopped.

pub mod journal;
mod kernel;
pub mod mkfs;
mod preflight;
mod table;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::manifest::Manifest;
use crate::plan::{Action, Plan, TargetPlan};
pub use journal::State;

pub const DEFAULT_JOURNAL: &str = "/run/bmr/journal.json";

pub struct Options {
    /// On failure leave the disks as they are instead of erasing the new tables.
    pub keep_on_error: bool,
    pub journal: PathBuf,
    /// Disks (kernel names) that must never be written, with the reason.
    pub protected: Vec<(String, String)>,
}

/// A stand-in for a power cut, for tests of resuming: `BMR_FAILPOINT=<step>`
/// ends the process right after that step is journaled.
fn failpoint(step: &str) {
    if std::env::var("BMR_FAILPOINT").is_ok_and(|f| f == step) {
        eprintln!("bmr: failpoint {step}: stopping here as if the power failed");
        std::process::exit(75);
    }
}

struct Run<'a> {
    journal: journal::Journal,
    plan: &'a Plan,
    /// Targets whose table this or an earlier run wrote.
    written: Vec<&'a TargetPlan>,
}

impl Run<'_> {
    fn step(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        if self.journal.done(name) {
            println!("  {name}: done in an earlier run");
            return Ok(());
        }
        println!("  {name}");
        f()?;
        self.journal.record(name)?;
        failpoint(name);
        Ok(())
    }
}

pub fn plan_id(plan: &Plan) -> String {
    blake3::hash(&serde_json::to_vec(plan).unwrap_or_default())
        .to_hex()
        .to_string()
}

pub fn apply(_m: &Manifest, plan: &Plan, opts: &Options) -> Result<()> {
    preflight::check(plan, &opts.protected)?;
    for t in &plan.targets {
        table::rehearse(t)?;
    }
    let journal = journal::Journal::open(&opts.journal, &plan_id(plan))?;
    if journal.resumed {
        println!(
            "continuing an interrupted run ({} steps done)",
            journal.record.steps.len()
        );
    }
    let mut run = Run {
        journal,
        plan,
        written: Vec::new(),
    };
    match steps(&mut run) {
        Ok(()) => run.journal.finish(State::Done),
        Err(e) => {
            // Report first, then make sure a half-written disk cannot pass for a good one.
            eprintln!("bmr: apply failed: {e:#}");
            let _ = run.journal.finish(State::Failed);
            if opts.keep_on_error {
                bail!("apply failed; the disks are left as they are for inspection (--keep-on-error): {e:#}");
            }
            let mut erased = Vec::new();
            for t in &run.written {
                if let Ok(mut f) = OpenOptions::new().write(true).open(&t.device) {
                    if table::zap(&mut f, t).is_ok() {
                        erased.push(t.device.as_str());
                    }
                }
            }
            bail!(
                "apply failed: {e:#}\nthe new partition tables on {} were erased so the half-written disks cannot boot as if restored; \
                 fix the cause and run bmr apply again (--keep-on-error keeps them for inspection)",
                if erased.is_empty() { "no disk".to_string() } else { erased.join(", ") }
            )
        }
    }
}

fn steps<'a>(run: &mut Run<'a>) -> Result<()> {
    let plan: &'a Plan = run.plan;
    for t in &plan.targets {
        let table_step = format!("table:{}", t.device);
        if run.journal.done(&table_step) {
            // An earlier run wrote it; it must still read back as planned.
            table::verify(Path::new(&t.device), t)
                .context("the table written by the earlier run changed")?;
        }
        run.written.push(t);
        run.step(&format!("zap:{}", t.device), || {
            let mut f = open_rw(&t.device)?;
            table::zap(&mut f, t)
        })?;
        run.step(&table_step, || {
            let mut f = open_rw(&t.device)?;
            table::write(&mut f, t)?;
            table::verify(Path::new(&t.device), t)
        })?;
        // The kernel's view is lost on a reboot, so it is made again every run.
        kernel::sync(t)
            .with_context(|| format!("making the kernel see the partitions of {}", t.device))?;
    }
    for v in &plan.volumes {
        let Some(t) = plan.targets.iter().find(|t| t.device == v.target_disk) else {
            continue;
        };
        match v.action {
            Action::Drop | Action::Skip => continue,
            Action::RestoreImage | Action::RestoreFiles | Action::Create => {}
        }
        run.step(&format!("wipe:{}", v.target_device), || {
            wipe(&v.target_device)
        })?;
        if matches!(v.action, Action::Create | Action::RestoreFiles) {
            let sector = t.logical_sector_size;
            run.step(&format!("mkfs:{}", v.id), || {
                mkfs::run(
                    &v.into(),
                    &v.target_device,
                    sector,
                    v.start_bytes / u64::from(sector),
                )?;
                check_identity(v)
            })?;
        }
    }
    for t in &plan.targets {
        table::verify(Path::new(&t.device), t)
            .with_context(|| format!("final check of {}", t.device))?;
    }
    Ok(())
}

fn open_rw(dev: &str) -> Result<std::fs::File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .with_context(|| format!("opening {dev} for writing"))
}

/// Old filesystem signatures inside a new partition would make blkid (and
/// people) take it for a restored volume.
fn wipe(dev: &str) -> Result<()> {
    crate::tool::run(Command::new("wipefs").args(["-a", "-q", dev])).map(drop)
}

/// The new filesystem must carry the identity the plan gives it.
fn check_identity(v: &crate::plan::VolumePlan) -> Result<()> {
    let found = crate::probe::fs::identify(Path::new(&v.target_device))?;
    let ok = found.as_ref().is_some_and(|f| {
        f.filesystem == v.filesystem && f.uuid.eq_ignore_ascii_case(&v.uuid) && f.label == v.label
    });
    if !ok {
        bail!(
            "{} should now hold {} {} \"{}\", but blkid finds {:?}",
            v.target_device,
            v.filesystem,
            v.uuid,
            v.label,
            found
        );
    }
    Ok(())
}
