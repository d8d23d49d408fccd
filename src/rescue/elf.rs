//! The shared libraries every program in the initramfs needs, found the
//! way ld.so finds them (interpreter, DT_NEEDED through RUNPATH/RPATH and
//! the system directories), so nothing is copied "just in case".

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use goblin::elf::Elf;

use super::tree::Tree;

pub fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub interpreter: Option<String>,
    pub libraries: Vec<String>,
    pub search: Vec<String>,
}

pub fn needs(data: &[u8]) -> Result<Needs> {
    let elf = Elf::parse(data).map_err(|e| anyhow!("not a readable ELF file: {e}"))?;
    let mut search: Vec<String> = elf.runpaths.iter().map(|s| s.to_string()).collect();
    if search.is_empty() {
        search = elf.rpaths.iter().map(|s| s.to_string()).collect();
    }
    Ok(Needs {
        interpreter: elf.interpreter.map(str::to_string),
        libraries: elf.libraries.iter().map(|s| s.to_string()).collect(),
        search: search
            .iter()
            .flat_map(|s| s.split(':'))
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// ld.so's default directories on Debian amd64 (multiarch first).
const SYSTEM_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// Adds every library the tree's ELF files need, transitively.
pub fn close(tree: &mut Tree) -> Result<()> {
    let mut missing = Vec::new();
    let mut i = 0;
    while i < tree.elves.len() {
        let elf = tree.elves[i].clone();
        i += 1;
        let data = fs::read(tree.root.join(elf.strip_prefix("/").unwrap_or(&elf)))?;
        let needs = match needs(&data) {
            Ok(n) => n,
            Err(_) => continue, // a kernel module or firmware blob that happens to be ELF
        };
        if let Some(interp) = &needs.interpreter {
            tree.add_host(Path::new(interp))
                .with_context(|| format!("interpreter of {}", elf.display()))?;
        }
        let origin = elf.parent().unwrap_or(Path::new("/")).to_path_buf();
        for lib in &needs.libraries {
            match find(tree, lib, &needs.search, &origin) {
                Some(p) => {
                    tree.add_host(&p)?;
                }
                None => missing.push(format!("{lib} (needed by {})", elf.display())),
            }
        }
    }
    if !missing.is_empty() {
        bail!(
            "shared libraries not found on this system: {}",
            missing.join(", ")
        );
    }
    Ok(())
}

fn find(tree: &Tree, lib: &str, search: &[String], origin: &Path) -> Option<PathBuf> {
    if lib.contains('/') {
        return Some(PathBuf::from(lib));
    }
    let dirs = search
        .iter()
        .map(|d| PathBuf::from(d.replace("$ORIGIN", &origin.to_string_lossy())))
        .chain(SYSTEM_DIRS.iter().map(PathBuf::from));
    for d in dirs {
        let p = d.join(lib);
        if tree.host_path(&p).exists() {
            return Some(p);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_a_real_program_needs() {
        let data = fs::read("/usr/bin/udevadm").or_else(|_| fs::read("/bin/ls"));
        let Ok(data) = data else { return };
        let n = needs(&data).unwrap();
        assert!(
            n.interpreter
                .as_deref()
                .is_some_and(|i| i.contains("ld-linux")),
            "{n:?}"
        );
        assert!(
            n.libraries.iter().any(|l| l.starts_with("libc.so")),
            "{n:?}"
        );
    }

    #[test]
    fn garbage_is_not_an_elf() {
        assert!(needs(b"\x7fELF garbage").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        fs::write(&p, b"#!/bin/sh\n").unwrap();
        assert!(!is_elf(&p));
    }
}
