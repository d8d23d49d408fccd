//! Loading the custom drivers the recovery medium carries (the tape driver
//! of seed 000) into the running kernel. Facts from Debian's 6.1 kernel:
//! it cannot decompress a module passed by `finit_module`, so bmr
//! decompresses and uses `init_module`; and with MODVERSIONS it ignores the
//! release in vermagic, so bmr compares vermagic itself and never forces.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use serde::Serialize;

use crate::capture::drivers::{decompress, normalize, vermagic};
use crate::manifest::Driver;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Loaded {
    pub module: String,
    pub file: String,
    /// loaded, already-present, refused, failed
    pub result: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Dependencies before the modules that need them; the medium's order where
/// the dependencies allow. A cycle or a dependency the medium lacks is left
/// to the kernel to report (it may be built in or already loaded).
pub fn load_order(drivers: &[Driver]) -> Vec<&Driver> {
    let by_name: HashMap<String, &Driver> =
        drivers.iter().map(|d| (normalize(&d.module), d)).collect();
    let mut done = HashSet::new();
    let mut out = Vec::new();
    fn visit<'a>(
        d: &'a Driver,
        by_name: &HashMap<String, &'a Driver>,
        done: &mut HashSet<String>,
        stack: &mut Vec<String>,
        out: &mut Vec<&'a Driver>,
    ) {
        let name = normalize(&d.module);
        if done.contains(&name) || stack.contains(&name) {
            return;
        }
        stack.push(name.clone());
        for dep in &d.depends {
            if let Some(dd) = by_name.get(&normalize(dep)) {
                visit(dd, by_name, done, stack, out);
            }
        }
        stack.pop();
        done.insert(name);
        out.push(d);
    }
    for d in drivers {
        visit(d, &by_name, &mut done, &mut Vec::new(), &mut out);
    }
    out
}

/// The vermagic modules for the running kernel carry: read from one of the
/// rescue system's own modules, or None when it has no module tree.
pub fn kernel_vermagic(modules_root: &Path, release: &str) -> Option<String> {
    let dir = modules_root.join(release);
    let dep = fs::read_to_string(dir.join("modules.dep")).ok()?;
    dep.lines().take(50).find_map(|l| {
        let rel = l.split(':').next()?;
        let data = fs::read(dir.join(rel)).ok()?;
        vermagic(&decompress(rel, &data).ok()?).ok()
    })
}

/// Why a module must not be loaded into this kernel, if it must not.
pub fn mismatch(module_magic: &str, release: &str, kernel_magic: Option<&str>) -> Option<String> {
    let built_for = module_magic.split_whitespace().next().unwrap_or_default();
    if built_for != release {
        return Some(format!(
            "it was built for kernel {built_for}, this rescue system runs {release}"
        ));
    }
    match kernel_magic {
        Some(k) if k.trim() != module_magic.trim() => Some(format!(
            "it was built with other kernel options (vermagic \"{}\", this kernel \"{}\")",
            module_magic.trim(),
            k.trim()
        )),
        _ => None,
    }
}

/// Loads the medium's drivers; each result is reported, none stops the boot.
/// `read` fetches a file from the medium.
pub fn load_all(
    drivers: &[Driver],
    read: &dyn Fn(&str) -> Result<Vec<u8>>,
    release: &str,
    kernel_magic: Option<&str>,
) -> Vec<Loaded> {
    load_order(drivers)
        .into_iter()
        .map(|d| {
            let (result, detail) = match load_one(d, read, release, kernel_magic) {
                Ok(r) => (r.to_string(), String::new()),
                Err(Refusal::Refused(why)) => ("refused".to_string(), why),
                Err(Refusal::Failed(e)) => ("failed".to_string(), format!("{e:#}")),
            };
            Loaded {
                module: d.module.clone(),
                file: d.file.clone(),
                result,
                detail,
            }
        })
        .collect()
}

enum Refusal {
    Refused(String),
    Failed(anyhow::Error),
}

fn load_one(
    d: &Driver,
    read: &dyn Fn(&str) -> Result<Vec<u8>>,
    release: &str,
    kernel_magic: Option<&str>,
) -> Result<&'static str, Refusal> {
    if Path::new("/sys/module").join(normalize(&d.module)).exists() {
        return Ok("already-present");
    }
    let raw = read(&d.file).map_err(Refusal::Failed)?;
    let image = decompress(&d.file, &raw).map_err(Refusal::Failed)?;
    let magic = vermagic(&image).map_err(Refusal::Failed)?;
    if let Some(why) = mismatch(&magic, release, kernel_magic) {
        return Err(Refusal::Refused(format!(
            "{why}; not loaded. Write the medium again with `bmr save --kernel {release}` \
             on a system with that kernel's modules, or boot a rescue ISO made for {}",
            magic.split_whitespace().next().unwrap_or("its kernel")
        )));
    }
    init_module(&image).map_err(Refusal::Failed)
}

fn init_module(image: &[u8]) -> Result<&'static str> {
    let params = CString::default();
    match nix::kmod::init_module(image, &params) {
        Ok(()) => Ok("loaded"),
        Err(nix::errno::Errno::EEXIST) => Ok("already-present"),
        Err(nix::errno::Errno::ENOEXEC) => bail!("the kernel says it is not a valid module"),
        Err(nix::errno::Errno::ENOENT) => {
            bail!("unknown symbols: a module it needs is missing (see dmesg)")
        }
        Err(e) => Err(anyhow!("init_module: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drv(name: &str, deps: &[&str]) -> Driver {
        Driver {
            module: name.into(),
            file: format!("bmr/drivers/k/{name}.ko"),
            purpose: String::new(),
            kernel: "k".into(),
            vermagic: "k SMP".into(),
            depends: deps.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn dependencies_load_first_whatever_the_listed_order() {
        let ds = [
            drv("st", &["scsi_mod", "scsi_common"]),
            drv("scsi-mod", &["scsi_common"]),
            drv("scsi_common", &[]),
            drv("ch", &["scsi_mod"]),
        ];
        let order: Vec<&str> = load_order(&ds).iter().map(|d| d.module.as_str()).collect();
        assert_eq!(order, ["scsi_common", "scsi-mod", "st", "ch"]);
    }

    #[test]
    fn cycles_and_missing_dependencies_do_not_hang_or_drop() {
        let ds = [drv("a", &["b", "zz"]), drv("b", &["a"])];
        let order: Vec<&str> = load_order(&ds).iter().map(|d| d.module.as_str()).collect();
        assert_eq!(order, ["b", "a"]);
    }

    #[test]
    fn vermagic_must_match_the_running_kernel() {
        let ours = "6.1.0-56-amd64 SMP preempt mod_unload modversions ";
        assert_eq!(mismatch(ours, "6.1.0-56-amd64", Some(ours)), None);
        assert_eq!(mismatch(ours, "6.1.0-56-amd64", None), None);
        let other = mismatch(
            "6.1.0-99-amd64 SMP preempt mod_unload modversions ",
            "6.1.0-56-amd64",
            Some(ours),
        )
        .unwrap();
        assert!(other.contains("built for kernel 6.1.0-99-amd64"), "{other}");
        let flags = mismatch(
            "6.1.0-56-amd64 SMP mod_unload ",
            "6.1.0-56-amd64",
            Some(ours),
        )
        .unwrap();
        assert!(flags.contains("other kernel options"), "{flags}");
    }

    #[test]
    fn a_foreign_module_is_refused_before_the_kernel_sees_it() {
        let ds = [drv("st", &[])];
        let read = |_: &str| -> Result<Vec<u8>> {
            Ok(b"\0license=GPL\0vermagic=5.10.0-9-amd64 SMP mod_unload modversions \0".to_vec())
        };
        let got = load_all(&ds, &read, "6.1.0-56-amd64", None);
        assert_eq!(got[0].result, "refused", "{got:?}");
        assert!(
            got[0].detail.contains("5.10.0-9-amd64"),
            "{}",
            got[0].detail
        );
        assert!(got[0].detail.contains("bmr save --kernel 6.1.0-56-amd64"));
    }

    #[test]
    fn an_unreadable_module_is_a_failure_not_a_panic() {
        let ds = [drv("st", &[])];
        let read = |f: &str| -> Result<Vec<u8>> { Err(anyhow!("{f}: no such file on the medium")) };
        let got = load_all(&ds, &read, "6.1.0-56-amd64", None);
        assert_eq!(got[0].result, "failed");
        assert!(got[0].detail.contains("no such file"));
    }
}
