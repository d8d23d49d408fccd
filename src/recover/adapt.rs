//! Hardware adaptation (seed 002), run in phase two with the restored system
//! mounted at `root`: what changed between the saved hardware profile and
//! this machine, and the edits that let the restored system boot and reach
//! the network here anyway (device names in fstab and crypttab, interface
//! names in network configuration, an initramfs with this machine's storage
//! drivers, built by the restored system's own tools).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde::Serialize;

use crate::manifest::{Hardware, Nic};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub storage_drivers_added: Vec<String>,
    pub storage_drivers_removed: Vec<String>,
    /// (old name, new name). A card replaced by another one is listed here
    /// too, even under the same name: its MAC address changed.
    pub nics_renamed: Vec<(String, String)>,
    pub nics_added: Vec<Nic>,
    pub nics_removed: Vec<Nic>,
    /// (saved model, current model).
    pub cpu: Option<(String, String)>,
    /// (saved bytes, current bytes).
    pub memory: Option<(u64, u64)>,
}

pub fn compare(saved: &Hardware, now: &Hardware) -> Difference {
    let (storage_drivers_added, storage_drivers_removed) = storage_drivers(saved, now);
    let (nics_renamed, nics_added, nics_removed) = pair_nics(&saved.nics, &now.nics);
    Difference {
        storage_drivers_added,
        storage_drivers_removed,
        nics_renamed,
        nics_added,
        nics_removed,
        cpu: (!saved.cpu.is_empty() && !now.cpu.is_empty() && saved.cpu != now.cpu)
            .then(|| (saved.cpu.clone(), now.cpu.clone())),
        memory: memory_changed(saved.memory_bytes, now.memory_bytes)
            .then_some((saved.memory_bytes, now.memory_bytes)),
    }
}

/// (added, removed), sorted. A controller without a bound driver tells
/// nothing about what the initramfs needs, and neither does one that was
/// there unbound at save time (the saved system never loaded its driver:
/// nothing of the system sat behind it).
fn storage_drivers(saved: &Hardware, now: &Hardware) -> (Vec<String>, Vec<String>) {
    let unbound_then: BTreeSet<(&str, &str)> = saved
        .storage
        .iter()
        .filter(|c| c.driver.is_empty())
        .map(|c| (c.address.as_str(), c.pci_id.as_str()))
        .collect();
    let set = |hw: &Hardware, skip: &BTreeSet<(&str, &str)>| -> BTreeSet<String> {
        hw.storage
            .iter()
            .filter(|c| !c.driver.is_empty())
            .filter(|c| !skip.contains(&(c.address.as_str(), c.pci_id.as_str())))
            .map(|c| c.driver.clone())
            .collect()
    };
    let (before, after) = (set(saved, &BTreeSet::new()), set(now, &unbound_then));
    (
        after.difference(&before).cloned().collect(),
        before.difference(&after).cloned().collect(),
    )
}

type NicPairing = (Vec<(String, String)>, Vec<Nic>, Vec<Nic>);

/// A MAC identifies a card whatever the kernel calls it. Cards left over on
/// both sides are taken as replacements in order (a new card in the old
/// one's place), so the configuration follows them; only the surplus on
/// either side is really new or gone.
fn pair_nics(saved: &[Nic], now: &[Nic]) -> NicPairing {
    let mut current: Vec<Option<&Nic>> = now.iter().filter(|n| n.name != "lo").map(Some).collect();
    let mut renamed = Vec::new();
    let mut unmatched = Vec::new();
    for old in saved.iter().filter(|n| n.name != "lo") {
        let same_card = current
            .iter_mut()
            .find(|slot| slot.is_some_and(|new| same_mac(old, new)))
            .and_then(Option::take);
        match same_card {
            Some(new) if new.name != old.name => renamed.push((old.name.clone(), new.name.clone())),
            Some(_) => {}
            None => unmatched.push(old),
        }
    }
    let mut left = current.into_iter().flatten();
    let mut removed = Vec::new();
    for old in unmatched {
        match left.next() {
            Some(new) => renamed.push((old.name.clone(), new.name.clone())),
            None => removed.push(old.clone()),
        }
    }
    (renamed, left.cloned().collect(), removed)
}

fn same_mac(a: &Nic, b: &Nic) -> bool {
    !a.mac.is_empty() && a.mac.eq_ignore_ascii_case(&b.mac)
}

/// Kernels reserve different amounts of memory, so the rescue kernel and
/// the installed one never report quite the same total on one machine.
fn memory_changed(saved: u64, now: u64) -> bool {
    saved != 0 && now != 0 && saved.abs_diff(now) > saved.max(now) / 32
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

impl Difference {
    pub fn is_empty(&self) -> bool {
        *self == Difference::default()
    }

    /// The initramfs must be rebuilt: it may lack the driver of the disks here.
    pub fn storage_changed(&self) -> bool {
        !self.storage_drivers_added.is_empty() || !self.storage_drivers_removed.is_empty()
    }

    /// One sentence per change, for the console and the recovery report.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        let (added, removed) = (
            self.storage_drivers_added.join(", "),
            self.storage_drivers_removed.join(", "),
        );
        match (added.is_empty(), removed.is_empty()) {
            (false, false) => out.push(format!("storage: now driven by {added} (was {removed})")),
            (false, true) => out.push(format!("storage: now also driven by {added}")),
            (true, false) => out.push(format!("storage: no longer driven by {removed}")),
            (true, true) => {}
        }
        for (old, new) in &self.nics_renamed {
            out.push(if old == new {
                format!("network: {old} is a different card now (its MAC address changed)")
            } else {
                format!("network: {old} is now {new}")
            });
        }
        for n in &self.nics_added {
            out.push(format!("network: new interface {}", describe(n)));
        }
        for n in &self.nics_removed {
            out.push(format!("network: interface {} is gone", describe(n)));
        }
        if let Some((was, now)) = &self.cpu {
            out.push(format!("cpu: now {now} (was {was})"));
        }
        if let Some((was, now)) = self.memory {
            out.push(format!("memory: now {} (was {})", gib(now), gib(was)));
        }
        out
    }
}

fn describe(n: &Nic) -> String {
    match (n.mac.is_empty(), n.driver.is_empty()) {
        (true, true) => n.name.clone(),
        (false, true) => format!("{} ({})", n.name, n.mac),
        (true, false) => format!("{} (driver {})", n.name, n.driver),
        (false, false) => format!("{} ({}, driver {})", n.name, n.mac, n.driver),
    }
}

/// Kernel device names in /etc/fstab become `UUID=` where `uuid_of` knows
/// the filesystem: on other hardware the disks may enumerate differently.
/// Every other byte stays as it was. Returns the text and one line per change.
pub fn rewrite_fstab(
    text: &str,
    uuid_of: &dyn Fn(&str) -> Option<String>,
) -> (String, Vec<String>) {
    rewrite_devices(text, 0, "/etc/fstab", uuid_of)
}

/// As [`rewrite_fstab`], for /etc/crypttab, where the device is the second field.
pub fn rewrite_crypttab(
    text: &str,
    uuid_of: &dyn Fn(&str) -> Option<String>,
) -> (String, Vec<String>) {
    rewrite_devices(text, 1, "/etc/crypttab", uuid_of)
}

fn rewrite_devices(
    text: &str,
    field: usize,
    file: &str,
    uuid_of: &dyn Fn(&str) -> Option<String>,
) -> (String, Vec<String>) {
    let mut out = String::with_capacity(text.len());
    let mut changes = Vec::new();
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let span = if trimmed.is_empty() || trimmed.starts_with('#') {
            None
        } else {
            field_span(line, field)
        };
        let replacement = span.and_then(|(start, end)| {
            let dev = &line[start..end];
            if !is_kernel_name(dev) {
                return None;
            }
            let uuid = uuid_of(dev)?;
            changes.push(format!("{file}: {dev} → UUID={uuid}"));
            Some((start, end, uuid))
        });
        match replacement {
            Some((start, end, uuid)) => {
                out.push_str(&line[..start]);
                out.push_str("UUID=");
                out.push_str(&uuid);
                out.push_str(&line[end..]);
            }
            None => out.push_str(line),
        }
    }
    (out, changes)
}

/// Byte range of the `index`th whitespace-separated field of `line`.
fn field_span(line: &str, index: usize) -> Option<(usize, usize)> {
    let mut pos = 0;
    for n in 0..=index {
        let start = pos + line[pos..].find(|c: char| !c.is_whitespace())?;
        let end = line[start..]
            .find(char::is_whitespace)
            .map_or(line.len(), |len| start + len);
        if n == index {
            return Some((start, end));
        }
        pos = end;
    }
    None
}

/// Names the kernel hands out in probe order: sda1, vdb, hda2, xvda1,
/// nvme0n1p2, mmcblk0p1. Stable names (mapper, md, by-uuid) are left alone.
fn is_kernel_name(dev: &str) -> bool {
    let Some(name) = dev.strip_prefix("/dev/") else {
        return false;
    };
    for prefix in ["xvd", "sd", "vd", "hd"] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let letters = rest.trim_end_matches(|c: char| c.is_ascii_digit());
            return !letters.is_empty() && letters.bytes().all(|b| b.is_ascii_lowercase());
        }
    }
    let numbered = |rest: &str, middle: char| -> Option<()> {
        let mut r = digits(rest)?;
        if middle != 'p' {
            r = digits(r.strip_prefix(middle)?)?;
        }
        if r.is_empty() || digits(r.strip_prefix('p')?)?.is_empty() {
            Some(())
        } else {
            None
        }
    };
    if let Some(rest) = name.strip_prefix("nvme") {
        return numbered(rest, 'n').is_some();
    }
    if let Some(rest) = name.strip_prefix("mmcblk") {
        return numbered(rest, 'p').is_some();
    }
    false
}

/// What follows one or more leading ASCII digits.
fn digits(s: &str) -> Option<&str> {
    let rest = s.trim_start_matches(|c: char| c.is_ascii_digit());
    (rest.len() < s.len()).then_some(rest)
}

/// Interface names as whole words (`eth1` never touches `eth10`; `eth0:1`
/// and `eth0.10` follow `eth0`), all renames at once so a swap works.
/// Suits ifupdown, systemd-networkd, netplan and NetworkManager files alike.
/// Returns the text and one line per changed line.
pub fn rename_interfaces(text: &str, renames: &[(String, String)]) -> (String, Vec<String>) {
    let mut map: HashMap<&str, &str> = HashMap::new();
    for (old, new) in renames.iter().filter(|(old, new)| old != new) {
        map.entry(old.as_str()).or_insert(new.as_str());
    }
    let mut out = String::with_capacity(text.len());
    let mut changes = Vec::new();
    for (number, line) in text.split_inclusive('\n').enumerate() {
        let renamed = rename_words(line, &map);
        if renamed != line {
            changes.push(format!(
                "line {}: {} → {}",
                number + 1,
                line.trim(),
                renamed.trim()
            ));
        }
        out.push_str(&renamed);
    }
    (out, changes)
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn rename_words(line: &str, map: &HashMap<&str, &str>) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while !rest.is_empty() {
        let word = rest.find(|c: char| !is_name_char(c)).unwrap_or(rest.len());
        if word == 0 {
            let sep = rest.chars().next().map_or(1, char::len_utf8);
            out.push_str(&rest[..sep]);
            rest = &rest[sep..];
        } else {
            out.push_str(map.get(&rest[..word]).copied().unwrap_or(&rest[..word]));
            rest = &rest[word..];
        }
    }
    out
}

/// The network configuration files under `root` that name interfaces.
fn network_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("etc/network/interfaces")];
    let dirs: [(&str, Option<&str>); 4] = [
        ("etc/network/interfaces.d", None),
        ("etc/systemd/network", Some("network")),
        ("etc/netplan", Some("yaml")),
        (
            "etc/NetworkManager/system-connections",
            Some("nmconnection"),
        ),
    ];
    for (dir, ext) in dirs {
        let Ok(entries) = fs::read_dir(root.join(dir)) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| ext.is_none_or(|x| p.extension().is_some_and(|e| e == x)))
            .collect();
        found.sort();
        files.extend(found);
    }
    // Symbolic links are skipped: an absolute one would lead out of `root`
    // into the rescue system, and one to /dev/null masks a unit.
    files.retain(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()));
    files
}

/// Applies `renames` to the restored system's network configuration
/// (ifupdown, systemd-networkd, netplan, NetworkManager keyfiles); only files
/// that change are written. Returns one line per changed line.
pub fn adapt_network(root: &Path, renames: &[(String, String)]) -> Result<Vec<String>> {
    if renames.iter().all(|(old, new)| old == new) {
        return Ok(Vec::new());
    }
    let mut changes = Vec::new();
    for path in network_files(root) {
        let shown = Path::new("/").join(path.strip_prefix(root).unwrap_or(&path));
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", shown.display()))?;
        let (renamed, lines) = rename_interfaces(&text, renames);
        if lines.is_empty() {
            continue;
        }
        replace_file(&path, &renamed).with_context(|| {
            format!(
                "rewriting {} for the renamed interfaces; the file is unchanged",
                shown.display()
            )
        })?;
        changes.extend(lines.iter().map(|l| format!("{}, {l}", shown.display())));
    }
    Ok(changes)
}

/// A crash leaves either the old file or the new one, never half of one;
/// mode and owner stay the file's own.
fn replace_file(path: &Path, text: &str) -> io::Result<()> {
    let meta = fs::metadata(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".bmr-").tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().set_permissions(meta.permissions())?;
    std::os::unix::fs::fchown(tmp.as_file(), Some(meta.uid()), Some(meta.gid()))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

const INITRAMFS_TOOLS: [(&str, &[&str]); 3] = [
    ("update-initramfs", &["-u", "-k", "all"]),
    ("dracut", &["--force", "--regenerate-all"]),
    ("mkinitcpio", &["-P"]),
];

const BIN_DIRS: [&str; 4] = ["usr/sbin", "sbin", "usr/bin", "bin"];

/// The restored system's own initramfs builder (Debian/Ubuntu, then
/// Fedora/RHEL/SUSE, then Arch): only it knows how that system's initramfs
/// is made. Returns its name and the command line that rebuilds every
/// installed kernel's initramfs, to run with [`chroot_run`].
pub fn initramfs_tool(root: &Path) -> Option<(&'static str, Vec<String>)> {
    INITRAMFS_TOOLS.iter().find_map(|&(tool, args)| {
        let dir = BIN_DIRS.iter().find(|dir| {
            // An entry, not a target: a symlink is resolved inside the chroot.
            fs::symlink_metadata(root.join(dir).join(tool)).is_ok_and(|m| !m.is_dir())
        })?;
        let mut argv = vec![format!("/{dir}/{tool}")];
        argv.extend(args.iter().map(|a| a.to_string()));
        Some((tool, argv))
    })
}

/// Bind mounts into `root`, undone in reverse order when released or dropped.
#[derive(Default)]
struct Binds {
    mounted: Vec<PathBuf>,
}

impl Binds {
    fn bind(&mut self, source: &Path, target: &Path) -> Result<()> {
        ensure_dir(target)?;
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting {} on {}", source.display(), target.display()))?;
        self.mounted.push(target.to_path_buf());
        Ok(())
    }

    fn release(&mut self) -> Result<()> {
        let mut failed = Vec::new();
        while let Some(target) = self.mounted.pop() {
            // Something the command left running may hold the mount: detach
            // it then, so the restored filesystem can still be unmounted.
            let result = umount2(&target, MntFlags::empty())
                .or_else(|_| umount2(&target, MntFlags::MNT_DETACH));
            if let Err(e) = result {
                failed.push(format!("{} ({e})", target.display()));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            bail!(
                "could not unmount {}; unmount them (umount -l) before unmounting the restored system",
                failed.join(", ")
            )
        }
    }
}

impl Drop for Binds {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// A mount point inside `root`, created if missing. A symbolic link is
/// refused: an absolute one would put the mount on the rescue system itself.
fn ensure_dir(target: &Path) -> Result<()> {
    match fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) if m.file_type().is_symlink() => bail!(
            "{} is a symbolic link; refusing to mount over it (make it a directory in the restored system)",
            target.display()
        ),
        Ok(_) => bail!("{} is not a directory; cannot mount on it", target.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))
        }
        Err(e) => Err(e).with_context(|| format!("examining {}", target.display())),
    }
}

fn is_mount_point(path: &Path) -> bool {
    match (fs::metadata(path), path.parent().map(fs::metadata)) {
        (Ok(m), Some(Ok(parent))) => m.dev() != parent.dev(),
        _ => false,
    }
}

/// (host path, path inside root), in mount order.
fn host_mounts() -> Vec<(&'static str, &'static str)> {
    let mut list = vec![("/proc", "proc"), ("/sys", "sys")];
    // A boot loader installed from inside registers itself in EFI variables.
    if is_mount_point(Path::new("/sys/firmware/efi/efivars")) {
        list.push(("/sys/firmware/efi/efivars", "sys/firmware/efi/efivars"));
    }
    list.push(("/dev", "dev"));
    for (host, inside) in [("/dev/pts", "dev/pts"), ("/run", "run")] {
        if Path::new(host).is_dir() {
            list.push((host, inside));
        }
    }
    list
}

/// The rescue system's PATH may not fit the restored one.
const CHROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs `argv` inside the restored system at `root`, with /proc, /sys, /dev
/// and /run of this machine bound in (the initramfs tools read the hardware
/// from them); unmounts them again whatever happens. Returns what the
/// command printed, standard output then standard error.
pub fn chroot_run(root: &Path, argv: &[String]) -> Result<String> {
    if argv.is_empty() {
        bail!("no command given to run inside {}", root.display());
    }
    if !root.is_dir() {
        bail!(
            "{} is not a directory: mount the restored system there first",
            root.display()
        );
    }
    let mut binds = Binds::default();
    for (host, inside) in host_mounts() {
        binds.bind(Path::new(host), &root.join(inside))?;
    }
    let result = run_chrooted(root, argv);
    let released = binds.release();
    let output = result?;
    released?;
    Ok(output)
}

fn run_chrooted(root: &Path, argv: &[String]) -> Result<String> {
    let shown = argv.join(" ");
    let out = Command::new("chroot")
        .arg(root)
        .args(argv)
        .env("PATH", CHROOT_PATH)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("starting chroot to run `{shown}`: the rescue system needs chroot (coreutils or busybox)")
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let said = if stderr.trim().is_empty() {
            &stdout
        } else {
            &stderr
        };
        bail!(
            "`{shown}` inside {} failed ({}): {}",
            root.display(),
            out.status,
            tail(said, 15)
        );
    }
    Ok(format!("{stdout}{stderr}"))
}

/// The last lines of a tool's output: where its error usually is.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.trim_end().lines().collect();
    let start = all.len().saturating_sub(lines);
    match all[start..].join("\n") {
        s if s.is_empty() => "it printed nothing".to_string(),
        s => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_controller_the_saved_system_left_unbound_is_no_change() {
        let ctl = |driver: &str| Controller {
            address: "0000:00:1f.2".into(),
            pci_id: "8086:2922".into(),
            class: "0x010601".into(),
            driver: driver.into(),
        };
        let saved = Hardware {
            storage: vec![ctl("")],
            ..Hardware::default()
        };
        let now = Hardware {
            storage: vec![ctl("ahci")],
            ..Hardware::default()
        };
        assert!(compare(&saved, &now).is_empty());
    }
    use crate::manifest::Controller;
    use std::os::unix::fs::PermissionsExt;

    fn controller(address: &str, driver: &str) -> Controller {
        Controller {
            address: address.into(),
            pci_id: "1af4:1001".into(),
            class: "0x010000".into(),
            driver: driver.into(),
        }
    }

    fn nic(name: &str, mac: &str) -> Nic {
        Nic {
            name: name.into(),
            mac: mac.into(),
            driver: "virtio_net".into(),
            address: "0000:00:03.0".into(),
        }
    }

    fn hw(storage: &[(&str, &str)], nics: &[(&str, &str)]) -> Hardware {
        Hardware {
            cpu: "QEMU Virtual CPU".into(),
            cpus: 2,
            memory_bytes: 4 << 30,
            storage: storage.iter().map(|(a, d)| controller(a, d)).collect(),
            nics: nics.iter().map(|(n, m)| nic(n, m)).collect(),
        }
    }

    fn renames(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn same_hardware_is_no_difference() {
        let a = hw(
            &[("0000:00:04.0", "virtio-pci")],
            &[("lo", ""), ("eth0", "52:54:00:00:00:01")],
        );
        let mut b = a.clone();
        // A few MiB less under another kernel is the same memory.
        b.memory_bytes -= 20 << 20;
        let d = compare(&a, &b);
        assert!(d.is_empty(), "{d:?}");
        assert!(!d.storage_changed());
        assert!(d.lines().is_empty());
    }

    #[test]
    fn virtio_to_ahci_is_a_storage_change() {
        let a = hw(&[("0000:00:04.0", "virtio-pci")], &[]);
        let b = hw(
            &[
                ("0000:00:1f.2", "ahci"),
                ("0000:00:05.0", ""),
                ("0000:00:1f.3", "ahci"),
            ],
            &[],
        );
        let d = compare(&a, &b);
        assert_eq!(d.storage_drivers_added, ["ahci"]);
        assert_eq!(d.storage_drivers_removed, ["virtio-pci"]);
        assert!(d.storage_changed());
        assert_eq!(d.lines(), ["storage: now driven by ahci (was virtio-pci)"]);
    }

    #[test]
    fn same_mac_under_another_name_is_a_rename() {
        let a = hw(&[], &[("eth0", "52:54:00:00:00:01")]);
        let b = hw(&[], &[("ens3", "52:54:00:00:00:01")]);
        let d = compare(&a, &b);
        assert_eq!(d.nics_renamed, renames(&[("eth0", "ens3")]));
        assert!(d.nics_added.is_empty() && d.nics_removed.is_empty());
        assert!(!d.storage_changed());
        assert_eq!(d.lines(), ["network: eth0 is now ens3"]);
    }

    #[test]
    fn a_replaced_card_takes_over_the_old_configuration() {
        let a = hw(
            &[],
            &[("eth0", "52:54:00:00:00:01"), ("eth1", "52:54:00:00:00:02")],
        );
        let b = hw(
            &[],
            &[
                ("enp1s0", "AA:BB:CC:00:00:09"),
                ("eth1", "52:54:00:00:00:02"),
                ("enp2s0", "aa:bb:cc:00:00:0a"),
            ],
        );
        let d = compare(&a, &b);
        assert_eq!(d.nics_renamed, renames(&[("eth0", "enp1s0")]));
        assert_eq!(d.nics_added, [nic("enp2s0", "aa:bb:cc:00:00:0a")]);
        assert!(d.nics_removed.is_empty());
        assert!(d.lines().contains(
            &"network: new interface enp2s0 (aa:bb:cc:00:00:0a, driver virtio_net)".to_string()
        ));

        let same_name = compare(
            &hw(&[], &[("eth0", "52:54:00:00:00:01")]),
            &hw(&[], &[("eth0", "52:54:00:00:00:07")]),
        );
        assert_eq!(same_name.nics_renamed, renames(&[("eth0", "eth0")]));
        assert!(!same_name.is_empty());

        let gone = compare(&a, &hw(&[], &[("eth1", "52:54:00:00:00:02")]));
        assert_eq!(gone.nics_removed, [nic("eth0", "52:54:00:00:00:01")]);
        assert!(gone.nics_renamed.is_empty());
    }

    #[test]
    fn loopback_is_ignored() {
        let a = hw(
            &[],
            &[("lo", "00:00:00:00:00:00"), ("eth0", "52:54:00:00:00:01")],
        );
        let b = hw(&[], &[("eth0", "52:54:00:00:00:01")]);
        assert!(compare(&a, &b).is_empty());
        assert!(compare(&b, &a).is_empty());
    }

    #[test]
    fn cpu_and_memory_are_reported() {
        let a = hw(&[], &[]);
        let mut b = a.clone();
        b.cpu = "AMD EPYC".into();
        b.memory_bytes = 8 << 30;
        let d = compare(&a, &b);
        assert_eq!(d.memory, Some((4 << 30, 8 << 30)));
        assert_eq!(
            d.lines(),
            [
                "cpu: now AMD EPYC (was QEMU Virtual CPU)",
                "memory: now 8.0 GiB (was 4.0 GiB)"
            ]
        );
    }

    fn known(dev: &str) -> Option<String> {
        match dev {
            "/dev/sda1" => Some("1111-AAAA".into()),
            "/dev/nvme0n1p2" => Some("2222-bbbb".into()),
            "/dev/vdb" => Some("3333".into()),
            "/dev/mapper/vg-root" | "UUID=x" => Some("never".into()),
            _ => None,
        }
    }

    #[test]
    fn fstab_device_names_become_uuids_and_nothing_else_changes() {
        let fstab = "# /etc/fstab: static file system information.\n\
                     #/dev/sda1 /old ext4 defaults 0 2\n\
                     \n\
                     /dev/sda1\t/boot   ext4\tdefaults,noatime 0 2\n\
                     \t /dev/nvme0n1p2  /  ext4  errors=remount-ro  0  1\n\
                     UUID=x /home ext4 defaults 0 2\n\
                     LABEL=swap none swap sw 0 0\n\
                     tmpfs /tmp tmpfs mode=1777 0 0\n\
                     proc /proc proc defaults 0 0\n\
                     /dev/sdc1 /srv xfs defaults 0 2\n\
                     /dev/mapper/vg-root /var ext4 defaults 0 2\n\
                     /dev/vdb /data ext4 defaults";
        let (text, changes) = rewrite_fstab(fstab, &known);
        let expected = fstab
            .replace("/dev/sda1\t/boot   ext4", "UUID=1111-AAAA\t/boot   ext4")
            .replace("\t /dev/nvme0n1p2  /", "\t UUID=2222-bbbb  /")
            .replace("/dev/vdb /data", "UUID=3333 /data");
        assert_eq!(text, expected);
        assert_eq!(
            changes,
            [
                "/etc/fstab: /dev/sda1 → UUID=1111-AAAA",
                "/etc/fstab: /dev/nvme0n1p2 → UUID=2222-bbbb",
                "/etc/fstab: /dev/vdb → UUID=3333",
            ]
        );
        let (same, none) = rewrite_fstab(fstab, &|_| None);
        assert_eq!(same, fstab);
        assert!(none.is_empty());
    }

    #[test]
    fn crypttab_device_is_the_second_field() {
        let crypttab = "# <target name> <source device> <key file> <options>\n\
                        cryptroot /dev/nvme0n1p2 none luks,discard\r\n\
                        cryptswap /dev/sda1 /dev/urandom swap\n";
        let (text, changes) = rewrite_crypttab(crypttab, &known);
        assert_eq!(
            text,
            "# <target name> <source device> <key file> <options>\n\
             cryptroot UUID=2222-bbbb none luks,discard\r\n\
             cryptswap UUID=1111-AAAA /dev/urandom swap\n"
        );
        assert_eq!(changes.len(), 2);
    }

    #[test]
    fn kernel_names() {
        for yes in [
            "/dev/sda",
            "/dev/sda1",
            "/dev/sdab12",
            "/dev/vda2",
            "/dev/hdb",
            "/dev/xvda1",
            "/dev/nvme0n1",
            "/dev/nvme10n2p15",
            "/dev/mmcblk0",
            "/dev/mmcblk1p2",
        ] {
            assert!(is_kernel_name(yes), "{yes}");
        }
        for no in [
            "/dev/sd",
            "/dev/sd1",
            "/dev/sr0",
            "/dev/md0",
            "/dev/dm-0",
            "/dev/nvme0",
            "/dev/nvme0n1p",
            "/dev/nvmen1",
            "/dev/mmcblk0p",
            "/dev/mmcblk0boot0",
            "/dev/mapper/root",
            "sda1",
            "UUID=abc",
            "/dev/disk/by-uuid/x",
        ] {
            assert!(!is_kernel_name(no), "{no}");
        }
    }

    #[test]
    fn interfaces_swap_at_once_and_only_as_whole_words() {
        let text = "auto lo eth0 eth1\n\
                    allow-hotplug eth10\n\
                    iface eth0 inet dhcp\n\
                    iface eth0:1 inet static\n\
                    iface eth1.10 inet manual\n\
                    \tvlan-raw-device eth1\n\
                    iface veth-eth0 inet manual\n";
        let (out, changes) =
            rename_interfaces(text, &renames(&[("eth0", "eth1"), ("eth1", "eth0")]));
        assert_eq!(
            out,
            "auto lo eth1 eth0\n\
             allow-hotplug eth10\n\
             iface eth1 inet dhcp\n\
             iface eth1:1 inet static\n\
             iface eth0.10 inet manual\n\
             \tvlan-raw-device eth0\n\
             iface veth-eth0 inet manual\n"
        );
        assert_eq!(changes.len(), 5);
        assert_eq!(changes[0], "line 1: auto lo eth0 eth1 → auto lo eth1 eth0");

        let networkd = "[Match]\nName=eth1\n\n[Network]\nDHCP=yes\n";
        let (out, _) = rename_interfaces(networkd, &renames(&[("eth1", "ens4")]));
        assert_eq!(out, "[Match]\nName=ens4\n\n[Network]\nDHCP=yes\n");
        let (same, none) = rename_interfaces(networkd, &renames(&[("eth1", "eth1")]));
        assert_eq!(same, networkd);
        assert!(none.is_empty());
    }

    fn write(root: &Path, rel: &str, text: &str, mode: u32) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn adapt_network_rewrites_only_files_that_name_the_interfaces() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        write(
            r,
            "etc/network/interfaces",
            "source /etc/network/interfaces.d/*\nauto lo\niface lo inet loopback\n",
            0o644,
        );
        write(
            r,
            "etc/network/interfaces.d/eth0",
            "auto eth0\niface eth0 inet dhcp\n",
            0o600,
        );
        write(
            r,
            "etc/systemd/network/10-wired.network",
            "[Match]\nName=eth0\n",
            0o644,
        );
        write(r, "etc/systemd/network/README", "eth0\n", 0o644);
        write(
            r,
            "etc/systemd/network/20-other.network",
            "[Match]\nName=wlan0\n",
            0o644,
        );
        std::os::unix::fs::symlink("/dev/null", r.join("etc/systemd/network/99-masked.network"))
            .unwrap();
        let before = fs::metadata(r.join("etc/network/interfaces"))
            .unwrap()
            .modified()
            .unwrap();

        let changes = adapt_network(r, &renames(&[("eth0", "ens3")])).unwrap();
        assert_eq!(
            changes,
            [
                "/etc/network/interfaces.d/eth0, line 1: auto eth0 → auto ens3",
                "/etc/network/interfaces.d/eth0, line 2: iface eth0 inet dhcp → iface ens3 inet dhcp",
                "/etc/systemd/network/10-wired.network, line 2: Name=eth0 → Name=ens3",
            ]
        );
        let read = |rel: &str| fs::read_to_string(r.join(rel)).unwrap();
        assert_eq!(
            read("etc/network/interfaces.d/eth0"),
            "auto ens3\niface ens3 inet dhcp\n"
        );
        assert_eq!(
            read("etc/systemd/network/10-wired.network"),
            "[Match]\nName=ens3\n"
        );
        assert_eq!(read("etc/systemd/network/README"), "eth0\n");
        let mode = fs::metadata(r.join("etc/network/interfaces.d/eth0"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let after = fs::metadata(r.join("etc/network/interfaces"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after);
        assert!(
            fs::symlink_metadata(r.join("etc/systemd/network/99-masked.network"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let leftovers: Vec<_> = fs::read_dir(r.join("etc/network/interfaces.d"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, ["eth0"]);

        assert!(adapt_network(r, &renames(&[("eth0", "ens3")]))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn initramfs_tool_of_each_family() {
        let cases = [
            (
                "usr/sbin/update-initramfs",
                "update-initramfs",
                vec!["/usr/sbin/update-initramfs", "-u", "-k", "all"],
            ),
            (
                "sbin/update-initramfs",
                "update-initramfs",
                vec!["/sbin/update-initramfs", "-u", "-k", "all"],
            ),
            (
                "usr/bin/dracut",
                "dracut",
                vec!["/usr/bin/dracut", "--force", "--regenerate-all"],
            ),
            (
                "usr/bin/mkinitcpio",
                "mkinitcpio",
                vec!["/usr/bin/mkinitcpio", "-P"],
            ),
        ];
        for (file, tool, argv) in cases {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), file, "#!/bin/sh\n", 0o755);
            let argv: Vec<String> = argv.into_iter().map(String::from).collect();
            assert_eq!(initramfs_tool(dir.path()), Some((tool, argv)), "{file}");
        }

        // Merged /usr: /sbin is a link to usr/sbin inside the restored system.
        let merged = tempfile::tempdir().unwrap();
        write(merged.path(), "usr/sbin/dracut", "", 0o755);
        std::os::unix::fs::symlink("usr/sbin", merged.path().join("sbin")).unwrap();
        let (tool, argv) = initramfs_tool(merged.path()).unwrap();
        assert_eq!((tool, argv[0].as_str()), ("dracut", "/usr/sbin/dracut"));

        let none = tempfile::tempdir().unwrap();
        fs::create_dir_all(none.path().join("usr/bin/dracut")).unwrap();
        assert_eq!(initramfs_tool(none.path()), None);
    }

    fn is_root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        eprintln!("SKIPPED: chroot_run tests need root (bind mounts and chroot)");
        false
    }

    /// A root with nothing but a static busybox in it.
    fn busybox_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("bin")).unwrap();
        fs::copy("/bin/busybox", dir.path().join("bin/busybox")).unwrap();
        fs::set_permissions(
            dir.path().join("bin/busybox"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        dir
    }

    fn mounts_under(dir: &Path) -> Vec<String> {
        let prefix = dir.to_string_lossy().into_owned();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    }

    fn argv(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn chroot_run_sees_proc_and_leaves_nothing_mounted() {
        if !is_root() {
            return;
        }
        let root = busybox_root();
        let out = chroot_run(
            root.path(),
            &argv(&[
                "/bin/busybox",
                "sh",
                "-c",
                "test -r /proc/self/status && test -e /dev/null && echo inside",
            ]),
        )
        .unwrap();
        assert_eq!(out.trim(), "inside");
        assert_eq!(mounts_under(root.path()), Vec::<String>::new());
        for d in ["proc", "sys", "dev", "run"] {
            assert!(root.path().join(d).is_dir(), "{d}");
        }
    }

    #[test]
    fn chroot_run_failure_names_the_command_and_still_unmounts() {
        if !is_root() {
            return;
        }
        let root = busybox_root();
        let e = chroot_run(
            root.path(),
            &argv(&[
                "/bin/busybox",
                "sh",
                "-c",
                "echo out; echo 'no initramfs for you' >&2; exit 3",
            ]),
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("/bin/busybox sh -c"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("no initramfs for you"), "{msg}");
        assert_eq!(mounts_under(root.path()), Vec::<String>::new());

        let missing = chroot_run(root.path(), &argv(&["/usr/sbin/update-initramfs"])).unwrap_err();
        assert!(
            format!("{missing:#}").contains("update-initramfs"),
            "{missing:#}"
        );
        assert_eq!(mounts_under(root.path()), Vec::<String>::new());
    }

    #[test]
    fn chroot_run_refuses_a_symlinked_mount_point() {
        if !is_root() {
            return;
        }
        let root = busybox_root();
        std::os::unix::fs::symlink("/run", root.path().join("run")).unwrap();
        let e = chroot_run(root.path(), &argv(&["/bin/busybox", "true"])).unwrap_err();
        assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
        assert_eq!(mounts_under(root.path()), Vec::<String>::new());
    }
}
