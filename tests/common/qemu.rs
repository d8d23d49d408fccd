//! Virtual machines for end-to-end tests: `qemu-system-x86_64` (TCG) on a q35 machine with SeaBIOS or OVMF,
//! virtual disks on virtio/SATA/NVMe/SCSI, a CD, a floppy, direct kernel boot,
//! and a real SCSI tape: tgt's virtual tape (`--device-type tape --bstype ssc`)
//! exported over iSCSI on 127.0.0.1 and attached through QEMU's libiscsi
//! driver as `scsi-generic` on virtio-scsi, so the guest's `st` driver sees a
//! sequential-access device. The guest reports on its serial console, which
//! goes to a log file that tests poll for marker lines.
//!
//! Every process started here is a child whose PID we keep; Drop stops it
//! (also when a test panics) and reaps it.
//!
//! ```ignore
//! let dir = tempfile::tempdir().unwrap();
//! let tgt = Tgt::start(dir.path(), 64);
//! let vm = Qemu::start(
//!     dir.path(),
//!     &QemuConfig::new()
//!         .kernel(&vmlinuz, Some(&initrd), "console=ttyS0 panic=-1")
//!         .disk(Disk::new(&image, Interface::Sata))
//!         .tape(&tgt),
//! );
//! let took = vm.wait_for("ALL-DONE", Duration::from_secs(120)).unwrap();
//! ```
//! Declare the `Tgt` before the `Qemu` that uses it: the borrow makes the
//! compiler insist on it, and the VM is then stopped before its tape.

use std::fs::{self, File};
use std::io::Read;
use std::marker::PhantomData;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const QEMU: &str = "qemu-system-x86_64";

/// Whether a program is on PATH (or is an existing path).
pub fn have_program(name: &str) -> bool {
    if name.contains('/') {
        return Path::new(name).is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// What the VM tests need on the host; `Err` names what is missing, for a
/// "skipped: ..." message.
pub fn vm_tools_missing() -> Option<String> {
    let missing: Vec<&str> = [QEMU, "tgtd", "tgtadm", "tgtimg"]
        .into_iter()
        .filter(|p| !have_program(p))
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Debian's kernel as unpacked by scripts/fetch-debian-kernel into
/// target/debian-kernel.
pub struct DebianKernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    /// lib/modules/<version>, with modules.dep.
    pub modules: PathBuf,
}

impl DebianKernel {
    pub fn find() -> Option<DebianKernel> {
        let root = super::repo().join("target/debian-kernel");
        let mut found: Vec<DebianKernel> = fs::read_dir(root.join("boot"))
            .ok()?
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let version = name.strip_prefix("vmlinuz-")?.to_string();
                let modules = root.join("lib/modules").join(&version);
                modules.join("modules.dep").is_file().then(|| DebianKernel {
                    vmlinuz: root.join("boot").join(&name),
                    modules,
                    version,
                })
            })
            .collect();
        found.sort_by(|a, b| a.version.cmp(&b.version));
        found.pop()
    }
}

/// `bmr mkrescue` with Debian's kernel: the initramfs at `initrd`, and the
/// hybrid ISO at `iso` with a one-second menu when asked; what it printed.
pub fn mkrescue(kernel: &DebianKernel, initrd: &Path, iso: Option<&Path>) -> String {
    let mut cmd = super::bmr();
    cmd.arg("mkrescue")
        .arg("--kernel")
        .arg(&kernel.vmlinuz)
        .arg("--initramfs")
        .arg(initrd);
    if let Some(iso) = iso {
        cmd.arg("--iso").arg(iso).args(["--timeout", "1"]);
    }
    super::ok(cmd.output().expect("running bmr mkrescue"))
}

// ---------------------------------------------------------------- tgt ----

/// A private tgtd serving one virtual tape as LUN 1 of one iSCSI target on
/// 127.0.0.1. Stopped in Drop (tgtd ignores SIGTERM: it is shut down through
/// tgtadm, and killed only as a last resort).
#[derive(Debug)]
pub struct Tgt {
    child: Option<Child>,
    control_port: u32,
    iscsi_port: u16,
    iqn: String,
    tape: PathBuf,
    log: PathBuf,
}

const TID: u32 = 1;
const TAPE_LUN: u32 = 1;

impl Tgt {
    /// Starts tgtd with a fresh `tape_mb` MB data tape in `dir`.
    pub fn start(dir: &Path, tape_mb: u64) -> Tgt {
        let mut failures = String::new();
        for attempt in 0..5 {
            let control_port = free_control_port(attempt);
            let iscsi_port = free_tcp_port();
            let log = dir.join(format!("tgtd-{control_port}.log"));
            let out = File::create(&log).expect("creating the tgtd log");
            let child = Command::new("tgtd")
                .args(["-f", "-C", &control_port.to_string(), "--iscsi"])
                .arg(format!("portal=127.0.0.1:{iscsi_port}"))
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("dup of the tgtd log"))
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("starting tgtd: {e}"));
            let mut tgt = Tgt {
                child: Some(child),
                control_port,
                iscsi_port,
                iqn: format!("iqn.2025-01.test.bmr:tape{control_port}"),
                tape: dir.join(format!("tape-{control_port}.img")),
                log,
            };
            match tgt.wait_ready() {
                Ok(()) => {
                    tgt.create_tape(tape_mb);
                    return tgt;
                }
                Err(e) => {
                    failures.push_str(&format!("attempt {attempt}: {e}\n{}\n", tgt.log()));
                    tgt.stop();
                }
            }
        }
        panic!("tgtd did not come up:\n{failures}");
    }

    /// What QEMU's iSCSI driver opens: the tape LUN.
    pub fn iscsi_url(&self) -> String {
        format!(
            "iscsi://127.0.0.1:{}/{}/{TAPE_LUN}",
            self.iscsi_port, self.iqn
        )
    }

    /// The tape image file (`tgtimg --op show --device-type tape --file` it).
    pub fn tape_path(&self) -> &Path {
        &self.tape
    }

    /// `tgtimg --op show` of the tape: its records and filemarks.
    pub fn show_tape(&self) -> String {
        let out = Command::new("tgtimg")
            .args(["--op", "show", "--device-type", "tape", "--file"])
            .arg(&self.tape)
            .output()
            .expect("running tgtimg");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn control_port(&self) -> u32 {
        self.control_port
    }

    pub fn iscsi_port(&self) -> u16 {
        self.iscsi_port
    }

    pub fn iqn(&self) -> &str {
        &self.iqn
    }

    /// tgtd's own output (it runs in the foreground, logging to stderr).
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `tgtadm -C <control port> ARGS`.
    pub fn tgtadm(&self, args: &[&str]) -> Output {
        Command::new("tgtadm")
            .args(["-C", &self.control_port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running tgtadm")
    }

    fn must_tgtadm(&self, args: &[&str]) {
        let out = self.tgtadm(args);
        assert!(
            out.status.success(),
            "tgtadm {args:?}: {}{}\ntgtd log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Until tgtd answers on its control socket and listens on the portal.
    /// A portal it cannot bind is only logged by tgtd, which carries on.
    fn wait_ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let pid = {
                let child = self.child.as_mut().expect("tgtd child");
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("tgtd exited: {status}"));
                }
                child.id()
            };
            if self
                .tgtadm(&["--op", "show", "--mode", "sys"])
                .status
                .success()
            {
                let ours = format!("/tgtd/socket.{}", self.control_port);
                let control = unix_socket_inodes(&ours)
                    .into_iter()
                    .any(|inode| pid_owns_socket(pid, inode));
                let portal = tcp_listen_inodes(self.iscsi_port)
                    .into_iter()
                    .any(|inode| pid_owns_socket(pid, inode));
                if control && portal {
                    return Ok(());
                }
                return Err(format!(
                    "tgtd {pid} answers, but owns control socket: {control}, \
                     listens on 127.0.0.1:{}: {portal}",
                    self.iscsi_port
                ));
            }
            if start.elapsed() > Duration::from_secs(15) {
                return Err("tgtd did not answer tgtadm within 15 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn create_tape(&self, tape_mb: u64) {
        let _ = fs::remove_file(&self.tape);
        super::run(
            Command::new("tgtimg")
                .args(["--op", "new", "--device-type", "tape"])
                .arg(format!("--barcode=BMR{:05}", self.control_port % 100_000))
                .arg(format!("--size={tape_mb}"))
                .args(["--type=data", "--file"])
                .arg(&self.tape),
        );
        let tid = TID.to_string();
        let lun = TAPE_LUN.to_string();
        let tape = self.tape.to_str().expect("UTF-8 tape path");
        self.must_tgtadm(&[
            "--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", &tid, "-T", &self.iqn,
        ]);
        self.must_tgtadm(&[
            "--lld",
            "iscsi",
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            &tid,
            "--lun",
            &lun,
            "--device-type",
            "tape",
            "--bstype",
            "ssc",
            "--backing-store",
            tape,
        ]);
        self.must_tgtadm(&[
            "--lld", "iscsi", "--op", "bind", "--mode", "target", "--tid", &tid, "-I", "ALL",
        ]);
    }

    /// Shuts tgtd down (target, then system), waits for it; SIGKILL only if
    /// it is still there after 10 s. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            let tid = TID.to_string();
            let _ = self.tgtadm(&[
                "--lld", "iscsi", "--op", "delete", "--mode", "target", "--tid", &tid, "--force",
            ]);
            let _ = self.tgtadm(&["--op", "delete", "--mode", "system"]);
            if wait_child(&mut child, Duration::from_secs(10)).is_none() {
                eprintln!(
                    "tgtd {} ignored `--op delete --mode system`: SIGKILL",
                    child.id()
                );
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // tgtd leaves its control socket and lock file behind.
        for dir in ["/run/tgtd", "/var/run/tgtd"] {
            for suffix in ["", ".lock"] {
                let _ = fs::remove_file(format!("{dir}/socket.{}{suffix}", self.control_port));
            }
        }
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tgtd control "port" is the name of a Unix socket, /run/tgtd/socket.N:
/// one no tgtd holds (nor left behind).
fn free_control_port(attempt: u32) -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(attempt * 104_729);
    loop {
        let n = 20_000 + (seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed) * 31)) % 40_000;
        let used = ["/run/tgtd", "/var/run/tgtd"].iter().any(|d| {
            Path::new(&format!("{d}/socket.{n}")).exists()
                || Path::new(&format!("{d}/socket.{n}.lock")).exists()
        });
        if !used {
            return n;
        }
    }
}

/// A TCP port on 127.0.0.1 nobody listens on right now (tgtd then binds it;
/// `Tgt::start` checks it did and retries with other ports if not).
fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Inodes of TCP sockets listening on 127.0.0.1:port or *:port.
fn tcp_listen_inodes(port: u16) -> Vec<u64> {
    let text = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, p) = f.get(1)?.split_once(':')?;
            let listening = *f.get(3)? == "0A";
            let ok = listening
                && u16::from_str_radix(p, 16).ok()? == port
                && (addr == "0100007F" || addr == "00000000");
            ok.then(|| f.get(9)?.parse().ok()).flatten()
        })
        .collect()
}

/// Inodes of Unix sockets bound to a path ending in `suffix`.
fn unix_socket_inodes(suffix: &str) -> Vec<u64> {
    let text = fs::read_to_string("/proc/net/unix").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(7)
                .filter(|p| p.ends_with(suffix))
                .and_then(|_| f.get(6)?.parse().ok())
        })
        .collect()
}

fn pid_owns_socket(pid: u32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(Result::ok)
                .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == want.as_str()))
        })
        .unwrap_or(false)
}

/// Reaps the child if it exits within `timeout`.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// --------------------------------------------------------------- qemu ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS.
    Bios,
    /// OVMF from the ovmf package, with a private copy of its variable store.
    Uefi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interface {
    /// virtio-blk-pci: /dev/vdX.
    Virtio,
    /// `-device ahci` + ide-hd: /dev/sdX through libata.
    Sata,
    /// nvme (with a serial): /dev/nvmeXn1.
    Nvme,
    /// scsi-hd on the virtio-scsi controller the tape shares: /dev/sdX.
    Scsi,
    /// A USB stick: usb-storage on an xHCI controller, /dev/sdX through usb-storage.
    Usb,
}

#[derive(Clone, Debug)]
pub struct Disk {
    pub path: PathBuf,
    pub interface: Interface,
    /// QEMU block format, "raw" unless set.
    pub format: String,
    /// Serial the guest sees (NVMe needs one; made up when not given).
    pub serial: Option<String>,
    pub bootindex: Option<u32>,
    /// Writes go to a temporary overlay, the image stays as it is.
    pub snapshot: bool,
}

impl Disk {
    pub fn new(path: &Path, interface: Interface) -> Disk {
        Disk {
            path: path.to_path_buf(),
            interface,
            format: "raw".into(),
            serial: None,
            bootindex: None,
            snapshot: false,
        }
    }

    pub fn serial(mut self, serial: &str) -> Disk {
        self.serial = Some(serial.into());
        self
    }

    pub fn format(mut self, format: &str) -> Disk {
        self.format = format.into();
        self
    }

    pub fn bootindex(mut self, n: u32) -> Disk {
        self.bootindex = Some(n);
        self
    }

    pub fn snapshot(mut self) -> Disk {
        self.snapshot = true;
        self
    }
}

#[derive(Clone, Debug)]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
}

/// What to boot and with what attached. Builder methods consume and return it.
#[derive(Clone, Debug)]
pub struct QemuConfig<'t> {
    pub firmware: Firmware,
    pub memory_mb: u32,
    pub cpus: u32,
    pub disks: Vec<Disk>,
    /// A bootable ISO, first in the boot order (SeaBIOS and OVMF alike).
    pub cdrom: Option<PathBuf>,
    pub direct: Option<DirectBoot>,
    /// A raw floppy image (1.44 MB and the like) as fd0.
    pub floppy: Option<PathBuf>,
    pub tape: Option<&'t Tgt>,
    /// A user-mode (slirp) NIC; otherwise the VM has no network.
    pub user_network: bool,
    /// More QEMU arguments, appended as they are.
    pub extra: Vec<String>,
    /// The machine's own OVMF variable store, kept across boots (boot
    /// entries written by one boot are seen by the next); made from OVMF's
    /// template when missing. Without it every boot starts from the template.
    pub nvram: Option<PathBuf>,
}

impl Default for QemuConfig<'_> {
    fn default() -> Self {
        QemuConfig {
            firmware: Firmware::Bios,
            memory_mb: 512,
            cpus: 1,
            disks: Vec::new(),
            cdrom: None,
            direct: None,
            floppy: None,
            tape: None,
            user_network: false,
            extra: Vec::new(),
            nvram: None,
        }
    }
}

impl<'t> QemuConfig<'t> {
    /// SeaBIOS, 512 MB, one CPU, nothing attached.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn firmware(mut self, firmware: Firmware) -> Self {
        self.firmware = firmware;
        self
    }

    pub fn nvram(mut self, vars: &Path) -> Self {
        self.nvram = Some(vars.to_path_buf());
        self.uefi()
    }

    pub fn uefi(self) -> Self {
        self.firmware(Firmware::Uefi)
    }

    pub fn memory_mb(mut self, mb: u32) -> Self {
        self.memory_mb = mb;
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    pub fn disk(mut self, disk: Disk) -> Self {
        self.disks.push(disk);
        self
    }

    pub fn cdrom(mut self, iso: &Path) -> Self {
        self.cdrom = Some(iso.to_path_buf());
        self
    }

    /// `-kernel`/`-initrd`/`-append`. Keep markers the test waits for out of
    /// `append`: the kernel echoes its command line.
    pub fn kernel(mut self, kernel: &Path, initrd: Option<&Path>, append: &str) -> Self {
        self.direct = Some(DirectBoot {
            kernel: kernel.to_path_buf(),
            initrd: initrd.map(Path::to_path_buf),
            append: append.into(),
        });
        self
    }

    pub fn floppy(mut self, image: &Path) -> Self {
        self.floppy = Some(image.to_path_buf());
        self
    }

    pub fn tape(mut self, tgt: &'t Tgt) -> Self {
        self.tape = Some(tgt);
        self
    }

    pub fn user_network(mut self) -> Self {
        self.user_network = true;
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// The arguments `Qemu::start` runs QEMU with; `serial_log` and
    /// `ovmf_vars` (the writable copy, for UEFI) are files in the test dir.
    pub fn args(&self, serial_log: &Path, ovmf_vars: &Path) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        // TCG always: where /dev/kvm exists here it is not a usable KVM (no
        // vmx/svm; guests crawl in it).
        push(&["-machine", "q35", "-accel", "tcg"]);
        push(&["-m", &self.memory_mb.to_string()]);
        push(&["-smp", &self.cpus.to_string()]);
        push(&["-display", "none", "-no-reboot", "-monitor", "none"]);
        // A socket that keeps a log of everything: tests read the log and
        // can type into the console (`Qemu::send`) through the socket.
        push(&[
            "-chardev",
            &format!(
                "socket,id=serial0,path={},server=on,wait=off,logfile={}",
                opt(&serial_socket(serial_log)),
                opt(serial_log)
            ),
            "-serial",
            "chardev:serial0",
        ]);
        push(&["-nic", if self.user_network { "user" } else { "none" }]);
        if self.firmware == Firmware::Uefi {
            let (code, _) = ovmf_files();
            push(&[
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    opt(&code)
                ),
                "-drive",
                &format!("if=pflash,format=raw,unit=1,file={}", opt(ovmf_vars)),
            ]);
        }
        if let Some(d) = &self.direct {
            push(&["-kernel", &d.kernel.to_string_lossy()]);
            if let Some(initrd) = &d.initrd {
                push(&["-initrd", &initrd.to_string_lossy()]);
            }
            push(&["-append", &d.append]);
        }
        if let Some(iso) = &self.cdrom {
            // On q35's built-in AHCI; bootindex works for SeaBIOS and OVMF.
            push(&[
                "-drive",
                &format!(
                    "if=none,id=cd0,media=cdrom,readonly=on,format=raw,file={}",
                    opt(iso)
                ),
                "-device",
                "ide-cd,drive=cd0,bus=ide.0,bootindex=0",
            ]);
        }
        if let Some(img) = &self.floppy {
            push(&[
                "-drive",
                &format!("if=floppy,index=0,format=raw,file={}", opt(img)),
            ]);
        }
        if self.tape.is_some() || self.disks.iter().any(|d| d.interface == Interface::Scsi) {
            push(&["-device", "virtio-scsi-pci,id=scsi0"]);
        }
        if self.disks.iter().any(|d| d.interface == Interface::Sata) {
            push(&["-device", "ahci,id=ahci0"]);
        }
        if self.disks.iter().any(|d| d.interface == Interface::Usb) {
            push(&["-device", "qemu-xhci,id=xhci0"]);
        }
        let mut sata_port = 0;
        for (i, d) in self.disks.iter().enumerate() {
            let id = format!("disk{i}");
            let snapshot = if d.snapshot { ",snapshot=on" } else { "" };
            push(&[
                "-drive",
                &format!(
                    "if=none,id={id},format={},file={}{snapshot}",
                    d.format,
                    opt(&d.path)
                ),
            ]);
            let mut dev = match d.interface {
                Interface::Virtio => format!("virtio-blk-pci,drive={id}"),
                Interface::Sata => {
                    assert!(sata_port < 6, "an AHCI controller has 6 ports");
                    sata_port += 1;
                    format!("ide-hd,drive={id},bus=ahci0.{}", sata_port - 1)
                }
                Interface::Nvme => format!(
                    "nvme,drive={id},serial={}",
                    d.serial.clone().unwrap_or_else(|| format!("BMRNVME{i}"))
                ),
                Interface::Scsi => format!("scsi-hd,drive={id},bus=scsi0.0"),
                Interface::Usb => format!("usb-storage,drive={id},bus=xhci0.0,removable=on"),
            };
            if let (Some(serial), false) = (&d.serial, d.interface == Interface::Nvme) {
                dev.push_str(&format!(",serial={serial}"));
            }
            if let Some(n) = d.bootindex {
                dev.push_str(&format!(",bootindex={n}"));
            }
            push(&["-device", &dev]);
        }
        if let Some(tgt) = self.tape {
            push(&[
                "-drive",
                &format!("if=none,id=tape0,format=raw,file={}", tgt.iscsi_url()),
                "-device",
                "scsi-generic,drive=tape0,bus=scsi0.0",
            ]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// A path as a QEMU option value: commas doubled.
fn opt(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// OVMF's code and variable-store template, matching sizes (4 MB preferred),
/// without Secure Boot.
pub fn ovmf_files() -> (PathBuf, PathBuf) {
    for (code, vars) in [
        ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
        ("OVMF_CODE.fd", "OVMF_VARS.fd"),
    ] {
        let code = Path::new("/usr/share/OVMF").join(code);
        let vars = Path::new("/usr/share/OVMF").join(vars);
        if code.is_file() && vars.is_file() {
            return (code, vars);
        }
    }
    panic!("no OVMF_CODE*.fd/OVMF_VARS*.fd in /usr/share/OVMF: apt-get install ovmf");
}

/// A running QEMU. Drop stops it (SIGTERM, SIGKILL after 5 s) and reaps it.
/// The console socket beside the serial log.
fn serial_socket(serial_log: &Path) -> PathBuf {
    serial_log.with_extension("sock")
}

pub struct Qemu<'t> {
    console: Mutex<Option<std::os::unix::net::UnixStream>>,
    child: Mutex<Child>,
    pid: u32,
    started: Instant,
    serial_log: PathBuf,
    stderr_log: PathBuf,
    args: Vec<String>,
    _tape: PhantomData<&'t Tgt>,
}

impl<'t> Qemu<'t> {
    /// Starts QEMU; its files (serial log, stderr, OVMF variables) go to `dir`.
    pub fn start(dir: &Path, config: &QemuConfig<'t>) -> Qemu<'t> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let serial_log = dir.join(format!("qemu{n}-serial.log"));
        let stderr_log = dir.join(format!("qemu{n}-stderr.log"));
        let ovmf_vars = match &config.nvram {
            Some(v) => v.clone(),
            None => dir.join(format!("qemu{n}-OVMF_VARS.fd")),
        };
        if config.firmware == Firmware::Uefi && !(config.nvram.is_some() && ovmf_vars.exists()) {
            fs::copy(ovmf_files().1, &ovmf_vars).expect("copying OVMF_VARS");
        }
        File::create(&serial_log).expect("creating the serial log");
        let args = config.args(&serial_log, &ovmf_vars);
        let out = File::create(&stderr_log).expect("creating the QEMU stderr log");
        let started = Instant::now();
        let child = Command::new(QEMU)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup of the QEMU log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {QEMU}: {e}"));
        Qemu {
            console: Mutex::new(None),
            pid: child.id(),
            child: Mutex::new(child),
            started,
            serial_log,
            stderr_log,
            args,
            _tape: PhantomData,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Time since QEMU was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn log_path(&self) -> &Path {
        &self.serial_log
    }

    /// The serial console so far (lossy UTF-8).
    pub fn log(&self) -> String {
        let mut bytes = Vec::new();
        if let Ok(mut f) = File::open(&self.serial_log) {
            let _ = f.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// QEMU's own stdout and stderr.
    pub fn stderr(&self) -> String {
        fs::read(&self.stderr_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The exit status if QEMU has exited (it is reaped then).
    pub fn exited(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        child.try_wait().ok().flatten()
    }

    /// Until `marker` appears on the serial console: the time since QEMU
    /// started. Fails at `timeout` or when QEMU exits first, with the last
    /// 60 lines of the console and QEMU's stderr.
    pub fn wait_for(&self, marker: &str, timeout: Duration) -> Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        loop {
            // Exit status first, then the log: a marker written just before
            // exiting is still seen.
            let exited = self.exited();
            if self.log().contains(marker) {
                return Ok(self.elapsed());
            }
            if let Some(status) = exited {
                return Err(self.failure(&format!(
                    "QEMU exited ({status}) after {:.1?} before {marker:?} appeared",
                    self.elapsed()
                )));
            }
            if Instant::now() > deadline {
                return Err(self.failure(&format!("{marker:?} did not appear within {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Until QEMU exits by itself (the guest powered off; -no-reboot makes a
    /// reboot an exit too).
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(self.failure(&format!("QEMU still running after {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn failure(&self, what: &str) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        format!(
            "{what}\n--- serial console ({}), last 60 lines ---\n{tail}\n\
             --- QEMU stderr ---\n{}\n--- QEMU args ---\n{}",
            self.serial_log.display(),
            self.stderr(),
            self.args.join(" ")
        )
    }
}

impl Qemu<'_> {
    /// Types `text` on the serial console. The first call connects; a
    /// thread drains what the console sends back (it is in the log), so the
    /// guest's serial port never stalls on a full socket.
    pub fn send(&self, text: &str) {
        use std::io::Write;
        let mut guard = self.console.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            let sock = serial_socket(&self.serial_log);
            let stream = std::os::unix::net::UnixStream::connect(&sock)
                .unwrap_or_else(|e| panic!("connecting to {}: {e}", sock.display()));
            let mut drain = stream.try_clone().expect("cloning the console socket");
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut drain, &mut std::io::sink());
            });
            *guard = Some(stream);
        }
        if let Some(s) = guard.as_mut() {
            s.write_all(text.as_bytes())
                .expect("typing on the serial console");
        }
    }
}

impl Drop for Qemu<'_> {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        if matches!(child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            if wait_child(child, Duration::from_secs(5)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
