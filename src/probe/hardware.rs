//! The hardware profile (seed 002): storage controllers and NICs with their
//! drivers, CPU and memory, from sysfs and /proc. Recovery compares it with the
//! machine it runs on to know which drivers and network settings must change.

use std::fs;
use std::path::Path;

use crate::manifest::{Controller, Hardware, Nic};

fn read(path: impl AsRef<Path>) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn link_name(path: impl AsRef<Path>) -> String {
    fs::read_link(path)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

fn hex(s: &str) -> String {
    s.trim_start_matches("0x").to_string()
}

pub fn profile(sys: &Path, proc: &Path) -> Hardware {
    let cpuinfo = read(proc.join("cpuinfo"));
    let meminfo = read(proc.join("meminfo"));
    Hardware {
        cpu: cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default(),
        cpus: cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count() as u32,
        memory_bytes: meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024),
        storage: storage(sys),
        nics: nics(sys),
    }
}

/// PCI functions of class 01 (mass storage): SATA, NVMe, SCSI, virtio-blk...
fn storage(sys: &Path) -> Vec<Controller> {
    let Ok(entries) = fs::read_dir(sys.join("bus/pci/devices")) else {
        return Vec::new();
    };
    let mut out: Vec<Controller> = entries
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            let class = read(p.join("class"));
            // Virtio-blk/scsi functions do not always carry class 01.
            if !class.starts_with("0x01") && !has_virtio_block(&p) {
                return None;
            }
            let driver = link_name(p.join("driver"));
            Some(Controller {
                address: e.file_name().to_string_lossy().into_owned(),
                pci_id: format!(
                    "{}:{}",
                    hex(&read(p.join("vendor"))),
                    hex(&read(p.join("device")))
                ),
                class,
                driver,
            })
        })
        .collect();
    out.sort_by(|a, b| a.address.cmp(&b.address));
    out
}

fn has_virtio_block(pci: &Path) -> bool {
    let Ok(entries) = fs::read_dir(pci) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.starts_with("virtio")
            && matches!(
                link_name(e.path().join("driver")).as_str(),
                "virtio_blk" | "virtio_scsi"
            )
    })
}

/// Physical NICs (those with a device behind them): virtual ones are
/// recreated by the restored system's own configuration.
fn nics(sys: &Path) -> Vec<Nic> {
    let Ok(entries) = fs::read_dir(sys.join("class/net")) else {
        return Vec::new();
    };
    let mut out: Vec<Nic> = entries
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            if !p.join("device").exists() {
                return None;
            }
            Some(Nic {
                name: e.file_name().to_string_lossy().into_owned(),
                mac: read(p.join("address")),
                driver: link_name(p.join("device/driver")),
                address: link_name(p.join("device")),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn profile_from_a_fake_sysfs() {
        let root = tempfile::tempdir().unwrap();
        let sys = root.path().join("sys");
        let proc = root.path().join("proc");
        let pci = sys.join("bus/pci/devices");
        let drivers = sys.join("bus/pci/drivers");
        for (addr, class, driver) in [
            ("0000:00:1f.2", "0x010601", "ahci"),
            ("0000:00:02.0", "0x030000", "bochs-drm"),
            ("0000:00:03.0", "0x020000", "e1000"),
        ] {
            let d = pci.join(addr);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("class"), format!("{class}\n")).unwrap();
            fs::write(d.join("vendor"), "0x8086\n").unwrap();
            fs::write(d.join("device"), "0x2922\n").unwrap();
            fs::create_dir_all(drivers.join(driver)).unwrap();
            symlink(drivers.join(driver), d.join("driver")).unwrap();
        }
        let net = sys.join("class/net");
        fs::create_dir_all(net.join("lo")).unwrap();
        fs::create_dir_all(net.join("eth0")).unwrap();
        fs::write(net.join("eth0/address"), "52:54:00:12:34:56\n").unwrap();
        symlink(pci.join("0000:00:03.0"), net.join("eth0/device")).unwrap();
        fs::create_dir_all(&proc).unwrap();
        fs::write(proc.join("cpuinfo"), "processor\t: 0\nmodel name\t: Test CPU @ 2GHz\nprocessor\t: 1\nmodel name\t: Test CPU @ 2GHz\n").unwrap();
        fs::write(
            proc.join("meminfo"),
            "MemTotal:        2048 kB\nMemFree: 1 kB\n",
        )
        .unwrap();

        let hw = profile(&sys, &proc);
        assert_eq!(hw.cpu, "Test CPU @ 2GHz");
        assert_eq!(hw.cpus, 2);
        assert_eq!(hw.memory_bytes, 2048 * 1024);
        assert_eq!(hw.storage.len(), 1);
        assert_eq!(hw.storage[0].address, "0000:00:1f.2");
        assert_eq!(hw.storage[0].driver, "ahci");
        assert_eq!(hw.storage[0].pci_id, "8086:2922");
        assert_eq!(
            hw.nics,
            vec![Nic {
                name: "eth0".into(),
                mac: "52:54:00:12:34:56".into(),
                driver: "e1000".into(),
                address: "0000:00:03.0".into()
            }]
        );
    }
}
