//! What the sandbox and workload tests share: the `capsa` binary run with
//! its state (caches, sim platform) under a test's own home directory.

use std::path::Path;
use std::process::{Command, Output};

/// `capsa` with HOME, its caches and the sim platform under `home`.
pub fn capsa(home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capsa"));
    command
        .env("HOME", home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("CAPSA_SIM_DIR", home.join("sim"))
        .env_remove("XDG_STATE_HOME")
        .env_remove("CAPSA_TRUST_URL")
        .env("NO_COLOR", "1");
    command
}

/// Runs `capsa args` to the end, echoing the command and its output for a
/// failing test's log.
pub fn run(home: &Path, args: &[&str]) -> Output {
    let out = capsa(home).args(args).output().unwrap();
    eprintln!(
        "$ capsa {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
