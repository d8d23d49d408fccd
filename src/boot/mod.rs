//! bmr as PID 1 of the rescue system: pseudo filesystems and console,
//! kernel flags, udev coldplug, the recovery medium and its drivers, a
//! boot report, then the hand-over that `bmr.mode` asks for.

pub mod cmdline;
pub mod discover;
pub mod drivers;
pub mod guided;
pub mod pid1;
pub mod udev;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use cmdline::{Flags, Mode};
use pid1::{say, show};

pub const READY: &str = "rescue system ready";
const PRELOAD: &str = include_str!("../../initramfs/preload.list");

#[derive(Debug, Default, Serialize)]
pub struct BootReport {
    pub kernel: String,
    pub cmdline: String,
    pub flags: Flags,
    pub udevd_pid: Option<u32>,
    pub modules_loaded: Vec<String>,
    pub medium: Option<MediumFound>,
    pub drivers_from_medium: Vec<drivers::Loaded>,
    pub devices_without_driver: Vec<String>,
    pub disks: Vec<String>,
    pub tapes: Vec<String>,
    pub warnings: Vec<String>,
    pub seconds_to_ready: f64,
    /// How unattended recovery ended when it did not reboot: refused
    /// (nothing written) or failed, and why.
    pub recovery: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct MediumFound {
    pub device: PathBuf,
    pub machine: String,
    pub saved: String,
}

pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// The whole of PID 1; never returns.
pub fn init() -> ! {
    let start = Instant::now();
    pid1::handle_shutdown_signals();
    let mount_problems = pid1::mount_pseudo();
    let line = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let flags = cmdline::parse(line.trim());
    pid1::open_console(&flags.consoles);
    pid1::install_panic_hook(flags.lock);
    std::env::set_var("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    say(&format!(
        "bmr {} rescue system, kernel {}",
        env!("CARGO_PKG_VERSION"),
        release()
    ));
    let mut report = BootReport {
        kernel: release(),
        cmdline: line.trim().to_string(),
        flags: flags.clone(),
        ..BootReport::default()
    };
    report.warnings.extend(mount_problems);
    report.warnings.extend(flags.warnings.iter().cloned());
    for w in &flags.warnings {
        say(&format!("warning: {w}"));
    }
    if flags.lock && !flags.breaks.is_empty() {
        warn(
            &mut report,
            "bmr.break is ignored: bmr.lock allows no shell",
        );
    }

    stop_if(&flags, "udev");
    match udev::start(flags.debug) {
        Ok(u) => {
            report.udevd_pid = Some(u.pid());
            if let Err(e) = udev::coldplug() {
                warn(&mut report, &format!("udev coldplug: {e:#}"));
            }
            std::mem::forget(u);
            udev::preload(&crate::rescue::lines(PRELOAD));
        }
        Err(e) => warn(
            &mut report,
            &format!("{e:#}; drivers must be loaded by hand (modprobe)"),
        ),
    }

    stop_if(&flags, "medium");
    let manifest = find_medium(&flags, &mut report);

    stop_if(&flags, "drivers");
    if let Some((dev, m)) = &manifest {
        load_drivers(dev, m, &mut report);
    }

    report.modules_loaded = udev::loaded_modules();
    report.devices_without_driver = udev::devices_without_driver(Path::new("/sys"));
    report.disks = crate::probe::disks::all()
        .map(|ds| {
            ds.iter()
                .map(|d| {
                    format!(
                        "{} {} {}",
                        d.device,
                        crate::report::size(d.size_bytes),
                        d.model
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    report.tapes = tapes();
    report.seconds_to_ready = start.elapsed().as_secs_f64();
    summary(&report);
    if let Err(e) = write_report(&report) {
        say(&format!("warning: cannot write the boot report: {e:#}"));
    }
    say(READY);

    stop_if(&flags, "recover");
    if let Some(outcome) = hand_over(
        &flags,
        &report.cmdline,
        manifest.as_ref().map(|(d, m)| (d.as_path(), m)),
    ) {
        say(&outcome);
        report.recovery = Some(outcome);
        if let Err(e) = write_report(&report) {
            say(&format!("warning: cannot write the boot report: {e:#}"));
        }
    }
    if flags.lock {
        say("bmr.lock is set: no shell; switch the machine off or press Ctrl-Alt-Del");
        pid1::idle();
    }
    loop {
        say("starting a shell (exit it for a new one; `reboot` restarts, `poweroff` stops)");
        pid1::shell();
    }
}

fn release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn warn(report: &mut BootReport, msg: &str) {
    say(&format!("warning: {msg}"));
    report.warnings.push(msg.to_string());
}

fn stop_if(flags: &Flags, step: &str) {
    if flags.stops_before(step) && !flags.lock {
        say(&format!(
            "bmr.break={step}: shell before step \"{step}\"; exit it to go on"
        ));
        pid1::shell();
    }
}

fn find_medium(
    flags: &Flags,
    report: &mut BootReport,
) -> Option<(PathBuf, crate::manifest::Manifest)> {
    let wait = Duration::from_secs(if flags.medium.is_some() { 30 } else { 8 });
    // `SPEC:/path`: a medium image inside that filesystem (phase two's copy
    // on the restored boot volume), mounted read-write for its journal.
    let (spec, inner) = match flags
        .medium
        .as_deref()
        .map(|s| (s, crate::recover::split_device_path(s)))
    {
        Some((_, Some((spec, path)))) => (Some(spec), Some(path)),
        Some((s, None)) => (Some(s), None),
        None => (None, None),
    };
    let (choice, seen) = discover::find(spec, wait);
    let dev = match choice {
        discover::Choice::Found(d) => d,
        discover::Choice::Several(ds) => {
            warn(
                report,
                &format!(
                    "more than one recovery medium: {}; using the first (name one with bmr.medium=)",
                    ds.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            ds[0].clone()
        }
        discover::Choice::NotFound => {
            let looked: Vec<String> = seen
                .iter()
                .map(|c| format!("{} ({} \"{}\")", c.device.display(), c.filesystem, c.label))
                .collect();
            warn(
                report,
                &format!(
                    "no recovery medium found ({}); looked at: {}. Insert the floppy or USB stick \
                     that `bmr save` wrote and reboot, or name it with bmr.medium=",
                    match &flags.medium {
                        Some(s) => format!("bmr.medium={s}"),
                        None => format!("a FAT filesystem labelled {}", crate::medium::LABEL),
                    },
                    if looked.is_empty() {
                        "no filesystems".to_string()
                    } else {
                        looked.join(", ")
                    }
                ),
            );
            return None;
        }
    };
    let dev = match inner {
        Some(path) => match mount_medium_fs(&dev, path) {
            Ok(p) => p,
            Err(e) => {
                warn(report, &format!("{e:#}"));
                return None;
            }
        },
        None => dev,
    };
    match crate::medium::load_manifest(&dev) {
        Ok(m) => {
            say(&format!(
                "recovery medium {}: machine {}, saved {}",
                dev.display(),
                m.system.hostname,
                m.manifest.created
            ));
            report.medium = Some(MediumFound {
                device: dev.clone(),
                machine: m.system.hostname.clone(),
                saved: m.manifest.created.clone(),
            });
            Some((dev, m))
        }
        Err(e) => {
            warn(
                report,
                &format!("recovery medium {} is unusable: {e:#}", dev.display()),
            );
            None
        }
    }
}

fn mount_medium_fs(dev: &Path, path: &str) -> anyhow::Result<PathBuf> {
    let at = Path::new(pid1::LOG_DIR).join("medium-fs");
    fs::create_dir_all(&at)?;
    crate::tool::run(std::process::Command::new("mount").arg(dev).arg(&at))?;
    let file = at.join(path.trim_start_matches('/'));
    if !file.is_file() {
        anyhow::bail!(
            "bmr.medium names {path} on {}, which is not there: phase two has finished or the disk is not the one phase one wrote",
            dev.display()
        );
    }
    Ok(file)
}

fn load_drivers(dev: &Path, m: &crate::manifest::Manifest, report: &mut BootReport) {
    if m.drivers.is_empty() {
        return;
    }
    let rel = release();
    let magic = drivers::kernel_vermagic(Path::new("/lib/modules"), &rel);
    let read = |f: &str| crate::medium::read_file(dev, f);
    let results = drivers::load_all(&m.drivers, &read, &rel, magic.as_deref());
    for r in &results {
        match r.result.as_str() {
            "loaded" => say(&format!(
                "driver {} loaded from the medium ({})",
                r.module, r.file
            )),
            "already-present" => say(&format!(
                "driver {}: already in the kernel, the medium's copy is not needed",
                r.module
            )),
            _ => warn(
                report,
                &format!(
                    "driver {} from the medium {}: {}",
                    r.module, r.result, r.detail
                ),
            ),
        }
    }
    report.drivers_from_medium = results;
    // Devices the new drivers can now bind (the tape: /dev/nst0).
    if let Err(e) = udev::coldplug() {
        warn(report, &format!("udev after loading drivers: {e:#}"));
    }
}

fn tapes() -> Vec<String> {
    let mut t: Vec<String> = fs::read_dir("/dev")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("nst") && n[3..].chars().all(|c| c.is_ascii_digit()))
        .map(|n| format!("/dev/{n}"))
        .collect();
    t.sort();
    t
}

fn summary(r: &BootReport) {
    say(&format!("disks: {}", list(&r.disks)));
    say(&format!("tapes: {}", list(&r.tapes)));
    let from_medium: Vec<&str> = r
        .drivers_from_medium
        .iter()
        .filter(|d| d.result == "loaded")
        .map(|d| d.module.as_str())
        .collect();
    say(&format!(
        "modules: {} loaded, from the medium: {}",
        r.modules_loaded.len(),
        list(&from_medium)
    ));
    if !r.devices_without_driver.is_empty() {
        say(&format!(
            "devices without a driver: {}",
            r.devices_without_driver.join("; ")
        ));
    }
    say(&format!(
        "{} warnings; report in {}/boot.json",
        r.warnings.len(),
        pid1::LOG_DIR
    ));
}

fn list<S: AsRef<str>>(items: &[S]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items
            .iter()
            .map(|s| s.as_ref())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn write_report(r: &BootReport) -> anyhow::Result<()> {
    let path = Path::new(pid1::LOG_DIR).join("boot.json");
    fs::write(&path, serde_json::to_vec_pretty(r)?)?;
    Ok(())
}

/// Unattended recovery runs (and reboots when it is done); guided runs the
/// recovery screens (which reboot when the operator says so). Returns how an unattended recovery that
/// did not reboot ended, with its console marker.
fn hand_over(
    flags: &Flags,
    cmdline: &str,
    medium: Option<(&Path, &crate::manifest::Manifest)>,
) -> Option<String> {
    if flags.phase == 2 {
        return phase_two(flags, medium);
    }
    match flags.mode {
        Mode::Shell => None,
        Mode::Auto => {
            let Some((dev, m)) = medium else {
                return Some(format!(
                    "{RECOVERY_REFUSED} unattended recovery refused: no recovery medium; nothing was written"
                ));
            };
            let secret = match &flags.key {
                Some(k) => match std::fs::read(k) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        return Some(format!("{RECOVERY_REFUSED} unattended recovery refused: cannot read bmr.key={}: {e}; nothing was written", k.display()));
                    }
                },
                None => None,
            };
            say("unattended recovery: phase one");
            let result = crate::recover::phase_one(
                m,
                &crate::recover::Options {
                    medium: dev,
                    source: flags.source.as_deref(),
                    wipe: &flags.wipe,
                    map: &flags.map,
                    secret,
                    journal: Path::new(pid1::LOG_DIR).join("apply-journal.json"),
                    phase_two: true,
                    cmdline: cmdline.to_string(),
                },
            );
            match result {
                Ok(_) => {
                    say("unattended recovery: phase one finished; the rescue ISO and the recovery medium can be removed now");
                    say(PHASE_ONE_DONE);
                    pid1::reboot(Duration::from_secs(3));
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    let marker = if e.contains("nothing was written") {
                        RECOVERY_REFUSED
                    } else {
                        RECOVERY_FAILED
                    };
                    Some(format!("{marker} unattended recovery stopped: {e}"))
                }
            }
        }
        Mode::Guided => {
            // The plan in the boot log too, for whoever reads it later.
            match medium {
                Some((dev, m)) => {
                    let policy = crate::plan::Policy::default();
                    let mut warn = |w: &str| say(&format!("warning: {w}"));
                    match crate::targets::plan_here(m, &[], dev, &flags.map, policy, &mut warn) {
                        Ok((targets, plan)) => show(&crate::report::plan_text(m, &targets, &plan)),
                        Err(e) => say(&format!("no plan: {e:#}")),
                    }
                }
                None => {
                    say("nothing to recover without a recovery medium: the screens ask for one")
                }
            }
            say("guided recovery: the recovery screens start on every console");
            guided::run(flags, medium.map(|(d, _)| d));
            None
        }
    }
}

/// Unattended phase two: a command whose on_error is `shell` gets the
/// console's shell (run_all never asks when bmr.lock is set).
struct ConsoleShell;

impl crate::recover::events::Observer for ConsoleShell {
    fn event(&mut self, _: crate::recover::events::Event) {}
    fn trouble(&mut self, _: &crate::recover::events::Trouble) -> crate::recover::events::Choice {
        pid1::shell();
        crate::recover::events::Choice::Retry
    }
}

/// Console markers a supervisor (or a test) waits for.
pub const PHASE_ONE_DONE: &str = "BMR-PHASE-ONE-DONE";
pub const RECOVERY_DONE: &str = "BMR-RECOVERY-DONE";
pub const RECOVERY_FAILED: &str = "BMR-RECOVERY-FAILED";
/// Unattended recovery would not start: nothing was written.
pub const RECOVERY_REFUSED: &str = "BMR-RECOVERY-REFUSED";

/// Booted from the restored disk: finish the recovery, then boot the system.
fn phase_two(flags: &Flags, medium: Option<(&Path, &crate::manifest::Manifest)>) -> Option<String> {
    let Some((dev, m)) = medium else {
        return Some(format!(
            "{RECOVERY_FAILED} phase two found no phase-two environment (bmr.medium=); the restored system may still boot: remove this entry by starting the recovery again"
        ));
    };
    say(&format!("recovery of {}: phase two", m.system.hostname));
    if flags.mode == Mode::Guided {
        guided::run(flags, Some(dev));
        return Some(format!(
            "{RECOVERY_FAILED} the phase-two screens ended without a reboot; see {}/guided-*.log",
            pid1::LOG_DIR
        ));
    }
    match crate::recover::phase_two::run(dev, m, flags.lock, &mut |l| say(l), &mut ConsoleShell) {
        Ok(r) => {
            say(&format!(
                "{RECOVERY_DONE} status={} report=/{}",
                r.status,
                crate::recover::phase_two::REPORT
            ));
            let _ = crate::tool::run(
                std::process::Command::new("umount")
                    .arg(Path::new(pid1::LOG_DIR).join("medium-fs")),
            );
            pid1::reboot(Duration::from_secs(3));
        }
        Err(e) => Some(format!("{RECOVERY_FAILED} {e:#}")),
    }
}
