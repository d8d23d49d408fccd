//! Command-line interface: argument schema and the human/JSON output of each
//! command. The work itself lives in the modules named after it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::capture::{self, SaveOptions};
use crate::manifest::{CatalogMode, Manifest};
use crate::medium::{self, Written};
use crate::plan::{Plan, Policy, Sizing, TargetDisk};
use crate::probe;

#[derive(Debug, Parser)]
#[command(
    name = "bmr",
    version,
    about = "Bare-metal recovery: save a machine's system state, rebuild it onto the disks at hand"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Show the disks, partition tables, filesystems and hardware of this machine (read-only).
    Probe {
        /// Probe only these disks (loop devices are only probed when named).
        #[arg(long = "disk", value_name = "DEV", value_delimiter = ',')]
        disks: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Record the system state and write the recovery medium (a FAT image or an existing FAT partition).
    Save {
        /// Image file to create, or a block device holding a FAT filesystem.
        #[arg(long, value_name = "PATH")]
        medium: PathBuf,
        /// Root of the system to record: its fstab, os-release, modules and boot files.
        #[arg(long, value_name = "DIR", default_value = "/")]
        system_root: PathBuf,
        /// Disks to record (default: those holding the system's mounted filesystems and swap).
        #[arg(long = "disk", value_name = "DEV", value_delimiter = ',')]
        disks: Vec<PathBuf>,
        /// Kernel module to carry on the medium with its dependencies (e.g. st for a SCSI tape).
        #[arg(long = "driver", value_name = "MODULE", value_delimiter = ',')]
        drivers: Vec<String>,
        /// Kernel version whose modules --driver takes (default: the running kernel, else the newest installed).
        #[arg(long, value_name = "KVER")]
        kernel: Option<String>,
        /// Files that must be identical after a restore: none, boot files, or every packaged file too.
        #[arg(long, value_enum, default_value = "boot")]
        catalog: CatalogMode,
        /// TOML file with [[commands]] for recovery to run (same fields as the manifest's).
        #[arg(long, value_name = "FILE")]
        commands: Option<PathBuf>,
    },
    /// Compare the saved layout with this machine's disks and print the restore plan (writes nothing).
    Plan {
        #[command(flatten)]
        args: PlanArgs,
        #[arg(long)]
        json: bool,
    },
    /// Write the plan's partition tables and filesystems to the target disks.
    Apply {
        #[command(flatten)]
        args: PlanArgs,
        /// Really write; without it the plan is printed and nothing is written.
        #[arg(long)]
        yes: bool,
        /// Show what would be written, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// On failure keep the half-written disks as they are, for inspection.
        #[arg(long)]
        keep_on_error: bool,
        /// Apply this plan (from `bmr plan --json`) instead of planning again;
        /// every target is checked to still be the disk that plan saw.
        #[arg(long, value_name = "FILE")]
        plan: Option<PathBuf>,
        /// Where the journal lives (default /run/bmr/journal.json).
        #[arg(long, value_name = "FILE", default_value = crate::apply::DEFAULT_JOURNAL)]
        journal: PathBuf,
    },
    /// Image every volume of the manifest into a repository, boot and system volumes first,
    /// and record the image names in the manifest on the medium.
    Backup {
        /// Recovery medium (image or device) or manifest.toml written by `bmr save`.
        #[arg(long, value_name = "PATH")]
        medium: PathBuf,
        /// Directory repository, HTTP(S) repository URL, or a tape drive (tape:/dev/nst0: one tape set).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// zstd level (1-19).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// snapshot: an LVM volume is imaged from a snapshot; freeze: a mounted filesystem
        /// is frozen while read; none: read as it is, files changed meanwhile listed.
        /// Default: the first of those that works, said in the output.
        #[arg(long, value_enum)]
        consistency: Option<crate::image::backup::Consistency>,
        /// Tape record size in KiB.
        #[arg(long, value_name = "KIB", default_value_t = (crate::image::tape::DEFAULT_RECORD / 1024) as u32)]
        record_kib: u32,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Volume images: create, restore, inspect, verify.
    Image {
        #[command(subcommand)]
        action: ImageCmd,
    },
    /// Read a manifest from a recovery medium or a TOML file.
    Manifest {
        #[command(subcommand)]
        action: ManifestCmd,
    },
    /// Build the rescue initramfs and the hybrid ISO (BIOS and UEFI, CD and USB stick).
    Mkrescue(crate::rescue::cli::Args),
    /// Phase one of an unattended recovery: plan, write the disks named with --wipe,
    /// restore the boot and system volumes from --source (what bmr.mode=auto runs).
    Recover {
        /// Recovery medium (image or device) or manifest.toml.
        #[arg(long, value_name = "PATH")]
        medium: PathBuf,
        /// Where the images are: tape:/dev/nst0, file:DIR (a bmr backup repository) or an http(s):// URL.
        #[arg(long, value_name = "SOURCE")]
        source: String,
        /// Disks recovery may overwrite (every disk the plan writes, or `all`); without it nothing is written.
        #[arg(long, value_name = "DEV", value_delimiter = ',')]
        wipe: Vec<String>,
        /// Put a saved disk on a given target: disk0=/dev/vdb (repeatable).
        #[arg(long = "map", value_name = "SAVED=DEV", value_parser = parse_map, value_delimiter = ',')]
        map: Vec<(String, String)>,
        /// Journal of the steps done, so an interrupted run resumes.
        #[arg(
            long,
            value_name = "FILE",
            default_value = "/run/bmr/apply-journal.json"
        )]
        journal: PathBuf,
        /// Stop after restoring the boot and system volumes: no phase-two
        /// environment or boot entry on the target.
        #[arg(long)]
        no_phase_two: bool,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Guided recovery on a terminal: review the disks and the plan, change them,
    /// type the disk names to confirm, watch phase one (what bmr.mode=guided runs on
    /// every console). Exits with status 10 when the operator asks for the reboot.
    Guided {
        /// Recovery medium (image or device, LABEL=/UUID=); without it the first screen asks.
        #[arg(long, value_name = "PATH")]
        medium: Option<PathBuf>,
        /// Where the images are, as for `recover`; without it the first screen asks.
        #[arg(long, value_name = "SOURCE")]
        source: Option<String>,
        /// Start from this mapping of saved disks: disk0=/dev/vdb (repeatable).
        #[arg(long = "map", value_name = "SAVED=DEV", value_parser = parse_map, value_delimiter = ',')]
        map: Vec<(String, String)>,
        /// The terminal to draw on.
        #[arg(long, value_name = "DEV", default_value = "/dev/tty")]
        tty: PathBuf,
        /// Size for a terminal that reports none (a serial console): COLSxROWS.
        #[arg(long, value_name = "COLSxROWS", value_parser = parse_console_size)]
        console_size: Option<(u16, u16)>,
        /// No shell from the screens (bmr.lock).
        #[arg(long)]
        lock: bool,
        /// The rescue system's boot report, for the first screen.
        #[arg(long, value_name = "FILE")]
        boot_report: Option<PathBuf>,
        /// Where output goes while the screens are drawn (shown in their log pane).
        #[arg(long, value_name = "FILE", default_value = "/run/bmr/guided.log")]
        log: PathBuf,
        #[arg(
            long,
            value_name = "FILE",
            default_value = "/run/bmr/apply-journal.json"
        )]
        journal: PathBuf,
        /// Stop after restoring the boot and system volumes, as for `recover`.
        #[arg(long)]
        no_phase_two: bool,
        /// Phase two (booted from the restored disk; --medium is its copy of
        /// the medium): show it running, then its report.
        #[arg(long)]
        phase_two_run: bool,
        #[command(flatten)]
        key: KeyArgs,
    },
}

fn parse_console_size(s: &str) -> Result<(u16, u16), String> {
    s.split_once('x')
        .and_then(|(c, r)| Some((c.parse().ok()?, r.parse().ok()?)))
        .filter(|&(c, r): &(u16, u16)| c >= 20 && r >= 5)
        .ok_or_else(|| format!("\"{s}\" is not COLSxROWS, e.g. 100x30"))
}

/// What a plan is made from: the same flags for `plan`, `apply` and (later) recovery.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Recovery medium (image or device) or manifest.toml.
    #[arg(long, value_name = "PATH")]
    pub medium: PathBuf,
    /// Target disks to consider (default: every disk found; loop devices only when named).
    #[arg(long = "disk", value_name = "DEV", value_delimiter = ',')]
    pub disks: Vec<PathBuf>,
    /// Put a saved disk on a given target: disk0=/dev/vdb (repeatable).
    #[arg(long = "map", value_name = "SAVED=DEV", value_parser = parse_map, value_delimiter = ',')]
    pub map: Vec<(String, String)>,
    /// How spare space is given out: proportional (default), grow-last or keep.
    #[arg(long, value_enum, default_value = "proportional")]
    pub policy: Sizing,
    /// Keep data and swap volumes already intact on the target instead of restoring them.
    #[arg(long)]
    pub keep_intact: bool,
}

fn parse_map(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("\"{s}\" is not SAVED=DEV, e.g. disk0=/dev/vdb")),
    }
}

impl PlanArgs {
    /// Loads the manifest, probes the targets and plans: no writes.
    pub fn make(&self) -> Result<(Manifest, Vec<TargetDisk>, Plan)> {
        let manifest = medium::load_manifest(&self.medium)?;
        let policy = Policy {
            sizing: self.policy,
            keep_intact: self.keep_intact,
        };
        let (targets, plan) = crate::targets::plan_here(
            &manifest,
            &self.disks,
            &self.medium,
            &self.map,
            policy,
            &mut |w| eprintln!("bmr: warning: {w}"),
        )?;
        Ok((manifest, targets, plan))
    }
}

/// The key of an encrypted image: a key file, or a passphrase in an environment variable.
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    #[arg(long, value_name = "FILE", conflicts_with = "passphrase_env")]
    pub key_file: Option<PathBuf>,
    /// Name of an environment variable holding the passphrase (never a flag: it would show in ps).
    #[arg(long, value_name = "VAR")]
    pub passphrase_env: Option<String>,
}

impl KeyArgs {
    pub fn secret(&self) -> Result<Option<Vec<u8>>> {
        crate::image::crypto::secret(self.key_file.as_deref(), self.passphrase_env.as_deref())
    }
}

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Image a volume: used blocks only, metadata first, checksummed, compressed.
    Create {
        /// Block device or disk-image file holding the volume (opened read-only).
        #[arg(long, value_name = "DEV")]
        device: PathBuf,
        /// Image file to write, a directory repository (existing directory or a path ending in /),
        /// an HTTP(S) repository URL, or a tape drive (tape:/dev/nst0; the tape is written from its start).
        #[arg(long, value_name = "DEST")]
        to: PathBuf,
        /// Store only the chunks that differ from this earlier image of the same volume.
        #[arg(long, value_name = "IMAGE")]
        parent: Option<PathBuf>,
        /// zstd level (1-19).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// Image name inside a repository.
        #[arg(long)]
        name: Option<String>,
        /// Chunk size in KiB (a power of two, 64 to 65536). Default: 4096 for an
        /// image file or a tape, 1024 in a repository (smaller chunks are found
        /// identical more often), the parent's for an incremental image.
        #[arg(long, value_name = "KIB")]
        chunk_kib: Option<u32>,
        /// Tape record size in KiB: large records keep a drive streaming.
        #[arg(long, value_name = "KIB", default_value_t = (crate::image::tape::DEFAULT_RECORD / 1024) as u32)]
        record_kib: u32,
        /// For a mounted volume: snapshot (LVM), freeze (FIFREEZE while read) or none
        /// (read as it is, files changed meanwhile listed in the image).
        /// Default: the first of those that works, said in the output.
        #[arg(long, value_enum)]
        consistency: Option<crate::image::backup::Consistency>,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Restore an image onto a partition (grown to fill it), or file by file with --files.
    Restore {
        /// Image file, URL, or an image on tape: tape:/dev/nst0#NAME (read once, front to back).
        #[arg(long, value_name = "IMAGE")]
        from: PathBuf,
        #[arg(long, value_name = "DEV")]
        device: PathBuf,
        /// New filesystem with the saved UUID and label, then a file copy: for a partition
        /// smaller than the filesystem but big enough for its data.
        #[arg(long)]
        files: bool,
        /// Leave the filesystem at its saved size.
        #[arg(long)]
        no_grow: bool,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// What an image holds: volume identity, used and stored bytes, chunks, parent.
    Info {
        image: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Mount an image read-only (served through FUSE, read by the kernel's own driver) until Ctrl-C or umount.
    Mount {
        image: PathBuf,
        dir: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// List the files of an image (under PATH, default /).
    Ls {
        image: PathBuf,
        path: Option<PathBuf>,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Copy files and directories out of an image, in the order their data lies on the volume.
    Extract {
        image: PathBuf,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Check every chunk against its hash; the first bad one is named with its offset.
    Verify {
        image: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ManifestCmd {
    /// Print the saved system state.
    Show {
        /// Recovery medium (image or device) or manifest.toml.
        source: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Verify checksum and consistency; exit status 0 when sound.
    Check { source: PathBuf },
    /// Recompute the checksum of a hand-edited manifest.toml (after checking everything else).
    Seal { file: PathBuf },
}

pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Probe { disks, json } => {
            let report = probe::probe(&disks)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::report::probe_text(&report));
            }
        }
        Cmd::Save {
            medium,
            system_root,
            disks,
            drivers,
            kernel,
            catalog,
            commands,
        } => {
            let opts = SaveOptions {
                medium,
                system_root,
                disks,
                drivers,
                kernel,
                catalog,
                commands,
            };
            let saved = capture::save(&opts)?;
            for n in &saved.notes {
                eprintln!("bmr: warning: {n}");
            }
            let m = &saved.manifest;
            match saved.written {
                Written::Image {
                    bytes,
                    grown: false,
                } => println!(
                    "recovery medium: {} ({bytes} bytes, 1.44 MB floppy image)",
                    opts.medium.display()
                ),
                Written::Image { bytes, grown: true } => {
                    println!("recovery medium: {} ({bytes} bytes: the content does not fit a 1.44 MB floppy, so the image is larger)", opts.medium.display())
                }
                Written::Device => println!(
                    "recovery medium: {} (files replaced in its FAT filesystem)",
                    opts.medium.display()
                ),
            }
            print!("{}", crate::report::manifest_text(m));
        }
        Cmd::Plan { args, json } => {
            let (m, targets, plan) = args.make()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", crate::report::plan_text(&m, &targets, &plan));
            }
        }
        Cmd::Apply {
            args,
            yes,
            dry_run,
            keep_on_error,
            plan: plan_file,
            journal,
        } => {
            let (m, targets, plan) = match &plan_file {
                Some(file) => {
                    let text = std::fs::read(file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    let plan: Plan = serde_json::from_slice(&text).with_context(|| {
                        format!("{} is not a plan from `bmr plan --json`", file.display())
                    })?;
                    (medium::load_manifest(&args.medium)?, Vec::new(), plan)
                }
                None => args.make()?,
            };
            print!("{}", crate::report::plan_text(&m, &targets, &plan));
            if plan.is_ambiguous() && !dry_run {
                anyhow::bail!("the plan had to choose between equally suitable disks (see the warnings above); say which with --map SAVED=DEV; nothing was written");
            }
            if dry_run || !yes {
                println!(
                    "\nnothing written: {}",
                    if dry_run {
                        "--dry-run"
                    } else {
                        "add --yes to write these disks"
                    }
                );
                return Ok(ExitCode::SUCCESS);
            }
            let protected = crate::targets::medium_protection(&args.medium);
            let opts = crate::apply::Options {
                keep_on_error,
                journal,
                protected,
            };
            crate::apply::apply(&m, &plan, &opts)?;
            println!(
                "\napplied: partition tables written and verified on {}",
                plan.target_devices().join(", ")
            );
        }
        Cmd::Image { action } => return crate::image::cli::run(action),
        Cmd::Backup {
            medium,
            to,
            level,
            consistency,
            record_kib,
            key,
        } => {
            let opts = crate::image::backup::BackupOptions {
                medium,
                to,
                secret: key.secret()?,
                level,
                consistency,
                record_kib,
            };
            for d in crate::image::backup::backup(&opts)? {
                println!(
                    "{}: {} -> {} ({} used, {} stored; {})",
                    d.volume,
                    d.device.display(),
                    d.created.path.display(),
                    crate::report::size(d.created.used_bytes),
                    crate::report::size(d.created.stored_bytes),
                    d.how
                );
            }
            println!(
                "image names recorded in the manifest on {}",
                opts.medium.display()
            );
        }
        Cmd::Manifest { action } => return manifest_cmd(action),
        Cmd::Mkrescue(args) => crate::rescue::cli::run(&args)?,
        Cmd::Recover {
            medium: medium_path,
            source,
            wipe,
            map,
            journal,
            no_phase_two,
            key,
        } => {
            let m = medium::load_manifest(&medium_path)?;
            let done = crate::recover::phase_one(
                &m,
                &crate::recover::Options {
                    medium: &medium_path,
                    source: Some(&source),
                    wipe: &wipe,
                    map: &map,
                    secret: key.secret()?,
                    journal,
                    phase_two: !no_phase_two,
                    cmdline: std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
                },
            )?;
            if done.phase_two.is_some() {
                println!("reboot from the target disk to run phase two");
            }
        }
        Cmd::Guided {
            medium,
            source,
            map,
            tty,
            console_size,
            lock,
            boot_report,
            log,
            journal,
            no_phase_two,
            phase_two_run,
            key,
        } => {
            if let Some(d) = log.parent() {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            let crate::tui::Exit::Reboot = crate::tui::run(crate::tui::Options {
                tty,
                medium,
                source,
                map,
                secret: key.secret()?,
                lock,
                console_size,
                boot_report,
                log,
                journal,
                phase_two: !no_phase_two,
                phase_two_run,
                cmdline: std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
            })?;
            return Ok(ExitCode::from(crate::tui::EXIT_REBOOT));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn manifest_cmd(action: ManifestCmd) -> Result<ExitCode> {
    match action {
        ManifestCmd::Show { source, json } => {
            let m = medium::load_manifest(&source)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                print!("{}", crate::report::manifest_text(&m));
            }
        }
        ManifestCmd::Check { source } => {
            let m = medium::load_manifest(&source)?;
            println!(
                "{}: manifest sound (checksum matches, {} disks, {} partitions, {} volumes, {} drivers)",
                source.display(),
                m.disks.len(),
                m.partitions.len(),
                m.volumes.len(),
                m.drivers.len()
            );
        }
        ManifestCmd::Seal { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let m: Manifest = toml::from_str(&text)
                .with_context(|| format!("{} is not a valid manifest", file.display()))?;
            let errors = crate::manifest::validate(&m);
            if !errors.is_empty() {
                let list: Vec<String> = errors.iter().map(|e| format!("  - {e}")).collect();
                anyhow::bail!(
                    "{} is inconsistent; fix these first:\n{}",
                    file.display(),
                    list.join("\n")
                );
            }
            std::fs::write(&file, m.to_toml()?)
                .with_context(|| format!("writing {}", file.display()))?;
            println!("{}: sealed", file.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cmd {
        Cli::try_parse_from(std::iter::once("bmr").chain(args.iter().copied()))
            .unwrap()
            .command
    }

    #[test]
    fn disks_and_drivers_repeat_or_take_commas() {
        let Cmd::Save {
            disks,
            drivers,
            catalog,
            system_root,
            ..
        } = parse(&[
            "save",
            "--medium",
            "m.img",
            "--disk",
            "/dev/sda",
            "--disk=/dev/sdb,/dev/sdc",
            "--driver",
            "st,sg",
            "--driver",
            "ch",
        ])
        else {
            panic!("not save")
        };
        assert_eq!(
            disks,
            ["/dev/sda", "/dev/sdb", "/dev/sdc"].map(PathBuf::from)
        );
        assert_eq!(drivers, ["st", "sg", "ch"]);
        assert_eq!(catalog, CatalogMode::Boot);
        assert_eq!(system_root, PathBuf::from("/"));
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(
            Cli::try_parse_from(["bmr", "save"]).is_err(),
            "--medium is required"
        );
        let err = Cli::try_parse_from(["bmr", "save", "--medium", "m", "--catalog", "most"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("none") && err.contains("full"), "{err}");
        assert!(Cli::try_parse_from(["bmr", "save", "--medium", "m", "--colour"]).is_err());
    }

    #[test]
    fn probe_and_manifest_forms() {
        assert!(matches!(
            parse(&["probe", "--json"]),
            Cmd::Probe { json: true, .. }
        ));
        assert!(matches!(
            parse(&["manifest", "show", "m.img", "--json"]),
            Cmd::Manifest {
                action: ManifestCmd::Show { json: true, .. }
            }
        ));
        assert!(matches!(
            parse(&["manifest", "check", "m.img"]),
            Cmd::Manifest {
                action: ManifestCmd::Check { .. }
            }
        ));
    }
}
