//! QEMU with its serial console on a terminal: `-nographic` inside a tmux
//! pane of a private tmux server, so a test types with `send-keys` and reads
//! the screen with `capture-pane`, as an operator at a serial console would.
//! Drop stops QEMU (by its PID) and that tmux server.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::qemu::{QemuConfig, QEMU};

pub struct TmuxQemu {
    socket: String,
    pid: Option<u32>,
    /// Every screen read, for the test's log.
    pub screens: PathBuf,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl TmuxQemu {
    /// Starts `cfg` with its console on a `cols`x`rows` tmux pane.
    pub fn start(dir: &Path, cfg: &QemuConfig, cols: u16, rows: u16) -> TmuxQemu {
        std::fs::create_dir_all(dir).unwrap();
        let mut args = cfg.args(&dir.join("unused-serial.log"), &dir.join("OVMF_VARS.fd"));
        // The socket console and `-display none` give way to -nographic: the
        // serial port on QEMU's own terminal, the tmux pane.
        let mut keep = Vec::new();
        let mut i = 0;
        while i < args.len() {
            match args[i].as_str() {
                "-chardev" if args[i + 1].contains("id=serial0") => i += 2,
                "-serial" | "-display" | "-monitor" => i += 2,
                _ => {
                    keep.push(args[i].clone());
                    i += 1;
                }
            }
        }
        args = keep;
        args.extend(["-nographic".into(), "-monitor".into(), "none".into()]);
        let socket = format!("bmr-test-{}-{}", std::process::id(), rand_suffix());
        let line = std::iter::once(QEMU.to_string())
            .chain(args)
            .map(|a| quote(&a))
            .collect::<Vec<_>>()
            .join(" ");
        let out = Command::new("tmux")
            .args(["-L", &socket, "-f", "/dev/null", "new-session", "-d"])
            .args(["-x", &cols.to_string(), "-y", &rows.to_string()])
            .args(["-s", "guided", &format!("exec {line}")])
            .env_remove("TMUX")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tmux: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut t = TmuxQemu {
            socket,
            pid: None,
            screens: dir.join("screens.txt"),
        };
        t.tmux(&["set-option", "-g", "remain-on-exit", "on"]);
        let pid = t.tmux(&["display-message", "-p", "#{pane_pid}"]);
        t.pid = pid.trim().parse().ok();
        t
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The screen as the pane shows it now.
    pub fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "guided"])
    }

    /// Keys as tmux names them: "Enter", "Right", "Escape", or literal text with `literal`.
    pub fn keys(&self, keys: &[&str]) {
        let mut a = vec!["send-keys", "-t", "guided"];
        a.extend(keys);
        self.tmux(&a);
    }

    pub fn text(&self, text: &str) {
        self.tmux(&["send-keys", "-t", "guided", "-l", text]);
    }

    /// Waits until the screen shows every one of `want`; the screen, or
    /// Err with the last screen seen.
    pub fn wait_screen(&self, want: &[&str], timeout: Duration) -> Result<String, String> {
        let t = Instant::now();
        let mut last = String::new();
        while t.elapsed() < timeout {
            let s = self.screen();
            if s != last {
                let _ = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.screens)
                    .and_then(|mut f| {
                        use std::io::Write;
                        writeln!(f, "--- {:.0} s\n{s}", t.elapsed().as_secs_f64())
                    });
                last = s;
            }
            if want.iter().all(|w| last.contains(w)) {
                return Ok(last);
            }
            if self.exited() {
                return Err(format!("QEMU ended; last screen:\n{last}"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(format!(
            "no {want:?} within {} s; last screen:\n{last}",
            timeout.as_secs()
        ))
    }

    /// QEMU has ended (the guest rebooted: -no-reboot).
    pub fn exited(&self) -> bool {
        self.tmux(&["display-message", "-p", "-t", "guided", "#{pane_dead}"])
            .trim()
            == "1"
    }

    pub fn wait_exit(&self, timeout: Duration) -> Result<(), String> {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if self.exited() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(format!("QEMU still running after {} s", timeout.as_secs()))
    }
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl Drop for TmuxQemu {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            if !self.exited() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        self.tmux(&["kill-server"]);
    }
}
