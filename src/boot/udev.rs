//! Hardware probing the way the installed system does it: systemd-udevd
//! loads drivers by modalias, coldplug replays the devices the kernel found
//! before udevd ran, and `settle` waits for the queue instead of a sleep.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// Debian 12 path; /lib/systemd is the same directory through /lib -> usr/lib.
const UDEVD: &[&str] = &[
    "/usr/lib/systemd/systemd-udevd",
    "/lib/systemd/systemd-udevd",
    "/sbin/udevd",
];

pub struct Udevd(Child);

impl Udevd {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// Starts udevd as a child of ours (not --daemon), so its PID is known.
pub fn start(debug: bool) -> Result<Udevd> {
    let bin = UDEVD
        .iter()
        .find(|p| Path::new(p).exists())
        .context("systemd-udevd is not in this initramfs (see initramfs/files.list)")?;
    let mut cmd = Command::new(bin);
    cmd.arg("--resolve-names=never")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if !debug {
        cmd.stderr(Stdio::null());
    } else {
        cmd.arg("--debug");
    }
    let child = cmd.spawn().with_context(|| format!("starting {bin}"))?;
    // udevd answers once its control socket exists.
    for _ in 0..100 {
        if Path::new("/run/udev/control").exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(Udevd(child))
}

fn udevadm(args: &[&str]) -> Result<()> {
    crate::tool::run(Command::new("udevadm").args(args)).map(|_| ())
}

/// Replays add events for everything the kernel has found so far, then waits
/// for udev to finish with them (module loads included).
pub fn coldplug() -> Result<()> {
    udevadm(&["trigger", "--type=subsystems", "--action=add"])?;
    udevadm(&["trigger", "--type=devices", "--action=add"])?;
    settle()
}

/// Loads modules nothing asks for at boot (filesystems); one that is
/// missing is only the operator's loss of a shortcut, not an error.
pub fn preload(modules: &[String]) {
    let _ = Command::new("modprobe")
        .args(["-a", "-q"])
        .args(modules)
        .stdin(Stdio::null())
        .status();
}

pub fn settle() -> Result<()> {
    udevadm(&["settle", "--timeout=60"])
}

/// Modules loaded now, from /proc/modules.
pub fn loaded_modules() -> Vec<String> {
    let mut m: Vec<String> = fs::read_to_string("/proc/modules")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    m.sort();
    m
}

/// Devices on the buses that matter for recovery that no driver claimed:
/// the operator's hint that a module is missing.
pub fn devices_without_driver(sys: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for bus in ["pci", "virtio", "scsi", "usb"] {
        let Ok(entries) = fs::read_dir(sys.join("bus").join(bus).join("devices")) else {
            continue;
        };
        for e in entries.flatten() {
            let dev = e.path();
            let Ok(alias) = fs::read_to_string(dev.join("modalias")) else {
                continue;
            };
            if !dev.join("driver").exists() && matters(bus, &dev) {
                out.push(format!(
                    "{bus} {} ({})",
                    e.file_name().to_string_lossy(),
                    alias.trim()
                ));
            }
        }
    }
    out.sort();
    out
}

/// PCI bridges, VGA and the like work without a driver of ours; storage,
/// network and USB/FC controllers do not.
fn matters(bus: &str, dev: &Path) -> bool {
    if bus != "pci" {
        return true;
    }
    let class = fs::read_to_string(dev.join("class")).unwrap_or_default();
    let class = class.trim().trim_start_matches("0x");
    class.starts_with("01")
        || class.starts_with("02")
        || class.starts_with("0c03")
        || class.starts_with("0c04")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbound_devices_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("bus/pci/devices");
        for (name, bound, class) in [
            ("0000:00:01.0", true, "0x010000"),
            ("0000:00:02.0", false, "0x020000"),
            ("0000:00:04.0", false, "0x060100"),
        ] {
            fs::create_dir_all(d.join(name)).unwrap();
            fs::write(d.join(name).join("class"), format!("{class}\n")).unwrap();
            fs::write(d.join(name).join("modalias"), format!("pci:v{name}\n")).unwrap();
            if bound {
                fs::create_dir_all(d.join(name).join("driver")).unwrap();
            }
        }
        // No modalias: not a device a driver could bind; a bridge needs none.
        fs::create_dir_all(d.join("0000:00:03.0")).unwrap();
        assert_eq!(
            devices_without_driver(dir.path()),
            ["pci 0000:00:02.0 (pci:v0000:00:02.0)"]
        );
    }
}
