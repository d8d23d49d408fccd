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
    // Declared first: dropped (tgtd stopped) before its directory goes.
    tgt: Tgt,
    _dir: tempfile::TempDir,
    kernel: DebianKernel,
    initrd: PathBuf,
    source: PathBuf,
    backup: PathBuf,
    /// The medium whose manifest names the images in the backup disk's repository.
    medium_file: PathBuf,
    /// The medium whose manifest names the tape set (written last, with st).
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
         modprobe st\n\
         bmr save --medium /dev/fd0 --disk /dev/vda --driver st\n\
         bmr backup --medium /dev/fd0 --to /mnt/backup/repo\n\
         dd if=/dev/fd0 of=/mnt/backup/medium-file.img bs=18k\n\
         bmr save --medium /dev/fd0 --disk /dev/vda --driver st\n\
         bmr backup --medium /dev/fd0 --to tape:/dev/nst0\n\
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

    let tgt = Tgt::start(d, 800);
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .disk(
            Disk::new(&source, Interface::Virtio)
                .snapshot()
                .bootindex(0),
        )
        .disk(Disk::new(&backup, Interface::Virtio))
        .floppy(&floppy)
        .tape(&tgt);
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
    let medium_file = d.join("medium-file.img");
    ok(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump medium-file.img {}", medium_file.display()))
        .arg(&backup)
        .output()
        .unwrap());
    assert!(medium_file.metadata().unwrap().len() > 0);
    Machine {
        tgt,
        medium_file,
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
    // `make demo` runs only the dissimilar-hardware recovery.
    let only_dissimilar = std::env::var("BMR_RECOVERY_ONLY").as_deref() == Ok("dissimilar");
    let mut summary = Vec::new();
    if !only_dissimilar {
        summary.push(same_size(&m, work.path()));
    }
    summary.push(dissimilar(&m, work.path()));
    let text = summary.join("\n");
    eprintln!("\n{text}");
    fs::write(m.logs.join("summary.txt"), format!("{text}\n")).unwrap();
}

/// The rescue system booted unattended with the file source, a target disk,
/// the backup disk and the medium whose manifest names the file images.
fn rescue(m: &Machine, append: &str, target: &Path) -> QemuConfig<'static> {
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
        .floppy(&m.medium_file)
}

/// Scenarios 6 and 1: refused without bmr.wipe; then BIOS/MBR onto a disk
/// of the same size from the file source.
fn same_size(m: &Machine, work: &Path) -> String {
    // Scenario 6: unattended without bmr.wipe refuses and writes nothing.
    let target = blank(work, "refused.img", 1 << 30);
    let cfg = rescue(m, "", &target);
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
    let target = blank(work, "target.img", fs::metadata(&m.source).unwrap().len());
    let one = boot(
        &m.logs,
        "phase-one",
        &rescue(m, "bmr.wipe=all", &target),
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
    format!(
        "same disk size, file source (BIOS/MBR, virtio): phase one {one:.0} s, phase two {two:.0} s, total {:.0} s; the restored machine booted and verified its files in {restored:.0} s",
        one + two
    )
}

/// Scenarios 2 (BIOS variant) and 5: from the tape onto a larger disk
/// behind another controller, with a power cut in phase two.
fn dissimilar(m: &Machine, work: &Path) -> String {
    // Scenario 2 (BIOS variant): onto a larger disk behind another
    // controller (virtio before, SATA now), everything from the tape, the
    // data volume in phase two with the st driver from the medium; the
    // power is cut while phase two restores, and it resumes.
    let target = blank(work, "sata.img", 2 << 30);
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .kernel(
            &m.kernel.vmlinuz,
            Some(&m.initrd),
            "console=ttyS0,115200 bmr.mode=auto bmr.source=tape:/dev/nst0 bmr.wipe=all",
        )
        .disk(Disk::new(&target, Interface::Sata))
        .floppy(&m.floppy)
        .tape(&m.tgt);
    let one = boot(
        &m.logs,
        "tape-phase-one",
        &cfg,
        &[
            "driver st loaded from the medium",
            "phase two installed on /dev/sda",
            "BMR-PHASE-ONE-DONE",
        ],
        900,
    );
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .disk(Disk::new(&target, Interface::Sata))
        .tape(&m.tgt);
    let dir = m.logs.join("tape-phase-two-cut");
    fs::create_dir_all(&dir).unwrap();
    let t = Instant::now();
    let vm = Qemu::start(&dir, &cfg);
    let cut = vm.wait_for("restoring /dev/sda2", Duration::from_secs(600));
    keep_log(&m.logs, "tape-phase-two-cut", &vm);
    cut.unwrap();
    drop(vm); // the power cut
    let cut_after = t.elapsed().as_secs_f64();
    let two = boot(
        &m.logs,
        "tape-phase-two",
        &cfg,
        &[
            "resuming phase two after an interruption",
            "driver st loaded from the medium",
            "hardware: storage: disk0 was on virtio, is now on",
            "adapted: /etc/fstab",
            "rebuilding the initramfs with the system's own update-initramfs",
            "BMR-RECOVERY-DONE status=ok",
        ],
        900,
    );
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .disk(Disk::new(&target, Interface::Sata));
    let restored = boot(
        &m.logs,
        "tape-restored",
        &cfg,
        &[
            "SOURCE-MACHINE srcmachine up on /dev/sda1",
            "SYSTEM-CHECKSUMS-OK",
            "DATA-CHECKSUMS-OK",
        ],
        300,
    );
    format!(
        "larger SATA disk, tape source, power cut in phase two (BIOS/MBR, virtio -> SATA): phase one {one:.0} s, phase two {:.0} s (cut after {cut_after:.0} s, resumed and finished in {two:.0} s), total {:.0} s; the restored machine booted and verified its files in {restored:.0} s",
        cut_after + two,
        one + cut_after + two
    )
}
