//! The initramfs root being assembled in a staging directory. Host files
//! keep their paths, symlinks included, so Debian's merged /usr (`/lib ->
//! usr/lib`, `/sbin/modprobe -> /bin/kmod`) looks the same inside.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

pub struct Tree {
    pub root: PathBuf,
    /// Host root the files come from (`/` but for tests).
    host: PathBuf,
    added: BTreeSet<PathBuf>,
    /// ELF files added, for the dependency pass.
    pub elves: Vec<PathBuf>,
    /// Host paths never copied, even inside a listed directory.
    pub skip: Vec<PathBuf>,
}

impl Tree {
    pub fn new(root: &Path, host: &Path) -> Tree {
        Tree {
            root: root.to_path_buf(),
            host: host.to_path_buf(),
            added: BTreeSet::new(),
            elves: Vec::new(),
            skip: Vec::new(),
        }
    }

    fn inside(&self, abs: &Path) -> PathBuf {
        self.root.join(abs.strip_prefix("/").unwrap_or(abs))
    }

    fn on_host(&self, abs: &Path) -> PathBuf {
        self.host.join(abs.strip_prefix("/").unwrap_or(abs))
    }

    /// Copies the host's `abs` (a file, symlink chain or directory tree) to
    /// the same path inside; returns where the last symlink led.
    pub fn add_host(&mut self, abs: &Path) -> Result<PathBuf> {
        let real = self.mirror_path(abs, 0)?;
        if self.skip.iter().any(|s| real.starts_with(s)) {
            return Ok(real);
        }
        let src = self.on_host(&real);
        let meta = fs::metadata(&src).with_context(|| format!("{}", src.display()))?;
        if meta.is_dir() {
            let mut entries: Vec<_> = fs::read_dir(&src)?.flatten().map(|e| e.path()).collect();
            entries.sort();
            for e in entries {
                let rel = real.join(e.file_name().unwrap_or_default());
                self.add_host(&rel)?;
            }
        } else {
            self.copy_file(&src, &real, meta.permissions().mode())?;
        }
        Ok(real)
    }

    /// Recreates every symlink on the way to `abs` inside the tree and
    /// returns the fully resolved path.
    fn mirror_path(&mut self, abs: &Path, depth: u32) -> Result<PathBuf> {
        if depth > 40 {
            bail!("{}: too many levels of symbolic links", abs.display());
        }
        let mut cur = PathBuf::from("/");
        let comps: Vec<Component> = abs.components().collect();
        for (i, c) in comps.iter().enumerate() {
            match c {
                Component::RootDir | Component::CurDir => continue,
                Component::ParentDir => {
                    cur.pop();
                    continue;
                }
                Component::Normal(n) => cur.push(n),
                Component::Prefix(_) => bail!("{}: not a Unix path", abs.display()),
            }
            let host = self.on_host(&cur);
            let meta = fs::symlink_metadata(&host)
                .with_context(|| format!("{} is not on this system", abs.display()))?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&host)?;
                let link = self.inside(&cur);
                if self.added.insert(cur.clone()) {
                    if let Some(p) = link.parent() {
                        fs::create_dir_all(p)?;
                    }
                    let _ = fs::remove_file(&link);
                    symlink(&target, &link)
                        .with_context(|| format!("symlink {}", link.display()))?;
                }
                let base = cur.parent().unwrap_or(Path::new("/")).to_path_buf();
                let mut next = if target.is_absolute() {
                    target
                } else {
                    base.join(target)
                };
                for rest in &comps[i + 1..] {
                    next.push(rest);
                }
                return self.mirror_path(&next, depth + 1);
            }
        }
        Ok(cur)
    }

    fn copy_file(&mut self, src: &Path, real: &Path, mode: u32) -> Result<()> {
        if !self.added.insert(real.to_path_buf()) {
            return Ok(());
        }
        let dest = self.inside(real);
        if let Some(p) = dest.parent() {
            fs::create_dir_all(p)?;
        }
        fs::copy(src, &dest)
            .with_context(|| format!("copying {} into the initramfs", src.display()))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode & 0o7777))?;
        if super::elf::is_elf(&dest) {
            self.elves.push(real.to_path_buf());
        }
        Ok(())
    }

    /// Writes generated content at `abs`.
    pub fn write(&mut self, abs: &Path, data: &[u8], mode: u32) -> Result<()> {
        let dest = self.inside(abs);
        if let Some(p) = dest.parent() {
            fs::create_dir_all(p)?;
        }
        fs::write(&dest, data)?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
        self.added.insert(abs.to_path_buf());
        // Only programs need their libraries followed: kernel modules are
        // ELF too, and written here without an execute bit.
        if mode & 0o111 != 0 && data.starts_with(b"\x7fELF") {
            self.elves.push(abs.to_path_buf());
        }
        Ok(())
    }

    pub fn link(&mut self, abs: &Path, target: &str) -> Result<()> {
        let dest = self.inside(abs);
        if fs::symlink_metadata(&dest).is_ok() {
            return Ok(());
        }
        if let Some(p) = dest.parent() {
            fs::create_dir_all(p)?;
        }
        symlink(target, &dest)?;
        self.added.insert(abs.to_path_buf());
        Ok(())
    }

    pub fn mkdir(&self, abs: &Path) -> Result<()> {
        Ok(fs::create_dir_all(self.inside(abs))?)
    }

    /// Whether something is at `abs` inside (following the tree's own links).
    pub fn has(&self, abs: &Path) -> bool {
        let mut p = self.root.clone();
        for c in abs.components() {
            if let Component::Normal(n) = c {
                p.push(n);
                if let Ok(t) = fs::read_link(&p) {
                    let t = if t.is_absolute() {
                        self.inside(&t)
                    } else {
                        p.parent().unwrap_or(&self.root).join(t)
                    };
                    p = t;
                }
            }
        }
        p.exists()
    }

    pub fn host_path(&self, abs: &Path) -> PathBuf {
        self.on_host(abs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_usr_symlinks_are_kept() {
        let host = tempfile::tempdir().unwrap();
        let h = host.path();
        fs::create_dir_all(h.join("usr/bin")).unwrap();
        fs::create_dir_all(h.join("usr/sbin")).unwrap();
        symlink("usr/bin", h.join("bin")).unwrap();
        symlink("usr/sbin", h.join("sbin")).unwrap();
        fs::write(h.join("usr/bin/kmod"), b"kmod").unwrap();
        symlink("/bin/kmod", h.join("usr/sbin/modprobe")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut t = Tree::new(out.path(), h);
        let real = t.add_host(Path::new("/sbin/modprobe")).unwrap();
        assert_eq!(real, Path::new("/usr/bin/kmod"));
        let o = out.path();
        assert_eq!(
            fs::read_link(o.join("sbin")).unwrap(),
            Path::new("usr/sbin")
        );
        assert_eq!(fs::read_link(o.join("bin")).unwrap(), Path::new("usr/bin"));
        assert_eq!(
            fs::read_link(o.join("usr/sbin/modprobe")).unwrap(),
            Path::new("/bin/kmod")
        );
        assert_eq!(fs::read(o.join("usr/bin/kmod")).unwrap(), b"kmod");
        assert!(t.has(Path::new("/sbin/modprobe")));
        assert!(!t.has(Path::new("/sbin/insmod")));
    }

    #[test]
    fn directories_come_whole_and_missing_paths_fail() {
        let host = tempfile::tempdir().unwrap();
        let h = host.path();
        fs::create_dir_all(h.join("usr/lib/udev/rules.d")).unwrap();
        fs::write(h.join("usr/lib/udev/rules.d/50-a.rules"), b"a").unwrap();
        fs::write(h.join("usr/lib/udev/rules.d/60-b.rules"), b"b").unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut t = Tree::new(out.path(), h);
        t.add_host(Path::new("/usr/lib/udev/rules.d")).unwrap();
        assert!(out.path().join("usr/lib/udev/rules.d/60-b.rules").is_file());
        let err = t.add_host(Path::new("/usr/bin/nope")).unwrap_err();
        assert!(format!("{err:#}").contains("/usr/bin/nope is not on this system"));
    }
}
