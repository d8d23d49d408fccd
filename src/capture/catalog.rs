//! The catalog of seed 000: files that must be identical after a restore
//! (path, size, BLAKE3), so phase two can prove the system came back whole.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::manifest::CatalogMode;

pub const CATALOG_PATH: &str = "bmr/catalog.tsv.zst";

pub struct Built {
    /// zstd-compressed TSV.
    pub data: Vec<u8>,
    pub entries: u64,
    pub skipped: Vec<String>,
}

/// Paths (relative to `root`, with a leading `/`) the catalog covers.
fn paths(root: &Path, mode: CatalogMode) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    if mode == CatalogMode::None {
        return set;
    }
    walk(root, &root.join("boot"), &mut set);
    set.insert("/etc/fstab".to_string());
    if mode == CatalogMode::Full {
        // Every file dpkg owns: the system as the package manager installed it.
        if let Ok(entries) = fs::read_dir(root.join("var/lib/dpkg/info")) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "list") {
                    if let Ok(list) = fs::read_to_string(e.path()) {
                        set.extend(
                            list.lines()
                                .filter(|l| l.starts_with('/'))
                                .map(str::to_string),
                        );
                    }
                }
            }
        }
    }
    set
}

fn walk(root: &Path, dir: &Path, set: &mut BTreeSet<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            walk(root, &e.path(), set);
        } else if ft.is_file() {
            if let Ok(rel) = e.path().strip_prefix(root) {
                set.insert(format!("/{}", rel.display()));
            }
        }
    }
}

/// Tabs, newlines and backslashes in names would break the TSV.
pub fn escape(path: &str) -> String {
    path.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
}

pub fn build(root: &Path, mode: CatalogMode) -> Result<Built> {
    let mut tsv = Vec::new();
    let mut entries = 0;
    let mut skipped = Vec::new();
    for rel in paths(root, mode) {
        let full: PathBuf = root.join(rel.trim_start_matches('/'));
        // Only regular files: dpkg lists directories and symlinks too.
        match fs::symlink_metadata(&full) {
            Ok(m) if m.is_file() => {}
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                skipped.push(format!("{rel}: {e}"));
                continue;
            }
        }
        match hash_file(&full) {
            Ok((size, hash)) => {
                writeln!(tsv, "{}\t{size}\t{hash}", escape(&rel))?;
                entries += 1;
            }
            Err(e) => skipped.push(format!("{rel}: {e}")),
        }
    }
    let data = zstd::encode_all(&tsv[..], 19).context("compressing the catalog")?;
    Ok(Built {
        data,
        entries,
        skipped,
    })
}

fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    let mut hasher = blake3::Hasher::new();
    let size = io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok((size, hasher.finalize().to_hex().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for (p, c) in [
            ("boot/vmlinuz-6.1", "kernel"),
            ("boot/grub/grub.cfg", "menuentry"),
            ("etc/fstab", "UUID=x / ext4 defaults 0 1\n"),
            ("usr/bin/tool", "#!/bin/sh\n"),
            ("usr/share/doc/a\tb", "odd name"),
            (
                "var/lib/dpkg/info/tool.list",
                "/.\n/usr\n/usr/bin\n/usr/bin/tool\n/usr/bin/gone\n/usr/share/doc/a\tb\n",
            ),
        ] {
            fs::create_dir_all(r.join(p).parent().unwrap()).unwrap();
            fs::write(r.join(p), c).unwrap();
        }
        std::os::unix::fs::symlink("tool", r.join("usr/bin/link")).unwrap();
        root
    }

    fn lines(b: &Built) -> Vec<String> {
        String::from_utf8(zstd::decode_all(&b.data[..]).unwrap())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn boot_catalog_has_boot_files_and_fstab() {
        let root = tree();
        let b = build(root.path(), CatalogMode::Boot).unwrap();
        let l = lines(&b);
        let paths: Vec<&str> = l.iter().map(|l| l.split('\t').next().unwrap()).collect();
        assert_eq!(
            paths,
            ["/boot/grub/grub.cfg", "/boot/vmlinuz-6.1", "/etc/fstab"]
        );
        assert_eq!(b.entries, 3);
        let kernel: Vec<&str> = l[1].split('\t').collect();
        assert_eq!(kernel[1], "6");
        assert_eq!(kernel[2], blake3::hash(b"kernel").to_hex().as_str());
    }

    #[test]
    fn full_catalog_adds_package_files_only_regular_and_escaped() {
        let root = tree();
        let b = build(root.path(), CatalogMode::Full).unwrap();
        let l = lines(&b);
        assert!(
            l.iter().any(|x| x.starts_with("/usr/bin/tool\t10\t")),
            "{l:?}"
        );
        assert!(
            l.iter().any(|x| x.starts_with("/usr/share/doc/a\\tb\t8\t")),
            "{l:?}"
        );
        assert!(!l
            .iter()
            .any(|x| x.starts_with("/usr/bin\t") || x.starts_with("/usr/bin/gone")));
        assert_eq!(b.entries, 5);
    }

    #[test]
    fn none_is_empty() {
        let root = tree();
        assert_eq!(build(root.path(), CatalogMode::None).unwrap().entries, 0);
    }
}
