//! The terminal under the screens: a size for consoles that report none, a
//! colour decision from TERM, and a guard that gives the terminal back as
//! it was on every way out, a panic included.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossterm::{cursor, execute, terminal};
use ratatui::backend::CrosstermBackend;
use ratatui::layout::Rect;
use ratatui::{Terminal, TerminalOptions, Viewport};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::termios::{self, OptionalActions, Winsize};

/// How the size was found, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeFrom {
    Terminal,
    Flag,
    Asked,
    Default,
}

/// How long a terminal has to answer the cursor-position query: a serial
/// line at 9600 baud carries the reply in a few milliseconds, so a second
/// means nobody is there to answer.
const ASK_WAIT: Duration = Duration::from_secs(1);

/// A serial console reports 0x0, and ratatui then draws nothing: keep a
/// size the terminal has, else take `flag` (bmr.console=COLSxROWS), else ask
/// the terminal with a cursor-position report, else 80x24; and set it on the
/// terminal so every reader of TIOCGWINSZ (crossterm, ratatui) agrees.
/// Sizes are (cols, rows).
pub fn ensure_size(fd: impl AsFd, flag: Option<(u16, u16)>) -> io::Result<((u16, u16), SizeFrom)> {
    let fd = fd.as_fd();
    let now = termios::tcgetwinsize(fd)?;
    if now.ws_col > 0 && now.ws_row > 0 {
        return Ok(((now.ws_col, now.ws_row), SizeFrom::Terminal));
    }
    let (size, from) = match flag {
        Some(s) => (s, SizeFrom::Flag),
        None => match ask(fd, ASK_WAIT)? {
            Some(s) => (s, SizeFrom::Asked),
            None => ((80, 24), SizeFrom::Default),
        },
    };
    termios::tcsetwinsize(
        fd,
        Winsize {
            ws_col: size.0,
            ws_row: size.1,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )?;
    Ok((size, from))
}

/// Moves the cursor as far as it goes and asks where it is: the answer is
/// the terminal's size. Raw mode meanwhile, so the reply comes at once and
/// is not echoed; the previous mode is put back whatever happens.
fn ask(fd: BorrowedFd, wait: Duration) -> io::Result<Option<(u16, u16)>> {
    let saved = termios::tcgetattr(fd)?;
    let mut raw = saved.clone();
    raw.make_raw();
    termios::tcsetattr(fd, OptionalActions::Now, &raw)?;
    let result = query(fd, wait);
    let restored = termios::tcsetattr(fd, OptionalActions::Now, &saved);
    let size = result?;
    restored?;
    Ok(size)
}

fn query(fd: BorrowedFd, wait: Duration) -> io::Result<Option<(u16, u16)>> {
    let mut tty = File::from(fd.try_clone_to_owned()?);
    // Save the cursor, go to the far corner, ask, and come back.
    tty.write_all(b"\x1b7\x1b[999;999H\x1b[6n\x1b8")?;
    tty.flush()?;
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let ts = Timespec::try_from(left).map_err(io::Error::other)?;
        let mut fds = [PollFd::new(&tty, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) => break,
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let mut buf = [0u8; 64];
        match tty.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        }
        if let Some(s) = parse_cpr(&got) {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// The first `ESC [ ROW ; COL R` in `bytes`, which may follow keys typed
/// meanwhile: (cols, rows).
pub fn parse_cpr(bytes: &[u8]) -> Option<(u16, u16)> {
    (0..bytes.len()).find_map(|i| cpr_at(&bytes[i..]))
}

fn cpr_at(b: &[u8]) -> Option<(u16, u16)> {
    let b = b.strip_prefix(b"\x1b[")?;
    let (row, b) = number(b)?;
    let b = b.strip_prefix(b";")?;
    let (col, b) = number(b)?;
    b.starts_with(b"R").then_some((col, row))
}

/// Leading decimal digits, as a nonzero u16 (a terminal counts from 1).
fn number(b: &[u8]) -> Option<(u16, &[u8])> {
    let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
    let v: u16 = std::str::from_utf8(&b[..n]).ok()?.parse().ok()?;
    (v > 0).then_some((v, &b[n..]))
}

/// Colour only where TERM says the terminal has it; the Linux console and
/// serial terminals get bold and reverse video, which every one of them
/// shows. `no_color`: NO_COLOR is set (https://no-color.org).
pub fn colour_for(term: Option<&str>, no_color: bool) -> bool {
    let Some(t) = term.filter(|t| !t.is_empty()) else {
        return false;
    };
    if no_color || matches!(t, "linux" | "vt100" | "vt102" | "vt220" | "dumb") {
        return false;
    }
    ["xterm", "screen", "tmux", "rxvt"]
        .iter()
        .any(|p| t.starts_with(p))
        || t.ends_with("-256color")
}

/// A second handle on the TUI's terminal, for the panic hook, which has no
/// `Tui` to drop.
static PANIC_TTY: Mutex<Option<File>> = Mutex::new(None);

/// The terminal as it was before `Tui::enter`. Raw mode is crossterm's,
/// kept on stdin (or /dev/tty), the same terminal it reads keys from.
fn restore(tty: &mut impl Write) -> io::Result<()> {
    let shown = execute!(tty, cursor::Show, terminal::LeaveAlternateScreen);
    terminal::disable_raw_mode()?;
    shown
}

/// The screens' terminal: raw mode, alternate screen, no cursor, until
/// dropped.
pub struct Tui {
    pub terminal: Terminal<CrosstermBackend<File>>,
}

impl Tui {
    /// Raw mode, alternate screen, hidden cursor, on `tty`, the console's
    /// terminal (stdout may go to a log).
    pub fn enter(tty: File) -> io::Result<Tui> {
        if let Ok(mut g) = PANIC_TTY.lock() {
            *g = tty.try_clone().ok();
        }
        // crossterm reads the size from /dev/tty, which a process without a
        // controlling terminal lacks: then the tty's own size, fixed.
        let options = match terminal::size() {
            Ok(_) => TerminalOptions::default(),
            Err(_) => {
                let ws = termios::tcgetwinsize(&tty)?;
                TerminalOptions {
                    viewport: Viewport::Fixed(Rect::new(0, 0, ws.ws_col, ws.ws_row)),
                }
            }
        };
        let mut t = Tui {
            terminal: Terminal::with_options(CrosstermBackend::new(tty), options)?,
        };
        t.resume()?;
        Ok(t)
    }

    /// The terminal as it was, for a shell; `resume` takes it back.
    pub fn suspend(&mut self) -> io::Result<()> {
        restore(self.terminal.backend_mut())
    }

    /// Takes the terminal back and redraws all of it on the next draw.
    pub fn resume(&mut self) -> io::Result<()> {
        terminal::enable_raw_mode()?;
        execute!(
            self.terminal.backend_mut(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        self.terminal.clear()
    }
}

impl Drop for Tui {
    fn drop(&mut self) {
        let _ = restore(self.terminal.backend_mut());
        if let Ok(mut g) = PANIC_TTY.lock() {
            *g = None;
        }
    }
}

/// A panic gives the terminal back before its message is printed, so the
/// message is readable and the console usable.
pub fn install_panic_restore() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // try_lock: a panic while the lock is held must not deadlock here.
        // Only the screens' own thread gives the terminal back: a worker's
        // panic is reported on the screen, which goes on.
        let main = std::thread::current().name() == Some("main");
        if let (true, Ok(mut g)) = (main, PANIC_TTY.try_lock()) {
            if let Some(t) = g.as_mut() {
                let _ = restore(t);
            }
        }
        previous(info);
    }));
}

/// The next key (or resize, ...) within `timeout`, or None.
pub fn read_key_timeout(timeout: Duration) -> io::Result<Option<crossterm::event::Event>> {
    if crossterm::event::poll(timeout)? {
        Ok(Some(crossterm::event::read()?))
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::thread;

    #[test]
    fn parse_cpr_plain_reply() {
        assert_eq!(parse_cpr(b"\x1b[24;80R"), Some((80, 24)));
    }

    #[test]
    fn parse_cpr_skips_keys_typed_before() {
        assert_eq!(parse_cpr(b"abc\x1b[A\x1b[40;132R"), Some((132, 40)));
        assert_eq!(parse_cpr(b"\x1b[1;2\x1b[40;132R"), Some((132, 40)));
        assert_eq!(parse_cpr(b"\xff\xfe\x1b\x1b[40;132Rtail"), Some((132, 40)));
    }

    #[test]
    fn parse_cpr_rejects_partial_and_garbage() {
        for b in [
            &b""[..],
            b"\x1b[40;13",
            b"\x1b[40;",
            b"\x1b[40R",
            b"\x1b[x;yR",
            b"\x1b[0;0R",
            b"\x1b[+4;+5R",
            b"\x1b[40;100n",
            b"[40;100R",
        ] {
            assert_eq!(parse_cpr(b), None, "{b:?}");
        }
    }

    #[test]
    fn parse_cpr_large_values() {
        assert_eq!(parse_cpr(b"\x1b[999;999R"), Some((999, 999)));
        assert_eq!(parse_cpr(b"\x1b[65535;65535R"), Some((65535, 65535)));
        assert_eq!(parse_cpr(b"\x1b[65536;80R"), None);
    }

    #[test]
    fn colour_only_where_the_terminal_has_it() {
        for t in ["linux", "vt100", "vt102", "vt220", "dumb", ""] {
            assert!(!colour_for(Some(t), false), "{t}");
        }
        assert!(!colour_for(None, false));
        for t in [
            "xterm",
            "xterm-256color",
            "screen",
            "screen.xterm-256color",
            "tmux-256color",
            "rxvt-unicode",
            "foot-256color",
        ] {
            assert!(colour_for(Some(t), false), "{t}");
            assert!(!colour_for(Some(t), true), "{t} with NO_COLOR");
        }
    }

    /// A pseudo-terminal of that size: (master, slave).
    fn pty(cols: u16, rows: u16) -> (File, OwnedFd) {
        let p = nix::pty::openpty(None, None).expect("openpty");
        termios::tcsetwinsize(
            &p.slave,
            Winsize {
                ws_col: cols,
                ws_row: rows,
                ws_xpixel: 0,
                ws_ypixel: 0,
            },
        )
        .expect("set size");
        (File::from(p.master), p.slave)
    }

    type Outcome = io::Result<((u16, u16), SizeFrom)>;

    /// ensure_size on the slave, in a thread, as bmr would run it.
    fn sizing(slave: OwnedFd, flag: Option<(u16, u16)>) -> thread::JoinHandle<(Outcome, OwnedFd)> {
        thread::spawn(move || (ensure_size(&slave, flag), slave))
    }

    /// What the slave wrote to the master within `wait`.
    fn output(master: &File, wait: Duration) -> Vec<u8> {
        let mut m = master;
        let mut seen = Vec::new();
        let deadline = Instant::now() + wait;
        while !seen.windows(4).any(|w| w == b"\x1b[6n") {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            let ts = Timespec::try_from(left).expect("timespec");
            let mut fds = [PollFd::new(master, PollFlags::IN)];
            if poll(&mut fds, Some(&ts)).expect("poll") == 0 {
                break;
            }
            let mut buf = [0u8; 64];
            let n = m.read(&mut buf).expect("read");
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    }

    fn size_of(fd: &OwnedFd) -> (u16, u16) {
        let ws = termios::tcgetwinsize(fd).expect("size");
        (ws.ws_col, ws.ws_row)
    }

    #[test]
    fn ensure_size_asks_a_terminal_without_one() {
        let (mut master, slave) = pty(0, 0);
        let before = termios::tcgetattr(&slave).expect("termios");
        let job = sizing(slave, None);
        let seen = output(&master, Duration::from_secs(5));
        let query = b"\x1b[999;999H\x1b[6n";
        assert!(seen.windows(query.len()).any(|w| w == query), "{seen:?}");
        // A key typed at the same time comes first.
        master.write_all(b"q\x1b[40;100R").expect("answer");
        let (got, slave) = job.join().expect("thread");
        assert_eq!(got.expect("ensure_size"), ((100, 40), SizeFrom::Asked));
        assert_eq!(size_of(&slave), (100, 40));
        let after = termios::tcgetattr(&slave).expect("termios");
        assert_eq!(after.local_modes, before.local_modes, "mode restored");
    }

    #[test]
    fn ensure_size_takes_the_flag_without_asking() {
        let (master, slave) = pty(0, 0);
        let (got, slave) = sizing(slave, Some((132, 43))).join().expect("thread");
        assert_eq!(got.expect("ensure_size"), ((132, 43), SizeFrom::Flag));
        assert_eq!(size_of(&slave), (132, 43));
        assert_eq!(output(&master, Duration::from_millis(100)), b"");
    }

    #[test]
    fn ensure_size_keeps_a_size_the_terminal_has() {
        let (master, slave) = pty(90, 30);
        let (got, slave) = sizing(slave, Some((132, 43))).join().expect("thread");
        assert_eq!(got.expect("ensure_size"), ((90, 30), SizeFrom::Terminal));
        assert_eq!(size_of(&slave), (90, 30));
        assert_eq!(output(&master, Duration::from_millis(100)), b"");
    }

    #[test]
    fn ensure_size_defaults_when_nothing_answers() {
        let (master, slave) = pty(0, 0);
        let t = Instant::now();
        let job = sizing(slave, None);
        let seen = output(&master, Duration::from_secs(5));
        assert!(seen.windows(4).any(|w| w == b"\x1b[6n"), "{seen:?}");
        let (got, slave) = job.join().expect("thread");
        assert_eq!(got.expect("ensure_size"), ((80, 24), SizeFrom::Default));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(size_of(&slave), (80, 24));
    }

    #[test]
    fn restore_shows_the_cursor_and_leaves_the_alternate_screen() {
        let mut out = Vec::new();
        // Raw mode was never enabled here, so disabling it is a no-op.
        restore(&mut out).expect("restore");
        assert_eq!(out, b"\x1b[?25h\x1b[?1049l");
    }
}
