//! The kernel modules of the rescue system: what `initramfs/modules.list`
//! selects (names or directories of the module tree), everything those need
//! by modules.dep, their firmware, and a fresh depmod over the subset. The
//! list's `!name` lines keep modules out on purpose (the tape driver `st`
//! must come from the recovery medium).

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::tree::Tree;
use crate::capture::drivers::{decompress, modinfo_values, normalize, read_deps, DepTable};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Relative paths in the module tree, sorted.
    pub files: BTreeSet<String>,
    pub excluded: Vec<String>,
    pub notes: Vec<String>,
}

/// Patterns: `name`, `dir/` (every module below), `!name` (never).
pub fn select(table: &DepTable, patterns: &[String]) -> Result<Selection> {
    let mut sel = Selection::default();
    let never: BTreeSet<String> = patterns
        .iter()
        .filter_map(|p| p.strip_prefix('!'))
        .map(normalize)
        .collect();
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    for p in patterns.iter().filter(|p| !p.starts_with('!')) {
        if p.ends_with('/') {
            let before = wanted.len();
            wanted.extend(
                table
                    .modules
                    .iter()
                    .filter(|(_, (rel, _))| rel.starts_with(p.as_str()))
                    .map(|(n, _)| n.clone()),
            );
            if wanted.len() == before {
                sel.notes.push(format!("no modules under {p}"));
            }
        } else {
            let n = normalize(p);
            if table.modules.contains_key(&n) {
                wanted.insert(n);
            } else if table.builtin.contains(&n) {
                // Built into this kernel: nothing to carry.
            } else {
                sel.notes.push(format!("module {p} is not in this kernel"));
            }
        }
    }
    let mut stack: Vec<String> = wanted.into_iter().collect();
    let mut seen = BTreeSet::new();
    while let Some(n) = stack.pop() {
        if !seen.insert(n.clone()) {
            continue;
        }
        let Some((rel, deps)) = table.modules.get(&n) else {
            bail!("modules.dep names {n} as a dependency but has no entry for it");
        };
        if never.contains(&n) {
            sel.excluded.push(n);
            continue;
        }
        if let Some(d) = deps.iter().find(|d| never.contains(*d)) {
            sel.notes
                .push(format!("{n} left out: it needs {d}, which is excluded"));
            continue;
        }
        sel.files.insert(rel.clone());
        stack.extend(deps.iter().cloned());
    }
    sel.excluded.sort();
    Ok(sel)
}

pub struct Copied {
    pub modules: usize,
    pub firmware: usize,
    pub firmware_missing: Vec<String>,
}

/// Copies the selection from `src` (a modules/KVER dir) to the tree's
/// /usr/lib/modules/KVER, with firmware from the host, then runs depmod.
pub fn install(tree: &mut Tree, src: &Path, kver: &str, patterns: &[String]) -> Result<Copied> {
    let table = read_deps(src)?;
    let sel = select(&table, patterns)?;
    for n in &sel.notes {
        eprintln!("bmr: note: {n}");
    }
    let dest = Path::new("/usr/lib/modules").join(kver);
    let mut firmware = BTreeSet::new();
    for rel in &sel.files {
        let data = fs::read(src.join(rel)).with_context(|| format!("reading {rel}"))?;
        firmware.extend(modinfo_values(&decompress(rel, &data)?, "firmware"));
        tree.write(&dest.join(rel), &data, 0o644)?;
    }
    for meta in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        if let Ok(data) = fs::read(src.join(meta)) {
            tree.write(&dest.join(meta), &data, 0o644)?;
        }
    }
    tree.link(Path::new("/lib"), "usr/lib")?;
    let mut found = 0;
    let mut missing = Vec::new();
    for fw in &firmware {
        let candidates =
            ["", ".xz", ".zst"].map(|ext| Path::new("/lib/firmware").join(format!("{fw}{ext}")));
        match candidates.iter().find(|p| tree.host_path(p).exists()) {
            Some(p) => {
                tree.add_host(p)?;
                found += 1;
            }
            None => missing.push(fw.clone()),
        }
    }
    crate::tool::run(Command::new("depmod").arg("-b").arg(&tree.root).arg(kver))
        .context("depmod over the initramfs modules (package kmod)")?;
    Ok(Copied {
        modules: sel.files.len(),
        firmware: found,
        firmware_missing: missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn table() -> DepTable {
        let mut modules = HashMap::new();
        for (name, rel, deps) in [
            ("scsi_common", "kernel/drivers/scsi/scsi_common.ko", vec![]),
            (
                "scsi_mod",
                "kernel/drivers/scsi/scsi_mod.ko",
                vec!["scsi_common"],
            ),
            ("st", "kernel/drivers/scsi/st.ko", vec!["scsi_mod"]),
            ("ch", "kernel/drivers/scsi/ch.ko", vec!["scsi_mod", "st"]),
            ("sd_mod", "kernel/drivers/scsi/sd_mod.ko", vec!["scsi_mod"]),
            (
                "virtio_blk",
                "kernel/drivers/block/virtio_blk.ko",
                vec!["virtio"],
            ),
            ("virtio", "kernel/drivers/virtio/virtio.ko", vec![]),
        ] {
            modules.insert(
                name.to_string(),
                (
                    rel.to_string(),
                    deps.into_iter().map(str::to_string).collect(),
                ),
            );
        }
        DepTable {
            modules,
            builtin: vec!["ext4".to_string()],
        }
    }

    fn pats(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn directories_names_and_dependencies() {
        let s = select(
            &table(),
            &pats(&["virtio-blk", "kernel/drivers/scsi/", "ext4"]),
        )
        .unwrap();
        let files: Vec<&str> = s.files.iter().map(String::as_str).collect();
        assert_eq!(
            files,
            [
                "kernel/drivers/block/virtio_blk.ko",
                "kernel/drivers/scsi/ch.ko",
                "kernel/drivers/scsi/scsi_common.ko",
                "kernel/drivers/scsi/scsi_mod.ko",
                "kernel/drivers/scsi/sd_mod.ko",
                "kernel/drivers/scsi/st.ko",
                "kernel/drivers/virtio/virtio.ko",
            ]
        );
        assert!(s.notes.is_empty(), "{:?}", s.notes);
    }

    #[test]
    fn excluded_modules_stay_out_with_their_users() {
        let s = select(&table(), &pats(&["kernel/drivers/scsi/", "!st"])).unwrap();
        assert!(!s.files.iter().any(|f| f.ends_with("/st.ko")));
        assert!(!s.files.iter().any(|f| f.ends_with("/ch.ko")));
        assert!(s.files.iter().any(|f| f.ends_with("/sd_mod.ko")));
        assert_eq!(s.excluded, ["st"]);
        assert!(
            s.notes.iter().any(|n| n.contains("ch left out")),
            "{:?}",
            s.notes
        );
    }

    #[test]
    fn unknown_names_are_noted() {
        let s = select(&table(), &pats(&["nosuch", "kernel/fs/none/"])).unwrap();
        assert!(s.files.is_empty());
        assert_eq!(s.notes.len(), 2, "{:?}", s.notes);
    }
}
