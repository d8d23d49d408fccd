//! Guided recovery: the operator at the console walks through the screens of
//! `app`, drawn by `view`, and phase one runs as `recover::run` on its own
//! thread, the same run unattended mode makes; the TUI only draws its
//! events and passes the operator's answers back.

pub mod app;
pub mod term;
pub mod view;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use crossterm::event::{Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};

use crate::recover::events::{self, Choice, Event};
use crate::recover::{Source, SourceMount};
use app::{App, Effect, KeyNeed, Machine, StartInfo, Tone};

/// Exit status that asks PID 1 to reboot.
pub const EXIT_REBOOT: u8 = 10;

pub struct Options {
    /// The terminal to draw on.
    pub tty: PathBuf,
    pub medium: Option<PathBuf>,
    pub source: Option<String>,
    pub map: Vec<(String, String)>,
    pub secret: Option<Vec<u8>>,
    pub lock: bool,
    pub console_size: Option<(u16, u16)>,
    /// The rescue system's boot report (drivers, warnings), when there is one.
    pub boot_report: Option<PathBuf>,
    /// Where stdout and stderr go while the screen is drawn; the log pane shows it.
    pub log: PathBuf,
    pub journal: PathBuf,
    pub phase_two: bool,
    /// Booted from the restored disk: watch phase two run (`medium` is its copy).
    pub phase_two_run: bool,
    pub cmdline: String,
}

pub enum Exit {
    Reboot,
}

/// What the runner holds besides the screens.
struct Runner {
    o: Options,
    medium: Option<PathBuf>,
    spec: Option<String>,
    source: Option<Source>,
    _mounted: Option<SourceMount>,
    secret: Option<Vec<u8>>,
    answers: Option<mpsc::Sender<Choice>>,
    events: Option<mpsc::Receiver<Event>>,
    _lock: Option<File>,
}

pub fn run(o: Options) -> Result<Exit> {
    let tty = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&o.tty)
        .with_context(|| format!("opening the terminal {}", o.tty.display()))?;
    let (size, from) = term::ensure_size(&tty, o.console_size)
        .with_context(|| format!("sizing the terminal {}", o.tty.display()))?;
    // Everything the recovery and its tools print goes to the log pane,
    // not over the screen.
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&o.log)
        .with_context(|| format!("opening {}", o.log.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    for fd in [1, 2] {
        nix::unistd::dup2(log.as_raw_fd(), fd)?;
    }
    println!(
        "guided recovery on {}: {}x{} ({})",
        o.tty.display(),
        size.0,
        size.1,
        match from {
            term::SizeFrom::Terminal => "as the terminal says",
            term::SizeFrom::Flag => "from bmr.console=",
            term::SizeFrom::Asked => "asked the terminal",
            term::SizeFrom::Default => "the terminal did not say: 80x24",
        }
    );
    let colour = term::colour_for(
        std::env::var("TERM").ok().as_deref(),
        std::env::var_os("NO_COLOR").is_some(),
    );
    let mut app = App::new(start_info(&o), o.lock, colour);
    let mut r = Runner {
        medium: None,
        spec: None,
        source: None,
        _mounted: None,
        secret: o.secret.clone(),
        answers: None,
        events: None,
        _lock: None,
        o,
    };
    if r.o.phase_two_run {
        r.phase_two(&mut app)?;
    } else {
        if let Some(spec) = r.o.source.clone() {
            r.open_source(&mut app, &spec);
        }
        if let Some(m) = r.o.medium.clone() {
            r.load_medium(&mut app, &m.display().to_string());
        }
    }
    term::install_panic_restore();
    let mut tui = term::Tui::enter(tty.try_clone()?)?;
    let mut tail = Tail {
        file: File::open(&r.o.log)?,
        at: log_start,
    };
    // Drawn only when something changed: an idle redraw still sends bytes,
    // and on a serial console they add up.
    let mut dirty = true;
    loop {
        dirty |= tail.read_into(&mut app);
        if let Some(rx) = &r.events {
            loop {
                let e = match rx.try_recv() {
                    Ok(e) => e,
                    Err(mpsc::TryRecvError::Empty) => break,
                    // The worker ended without a word: it panicked.
                    Err(mpsc::TryRecvError::Disconnected) => Event::Finished(Err(format!(
                        "the recovery stopped on an internal error (a bug in bmr); the log is in {}",
                        r.o.log.display()
                    ))),
                };
                let finished = matches!(e, Event::Finished(_));
                dirty = true;
                app.on_event(e);
                if finished {
                    r.events = None;
                    r.answers = None;
                    crate::image::progress::observe(None);
                    let _ = tail.read_into(&mut app);
                    break;
                }
            }
        }
        if std::mem::take(&mut dirty) {
            tui.terminal.draw(|f| view::draw(f, &app))?;
        }
        let Some(ev) = term::read_key_timeout(Duration::from_millis(150))? else {
            continue;
        };
        dirty = true;
        let TermEvent::Key(k) = ev else {
            // A resize: the next draw takes the new size.
            continue;
        };
        if k.kind != KeyEventKind::Press {
            continue;
        }
        // Ctrl-L: a console message drew over the screen.
        if k.code == KeyCode::Char('l') && k.modifiers.contains(KeyModifiers::CONTROL) {
            tui.terminal.clear()?;
            continue;
        }
        match app.on_key(k) {
            Effect::Nothing => {}
            Effect::LoadMedium(spec) => r.load_medium(&mut app, &spec),
            Effect::OpenSource(spec) => {
                r.open_source(&mut app, &spec);
                // The source's disk is in use now: probe again.
                if let Some(m) = r.medium.clone() {
                    r.load_medium(&mut app, &m.display().to_string());
                }
            }
            Effect::CheckKey(pass) => {
                let secret = pass.into_bytes();
                let r2 = r.check_key(&app, &secret);
                if r2.is_ok() {
                    r.secret = Some(secret);
                }
                app.key_checked(r2);
            }
            Effect::Begin => r.begin(&mut app),
            Effect::Answer(c) => {
                if let Some(tx) = &r.answers {
                    let _ = tx.send(c);
                }
            }
            Effect::Shell => {
                tui.suspend()?;
                shell(&tty);
                tui.resume()?;
            }
            Effect::Reboot => return Ok(Exit::Reboot),
        }
    }
}

/// New lines of the log file, into the log pane.
struct Tail {
    file: File,
    at: u64,
}

impl Tail {
    /// True when there were new lines.
    fn read_into(&mut self, app: &mut App) -> bool {
        if self.file.seek(SeekFrom::Start(self.at)).is_err() {
            return false;
        }
        let mut buf = Vec::new();
        if self.file.read_to_end(&mut buf).is_err() {
            return false;
        }
        // Only whole lines; the rest comes with the next read.
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            return false;
        };
        self.at += end as u64 + 1;
        for line in String::from_utf8_lossy(&buf[..end]).split('\n') {
            // A progress line ends in \r on a terminal: keep the last state.
            let line = line.rsplit('\r').next().unwrap_or(line).trim_end();
            if !line.is_empty() {
                app.log(line.to_string());
            }
        }
        true
    }
}

impl Runner {
    fn load_medium(&mut self, app: &mut App, spec: &str) {
        let found = if spec.starts_with("http://") || spec.starts_with("https://") {
            // A medium image on a server: fetched once, then read like a file.
            let to = Path::new(crate::boot::pid1::LOG_DIR).join("medium-download.img");
            crate::image::http::HttpStore::fetch(spec, &to).map(|()| to)
        } else {
            crate::recover::find_device(spec)
        };
        let dev = match found {
            Ok(d) => d,
            Err(e) => return app.say(Tone::Error, format!("{e:#}")),
        };
        let m = match crate::medium::load_manifest(&dev) {
            Ok(m) => m,
            Err(e) => {
                return app.say(
                    Tone::Error,
                    format!("{} is not a usable recovery medium: {e:#}", dev.display()),
                )
            }
        };
        let (targets, warnings) =
            match crate::targets::targets(&[], &[(dev.clone(), crate::targets::MEDIUM)]) {
                Ok(t) => t,
                Err(e) => return app.say(Tone::Error, format!("probing the disks: {e:#}")),
            };
        for w in warnings {
            println!("warning: {w}");
        }
        let transport: HashMap<String, String> = crate::probe::disks::all()
            .unwrap_or_default()
            .into_iter()
            .map(|d| (d.device, d.transport))
            .collect();
        app.start.medium = Some(format!(
            "{}: machine {}, saved {}",
            dev.display(),
            m.system.hostname,
            m.manifest.created
        ));
        let map = if app.machine.is_some() {
            app.map.clone()
        } else {
            self.o.map.clone()
        };
        self.medium = Some(dev);
        app.set_machine(
            Machine {
                manifest: m,
                targets,
                transport,
            },
            map,
        );
        app.key = self.key_need(app);
        app.cursor = 0;
    }

    fn open_source(&mut self, app: &mut App, spec: &str) {
        self._mounted = None;
        // A URL's credentials are never shown.
        let shown = crate::image::http::redact(spec);
        match crate::recover::open_source(spec) {
            Ok((src, mounted)) => {
                app.start.source = Ok(describe(&shown, &src));
                self.spec = Some(spec.to_string());
                self.source = Some(src);
                self._mounted = mounted;
                app.say(Tone::Info, format!("backup source {shown} reached"));
                if app.machine.is_some() {
                    app.key = self.key_need(app);
                }
            }
            Err(e) => {
                app.start.source = Err(format!("{shown}: {e:#}"));
                self.spec = None;
                self.source = None;
            }
        }
    }

    /// The header of the first boot-critical image, when the source lets it
    /// be read without moving a tape.
    /// The header of the first boot-critical image, where it can be read
    /// without moving a tape: a file repository, or the front of an HTTP
    /// download.
    fn first_header(&self, app: &App) -> Option<(PathBuf, crate::image::format::Header)> {
        let m = &app.machine.as_ref()?.manifest;
        let v = m
            .volumes
            .iter()
            .filter(|v| v.role.is_critical())
            .find_map(|v| v.image.as_deref())?;
        match self.source.as_ref()? {
            Source::Dir(dir) => {
                let path = dir.join(v);
                let mut f = std::io::BufReader::new(File::open(&path).ok()?);
                let (h, _) = crate::image::format::read_header(&mut f).ok()?;
                Some((path, h))
            }
            Source::Url(u) => {
                let url = format!("{u}/{v}");
                let h = crate::image::http::HttpStore::header(&url).ok()?;
                Some((PathBuf::from(url), h))
            }
            Source::Tape(_) => None,
        }
    }

    fn key_need(&self, app: &App) -> KeyNeed {
        match self.first_header(app) {
            Some((p, h)) if h.encryption.is_some() => match &self.secret {
                Some(s) if crate::image::read::key_for(&h, Some(s), "").is_ok() => {
                    KeyNeed::Accepted
                }
                _ => {
                    println!(
                        "{} is encrypted: the passphrase is asked before anything is written",
                        crate::image::http::redact(&p.display().to_string())
                    );
                    KeyNeed::Ask
                }
            },
            _ => KeyNeed::No,
        }
    }

    fn check_key(&self, app: &App, secret: &[u8]) -> Result<(), String> {
        let Some((p, h)) = self.first_header(app) else {
            return Ok(());
        };
        let what = crate::image::http::redact(&p.display().to_string());
        crate::image::read::key_for(&h, Some(secret), &what)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }

    fn begin(&mut self, app: &mut App) {
        let (Some(m), Ok(plan), Some(spec), Some(src), Some(medium)) = (
            app.machine.as_ref().map(|m| m.manifest.clone()),
            app.plan.clone(),
            self.spec.clone(),
            self.source.clone(),
            self.medium.clone(),
        ) else {
            app.on_event(Event::Finished(Err(
                "no plan or no backup source; nothing was written".into(),
            )));
            return;
        };
        // Several consoles show the screens; one of them runs the recovery.
        match lock_run() {
            Ok(f) => self._lock = Some(f),
            Err(e) => {
                app.screen = app::Screen::Confirm;
                app.say(Tone::Error, format!("{e:#}; follow it there"));
                return;
            }
        }
        let (etx, erx) = mpsc::channel();
        let (atx, arx) = mpsc::channel();
        let ptx = etx.clone();
        crate::image::progress::observe(Some(Arc::new(move |what: &str, done, total, seconds| {
            let _ = ptx.send(Event::Progress {
                what: what.to_string(),
                done,
                total,
                seconds,
            });
        })));
        let secret = self.secret.clone();
        let journal = self.o.journal.clone();
        let phase_two = self.o.phase_two;
        let cmdline = self.o.cmdline.clone();
        std::thread::spawn(move || {
            let mut obs = events::Channel {
                events: etx.clone(),
                answers: arx,
            };
            let o = crate::recover::Options {
                medium: &medium,
                source: Some(&spec),
                wipe: &[],
                map: &[],
                secret,
                journal,
                phase_two,
                cmdline,
            };
            let result = crate::recover::run(&m, &plan, &spec, &src, &o, &mut obs)
                .map(|d| summary(&d))
                .map_err(|e| format!("{e:#}"));
            let _ = etx.send(Event::Finished(result));
        });
        self.events = Some(erx);
        self.answers = Some(atx);
    }
}

impl Runner {
    /// Phase two on its own thread, the screens showing it.
    fn phase_two(&mut self, app: &mut App) -> Result<()> {
        let medium = self
            .o
            .medium
            .clone()
            .context("phase two needs its copy of the recovery medium (--medium)")?;
        let m = crate::medium::load_manifest(&medium)?;
        app.start.medium = Some(medium.display().to_string());
        app.machine = Some(Machine {
            manifest: m.clone(),
            targets: Vec::new(),
            transport: HashMap::new(),
        });
        app.plan = medium
            .parent()
            .context("the medium copy has no directory")
            .and_then(crate::recover::chain::read_state)
            .map(|s| s.plan)
            .map_err(|e| format!("{e:#}"));
        app.watch_phase_two();
        // Every console shows phase two; one runs it.
        match lock_run() {
            Ok(f) => self._lock = Some(f),
            Err(_) => {
                app.say(
                    Tone::Info,
                    "phase two runs on another console: follow it there",
                );
                return Ok(());
            }
        }
        let (etx, erx) = mpsc::channel();
        let (atx, arx) = mpsc::channel();
        let lock = self.o.lock;
        std::thread::spawn(move || {
            let mut obs = events::Channel {
                events: etx.clone(),
                answers: arx,
            };
            let result = crate::recover::phase_two::run(
                &medium,
                &m,
                lock,
                &mut |l| println!("{l}"),
                &mut obs,
            )
            .map(|r| {
                println!(
                    "{} status={} report=/{}",
                    crate::boot::RECOVERY_DONE,
                    r.status,
                    crate::recover::phase_two::REPORT
                );
                report_lines(&r)
            })
            .map_err(|e| {
                println!("{} {e:#}", crate::boot::RECOVERY_FAILED);
                format!("{e:#}")
            });
            let _ = etx.send(Event::Finished(result));
        });
        self.events = Some(erx);
        self.answers = Some(atx);
        Ok(())
    }
}

/// The phase-two report, for the done screen.
fn report_lines(r: &crate::recover::phase_two::Report) -> Vec<String> {
    let mut out = vec![format!(
        "Status: {}; the report is in /{} on the restored system.",
        r.status,
        crate::recover::phase_two::REPORT
    )];
    let restored: Vec<String> = r
        .plan
        .volumes
        .iter()
        .filter(|v| !matches!(v.action, crate::plan::Action::Drop))
        .map(|v| format!("{} ({})", v.id, v.action))
        .collect();
    out.push(format!("Volumes: {}", restored.join(", ")));
    if r.hardware.is_empty() {
        out.push("Hardware: as saved.".into());
    } else {
        out.push("Hardware differences:".into());
        out.extend(r.hardware.iter().map(|h| format!("  {h}")));
    }
    out.extend(r.adaptation.iter().map(|a| format!("Adapted: {a}")));
    out.extend(r.warnings.iter().map(|w| format!("Warning: {w}")));
    let one: f64 = r.phase_one.iter().map(|s| s.seconds).sum();
    let two: f64 = r.phase_two.iter().map(|s| s.seconds).sum();
    out.push(format!(
        "Took {one:.0} s in phase one, {two:.0} s in phase two."
    ));
    out.push("Press Enter to boot the restored system.".into());
    out
}

fn summary(d: &crate::recover::Done) -> Vec<String> {
    let mut out = vec![format!("Restored now: {}", d.restored.join(", "))];
    if !d.later.is_empty() {
        out.push(format!(
            "Restored after the reboot (phase two): {}",
            d.later.join(", ")
        ));
    }
    let total: f64 = d.steps.iter().map(|s| s.seconds).sum();
    out.push(format!("Took {total:.0} s."));
    if d.phase_two.is_some() {
        out.push("Remove the rescue CD/USB stick and the recovery medium, then reboot:".into());
        out.push("phase two starts from the restored disk and finishes on its own.".into());
    }
    out
}

fn describe(spec: &str, src: &Source) -> String {
    match src {
        Source::Dir(d) if d.is_dir() => format!("{spec} (repository at {})", d.display()),
        Source::Dir(d) => format!("{spec}: {} is not a directory", d.display()),
        Source::Tape(t) if t.exists() => format!("{spec} (tape drive present)"),
        Source::Tape(t) => format!("{spec}: no tape drive {}", t.display()),
        Source::Url(_) => format!("{spec} (checked when the first image is read)"),
    }
}

pub const RUN_LOCK: &str = "/run/bmr/recover.lock";

/// One recovery at a time on this machine.
pub fn lock_run() -> Result<File> {
    let path = Path::new(RUN_LOCK);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| anyhow::anyhow!("the recovery is already running from another console"))?;
    Ok(f)
}

/// What the start screen shows, from the rescue system's boot report.
fn start_info(o: &Options) -> StartInfo {
    let report: serde_json::Value = o
        .boot_report
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let from_medium = report["drivers_from_medium"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|d| d["result"] == "loaded")
                .filter_map(|d| d["module"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let candidates = crate::boot::discover::candidates(Path::new("/sys"))
        .into_iter()
        .filter(|c| c.filesystem == "vfat")
        .map(|c| c.device.display().to_string())
        .collect();
    StartInfo {
        booted: format!(
            "bmr {} on kernel {kernel}{}",
            env!("CARGO_PKG_VERSION"),
            report["seconds_to_ready"]
                .as_f64()
                .map(|s| format!(", ready after {s:.0} s"))
                .unwrap_or_default()
        ),
        modules: report["modules_loaded"].as_array().map_or(0, |a| a.len()),
        from_medium,
        medium: None,
        candidates,
        source: Err("none given (bmr.source=)".into()),
        warnings: strings(&report["warnings"]),
    }
}

/// A shell on the TUI's terminal; the screens come back when it exits.
fn shell(tty: &File) {
    let io = |f: &File| f.try_clone().map(std::process::Stdio::from);
    let (Ok(i), Ok(o), Ok(e)) = (io(tty), io(tty), io(tty)) else {
        return;
    };
    let _ = std::process::Command::new("/bin/sh")
        .arg("-l")
        .env("PS1", "bmr-rescue (exit to return)# ")
        .stdin(i)
        .stdout(o)
        .stderr(e)
        .status();
}

#[cfg(test)]
mod tests;
