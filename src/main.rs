//! bmr: bare-metal recovery. One binary for the backed-up system (save,
//! probe), the rescue initramfs (/init, recover) and phase two.

use std::process::ExitCode;

use bmr::{boot, cli, sys};

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
