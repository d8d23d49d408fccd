//! Across the reboot from phase one to phase two: the phase-two environment
//! on the restored boot volume (the rescue kernel, an initramfs made from the
//! running rescue system, the recovery medium, the state and the journal) and
//! a boot entry that starts it and stays the default until phase two has put
//! the system's own boot loader back. The recovery medium and the ISO are not
//! needed after this.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::manifest::{Firmware, Manifest, Role};
use crate::plan::{Plan, VolumePlan};

/// The directory, inside the mounted system's /boot.
pub const DIR: &str = "boot/bmr-phase2";
pub const MEDIUM: &str = "medium.img";
pub const STATE: &str = "state.json";
pub const JOURNAL: &str = "journal.json";
/// Where `bmr mkrescue` puts the kernel inside the initramfs, so that phase
/// one can carry it to the target without the ISO.
pub const RESCUE_KERNEL: &str = "/usr/lib/bmr/vmlinuz";

/// What phase one hands to phase two.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub source: String,
    pub plan: Plan,
    pub firmware: Firmware,
    /// Kernel arguments phase two boots with.
    pub cmdline: String,
    pub started: String,
    pub phase_one: Vec<Step>,
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub seconds: f64,
    pub result: String,
}

pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// This machine's firmware, as the kernel booted it.
pub fn firmware_here() -> Firmware {
    if Path::new("/sys/firmware/efi").exists() {
        Firmware::Uefi
    } else {
        Firmware::Bios
    }
}

/// The restored system's critical volumes mounted under one directory, in
/// mount-point order; unmounted (in reverse) when dropped.
pub struct Mounted {
    pub root: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Mounted {
    pub fn new(m: &Manifest, plan: &Plan, root: &Path) -> Result<Mounted> {
        let mut vols: Vec<(&str, &VolumePlan)> = plan
            .volumes
            .iter()
            .filter(|v| v.role.is_critical() && !v.target_device.is_empty())
            .filter_map(|v| {
                let mp = m.volume(&v.id).map(|x| x.mountpoint.as_str())?;
                mp.starts_with('/').then_some((mp, v))
            })
            .collect();
        vols.sort_by_key(|(mp, _)| mp.matches('/').count() - usize::from(*mp == "/"));
        if vols.first().map(|(mp, _)| *mp) != Some("/") {
            bail!("the manifest names no system volume mounted at /: there is no system to boot");
        }
        fs::create_dir_all(root)?;
        let mut me = Mounted {
            root: root.to_path_buf(),
            mounts: Vec::new(),
        };
        for (mp, v) in vols {
            let at = root.join(mp.trim_start_matches('/'));
            fs::create_dir_all(&at)?;
            crate::tool::run(
                std::process::Command::new("mount")
                    .args(["-t", &v.filesystem])
                    .arg(&v.target_device)
                    .arg(&at),
            )
            .with_context(|| format!("mounting volume {} ({}) at {mp}", v.id, v.target_device))?;
            me.mounts.push(at);
        }
        Ok(me)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        for at in self.mounts.iter().rev() {
            let _ = crate::tool::run(std::process::Command::new("umount").arg(at));
        }
    }
}

/// The planned volume that holds /boot: a boot volume, else the system
/// volume. Its disk is the one the boot loader goes on.
pub fn holds_boot(plan: &Plan) -> Result<&VolumePlan> {
    let pick = |role: Role| plan.volumes.iter().find(|v| v.role == role);
    pick(Role::Boot)
        .or_else(|| pick(Role::System))
        .context("the plan restores no boot or system volume")
}

/// The volume that holds /boot and the path of the phase-two directory as
/// its own filesystem sees it.
fn boot_volume<'p>(m: &Manifest, plan: &'p Plan) -> Result<(&'p VolumePlan, String)> {
    let v = holds_boot(plan)?;
    let mp = m
        .volume(&v.id)
        .map(|x| x.mountpoint.clone())
        .unwrap_or_default();
    let within = Path::new("/")
        .join(DIR)
        .strip_prefix(&mp)
        .map(|p| format!("/{}", p.display()))
        .with_context(|| {
            format!(
                "volume {} is mounted at {mp}, which does not hold /boot",
                v.id
            )
        })?;
    if v.uuid.is_empty() {
        bail!(
            "volume {} has no filesystem UUID to boot phase two from",
            v.id
        );
    }
    Ok((v, within))
}

/// The kernel arguments to keep: the consoles (the operator watches the
/// same screens in both phases) and the flags that shape the recovery.
pub fn carried_args(cmdline: &str) -> Vec<String> {
    cmdline
        .split_whitespace()
        .filter(|a| {
            a.starts_with("console=")
                // Guided phase one: phase two shows its screens too.
                || *a == "bmr.mode=guided"
                || *a == "bmr.lock"
                || *a == "bmr.debug"
                || a.starts_with("bmr.console=")
        })
        .map(str::to_string)
        .collect()
}

/// What phase two will need, checked before phase one writes anything.
pub fn preflight(m: &Manifest, plan: &Plan) -> Result<()> {
    let firmware = firmware_here();
    if firmware != m.system.firmware {
        bail!(
            "the saved system booted with {} firmware, this machine boots with {}: switch the firmware mode in its setup (CSM/legacy for bios) and start again",
            m.system.firmware,
            firmware
        );
    }
    if !Path::new(RESCUE_KERNEL).is_file() {
        bail!("{RESCUE_KERNEL} is missing: phase two needs the rescue system's kernel, so run recovery from the rescue ISO (bmr mkrescue), or pass --no-phase-two");
    }
    boot_volume(m, plan)?;
    Ok(())
}

/// Writes the phase-two environment into the mounted system and makes it
/// the next boot. Returns the directory it wrote.
pub fn install(m: &Manifest, medium: &Path, state: &mut State, sys: &Mounted) -> Result<PathBuf> {
    preflight(m, &state.plan)?;
    let firmware = firmware_here();
    let kernel = Path::new(RESCUE_KERNEL);
    let (boot, within) = boot_volume(m, &state.plan)?;
    let dir = sys.root.join(DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let mut content = if crate::medium::looks_like_fat(medium) {
        crate::medium::read_all(medium)?
    } else {
        crate::medium::Content::default()
    };
    if content.files.is_empty() {
        content.add(crate::medium::MANIFEST_PATH, m.to_toml()?.into_bytes());
    }
    let img = dir.join(MEDIUM);
    let _ = fs::remove_file(&img);
    crate::medium::write(&img, &content)?;
    fs::copy(kernel, dir.join("vmlinuz")).context("copying the rescue kernel")?;
    crate::rescue::cpio::write_running(Path::new("/"), &dir.join("initrd.img"))
        .context("writing the phase-two initramfs")?;

    let mut args = carried_args(&state.cmdline);
    if !args.iter().any(|a| a.starts_with("bmr.mode=")) {
        args.push("bmr.mode=auto".to_string());
    }
    args.extend([
        "bmr.phase=2".to_string(),
        format!("bmr.medium=UUID={}:{within}/{MEDIUM}", boot.uuid),
    ]);
    state.cmdline = args.join(" ");
    write_state(&dir, state)?;

    let disk = &boot.target_disk;
    match firmware {
        Firmware::Bios => grub_bios(&dir, disk)?,
        Firmware::Uefi => grub_uefi(&dir, &esp_mount(m, &state.plan, sys)?)?,
    }
    let system_cfg = Path::new(&within)
        .parent()
        .map(|p| p.join("grub/grub.cfg"))
        .unwrap_or_else(|| PathBuf::from("/boot/grub/grub.cfg"));
    fs::write(
        dir.join("grub/grub.cfg"),
        grub_cfg(
            &boot.uuid,
            &within,
            &state.cmdline,
            &system_cfg.display().to_string(),
        ),
    )?;
    nix::unistd::sync();
    Ok(dir)
}

pub fn write_state(dir: &Path, state: &State) -> Result<()> {
    let tmp = dir.join(format!("{STATE}.tmp"));
    fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    fs::rename(&tmp, dir.join(STATE))?;
    Ok(())
}

pub fn read_state(dir: &Path) -> Result<State> {
    let path = dir.join(STATE);
    let data = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&data).with_context(|| {
        format!(
            "{} is damaged: start the recovery again from the rescue ISO",
            path.display()
        )
    })
}

/// GRUB for BIOS into the target disk's boot track, with its prefix in the
/// phase-two directory: the system's own /boot/grub stays untouched, and a
/// second entry still reaches it.
fn grub_bios(dir: &Path, disk: &str) -> Result<()> {
    crate::tool::run(
        std::process::Command::new("grub-install")
            .args([
                "--target=i386-pc",
                "--modules=part_msdos part_gpt ext2 fat search_fs_uuid",
                "--no-floppy",
            ])
            .arg(format!("--boot-directory={}", dir.display()))
            .arg(disk),
    )
    .with_context(|| format!("installing GRUB for phase two on {disk}"))?;
    Ok(())
}

/// The NVRAM entry (and ESP directory) phase two boots through; grub-install
/// puts it first in BootOrder. Phase two removes both.
pub const EFI_ID: &str = "bmr-phase2";

/// GRUB for UEFI in its own ESP directory, registered first in BootOrder,
/// with its prefix in the phase-two directory.
fn grub_uefi(dir: &Path, esp: &Path) -> Result<()> {
    crate::tool::run(
        std::process::Command::new("grub-install")
            .args([
                "--target=x86_64-efi",
                "--modules=part_gpt part_msdos ext2 fat search_fs_uuid",
            ])
            .arg(format!("--efi-directory={}", esp.display()))
            .arg(format!("--boot-directory={}", dir.display()))
            .arg(format!("--bootloader-id={EFI_ID}")),
    )
    .context("installing GRUB for phase two in the EFI system partition and its boot entry")?;
    Ok(())
}

/// Where the restored ESP is mounted.
fn esp_mount(m: &Manifest, plan: &Plan, sys: &Mounted) -> Result<PathBuf> {
    let v = plan
        .volumes
        .iter()
        .find(|v| v.role == Role::Esp)
        .context("a UEFI system needs an EFI system partition, and the plan restores none")?;
    let mp = m
        .volume(&v.id)
        .map(|x| x.mountpoint.trim_start_matches('/').to_string())
        .filter(|mp| !mp.is_empty())
        .context("the EFI system partition has no mount point in the manifest")?;
    Ok(sys.root.join(mp))
}

pub fn grub_cfg(uuid: &str, within: &str, cmdline: &str, system_cfg: &str) -> String {
    format!(
        "# Written by bmr for phase two of a recovery; bmr replaces it with the
# system's own boot loader when phase two ends.
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set timeout=2
set default=0
search --no-floppy --fs-uuid --set=root {uuid}
menuentry 'bmr: recovery, phase two' {{
    linux {within}/vmlinuz {cmdline}
    initrd {within}/initrd.img
}}
menuentry 'the restored system as it is (phase two has not finished)' {{
    configfile {system_cfg}
}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_two_keeps_the_consoles_and_the_lock() {
        assert_eq!(
            carried_args("BOOT_IMAGE=/x console=tty0 console=ttyS0,115200 bmr.mode=auto bmr.wipe=all bmr.lock quiet"),
            ["console=tty0", "console=ttyS0,115200", "bmr.lock"]
        );
        assert_eq!(
            carried_args("console=ttyS0 bmr.mode=guided bmr.source=file:/x"),
            ["console=ttyS0", "bmr.mode=guided"]
        );
    }

    #[test]
    fn the_grub_entry_boots_phase_two_first() {
        let c = grub_cfg(
            "1234-abcd",
            "/boot/bmr-phase2",
            "console=ttyS0 bmr.phase=2",
            "/boot/grub/grub.cfg",
        );
        let first = c.find("menuentry").unwrap();
        assert!(
            c[first..].starts_with("menuentry 'bmr: recovery, phase two'"),
            "{c}"
        );
        assert!(
            c.contains("linux /boot/bmr-phase2/vmlinuz console=ttyS0 bmr.phase=2"),
            "{c}"
        );
        assert!(
            c.contains("search --no-floppy --fs-uuid --set=root 1234-abcd"),
            "{c}"
        );
        assert!(c.contains("configfile /boot/grub/grub.cfg"), "{c}");
    }
}
