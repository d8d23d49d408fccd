//! `bmr mkrescue` flags and what it reports.

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::{iso, Kernel};
use crate::boot::cmdline::Mode;
use crate::report::size;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the hybrid ISO.
    #[arg(long, value_name = "FILE")]
    pub iso: Option<PathBuf>,
    /// Where to write the initramfs (default: only inside the ISO).
    #[arg(long, value_name = "FILE")]
    pub initramfs: Option<PathBuf>,
    /// Kernel image (default: the newest /boot/vmlinuz-* that has modules).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// The kernel's module directory (default: lib/modules/RELEASE beside the kernel, else /lib/modules/RELEASE).
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,
    /// Boot menu entry started when the timeout ends.
    #[arg(long, value_enum, default_value = "guided")]
    pub default: MenuMode,
    /// Seconds the boot menu waits.
    #[arg(long, default_value_t = 10)]
    pub timeout: u32,
    /// Kernel flags added to every menu entry (e.g. "bmr.lock bmr.source=tape:/dev/nst0").
    #[arg(long, value_name = "FLAGS", default_value = "")]
    pub append: String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum MenuMode {
    Guided,
    Auto,
    Shell,
}

pub fn run(a: &Args) -> Result<()> {
    if a.iso.is_none() && a.initramfs.is_none() {
        bail!("say what to build: --iso FILE and/or --initramfs FILE");
    }
    let kernel = Kernel::find(a.kernel.as_deref(), a.modules.as_deref())?;
    println!(
        "kernel {} ({}), modules from {}",
        kernel.release,
        kernel.image.display(),
        kernel.modules.display()
    );
    let keep = a.initramfs.clone();
    let tmp;
    let initramfs = match &keep {
        Some(p) => p.clone(),
        None => {
            let iso = a.iso.as_ref().expect("checked above");
            tmp = tempfile::Builder::new().prefix(".initrd").tempfile_in(
                iso.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new(".")),
            )?;
            tmp.path().to_path_buf()
        }
    };
    let b = super::build_initramfs(&kernel, &initramfs)?;
    println!(
        "initramfs {}: {} files, {} kernel modules, {} firmware files; {} unpacked, {} compressed",
        initramfs.display(),
        b.files,
        b.modules,
        b.firmware,
        size(b.raw_bytes),
        size(b.packed_bytes)
    );
    if !b.firmware_missing.is_empty() {
        println!(
            "note: {} firmware files the modules may ask for are not on this system (install firmware-linux-nonfree to carry them)",
            b.firmware_missing.len()
        );
    }
    for l in &b.left_out {
        println!("note: {l} is not on this system and is left out");
    }
    if let Some(iso_path) = &a.iso {
        let default = match a.default {
            MenuMode::Guided => Mode::Guided,
            MenuMode::Auto => Mode::Auto,
            MenuMode::Shell => Mode::Shell,
        };
        let cfg = iso::grub_cfg(
            super::GRUB_CFG,
            &iso::Menu {
                default,
                timeout: a.timeout,
                append: &a.append,
            },
        )?;
        let bytes = iso::build(&kernel.image, &initramfs, &cfg, iso_path)?;
        println!(
            "ISO {}: {} (BIOS and UEFI; write it raw to a USB stick or burn it)",
            iso_path.display(),
            size(bytes)
        );
    }
    Ok(())
}
