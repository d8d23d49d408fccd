//! What a recovery tells whoever drives it, and what it asks back. The same
//! run serves the unattended console (which prints and never retries) and the
//! TUI (which draws the events and lets the operator choose).

use std::sync::mpsc::{Receiver, Sender};

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Every step of the run, in order, before the first starts.
    Steps(Vec<String>),
    Step {
        index: usize,
    },
    StepDone {
        index: usize,
        seconds: f64,
        result: String,
    },
    /// The operator chose to go on without this step.
    StepSkipped {
        index: usize,
    },
    /// The step failed and the run went on (a command whose on_error says so).
    StepFailed {
        index: usize,
        result: String,
    },
    /// Long work inside a step: bytes done of total.
    Progress {
        what: String,
        done: u64,
        total: u64,
        seconds: f64,
    },
    Log(String),
    /// The run asks the operator what to do (see `Observer::trouble`).
    Trouble(Trouble),
    /// The run is over: Ok(summary lines) or the error that ended it.
    Finished(Result<Vec<String>, String>),
}

/// A step failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trouble {
    pub step: String,
    pub error: String,
    /// A critical step cannot be skipped: the machine would not boot.
    pub critical: bool,
    /// Whether ending the run is one of the answers (a phase-two command
    /// whose on_error is `shell` runs again after the shell, whatever comes).
    pub abort: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Retry,
    Skip,
    Abort,
}

pub trait Observer {
    fn event(&mut self, e: Event);
    /// What to do about a failed step; called from the recovery's thread.
    fn trouble(&mut self, t: &Trouble) -> Choice;
}

/// Unattended: nobody to ask, so a failed step ends the run.
pub struct Unattended;

impl Observer for Unattended {
    fn event(&mut self, _: Event) {}
    fn trouble(&mut self, _: &Trouble) -> Choice {
        Choice::Abort
    }
}

/// A run on another thread: events go out on a channel, a trouble waits for
/// the answer on the other.
pub struct Channel {
    pub events: Sender<Event>,
    pub answers: Receiver<Choice>,
}

impl Observer for Channel {
    fn event(&mut self, e: Event) {
        let _ = self.events.send(e);
    }
    fn trouble(&mut self, t: &Trouble) -> Choice {
        if self.events.send(Event::Trouble(t.clone())).is_err() {
            return Choice::Abort;
        }
        self.answers.recv().unwrap_or(Choice::Abort)
    }
}
