//! Facts about the saved system read from its root: os-release, hostname,
//! fstab, kernel, firmware and bootloader.

use std::fs;
use std::path::Path;

use crate::manifest::Firmware;

/// `KEY=value` pairs of os-release, quotes removed.
pub fn os_release(root: &Path) -> (String, String) {
    let text = ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .find_map(|p| fs::read_to_string(root.join(p)).ok())
        .unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_string())
            .unwrap_or_default()
    };
    let pretty = get("PRETTY_NAME");
    (
        if pretty.is_empty() {
            "unknown".into()
        } else {
            pretty
        },
        get("ID"),
    )
}

pub fn hostname(root: &Path, running: bool) -> String {
    let from_file = fs::read_to_string(root.join("etc/hostname"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    from_file
        .or_else(|| {
            running
                .then(|| nix::unistd::gethostname().ok()?.into_string().ok())
                .flatten()
        })
        .unwrap_or_else(|| "localhost".into())
}

pub fn running_kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FstabEntry {
    pub spec: String,
    pub mountpoint: String,
    pub fstype: String,
}

pub fn fstab(root: &Path) -> Vec<FstabEntry> {
    let text = fs::read_to_string(root.join("etc/fstab")).unwrap_or_default();
    parse_fstab(&text)
}

pub fn parse_fstab(text: &str) -> Vec<FstabEntry> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(FstabEntry {
                spec: unoctal(f.first()?),
                mountpoint: unoctal(f.get(1)?),
                fstype: f.get(2).map(|s| s.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

fn unoctal(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t")
}

/// Does an fstab spec (UUID=, LABEL=, PARTUUID=, PARTLABEL=, a path) name
/// this filesystem?
pub fn spec_matches(
    spec: &str,
    uuid: &str,
    label: &str,
    partuuid: Option<&str>,
    partlabel: &str,
    device: &Path,
) -> bool {
    let eq = |a: &str, b: &str| !a.is_empty() && a.eq_ignore_ascii_case(b);
    if let Some(v) = spec
        .strip_prefix("UUID=")
        .or_else(|| spec.strip_prefix("/dev/disk/by-uuid/"))
    {
        return eq(v, uuid);
    }
    if let Some(v) = spec
        .strip_prefix("LABEL=")
        .or_else(|| spec.strip_prefix("/dev/disk/by-label/"))
    {
        return !label.is_empty() && v == label;
    }
    if let Some(v) = spec
        .strip_prefix("PARTUUID=")
        .or_else(|| spec.strip_prefix("/dev/disk/by-partuuid/"))
    {
        return partuuid.is_some_and(|p| eq(v, p));
    }
    if let Some(v) = spec.strip_prefix("PARTLABEL=") {
        return !partlabel.is_empty() && v == partlabel;
    }
    spec.starts_with('/')
        && fs::canonicalize(spec).ok().as_deref() == fs::canonicalize(device).ok().as_deref()
}

/// UEFI when the running system booted that way; for a system root that is
/// not running, UEFI when it has an EFI system partition.
pub fn firmware(running: bool, has_esp: bool) -> Firmware {
    let efi = if running {
        Path::new("/sys/firmware/efi").exists()
    } else {
        has_esp
    };
    if efi {
        Firmware::Uefi
    } else {
        Firmware::Bios
    }
}

pub fn bootloader(root: &Path) -> String {
    let exists = |p: &str| root.join(p).exists();
    if exists("boot/grub/grub.cfg")
        || exists("boot/grub2/grub.cfg")
        || exists("boot/efi/EFI/debian/grub.cfg")
    {
        "grub".into()
    } else if exists("boot/efi/loader/loader.conf")
        || exists("efi/loader/loader.conf")
        || exists("boot/loader/loader.conf")
    {
        "systemd-boot".into()
    } else {
        "unknown".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_parsing_and_matching() {
        let e = parse_fstab("# comment\n\nUUID=ABCD-1234 /boot/efi vfat umask=0077 0 1\nLABEL=my\\040data /srv/my\\040data ext4 defaults\n/dev/sdb1 none swap sw\n");
        assert_eq!(e.len(), 3);
        assert_eq!(e[1].mountpoint, "/srv/my data");
        assert!(spec_matches(
            &e[0].spec,
            "abcd-1234",
            "",
            None,
            "",
            Path::new("/nonexistent")
        ));
        assert!(spec_matches(
            &e[1].spec,
            "",
            "my data",
            None,
            "",
            Path::new("/x")
        ));
        assert!(!spec_matches("UUID=", "", "", None, "", Path::new("/x")));
        assert!(spec_matches(
            "PARTUUID=1111-2",
            "",
            "",
            Some("1111-2"),
            "",
            Path::new("/x")
        ));
        assert!(!spec_matches("LABEL=a", "", "", None, "", Path::new("/x")));
    }

    #[test]
    fn os_release_and_bootloader() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("etc")).unwrap();
        fs::write(
            root.path().join("etc/os-release"),
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n",
        )
        .unwrap();
        assert_eq!(
            os_release(root.path()),
            ("Debian GNU/Linux 12 (bookworm)".into(), "debian".into())
        );
        assert_eq!(bootloader(root.path()), "unknown");
        fs::create_dir_all(root.path().join("boot/grub")).unwrap();
        fs::write(root.path().join("boot/grub/grub.cfg"), "").unwrap();
        assert_eq!(bootloader(root.path()), "grub");
        fs::write(root.path().join("etc/hostname"), "web1\n").unwrap();
        assert_eq!(hostname(root.path(), false), "web1");
        assert_eq!(firmware(false, true), Firmware::Uefi);
        assert_eq!(firmware(false, false), Firmware::Bios);
    }
}
