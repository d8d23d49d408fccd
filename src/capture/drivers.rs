//! Custom drivers for the medium (seed 000's tape driver on the floppy): a
//! module and everything modules.dep says it needs, in load order, with the
//! vermagic the rescue kernel must match.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::manifest::Driver;

/// A module file to copy, with its manifest entry.
pub struct Collected {
    pub driver: Driver,
    pub data: Vec<u8>,
}

/// The kernel's own spelling: `-` and `_` are the same in module names.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// `kernel/drivers/scsi/st.ko.xz` -> `st`.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    normalize(stem)
}

/// The modules directory of `kver` under a system root (merged /usr or not).
pub fn modules_dir(root: &Path, kver: &str) -> Option<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(kver))
        .find(|p| p.join("modules.dep").is_file())
}

/// Kernel versions with a module tree under `root`, newest last.
pub fn installed_kernels(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for d in ["lib/modules", "usr/lib/modules"] {
        if let Ok(entries) = fs::read_dir(root.join(d)) {
            out.extend(
                entries
                    .flatten()
                    .filter(|e| e.path().join("modules.dep").is_file())
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
    }
    out.sort_by_key(|v| version_key(v));
    out.dedup();
    out
}

fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

pub struct DepTable {
    /// name -> (relative path, direct dependencies as names)
    pub modules: HashMap<String, (String, Vec<String>)>,
    pub builtin: Vec<String>,
}

pub fn read_deps(dir: &Path) -> Result<DepTable> {
    let dep = fs::read_to_string(dir.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", dir.display()))?;
    let mut modules = HashMap::new();
    for line in dep.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let deps = deps.split_whitespace().map(module_name).collect();
        modules.insert(module_name(path), (path.to_string(), deps));
    }
    let builtin = fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    Ok(DepTable { modules, builtin })
}

/// Collects the requested modules and their dependencies for `kver`, each
/// once, dependencies before the modules that need them.
pub fn collect(
    root: &Path,
    kver: &str,
    requested: &[String],
) -> Result<(Vec<Collected>, Vec<String>)> {
    if requested.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let dir = modules_dir(root, kver).ok_or_else(|| {
        anyhow!(
            "no modules for kernel {kver} under {} (lib/modules/{kver}/modules.dep); \
             name an installed kernel with --kernel (installed: {})",
            root.display(),
            installed_kernels(root).join(", ")
        )
    })?;
    let table = read_deps(&dir)?;
    let mut order = Vec::new();
    let mut notes = Vec::new();
    for req in requested {
        let name = normalize(req);
        if !table.modules.contains_key(&name) {
            if table.builtin.contains(&name) {
                notes.push(format!(
                    "driver {req} is built into kernel {kver}: nothing to copy"
                ));
                continue;
            }
            bail!(
                "driver module \"{req}\" not found for kernel {kver} in {}/modules.dep; \
                 check the name (`modinfo {req}`) or install the package that ships it",
                dir.display()
            );
        }
        visit(&table, &name, &mut order, &mut Vec::new())?;
    }
    let mut out = Vec::new();
    for name in order {
        let (rel, deps) = &table.modules[&name];
        let source = dir.join(rel);
        let data =
            fs::read(&source).with_context(|| format!("reading module {}", source.display()))?;
        let vermagic = vermagic(&decompress(rel, &data)?)
            .with_context(|| format!("{} is not a kernel module", source.display()))?;
        let purpose = if requested.iter().any(|r| normalize(r) == name) {
            "requested with --driver".to_string()
        } else {
            let users: Vec<&str> = table
                .modules
                .iter()
                .filter(|(_, (_, d))| d.contains(&name))
                .map(|(n, _)| n.as_str())
                .filter(|n| requested.iter().any(|r| normalize(r) == *n))
                .collect();
            format!(
                "needed by {}",
                if users.is_empty() {
                    "a requested driver".to_string()
                } else {
                    users.join(", ")
                }
            )
        };
        let base = rel.rsplit('/').next().unwrap_or(rel);
        out.push(Collected {
            driver: Driver {
                module: name.clone(),
                file: format!("bmr/drivers/{kver}/{base}"),
                purpose,
                kernel: kver.to_string(),
                vermagic,
                depends: deps.clone(),
            },
            data,
        });
    }
    Ok((out, notes))
}

fn visit(
    table: &DepTable,
    name: &str,
    order: &mut Vec<String>,
    path: &mut Vec<String>,
) -> Result<()> {
    if order.iter().any(|n| n == name) {
        return Ok(());
    }
    if path.iter().any(|n| n == name) {
        bail!(
            "modules.dep has a dependency cycle through {name}: {}",
            path.join(" -> ")
        );
    }
    let (_, deps) = table.modules.get(name).ok_or_else(|| {
        anyhow!("modules.dep names {name} as a dependency but has no entry for it")
    })?;
    path.push(name.to_string());
    for d in deps {
        visit(table, d, order, path)?;
    }
    path.pop();
    order.push(name.to_string());
    Ok(())
}

/// The module as the kernel would read it: .ko.xz, .ko.zst and .ko.gz unpacked.
pub fn decompress(path: &str, data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    if path.ends_with(".xz") {
        lzma_rs::xz_decompress(&mut &data[..], &mut out)
            .map_err(|e| anyhow!("unpacking {path}: {e}"))?;
    } else if path.ends_with(".zst") {
        out = zstd::decode_all(data).with_context(|| format!("unpacking {path}"))?;
    } else if path.ends_with(".gz") {
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .with_context(|| format!("unpacking {path}"))?;
    } else {
        out = data.to_vec();
    }
    Ok(out)
}

/// The `vermagic=` string from a module's .modinfo section.
pub fn vermagic(module: &[u8]) -> Result<String> {
    let key = b"vermagic=";
    let at = module
        .windows(key.len())
        .position(|w| w == key)
        .ok_or_else(|| anyhow!("no vermagic= in .modinfo"))?;
    let rest = &module[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// Every `key=` value in a module's .modinfo strings (e.g. its firmware files).
pub fn modinfo_values(module: &[u8], key: &str) -> Vec<String> {
    let needle = format!("\0{key}=");
    let needle = needle.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = module[i..].windows(needle.len()).position(|w| w == needle) {
        let start = i + at + needle.len();
        let end = module[start..]
            .iter()
            .position(|&b| b == 0)
            .map_or(module.len(), |e| start + e);
        out.push(String::from_utf8_lossy(&module[start..end]).into_owned());
        i = end;
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const KVER: &str = "6.1.0-99-amd64";

    fn fake_module(name: &str) -> Vec<u8> {
        let mut m = b"\x7fELF....".to_vec();
        m.extend_from_slice(
            format!(
                "license=GPL\0name={name}\0vermagic={KVER} SMP preempt mod_unload modversions \0"
            )
            .as_bytes(),
        );
        m
    }

    /// A module tree: st needs scsi_mod; sg needs scsi_mod; scsi_mod needs scsi_common.
    pub(crate) fn fake_tree(root: &Path) {
        let dir = root.join("lib/modules").join(KVER);
        let scsi = dir.join("kernel/drivers/scsi");
        fs::create_dir_all(&scsi).unwrap();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &fake_module("st")[..], &mut xz).unwrap();
        fs::write(scsi.join("st.ko.xz"), xz).unwrap();
        fs::write(
            scsi.join("scsi_mod.ko.zst"),
            zstd::encode_all(&fake_module("scsi_mod")[..], 3).unwrap(),
        )
        .unwrap();
        fs::write(scsi.join("scsi_common.ko"), fake_module("scsi_common")).unwrap();
        fs::write(scsi.join("sg.ko"), fake_module("sg")).unwrap();
        fs::write(
            dir.join("modules.dep"),
            "kernel/drivers/scsi/st.ko.xz: kernel/drivers/scsi/scsi_mod.ko.zst kernel/drivers/scsi/scsi_common.ko\n\
             kernel/drivers/scsi/scsi_mod.ko.zst: kernel/drivers/scsi/scsi_common.ko\n\
             kernel/drivers/scsi/scsi_common.ko:\n\
             kernel/drivers/scsi/sg.ko: kernel/drivers/scsi/scsi_mod.ko.zst kernel/drivers/scsi/scsi_common.ko\n",
        )
        .unwrap();
        fs::write(
            dir.join("modules.builtin"),
            "kernel/drivers/block/loop.ko\n",
        )
        .unwrap();
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let root = tempfile::tempdir().unwrap();
        fake_tree(root.path());
        let (got, notes) = collect(root.path(), KVER, &["st".into(), "sg".into()]).unwrap();
        let names: Vec<&str> = got.iter().map(|c| c.driver.module.as_str()).collect();
        assert_eq!(names, ["scsi_common", "scsi_mod", "st", "sg"]);
        assert!(notes.is_empty());
        let st = &got[2].driver;
        assert_eq!(st.file, format!("bmr/drivers/{KVER}/st.ko.xz"));
        assert_eq!(st.depends, ["scsi_mod", "scsi_common"]);
        assert!(st.vermagic.starts_with(KVER), "{}", st.vermagic);
        assert_eq!(got[1].driver.vermagic, st.vermagic, "zstd module read too");
        assert!(
            got[0].driver.purpose.contains("needed by"),
            "{}",
            got[0].driver.purpose
        );
        assert_eq!(st.purpose, "requested with --driver");
    }

    #[test]
    fn dash_and_underscore_are_the_same_module() {
        let root = tempfile::tempdir().unwrap();
        fake_tree(root.path());
        let (got, _) = collect(root.path(), KVER, &["scsi-mod".into()]).unwrap();
        assert_eq!(got.last().unwrap().driver.module, "scsi_mod");
    }

    #[test]
    fn unknown_builtin_and_missing_kernel() {
        let root = tempfile::tempdir().unwrap();
        fake_tree(root.path());
        let err = collect(root.path(), KVER, &["nosuchdrv".into()])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("\"nosuchdrv\" not found") && err.contains(KVER),
            "{err}"
        );
        let (got, notes) = collect(root.path(), KVER, &["loop".into()]).unwrap();
        assert!(
            got.is_empty() && notes[0].contains("built into"),
            "{notes:?}"
        );
        let err = collect(root.path(), "5.10.0-1-amd64", &["st".into()])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--kernel") && err.contains(KVER), "{err}");
    }

    #[test]
    fn newest_kernel_sorts_last() {
        let root = tempfile::tempdir().unwrap();
        for k in ["6.1.0-9-amd64", "6.1.0-10-amd64", "5.10.0-30-amd64"] {
            let d = root.path().join("lib/modules").join(k);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("modules.dep"), "").unwrap();
        }
        assert_eq!(
            installed_kernels(root.path()),
            ["5.10.0-30-amd64", "6.1.0-9-amd64", "6.1.0-10-amd64"]
        );
    }
}
