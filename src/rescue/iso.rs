//! The hybrid ISO: GRUB for BIOS and UEFI through `grub-mkrescue`, which
//! makes one image that boots from CD and, written raw, from a USB stick.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::boot::cmdline::Mode;

pub struct Menu<'a> {
    pub default: Mode,
    pub timeout: u32,
    pub append: &'a str,
}

pub fn grub_cfg(template: &str, menu: &Menu) -> Result<String> {
    if menu.append.contains(['\n', '}', '{']) {
        bail!("--append must be plain kernel flags, without newlines or braces");
    }
    let default = match menu.default {
        Mode::Guided => "guided",
        Mode::Auto => "auto",
        Mode::Shell => "shell",
    };
    Ok(template
        .replace("@DEFAULT@", default)
        .replace("@TIMEOUT@", &menu.timeout.to_string())
        .replace("@APPEND@", menu.append.trim()))
}

/// Volume label: also how a rescue USB stick is recognised, so bmr never
/// plans onto it.
pub const VOLID: &str = "BMR-RESCUE";

pub fn build(kernel: &Path, initramfs: &Path, cfg: &str, dest: &Path) -> Result<u64> {
    for tool in ["grub-mkrescue", "xorriso", "mformat"] {
        if !crate::tool::exists(tool) {
            bail!("{tool} is missing; scripts/setup-deps installs grub-common, grub-pc-bin, grub-efi-amd64-bin, xorriso and mtools");
        }
    }
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let stage = tempfile::tempdir_in(parent)?;
    let boot = stage.path().join("boot");
    fs::create_dir_all(boot.join("grub"))?;
    fs::copy(kernel, boot.join("vmlinuz"))
        .with_context(|| format!("copying {}", kernel.display()))?;
    fs::copy(initramfs, boot.join("initrd.img"))?;
    fs::write(boot.join("grub/grub.cfg"), cfg)?;
    crate::tool::run(
        Command::new("grub-mkrescue")
            .arg("--compress=xz")
            .arg("-o")
            .arg(dest)
            .arg(stage.path())
            .args(["--", "-volid", VOLID]),
    )
    .context("grub-mkrescue")?;
    Ok(fs::metadata(dest)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn menu_placeholders_are_filled() {
        let cfg = grub_cfg(
            super::super::GRUB_CFG,
            &Menu {
                default: Mode::Auto,
                timeout: 2,
                append: "bmr.lock ",
            },
        )
        .unwrap();
        assert!(cfg.contains("set default=auto"));
        assert!(cfg.contains("set timeout=2"));
        assert!(cfg.contains("bmr.mode=shell bmr.lock\n"));
        assert!(!cfg.contains('@'));
        assert!(grub_cfg(
            "x",
            &Menu {
                default: Mode::Guided,
                timeout: 0,
                append: "a}\nb"
            }
        )
        .is_err());
    }
}
