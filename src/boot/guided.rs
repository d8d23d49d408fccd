//! Guided mode from PID 1: the recovery screens run as children, one per
//! console, each in its own session with the console as its controlling
//! terminal (so Ctrl-C and a hang-up reach it, not PID 1). A screen that
//! dies is started again; one that asks for a reboot gets it.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use super::cmdline::Flags;
use super::pid1::{self, say};

/// More deaths than this within `WINDOW` and a console's screen is given up.
const RESTARTS: usize = 5;
const WINDOW: Duration = Duration::from_secs(60);

/// The arguments of `bmr guided` for what PID 1 found and was told.
pub fn args(flags: &Flags, tty: &str, medium: Option<&Path>) -> Vec<String> {
    let mut a = vec![
        "guided".to_string(),
        "--tty".into(),
        tty.into(),
        "--boot-report".into(),
        format!("{}/boot.json", pid1::LOG_DIR),
        "--log".into(),
        format!(
            "{}/guided-{}.log",
            pid1::LOG_DIR,
            tty.trim_start_matches("/dev/").replace('/', "-")
        ),
    ];
    if let Some(m) = medium {
        a.extend(["--medium".into(), m.display().to_string()]);
    }
    if flags.phase == 2 {
        a.push("--phase-two-run".into());
    }
    if let Some(s) = &flags.source {
        a.extend(["--source".into(), s.clone()]);
    }
    for (s, t) in &flags.map {
        a.extend(["--map".into(), format!("{s}={t}")]);
    }
    if let Some(k) = &flags.key {
        a.extend(["--key-file".into(), k.display().to_string()]);
    }
    if let Some((c, r)) = flags.console_size {
        a.extend(["--console-size".into(), format!("{c}x{r}")]);
    }
    if flags.lock {
        a.push("--lock".into());
    }
    a
}

/// `linux` on a virtual terminal, `vt100` on anything else (a serial line):
/// both draw without colour, which every console can show.
fn term_for(tty: &str) -> &'static str {
    let name = tty.trim_start_matches("/dev/");
    if name == "console" || name.starts_with("tty") && name[3..].chars().all(|c| c.is_ascii_digit())
    {
        "linux"
    } else {
        "vt100"
    }
}

fn spawn(flags: &Flags, tty: &str, medium: Option<&Path>) -> Option<Pid> {
    let open = |tty: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(tty)
            .map(Stdio::from)
    };
    let (Ok(i), Ok(o), Ok(e)) = (open(tty), open(tty), open(tty)) else {
        say(&format!("cannot open {tty} for the recovery screens"));
        return None;
    };
    let exe = std::env::current_exe().unwrap_or_else(|_| "/init".into());
    let child = Command::new("/bin/setsid")
        .arg("-c")
        .arg(exe)
        .args(args(flags, tty, medium))
        .env("TERM", term_for(tty))
        .stdin(i)
        .stdout(o)
        .stderr(e)
        .spawn();
    match child {
        Ok(c) => Some(Pid::from_raw(c.id() as i32)),
        Err(e) => {
            say(&format!("cannot start the recovery screens on {tty}: {e}"));
            None
        }
    }
}

/// Runs the screens until one asks for a reboot (then reboots) or every
/// console's screen kept dying (then returns, for the shell).
pub fn run(flags: &Flags, medium: Option<&Path>) {
    let ttys = pid1::console_devices(&flags.consoles);
    // Kernel messages on the console would draw over the screens; they
    // still reach the kernel log and /run/bmr/log.
    let _ = std::fs::write("/proc/sys/kernel/printk", "1");
    pid1::quiet(true);
    let mut running: HashMap<Pid, String> = HashMap::new();
    let mut deaths: HashMap<String, Vec<Instant>> = HashMap::new();
    for t in &ttys {
        if let Some(p) = spawn(flags, t, medium) {
            running.insert(p, t.clone());
        }
    }
    while !running.is_empty() {
        let (pid, how) = match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, code)) => (p, Some(code)),
            Ok(WaitStatus::Signaled(p, _, _)) => (p, None),
            Ok(_) => continue,
            Err(nix::errno::Errno::ECHILD) => break,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Some(tty) = running.remove(&pid) else {
            continue;
        };
        if how == Some(i32::from(crate::tui::EXIT_REBOOT)) {
            // Not while another console's recovery is writing.
            if crate::tui::lock_run().is_ok() {
                pid1::quiet(false);
                say("the operator asked for a reboot");
                pid1::reboot(Duration::from_secs(2));
            }
            say(&format!(
                "a reboot was asked for on {tty} while the recovery runs on another console: refused"
            ));
        }
        let died = deaths.entry(tty.clone()).or_default();
        died.retain(|t| t.elapsed() < WINDOW);
        died.push(Instant::now());
        if died.len() > RESTARTS {
            pid1::quiet(false);
            say(&format!(
                "the recovery screens on {tty} ended {} times within a minute; see {}/guided-*.log",
                died.len(),
                pid1::LOG_DIR
            ));
            pid1::quiet(true);
            continue;
        }
        std::thread::sleep(Duration::from_secs(1));
        if let Some(p) = spawn(flags, &tty, medium) {
            running.insert(p, tty);
        }
    }
    pid1::quiet(false);
    let _ = std::fs::write("/proc/sys/kernel/printk", "4");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_screens_get_what_pid1_was_told() {
        let f = super::super::cmdline::parse(
            "console=ttyS0 bmr.source=file:LABEL=B:/repo bmr.target=disk0:/dev/vdb bmr.console=100x30 bmr.lock",
        );
        let a = args(&f, "/dev/ttyS0", Some(Path::new("/dev/fd0")));
        let s = a.join(" ");
        assert!(s.starts_with("guided --tty /dev/ttyS0"), "{s}");
        for want in [
            "--medium /dev/fd0",
            "--source file:LABEL=B:/repo",
            "--map disk0=/dev/vdb",
            "--console-size 100x30",
            "--lock",
            "--log /run/bmr/guided-ttyS0.log",
        ] {
            assert!(s.contains(want), "{want} missing from {s}");
        }
        assert_eq!(term_for("/dev/ttyS0"), "vt100");
        assert_eq!(term_for("/dev/tty1"), "linux");
        assert_eq!(term_for("/dev/console"), "linux");
    }
}
