//! LVM snapshots, for a consistent image of a mounted volume that keeps
//! being written: the snapshot is taken with the real tool (`lvcreate -s`,
//! which suspends the origin and so flushes its filesystem's journal first),
//! the image is read from the snapshot, and the snapshot is removed
//! (`lvremove`) when the guard drops, on an error or a panic too.
//!
//! Only LVM logical volumes are snapshotted. A btrfs snapshot is a
//! subvolume, not a block device an image can be read from; a device-mapper
//! snapshot of a plain partition would not see the writes that go to the
//! partition itself. Those volumes are frozen instead (see backup.rs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::report::size;
use crate::tool;

const MIB: u64 = 1 << 20;
/// The copy-on-write space asked for when the volume group has room: a fifth
/// of the origin, at least this much.
const WANT_MIN: u64 = 64 * MIB;
/// Less room than this for the blocks written meanwhile is not worth trying:
/// a busy volume would overflow it at once.
const NEED_MIN: u64 = 8 * MIB;
/// What an LVM LV's device-mapper UUID starts with (in sysfs dm/uuid).
const LVM_UUID: &str = "LVM-";

/// One logical volume, as `lvs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lv {
    pub vg: String,
    pub lv: String,
    pub size: u64,
    pub vg_free: u64,
    pub extent: u64,
    /// `lv_attr`, e.g. `-wi-ao----`: the first letter is the volume type.
    pub attr: String,
}

impl Lv {
    pub fn label(&self) -> String {
        format!("{}/{}", self.vg, self.lv)
    }
}

/// The fields `lvs` is asked for, in the order [`parse_lvs`] reads them.
const FIELDS: &str = "vg_name,lv_name,lv_size,vg_free,vg_extent_size,lv_attr";

/// Reads one line of `lvs --noheadings --separator '|' --units b --nosuffix -o FIELDS`.
pub fn parse_lvs(text: &str) -> Result<Lv> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or_else(|| anyhow!("lvs printed nothing"))?;
    let f: Vec<&str> = line.split('|').map(str::trim).collect();
    let [vg, lv, lv_size, vg_free, extent, attr] = f.as_slice() else {
        bail!("lvs printed {line:?}, not the {FIELDS} asked for");
    };
    let num = |name: &str, s: &str| -> Result<u64> {
        s.parse::<u64>()
            .with_context(|| format!("lvs printed {name} {s:?}, not a number of bytes"))
    };
    Ok(Lv {
        vg: vg.to_string(),
        lv: lv.to_string(),
        size: num("lv_size", lv_size)?,
        vg_free: num("vg_free", vg_free)?,
        extent: num("vg_extent_size", extent)?.max(1),
        attr: attr.to_string(),
    })
}

/// Copy-on-write space for a snapshot of `lv`: a fifth of the volume (at
/// least 64 MiB, at most the volume itself), as much of it as the volume
/// group has free, in whole extents. An error says how much is free.
pub fn snapshot_size(lv: &Lv) -> Result<u64> {
    let round_up = |n: u64| n.div_ceil(lv.extent) * lv.extent;
    let want = round_up((lv.size / 5).max(WANT_MIN).min(lv.size.max(lv.extent)));
    let need = round_up(NEED_MIN.min(want));
    let free = lv.vg_free / lv.extent * lv.extent;
    if free < need {
        bail!(
            "volume group {} has {} free; a snapshot of {} needs room for the blocks written while it is read \
             (bmr asks for {}, at least {}): add a disk to the group (vgextend) or shrink another volume, or use --consistency freeze",
            lv.vg,
            size(lv.vg_free),
            lv.label(),
            size(want),
            size(need)
        );
    }
    Ok(want.min(free))
}

/// The snapshot's name: bmr's, the origin's and this process's, so that a
/// stale one (bmr killed with SIGKILL) says where it came from. LVM names
/// are at most 127 characters.
pub fn snapshot_name(lv: &str, pid: u32) -> String {
    let tail = format!("-{pid}");
    let mut name = format!("bmr-snap-{lv}");
    name.truncate(127 - tail.len());
    name + &tail
}

/// The device-mapper UUID of a block device, from sysfs; None when it is
/// not a device-mapper device.
fn dm_uuid(sys: &Path, devnum: (u32, u32)) -> Option<String> {
    let path = sys.join(format!("dev/block/{}:{}/dm/uuid", devnum.0, devnum.1));
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether a device-mapper UUID is that of an ordinary LVM logical volume
/// (LVM's hidden parts of a snapshot carry a suffix such as `-cow`).
fn is_lv_uuid(uuid: &str) -> bool {
    uuid.strip_prefix(LVM_UUID)
        .is_some_and(|rest| !rest.is_empty() && !rest.contains('-'))
}

/// The logical volume `dev` is, or None when it is not one (found in
/// sysfs, without running any tool).
pub fn lv_of(dev: &Path) -> Result<Option<Lv>> {
    let num = crate::probe::mounts::devnum(dev)?;
    match dm_uuid(Path::new("/sys"), num) {
        Some(u) if is_lv_uuid(&u) => {}
        _ => return Ok(None),
    }
    if !tool::exists("lvs") || !tool::exists("lvcreate") {
        bail!(
            "{} is an LVM logical volume, but the LVM tools (lvs, lvcreate) are not installed: install lvm2",
            dev.display()
        );
    }
    let text = tool::run(
        Command::new("lvs")
            .args([
                "--noheadings",
                "--separator",
                "|",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                FIELDS,
            ])
            .arg(dev),
    )?;
    parse_lvs(&text)
        .with_context(|| format!("reading what lvs says about {}", dev.display()))
        .map(Some)
}

/// `lvs` on one volume (VG/LV), the fields asked for separated by `|`.
fn lvs(fields: &str, lv: &str) -> Result<String> {
    tool::run(Command::new("lvs").args(["--noheadings", "--separator", "|", "-o", fields, lv]))
}

/// A snapshot bmr made; removed when dropped.
pub struct Snapshot {
    pub vg: String,
    pub name: String,
    pub origin: String,
    /// Its block device (`/dev/dm-N`).
    pub device: PathBuf,
    /// Copy-on-write space.
    pub size: u64,
    removed: bool,
}

impl Snapshot {
    /// Takes a snapshot of `lv`. Signals that would end bmr should be held
    /// by the caller while the snapshot exists, so that it is removed.
    pub fn create(lv: &Lv) -> Result<Snapshot> {
        match lv.attr.chars().next() {
            Some('s' | 'S') => bail!(
                "{} is itself a snapshot; LVM cannot snapshot it again",
                lv.label()
            ),
            Some('V') => bail!(
                "{} is a thin volume; bmr takes only classic (copy-on-write) LVM snapshots so far",
                lv.label()
            ),
            _ => {}
        }
        let size = snapshot_size(lv)?;
        let name = snapshot_name(&lv.lv, std::process::id());
        tool::run(
            Command::new("lvcreate")
                .args(["--snapshot", "--yes", "--name", &name, "--size"])
                .arg(format!("{size}b"))
                .arg(lv.label()),
        )
        .with_context(|| format!("taking an LVM snapshot of {}", lv.label()))?;
        let mut snap = Snapshot {
            vg: lv.vg.clone(),
            name,
            origin: lv.label(),
            device: PathBuf::new(),
            size,
            removed: false,
        };
        // From here on the guard removes it, should finding its device fail.
        snap.device = snap.find_device()?;
        Ok(snap)
    }

    pub fn label(&self) -> String {
        format!("{}/{}", self.vg, self.name)
    }

    /// `/dev/dm-N` from the kernel's numbers for the snapshot (devtmpfs
    /// makes that node itself; the /dev/VG/LV links need udev).
    fn find_device(&self) -> Result<PathBuf> {
        let out = lvs("lv_kernel_major,lv_kernel_minor", &self.label())?;
        let nums: Vec<&str> = out.split('|').map(str::trim).collect();
        if let [major, minor] = nums.as_slice() {
            let uevent = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))
                .unwrap_or_default();
            if let Some(name) = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")) {
                let dev = Path::new("/dev").join(name);
                if dev.exists() {
                    return Ok(dev);
                }
            }
        }
        let link = Path::new("/dev").join(&self.vg).join(&self.name);
        if link.exists() {
            return Ok(link);
        }
        bail!(
            "the snapshot {} was made but its device is not to be found (lvs says {out:?})",
            self.label()
        )
    }

    /// How full the copy-on-write space is (percent), or an error when it
    /// overflowed: then the snapshot is invalid and so is what was read from it.
    pub fn check(&self) -> Result<f64> {
        let out = lvs("lv_attr,snap_percent", &self.label())?;
        let (attr, percent) = out.split_once('|').unwrap_or((out.as_str(), ""));
        let percent: f64 = percent.trim().parse().unwrap_or(0.0);
        // lv_attr's fifth letter: I for an invalid (overflowed) snapshot.
        if attr.trim().chars().nth(4) == Some('I') || percent >= 100.0 {
            bail!(
                "the LVM snapshot {} overflowed: more than its {} was written to {} while it was read, so the image is not usable; \
                 free space in volume group {} for a bigger snapshot, back up when the volume is quieter, or use --consistency freeze",
                self.label(),
                size(self.size),
                self.origin,
                self.vg
            );
        }
        Ok(percent)
    }

    /// Removes the snapshot, trying a few times: udev may still hold it
    /// open for a moment after bmr closed it.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        self.lvremove()
    }

    fn lvremove(&self) -> Result<()> {
        let mut last = None;
        for attempt in 0..5 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
            match tool::run(
                Command::new("lvremove")
                    .args(["--force", "--yes"])
                    .arg(self.label()),
            ) {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("lvremove did not run"))).with_context(|| {
            format!(
                "removing the LVM snapshot {}: remove it with lvremove {} (it slows writes to {} and fills up)",
                self.label(),
                self.label(),
                self.origin
            )
        })
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = self.lvremove() {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXT: u64 = 4 * MIB;

    fn lv(size: u64, free: u64) -> Lv {
        Lv {
            vg: "vg0".into(),
            lv: "data".into(),
            size,
            vg_free: free,
            extent: EXT,
            attr: "-wi-ao----".into(),
        }
    }

    #[test]
    fn parses_lvs_line() {
        let text = "  vg0|data|209715200|104857600|4194304|-wi-ao----  \n";
        assert_eq!(parse_lvs(text).unwrap(), lv(200 * MIB, 100 * MIB));
    }

    #[test]
    fn lvs_line_with_missing_fields_is_refused() {
        let e = parse_lvs("  vg0|data|209715200\n").unwrap_err().to_string();
        assert!(e.contains("not the vg_name"), "{e}");
        let e = parse_lvs("vg0|data|200M|0|4194304|-wi-a-----")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lv_size \"200M\""), "{e}");
        assert!(parse_lvs("\n").is_err());
    }

    #[test]
    fn size_is_a_fifth_of_the_volume_when_there_is_room() {
        assert_eq!(snapshot_size(&lv(10 << 30, 20 << 30)).unwrap(), 2048 * MIB);
        // Rounded up to whole extents.
        assert_eq!(snapshot_size(&lv(1001 * MIB, 20 << 30)).unwrap() % EXT, 0);
    }

    #[test]
    fn small_volumes_get_at_least_64_mib_but_not_more_than_themselves() {
        assert_eq!(snapshot_size(&lv(200 * MIB, 1 << 30)).unwrap(), 64 * MIB);
        assert_eq!(snapshot_size(&lv(20 * MIB, 1 << 30)).unwrap(), 20 * MIB);
    }

    #[test]
    fn size_is_what_the_group_has_free_when_that_is_less() {
        // 50 MiB free of 4 MiB extents: 48 MiB usable.
        assert_eq!(snapshot_size(&lv(10 << 30, 50 * MIB)).unwrap(), 48 * MIB);
    }

    #[test]
    fn full_group_is_an_error_naming_it_and_its_free_space() {
        let e = snapshot_size(&lv(10 << 30, 4 * MIB))
            .unwrap_err()
            .to_string();
        assert!(e.contains("volume group vg0 has 4 MiB free"), "{e}");
        assert!(e.contains("vg0/data"), "{e}");
        assert!(e.contains("--consistency freeze"), "{e}");
        assert!(snapshot_size(&lv(10 << 30, 0)).is_err());
    }

    #[test]
    fn names_say_bmr_the_origin_and_the_process() {
        assert_eq!(snapshot_name("root", 4242), "bmr-snap-root-4242");
        let long = snapshot_name(&"x".repeat(200), 7);
        assert_eq!(long.len(), 127);
        assert!(long.ends_with("x-7"));
    }

    #[test]
    fn only_plain_lvm_uuids_are_logical_volumes() {
        assert!(is_lv_uuid(
            "LVM-abcdefABCDEF0123456789abcdefABCDEF0123456789abcdefABCDEF0123"
        ));
        assert!(!is_lv_uuid("LVM-abcdef-cow"));
        assert!(!is_lv_uuid("LVM-"));
        assert!(!is_lv_uuid("CRYPT-LUKS2-abc"));
        assert!(!is_lv_uuid("mpath-3600"));
    }

    #[test]
    fn dm_uuid_is_read_from_sysfs() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("dev/block/254:1/dm")).unwrap();
        std::fs::write(d.path().join("dev/block/254:1/dm/uuid"), "LVM-abc\n").unwrap();
        assert_eq!(dm_uuid(d.path(), (254, 1)).as_deref(), Some("LVM-abc"));
        assert_eq!(dm_uuid(d.path(), (8, 1)), None);
    }
}
