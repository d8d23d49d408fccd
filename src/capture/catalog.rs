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

/// What [`verify`] found: how many catalog entries it checked and, in plain
/// words, each one that does not match the restored system.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    pub checked: u64,
    pub mismatches: Vec<String>,
}

/// One catalog line; `shown` is the path as escaped in the catalog, safe to
/// print on one console line.
struct Entry<'a> {
    shown: &'a str,
    path: String,
    size: u64,
    hash: &'a str,
}

/// Proves the restored system under `root` matches the catalog `build`
/// wrote (`data`, zstd-compressed TSV). The whole catalog is parsed before
/// any file is read, so a damaged one fails fast.
pub fn verify(root: &Path, data: &[u8]) -> Result<Verified> {
    let tsv = zstd::decode_all(data).context(
        "decompressing the catalog: it is not what bmr save wrote (damaged or truncated)",
    )?;
    let body = tsv.strip_suffix(b"\n").unwrap_or(&tsv);
    let entries = if body.is_empty() {
        Vec::new()
    } else {
        body.split(|&b| b == b'\n')
            .enumerate()
            .map(|(i, line)| {
                parse_line(line)
                    .with_context(|| format!("the catalog is damaged at line {}", i + 1))
            })
            .collect::<Result<Vec<_>>>()?
    };
    let mut verified = Verified::default();
    for entry in &entries {
        verified.checked += 1;
        if let Some(m) = check(root, entry) {
            verified.mismatches.push(m);
        }
    }
    Ok(verified)
}

fn parse_line(line: &[u8]) -> Result<Entry<'_>> {
    let line = std::str::from_utf8(line).context("not UTF-8")?;
    let fields: Vec<&str> = line.split('\t').collect();
    let [shown, size, hash] = fields[..] else {
        anyhow::bail!(
            "expected path, size and BLAKE3 hash separated by tabs, found {} field(s)",
            fields.len()
        );
    };
    let path = unescape(shown).with_context(|| format!("{shown:?} has an unknown escape"))?;
    if !path.starts_with('/') {
        anyhow::bail!("{shown:?} is not an absolute path");
    }
    let size = size
        .parse()
        .with_context(|| format!("size {size:?} is not a number"))?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        anyhow::bail!("{hash:?} is not a BLAKE3 hash");
    }
    Ok(Entry {
        shown,
        path,
        size,
        hash,
    })
}

/// The inverse of [`escape`]; None for an escape it never writes.
fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        out.push(match c {
            '\\' => match chars.next()? {
                '\\' => '\\',
                't' => '\t',
                'n' => '\n',
                _ => return None,
            },
            c => c,
        });
    }
    Some(out)
}

/// The mismatch of one entry, if any. Sizes are compared first: no need to
/// read a file whose length already differs.
fn check(root: &Path, e: &Entry) -> Option<String> {
    let full = root.join(e.path.trim_start_matches('/'));
    let shown = e.shown;
    match fs::symlink_metadata(&full) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Some(format!("{shown}: missing")),
        Err(err) => Some(format!("{shown}: {err}")),
        Ok(m) if !m.is_file() => Some(format!("{shown}: not a regular file")),
        Ok(m) if m.len() != e.size => {
            Some(format!("{shown}: size {}, expected {}", m.len(), e.size))
        }
        Ok(_) => match hash_file(&full) {
            Err(err) => Some(format!("{shown}: unreadable: {err}")),
            Ok((_, hash)) if !hash.eq_ignore_ascii_case(e.hash) => {
                Some(format!("{shown}: content differs (BLAKE3)"))
            }
            Ok(_) => None,
        },
    }
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

    #[test]
    fn a_faithful_restore_verifies() {
        let root = tree();
        let b = build(root.path(), CatalogMode::Full).unwrap();
        let v = verify(root.path(), &b.data).unwrap();
        assert_eq!(v.checked, b.entries);
        assert_eq!(v.mismatches, Vec::<String>::new());
    }

    #[test]
    fn changed_missing_and_resized_files_are_named() {
        let root = tree();
        let r = root.path();
        let b = build(r, CatalogMode::Full).unwrap();
        fs::write(r.join("boot/vmlinuz-6.1"), "KERNEL").unwrap();
        fs::remove_file(r.join("boot/grub/grub.cfg")).unwrap();
        fs::write(r.join("etc/fstab"), "UUID=y / ext4 defaults 0 1\n# more\n").unwrap();
        fs::remove_file(r.join("usr/share/doc/a\tb")).unwrap();
        fs::create_dir(r.join("usr/share/doc/a\tb")).unwrap();
        let v = verify(r, &b.data).unwrap();
        assert_eq!(v.checked, 5);
        assert_eq!(
            v.mismatches,
            [
                "/boot/grub/grub.cfg: missing",
                "/boot/vmlinuz-6.1: content differs (BLAKE3)",
                "/etc/fstab: size 34, expected 27",
                "/usr/share/doc/a\\tb: not a regular file",
            ]
        );
    }

    #[test]
    fn escaped_paths_are_found() {
        assert_eq!(
            unescape(&escape("a\\b\tc\nd")).as_deref(),
            Some("a\\b\tc\nd")
        );
        assert_eq!(unescape("a\\x"), None);
        assert_eq!(unescape("a\\"), None);
    }

    #[test]
    fn a_damaged_catalog_is_an_error_naming_the_line() {
        let root = tree();
        let hash = blake3::hash(b"kernel").to_hex();
        let cases = [
            (
                format!("/boot/vmlinuz-6.1\t6\t{hash}\n/etc/fstab\t27\n"),
                "line 2",
            ),
            (format!("/boot/vmlinuz-6.1\tsix\t{hash}\n"), "line 1"),
            (format!("/a\t1\t{hash}\n/b\\q\t1\t{hash}\n"), "line 2"),
            ("/boot/vmlinuz-6.1\t6\tnothex\n".to_string(), "line 1"),
            (format!("boot/vmlinuz-6.1\t6\t{hash}\n"), "line 1"),
            (format!("/a\t1\t{hash}\n\n/b\t1\t{hash}\n"), "line 2"),
        ];
        for (tsv, line) in cases {
            let data = zstd::encode_all(tsv.as_bytes(), 3).unwrap();
            let e = format!("{:#}", verify(root.path(), &data).unwrap_err());
            assert!(e.contains(line), "{tsv:?}: {e}");
        }
        let e = verify(root.path(), b"not zstd").unwrap_err();
        assert!(
            format!("{e:#}").contains("decompressing the catalog"),
            "{e:#}"
        );
        let empty = zstd::encode_all(&b""[..], 3).unwrap();
        assert_eq!(verify(root.path(), &empty).unwrap(), Verified::default());
    }
}
