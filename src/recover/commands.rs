//! The manifest's `[[commands]]` (seed 000's asr.sif `[COMMANDS]`): each run
//! with a time limit, its output streamed to the log, and a decision per
//! `critical` and `on_error` about what recovery does when one fails.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::manifest::{Command, OnError};

/// How long a timed-out command's process group has between SIGTERM and
/// SIGKILL to clean up (unmount, flush) after itself.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// How long to keep reading output after the command itself has exited: a
/// command may leave a daemon behind that holds the pipes open forever.
const DRAIN: Duration = Duration::from_secs(2);

const TICK: Duration = Duration::from_millis(50);
const TAIL_LINES: usize = 40;
const TAIL_BYTES: usize = 8 * 1024;
/// Progress bars redraw with `\r` and never end a line; a cap keeps one
/// such "line" from growing without bound.
const MAX_LINE: usize = 4 * 1024;

/// How one run of a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    Ok,
    Failed {
        code: Option<i32>,
        signal: Option<i32>,
    },
    TimedOut {
        after_secs: u64,
    },
    NotStarted {
        error: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub sequence: u32,
    pub program: String,
    pub args: Vec<String>,
    pub status: Status,
    pub seconds: f64,
    /// 1 for the first run, 2 for the run after an operator's shell.
    pub attempts: u32,
    /// Last lines of merged stdout+stderr (at most 40 lines / 8 KiB).
    pub output_tail: Vec<String>,
}

/// What the caller does after a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Continue,
    Abort(String),
    Shell,
}

/// Phase-`phase` commands in sequence order (stable for equal sequences).
pub fn of_phase(cmds: &[Command], phase: u8) -> Vec<&Command> {
    let mut v: Vec<&Command> = cmds.iter().filter(|c| c.phase == phase).collect();
    v.sort_by_key(|c| c.sequence);
    v
}

/// Plain-words description of a status, used in Abort reasons and reports.
pub fn describe(status: &Status) -> String {
    match status {
        Status::Ok => "succeeded".to_string(),
        Status::Failed { code: Some(c), .. } => format!("exited with status {c}"),
        Status::Failed {
            signal: Some(s), ..
        } => match Signal::try_from(*s) {
            Ok(sig) => format!("killed by signal {s} ({})", sig.as_str()),
            Err(_) => format!("killed by signal {s}"),
        },
        Status::Failed { .. } => "failed".to_string(),
        Status::TimedOut { after_secs } => format!("timed out after {after_secs} s"),
        Status::NotStarted { error } => format!("could not be started: {error}"),
    }
}

/// The decision after a command's outcome, per seed 000: a failure goes by
/// `on_error`, except that a critical command never lets recovery carry on
/// past it, and `bmr.lock` allows no shell.
pub fn next(cmd: &Command, outcome: &Outcome, lock: bool) -> Next {
    if outcome.status == Status::Ok {
        return Next::Continue;
    }
    let how = describe(&outcome.status);
    let abort = |why: &str| Next::Abort(format!("{} {how}{why}", who(cmd)));
    match cmd.on_error {
        OnError::Abort => abort(""),
        OnError::Shell if !lock => Next::Shell,
        OnError::Shell if cmd.critical => abort(", and it is critical (bmr.lock allows no shell)"),
        OnError::Continue if cmd.critical => abort(", and it is critical"),
        OnError::Shell | OnError::Continue => Next::Continue,
    }
}

/// "command 3 (update-grub: rebuild the boot menu)": enough for the operator
/// to find it in the manifest.
fn who(cmd: &Command) -> String {
    if cmd.description.is_empty() {
        format!("command {} ({})", cmd.sequence, cmd.program)
    } else {
        format!(
            "command {} ({}: {})",
            cmd.sequence, cmd.program, cmd.description
        )
    }
}

/// Runs the commands in order. `done(seq)` names those an earlier,
/// interrupted run already completed; they are skipped. `record` sees every
/// outcome as soon as it is known (the caller journals it). On `Next::Shell`,
/// `shell` is called and the command then runs once more; a second failure is
/// judged as if `on_error` were `continue` (critical → abort).
///
/// Returns every outcome (a command retried after a shell has two), and
/// Err(reason) if recovery must stop.
#[allow(clippy::too_many_arguments)]
pub fn run_all(
    cmds: &[&Command],
    env: &[(String, String)],
    dir: &Path,
    lock: bool,
    done: &dyn Fn(u32) -> bool,
    record: &mut dyn FnMut(&Outcome),
    shell: &mut dyn FnMut(&Command, &Outcome),
    log: &mut dyn FnMut(&str),
) -> (Vec<Outcome>, Result<(), String>) {
    let mut outcomes = Vec::new();
    for &cmd in cmds {
        if done(cmd.sequence) {
            log(&format!("[{}] already done, skipped", cmd.sequence));
            continue;
        }
        let first = run_one(cmd, env, dir, log);
        record(&first);
        let mut decision = next(cmd, &first, lock);
        if decision == Next::Shell {
            shell(cmd, &first);
            let mut again = run_one(cmd, env, dir, log);
            again.attempts = first.attempts + 1;
            record(&again);
            let no_second_shell = Command {
                on_error: OnError::Continue,
                ..cmd.clone()
            };
            decision = next(&no_second_shell, &again, lock);
            outcomes.push(first);
            outcomes.push(again);
        } else {
            outcomes.push(first);
        }
        if let Next::Abort(reason) = decision {
            return (outcomes, Err(reason));
        }
    }
    (outcomes, Ok(()))
}

/// Runs `cmd` with `env` added, in `dir`, stdin from /dev/null, in its own
/// process group, streaming each line of its merged stdout and stderr to
/// `log` as `"[{sequence}] line"`. On timeout the whole group gets SIGTERM,
/// then SIGKILL after [`KILL_GRACE`]. Never fails: a program that cannot be
/// started is `Status::NotStarted`.
///
/// Children the command leaves running when it exits on its own (a daemon it
/// started) are left alone; their output is no longer waited for after a
/// short drain.
pub fn run_one(
    cmd: &Command,
    env: &[(String, String)],
    dir: &Path,
    log: &mut dyn FnMut(&str),
) -> Outcome {
    run_with(cmd, env, dir, KILL_GRACE, log)
}

fn run_with(
    cmd: &Command,
    env: &[(String, String)],
    dir: &Path,
    grace: Duration,
    log: &mut dyn FnMut(&str),
) -> Outcome {
    let start = Instant::now();
    let seq = cmd.sequence;
    log(&format!(
        "[{seq}] $ {} (time limit {} s)",
        shell_words(cmd),
        cmd.timeout_secs
    ));
    let mut tail = Tail::default();
    let status = match spawn(cmd, env, dir) {
        Ok((child, rx)) => supervise(cmd, child, rx, grace, &mut |line| {
            log(&format!("[{seq}] {line}"));
            tail.push(line);
        }),
        Err(error) => Status::NotStarted { error },
    };
    let seconds = start.elapsed().as_secs_f64();
    log(&format!("[{seq}] {} ({seconds:.1} s)", describe(&status)));
    Outcome {
        sequence: seq,
        program: cmd.program.clone(),
        args: cmd.args.clone(),
        status,
        seconds,
        attempts: 1,
        output_tail: tail.lines.into(),
    }
}

/// The command line as the operator would type it, for the log.
fn shell_words(cmd: &Command) -> String {
    let quote = |s: &str| {
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
        {
            s.to_string()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    std::iter::once(cmd.program.as_str())
        .chain(cmd.args.iter().map(String::as_str))
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts the command with both output pipes read by threads into one
/// channel, so lines arrive roughly in the order they were written.
fn spawn(
    cmd: &Command,
    env: &[(String, String)],
    dir: &Path,
) -> Result<(Child, Receiver<String>), String> {
    // A missing working directory fails spawn with the same ENOENT as a
    // missing program; say which it was.
    if !dir.is_dir() {
        return Err(format!(
            "working directory {} does not exist",
            dir.display()
        ));
    }
    let mut child = std::process::Command::new(&cmd.program)
        .args(&cmd.args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so a timeout can kill everything it started.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{}: {}", cmd.program, os_error(&e)))?;
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        pump(out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        pump(err, tx);
    }
    Ok((child, rx))
}

/// "No such file or directory" rather than "... (os error 2)".
fn os_error(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

/// Reads lines from `src` into `tx` on a thread of its own. The thread keeps
/// reading after the receiver is gone, so a daemon left holding the pipe
/// does not die of SIGPIPE because we stopped listening.
fn pump(src: impl Read + Send + 'static, tx: Sender<String>) {
    thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut line = Vec::new();
        let emit = |line: &mut Vec<u8>| {
            let text = String::from_utf8_lossy(line);
            let _ = tx.send(text.trim_end_matches('\r').to_string());
            line.clear();
        };
        loop {
            let buf = match r.fill_buf() {
                Ok([]) => break,
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let window = &buf[..buf.len().min(MAX_LINE - line.len())];
            let used = match window.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    line.extend_from_slice(&window[..i]);
                    emit(&mut line);
                    i + 1
                }
                None => {
                    line.extend_from_slice(window);
                    if line.len() >= MAX_LINE {
                        emit(&mut line);
                    }
                    window.len()
                }
            };
            r.consume(used);
        }
        if !line.is_empty() {
            emit(&mut line);
        }
    });
}

enum Stage {
    Running,
    /// SIGTERM sent at this instant.
    Terminating(Instant),
    Killed,
}

/// Waits for the child, passing each output line to `line`, and enforces the
/// time limit on its whole process group.
fn supervise(
    cmd: &Command,
    mut child: Child,
    rx: Receiver<String>,
    grace: Duration,
    line: &mut dyn FnMut(&str),
) -> Status {
    let pgid = Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + Duration::from_secs(cmd.timeout_secs);
    let mut stage = Stage::Running;
    let mut exit: Option<(Option<ExitStatus>, Instant)> = None;
    let mut output_open = true;
    loop {
        if output_open {
            match rx.recv_timeout(TICK) {
                Ok(l) => line(&l),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => output_open = false,
            }
        } else {
            thread::sleep(TICK);
        }
        if exit.is_none() {
            match child.try_wait() {
                Ok(Some(s)) => exit = Some((Some(s), Instant::now())),
                Ok(None) => {}
                // Only if the child was reaped behind our back: nothing
                // more to learn about how it ended.
                Err(_) => exit = Some((None, Instant::now())),
            }
        }
        let now = Instant::now();
        stage = match stage {
            Stage::Running if exit.is_none() && now >= deadline => {
                let _ = killpg(pgid, Signal::SIGTERM);
                Stage::Terminating(now)
            }
            Stage::Terminating(_) if exit.is_some() && group_gone(pgid) => Stage::Killed,
            Stage::Terminating(at) if now >= at + grace => {
                let _ = killpg(pgid, Signal::SIGKILL);
                Stage::Killed
            }
            s => s,
        };
        if let (Some((_, at)), false) = (exit, matches!(stage, Stage::Terminating(_))) {
            if !output_open || now >= at + DRAIN {
                break;
            }
        }
    }
    // Any line already queued is still worth showing.
    while let Ok(l) = rx.try_recv() {
        line(&l);
    }
    if !matches!(stage, Stage::Running) {
        return Status::TimedOut {
            after_secs: cmd.timeout_secs,
        };
    }
    match exit.and_then(|(s, _)| s) {
        Some(s) if s.success() => Status::Ok,
        Some(s) => Status::Failed {
            code: s.code(),
            signal: s.signal(),
        },
        None => Status::Failed {
            code: None,
            signal: None,
        },
    }
}

/// True once no process is left in the group. Members that are zombies
/// (waiting for init to reap them) still count, which only costs the grace.
fn group_gone(pgid: Pid) -> bool {
    killpg(pgid, None) == Err(Errno::ESRCH)
}

/// The last lines of output, bounded in count and bytes.
#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    fn push(&mut self, line: &str) {
        self.bytes += line.len();
        self.lines.push_back(line.to_string());
        while self.lines.len() > TAIL_LINES || (self.bytes > TAIL_BYTES && self.lines.len() > 1) {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::cell::RefCell;
    use std::fs;
    use std::path::PathBuf;

    fn sh(seq: u32, script: &str) -> Command {
        Command {
            sequence: seq,
            phase: 2,
            critical: false,
            timeout_secs: 10,
            program: "/bin/sh".to_string(),
            args: vec!["-c".to_string(), script.to_string()],
            on_error: OnError::Continue,
            description: String::new(),
        }
    }

    fn run(cmd: &Command) -> (Outcome, Vec<String>) {
        run_in(cmd, &[], Path::new("/"))
    }

    fn run_in(cmd: &Command, env: &[(String, String)], dir: &Path) -> (Outcome, Vec<String>) {
        let mut log = Vec::new();
        let o = run_with(cmd, env, dir, Duration::from_secs(1), &mut |l| {
            log.push(l.to_string())
        });
        (o, log)
    }

    /// Gone, or a zombie that only init can reap now.
    fn dead(pid: &str) -> bool {
        match fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    fn wait_dead(pid: &str) -> bool {
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if dead(pid) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        dead(pid)
    }

    #[test]
    fn output_is_logged_in_order_and_the_tail_is_bounded() {
        let (o, log) = run(&sh(
            7,
            "i=1; while [ $i -le 100 ]; do echo line $i; i=$((i+1)); done",
        ));
        assert_eq!(o.status, Status::Ok);
        assert_eq!(o.attempts, 1);
        assert_eq!(o.sequence, 7);
        let out: Vec<_> = log.iter().filter(|l| l.starts_with("[7] line ")).collect();
        let want: Vec<_> = (1..=100).map(|i| format!("[7] line {i}")).collect();
        assert_eq!(out, want.iter().collect::<Vec<_>>());
        let tail: Vec<_> = (61..=100).map(|i| format!("line {i}")).collect();
        assert_eq!(o.output_tail, tail);
    }

    #[test]
    fn stderr_is_merged_and_long_lines_are_split() {
        let (o, log) = run(&sh(
            1,
            "echo out; echo err >&2; head -c 20000 /dev/zero | tr '\\0' x",
        ));
        assert_eq!(o.status, Status::Ok);
        assert!(log.contains(&"[1] out".to_string()));
        assert!(log.contains(&"[1] err".to_string()));
        let xs: Vec<_> = log.iter().filter(|l| l.starts_with("[1] x")).collect();
        assert_eq!(xs.len(), 5, "20000 bytes in lines of at most 4096");
        assert!(o.output_tail.iter().map(String::len).sum::<usize>() <= TAIL_BYTES);
        // "err" comes through another pipe and may arrive after the x's.
        assert!(o.output_tail.iter().any(|l| l.len() == MAX_LINE));
    }

    #[test]
    fn a_non_zero_exit_is_a_failure_with_its_code() {
        let (o, _) = run(&sh(1, "exit 3"));
        assert_eq!(
            o.status,
            Status::Failed {
                code: Some(3),
                signal: None
            }
        );
        assert_eq!(describe(&o.status), "exited with status 3");
    }

    #[test]
    fn a_signal_is_reported_as_such() {
        let (o, _) = run(&sh(1, "kill -9 $$"));
        assert_eq!(
            o.status,
            Status::Failed {
                code: None,
                signal: Some(9)
            }
        );
        assert_eq!(describe(&o.status), "killed by signal 9 (SIGKILL)");
    }

    #[test]
    fn a_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut c = sh(
            1,
            &format!(
                "sleep 100 & echo $! > {}; echo started; sleep 100",
                pidfile.display()
            ),
        );
        c.timeout_secs = 1;
        let t = Instant::now();
        let (o, log) = run(&c);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        assert_eq!(o.status, Status::TimedOut { after_secs: 1 });
        assert_eq!(describe(&o.status), "timed out after 1 s");
        assert!(log.contains(&"[1] started".to_string()));
        let pid = fs::read_to_string(&pidfile).unwrap();
        assert!(wait_dead(&pid), "grandchild {pid} survived");
    }

    #[test]
    fn a_group_ignoring_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // An ignored signal stays ignored across exec, so sleep ignores it too.
        let mut c = sh(
            1,
            &format!(
                "trap '' TERM; sleep 100 & echo $! > {}; sleep 100",
                pidfile.display()
            ),
        );
        c.timeout_secs = 1;
        let t = Instant::now();
        let (o, _) = run(&c);
        assert!(t.elapsed() >= Duration::from_secs(2), "no grace given");
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "took {:?}",
            t.elapsed()
        );
        assert_eq!(o.status, Status::TimedOut { after_secs: 1 });
        let pid = fs::read_to_string(&pidfile).unwrap();
        assert!(wait_dead(&pid), "grandchild {pid} survived");
    }

    #[test]
    fn a_daemon_left_behind_does_not_hold_us_forever() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let c = sh(1, &format!("sleep 100 & echo $! > {}", pidfile.display()));
        let t = Instant::now();
        let (o, _) = run(&c);
        let pid = fs::read_to_string(&pidfile).unwrap();
        let pid = Pid::from_raw(pid.trim().parse().unwrap());
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        assert_eq!(o.status, Status::Ok);
        assert!(t.elapsed() < DRAIN + Duration::from_secs(2));
    }

    #[test]
    fn a_missing_program_is_not_started() {
        let mut c = sh(4, "");
        c.program = "/nonexistent/bmr-no-such-tool".to_string();
        let (o, log) = run(&c);
        let Status::NotStarted { error } = &o.status else {
            panic!("{:?}", o.status)
        };
        assert!(error.contains("bmr-no-such-tool"), "{error}");
        assert!(error.contains("No such file or directory"), "{error}");
        assert!(describe(&o.status).starts_with("could not be started: "));
        assert!(log.last().unwrap().starts_with("[4] could not be started"));
    }

    #[test]
    fn a_missing_directory_is_named_as_such() {
        let (o, _) = run_in(&sh(1, "true"), &[], Path::new("/nonexistent/bmr-dir"));
        let Status::NotStarted { error } = &o.status else {
            panic!("{:?}", o.status)
        };
        assert!(
            error.contains("working directory /nonexistent/bmr-dir"),
            "{error}"
        );
    }

    #[test]
    fn env_and_cwd_are_passed() {
        let dir = tempfile::tempdir().unwrap();
        let env = [("BMR_TEST_VAR".to_string(), "hello there".to_string())];
        let (o, _) = run_in(&sh(1, "echo \"$BMR_TEST_VAR\"; pwd -P"), &env, dir.path());
        assert_eq!(o.status, Status::Ok);
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(
            o.output_tail,
            vec!["hello there".to_string(), cwd.display().to_string()]
        );
    }

    fn outcome(c: &Command, status: Status) -> Outcome {
        Outcome {
            sequence: c.sequence,
            program: c.program.clone(),
            args: c.args.clone(),
            status,
            seconds: 0.0,
            attempts: 1,
            output_tail: vec![],
        }
    }

    #[test]
    fn the_decision_table() {
        let failures = [
            Status::Failed {
                code: Some(3),
                signal: None,
            },
            Status::Failed {
                code: None,
                signal: Some(9),
            },
            Status::TimedOut { after_secs: 30 },
            Status::NotStarted {
                error: "x: No such file or directory".to_string(),
            },
        ];
        for critical in [false, true] {
            for on_error in [OnError::Abort, OnError::Continue, OnError::Shell] {
                for lock in [false, true] {
                    let mut c = sh(3, "true");
                    c.critical = critical;
                    c.on_error = on_error;
                    c.description = "rebuild the boot menu".to_string();
                    let ok = outcome(&c, Status::Ok);
                    assert_eq!(next(&c, &ok, lock), Next::Continue);
                    for f in &failures {
                        let got = next(&c, &outcome(&c, f.clone()), lock);
                        let abort = match (on_error, lock) {
                            (OnError::Abort, _) => true,
                            (OnError::Shell, false) => {
                                assert_eq!(got, Next::Shell);
                                continue;
                            }
                            _ => critical,
                        };
                        let case = format!("{critical} {on_error:?} {lock} {f:?}");
                        if abort {
                            let Next::Abort(r) = &got else {
                                panic!("{case}: {got:?}")
                            };
                            assert!(
                                r.starts_with("command 3 (/bin/sh: rebuild the boot menu) "),
                                "{case}: {r}"
                            );
                            assert!(r.contains(&describe(f)), "{case}: {r}");
                        } else {
                            assert_eq!(got, Next::Continue, "{case}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn abort_reasons_in_plain_words() {
        let mut c = sh(5, "true");
        c.program = "update-grub".to_string();
        c.critical = true;
        let r = |s| match next(&c, &outcome(&c, s), true) {
            Next::Abort(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            r(Status::TimedOut { after_secs: 30 }),
            "command 5 (update-grub) timed out after 30 s, and it is critical"
        );
        assert_eq!(
            r(Status::NotStarted {
                error: "update-grub: No such file or directory".to_string()
            }),
            "command 5 (update-grub) could not be started: update-grub: No such file or directory, and it is critical"
        );
    }

    #[test]
    fn phases_are_filtered_and_ordered_stably() {
        let mut cmds = Vec::new();
        for (seq, phase, name) in [(3, 2, "c"), (1, 2, "a"), (2, 1, "x"), (1, 2, "b")] {
            let mut c = sh(seq, "true");
            c.phase = phase;
            c.description = name.to_string();
            cmds.push(c);
        }
        let names: Vec<_> = of_phase(&cmds, 2)
            .iter()
            .map(|c| c.description.as_str())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(of_phase(&cmds, 1).len(), 1);
        assert!(of_phase(&cmds, 3).is_empty());
    }

    struct Run {
        outcomes: Vec<Outcome>,
        result: Result<(), String>,
        recorded: Vec<(u32, u32)>,
        shells: Vec<u32>,
    }

    fn all(cmds: &[Command], lock: bool, done: &[u32], on_shell: &dyn Fn(&Command)) -> Run {
        let refs: Vec<&Command> = cmds.iter().collect();
        let recorded = RefCell::new(Vec::new());
        let mut shells = Vec::new();
        let (outcomes, result) = run_all(
            &refs,
            &[],
            Path::new("/"),
            lock,
            &|s| done.contains(&s),
            &mut |o| recorded.borrow_mut().push((o.sequence, o.attempts)),
            &mut |c, _| {
                shells.push(c.sequence);
                on_shell(c);
            },
            &mut |_| {},
        );
        Run {
            outcomes,
            result,
            recorded: recorded.into_inner(),
            shells,
        }
    }

    fn seqs(r: &Run) -> Vec<u32> {
        r.outcomes.iter().map(|o| o.sequence).collect()
    }

    #[test]
    fn run_all_skips_done_and_continues_past_non_critical_failures() {
        let cmds = [sh(1, "exit 1"), sh(2, "exit 1"), sh(3, "true")];
        let r = all(&cmds, false, &[1], &|_| {});
        assert_eq!(r.result, Ok(()));
        assert_eq!(seqs(&r), [2, 3]);
        assert_eq!(r.recorded, [(2, 1), (3, 1)]);
    }

    #[test]
    fn run_all_stops_at_a_critical_failure() {
        let mut cmds = [sh(1, "true"), sh(2, "exit 4"), sh(3, "true")];
        cmds[1].critical = true;
        let r = all(&cmds, false, &[], &|_| {});
        let err = r.result.as_ref().unwrap_err();
        assert!(
            err.contains("command 2") && err.contains("exited with status 4"),
            "{err}"
        );
        assert_eq!(seqs(&r), [1, 2]);
    }

    fn marker_cmds(dir: &Path) -> (PathBuf, [Command; 2]) {
        let marker = dir.join("fixed");
        let mut c = sh(1, &format!("test -f {}", marker.display()));
        c.on_error = OnError::Shell;
        c.critical = true;
        (marker, [c, sh(2, "true")])
    }

    #[test]
    fn run_all_offers_a_shell_then_retries() {
        let dir = tempfile::tempdir().unwrap();
        let (marker, cmds) = marker_cmds(dir.path());
        let r = all(&cmds, false, &[], &|_| fs::write(&marker, "").unwrap());
        assert_eq!(r.result, Ok(()));
        assert_eq!(r.shells, [1]);
        assert_eq!(r.recorded, [(1, 1), (1, 2), (2, 1)]);
        assert_eq!(r.outcomes[1].status, Status::Ok);
    }

    #[test]
    fn a_retry_that_fails_again_is_judged_as_continue() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut cmds) = marker_cmds(dir.path());
        let r = all(&cmds, false, &[], &|_| {});
        assert_eq!(r.shells, [1], "only one shell per command");
        assert!(r.result.as_ref().unwrap_err().contains("it is critical"));
        assert_eq!(seqs(&r), [1, 1]);

        cmds[0].critical = false;
        let r = all(&cmds, false, &[], &|_| {});
        assert_eq!(r.result, Ok(()));
        assert_eq!(r.recorded, [(1, 1), (1, 2), (2, 1)]);
    }

    #[test]
    fn under_lock_there_is_no_shell() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut cmds) = marker_cmds(dir.path());
        let r = all(&cmds, true, &[], &|_| {});
        assert!(r.shells.is_empty());
        assert!(r.result.unwrap_err().contains("bmr.lock allows no shell"));

        cmds[0].critical = false;
        let r = all(&cmds, true, &[], &|_| {});
        assert!(r.shells.is_empty());
        assert_eq!(r.result, Ok(()));
        assert_eq!(seqs(&r), [1, 2]);
    }

    #[test]
    fn outcomes_serialise_with_a_status_tag() {
        let c = sh(1, "true");
        let o = outcome(&c, Status::TimedOut { after_secs: 9 });
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["status"]["status"], "timed_out");
        assert_eq!(v["status"]["after_secs"], 9);
    }
}
