//! Recovery end to end, in QEMU (issue 6's scenarios): a real Debian source
//! machine (scripts/build-source-machine) backs itself up with `bmr save`
//! and `bmr backup` while it runs; the rescue system recovers it unattended
//! onto a blank disk (phase one), the target disk boots phase two by itself,
//! and finally the restored machine boots and checks its own files.
//! Serial logs are kept in target/recovery-tests/.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::qemu::*;
use common::*;

struct Machine {
    _dir: tempfile::TempDir,
    kernel: DebianKernel,
    initrd: PathBuf,
    source: PathBuf,
    backup: PathBuf,
    floppy: PathBuf,
    logs: PathBuf,
}

fn keep_log(logs: &Path, name: &str, vm: &Qemu) {
    fs::write(logs.join(format!("{name}.log")), vm.log()).unwrap();
}

/// Boots `cfg` until it powers off or reboots (QEMU runs with -no-reboot)
/// and the console shows every line of `expect`.
fn boot(logs: &Path, name: &str, cfg: &QemuConfig, expect: &[&str], limit: u64) -> f64 {
    let dir = logs.join(name);
    fs::create_dir_all(&dir).unwrap();
    let vm = Qemu::start(&dir, cfg);
    let t = Instant::now();
    let result = vm.wait_exit(Duration::from_secs(limit));
    keep_log(logs, name, &vm);
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    let log = vm.log();
    for want in expect {
        assert!(
            log.contains(want),
            "{name}: no \"{want}\" on the console; last lines:\n{}",
            tail(&log)
        );
    }
    for bad in ["Kernel panic", "internal error", "BMR-RECOVERY-FAILED"] {
        assert!(
            !log.contains(bad),
            "{name}: \"{bad}\" on the console:\n{}",
            tail(&log)
        );
    }
    t.elapsed().as_secs_f64()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(50)..].join("\n")
}

/// The source machine, its backup made from inside it, and the rescue
/// system's kernel and initramfs.
fn machine() -> Machine {
    let kernel = DebianKernel::find().expect("scripts/fetch-debian-kernel unpacks Debian's kernel");
    let logs = repo().join("target/recovery-tests");
    fs::create_dir_all(&logs).unwrap();
    let dir = tempfile::tempdir_in(repo().join("target")).unwrap();
    let d = dir.path();
    let initrd = d.join("initrd.img");
    ok(bmr()
        .arg("mkrescue")
        .arg("--kernel")
        .arg(&kernel.vmlinuz)
        .arg("--initramfs")
        .arg(&initrd)
        .output()
        .unwrap());

    let source = d.join("source.img");
    let t = Instant::now();
    {
        let _turn = serial();
        ok(Command::new(repo().join("scripts/build-source-machine"))
            .arg(&source)
            .arg(env!("CARGO_BIN_EXE_bmr"))
            .output()
            .unwrap());
    }
    eprintln!("source machine built in {:.0} s", t.elapsed().as_secs_f64());

    // The backup disk carries the task the source machine runs at boot.
    let backup = d.join("backup.img");
    fs::File::create(&backup)
        .unwrap()
        .set_len(1536 << 20)
        .unwrap();
    ok(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "BMR-BACKUP"])
        .arg(&backup)
        .output()
        .unwrap());
    let task = d.join("run.sh");
    fs::write(
        &task,
        "set -e\n\
         modprobe floppy\n\
         bmr save --medium /dev/fd0 --disk /dev/vda --driver st\n\
         bmr backup --medium /dev/fd0 --to /mnt/backup/repo\n\
         echo BACKUP-OK\n",
    )
    .unwrap();
    ok(Command::new("debugfs")
        .args(["-w", "-R"])
        .arg(format!("write {} run.sh", task.display()))
        .arg(&backup)
        .output()
        .unwrap());
    let floppy = d.join("floppy.img");
    ok(Command::new("mkfs.fat")
        .args(["-n", "BMR-STATE", "-C"])
        .arg(&floppy)
        .arg("1440")
        .output()
        .unwrap());

    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .disk(
            Disk::new(&source, Interface::Virtio)
                .snapshot()
                .bootindex(0),
        )
        .disk(Disk::new(&backup, Interface::Virtio))
        .floppy(&floppy);
    let secs = boot(
        &logs,
        "source-backup",
        &cfg,
        &[
            "SYSTEM-CHECKSUMS-OK",
            "DATA-CHECKSUMS-OK",
            "BACKUP-OK",
            "MACHINE-TASK-DONE rc=0",
        ],
        600,
    );
    eprintln!("source machine backed itself up in {secs:.0} s");
    Machine {
        _dir: dir,
        kernel,
        initrd,
        source,
        backup,
        floppy,
        logs,
    }
}

fn blank(dir: &Path, name: &str, bytes: u64) -> PathBuf {
    let p = dir.join(name);
    fs::File::create(&p).unwrap().set_len(bytes).unwrap();
    p
}

fn all_zero(path: &Path) -> bool {
    use std::io::Read;
    let mut f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return true;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return false;
        }
    }
}

#[test]
fn recovery_scenarios() {
    require_root();
    if let Some(why) = vm_tools_missing() {
        panic!("{why}: scripts/setup-deps installs it");
    }
    let m = machine();
    let work = tempfile::tempdir_in(repo().join("target")).unwrap();
    let rescue = |append: &str, target: &Path| {
        QemuConfig::new()
            .memory_mb(1024)
            .kernel(
                &m.kernel.vmlinuz,
                Some(&m.initrd),
                &format!(
                    "console=ttyS0,115200 bmr.mode=auto bmr.source=file:LABEL=BMR-BACKUP:/repo {append}"
                ),
            )
            .disk(Disk::new(target, Interface::Virtio))
            .disk(Disk::new(&m.backup, Interface::Virtio).snapshot())
            .floppy(&m.floppy)
    };

    // Scenario 6: unattended without bmr.wipe refuses and writes nothing.
    let target = blank(work.path(), "refused.img", 1 << 30);
    let cfg = rescue("", &target);
    let dir = m.logs.join("no-wipe");
    fs::create_dir_all(&dir).unwrap();
    let vm = Qemu::start(&dir, &cfg);
    let seen = vm.wait_for("unattended recovery stopped", Duration::from_secs(300));
    keep_log(&m.logs, "no-wipe", &vm);
    seen.unwrap();
    assert!(
        vm.log().contains("allow that with bmr.wipe="),
        "{}",
        tail(&vm.log())
    );
    drop(vm);
    assert!(
        all_zero(&target),
        "the refused run wrote to the target disk"
    );

    // Scenario 1: BIOS/MBR onto a disk of the same size, from the file
    // source, unattended, through both phases.
    let target = blank(
        work.path(),
        "target.img",
        fs::metadata(&m.source).unwrap().len(),
    );
    let one = boot(
        &m.logs,
        "phase-one",
        &rescue("bmr.wipe=all", &target),
        &["phase two installed on /dev/vda", "BMR-PHASE-ONE-DONE"],
        900,
    );
    // No ISO, no medium: the target disk boots phase two by itself.
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .disk(Disk::new(&target, Interface::Virtio))
        .disk(Disk::new(&m.backup, Interface::Virtio).snapshot());
    let two = boot(
        &m.logs,
        "phase-two",
        &cfg,
        &[
            "recovery of srcmachine: phase two",
            "BMR-RECOVERY-DONE status=ok",
        ],
        900,
    );
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .disk(Disk::new(&target, Interface::Virtio));
    let restored = boot(
        &m.logs,
        "restored",
        &cfg,
        &[
            "SOURCE-MACHINE srcmachine up",
            "SYSTEM-CHECKSUMS-OK",
            "DATA-CHECKSUMS-OK",
        ],
        300,
    );
    eprintln!(
        "bios-same-size: phase one {one:.0} s, phase two {two:.0} s, total {:.0} s (restored machine booted in {restored:.0} s)",
        one + two
    );
    let _ = &m.source;
}
