//! Progress of long work: a live line (bytes, rate, ETA) on a terminal,
//! plain lines every 10% otherwise (logs, serial consoles).

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::report::size;

/// Receives (what, done, total, seconds) instead of the terminal: the TUI
/// draws bars from it, and a bar drawn over its screen would garble it.
pub type Observer = Arc<dyn Fn(&str, u64, u64, f64) + Send + Sync>;

static OBSERVER: Mutex<Option<Observer>> = Mutex::new(None);

/// Sends all later progress to `o` (None: back to the terminal).
pub fn observe(o: Option<Observer>) {
    if let Ok(mut g) = OBSERVER.lock() {
        *g = o;
    }
}

fn observer() -> Option<Observer> {
    OBSERVER.lock().ok().and_then(|g| g.clone())
}

pub struct Progress {
    what: String,
    total: u64,
    done: u64,
    start: Instant,
    tty: bool,
    last_tenth: u64,
    /// A live line is on the terminal and not yet ended.
    open: bool,
    observer: Option<Observer>,
    last_sent: Option<Instant>,
}

impl Progress {
    pub fn new(what: &str, total: u64) -> Progress {
        Progress {
            what: what.to_string(),
            total,
            done: 0,
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            last_tenth: 0,
            open: false,
            observer: observer(),
            last_sent: None,
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        if let Some(o) = &self.observer {
            let now = Instant::now();
            let due = self
                .last_sent
                .is_none_or(|t| now - t >= Duration::from_millis(200));
            if due || self.done >= self.total {
                self.last_sent = Some(now);
                o(
                    &self.what,
                    self.done,
                    self.total,
                    self.start.elapsed().as_secs_f64(),
                );
            }
            return;
        }
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let rate = self.done as f64 / secs;
        let eta = if rate > 0.0 {
            (self.total.saturating_sub(self.done)) as f64 / rate
        } else {
            0.0
        };
        let pct = self
            .done
            .saturating_mul(100)
            .checked_div(self.total)
            .unwrap_or(100);
        let line = format!(
            "{}: {} of {} ({pct}%), {}/s, ETA {:.0} s",
            self.what,
            size(self.done),
            size(self.total),
            size(rate as u64),
            eta
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
            let _ = std::io::stderr().flush();
            self.open = true;
        } else if pct / 10 > self.last_tenth {
            self.last_tenth = pct / 10;
            eprintln!("{line}");
        }
    }

    pub fn finish(&mut self) -> f64 {
        if let Some(o) = &self.observer {
            o(
                &self.what,
                self.done,
                self.total,
                self.start.elapsed().as_secs_f64(),
            );
        } else if self.tty {
            eprintln!();
            self.open = false;
        }
        self.start.elapsed().as_secs_f64()
    }
}

/// Work that stops with an error must not leave its error message glued to
/// the end of the live line.
impl Drop for Progress {
    fn drop(&mut self) {
        if self.open {
            eprintln!();
        }
    }
}
