//! Recovery, unattended. Phase one: plan, the operator's consent given in
//! advance (`bmr.wipe=` / `--wipe`), partition tables and filesystems, the
//! boot and system volumes restored from the backup source, then the
//! phase-two environment and its boot entry on the target (`chain`). Phase
//! two (`phase_two`) runs after the reboot, from the target disk.

pub mod adapt;
pub mod chain;
pub mod commands;
pub mod events;
pub mod phase_two;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::manifest::Manifest;
use crate::plan::{Action, Plan, Policy, VolumePlan};

/// Where the images are, as `bmr.source=` / `--source` name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Tape(PathBuf),
    /// A repository directory (the one `bmr backup --to DIR` wrote).
    Dir(PathBuf),
    /// An HTTP(S) repository.
    Url(String),
}

pub fn source(s: &str) -> Result<Source> {
    if let Some(d) = s.strip_prefix("tape:") {
        Ok(Source::Tape(PathBuf::from(d)))
    } else if let Some(d) = s.strip_prefix("file:") {
        Ok(Source::Dir(PathBuf::from(d)))
    } else if s.starts_with("http://") || s.starts_with("https://") {
        Ok(Source::Url(s.trim_end_matches('/').to_string()))
    } else {
        bail!("\"{s}\" is not tape:DEV, file:DIR or an http(s):// URL")
    }
}

/// Unattended work destroys disks only when told to beforehand: every disk
/// the plan writes must be named (or `all`), and the plan must not have
/// guessed. Err says why not, for the console and the boot report.
pub fn consent(wipe: &[String], plan: &Plan) -> Result<(), String> {
    let targets = plan.target_devices();
    if plan.is_ambiguous() {
        return Err(format!(
            "the plan had to choose between equally suitable disks ({}); name the mapping with bmr.target= (--map)",
            plan.warnings.join("; ")
        ));
    }
    if wipe.is_empty() {
        return Err(format!(
            "it would overwrite {}; allow that with bmr.wipe={} (or bmr.wipe=all) on the kernel command line (--wipe)",
            targets.join(", "),
            targets.join(",")
        ));
    }
    if wipe.iter().any(|w| w == "all") {
        return Ok(());
    }
    let unnamed: Vec<&str> = targets
        .iter()
        .copied()
        .filter(|t| !wipe.iter().any(|w| w == t))
        .collect();
    if !unnamed.is_empty() {
        return Err(format!(
            "it would overwrite {}, which bmr.wipe= does not name",
            unnamed.join(", ")
        ));
    }
    Ok(())
}

/// Unmounts a backup source bmr mounted itself.
pub struct SourceMount(PathBuf);

impl Drop for SourceMount {
    fn drop(&mut self) {
        let _ = crate::tool::run(std::process::Command::new("umount").arg(&self.0));
    }
}

/// The source, with `file:LABEL=X:/DIR` (or `UUID=`, or a device) mounted
/// read-only first: in the rescue system nothing else mounts it.
pub fn open_source(s: &str) -> Result<(Source, Option<SourceMount>)> {
    let src = source(s)?;
    let Source::Dir(d) = &src else {
        return Ok((src, None));
    };
    let text = d.to_string_lossy().into_owned();
    let Some((spec, inner)) = split_device_path(&text) else {
        return Ok((src, None));
    };
    let dev = find_device(spec)?;
    let at = PathBuf::from("/run/bmr/source");
    std::fs::create_dir_all(&at)?;
    crate::tool::run(
        std::process::Command::new("mount")
            .args(["-o", "ro"])
            .arg(&dev)
            .arg(&at),
    )
    .with_context(|| format!("mounting the backup source {spec} ({})", dev.display()))?;
    let dir = at.join(inner.trim_start_matches('/'));
    Ok((Source::Dir(dir), Some(SourceMount(at))))
}

/// `LABEL=X:/path`, `UUID=X:/path`, `/dev/sdb1:/path`: a filesystem and a
/// path inside it.
pub fn split_device_path(s: &str) -> Option<(&str, &str)> {
    let (spec, path) = s.split_once(':')?;
    let known =
        spec.starts_with("LABEL=") || spec.starts_with("UUID=") || spec.starts_with("/dev/");
    (known && path.starts_with('/')).then_some((spec, path))
}

/// The block device a LABEL=/UUID= names (blkid reads the devices).
pub fn find_device(spec: &str) -> Result<PathBuf> {
    let (flag, value) = match spec.split_once('=') {
        Some(("LABEL", v)) => ("-L", v),
        Some(("UUID", v)) => ("-U", v),
        _ => return Ok(PathBuf::from(spec)),
    };
    let out = crate::tool::run(std::process::Command::new("blkid").args([flag, value]))
        .with_context(|| format!("no filesystem with {spec} is attached"))?;
    match out.lines().next() {
        Some(d) if !d.is_empty() => Ok(PathBuf::from(d)),
        _ => bail!("no filesystem with {spec} is attached"),
    }
}

/// The image of a volume in `src`, from the name `bmr backup` recorded.
fn image_of(src: &Source, recorded: Option<&str>, volume: &str) -> Result<String> {
    let recorded = recorded.with_context(|| {
        format!("the manifest records no image for volume {volume}: run bmr backup before a recovery needs it")
    })?;
    Ok(match src {
        Source::Tape(dev) => format!(
            "tape:{}#{}",
            dev.display(),
            recorded.strip_prefix("tape#").unwrap_or(volume)
        ),
        Source::Dir(d) => d.join(recorded).display().to_string(),
        Source::Url(u) => format!("{u}/{recorded}"),
    })
}

pub struct Options<'a> {
    pub medium: &'a Path,
    pub source: Option<&'a str>,
    pub wipe: &'a [String],
    pub map: &'a [(String, String)],
    pub secret: Option<Vec<u8>>,
    pub journal: PathBuf,
    /// Install the phase-two environment and its boot entry.
    pub phase_two: bool,
    /// The kernel command line phase one runs under (its consoles are kept).
    pub cmdline: String,
}

/// What phase one did.
pub struct Done {
    /// The phase-two directory on the target, when installed.
    pub phase_two: Option<PathBuf>,
    /// Volumes restored now, and those left for phase two.
    pub restored: Vec<String>,
    pub later: Vec<String>,
    pub steps: Vec<chain::Step>,
}

/// Runs phase one unattended: plans here, prints the plan, and refuses
/// before any write without consent.
pub fn phase_one(m: &Manifest, o: &Options) -> Result<Done> {
    let Some(spec) = o.source else {
        bail!("no backup source: give bmr.source= (tape:/dev/nst0, file:DIR, file:LABEL=X:/DIR or an http(s):// URL); nothing was written");
    };
    // Mounted before planning, so the disk that holds it counts as in use.
    let (src, _mounted) = open_source(spec)?;
    let (targets, plan) =
        crate::targets::plan_here(m, &[], o.medium, o.map, Policy::default(), &mut |w| {
            println!("warning: {w}")
        })?;
    print!("{}", crate::report::plan_text(m, &targets, &plan));
    if let Err(why) = consent(o.wipe, &plan) {
        bail!("unattended recovery refused: {why}; nothing was written");
    }
    run(m, &plan, spec, &src, o, &mut events::Unattended)
}

/// One step of phase one.
enum Work<'p> {
    Partition,
    Restore(&'p VolumePlan, String),
    PhaseTwo,
}

impl Work<'_> {
    fn name(&self) -> String {
        match self {
            Work::Partition => "write partition tables and filesystems".into(),
            Work::Restore(v, _) => format!("restore {} onto {}", v.id, v.target_device),
            Work::PhaseTwo => "install the phase-two environment".into(),
        }
    }
}

/// The images of the boot-critical volumes, in restore order; found before
/// the first disk is touched.
fn critical_images<'p>(m: &Manifest, plan: &'p Plan, src: &Source) -> Result<Vec<Work<'p>>> {
    let mut work = Vec::new();
    for v in plan.volumes.iter().filter(|v| v.role.is_critical()) {
        if !matches!(v.action, Action::RestoreImage | Action::RestoreFiles) {
            continue;
        }
        let img = image_of(src, m.volume(&v.id).and_then(|x| x.image.as_deref()), &v.id)?;
        if v.action == Action::RestoreFiles && matches!(src, Source::Tape(_)) {
            bail!("volume {} must be restored file by file (its partition is smaller than the filesystem), which a tape cannot serve; use a larger disk or a file/HTTP source; nothing was written", v.id);
        }
        work.push(Work::Restore(v, img));
    }
    Ok(work)
}

/// Phase one on a plan already agreed to: partition tables, the boot and
/// system volumes, the phase-two environment. Each step is announced to
/// `obs`; a failed step is retried, skipped or ends the run as it answers.
pub fn run(
    m: &Manifest,
    plan: &Plan,
    spec: &str,
    src: &Source,
    o: &Options,
    obs: &mut dyn events::Observer,
) -> Result<Done> {
    let started = chain::now();
    let mut work = vec![Work::Partition];
    work.extend(critical_images(m, plan, src)?);
    if o.phase_two {
        chain::preflight(m, plan).map_err(|e| anyhow::anyhow!("{e:#}; nothing was written"))?;
        work.push(Work::PhaseTwo);
    }
    obs.event(events::Event::Steps(work.iter().map(Work::name).collect()));
    let mut steps: Vec<chain::Step> = Vec::new();
    let mut installed = None;
    for (index, w) in work.iter().enumerate() {
        obs.event(events::Event::Step { index });
        loop {
            let t = Instant::now();
            let outcome = match w {
                Work::Partition => partition(m, plan, o),
                Work::Restore(v, img) => {
                    let dev = Path::new(&v.target_device);
                    println!(
                        "restoring {} ({:?}) from {img} onto {}",
                        v.id,
                        v.role,
                        dev.display()
                    );
                    restore_one(img, dev, v.action, o.secret.as_deref())
                        .with_context(|| {
                            format!("restoring volume {} onto {}", v.id, dev.display())
                        })
                        .map(|()| format!("onto {}", dev.display()))
                }
                Work::PhaseTwo => {
                    let state = chain::State {
                        source: spec.to_string(),
                        plan: plan.clone(),
                        firmware: chain::firmware_here(),
                        cmdline: o.cmdline.clone(),
                        started: started.clone(),
                        phase_one: steps.clone(),
                        warnings: plan.warnings.clone(),
                    };
                    install_phase_two(m, plan, o, state, t).map(|dir| {
                        let s = dir.display().to_string();
                        installed = Some(dir);
                        s
                    })
                }
            };
            match outcome {
                Ok(result) => {
                    let seconds = t.elapsed().as_secs_f64();
                    obs.event(events::Event::StepDone {
                        index,
                        seconds,
                        result: result.clone(),
                    });
                    steps.push(chain::Step {
                        name: w.name(),
                        seconds,
                        result,
                    });
                    break;
                }
                Err(e) => {
                    let trouble = events::Trouble {
                        step: w.name(),
                        error: format!("{e:#}"),
                        // Every step of phase one is needed to boot.
                        critical: true,
                        abort: true,
                    };
                    match obs.trouble(&trouble) {
                        events::Choice::Retry => {
                            println!("retrying: {}", w.name());
                            obs.event(events::Event::Step { index });
                        }
                        _ => return Err(e),
                    }
                }
            }
        }
    }
    let restored: Vec<&str> = work
        .iter()
        .filter_map(|w| match w {
            Work::Restore(v, _) => Some(v.id.as_str()),
            _ => None,
        })
        .collect();
    let later: Vec<&str> = plan
        .volumes
        .iter()
        .filter(|v| {
            !v.role.is_critical() && matches!(v.action, Action::RestoreImage | Action::RestoreFiles)
        })
        .map(|v| v.id.as_str())
        .collect();
    println!(
        "phase one done: {} restored{}",
        restored.join(", "),
        if later.is_empty() {
            String::new()
        } else {
            format!("; left for phase two: {}", later.join(", "))
        }
    );
    if installed.is_some() {
        println!(
            "phase two installed on {}: it starts at the next boot from that disk",
            plan.volumes
                .iter()
                .find(|v| v.role.is_critical())
                .map_or("the target", |v| v.target_disk.as_str())
        );
    }
    Ok(Done {
        phase_two: installed,
        restored: restored.iter().map(|s| s.to_string()).collect(),
        later: later.iter().map(|s| s.to_string()).collect(),
        steps,
    })
}

fn partition(m: &Manifest, plan: &Plan, o: &Options) -> Result<String> {
    crate::apply::apply(
        m,
        plan,
        &crate::apply::Options {
            keep_on_error: false,
            journal: o.journal.clone(),
            protected: crate::targets::medium_protection(o.medium),
        },
    )?;
    let disks = plan.target_devices().join(", ");
    println!("partition tables written: {disks}");
    Ok(disks)
}

fn install_phase_two(
    m: &Manifest,
    plan: &Plan,
    o: &Options,
    mut state: chain::State,
    t: Instant,
) -> Result<PathBuf> {
    let sys = chain::Mounted::new(m, plan, Path::new("/run/bmr/target"))?;
    let dir = chain::install(m, o.medium, &mut state, &sys)
        .context("installing the phase-two environment on the target")?;
    state.phase_one.push(chain::Step {
        name: "install the phase-two environment".into(),
        seconds: t.elapsed().as_secs_f64(),
        result: dir.display().to_string(),
    });
    chain::write_state(&dir, &state)?;
    Ok(dir)
}

fn restore_one(img: &str, dev: &Path, action: Action, secret: Option<&[u8]>) -> Result<()> {
    use crate::image::{files, on_tape, read::Image, restore};
    if let Some((drive, name)) = on_tape::spec(Path::new(img)) {
        on_tape::restore(&drive, name.as_deref(), dev, secret, true)?;
        return Ok(());
    }
    let image = Image::open(Path::new(img), secret)?;
    if action == Action::RestoreFiles {
        files::restore_files(image, dev)?;
    } else {
        restore::restore(&image, dev, true)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_on(devs: &[&str], warnings: &[&str]) -> Plan {
        let targets: Vec<serde_json::Value> = devs
            .iter()
            .map(|d| {
                serde_json::json!({
                    "device": d, "name": d.trim_start_matches("/dev/"), "size_bytes": 1u64 << 30,
                    "logical_sector_size": 512, "physical_sector_size": 512, "saved": ["disk0"],
                    "table": "gpt", "partitions": [], "reason": ""
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "disks": [], "targets": targets, "volumes": [], "dropped": [],
            "warnings": warnings, "policy": Policy::default()
        }))
        .unwrap()
    }

    fn w(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn nothing_is_written_without_naming_every_disk() {
        let p = plan_on(&["/dev/vda", "/dev/vdb"], &[]);
        let e = consent(&[], &p).unwrap_err();
        assert!(e.contains("bmr.wipe=/dev/vda,/dev/vdb"), "{e}");
        let e = consent(&w(&["/dev/vda"]), &p).unwrap_err();
        assert!(e.contains("/dev/vdb, which bmr.wipe= does not name"), "{e}");
        assert!(consent(&w(&["/dev/vdb", "/dev/vda"]), &p).is_ok());
        assert!(consent(&w(&["all"]), &p).is_ok());
    }

    #[test]
    fn a_guessed_mapping_is_never_consented_to() {
        let p = plan_on(
            &["/dev/vda"],
            &["disk0: /dev/vda and /dev/vdb are equally suitable; chose /dev/vda"],
        );
        let e = consent(&w(&["all"]), &p).unwrap_err();
        assert!(e.contains("bmr.target="), "{e}");
    }

    #[test]
    fn a_source_or_medium_can_name_a_filesystem_and_a_path_in_it() {
        assert_eq!(
            split_device_path("LABEL=BMR-BACKUP:/repo"),
            Some(("LABEL=BMR-BACKUP", "/repo"))
        );
        assert_eq!(
            split_device_path("UUID=1234-abcd:/boot/bmr-phase2/medium.img"),
            Some(("UUID=1234-abcd", "/boot/bmr-phase2/medium.img"))
        );
        assert_eq!(split_device_path("/dev/sdb1:/x"), Some(("/dev/sdb1", "/x")));
        assert_eq!(split_device_path("/mnt/repo"), None);
        assert_eq!(split_device_path("UUID=abc:relative"), None);
        assert_eq!(split_device_path("host:/export"), None);
    }

    #[test]
    fn sources_and_image_names() {
        let tape = source("tape:/dev/nst0").unwrap();
        assert_eq!(
            image_of(&tape, Some("tape#root"), "root").unwrap(),
            "tape:/dev/nst0#root"
        );
        let dir = source("file:/mnt/repo").unwrap();
        assert_eq!(
            image_of(&dir, Some("images/h-root-1.bmri"), "root").unwrap(),
            "/mnt/repo/images/h-root-1.bmri"
        );
        let url = source("https://backup/repo/").unwrap();
        assert_eq!(
            image_of(&url, Some("images/x.bmri"), "root").unwrap(),
            "https://backup/repo/images/x.bmri"
        );
        assert!(source("ftp://x").is_err());
        let e = image_of(&tape, None, "root").unwrap_err().to_string();
        assert!(e.contains("run bmr backup"), "{e}");
    }
}
