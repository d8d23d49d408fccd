//! `bmr mkrescue`: the initramfs holds what the rescue system runs, every
//! program starts inside it (so its libraries are all there), the storage
//! modules resolve through modprobe, and the tape driver is left out.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn chroot(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new("chroot")
        .arg(root)
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin")
        .output()
        .unwrap()
}

#[test]
fn initramfs_carries_a_working_rescue_system() {
    require_root();
    let kernel = common::qemu::DebianKernel::find()
        .expect("scripts/fetch-debian-kernel unpacks Debian's kernel");
    let kver = kernel.version.as_str();
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.img");
    let out = common::qemu::mkrescue(&kernel, &initrd, None);
    assert!(out.contains("kernel modules"), "{out}");

    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    sh(&format!(
        "cd {} && zstd -dc {} | cpio -idm --quiet",
        root.display(),
        initrd.display()
    ));
    let listing = sh(&format!("cd {} && find . | sort", root.display()));
    for must in [
        "./init",
        "./dev/console",
        "./usr/lib/udev/hwdb.bin",
        "./usr/lib/udev/rules.d/80-drivers.rules",
        "./usr/lib/systemd/systemd-udevd",
        "./usr/bin/busybox",
        "./usr/sbin/mkntfs",
        "./usr/sbin/grub-install",
        &format!("./usr/lib/modules/{kver}/modules.dep.bin"),
        &format!("./usr/lib/modules/{kver}/kernel/drivers/block/virtio_blk.ko"),
        &format!("./usr/lib/modules/{kver}/kernel/drivers/block/floppy.ko"),
    ] {
        assert!(listing.lines().any(|l| l == must), "{must} missing");
    }
    assert!(
        !listing.contains("/st.ko"),
        "st must come from the recovery medium, not the initramfs"
    );
    // /lib/udev and /sbin/modprobe as on Debian 12, through merged /usr.
    assert_eq!(
        std::fs::read_link(root.join("lib")).unwrap(),
        Path::new("usr/lib")
    );
    assert!(root.join("lib/udev/rules.d").is_dir());

    // Every program in the tree loads inside it alone: the dynamic loader
    // of the tree lists each ELF's libraries and fails on a missing one.
    let elves = sh(&format!(
        "cd {} && find . -type f ! -name '*.ko' -exec sh -c 'head -c4 \"$1\" | grep -q ELF && echo \"$1\"' _ {{}} \\;",
        root.display()
    ));
    let mut checked = 0;
    for elf in elves.lines() {
        let path = elf.trim_start_matches('.');
        let out = chroot(&root, &["/lib64/ld-linux-x86-64.so.2", "--list", path]);
        let text = String::from_utf8_lossy(&out.stdout);
        // Static programs and shared objects without an interpreter say so; fine.
        assert!(
            !text.contains("not found"),
            "{path} misses libraries in the initramfs:\n{text}"
        );
        checked += 1;
    }
    assert!(checked > 30, "only {checked} ELF files found");

    // Real runs inside the tree.
    for cmd in [
        vec!["/init", "--version"],
        vec!["udevadm", "--version"],
        vec!["mkfs.ext4", "-V"],
        vec!["sh", "-c", "echo shell-ok"],
        // GNU options bmr passes when restoring file by file and for phase
        // two's kernel: busybox's applets would refuse them.
        vec![
            "cp",
            "-a",
            "--sparse=always",
            "--no-target-directory",
            "/etc",
            "/tmp/etc-copy",
        ],
        vec!["test", "-s", "/usr/lib/bmr/vmlinuz"],
    ] {
        let out = chroot(&root, &cmd);
        assert!(
            out.status.success(),
            "{cmd:?} in the initramfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dry = chroot(&root, &["modprobe", "-n", "-v", "-S", kver, "virtio_scsi"]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        text.contains("virtio_scsi.ko") && text.contains("scsi_mod.ko"),
        "modprobe resolves dependencies from the new modules.dep: {text}"
    );
    let st = chroot(&root, &["modprobe", "-n", "-S", kver, "st"]);
    assert!(
        !st.status.success(),
        "st must not be loadable from the initramfs"
    );
}
