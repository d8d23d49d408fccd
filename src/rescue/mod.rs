//! `bmr mkrescue`: the rescue initramfs (bmr as /init, udev, kmod,
//! busybox, the recovery tools, a storage stack of kernel modules) and the
//! hybrid ISO around it. What goes in is declared in `initramfs/`, built
//! into this binary so a backed-up system can make its own rescue media.

pub mod cli;
pub mod cpio;
pub mod elf;
pub mod iso;
pub mod modules;
pub mod tree;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use tree::Tree;

pub const FILES_LIST: &str = include_str!("../../initramfs/files.list");
pub const MODULES_LIST: &str = include_str!("../../initramfs/modules.list");
pub const GRUB_CFG: &str = include_str!("../../initramfs/grub.cfg");
/// Small configuration files, copied verbatim.
const ROOTFS: &[(&str, &str)] = &[
    (
        "/etc/passwd",
        include_str!("../../initramfs/rootfs/etc/passwd"),
    ),
    (
        "/etc/group",
        include_str!("../../initramfs/rootfs/etc/group"),
    ),
    (
        "/etc/profile",
        include_str!("../../initramfs/rootfs/etc/profile"),
    ),
    (
        "/etc/os-release",
        include_str!("../../initramfs/rootfs/etc/os-release"),
    ),
];

/// The lines of a list file without comments and blanks.
pub fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Kernel and module tree to build for.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    pub modules: PathBuf,
    pub release: String,
}

impl Kernel {
    /// `--kernel`/`--modules`, else the newest /boot/vmlinuz-* with modules.
    pub fn find(image: Option<&Path>, modules: Option<&Path>) -> Result<Kernel> {
        let image = match image {
            Some(i) => i.to_path_buf(),
            None => newest_kernel()?,
        };
        let name = image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let release = match modules {
            Some(m) => m
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            None => name
                .strip_prefix("vmlinuz-")
                .ok_or_else(|| {
                    anyhow!(
                        "cannot tell the kernel release from {}; name its modules with --modules DIR",
                        image.display()
                    )
                })?
                .to_string(),
        };
        let modules = match modules {
            Some(m) => m.to_path_buf(),
            None => {
                // A kernel unpacked beside its modules (ROOT/boot, ROOT/lib/modules).
                let root = image
                    .parent()
                    .and_then(Path::parent)
                    .unwrap_or(Path::new("/"));
                let beside = root.join("lib/modules").join(&release);
                if beside.join("modules.dep").is_file() {
                    beside
                } else {
                    Path::new("/lib/modules").join(&release)
                }
            }
        };
        if !image.is_file() {
            bail!("kernel image {} does not exist", image.display());
        }
        if !modules.join("modules.dep").is_file() {
            bail!(
                "no modules.dep in {}: name the kernel's module tree with --modules DIR",
                modules.display()
            );
        }
        Ok(Kernel {
            image,
            modules,
            release,
        })
    }
}

fn newest_kernel() -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .is_some_and(|r| {
                    Path::new("/lib/modules")
                        .join(r)
                        .join("modules.dep")
                        .is_file()
                })
        })
        .collect();
    found.sort_by_key(|p| {
        p.to_string_lossy()
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok())
            .collect::<Vec<_>>()
    });
    found.pop().ok_or_else(|| {
        anyhow!(
            "no kernel with modules in /boot and /lib/modules; install linux-image-amd64 \
             or name one with --kernel FILE --modules DIR"
        )
    })
}

pub struct Built {
    pub files: usize,
    pub modules: usize,
    pub firmware: usize,
    pub firmware_missing: Vec<String>,
    pub raw_bytes: u64,
    pub packed_bytes: u64,
    pub left_out: Vec<String>,
}

/// Builds the compressed initramfs at `dest`.
pub fn build_initramfs(kernel: &Kernel, dest: &Path) -> Result<Built> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let stage = tempfile::tempdir_in(parent).context("making a staging directory")?;
    let root = stage.path().join("root");
    fs::create_dir_all(&root)?;
    let mut t = Tree::new(&root, Path::new("/"));
    for d in [
        "/usr/bin",
        "/usr/sbin",
        "/usr/lib",
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/tmp",
        "/root",
    ] {
        t.mkdir(Path::new(d))?;
    }
    t.link(Path::new("/bin"), "usr/bin")?;
    t.link(Path::new("/sbin"), "usr/sbin")?;
    t.link(Path::new("/lib"), "usr/lib")?;
    t.link(Path::new("/lib64"), "usr/lib64")?;

    bmr_itself(&mut t)?;
    // Phase one carries the kernel to the target for phase two; the ISO it
    // came from may be gone by then (direct kernel boot, PXE).
    let image = fs::read(&kernel.image)
        .with_context(|| format!("reading the kernel {}", kernel.image.display()))?;
    t.write(
        Path::new(crate::recover::chain::RESCUE_KERNEL),
        &image,
        0o644,
    )?;
    let mut left_out = Vec::new();
    let list = lines(FILES_LIST);
    t.skip = list
        .iter()
        .filter_map(|l| l.strip_prefix('!'))
        .map(PathBuf::from)
        .collect();
    for line in list.into_iter().filter(|l| !l.starts_with('!')) {
        let (optional, path) = match line.strip_prefix('?') {
            Some(p) => (true, p.to_string()),
            None => (false, line),
        };
        match t.add_host(Path::new(&path)) {
            Ok(_) => {}
            Err(_) if optional => left_out.push(path),
            Err(e) => {
                return Err(e.context(format!(
                    "{path} (initramfs/files.list) is needed; scripts/setup-deps installs it"
                )))
            }
        }
    }
    busybox_applets(&mut t)?;
    for (path, text) in ROOTFS {
        t.write(Path::new(path), text.as_bytes(), 0o644)?;
    }
    t.link(Path::new("/etc/mtab"), "/proc/self/mounts")?;
    let m = modules::install(
        &mut t,
        &kernel.modules,
        &kernel.release,
        &lines(MODULES_LIST),
    )?;
    elf::close(&mut t)?;
    let files = count_files(&root);
    let (raw, packed) = cpio::write(&root, dest, 9)?;
    Ok(Built {
        files,
        modules: m.modules,
        firmware: m.firmware,
        firmware_missing: m.firmware_missing,
        raw_bytes: raw,
        packed_bytes: packed,
        left_out,
    })
}

/// This very binary as /init (and /usr/bin/bmr), without debug info.
fn bmr_itself(t: &mut Tree) -> Result<()> {
    let exe = std::env::current_exe().context("finding the bmr binary")?;
    let dest = t.root.join("init");
    let stripped = Command::new("strip")
        .args(["--strip-debug", "-o"])
        .arg(&dest)
        .arg(&exe)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        fs::copy(&exe, &dest).with_context(|| format!("copying {}", exe.display()))?;
    }
    let data = fs::read(&dest)?;
    t.write(Path::new("/init"), &data, 0o755)?;
    t.link(Path::new("/usr/bin/bmr"), "/init")
}

/// A link to busybox for every applet no real tool already provides.
fn busybox_applets(t: &mut Tree) -> Result<()> {
    let out = crate::tool::run(Command::new("/usr/bin/busybox").arg("--list-full"))
        .context("listing busybox applets (package busybox-static)")?;
    for applet in out.lines() {
        let name = applet.rsplit('/').next().unwrap_or(applet);
        let dir = if applet.contains("sbin/") {
            "/usr/sbin"
        } else {
            "/usr/bin"
        };
        let taken = ["/usr/bin", "/usr/sbin"]
            .iter()
            .any(|d| t.has(&Path::new(d).join(name)));
        if !taken && !name.is_empty() {
            t.link(&Path::new(dir).join(name), "/usr/bin/busybox")?;
        }
    }
    Ok(())
}

fn count_files(root: &Path) -> usize {
    fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let ft = e.file_type();
            if ft.as_ref().is_ok_and(|f| f.is_dir()) {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_drop_comments_and_blanks() {
        assert_eq!(
            lines("# head\n/usr/bin/a  # why\n\n?/opt/b\n"),
            ["/usr/bin/a", "?/opt/b"]
        );
    }

    #[test]
    fn the_shipped_lists_keep_st_out_and_udev_in() {
        assert!(lines(MODULES_LIST).contains(&"!st".to_string()));
        let files = lines(FILES_LIST);
        assert!(files.iter().any(|f| f.ends_with("systemd-udevd")));
        assert!(files.iter().any(|f| f == "/sbin/modprobe"));
        for id in ["guided", "auto", "shell"] {
            assert!(GRUB_CFG.contains(&format!("--id {id}")), "{id}");
        }
    }
}
