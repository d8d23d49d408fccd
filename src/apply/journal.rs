//! The apply journal: which destructive steps of which plan are done, so a
//! run cut short (power loss, a killed process) continues instead of redoing
//! them. JSON, replaced atomically after every step.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// BLAKE3 of the plan (JSON): a journal only counts for the plan it was written for.
    pub plan: String,
    pub state: State,
    pub steps: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    Done,
    Failed,
}

pub struct Journal {
    path: PathBuf,
    pub record: Record,
    /// Steps found done from an earlier run of the same plan.
    pub resumed: bool,
}

impl Journal {
    /// Opens the journal for `plan_id`, continuing an unfinished run of the
    /// same plan; anything else starts afresh.
    pub fn open(path: &Path, plan_id: &str) -> Result<Journal> {
        let old: Option<Record> = fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let (record, resumed) = match old {
            Some(r) if r.plan == plan_id && r.state == State::Running => (r, true),
            _ => (
                Record {
                    plan: plan_id.to_string(),
                    state: State::Running,
                    steps: Vec::new(),
                },
                false,
            ),
        };
        let mut j = Journal {
            path: path.to_path_buf(),
            record,
            resumed,
        };
        j.save()?;
        Ok(j)
    }

    pub fn done(&self, step: &str) -> bool {
        self.record.steps.iter().any(|s| s == step)
    }

    pub fn record(&mut self, step: &str) -> Result<()> {
        self.record.steps.push(step.to_string());
        self.save()
    }

    pub fn finish(&mut self, state: State) -> Result<()> {
        self.record.state = state;
        self.save()
    }

    fn save(&mut self) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = fs::File::create(&tmp)
            .with_context(|| format!("writing the journal {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(&self.record)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)
            .with_context(|| format!("writing the journal {}", self.path.display()))?;
        // The rename itself must survive a power cut, not only the bytes.
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumes_only_the_same_unfinished_plan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.json");
        let mut j = Journal::open(&path, "plan-a").unwrap();
        assert!(!j.resumed);
        j.record("table:/dev/vdb").unwrap();
        drop(j);

        let j = Journal::open(&path, "plan-a").unwrap();
        assert!(j.resumed && j.done("table:/dev/vdb") && !j.done("mkfs:root"));
        drop(j);

        let j = Journal::open(&path, "plan-b").unwrap();
        assert!(
            !j.resumed && !j.done("table:/dev/vdb"),
            "another plan starts afresh"
        );
        let mut j = Journal::open(&path, "plan-b").unwrap();
        j.record("x").unwrap();
        j.finish(State::Done).unwrap();
        let j = Journal::open(&path, "plan-b").unwrap();
        assert!(!j.resumed, "a finished run is not resumed");
    }
}
