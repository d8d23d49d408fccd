//! The `bmr.*` kernel command-line flags. Dotted flags never reach init's
//! environment (the kernel takes them for module parameters), so /init reads
//! `/proc/cmdline` and splits it the way the kernel's `next_arg` does.
//! A flag with a bad value or an unknown name becomes a warning: PID 1 must
//! boot on, and the operator must see what was not understood.

use std::path::PathBuf;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The operator at the console: the default when nothing is said.
    #[default]
    Guided,
    Auto,
    Shell,
}

/// Steps `bmr.break=` can stop before, in boot order.
pub const STEPS: &[&str] = &["udev", "medium", "drivers", "recover"];

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Flags {
    pub mode: Mode,
    /// Device, `LABEL=…`, `UUID=…` (as `--medium`).
    pub medium: Option<String>,
    /// `tape:/dev/nst0`, `file:…`, `http(s)://…`.
    pub source: Option<String>,
    /// Saved disk -> target device, as `--map` (`disk0:/dev/vda` or `disk0=/dev/vda`).
    pub map: Vec<(String, String)>,
    /// Disks unattended recovery may destroy (`all` allowed), as `--disk`.
    pub wipe: Vec<String>,
    pub key: Option<PathBuf>,
    pub phase: u8,
    pub breaks: Vec<String>,
    pub lock: bool,
    pub debug: bool,
    /// Terminal size for a serial console that reports none.
    pub console_size: Option<(u16, u16)>,
    /// The kernel's own `console=` values, last one is /dev/console.
    pub consoles: Vec<String>,
    pub warnings: Vec<String>,
}

impl Flags {
    pub fn stops_before(&self, step: &str) -> bool {
        self.breaks.iter().any(|b| b == step)
    }
}

/// Splits a command line into `(name, value)` pairs like the kernel:
/// whitespace separates, double quotes group, and the quotes around a whole
/// argument or around its value are dropped.
pub fn split(line: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in line.chars() {
        if c == '"' {
            quoted = !quoted;
        } else if c.is_whitespace() && !quoted {
            if started {
                out.push(arg(&cur));
                cur.clear();
                started = false;
            }
            continue;
        }
        cur.push(c);
        started = true;
    }
    if started {
        out.push(arg(&cur));
    }
    out
}

fn arg(raw: &str) -> (String, Option<String>) {
    let unq = |s: &str| {
        let s = s.strip_prefix('"').unwrap_or(s);
        s.strip_suffix('"').unwrap_or(s).to_string()
    };
    let whole = raw.starts_with('"');
    let raw = if whole { &raw[1..] } else { raw };
    match raw.split_once('=') {
        Some((k, v)) => (k.replace('"', ""), Some(unq(v))),
        None => (unq(raw), None),
    }
}

pub fn parse(line: &str) -> Flags {
    let mut f = Flags {
        phase: 1,
        ..Flags::default()
    };
    for (name, value) in split(line) {
        if name == "console" {
            f.consoles.extend(value);
            continue;
        }
        let Some(flag) = name.strip_prefix("bmr.") else {
            continue;
        };
        if let Err(e) = apply(&mut f, flag, value.as_deref()) {
            f.warnings
                .push(format!("kernel flag bmr.{flag}: {e}; ignored"));
        }
    }
    f
}

fn apply(f: &mut Flags, flag: &str, value: Option<&str>) -> Result<(), String> {
    let need = || match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err("needs a value".to_string()),
    };
    match flag {
        "mode" => {
            f.mode = match need()? {
                "guided" => Mode::Guided,
                "auto" => Mode::Auto,
                "shell" => Mode::Shell,
                v => return Err(format!("\"{v}\" is not guided, auto or shell")),
            }
        }
        "medium" => f.medium = Some(need()?.to_string()),
        "source" => {
            let v = need()?;
            crate::recover::source(v).map_err(|e| e.to_string())?;
            f.source = Some(v.to_string());
        }
        "target" => {
            let v = need()?;
            if v != "auto" {
                f.map = v.split(',').map(map_entry).collect::<Result<_, _>>()?;
            }
        }
        "wipe" => f.wipe.extend(
            need()?
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        ),
        "key" => f.key = Some(PathBuf::from(need()?)),
        "phase" => {
            f.phase = match need()? {
                "1" => 1,
                "2" => 2,
                v => return Err(format!("\"{v}\" is not 1 or 2")),
            }
        }
        "break" => {
            for step in need()?.split(',') {
                if !STEPS.contains(&step) {
                    return Err(format!(
                        "\"{step}\" is not a step (one of {})",
                        STEPS.join(", ")
                    ));
                }
                f.breaks.push(step.to_string());
            }
        }
        "lock" => f.lock = switch(value)?,
        "debug" => f.debug = switch(value)?,
        "console" => {
            let v = need()?;
            let (c, r) = v
                .split_once('x')
                .and_then(|(c, r)| Some((c.parse().ok()?, r.parse().ok()?)))
                .filter(|&(c, r): &(u16, u16)| c >= 20 && r >= 10)
                .ok_or_else(|| format!("\"{v}\" is not COLSxROWS, e.g. 80x24"))?;
            f.console_size = Some((c, r));
        }
        _ => return Err("unknown flag (see the README for the bmr.* flags)".to_string()),
    }
    Ok(())
}

/// A bare flag or an explicit boolean, as the kernel's own bool parameters.
fn switch(value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("1" | "y" | "yes" | "on" | "true") => Ok(true),
        Some("0" | "n" | "no" | "off" | "false") => Ok(false),
        Some(v) => Err(format!("\"{v}\" is not a yes/no value")),
    }
}

fn map_entry(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .or_else(|| s.split_once(':'))
        .filter(|(k, v)| !k.is_empty() && v.starts_with("/dev/"))
        .ok_or_else(|| format!("\"{s}\" is not SAVED:DEV, e.g. disk0:/dev/vda"))?;
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_the_kernel() {
        let got = split(r#"ro  quiet foo="a b" "bar=c d" x=y=z bmr.lock"#);
        let want: Vec<(String, Option<String>)> = vec![
            ("ro".into(), None),
            ("quiet".into(), None),
            ("foo".into(), Some("a b".into())),
            ("bar".into(), Some("c d".into())),
            ("x".into(), Some("y=z".into())),
            ("bmr.lock".into(), None),
        ];
        assert_eq!(got, want);
        assert!(split("   \n").is_empty());
    }

    #[test]
    fn reads_every_flag() {
        let f = parse(
            "BOOT_IMAGE=/vmlinuz console=tty0 console=ttyS0,115200 bmr.mode=auto \
             bmr.medium=LABEL=BMR-STATE bmr.source=tape:/dev/nst0 \
             bmr.target=disk0:/dev/vda,disk1=/dev/sdb bmr.wipe=/dev/vda bmr.key=/run/k \
             bmr.phase=2 bmr.break=drivers bmr.lock bmr.debug=0 bmr.console=100x30",
        );
        assert_eq!(f.mode, Mode::Auto);
        assert_eq!(f.medium.as_deref(), Some("LABEL=BMR-STATE"));
        assert_eq!(f.source.as_deref(), Some("tape:/dev/nst0"));
        assert_eq!(
            f.map,
            [
                ("disk0".to_string(), "/dev/vda".to_string()),
                ("disk1".to_string(), "/dev/sdb".to_string())
            ]
        );
        assert_eq!(f.wipe, ["/dev/vda"]);
        assert_eq!(f.key, Some(PathBuf::from("/run/k")));
        assert_eq!(f.phase, 2);
        assert!(f.stops_before("drivers") && !f.stops_before("udev"));
        assert!(f.lock && !f.debug);
        assert_eq!(f.console_size, Some((100, 30)));
        assert_eq!(f.consoles, ["tty0", "ttyS0,115200"]);
        assert!(f.warnings.is_empty(), "{:?}", f.warnings);
    }

    #[test]
    fn defaults_without_flags() {
        let f = parse("root=/dev/sda1 quiet");
        assert_eq!(f.mode, Mode::Guided);
        assert_eq!(f.phase, 1);
        assert!(!f.lock && f.map.is_empty() && f.warnings.is_empty());
    }

    #[test]
    fn repeated_flags_last_wins_lists_add_up() {
        let f = parse("bmr.mode=shell bmr.mode=auto bmr.wipe=/dev/vda bmr.wipe=/dev/vdb,/dev/vdc bmr.break=udev bmr.break=medium");
        assert_eq!(f.mode, Mode::Auto);
        assert_eq!(f.wipe, ["/dev/vda", "/dev/vdb", "/dev/vdc"]);
        assert_eq!(f.breaks, ["udev", "medium"]);
    }

    #[test]
    fn unknown_and_bad_flags_are_reported_not_dropped() {
        let f = parse("bmr.mdoe=auto bmr.mode=fast bmr.phase=3 bmr.lock=maybe bmr.source=ftp://x bmr.target=disk0 bmr.break=never bmr.medium bmr.console=80");
        let w = f.warnings.join("\n");
        for needle in [
            "bmr.mdoe: unknown flag",
            "bmr.mode: \"fast\" is not guided, auto or shell",
            "bmr.phase: \"3\"",
            "bmr.lock: \"maybe\"",
            "bmr.source: \"ftp://x\"",
            "bmr.target: \"disk0\" is not SAVED:DEV",
            "bmr.break: \"never\" is not a step",
            "bmr.medium: needs a value",
            "bmr.console: \"80\"",
        ] {
            assert!(w.contains(needle), "missing {needle:?} in\n{w}");
        }
        assert_eq!(f.warnings.len(), 9);
        // Bad values leave the safe defaults in place.
        assert_eq!(f.mode, Mode::Guided);
        assert_eq!(f.phase, 1);
        assert!(!f.lock);
    }

    #[test]
    fn quoted_values_keep_spaces() {
        let f = parse(r#"bmr.key="/run/my key" "bmr.medium=LABEL=MY STATE""#);
        assert_eq!(f.key, Some(PathBuf::from("/run/my key")));
        assert_eq!(f.medium.as_deref(), Some("LABEL=MY STATE"));
    }
}
