//! Recovery end to end, in QEMU (issue 6's scenarios): real Debian source
//! machines (scripts/build-source-machine, one BIOS/MBR, one UEFI/GPT) back
//! themselves up with `bmr save` and `bmr backup` while they run; the rescue
//! system recovers them unattended onto blank disks (phase one), the target
//! disk boots phase two by itself, and finally the restored machine boots
//! from it and checks its own files.
//!
//! `make test` runs scenarios 6, 1 and 2 (with 5); BMR_RECOVERY_ALL=1 (`make
//! qemu-test`) adds BIOS onto SATA; BMR_RECOVERY_ONLY=dissimilar (`make
//! demo`) runs scenario 2 alone. Serial logs and summary.txt are kept in
//! target/recovery-tests/.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::qemu::*;
use common::*;

/// A source machine after it backed itself up.
struct Source {
    image: PathBuf,
    /// The recovery medium `bmr save` wrote, a 1.44 MB floppy image.
    floppy: PathBuf,
    /// The disk labelled BMR-BACKUP: the task the machine ran, and for the
    /// file backup the repository in /repo.
    backup: PathBuf,
}

struct Machines {
    // Declared first: dropped (tgtd stopped) before its directory goes.
    tgt: Tgt,
    dir: tempfile::TempDir,
    kernel: DebianKernel,
    initrd: PathBuf,
    logs: PathBuf,
}

fn keep_log(logs: &Path, name: &str, vm: &Qemu) {
    fs::write(logs.join(format!("{name}.log")), vm.log()).unwrap();
}

/// Boots `cfg` until it powers off or reboots (QEMU runs with -no-reboot)
/// and checks the console showed every line of `expect`; its seconds.
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

fn machines() -> Machines {
    let kernel = DebianKernel::find().expect("scripts/fetch-debian-kernel unpacks Debian's kernel");
    let logs = repo().join("target/recovery-tests");
    fs::create_dir_all(&logs).unwrap();
    let dir = tempfile::tempdir_in(repo().join("target")).unwrap();
    let initrd = dir.path().join("initrd.img");
    mkrescue(&kernel, &initrd, None);
    let tgt = Tgt::start(dir.path(), 800);
    Machines {
        tgt,
        dir,
        kernel,
        initrd,
        logs,
    }
}

/// Builds a source machine and boots it once: it runs `task` (bmr save and
/// bmr backup) from its backup disk, as an administrator would.
fn source(ms: &Machines, variant: &str, task: &str, tape: bool) -> Source {
    let firmware = variant.split('-').next().unwrap();
    let d = ms.dir.path().join(variant);
    fs::create_dir_all(&d).unwrap();
    let image = d.join("source.img");
    let t = Instant::now();
    {
        let _turn = serial();
        ok(Command::new(repo().join("scripts/build-source-machine"))
            .arg(&image)
            .arg(env!("CARGO_BIN_EXE_bmr"))
            .arg(variant)
            .output()
            .unwrap());
    }
    eprintln!(
        "{variant} source machine built in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let data = (variant == "bios-two-disks").then(|| d.join("source-data.img"));
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
    let script = d.join("run.sh");
    fs::write(
        &script,
        format!("set -e\nmodprobe floppy\n{task}\necho BACKUP-OK\n"),
    )
    .unwrap();
    ok(Command::new("debugfs")
        .args(["-w", "-R"])
        .arg(format!("write {} run.sh", script.display()))
        .arg(&backup)
        .output()
        .unwrap());
    // A third-party program for phase two, as seed 000's [COMMANDS] allows.
    let commands = d.join("commands.toml");
    fs::write(
        &commands,
        "[[commands]]\nsequence = 10\nphase = 2\ncritical = false\ntimeout_secs = 60\n\
         program = \"/bin/sh\"\n\
         args = [\"-c\", \"echo third-party restore ran in $BMR_TARGET > $BMR_TARGET/var/log/third-party.txt && cat $BMR_TARGET/var/log/third-party.txt\"]\n\
         on_error = \"continue\"\ndescription = \"a third-party restore program\"\n",
    )
    .unwrap();
    ok(Command::new("debugfs")
        .args(["-w", "-R"])
        .arg(format!("write {} commands.toml", commands.display()))
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
    let mut cfg = QemuConfig::new()
        .memory_mb(1024)
        .disk(Disk::new(&image, Interface::Virtio).snapshot().bootindex(0));
    if let Some(data) = &data {
        cfg = cfg.disk(Disk::new(data, Interface::Virtio).snapshot());
    }
    cfg = cfg
        .disk(Disk::new(&backup, Interface::Virtio))
        .floppy(&floppy);
    if firmware == "uefi" {
        cfg = cfg.uefi();
    }
    if tape {
        cfg = cfg.tape(&ms.tgt);
    }
    let secs = boot(
        &ms.logs,
        &format!("{variant}-source-backup"),
        &cfg,
        &[
            "SYSTEM-CHECKSUMS-OK",
            "DATA-CHECKSUMS-OK",
            "BACKUP-OK",
            "MACHINE-TASK-DONE rc=0",
        ],
        600,
    );
    eprintln!("{variant} source machine backed itself up in {secs:.0} s");
    Source {
        image,
        floppy,
        backup,
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
    let only = std::env::var("BMR_RECOVERY_ONLY").ok();
    let all = std::env::var_os("BMR_RECOVERY_ALL").is_some();
    let ms = machines();
    let work = tempfile::tempdir_in(repo().join("target")).unwrap();
    let mut summary = Vec::new();
    // BMR_RECOVERY_ONLY=refused|guided|file|dissimilar runs one group.
    let want = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if want("refused") || want("guided") || want("file") {
        let bios = source(
            &ms,
            "bios",
            "bmr save --medium /dev/fd0 --disk /dev/vda --commands /mnt/backup/commands.toml\n\
             bmr backup --medium /dev/fd0 --to /mnt/backup/repo",
            false,
        );
        if want("refused") {
            summary.push(refused(&ms, &bios, work.path()));
        }
        if want("guided") {
            summary.push(guided(&ms, &bios, work.path()));
        }
        if want("file") {
            summary.push(from_file(
                &ms,
                &bios,
                work.path(),
                Interface::Virtio,
                1 << 30,
            ));
            // Scenario 3: a smaller disk that still holds the used data; both
            // volumes come back file by file.
            summary.push(from_file(
                &ms,
                &bios,
                work.path(),
                Interface::Virtio,
                640 << 20,
            ));
            if all {
                summary.push(from_file(&ms, &bios, work.path(), Interface::Sata, 2 << 30));
            }
        }
    }
    if all && only.is_none() {
        let two = source(
            &ms,
            "bios-two-disks",
            "bmr save --medium /dev/fd0 --disk /dev/vda,/dev/vdb\n\
             bmr backup --medium /dev/fd0 --to /mnt/backup/repo",
            false,
        );
        summary.push(two_onto_one(&ms, &two, work.path()));
    }
    if want("dissimilar") {
        let uefi = source(
            &ms,
            "uefi",
            "modprobe virtio_scsi\n\
             modprobe st\n\
             for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /dev/nst0 ] && break; sleep 1; done\n\
             bmr save --medium /dev/fd0 --disk /dev/vda --driver st\n\
             bmr backup --medium /dev/fd0 --to tape:/dev/nst0",
            true,
        );
        summary.push(dissimilar(&ms, &uefi, work.path()));
    }
    let text = summary.join("\n");
    eprintln!("\n{text}");
    fs::write(ms.logs.join("summary.txt"), format!("{text}\n")).unwrap();
}

/// The rescue system booted unattended from the file source on the backup
/// disk, with a target disk and the medium in the floppy drive.
fn rescue<'t>(ms: &Machines, src: &Source, append: &str, target: Disk) -> QemuConfig<'t> {
    QemuConfig::new()
        .memory_mb(1024)
        .kernel(
            &ms.kernel.vmlinuz,
            Some(&ms.initrd),
            &format!(
                "console=ttyS0,115200 bmr.mode=auto bmr.source=file:LABEL=BMR-BACKUP:/repo {append}"
            ),
        )
        .disk(target)
        .disk(Disk::new(&src.backup, Interface::Virtio).snapshot())
        .floppy(&src.floppy)
}

/// Scenario 6: unattended without bmr.wipe refuses and writes nothing.
fn refused(ms: &Machines, src: &Source, work: &Path) -> String {
    let target = blank(work, "refused.img", 1 << 30);
    let cfg = rescue(ms, src, "", Disk::new(&target, Interface::Virtio));
    let dir = ms.logs.join("no-wipe");
    fs::create_dir_all(&dir).unwrap();
    let vm = Qemu::start(&dir, &cfg);
    let seen = vm.wait_for("BMR-RECOVERY-REFUSED", Duration::from_secs(300));
    keep_log(&ms.logs, "no-wipe", &vm);
    seen.unwrap();
    assert!(
        vm.log().contains("allow that with bmr.wipe="),
        "{}",
        tail(&vm.log())
    );
    let secs = vm.elapsed().as_secs_f64();
    drop(vm);
    assert!(
        all_zero(&target),
        "the refused run wrote to the target disk"
    );
    format!("no bmr.wipe (BIOS): refused after {secs:.0} s, the target disk still all zeros")
}

/// The operator at a serial console (QEMU -nographic in tmux) maps the saved
/// disk onto the other of two blank disks than the one bmr proposes; a wrong
/// confirmation is refused, the right one runs phase one; the disk not
/// chosen stays all zeros, and the chosen one boots phase two and then the
/// restored machine.
fn guided(ms: &Machines, src: &Source, work: &Path) -> String {
    let saved = fs::metadata(&src.image).unwrap().len();
    let vda = blank(work, "guided-vda.img", saved);
    let vdb = blank(work, "guided-vdb.img", 2 << 30);
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .kernel(
            &ms.kernel.vmlinuz,
            Some(&ms.initrd),
            "console=ttyS0,115200 bmr.mode=guided bmr.source=file:LABEL=BMR-BACKUP:/repo",
        )
        .disk(Disk::new(&vda, Interface::Virtio))
        .disk(Disk::new(&vdb, Interface::Virtio))
        .disk(Disk::new(&src.backup, Interface::Virtio).snapshot())
        .floppy(&src.floppy);
    let dir = ms.logs.join("guided");
    let _ = fs::remove_dir_all(&dir);
    let t = Instant::now();
    let vm = common::tmux::TmuxQemu::start(&dir, &cfg, 100, 30);
    let step = |want: &[&str], secs: u64| {
        vm.wait_screen(want, Duration::from_secs(secs))
            .unwrap_or_else(|e| panic!("guided: {e}"))
    };
    // No bmr.console=: the size comes from asking the terminal (tmux).
    let start = step(
        &[
            "bmr recovery · Start",
            "machine srcmachine",
            "repository at",
        ],
        300,
    );
    let shown = t.elapsed().as_secs_f64();
    assert!(start.contains("Enter next"), "{start}");
    vm.keys(&["Enter"]);
    let disks = step(&["Saved disks", "Disks found here"], 30);
    assert!(
        disks.contains("protected"),
        "the medium's and the source's disks: {disks}"
    );
    // The operator takes the other disk than the one bmr proposes.
    let proposed_dev = disks
        .lines()
        .find(|l| l.contains("gets disk0"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no proposal on the disks screen:\n{disks}"))
        .to_string();
    let (name, proposed, chosen) = if proposed_dev == "/dev/vda" {
        ("vdb", &vda, &vdb)
    } else {
        ("vda", &vdb, &vda)
    };
    vm.keys(&["Right"]);
    step(&[&format!("/dev/{name} (yours)")], 30);
    vm.keys(&["Enter"]);
    step(&["new size", "restore-image"], 30);
    vm.keys(&["Enter"]);
    step(&[&format!("To proceed, type {name}")], 30);
    vm.text(proposed_dev.trim_start_matches("/dev/"));
    vm.keys(&["Enter"]);
    step(&["that is not the disk list"], 30);
    assert!(all_zero(proposed) && all_zero(chosen));
    vm.text(name);
    vm.keys(&["Enter"]);
    let confirmed = t.elapsed().as_secs_f64();
    let done = step(&["Phase one finished."], 900);
    let one = t.elapsed().as_secs_f64() - confirmed;
    assert!(
        done.contains("[x] install the phase-two environment"),
        "{done}"
    );
    vm.keys(&["Enter"]);
    vm.wait_exit(Duration::from_secs(60)).unwrap();
    drop(vm);
    assert!(
        all_zero(proposed),
        "the disk the operator did not choose was written"
    );
    // Phase two shows its screens too (bmr.mode=guided is carried over):
    // its steps as they run, then the report, and waits for Enter.
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .disk(Disk::new(chosen, Interface::Virtio))
        .disk(Disk::new(&src.backup, Interface::Virtio).snapshot());
    let t = Instant::now();
    let vm = common::tmux::TmuxQemu::start(&ms.logs.join("guided-phase-two"), &cfg, 100, 30);
    let step = |want: &[&str], secs: u64| {
        vm.wait_screen(want, Duration::from_secs(secs))
            .unwrap_or_else(|e| panic!("guided phase two: {e}"))
    };
    step(
        &["bmr recovery phase two · Progress", "[x] [0] restore"],
        600,
    );
    let done = step(&["Phase two finished: the recovery is complete."], 900);
    let two = t.elapsed().as_secs_f64();
    for want in [
        "Status: ok",
        "[x] [10] a third-party restore program",
        "[x] put the system's boot loader back",
        "Press Enter to boot the restored system.",
    ] {
        assert!(
            done.contains(want),
            "no \"{want}\" on the done screen:\n{done}"
        );
    }
    vm.keys(&["Enter"]);
    vm.wait_exit(Duration::from_secs(60)).unwrap();
    drop(vm);
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .disk(Disk::new(chosen, Interface::Virtio));
    let restored = boot(
        &ms.logs,
        "guided-restored",
        &cfg,
        &[
            "SOURCE-MACHINE srcmachine up on /dev/vda1",
            "SYSTEM-CHECKSUMS-OK",
            "DATA-CHECKSUMS-OK",
        ],
        300,
    );
    format!(
        "guided at a serial console (tmux), mapping changed from {proposed_dev} to /dev/{name}: screens after {shown:.0} s, phase one {one:.0} s after the typed confirmation, phase two {two:.0} s; the restored machine booted and verified its files in {restored:.0} s; the disk not chosen still all zeros"
    )
}

/// Scenario 1 (virtio, same size) and BIOS onto a larger SATA disk: BIOS/MBR
/// from the file source, unattended, through both phases.
fn from_file(ms: &Machines, src: &Source, work: &Path, iface: Interface, size: u64) -> String {
    let name = format!("bios-{iface:?}-{}m", size >> 20).to_lowercase();
    let saved = fs::metadata(&src.image).unwrap().len();
    let files = size < saved;
    let target = blank(work, &format!("{name}.img"), size);
    let dev = if iface == Interface::Virtio {
        "/dev/vda"
    } else {
        "/dev/sda"
    };
    let one = boot(
        &ms.logs,
        &format!("{name}-phase-one"),
        &rescue(ms, src, "bmr.wipe=all", Disk::new(&target, iface)),
        &[
            &format!("phase two installed on {dev}"),
            if files {
                "root         system  restore-files"
            } else {
                "root         system  restore-image"
            },
            "BMR-PHASE-ONE-DONE",
        ],
        900,
    );
    // No ISO, no medium: the target disk boots phase two by itself.
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .disk(Disk::new(&target, iface))
        .disk(Disk::new(&src.backup, Interface::Virtio).snapshot());
    let two = boot(
        &ms.logs,
        &format!("{name}-phase-two"),
        &cfg,
        &[
            "recovery of srcmachine: phase two",
            if files {
                "image restore --files"
            } else {
                "image restore --from"
            },
            "[10] third-party restore ran in /run/bmr/target",
            "[10] succeeded",
            "BMR-RECOVERY-DONE status=ok",
        ],
        900,
    );
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .disk(Disk::new(&target, iface));
    let restored = boot(
        &ms.logs,
        &format!("{name}-restored"),
        &cfg,
        &[
            &format!("SOURCE-MACHINE srcmachine up on {dev}1"),
            "SYSTEM-CHECKSUMS-OK",
            "DATA-CHECKSUMS-OK",
        ],
        300,
    );
    format!(
        "BIOS/MBR onto {} {iface:?} disk, file source: phase one {one:.0} s, phase two {two:.0} s, total {:.0} s; the restored machine booted and verified its files in {restored:.0} s",
        match size.cmp(&saved) {
            std::cmp::Ordering::Equal => "a same-size",
            std::cmp::Ordering::Greater => "a larger",
            std::cmp::Ordering::Less => "a smaller (files restored one by one)",
        },
        one + two
    )
}

/// Scenarios 2 and 5: UEFI/GPT from the tape onto a larger disk behind
/// another controller (virtio before, NVMe now), the data volume restored in
/// phase two with the st driver from the medium, and the power cut while
/// phase two restores: it resumes.
fn dissimilar(ms: &Machines, src: &Source, work: &Path) -> String {
    let target = blank(work, "nvme.img", 2 << 30);
    let nvram = work.join("nvme-OVMF_VARS.fd");
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .nvram(&nvram)
        .kernel(
            &ms.kernel.vmlinuz,
            Some(&ms.initrd),
            "console=ttyS0,115200 bmr.mode=auto bmr.source=tape:/dev/nst0 bmr.wipe=all",
        )
        .disk(Disk::new(&target, Interface::Nvme).serial("bmr-new-disk"))
        .floppy(&src.floppy)
        .tape(&ms.tgt);
    let one = boot(
        &ms.logs,
        "uefi-phase-one",
        &cfg,
        &[
            "driver st loaded from the medium",
            "phase two installed on /dev/nvme0n1",
            "BMR-PHASE-ONE-DONE",
        ],
        900,
    );
    // The firmware's boot entry, not a boot order of the test's, starts
    // phase two: the same NVRAM, only the disk and the tape attached.
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .nvram(&nvram)
        .disk(Disk::new(&target, Interface::Nvme).serial("bmr-new-disk"))
        .tape(&ms.tgt);
    let dir = ms.logs.join("uefi-phase-two-cut");
    fs::create_dir_all(&dir).unwrap();
    let t = Instant::now();
    let vm = Qemu::start(&dir, &cfg);
    let cut = vm.wait_for("restoring /dev/nvme0n1p3", Duration::from_secs(600));
    keep_log(&ms.logs, "uefi-phase-two-cut", &vm);
    cut.unwrap();
    drop(vm); // the power cut
    let cut_after = t.elapsed().as_secs_f64();
    let two = boot(
        &ms.logs,
        "uefi-phase-two",
        &cfg,
        &[
            "resuming phase two after an interruption",
            "driver st loaded from the medium",
            "hardware: storage: disk0 was on virtio, is now on nvme",
            "adapted: /etc/fstab: /dev/vda3",
            "rebuilding the initramfs with the system's own update-initramfs",
            "boot loader: grub-install --target=x86_64-efi",
            "BMR-RECOVERY-DONE status=ok",
        ],
        900,
    );
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .nvram(&nvram)
        .disk(Disk::new(&target, Interface::Nvme).serial("bmr-new-disk"));
    let restored = boot(
        &ms.logs,
        "uefi-restored",
        &cfg,
        &[
            "SOURCE-MACHINE srcmachine up on /dev/nvme0n1p2",
            "SYSTEM-CHECKSUMS-OK",
            "DATA-CHECKSUMS-OK",
        ],
        300,
    );
    format!(
        "UEFI/GPT onto a larger NVMe disk (was virtio), tape source, power cut in phase two: phase one {one:.0} s, phase two {:.0} s (cut after {cut_after:.0} s, resumed and finished in {two:.0} s), total {:.0} s; the restored machine booted and verified its files in {restored:.0} s",
        cut_after + two,
        one + cut_after + two
    )
}

/// Scenario 4: the two disks of a BIOS machine (root on one, data on the
/// other) onto one larger disk.
fn two_onto_one(ms: &Machines, src: &Source, work: &Path) -> String {
    let target = blank(work, "one.img", 2 << 30);
    let one = boot(
        &ms.logs,
        "two-disks-phase-one",
        &rescue(
            ms,
            src,
            "bmr.wipe=all",
            Disk::new(&target, Interface::Virtio),
        ),
        &[
            "disk0 (1 GiB, mbr) -> /dev/vda",
            "disk1 (512 MiB, mbr) -> /dev/vda",
            "phase two installed on /dev/vda",
            "BMR-PHASE-ONE-DONE",
        ],
        900,
    );
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .disk(Disk::new(&target, Interface::Virtio))
        .disk(Disk::new(&src.backup, Interface::Virtio).snapshot());
    let two = boot(
        &ms.logs,
        "two-disks-phase-two",
        &cfg,
        &[
            "adapted: /etc/fstab: /dev/vdb1",
            "BMR-RECOVERY-DONE status=ok",
        ],
        900,
    );
    let cfg = QemuConfig::new()
        .memory_mb(1024)
        .disk(Disk::new(&target, Interface::Virtio));
    let restored = boot(
        &ms.logs,
        "two-disks-restored",
        &cfg,
        &[
            "SOURCE-MACHINE srcmachine up on /dev/vda1",
            "SYSTEM-CHECKSUMS-OK",
            "DATA-CHECKSUMS-OK",
        ],
        300,
    );
    format!(
        "two BIOS/MBR disks onto one, file source: phase one {one:.0} s, phase two {two:.0} s, total {:.0} s; the restored machine booted and verified its files in {restored:.0} s",
        one + two
    )
}
