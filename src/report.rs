//! Human-readable text for probe results and manifests. JSON output is the
//! serde form of the same structs; this is only for people.

use std::fmt::Write;

use crate::manifest::Manifest;
use crate::probe::{FsInfo, Report};

/// 1.5 GiB, 512 MiB, 4.0 KiB: binary units, one decimal above KiB.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn fs_text(f: &FsInfo) -> String {
    let mut s = f.filesystem.clone();
    if !f.label.is_empty() {
        let _ = write!(s, " \"{}\"", f.label);
    }
    if !f.uuid.is_empty() {
        let _ = write!(s, " {}", f.uuid);
    }
    if let Some(u) = f.used_bytes {
        let _ = write!(s, ", {} used", size(u));
    }
    if !f.mountpoint.is_empty() {
        let _ = write!(s, ", mounted at {}", f.mountpoint);
    }
    s
}

pub fn probe_text(r: &Report) -> String {
    let mut out = String::new();
    for d in &r.disks {
        let i = &d.info;
        let _ = writeln!(
            out,
            "{}  {}  {}/{} B sectors  {}  {} {}{}",
            i.device,
            size(i.size_bytes),
            i.logical_sector_size,
            i.physical_sector_size,
            d.table.kind,
            i.transport,
            i.model,
            if i.serial.is_empty() {
                String::new()
            } else {
                format!(" serial {}", i.serial)
            }
        );
        for p in &d.partitions {
            let e = &p.entry;
            let ty = e
                .type_guid
                .map(|g| g.to_string())
                .or(e.mbr_type.map(|t| format!("0x{t:02x}")))
                .unwrap_or_default();
            let fs = p
                .filesystem
                .as_ref()
                .map(fs_text)
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "  {:>3}  start {:>10}  size {:>10}  {ty}  {fs}",
                e.number,
                size(e.start_bytes),
                size(e.size_bytes)
            );
        }
        if let Some(f) = &d.filesystem {
            let _ = writeln!(out, "  whole disk: {}", fs_text(f));
        }
    }
    let h = &r.hardware;
    let _ = writeln!(
        out,
        "cpu: {} x {}, memory {}",
        h.cpus,
        h.cpu,
        size(h.memory_bytes)
    );
    for c in &h.storage {
        let _ = writeln!(
            out,
            "storage controller {} [{}] driver {}",
            c.address,
            c.pci_id,
            if c.driver.is_empty() {
                "none"
            } else {
                &c.driver
            }
        );
    }
    for n in &h.nics {
        let _ = writeln!(
            out,
            "nic {} {} driver {}",
            n.name,
            n.mac,
            if n.driver.is_empty() {
                "none"
            } else {
                &n.driver
            }
        );
    }
    for w in &r.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

pub fn manifest_text(m: &Manifest) -> String {
    let mut out = String::new();
    let s = &m.system;
    let _ = writeln!(
        out,
        "system: {} ({}), kernel {}, {} firmware, bootloader {}",
        s.hostname, s.os, s.kernel, s.firmware, s.bootloader
    );
    let _ = writeln!(out, "saved: {} by {}", m.manifest.created, m.manifest.tool);
    for d in &m.disks {
        let ident = [d.wwn.as_str(), d.serial.as_str(), d.model.as_str()]
            .into_iter()
            .find(|x| !x.is_empty())
            .unwrap_or("");
        let _ = writeln!(
            out,
            "{}: {} {} {}, {}/{} B sectors {ident}",
            d.id,
            d.device,
            size(d.size_bytes),
            d.table,
            d.logical_sector_size,
            d.physical_sector_size
        );
        for p in m.partitions.iter().filter(|p| p.disk == d.id) {
            let ty = p
                .type_guid
                .map(|g| g.to_string())
                .or(p.mbr_type.clone())
                .unwrap_or_default();
            let vol = p.volume.as_ref().and_then(|v| m.volume(v));
            let what = vol
                .map(|v| {
                    let used = v
                        .used_bytes
                        .map(|u| format!(", {} used, min {}", size(u), size(v.min_size_bytes)))
                        .unwrap_or_default();
                    format!(
                        "{} [{}] {}{} {}{used}",
                        v.id,
                        v.role,
                        v.filesystem,
                        if v.mountpoint.is_empty() {
                            String::new()
                        } else {
                            format!(" at {}", v.mountpoint)
                        },
                        v.uuid
                    )
                })
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "  {:>3}  start {:>10}  size {:>10}  {ty}  {what}",
                p.number,
                size(p.start_bytes),
                size(p.size_bytes)
            );
        }
    }
    for d in &m.drivers {
        let _ = writeln!(
            out,
            "driver {} ({}) {} [{}]",
            d.module, d.kernel, d.file, d.purpose
        );
    }
    for c in &m.commands {
        let _ = writeln!(
            out,
            "command phase {} #{}: {} {} (timeout {}s, on error {:?}{})",
            c.phase,
            c.sequence,
            c.program,
            c.args.join(" "),
            c.timeout_secs,
            c.on_error,
            if c.critical { ", critical" } else { "" }
        );
    }
    if let Some(c) = &m.catalog {
        let _ = writeln!(
            out,
            "catalog: {} files ({:?}) in {}",
            c.entries, c.mode, c.file
        );
    }
    out
}

/// The saved layout and the target layout side by side, then the plan per
/// volume: what `bmr plan` prints and `bmr apply` shows before writing.
pub fn plan_text(
    m: &Manifest,
    targets: &[crate::plan::TargetDisk],
    plan: &crate::plan::Plan,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "saved system {} ({}), {}",
        m.system.hostname, m.manifest.created, m.system.os
    );
    for d in &plan.disks {
        let saved = m.disk(&d.saved);
        let target = targets.iter().find(|t| t.device == d.target);
        let _ = writeln!(
            out,
            "{} ({}, {}) -> {} ({}): {}",
            d.saved,
            saved.map_or(String::new(), |s| size(s.size_bytes)),
            saved.map_or(String::new(), |s| s.table.to_string()),
            d.target,
            target.map_or(String::new(), |t| size(t.size_bytes)),
            d.reason
        );
    }
    for t in &plan.targets {
        let _ = writeln!(
            out,
            "\n{} {} {}, {}/{} B sectors: {}",
            t.device,
            size(t.size_bytes),
            t.table,
            t.logical_sector_size,
            t.physical_sector_size,
            t.reason
        );
        let _ = writeln!(
            out,
            "  {:<26}    {:<12} {:>10} {:>10}  volume",
            "saved partition", "new", "start", "size"
        );
        for p in &t.partitions {
            let saved = p
                .from
                .as_deref()
                .and_then(|f| f.split_once(':'))
                .and_then(|(disk, n)| {
                    m.partitions
                        .iter()
                        .find(|q| q.disk == disk && q.number.to_string() == n)
                })
                .map(|q| {
                    format!(
                        "{}:{} {} +{}",
                        q.disk,
                        q.number,
                        size(q.start_bytes),
                        size(q.size_bytes)
                    )
                })
                .unwrap_or_else(|| "(new)".into());
            let _ = writeln!(
                out,
                "  {saved:<26} -> {:<12} {:>10} {:>10}  {}",
                p.device,
                size(p.start_bytes),
                size(p.size_bytes),
                p.volume.as_deref().unwrap_or("-")
            );
        }
    }
    let _ = writeln!(
        out,
        "\n  {:<12} {:<7} {:<14} {:<12} {:>10} {:>10} {:>10}  reason",
        "volume", "role", "action", "target", "size", "saved", "min"
    );
    for v in &plan.volumes {
        let _ = writeln!(
            out,
            "  {:<12} {:<7} {:<14} {:<12} {:>10} {:>10} {:>10}  {}",
            v.id,
            v.role,
            v.action,
            if v.target_device.is_empty() {
                "-"
            } else {
                &v.target_device
            },
            if v.size_bytes == 0 {
                "-".to_string()
            } else {
                size(v.size_bytes)
            },
            size(v.saved_size_bytes),
            size(v.min_size_bytes),
            v.reason
        );
    }
    for d in &plan.dropped {
        let _ = writeln!(
            out,
            "dropped: {} ({}, needs {}): {}",
            d.id,
            d.role,
            size(d.needed_bytes),
            d.reason
        );
    }
    for t in targets.iter().filter(|t| t.protected.is_some()) {
        let _ = writeln!(
            out,
            "protected: {} ({})",
            t.device,
            t.protected.as_deref().unwrap_or("")
        );
    }
    for w in &plan.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::size;

    #[test]
    fn sizes() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1 << 20), "1 MiB");
        assert_eq!(size(1536 << 20), "1.5 GiB");
    }
}
