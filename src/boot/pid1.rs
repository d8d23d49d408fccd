//! What PID 1 owes the system before anything else: the pseudo
//! filesystems, a console, a log that survives on every console and in
//! /run, a panic that ends in a shell or a reboot instead of a kernel
//! panic, reaping orphans, and the shell itself.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

pub const LOG_DIR: &str = "/run/bmr";

/// (what, where, fstype, flags, data)
const MOUNTS: &[(&str, &str, &str, MsFlags, &str)] = &[
    ("proc", "/proc", "proc", MsFlags::MS_NOSUID, ""),
    ("sysfs", "/sys", "sysfs", MsFlags::MS_NOSUID, ""),
    (
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        "mode=0755",
    ),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID,
        "gid=5,mode=620",
    ),
    ("run", "/run", "tmpfs", MsFlags::MS_NOSUID, "mode=0755"),
    ("tmp", "/tmp", "tmpfs", MsFlags::MS_NOSUID, "mode=1777"),
];

/// Mounts the pseudo filesystems; one that is already there is fine (a
/// second start after `exec /init` from the shell).
pub fn mount_pseudo() -> Vec<String> {
    let mut problems = Vec::new();
    for &(what, at, fstype, flags, data) in MOUNTS {
        let _ = fs::create_dir_all(at);
        let data = (!data.is_empty()).then_some(data);
        match mount(Some(what), at, Some(fstype), flags, data) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => problems.push(format!("mounting {fstype} on {at}: {e}")),
        }
    }
    // UEFI boot entries (phase two's, and the system's own at the end)
    // live in the firmware's variables.
    let efivars = "/sys/firmware/efi/efivars";
    if Path::new(efivars).is_dir() {
        match mount(
            Some("efivarfs"),
            efivars,
            Some("efivarfs"),
            MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => problems.push(format!("mounting efivarfs on {efivars}: {e}")),
        }
    }
    let _ = fs::create_dir_all(LOG_DIR);
    problems
}

struct Sinks {
    consoles: Vec<File>,
    kmsg: Option<File>,
    file: Option<File>,
}

static LOG: Mutex<Option<Sinks>> = Mutex::new(None);
/// The recovery screens own the consoles: lines go to the logs only.
static QUIET: AtomicBool = AtomicBool::new(false);

pub fn quiet(on: bool) {
    QUIET.store(on, Ordering::Relaxed);
}
/// The `console=` values, to open the consoles again after a shell.
static CONSOLES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The device nodes of `console=` values: `ttyS0,115200n8` -> /dev/ttyS0.
pub fn console_devices(consoles: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in consoles {
        let name = c.split(',').next().unwrap_or_default();
        if name.is_empty() || name.contains('/') {
            continue;
        }
        let dev = format!("/dev/{name}");
        if !out.contains(&dev) {
            out.push(dev);
        }
    }
    if out.is_empty() {
        out.push("/dev/console".to_string());
    }
    out
}

/// Points stdin/stdout/stderr at /dev/console and opens every console the
/// kernel was told about, so messages show on VGA and serial alike.
pub fn open_console(consoles: &[String]) {
    if let Ok(mut known) = CONSOLES.lock() {
        *known = consoles.to_vec();
    }
    if let Ok(c) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            let _ = nix::unistd::dup2(c.as_raw_fd(), fd);
        }
    }
    let open = |p: &str| OpenOptions::new().append(true).open(p).ok();
    let mut sinks = Sinks {
        consoles: console_devices(consoles)
            .iter()
            .filter_map(|d| open(d))
            .collect(),
        kmsg: OpenOptions::new().write(true).open("/dev/kmsg").ok(),
        file: OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(LOG_DIR).join("log"))
            .ok(),
    };
    if sinks.consoles.is_empty() {
        sinks.consoles.extend(open("/dev/console"));
    }
    if let Ok(mut l) = LOG.lock() {
        *l = Some(sinks);
    }
}

/// One line to every console, the kernel log and /run/bmr/log.
pub fn say(msg: &str) {
    let line = format!("bmr: {msg}\n");
    let mut guard = match LOG.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    match guard.as_mut() {
        Some(s) => {
            let consoles = if QUIET.load(Ordering::Relaxed) {
                &mut s.consoles[..0]
            } else {
                &mut s.consoles[..]
            };
            for c in consoles {
                let _ = c.write_all(line.replace('\n', "\r\n").as_bytes());
            }
            // Debug level: the kernel would otherwise echo it to the console twice.
            if let Some(k) = &mut s.kmsg {
                let _ = k.write_all(format!("<7>bmr: {msg}").as_bytes());
            }
            if let Some(f) = &mut s.file {
                let _ = f.write_all(line.as_bytes());
            }
        }
        None => eprint!("{line}"),
    }
}

/// Several lines (a report) through `say`, without the prefix on each.
pub fn show(text: &str) {
    for line in text.lines() {
        say(line);
    }
}

/// A panic in PID 1 would panic the kernel: log it, give the operator a
/// shell unless locked, then reboot.
pub fn install_panic_hook(lock: bool) {
    std::panic::set_hook(Box::new(move |info| {
        say(&format!("internal error: {info}"));
        say("this is a bug in bmr; the log is in /run/bmr/log");
        if !lock {
            say("starting a shell; leave it to reboot");
            shell();
        }
        reboot(Duration::from_secs(5));
    }));
}

/// Runs an interactive shell on the console with its own session and
/// controlling terminal, reaping other children meanwhile; returns when the
/// shell exits.
pub fn shell() {
    let child = Command::new("/bin/setsid")
        .args(["-c", "/bin/sh", "-l"])
        .env("PS1", "bmr-rescue# ")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn();
    match child {
        Ok(c) => {
            wait_for(Pid::from_raw(c.id() as i32));
            // The shell's session ended, and the kernel hung up its terminal
            // with every descriptor on it, ours included: open them again,
            // or PID 1 goes mute (and println! would panic).
            let consoles = CONSOLES.lock().map(|c| c.clone()).unwrap_or_default();
            open_console(&consoles);
        }
        Err(e) => {
            say(&format!("cannot start /bin/sh: {e}"));
            std::thread::sleep(Duration::from_secs(10));
        }
    }
}

/// Waits for `pid`, collecting any other exited child on the way (PID 1
/// inherits every orphan).
pub fn wait_for(pid: Pid) {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, _) | WaitStatus::Signaled(p, _, _)) if p == pid => return,
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => return,
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// PID 1 never returns: with nothing left to do it only reaps orphans.
pub fn idle() -> ! {
    loop {
        match waitpid(None, None) {
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// busybox `reboot`, `poweroff` and `halt` signal PID 1 (TERM, USR2,
/// USR1); the kernel ignores signals PID 1 has no handler for, so a thread
/// waits for them. Called before any other thread exists, so every thread
/// inherits the blocked mask; spawned programs get a clean one from std.
pub fn handle_shutdown_signals() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGINT,
    ] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || loop {
        match set.wait() {
            Ok(Signal::SIGUSR1 | Signal::SIGUSR2) => {
                say("powering off");
                nix::unistd::sync();
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
            }
            Ok(_) => reboot(Duration::ZERO),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    });
}

pub fn reboot(after: Duration) -> ! {
    say(&format!("rebooting in {} s", after.as_secs()));
    // Children first, so nothing is left writing when the disks go away.
    let _ = nix::sys::signal::kill(Pid::from_raw(-1), nix::sys::signal::Signal::SIGTERM);
    std::thread::sleep(after);
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    idle()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_names_become_devices() {
        let c = |v: &[&str]| console_devices(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(c(&[]), ["/dev/console"]);
        assert_eq!(
            c(&["tty0", "ttyS0,115200n8", "tty0"]),
            ["/dev/tty0", "/dev/ttyS0"]
        );
        assert_eq!(c(&["../etc/x"]), ["/dev/console"]);
    }
}
