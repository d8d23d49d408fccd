//! `bmr save`: the running (or mounted) system -> a manifest, its custom
//! drivers and catalog -> the recovery medium.

pub mod catalog;
pub mod drivers;
pub mod system;
mod volumes;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::manifest::{self, CatalogMode, Command, Disk, Header, Manifest, System};
use crate::medium::{self, Content, Written};
use crate::probe::{self, mounts};

pub struct SaveOptions {
    pub medium: PathBuf,
    pub system_root: PathBuf,
    pub disks: Vec<PathBuf>,
    pub drivers: Vec<String>,
    pub kernel: Option<String>,
    pub catalog: CatalogMode,
    pub commands: Option<PathBuf>,
}

pub struct Saved {
    pub manifest: Manifest,
    pub written: Written,
    pub notes: Vec<String>,
}

/// Is `root` the system we are running on?
fn is_running_root(root: &Path) -> bool {
    std::fs::canonicalize(root)
        .map(|p| p == Path::new("/"))
        .unwrap_or(false)
}

/// Disks holding the system's mounted filesystems (and, for the running
/// system, its active swap): the default set to record.
fn default_disks(root: &Path, running: bool) -> Result<Vec<PathBuf>> {
    let root =
        std::fs::canonicalize(root).with_context(|| format!("system root {}", root.display()))?;
    let mut nums: Vec<(u32, u32)> = mounts::mounts()?
        .iter()
        .filter(|m| m.mountpoint.starts_with(&root) && m.major != 0)
        .map(|m| (m.major, m.minor))
        .collect();
    if running {
        nums.extend(mounts::active_swaps());
    }
    let disks: BTreeSet<PathBuf> = nums
        .into_iter()
        .filter_map(|(major, minor)| crate::targets::disk_of_devnum(major, minor))
        .map(|name| PathBuf::from(format!("/dev/{name}")))
        .collect();
    if disks.is_empty() {
        bail!(
            "no disk holds a filesystem mounted at {}; name the disks with --disk",
            root.display()
        );
    }
    Ok(disks.into_iter().collect())
}

fn kernel_version(root: &Path, running: bool, requested: Option<&str>) -> String {
    if let Some(k) = requested {
        return k.to_string();
    }
    let current = system::running_kernel();
    if running || drivers::modules_dir(root, &current).is_some() {
        return current;
    }
    drivers::installed_kernels(root).pop().unwrap_or(current)
}

fn read_commands(path: &Path) -> Result<Vec<Command>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        commands: Vec<Command>,
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading commands from {}", path.display()))?;
    let file: File = toml::from_str(&text)
        .with_context(|| format!("{}: expected [[commands]] tables", path.display()))?;
    Ok(file.commands)
}

pub fn save(opts: &SaveOptions) -> Result<Saved> {
    let running = is_running_root(&opts.system_root);
    if !opts.system_root.is_dir() {
        bail!(
            "system root {} is not a directory",
            opts.system_root.display()
        );
    }
    let disk_paths = if opts.disks.is_empty() {
        default_disks(&opts.system_root, running)?
    } else {
        opts.disks.clone()
    };
    let report = probe::probe(&disk_paths)?;
    let mut notes = report.warnings.clone();

    let fstab = system::fstab(&opts.system_root);
    let (disks, partitions, volumes) =
        volumes::build(&report.disks, &opts.system_root, &fstab, &mut notes)?;
    let has_esp = volumes.iter().any(|v| v.role == manifest::Role::Esp);

    let kernel = kernel_version(&opts.system_root, running, opts.kernel.as_deref());
    let (collected, driver_notes) = drivers::collect(&opts.system_root, &kernel, &opts.drivers)?;
    notes.extend(driver_notes);

    let mut content = Content::default();
    let catalog = if opts.catalog == CatalogMode::None {
        None
    } else {
        let built = catalog::build(&opts.system_root, opts.catalog)?;
        notes.extend(
            built
                .skipped
                .iter()
                .map(|s| format!("catalog: skipped {s}")),
        );
        let entry = manifest::Catalog {
            file: catalog::CATALOG_PATH.into(),
            mode: opts.catalog,
            entries: built.entries,
            checksum: format!("blake3:{}", blake3::hash(&built.data).to_hex()),
        };
        content.add(catalog::CATALOG_PATH, built.data);
        Some(entry)
    };
    for c in &collected {
        content.add(c.driver.file.clone(), c.data.clone());
    }
    let (os, os_id) = system::os_release(&opts.system_root);
    let manifest = Manifest {
        manifest: Header {
            version: manifest::FORMAT_VERSION,
            created: now_rfc3339(),
            tool: format!("bmr {}", env!("CARGO_PKG_VERSION")),
            checksum: None,
        },
        system: System {
            hostname: system::hostname(&opts.system_root, running),
            os,
            os_id,
            kernel,
            firmware: system::firmware(running, has_esp),
            bootloader: system::bootloader(&opts.system_root),
        },
        disks,
        partitions,
        volumes,
        commands: match &opts.commands {
            Some(p) => read_commands(p)?,
            None => Vec::new(),
        },
        drivers: collected.into_iter().map(|c| c.driver).collect(),
        hardware: report.hardware,
        catalog,
    };
    let errors = manifest::validate(&manifest);
    if !errors.is_empty() {
        let list: Vec<String> = errors.iter().map(|e| format!("  - {e}")).collect();
        bail!(
            "the system state read from {} does not make a valid manifest:\n{}",
            opts.system_root.display(),
            list.join("\n")
        );
    }
    let text = manifest.to_toml().context("serialising the manifest")?;
    content
        .files
        .insert(0, (medium::MANIFEST_PATH.to_string(), text.into_bytes()));
    let written = medium::write(&opts.medium, &content)?;
    Ok(Saved {
        manifest,
        written,
        notes,
    })
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The manifest's record of a probed disk.
pub fn disk_entry(id: String, d: &probe::ProbedDisk) -> Disk {
    let i = &d.info;
    Disk {
        id,
        device: i.device.clone(),
        model: i.model.clone(),
        serial: i.serial.clone(),
        wwn: i.wwn.clone(),
        by_path: i.by_path.clone(),
        by_id: i.by_id.clone(),
        transport: i.transport.clone(),
        size_bytes: i.size_bytes,
        logical_sector_size: i.logical_sector_size,
        physical_sector_size: i.physical_sector_size,
        rotational: i.rotational,
        removable: i.removable,
        table: d.table.kind,
        guid: d.table.guid,
        signature: d.table.signature.clone(),
    }
}
