//! Running the real tools (mkfs, wipefs, losetup, mount, resize2fs, cp, ...):
//! no stdin, and a failure reported with the command and what it said.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Runs `cmd` to completion; its trimmed stdout on success.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?} (is it installed?)"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            if stderr.trim().is_empty() {
                stdout.trim()
            } else {
                stderr.trim()
            }
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether `tool` is on PATH.
pub fn exists(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}
