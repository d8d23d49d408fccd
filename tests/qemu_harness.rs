//! The VM harness itself (tests/common/qemu.rs): Debian's kernel boots in
//! QEMU with a tiny busybox initramfs, and the guest's `st` driver writes
//! records to tgt's virtual tape over iSCSI and reads them back.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::qemu::{vm_tools_missing, DebianKernel, Qemu, QemuConfig, Tgt};
use common::require_root;

/// The guest's script: modules in dependency order, then the tape round
/// trip. Markers are printed only after checks (a missing /dev/nst0 would
/// otherwise become a regular file on devtmpfs and "work").
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp
for m in $(cat /modules); do
  insmod /lib/modules/$m || echo "BMR-INSMOD-FAILED $m"
done
i=0
while [ ! -c /dev/nst0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if [ ! -c /dev/nst0 ]; then
  echo "BMR-TAPE-MISSING"; ls /sys/bus/scsi/devices /sys/class/scsi_tape; poweroff -f
fi
echo "BMR-TAPE-DEVICE $(cat /sys/class/scsi_tape/nst0/dev) type=$(cat /sys/class/scsi_tape/nst0/device/type) $(cat /sys/class/scsi_tape/nst0/device/vendor) $(cat /sys/class/scsi_tape/nst0/device/model)"
dd if=/dev/urandom of=/tmp/out bs=10240 count=8 2>/dev/null
dd if=/tmp/out of=/dev/nst0 bs=10240 || echo "BMR-TAPE-WRITE-FAILED"
mt -f /dev/nst0 rewind || echo "BMR-TAPE-REWIND-FAILED"
dd if=/dev/nst0 of=/tmp/in bs=10240 || echo "BMR-TAPE-READ-FAILED"
echo "BMR-TAPE-WROTE $(md5sum < /tmp/out)"
echo "BMR-TAPE-READ $(md5sum < /tmp/in)"
cmp /tmp/out /tmp/in && echo "BMR-TAPE-ROUNDTRIP-OK" || echo "BMR-TAPE-ROUNDTRIP-DIFFERS"
poweroff -f
"#;

/// Module files (relative to lib/modules/<version>) that `names` need,
/// dependencies first, from modules.dep.
fn modules_in_load_order(modules: &Path, names: &[&str]) -> Vec<String> {
    let dep: HashMap<String, Vec<String>> = fs::read_to_string(modules.join("modules.dep"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (m, deps) = l.split_once(':')?;
            Some((
                m.into(),
                deps.split_whitespace().map(String::from).collect(),
            ))
        })
        .collect();
    let name_of = |p: &str| {
        p.rsplit('/')
            .next()
            .unwrap()
            .trim_end_matches(".ko")
            .replace('-', "_")
    };
    fn add(m: &str, dep: &HashMap<String, Vec<String>>, order: &mut Vec<String>) {
        if order.iter().any(|o| o == m) {
            return;
        }
        // modules.dep lists a module's dependencies with the deepest last.
        for d in dep[m].iter().rev() {
            add(d, dep, order);
        }
        order.push(m.into());
    }
    let mut order = Vec::new();
    for n in names {
        let m = dep
            .keys()
            .find(|k| name_of(k) == *n)
            .unwrap_or_else(|| panic!("no module {n} in modules.dep"));
        add(m, &dep, &mut order);
    }
    order
}

/// Appends one entry of a newc ("070701") cpio archive.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// A throwaway initramfs: static busybox, `INIT`, and the virtio-scsi and
/// st modules with their dependencies.
fn tape_test_initramfs(kernel: &DebianKernel, dest: &Path) {
    let mods = modules_in_load_order(&kernel.modules, &["virtio_pci", "virtio_scsi", "st"]);
    let mut cpio = Vec::new();
    let mut ino = 0;
    let mut entry = |cpio: &mut Vec<u8>, name: &str, mode: u32, rdev, data: &[u8]| {
        ino += 1;
        cpio_entry(cpio, ino, name, mode, rdev, data);
    };
    for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
        entry(&mut cpio, d, 0o040755, (0, 0), b"");
    }
    entry(&mut cpio, "dev/console", 0o020600, (5, 1), b"");
    let busybox = fs::read("/bin/busybox").expect("busybox-static's /bin/busybox");
    entry(&mut cpio, "bin/busybox", 0o100755, (0, 0), &busybox);
    entry(&mut cpio, "init", 0o100755, (0, 0), INIT.as_bytes());
    let mut list = String::new();
    for m in &mods {
        let file = m.rsplit('/').next().unwrap();
        let data = fs::read(kernel.modules.join(m)).unwrap();
        entry(
            &mut cpio,
            &format!("lib/modules/{file}"),
            0o100644,
            (0, 0),
            &data,
        );
        list.push_str(file);
        list.push('\n');
    }
    entry(&mut cpio, "modules", 0o100644, (0, 0), list.as_bytes());
    entry(&mut cpio, "TRAILER!!!", 0, (0, 0), b"");
    fs::write(dest, cpio).unwrap();
}

fn line_after<'a>(log: &'a str, prefix: &str) -> Option<&'a str> {
    log.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
        .map(str::trim)
}

#[test]
fn qemu_harness_tape_roundtrip_bios() {
    if let Some(missing) = vm_tools_missing() {
        println!("skipped: not installed: {missing}");
        return;
    }
    if !Path::new("/bin/busybox").is_file() {
        println!("skipped: no /bin/busybox (busybox-static)");
        return;
    }
    let Some(kernel) = DebianKernel::find() else {
        println!("skipped: no Debian kernel (scripts/fetch-debian-kernel)");
        return;
    };
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let initrd: PathBuf = dir.path().join("initrd.cpio");
    tape_test_initramfs(&kernel, &initrd);

    let tgt = Tgt::start(dir.path(), 64);
    let vm = Qemu::start(
        dir.path(),
        &QemuConfig::new()
            .kernel(
                &kernel.vmlinuz,
                Some(&initrd),
                "console=ttyS0 panic=-1 quiet",
            )
            .tape(&tgt),
    );
    let took = vm
        .wait_for("BMR-TAPE-ROUNDTRIP", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e}"));
    vm.wait_exit(Duration::from_secs(30)).unwrap();
    let log = vm.log();
    println!("tape round trip after {took:.1?} (QEMU started to marker)");

    assert!(log.contains("BMR-TAPE-ROUNDTRIP-OK"), "{log}");
    assert!(!log.contains("BMR-INSMOD-FAILED"), "{log}");
    let device = line_after(&log, "BMR-TAPE-DEVICE").unwrap();
    assert!(device.starts_with("9:128 type=1"), "{device}");
    let wrote = line_after(&log, "BMR-TAPE-WROTE").unwrap();
    let read = line_after(&log, "BMR-TAPE-READ").unwrap();
    assert_eq!(wrote, read);
    // The records went through tgt into the tape image.
    let tape = tgt.show_tape();
    assert_eq!(
        tape.lines()
            .filter(|l| l.contains("Uncompressed data") && l.ends_with("sz 10240"))
            .count(),
        8,
        "{tape}"
    );
}
