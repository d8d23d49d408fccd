//! Phase two, booted from the restored disk: the remaining volumes and the
//! manifest's commands, the catalog check, adaptation to the hardware found,
//! the system's own boot loader back in place, the report, and the
//! phase-two environment removed. Every step is journaled in the phase-two
//! directory, so a power cut resumes at the step it interrupted.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::adapt;
use super::chain::{self, Mounted, State, Step};
use super::commands::{self, Outcome};
use super::events::{Event, Observer, Trouble};
use crate::apply::journal::{Journal, State as JournalState};
use crate::manifest::{Command, Firmware, Manifest, OnError};
use crate::plan::{Action, Plan};

/// The report left on the restored system.
pub const REPORT: &str = "var/log/bmr-recovery.json";
const TARGET: &str = "/run/bmr/target";

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: String,
    /// ok, or errors when a non-critical step failed.
    pub status: String,
    pub started: String,
    pub finished: String,
    pub plan: Plan,
    pub phase_one: Vec<Step>,
    pub phase_two: Vec<Step>,
    pub commands: Vec<Outcome>,
    pub hardware: Vec<String>,
    pub adaptation: Vec<String>,
    pub catalog: Option<CatalogResult>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct CatalogResult {
    pub checked: u64,
    pub mismatches: Vec<String>,
}

/// Runs phase two from the medium copy in the phase-two directory; the
/// caller reboots. `say` reaches every console.
/// Runs phase two; `say` gets every line, `obs` the steps (the screens
/// draw them) and, for a command whose on_error is `shell`, the question.
pub fn run(
    medium: &Path,
    m: &Manifest,
    lock: bool,
    say: &mut dyn FnMut(&str),
    obs: &mut dyn Observer,
) -> Result<Report> {
    let dir = medium
        .parent()
        .context("the medium copy has no directory")?
        .to_path_buf();
    let mut state = chain::read_state(&dir)?;
    // The plan as phase one wrote it: device names that change between boots
    // must not make a resumed run start over.
    let plan_id = blake3::hash(&serde_json::to_vec(&state.plan)?)
        .to_hex()
        .to_string();
    let renamed = resolve_disks(&mut state.plan)?;
    for (old, new) in &renamed {
        say(&format!("{old} is now {new}"));
    }
    let mut journal = Journal::open(&dir.join(chain::JOURNAL), &plan_id)?;
    if journal.resumed {
        say(&format!(
            "resuming phase two after an interruption; done already: {}",
            if journal.record.steps.is_empty() {
                "nothing".to_string()
            } else {
                journal.record.steps.join(", ")
            }
        ));
    }
    let mut report = Report {
        machine: m.system.hostname.clone(),
        status: "ok".into(),
        started: state.started.clone(),
        finished: String::new(),
        plan: state.plan.clone(),
        phase_one: state.phase_one.clone(),
        phase_two: Vec::new(),
        commands: Vec::new(),
        hardware: Vec::new(),
        adaptation: Vec::new(),
        catalog: None,
        warnings: state.warnings.clone(),
    };
    let (source, _source_mount) = super::open_source(&state.source)?;
    let sys = Mounted::new(m, &state.plan, Path::new(TARGET))?;

    // 1. The remaining volumes, then the manifest's own commands: one runner,
    // so timeouts, critical and on_error mean the same for both.
    let restores = restore_commands(m, &state.plan, &source)?;
    let mut cmds: Vec<&Command> = restores.iter().collect();
    cmds.extend(commands::of_phase(&m.commands, 2));
    let mut names: Vec<String> = cmds
        .iter()
        .map(|c| format!("[{}] {}", c.sequence, c.description))
        .collect();
    let after = [
        "verify the catalog",
        "adapt to this hardware",
        "put the system's boot loader back",
    ];
    names.extend(after.iter().map(|s| s.to_string()));
    obs.event(Event::Steps(names));
    let index_of = |seq: u32| cmds.iter().position(|c| c.sequence == seq);
    if let Some(first) = cmds.first() {
        obs.event(Event::Step {
            index: index_of(first.sequence).unwrap_or(0),
        });
    }
    let env = vec![
        ("BMR_TARGET".to_string(), TARGET.to_string()),
        ("BMR_SOURCE".to_string(), state.source.clone()),
    ];
    let done: Vec<u32> = journal
        .record
        .steps
        .iter()
        .filter_map(|s| s.strip_prefix("command:")?.parse().ok())
        .collect();
    let t = Instant::now();
    let mut journal_error = None;
    let n = cmds.len();
    // Both callbacks report to the observer; a cell lets them share it.
    let obs = std::cell::RefCell::new(obs);
    for seq in &done {
        if let Some(index) = index_of(*seq) {
            obs.borrow_mut().event(Event::StepDone {
                index,
                seconds: 0.0,
                result: "done before the interruption".into(),
            });
        }
    }
    let (ran, result) = commands::run_all(
        &cmds,
        &env,
        Path::new("/"),
        lock,
        &|seq| done.contains(&seq),
        &mut |o: &Outcome| {
            let index = index_of(o.sequence).unwrap_or(0);
            let mut obs = obs.borrow_mut();
            if o.status == commands::Status::Ok {
                if let Err(e) = journal.record(&format!("command:{}", o.sequence)) {
                    journal_error = Some(e);
                }
                obs.event(Event::StepDone {
                    index,
                    seconds: o.seconds,
                    result: commands::describe(&o.status),
                });
            } else {
                obs.event(Event::StepFailed {
                    index,
                    result: commands::describe(&o.status),
                });
            }
            obs.event(Event::Step {
                index: (index + 1).min(n),
            });
        },
        &mut |c, o| {
            let t = Trouble {
                step: format!("[{}] {}", c.sequence, c.description),
                error: format!(
                    "{} {}; its on_error is shell: look around, then it runs once more",
                    c.program,
                    commands::describe(&o.status)
                ),
                critical: c.critical,
                abort: false,
            };
            obs.borrow_mut().trouble(&t);
        },
        &mut |line| say(line),
    );
    let obs = obs.into_inner();
    if let Some(e) = journal_error {
        return Err(e);
    }
    // A command retried after the shell counts by its last run.
    let failed = cmds.iter().any(|c| {
        ran.iter()
            .rev()
            .find(|o| o.sequence == c.sequence)
            .is_some_and(|o| o.status != commands::Status::Ok)
    });
    if failed {
        report.status = "errors".into();
    }
    report.commands = ran;
    report.phase_two.push(Step {
        name: "restore and commands".into(),
        seconds: t.elapsed().as_secs_f64(),
        result: match &result {
            Ok(()) => format!("{} commands", report.commands.len()),
            Err(e) => e.clone(),
        },
    });
    if let Err(why) = result {
        journal.finish(JournalState::Failed)?;
        bail!("phase two stopped: {why}");
    }

    // 2. The catalog, before adaptation changes fstab and the initramfs.
    let t = Instant::now();
    obs.event(Event::Step { index: n });
    if let Some(cat) = &m.catalog {
        let data = crate::medium::read_file(medium, &cat.file)?;
        let v = crate::capture::catalog::verify(&sys.root, &data)?;
        say(&format!(
            "catalog: {} files checked, {} differ",
            v.checked,
            v.mismatches.len()
        ));
        for x in &v.mismatches {
            say(&format!("catalog: {x}"));
            report.warnings.push(format!("catalog: {x}"));
        }
        report.catalog = Some(CatalogResult {
            checked: v.checked,
            mismatches: v.mismatches,
        });
        report.phase_two.push(step("catalog", t));
    }
    obs.event(Event::StepDone {
        index: n,
        seconds: t.elapsed().as_secs_f64(),
        result: report.catalog.as_ref().map_or("no catalog".into(), |c| {
            format!("{} files checked, {} differ", c.checked, c.mismatches.len())
        }),
    });

    // 3. Adaptation to the hardware found.
    let t = Instant::now();
    obs.event(Event::Step { index: n + 1 });
    let now = crate::probe::hardware::profile(Path::new("/sys"), Path::new("/proc"));
    let diff = adapt::compare(&m.hardware, &now);
    let moved = moved_disks(m, &state.plan);
    report.hardware = diff.lines();
    report.hardware.extend(moved.iter().cloned());
    for l in &report.hardware {
        say(&format!("hardware: {l}"));
    }
    if !journal.done("adapt") {
        let storage = diff.storage_changed() || !moved.is_empty();
        report.adaptation = adapt_system(m, &state.plan, &sys.root, &diff, storage, say)?;
        journal.record("adapt")?;
    }
    report.phase_two.push(step("adapt", t));
    obs.event(Event::StepDone {
        index: n + 1,
        seconds: t.elapsed().as_secs_f64(),
        result: format!("{} changes", report.adaptation.len()),
    });

    // 4. The system's own boot loader, which ends the phase-two entry.
    let t = Instant::now();
    obs.event(Event::Step { index: n + 2 });
    if !journal.done("bootloader") {
        bootloader(&state, &sys.root, say)?;
        journal.record("bootloader")?;
    }
    report.phase_two.push(step("bootloader", t));
    obs.event(Event::StepDone {
        index: n + 2,
        seconds: t.elapsed().as_secs_f64(),
        result: "done".into(),
    });

    report.finished = chain::now();
    write_report(&sys.root, &report)?;
    journal.finish(JournalState::Done)?;
    drop(sys);
    if let Err(e) = fs::remove_dir_all(&dir) {
        say(&format!(
            "warning: could not remove {}: {e}; it is no longer used",
            dir.display()
        ));
    }
    nix::unistd::sync();
    Ok(report)
}

fn step(name: &str, t: Instant) -> Step {
    Step {
        name: name.into(),
        seconds: t.elapsed().as_secs_f64(),
        result: "done".into(),
    }
}

/// Device names may differ after the reboot (another boot order, a slow
/// controller): each target disk is found again by the table identity phase
/// one wrote (GPT disk GUID or MBR signature) and the plan renamed.
fn resolve_disks(plan: &mut Plan) -> Result<Vec<(String, String)>> {
    let disks = crate::probe::disks::all().unwrap_or_default();
    let mut renames = Vec::new();
    for t in &mut plan.targets {
        let wanted = (t.guid, t.signature.clone());
        if wanted == (None, None) {
            continue;
        }
        let found = disks.iter().find(|d| {
            let table = crate::probe::table::read(Path::new(&d.device), d.logical_sector_size);
            d.size_bytes == t.size_bytes
                && ((t.guid.is_some() && table.guid == t.guid)
                    || (t.signature.is_some() && table.signature == t.signature))
        });
        let Some(d) = found else {
            bail!(
                "the disk phase one wrote ({}, {}) is not here any more: reconnect it, or start again from the rescue ISO",
                t.device,
                crate::report::size(t.size_bytes)
            );
        };
        if d.device != t.device {
            renames.push((t.device.clone(), d.device.clone()));
        }
    }
    rename(plan, &renames.iter().cloned().collect());
    Ok(renames)
}

/// Every device name in the plan renamed at once, so that two disks that
/// swapped names do not end up with the same one.
fn rename(plan: &mut Plan, map: &HashMap<String, String>) {
    let part = |disk: &str, n: u32| {
        format!(
            "/dev/{}",
            crate::probe::disks::partition_name(disk.trim_start_matches("/dev/"), n)
        )
    };
    for t in &mut plan.targets {
        if let Some(new) = map.get(&t.device) {
            t.device = new.clone();
            t.name = new.trim_start_matches("/dev/").to_string();
            for p in &mut t.partitions {
                p.device = part(new, p.number);
            }
        }
    }
    for d in &mut plan.disks {
        if let Some(new) = map.get(&d.target) {
            d.target = new.clone();
        }
    }
    for v in &mut plan.volumes {
        if let Some(new) = map.get(&v.target_disk) {
            v.target_disk = new.clone();
            v.target_device = part(new, v.partition_number);
        }
    }
}

/// One command per volume left for phase two, run as this same binary.
fn restore_commands(m: &Manifest, plan: &Plan, source: &super::Source) -> Result<Vec<Command>> {
    let exe = std::env::current_exe()
        .unwrap_or_else(|_| PathBuf::from("bmr"))
        .display()
        .to_string();
    let mut out = Vec::new();
    for (i, v) in plan
        .volumes
        .iter()
        .filter(|v| !v.role.is_critical())
        .filter(|v| matches!(v.action, Action::RestoreImage | Action::RestoreFiles))
        .enumerate()
    {
        let img = super::image_of(
            source,
            m.volume(&v.id).and_then(|x| x.image.as_deref()),
            &v.id,
        )?;
        let mut args = vec!["image".to_string(), "restore".to_string()];
        if v.action == Action::RestoreFiles {
            args.push("--files".into());
        }
        args.extend([
            "--from".into(),
            img,
            "--device".into(),
            v.target_device.clone(),
        ]);
        out.push(Command {
            // Before any manifest command, which may depend on the data.
            sequence: i as u32,
            phase: 2,
            critical: false,
            timeout_secs: 24 * 3600,
            program: exe.clone(),
            args,
            on_error: OnError::Continue,
            description: format!("restore volume {} onto {}", v.id, v.target_device),
        });
    }
    if let Some(c) = m
        .commands
        .iter()
        .find(|c| c.phase == 2 && (c.sequence as usize) < out.len())
    {
        bail!(
            "manifest command {} has a sequence number below {}, which phase two keeps for restoring volumes: renumber the manifest's commands from {}",
            c.sequence,
            out.len(),
            out.len()
        );
    }
    Ok(out)
}

/// Saved kernel device names → the UUID of the filesystem restored there,
/// for the names that no longer point at it.
fn moved_names(m: &Manifest, plan: &Plan) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for p in &m.partitions {
        let (Some(vol), Some(disk)) = (p.volume.as_deref(), m.disk(&p.disk)) else {
            continue;
        };
        let saved = format!(
            "/dev/{}",
            crate::probe::disks::partition_name(disk.device.trim_start_matches("/dev/"), p.number)
        );
        let Some(v) = plan.volumes.iter().find(|v| v.id == vol) else {
            continue;
        };
        if v.uuid.is_empty() || v.target_device == saved {
            continue;
        }
        out.insert(saved, v.uuid.clone());
    }
    out
}

/// Saved disks that now sit behind another kind of controller: the
/// restored system's initramfs must carry the new one's driver, even when
/// the machine still has a controller of the old kind for something else.
fn moved_disks(m: &Manifest, plan: &Plan) -> Vec<String> {
    plan.disks
        .iter()
        .filter_map(|d| {
            let was = &m.disk(&d.saved)?.transport;
            let now = crate::probe::disks::named(Path::new(&d.target))
                .ok()?
                .transport;
            (!was.is_empty() && !now.is_empty() && *was != now).then(|| {
                format!(
                    "storage: {} was on {was}, is now on {now} ({})",
                    d.saved, d.target
                )
            })
        })
        .collect()
}

fn adapt_system(
    m: &Manifest,
    plan: &Plan,
    root: &Path,
    diff: &adapt::Difference,
    storage_changed: bool,
    say: &mut dyn FnMut(&str),
) -> Result<Vec<String>> {
    let mut changes = Vec::new();
    let moved = moved_names(m, plan);
    for (file, rewrite) in [
        (
            "etc/fstab",
            adapt::rewrite_fstab as fn(&str, &dyn Fn(&str) -> Option<String>) -> _,
        ),
        ("etc/crypttab", adapt::rewrite_crypttab),
    ] {
        let path = root.join(file);
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let (new, lines) = rewrite(&text, &|d: &str| moved.get(d).cloned());
        if new != text {
            let tmp = path.with_extension("bmr-tmp");
            fs::write(&tmp, new)?;
            fs::rename(&tmp, &path)?;
        }
        changes.extend(lines);
    }
    changes.extend(adapt::adapt_network(root, &diff.nics_renamed)?);
    if storage_changed {
        match adapt::initramfs_tool(root) {
            Some((tool, argv)) => {
                say(&format!(
                    "storage controller changed: rebuilding the initramfs with the system's own {tool}"
                ));
                adapt::chroot_run(root, &argv)?;
                changes.push(format!("initramfs rebuilt with {tool} for the new storage drivers"));
            }
            None => changes.push(
                "storage controller changed, but the system has no initramfs tool bmr knows (update-initramfs, dracut, mkinitcpio): check that it boots".to_string(),
            ),
        }
    }
    for c in &changes {
        say(&format!("adapted: {c}"));
    }
    Ok(changes)
}

/// The restored system's own GRUB onto the mapped disk (BIOS) or into its
/// ESP with its own NVRAM entry first (UEFI), with its own tools in a chroot
/// when it has them, else the rescue system's. Ends the phase-two entry.
fn bootloader(state: &State, root: &Path, say: &mut dyn FnMut(&str)) -> Result<()> {
    let disk = chain::holds_boot(&state.plan)?.target_disk.clone();
    let has = |p: &str| root.join("usr").join(p).exists() || root.join(p).exists();
    let own = has("sbin/grub-install");
    let mut argv: Vec<String> = vec!["grub-install".into()];
    match state.firmware {
        Firmware::Bios => argv.extend(["--target=i386-pc".into(), disk.clone()]),
        Firmware::Uefi => argv.extend([
            "--target=x86_64-efi".into(),
            "--efi-directory=/boot/efi".into(),
            "--bootloader-id=debian".into(),
        ]),
    }
    if own {
        say(&format!(
            "boot loader: {} (the system's own)",
            argv.join(" ")
        ));
        adapt::chroot_run(root, &argv)?;
        if has("sbin/update-grub") {
            adapt::chroot_run(root, &["update-grub".into()])?;
        }
    } else {
        say(&format!(
            "boot loader: {} (the rescue system's)",
            argv.join(" ")
        ));
        let mut cmd = std::process::Command::new("grub-install");
        cmd.arg(format!("--boot-directory={}", root.join("boot").display()));
        for a in &argv[1..] {
            match a.strip_prefix("--efi-directory=") {
                Some(d) => cmd.arg(format!(
                    "--efi-directory={}",
                    root.join(d.trim_start_matches('/')).display()
                )),
                None => cmd.arg(a),
            };
        }
        crate::tool::run(&mut cmd)?;
    }
    if state.firmware == Firmware::Uefi {
        remove_efi_entry(root, say);
    }
    Ok(())
}

/// Phase two's NVRAM entry and ESP directory; what cannot be removed is
/// said, not fatal: the system's own entry is first in BootOrder by now.
fn remove_efi_entry(root: &Path, say: &mut dyn FnMut(&str)) {
    let listing =
        crate::tool::run(&mut std::process::Command::new("efibootmgr")).unwrap_or_default();
    for num in efi_entries(&listing, chain::EFI_ID) {
        if let Err(e) =
            crate::tool::run(std::process::Command::new("efibootmgr").args(["-b", &num, "-B"]))
        {
            say(&format!(
                "warning: could not remove boot entry Boot{num}: {e:#}"
            ));
        }
    }
    let _ = fs::remove_dir_all(root.join("boot/efi/EFI").join(chain::EFI_ID));
}

/// Boot entry numbers labelled `label` in `efibootmgr` output.
pub fn efi_entries(listing: &str, label: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("Boot")?;
            let (num, name) = rest.split_once(['*', ' '])?;
            (num.len() == 4
                && num.chars().all(|c| c.is_ascii_hexdigit())
                && name.trim_start_matches('*').trim().starts_with(label))
            .then(|| num.to_string())
        })
        .collect()
}

fn write_report(root: &Path, report: &Report) -> Result<()> {
    let path = root.join(REPORT);
    fs::create_dir_all(root.join("var/log"))?;
    fs::write(&path, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swapped_disk_names_are_renamed_at_once() {
        let mut plan: Plan = serde_json::from_value(serde_json::json!({
            "disks": [{"saved": "disk0", "target": "/dev/vda", "reason": ""},
                      {"saved": "disk1", "target": "/dev/vdb", "reason": ""}],
            "targets": [],
            "volumes": [
                {"id": "root", "role": "system", "filesystem": "ext4", "action": "restore-image",
                 "target_device": "/dev/vda1", "target_disk": "/dev/vda", "partition_number": 1,
                 "start_bytes": 1048576, "size_bytes": 1, "saved_size_bytes": 1, "min_size_bytes": 1, "reason": ""},
                {"id": "data", "role": "data", "filesystem": "ext4", "action": "restore-image",
                 "target_device": "/dev/vdb1", "target_disk": "/dev/vdb", "partition_number": 1,
                 "start_bytes": 1048576, "size_bytes": 1, "saved_size_bytes": 1, "min_size_bytes": 1, "reason": ""}
            ],
            "dropped": [], "warnings": [], "policy": crate::plan::Policy::default()
        }))
        .unwrap();
        let map = [("/dev/vda", "/dev/vdb"), ("/dev/vdb", "/dev/vda")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        rename(&mut plan, &map);
        assert_eq!(plan.volumes[0].target_device, "/dev/vdb1");
        assert_eq!(plan.volumes[1].target_device, "/dev/vda1");
        assert_eq!(plan.disks[0].target, "/dev/vdb");
        assert_eq!(plan.disks[1].target, "/dev/vda");
    }

    #[test]
    fn finds_phase_two_boot_entries() {
        let listing = "BootCurrent: 0004\nTimeout: 0 seconds\nBootOrder: 0004,0001,0000\n\
            Boot0000* UiApp\tFvVol(7cb8bdc9)/FvFile(462caa21)\n\
            Boot0001* UEFI QEMU HARDDISK\tPciRoot(0x0)/Pci(0x2,0x0)\n\
            Boot0004* bmr-phase2\tHD(1,GPT,0e1c3b2a,0x800,0x20000)/File(\\EFI\\bmr-phase2\\grubx64.efi)\n\
            Boot000A  bmr-phase2\tHD(1,GPT,0e1c3b2a,0x800,0x20000)\n";
        assert_eq!(efi_entries(listing, "bmr-phase2"), ["0004", "000A"]);
        assert!(efi_entries(listing, "debian").is_empty());
    }
}
