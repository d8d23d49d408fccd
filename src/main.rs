//! bmr: bare-metal recovery. One binary for the backed-up system (save,
//! probe), the rescue initramfs (/init, recover) and phase two.

mod apply;
mod boot;
mod capture;
mod cli;
mod image;
mod manifest;
mod medium;
mod plan;
mod probe;
mod recover;
mod report;
mod rescue;
mod sys;
mod targets;
mod tool;

use std::process::ExitCode;

fn main() -> ExitCode {
    if boot::is_pid1() {
        boot::init();
    }
    sys::default_sigpipe();
    match cli::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("bmr: error: {err:#}");
            ExitCode::from(1)
        }
    }
}
