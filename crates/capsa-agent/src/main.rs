//! `capsa-agent`: `/init` of a capsa sandbox.
//!
//! As PID 1 it brings the guest up ([`capsa_agent::init`]), then serves the
//! host's RPC port until the host goes away or asks for a shutdown, and
//! powers the guest off either way: a sandbox never outlives its launcher.
//! The same binary runs the stages of a container (see
//! [`capsa_agent::container`]), selected by its first argument.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use capsa_agent::{container, evidence, init, protocol, reaper, server};

fn main() -> ExitCode {
    if let Some(code) = container::run_stage_if_requested() {
        return code;
    }
    let pid1 = rustix::process::getpid().is_init();
    if pid1 && !std::env::args().any(|a| a == init::SWITCHED) {
        let err = init::switch_root(std::path::Path::new("/init"));
        eprintln!("capsa-agent: cannot switch to a tmpfs root: {err}");
        init::power_off();
    }
    if let Err(e) = run(pid1) {
        eprintln!("capsa-agent: {e}");
    }
    if pid1 {
        init::power_off();
    }
    ExitCode::FAILURE
}

fn run(pid1: bool) -> Result<(), String> {
    if pid1 {
        init::mount_basics().map_err(|e| e.to_string())?;
        let loaded = init::load_modules().map_err(|e| e.to_string())?;
        eprintln!("capsa-agent: loaded {} kernel modules", loaded.len());
    }
    let reaper = reaper::Reaper::start().map_err(|e| format!("cannot start the reaper: {e}"))?;
    let port = init::find_port(protocol::RPC_PORT, Duration::from_secs(30)).map_err(|e| e.to_string())?;
    let agent = server::Agent::new(server::Paths::guest(), evidence::guest_attester(), reaper)
        .map_err(|e| format!("cannot set up the layer store: {e}"))?;
    let agent = Arc::new(agent);
    let (input, output) = server::open_port(&port).map_err(|e| format!("cannot open {}: {e}", port.display()))?;
    eprintln!("capsa-agent: serving {} on {}", protocol::RPC_PORT, port.display());
    let result = server::serve(Arc::clone(&agent), input, output);
    agent.stop_all();
    match result {
        Ok(()) if agent.shutting_down() => eprintln!("capsa-agent: shutdown requested; powering off"),
        Ok(()) => eprintln!("capsa-agent: the host closed the channel; powering off"),
        Err(e) => return Err(format!("the RPC channel failed: {e}; powering off")),
    }
    Ok(())
}
