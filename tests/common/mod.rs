//! Helpers for integration tests that run as root on disk images attached to
//! loop devices. Every resource is released in Drop, also when a test panics.
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]
pub mod qemu;
pub mod tmux;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
/// Loop devices are a machine-wide resource: tests take turns, across
/// threads and processes alike (two test runs at once would race for them).
pub struct Turn(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

pub fn serial() -> Turn {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/bmr-tests.lock")
        .expect("opening /run/bmr-tests.lock");
    Turn(
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("locking /run/bmr-tests.lock"),
    )
}

pub fn require_root() {
    assert!(
        nix_is_root(),
        "this integration test needs root (loop devices, mkfs, mount); run `make test` as root"
    );
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("utf-8 output")
}

pub fn sh(line: &str) -> String {
    stdout(Command::new("sh").arg("-c").arg(line))
}

pub fn bmr() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bmr"))
}

/// A disk image attached to a loop device with its partitions made known
/// to the kernel through BLKPG (`partx -a`).
pub struct LoopDisk {
    pub dev: String,
}

impl LoopDisk {
    pub fn attach(image: &Path) -> LoopDisk {
        let dev = stdout(Command::new("losetup").args(["-f", "--show"]).arg(image))
            .trim()
            .to_string();
        let disk = LoopDisk { dev };
        // Stale partitions of an earlier user of this loop device.
        let _ = Command::new("partx").arg("-d").arg(&disk.dev).output();
        let _ = Command::new("partx").arg("-a").arg(&disk.dev).output();
        disk
    }

    pub fn part(&self, n: u32) -> String {
        format!("{}p{n}", self.dev)
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("partx").arg("-d").arg(&self.dev).output();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
    }
}

pub struct Mounted {
    pub dir: PathBuf,
}

impl Mounted {
    pub fn new(dev: &str, dir: &Path, args: &[&str]) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount").args(args).arg(dev).arg(dir));
        Mounted {
            dir: dir.to_path_buf(),
        }
    }

    /// A FUSE mount (ntfs-3g) instead of a kernel one.
    pub fn ntfs3g(dev: &str, dir: &Path) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("ntfs-3g").args(["-o", "ro"]).arg(dev).arg(dir));
        Mounted {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).output();
    }
}

/// `df`'s idea of used bytes.
pub fn df_used(dir: &Path) -> u64 {
    let out = stdout(Command::new("df").args(["-B1", "--output=used"]).arg(dir));
    out.lines().nth(1).unwrap().trim().parse().unwrap()
}

/// `blkid -o export` as key/value pairs.
pub fn blkid(dev: &str) -> std::collections::HashMap<String, String> {
    stdout(Command::new("blkid").args(["-p", "-o", "export", dev]))
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

pub fn make_disk(kind: &str, image: &Path) {
    run(Command::new(repo().join("scripts/make-disk"))
        .arg(kind)
        .arg(image));
}

/// A test system disk (scripts/make-disk) attached, with its root mounted.
/// Fields drop in declaration order: the root is unmounted before the disk
/// is detached.
pub struct TestSystem {
    pub root: Mounted,
    pub disk: LoopDisk,
    pub image: PathBuf,
}

pub fn test_system(kind: &str, dir: &Path) -> TestSystem {
    let image = dir.join(format!("{kind}.img"));
    make_disk(kind, &image);
    let disk = LoopDisk::attach(&image);
    let root = Mounted::new(
        &disk.part(if kind == "gpt" { 2 } else { 1 }),
        &dir.join("root"),
        &[],
    );
    TestSystem { root, disk, image }
}

impl TestSystem {
    /// `bmr save --catalog none` of this system onto `medium`.
    pub fn save(&self, medium: &Path) {
        run(bmr()
            .args(["save", "--catalog", "none", "--medium"])
            .arg(medium)
            .arg("--system-root")
            .arg(&self.root.dir)
            .args(["--disk", &self.disk.dev]));
    }
}

/// Stdout of a command that must succeed.
pub fn ok(out: Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Stderr of a command that must fail cleanly (an error, not a panic).
pub fn refused(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "should fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// BLAKE3 of a whole file: "nothing was written" checks.
pub fn file_hash(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap())
        .to_hex()
        .to_string()
}
