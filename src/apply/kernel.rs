//! Making the kernel see exactly the planned partitions: BLKRRPART where the
//! kernel parses tables itself, then BLKPG to add or remove what differs (as
//! `partx` does; needed where the kernel has no table parsers), then waiting
//! for the exact device nodes.

use std::fs::{self, File};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::manifest::MbrKind;
use crate::plan::TargetPlan;
use crate::probe::disks::partition_name;

/// `(number, start, size)` of the partitions the kernel knows on a disk, in bytes.
fn kernel_partitions(disk: &str) -> Vec<(u32, u64, u64)> {
    let Ok(entries) = fs::read_dir(format!("/sys/class/block/{disk}")) else {
        return Vec::new();
    };
    let read = |p: &Path, f: &str| {
        fs::read_to_string(p.join(f))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    entries
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            let n = read(&p, "partition")? as u32;
            Some((n, read(&p, "start")? * 512, read(&p, "size")? * 512))
        })
        .collect()
}

pub fn sync(t: &TargetPlan) -> Result<()> {
    let f = File::open(&t.device).with_context(|| format!("opening {}", t.device))?;
    // Not fatal: kernels without parsers, or loop devices without partscan, refuse or ignore it.
    let _ = crate::sys::reread_partitions(f.as_fd());
    let wanted: Vec<_> = t
        .partitions
        .iter()
        .filter(|p| p.mbr_kind != Some(MbrKind::Extended))
        .collect();
    let extended = t
        .partitions
        .iter()
        .find(|p| p.mbr_kind == Some(MbrKind::Extended))
        .map(|p| p.number);
    for (n, start, size) in kernel_partitions(&t.name) {
        if Some(n) == extended {
            continue;
        }
        let keep = wanted
            .iter()
            .any(|p| p.number == n && p.start_bytes == start && p.size_bytes == size);
        if !keep {
            crate::sys::delete_partition(f.as_fd(), n).with_context(|| {
                format!(
                    "removing stale partition {n} of {} from the kernel's view (is it in use?)",
                    t.device
                )
            })?;
        }
    }
    let known = kernel_partitions(&t.name);
    for p in &wanted {
        if !known.iter().any(|&(n, _, _)| n == p.number) {
            if let Err(e) =
                crate::sys::add_partition(f.as_fd(), p.number, p.start_bytes, p.size_bytes)
            {
                // udev re-reads a disk's table when a writer closes it, so
                // the kernel may have added this very partition meanwhile.
                if !appears(&t.name, p.number, p.start_bytes, p.size_bytes) {
                    return Err(e)
                        .with_context(|| format!("telling the kernel about {}", p.device));
                }
            }
        }
    }
    for p in &wanted {
        wait_for_node(&t.name, p.number, &p.device)?;
    }
    Ok(())
}

/// Whether the kernel shows partition `number` with this geometry within a
/// second.
fn appears(disk: &str, number: u32, start: u64, size: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if kernel_partitions(disk).contains(&(number, start, size)) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `/dev/<part>` to be the block device sysfs says it is.
fn wait_for_node(disk: &str, number: u32, device: &str) -> Result<()> {
    let part = partition_name(disk, number);
    let sys = format!("/sys/class/block/{part}/dev");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let want = fs::read_to_string(&sys).ok().map(|s| s.trim().to_string());
        let have = crate::probe::mounts::devnum(Path::new(device))
            .ok()
            .map(|(a, b)| format!("{a}:{b}"));
        if want.is_some() && want == have {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{device} did not appear within 10 s (kernel says {want:?}, /dev has {have:?}); is udev or devtmpfs running?");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
