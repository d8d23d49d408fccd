//! Consistency checks on a parsed manifest. Every problem is reported with the
//! field it is in, all at once, so a hand-edited manifest is fixed in one pass.

use std::collections::{HashMap, HashSet};

use super::{Manifest, MbrKind, Role, TableType, FORMAT_VERSION};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ValidationError {
    /// Where, as a TOML path: `partitions[2].volume`.
    pub field: String,
    pub problem: String,
}

struct Report(Vec<ValidationError>);

impl Report {
    fn add(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(ValidationError {
            field: field.into(),
            problem: problem.into(),
        });
    }
}

fn is_hex(s: &str, digits: usize) -> bool {
    s.strip_prefix("0x")
        .is_some_and(|h| h.len() == digits && h.chars().all(|c| c.is_ascii_hexdigit()))
}

pub fn validate(m: &Manifest) -> Vec<ValidationError> {
    let mut r = Report(Vec::new());
    header(m, &mut r);
    disks(m, &mut r);
    partitions(m, &mut r);
    volumes(m, &mut r);
    commands(m, &mut r);
    drivers(m, &mut r);
    r.0
}

fn header(m: &Manifest, r: &mut Report) {
    if m.manifest.version == 0 || m.manifest.version > FORMAT_VERSION {
        r.add(
            "manifest.version",
            format!(
                "{} is not a version this bmr knows (1..={FORMAT_VERSION})",
                m.manifest.version
            ),
        );
    }
    if m.system.hostname.is_empty() {
        r.add("system.hostname", "is empty");
    }
}

fn disks(m: &Manifest, r: &mut Report) {
    let mut seen = HashSet::new();
    for (i, d) in m.disks.iter().enumerate() {
        let f = |name: &str| format!("disks[{i}].{name}");
        if d.id.is_empty() {
            r.add(f("id"), "is empty");
        } else if !seen.insert(d.id.as_str()) {
            r.add(f("id"), format!("\"{}\" is used by another disk too", d.id));
        }
        for (name, size) in [
            ("logical_sector_size", d.logical_sector_size),
            ("physical_sector_size", d.physical_sector_size),
        ] {
            if !(512..=65536).contains(&size) || !size.is_power_of_two() {
                r.add(
                    f(name),
                    format!("{size} is not a sector size (a power of two from 512 to 65536)"),
                );
            }
        }
        if d.physical_sector_size < d.logical_sector_size {
            r.add(
                f("physical_sector_size"),
                format!(
                    "{} is smaller than logical_sector_size {}",
                    d.physical_sector_size, d.logical_sector_size
                ),
            );
        }
        if d.size_bytes == 0 {
            r.add(f("size_bytes"), "is 0");
        }
        match d.table {
            TableType::Gpt if d.guid.is_none() => {
                r.add(f("guid"), "a GPT disk needs its disk GUID")
            }
            TableType::Mbr => match &d.signature {
                None => r.add(f("signature"), "an MBR disk needs its disk signature"),
                Some(s) if !is_hex(s, 8) => r.add(
                    f("signature"),
                    format!("\"{s}\" is not 0x and 8 hex digits"),
                ),
                _ => {}
            },
            _ => {}
        }
    }
}

fn partitions(m: &Manifest, r: &mut Report) {
    let mut numbers = HashSet::new();
    let mut holders: HashMap<&str, usize> = HashMap::new();
    for (i, p) in m.partitions.iter().enumerate() {
        let f = |name: &str| format!("partitions[{i}].{name}");
        let Some(disk) = m.disk(&p.disk) else {
            r.add(
                f("disk"),
                format!("\"{}\" names no disk in [[disks]]", p.disk),
            );
            continue;
        };
        if p.number == 0 {
            r.add(f("number"), "partition numbers start at 1");
        } else if !numbers.insert((p.disk.as_str(), p.number)) {
            r.add(
                f("number"),
                format!("{} is used twice on {}", p.number, p.disk),
            );
        }
        let sector = u64::from(disk.logical_sector_size.max(1));
        if p.size_bytes == 0 {
            r.add(f("size_bytes"), "is 0");
        }
        if p.start_bytes % sector != 0 {
            r.add(
                f("start_bytes"),
                format!(
                    "{} is not a multiple of the disk's {sector}-byte sectors",
                    p.start_bytes
                ),
            );
        }
        if p.size_bytes % sector != 0 {
            r.add(
                f("size_bytes"),
                format!(
                    "{} is not a multiple of the disk's {sector}-byte sectors",
                    p.size_bytes
                ),
            );
        }
        // GPT keeps its header and 16 KiB of entries at both ends of the disk.
        let entries = 16384u64.div_ceil(sector) * sector;
        let (first, last) = match disk.table {
            TableType::Gpt => (
                2 * sector + entries,
                disk.size_bytes.saturating_sub(sector + entries),
            ),
            _ => (sector, disk.size_bytes),
        };
        if p.start_bytes < first {
            r.add(
                f("start_bytes"),
                format!(
                    "{} lies inside the partition table area of {} (usable from byte {first})",
                    p.start_bytes, p.disk
                ),
            );
        } else if p.end_bytes() > last {
            r.add(
                f("size_bytes"),
                format!(
                    "the partition ends at byte {} but {} is usable only up to byte {last}",
                    p.end_bytes(),
                    p.disk
                ),
            );
        }
        match disk.table {
            TableType::Gpt => {
                if p.type_guid.is_none() {
                    r.add(f("type_guid"), "a GPT partition needs its type GUID");
                }
                if p.mbr_type.is_some() || p.mbr_kind.is_some() {
                    r.add(
                        f("mbr_type"),
                        format!("{} is a GPT disk; MBR fields do not apply", p.disk),
                    );
                }
                if let Some(a) = &p.attributes {
                    if !is_hex(a, 16) {
                        r.add(
                            f("attributes"),
                            format!("\"{a}\" is not 0x and 16 hex digits"),
                        );
                    }
                }
            }
            TableType::Mbr => {
                match &p.mbr_type {
                    None => r.add(f("mbr_type"), "an MBR partition needs its type"),
                    Some(t) if !is_hex(t, 2) => {
                        r.add(f("mbr_type"), format!("\"{t}\" is not 0x and 2 hex digits"))
                    }
                    _ => {}
                }
                let logical = p.mbr_kind == Some(MbrKind::Logical);
                if logical != (p.number > 4) {
                    r.add(f("number"), format!("{} is {}: MBR partitions 1-4 are primary or extended, 5 and up logical", p.number, if logical { "logical" } else { "not logical" }));
                }
                if logical
                    && !m
                        .partitions
                        .iter()
                        .any(|q| q.disk == p.disk && q.mbr_kind == Some(MbrKind::Extended))
                {
                    r.add(
                        f("mbr_kind"),
                        format!(
                            "logical partition {} but {} has no extended partition",
                            p.number, p.disk
                        ),
                    );
                }
                if p.start_bytes / sector > u64::from(u32::MAX)
                    || p.size_bytes / sector > u64::from(u32::MAX)
                {
                    r.add(f("size_bytes"), format!("an MBR entry holds at most 2^32 sectors for start and size ({} TiB at {sector}-byte sectors); this disk needs GPT", (u64::from(u32::MAX) * sector) >> 40));
                }
                if p.type_guid.is_some() || p.guid.is_some() {
                    r.add(
                        f("type_guid"),
                        format!("{} is an MBR disk; GPT fields do not apply", p.disk),
                    );
                }
            }
            TableType::None => r.add(f("disk"), format!("{} has no partition table", p.disk)),
        }
        if let Some(v) = &p.volume {
            if m.volume(v).is_none() {
                r.add(
                    f("volume"),
                    format!("\"{v}\" names no volume in [[volumes]]"),
                );
            } else if let Some(other) = holders.insert(v.as_str(), i) {
                r.add(
                    f("volume"),
                    format!("\"{v}\" is already held by partitions[{other}]"),
                );
            }
            if p.mbr_kind == Some(MbrKind::Extended) {
                r.add(
                    f("volume"),
                    "an extended partition holds logical partitions, not a volume",
                );
            }
        }
    }
    overlaps(m, r);
}

fn overlaps(m: &Manifest, r: &mut Report) {
    let parts = &m.partitions;
    for (i, a) in parts.iter().enumerate() {
        for (j, b) in parts.iter().enumerate().skip(i + 1) {
            if a.disk != b.disk {
                continue;
            }
            let kinds = (a.mbr_kind, b.mbr_kind);
            let container = match kinds {
                (Some(MbrKind::Extended), Some(MbrKind::Logical)) => Some((a, b)),
                (Some(MbrKind::Logical), Some(MbrKind::Extended)) => Some((b, a)),
                _ => None,
            };
            if let Some((ext, logical)) = container {
                if logical.start_bytes < ext.start_bytes || logical.end_bytes() > ext.end_bytes() {
                    let k = if std::ptr::eq(logical, a) { i } else { j };
                    r.add(
                        format!("partitions[{k}].start_bytes"),
                        format!(
                            "logical partition {} lies outside the extended partition",
                            logical.number
                        ),
                    );
                }
                continue;
            }
            if a.start_bytes < b.end_bytes() && b.start_bytes < a.end_bytes() {
                r.add(
                    format!("partitions[{j}].start_bytes"),
                    format!(
                        "partition {} on {} overlaps partition {} ({}..{} and {}..{})",
                        b.number,
                        b.disk,
                        a.number,
                        b.start_bytes,
                        b.end_bytes(),
                        a.start_bytes,
                        a.end_bytes()
                    ),
                );
            }
        }
    }
}

fn volumes(m: &Manifest, r: &mut Report) {
    let mut seen = HashSet::new();
    let mut systems = 0;
    for (i, v) in m.volumes.iter().enumerate() {
        let f = |name: &str| format!("volumes[{i}].{name}");
        if v.id.is_empty() {
            r.add(f("id"), "is empty");
        } else if !seen.insert(v.id.as_str()) {
            r.add(
                f("id"),
                format!("\"{}\" is used by another volume too", v.id),
            );
        }
        match v.role {
            Role::System => systems += 1,
            Role::Swap if v.filesystem != "swap" => r.add(
                f("filesystem"),
                format!(
                    "a swap volume has filesystem \"swap\", not \"{}\"",
                    v.filesystem
                ),
            ),
            _ => {}
        }
        if let Some(used) = v.used_bytes {
            if used > v.size_bytes {
                r.add(
                    f("used_bytes"),
                    format!("{used} is more than size_bytes {}", v.size_bytes),
                );
            }
            if v.min_size_bytes < used {
                r.add(
                    f("min_size_bytes"),
                    format!("{} is less than used_bytes {used}", v.min_size_bytes),
                );
            }
        }
        if v.min_size_bytes > v.size_bytes {
            r.add(
                f("min_size_bytes"),
                format!(
                    "{} is more than size_bytes {}",
                    v.min_size_bytes, v.size_bytes
                ),
            );
        }
        match m.partition_of(&v.id) {
            None => r.add(f("id"), format!("no partition holds volume \"{}\"", v.id)),
            Some(p) if v.size_bytes > p.size_bytes => {
                r.add(
                    f("size_bytes"),
                    format!(
                        "{} is larger than its partition ({} bytes)",
                        v.size_bytes, p.size_bytes
                    ),
                );
            }
            _ => {}
        }
    }
    if m.volumes.iter().filter(|v| v.role == Role::Boot).count() > 1 {
        r.add("volumes", "more than one volume has role \"boot\"");
    }
    match systems {
        0 => r.add(
            "volumes",
            "no volume has role \"system\" (the one mounted at /): nothing could be booted",
        ),
        1 => {}
        n => r.add(
            "volumes",
            format!("{n} volumes have role \"system\"; exactly one may"),
        ),
    }
}

fn commands(m: &Manifest, r: &mut Report) {
    let mut seen = HashSet::new();
    for (i, c) in m.commands.iter().enumerate() {
        let f = |name: &str| format!("commands[{i}].{name}");
        if !(1..=2).contains(&c.phase) {
            r.add(f("phase"), format!("{} is not a phase (1 or 2)", c.phase));
        }
        if !seen.insert((c.phase, c.sequence)) {
            r.add(
                f("sequence"),
                format!("{} is used twice in phase {}", c.sequence, c.phase),
            );
        }
        if c.program.trim().is_empty() {
            r.add(f("program"), "is empty");
        }
        if c.timeout_secs == 0 {
            r.add(
                f("timeout_secs"),
                "is 0; give the longest time the program may reasonably take",
            );
        }
    }
}

fn drivers(m: &Manifest, r: &mut Report) {
    let mut seen = HashSet::new();
    for (i, d) in m.drivers.iter().enumerate() {
        let f = |name: &str| format!("drivers[{i}].{name}");
        if !seen.insert((d.kernel.as_str(), d.module.as_str())) {
            r.add(
                f("module"),
                format!("\"{}\" is listed twice for kernel {}", d.module, d.kernel),
            );
        }
        if !d.file.starts_with("bmr/drivers/") || d.file.contains("..") {
            r.add(
                f("file"),
                format!(
                    "\"{}\" is not a path under bmr/drivers/ on the medium",
                    d.file
                ),
            );
        }
        for dep in &d.depends {
            if !m
                .drivers
                .iter()
                .any(|o| &o.module == dep && o.kernel == d.kernel)
            {
                r.add(
                    f("depends"),
                    format!("\"{dep}\" is not among the drivers for kernel {}", d.kernel),
                );
            }
        }
    }
}
