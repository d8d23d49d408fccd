//! The screens' state and what each key does to it. Pure: the runner feeds
//! keys and recovery events in and carries out the `Effect`s that come back
//! (loading a medium, checking a key, starting the run), so every path
//! through the screens is testable without a terminal or a disk.

use std::collections::{HashMap, VecDeque};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::manifest::Manifest;
use crate::plan::{Adjust, Plan, Policy, Sizing, TargetDisk};
use crate::recover::events::{Choice, Event, Trouble};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    Start,
    Disks,
    Plan,
    Key,
    Confirm,
    Progress,
    Trouble,
    Done,
}

/// What the runner must do after a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Nothing,
    /// Read the manifest from this device or image file.
    LoadMedium(String),
    /// Reach the backup source named like `bmr.source=`.
    OpenSource(String),
    /// Check this passphrase against the images' headers.
    CheckKey(String),
    /// The operator typed the confirmation: run phase one on `App::plan`.
    Begin,
    Answer(Choice),
    Shell,
    Reboot,
}

/// What the rescue system found, for the start screen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartInfo {
    pub booted: String,
    pub modules: usize,
    /// Drivers loaded from the recovery medium.
    pub from_medium: Vec<String>,
    pub medium: Option<String>,
    /// Devices that might hold a medium, offered when none was found.
    pub candidates: Vec<String>,
    /// Described when reachable, else why not.
    pub source: Result<String, String>,
    pub warnings: Vec<String>,
}

/// The saved system and the disks found here.
#[derive(Debug, Clone)]
pub struct Machine {
    pub manifest: Manifest,
    pub targets: Vec<TargetDisk>,
    /// Found disk -> controller (virtio, sata, nvme, usb).
    pub transport: HashMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyNeed {
    /// The images are not encrypted, or the key given on the command line works.
    No,
    Ask,
    Accepted,
}

/// Text typed on the start screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Typing {
    Medium,
    Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Waiting,
    Running,
    Done,
    Skipped,
    Failed,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub name: String,
    pub status: Status,
    pub seconds: f64,
    pub result: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub what: String,
    pub done: u64,
    pub total: u64,
    pub seconds: f64,
}

impl Bar {
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.seconds.max(0.001)
    }
    pub fn eta(&self) -> Option<f64> {
        let r = self.rate();
        (r > 0.0 && self.done < self.total).then(|| (self.total - self.done) as f64 / r)
    }
}

pub const LOG_LINES: usize = 200;

#[derive(Debug, Clone, Default)]
pub struct Run {
    pub steps: Vec<Step>,
    pub bars: Vec<Bar>,
    pub log: VecDeque<String>,
    pub finished: Option<Result<Vec<String>, String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Info,
    Error,
}

pub struct App {
    pub screen: Screen,
    pub start: StartInfo,
    pub machine: Option<Machine>,
    pub map: Vec<(String, String)>,
    pub policy: Policy,
    pub adjust: Adjust,
    pub plan: Result<Plan, String>,
    /// Selected row of the screen's list.
    pub cursor: usize,
    pub input: String,
    pub typing: Option<Typing>,
    pub message: Option<(Tone, String)>,
    pub key: KeyNeed,
    pub run: Run,
    pub trouble: Option<Trouble>,
    /// `bmr.lock`: no shell anywhere.
    pub lock: bool,
    pub colour: bool,
    /// 1, or 2 when the screens watch phase two.
    pub phase: u8,
}

impl App {
    pub fn new(start: StartInfo, lock: bool, colour: bool) -> App {
        App {
            screen: Screen::Start,
            start,
            machine: None,
            map: Vec::new(),
            policy: Policy::default(),
            adjust: Adjust::default(),
            plan: Err("no recovery medium yet".into()),
            cursor: 0,
            input: String::new(),
            typing: None,
            message: None,
            key: KeyNeed::No,
            run: Run::default(),
            trouble: None,
            lock,
            colour,
            phase: 1,
        }
    }

    /// Phase two runs by itself from the start: the screens only show it.
    pub fn watch_phase_two(&mut self) {
        self.phase = 2;
        self.screen = Screen::Progress;
        self.message = None;
    }

    /// A medium was read: the saved system and the disks here, planned.
    pub fn set_machine(&mut self, machine: Machine, map: Vec<(String, String)>) {
        self.machine = Some(machine);
        self.map = map;
        self.replan();
    }

    /// Plans again after any change; the plan on screen is always the
    /// planner's own answer for what the operator chose.
    pub fn replan(&mut self) {
        let Some(m) = &self.machine else { return };
        self.plan = crate::plan::plan_adjusted(
            &m.manifest,
            &m.targets,
            &self.map,
            self.policy,
            &self.adjust,
        )
        .map_err(|e| e.to_string());
    }

    pub fn say(&mut self, tone: Tone, text: impl Into<String>) {
        self.message = Some((tone, text.into()));
    }

    /// The devices a confirmation must name, in plan order.
    pub fn doomed(&self) -> Vec<String> {
        match &self.plan {
            Ok(p) => p.target_devices().iter().map(|d| d.to_string()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Found disks the operator may map a saved disk onto.
    pub fn writable(&self) -> Vec<&TargetDisk> {
        self.machine
            .as_ref()
            .map(|m| m.targets.iter().filter(|t| t.protected.is_none()).collect())
            .unwrap_or_default()
    }

    fn go(&mut self, s: Screen) {
        self.screen = s;
        self.cursor = 0;
        self.input.clear();
        self.typing = None;
        self.message = None;
    }

    pub fn on_key(&mut self, k: KeyEvent) -> Effect {
        if k.modifiers.contains(KeyModifiers::CONTROL) {
            return Effect::Nothing;
        }
        match self.screen {
            Screen::Start => self.start_key(k.code),
            Screen::Disks => self.disks_key(k.code),
            Screen::Plan => self.plan_key(k.code),
            Screen::Key => self.key_key(k.code),
            Screen::Confirm => self.confirm_key(k.code),
            Screen::Progress => Effect::Nothing,
            Screen::Trouble => self.trouble_key(k.code),
            Screen::Done => self.done_key(k.code),
        }
    }

    /// Edits `self.input`; true when the key was a text key.
    fn edit(&mut self, c: KeyCode) -> bool {
        match c {
            KeyCode::Char(ch) => self.input.push(ch),
            KeyCode::Backspace => {
                self.input.pop();
            }
            _ => return false,
        }
        true
    }

    fn start_key(&mut self, c: KeyCode) -> Effect {
        if let Some(t) = self.typing {
            match c {
                KeyCode::Esc => {
                    self.typing = None;
                    self.input.clear();
                }
                KeyCode::Enter if !self.input.trim().is_empty() => {
                    let text = self.input.trim().to_string();
                    self.typing = None;
                    self.input.clear();
                    return match t {
                        Typing::Medium => Effect::LoadMedium(text),
                        Typing::Source => Effect::OpenSource(text),
                    };
                }
                c => {
                    self.edit(c);
                }
            }
            return Effect::Nothing;
        }
        let n = self.start.candidates.len();
        match c {
            KeyCode::Up if self.machine.is_none() => self.cursor = self.cursor.saturating_sub(1),
            KeyCode::Down if self.machine.is_none() && self.cursor + 1 < n => self.cursor += 1,
            KeyCode::Enter if self.machine.is_none() => {
                if let Some(d) = self.start.candidates.get(self.cursor) {
                    return Effect::LoadMedium(d.clone());
                }
                self.say(
                    Tone::Error,
                    "no recovery medium: press m to type its device or path",
                );
            }
            KeyCode::Char('m') => {
                self.typing = Some(Typing::Medium);
                self.input.clear();
            }
            KeyCode::Char('s') => {
                self.typing = Some(Typing::Source);
                self.input.clear();
            }
            KeyCode::Enter => {
                if let Err(why) = &self.start.source {
                    let why = why.clone();
                    self.say(
                        Tone::Error,
                        format!("no backup source: {why}; press s to name one"),
                    );
                } else {
                    self.go(Screen::Disks);
                }
            }
            KeyCode::Char('h') if !self.lock => return Effect::Shell,
            _ => {}
        }
        Effect::Nothing
    }

    fn disks_key(&mut self, c: KeyCode) -> Effect {
        let saved: Vec<String> = self
            .machine
            .as_ref()
            .map(|m| m.manifest.disks.iter().map(|d| d.id.clone()).collect())
            .unwrap_or_default();
        match c {
            KeyCode::Esc => self.go(Screen::Start),
            KeyCode::Up => self.cursor = self.cursor.saturating_sub(1),
            KeyCode::Down if self.cursor + 1 < saved.len() => self.cursor += 1,
            KeyCode::Left | KeyCode::Right | KeyCode::Char(' ') => {
                if let Some(id) = saved.get(self.cursor).cloned() {
                    self.cycle_target(&id, c == KeyCode::Left);
                }
            }
            KeyCode::Char('a') => {
                self.map.clear();
                self.replan();
                self.say(Tone::Info, "mapping chosen by bmr again");
            }
            KeyCode::Enter => match &self.plan {
                Ok(_) => self.go(Screen::Plan),
                Err(e) => {
                    let e = e.clone();
                    self.say(Tone::Error, format!("no plan with this mapping: {e}"));
                }
            },
            _ => {}
        }
        Effect::Nothing
    }

    /// The target a saved disk goes to now: from the mapping the operator
    /// set, else from the plan.
    pub fn target_of(&self, saved: &str) -> Option<String> {
        self.map
            .iter()
            .find(|(s, _)| s == saved)
            .map(|(_, t)| t.clone())
            .or_else(|| {
                self.plan.as_ref().ok().and_then(|p| {
                    p.disks
                        .iter()
                        .find(|d| d.saved == saved)
                        .map(|d| d.target.clone())
                })
            })
    }

    fn cycle_target(&mut self, saved: &str, back: bool) {
        let choices: Vec<String> = self.writable().iter().map(|t| t.device.clone()).collect();
        if choices.is_empty() {
            self.say(Tone::Error, "no disk here may be written");
            return;
        }
        let now = self.target_of(saved);
        let at = now
            .as_ref()
            .and_then(|d| choices.iter().position(|c| c == d));
        let next = match (at, back) {
            (None, _) => 0,
            (Some(i), false) => (i + 1) % choices.len(),
            (Some(i), true) => (i + choices.len() - 1) % choices.len(),
        };
        self.map.retain(|(s, _)| s != saved);
        self.map.push((saved.to_string(), choices[next].clone()));
        // Sizes asked for on another disk mean nothing on this one.
        self.adjust.sizes.clear();
        self.replan();
        match &self.plan {
            Ok(_) => self.say(Tone::Info, format!("{saved} -> {}", choices[next])),
            Err(e) => {
                let e = e.clone();
                // Kept, so the next key goes on to the disk after it.
                self.say(Tone::Error, format!("{saved} -> {}: {e}", choices[next]));
            }
        }
    }

    /// Volumes as the plan screen lists them.
    fn volume_ids(&self) -> Vec<String> {
        self.plan
            .as_ref()
            .map(|p| p.volumes.iter().map(|v| v.id.clone()).collect())
            .unwrap_or_default()
    }

    fn plan_key(&mut self, c: KeyCode) -> Effect {
        let ids = self.volume_ids();
        match c {
            KeyCode::Esc => self.go(Screen::Disks),
            KeyCode::Up => self.cursor = self.cursor.saturating_sub(1),
            KeyCode::Down if self.cursor + 1 < ids.len() => self.cursor += 1,
            KeyCode::Char('+') | KeyCode::Char('=') | KeyCode::Char('-') => {
                if let Some(id) = ids.get(self.cursor).cloned() {
                    self.resize(&id, c != KeyCode::Char('-'));
                }
            }
            KeyCode::Char('x') => {
                if let Some(id) = ids.get(self.cursor).cloned() {
                    self.toggle_exclude(&id);
                }
            }
            KeyCode::Char('p') => {
                self.policy.sizing = match self.policy.sizing {
                    Sizing::Proportional => Sizing::GrowLast,
                    Sizing::GrowLast => Sizing::Keep,
                    Sizing::Keep => Sizing::Proportional,
                };
                self.replan();
                let s = sizing_name(self.policy.sizing);
                self.say(Tone::Info, format!("spare space: {s}"));
            }
            KeyCode::Enter => match &self.plan {
                Ok(_) if self.key == KeyNeed::Ask => self.go(Screen::Key),
                Ok(_) => self.go(Screen::Confirm),
                Err(e) => {
                    let e = e.clone();
                    self.say(Tone::Error, format!("no plan: {e}"));
                }
            },
            _ => {}
        }
        Effect::Nothing
    }

    /// One step up or down within the volume's bounds; the planner says
    /// what the bounds are.
    fn resize(&mut self, id: &str, grow: bool) {
        let (Some(m), Ok(plan)) = (&self.machine, &self.plan) else {
            return;
        };
        let Some(v) = plan.volumes.iter().find(|v| v.id == id) else {
            return;
        };
        if v.action == crate::plan::Action::Drop {
            self.say(
                Tone::Error,
                format!("{id} is not restored: include it with x first"),
            );
            return;
        }
        let bounds = crate::plan::size_bounds(
            &m.manifest,
            &m.targets,
            &self.map,
            self.policy,
            &self.adjust,
            id,
        );
        let (lo, hi) = match bounds {
            Ok(b) => b,
            Err(e) => {
                self.say(Tone::Error, format!("{id} cannot be resized: {e}"));
                return;
            }
        };
        let disk = m
            .targets
            .iter()
            .find(|t| t.device == v.target_disk)
            .map_or(0, |t| t.size_bytes);
        let step = resize_step(disk);
        let now = v.size_bytes;
        let want = if grow {
            now.saturating_add(step).min(hi)
        } else {
            now.saturating_sub(step).max(lo)
        };
        if want == now {
            let which = if grow { "largest" } else { "smallest" };
            self.say(
                Tone::Error,
                format!(
                    "{id} is already at its {which} size ({} to {})",
                    crate::report::size(lo),
                    crate::report::size(hi)
                ),
            );
            return;
        }
        self.adjust.sizes.retain(|(v, _)| v != id);
        self.adjust.sizes.push((id.to_string(), want));
        self.replan();
        if let Err(e) = &self.plan {
            let e = e.clone();
            self.adjust.sizes.retain(|(v, _)| v != id);
            self.replan();
            self.say(Tone::Error, e);
        } else {
            self.say(
                Tone::Info,
                format!(
                    "{id}: {} (from {} to {})",
                    crate::report::size(want),
                    crate::report::size(lo),
                    crate::report::size(hi)
                ),
            );
        }
    }

    fn toggle_exclude(&mut self, id: &str) {
        if let Some(i) = self.adjust.exclude.iter().position(|v| v == id) {
            self.adjust.exclude.remove(i);
            self.replan();
            self.say(Tone::Info, format!("{id} is restored again"));
            return;
        }
        let critical = self
            .machine
            .as_ref()
            .and_then(|m| m.manifest.volume(id))
            .is_some_and(|v| v.role.is_critical());
        if critical {
            self.say(
                Tone::Error,
                format!("{id} is needed to boot and cannot be excluded"),
            );
            return;
        }
        self.adjust.exclude.push(id.to_string());
        self.adjust.sizes.retain(|(v, _)| v != id);
        self.replan();
        if let Err(e) = &self.plan {
            let e = e.clone();
            self.adjust.exclude.retain(|v| v != id);
            self.replan();
            self.say(Tone::Error, e);
        } else {
            // A disk left with nothing to restore is still written: say so.
            let bare = self.plan.as_ref().ok().and_then(|p| {
                let disk = &p.volumes.iter().find(|v| v.id == id)?.target_disk;
                let any = p
                    .volumes
                    .iter()
                    .any(|v| &v.target_disk == disk && v.action != crate::plan::Action::Drop);
                (!any).then(|| disk.clone())
            });
            let text = match bare {
                Some(d) => format!(
                    "{id} excluded: it will not be restored; {d} still gets a new, empty partition table"
                ),
                None => format!("{id} excluded: it will not be restored"),
            };
            self.say(Tone::Info, text);
        }
    }

    fn key_key(&mut self, c: KeyCode) -> Effect {
        match c {
            KeyCode::Esc => self.go(Screen::Plan),
            KeyCode::Enter if !self.input.is_empty() => {
                let pass = std::mem::take(&mut self.input);
                return Effect::CheckKey(pass);
            }
            c => {
                self.edit(c);
            }
        }
        Effect::Nothing
    }

    /// The runner's answer to `Effect::CheckKey`.
    pub fn key_checked(&mut self, r: Result<(), String>) {
        match r {
            Ok(()) => {
                self.key = KeyNeed::Accepted;
                self.go(Screen::Confirm);
                self.say(Tone::Info, "key accepted");
            }
            Err(e) => self.say(Tone::Error, format!("wrong key: {e}; nothing was written")),
        }
    }

    fn confirm_key(&mut self, c: KeyCode) -> Effect {
        match c {
            KeyCode::Esc if self.key == KeyNeed::No => self.go(Screen::Plan),
            KeyCode::Esc => self.go(Screen::Key),
            KeyCode::Enter => {
                if confirms(&self.input, &self.doomed()) {
                    self.input.clear();
                    self.screen = Screen::Progress;
                    self.message = None;
                    return Effect::Begin;
                }
                let want = self
                    .doomed()
                    .iter()
                    .map(|d| d.trim_start_matches("/dev/").to_string())
                    .collect::<Vec<_>>()
                    .join(" ");
                self.input.clear();
                self.say(
                    Tone::Error,
                    format!(
                        "that is not the disk list: type {want} to destroy it, or Esc to go back"
                    ),
                );
            }
            c => {
                self.edit(c);
            }
        }
        Effect::Nothing
    }

    fn trouble_key(&mut self, c: KeyCode) -> Effect {
        let Some(t) = &self.trouble else {
            return Effect::Nothing;
        };
        let answer = match c {
            KeyCode::Char('r') => Choice::Retry,
            KeyCode::Char('s') if !t.critical && t.abort => Choice::Skip,
            KeyCode::Char('s') if !t.abort => return Effect::Nothing,
            KeyCode::Char('s') => {
                self.say(
                    Tone::Error,
                    "this step is needed to boot the machine and cannot be skipped",
                );
                return Effect::Nothing;
            }
            KeyCode::Char('h') if !self.lock => return Effect::Shell,
            KeyCode::Char('a') if t.abort => Choice::Abort,
            _ => return Effect::Nothing,
        };
        self.trouble = None;
        self.screen = Screen::Progress;
        self.message = None;
        Effect::Answer(answer)
    }

    fn done_key(&mut self, c: KeyCode) -> Effect {
        match c {
            KeyCode::Enter | KeyCode::Char('r') => Effect::Reboot,
            KeyCode::Char('h') if !self.lock => Effect::Shell,
            _ => Effect::Nothing,
        }
    }

    /// A recovery event.
    pub fn on_event(&mut self, e: Event) {
        let r = &mut self.run;
        match e {
            Event::Steps(names) => {
                r.steps = names
                    .into_iter()
                    .map(|name| Step {
                        name,
                        status: Status::Waiting,
                        seconds: 0.0,
                        result: String::new(),
                    })
                    .collect();
            }
            Event::Step { index } => {
                if let Some(s) = r.steps.get_mut(index) {
                    s.status = Status::Running;
                }
            }
            Event::StepDone {
                index,
                seconds,
                result,
            } => {
                if let Some(s) = r.steps.get_mut(index) {
                    s.status = Status::Done;
                    s.seconds = seconds;
                    s.result = result;
                }
            }
            Event::StepSkipped { index } => {
                if let Some(s) = r.steps.get_mut(index) {
                    s.status = Status::Skipped;
                }
            }
            Event::StepFailed { index, result } => {
                if let Some(s) = r.steps.get_mut(index) {
                    s.status = Status::Failed;
                    s.result = result;
                }
            }
            Event::Progress {
                what,
                done,
                total,
                seconds,
            } => {
                let bar = Bar {
                    what: what.clone(),
                    done,
                    total,
                    seconds,
                };
                match r.bars.iter_mut().find(|b| b.what == what) {
                    Some(b) => *b = bar,
                    None => r.bars.push(bar),
                }
            }
            Event::Log(line) => self.log(line),
            Event::Trouble(t) => {
                // The step by its name: phase two may have moved on to the
                // next one before asking.
                let steps = &mut self.run.steps;
                let at = steps
                    .iter()
                    .position(|s| s.name == t.step)
                    .or_else(|| steps.iter().position(|s| s.status == Status::Running));
                if let Some(s) = at.and_then(|i| steps.get_mut(i)) {
                    s.status = Status::Failed;
                }
                self.trouble = Some(t);
                self.screen = Screen::Trouble;
                self.message = None;
            }
            Event::Finished(result) => {
                if result.is_err() {
                    if let Some(s) = r.steps.iter_mut().find(|s| s.status == Status::Running) {
                        s.status = Status::Failed;
                    }
                }
                r.finished = Some(result);
                self.screen = Screen::Done;
                self.message = None;
            }
        }
    }

    pub fn log(&mut self, line: String) {
        let log = &mut self.run.log;
        log.push_back(line);
        while log.len() > LOG_LINES {
            log.pop_front();
        }
    }
}

pub fn sizing_name(s: Sizing) -> &'static str {
    match s {
        Sizing::Proportional => "shared in proportion (proportional)",
        Sizing::GrowLast => "to the last volume (grow-last)",
        Sizing::Keep => "left unallocated (keep)",
    }
}

/// A resize step a person can reach both ends with: 1% of the disk,
/// at least 16 MiB, whole MiB.
pub fn resize_step(disk_bytes: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    (disk_bytes / 100 / MIB * MIB).max(16 * MIB)
}

/// Only the exact list of disks counts as yes: every target named (as
/// `vda` or `/dev/vda`), nothing else.
pub fn confirms(typed: &str, doomed: &[String]) -> bool {
    if doomed.is_empty() {
        return false;
    }
    let mut said: Vec<&str> = typed
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .map(|w| w.trim_start_matches("/dev/"))
        .collect();
    let mut want: Vec<&str> = doomed
        .iter()
        .map(|d| d.trim_start_matches("/dev/"))
        .collect();
    said.sort_unstable();
    said.dedup();
    want.sort_unstable();
    said == want
}
