//! Child reaping for PID 1.
//!
//! Every process orphaned in the guest is re-parented to the agent, and a
//! PID 1 that does not wait for them fills the process table with zombies.
//! So one thread waits for *any* child, and whoever started a process asks
//! this reaper for its exit instead of calling `Child::wait` (which would
//! race the reaper for the same status). Statuses of processes nobody asked
//! about yet are kept for a while, since a short-lived child can exit
//! before its starter registers interest (its PID cannot be reused that
//! soon: Linux hands out PIDs in order up to `pid_max`).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustix::process::{WaitOptions, waitpid};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
}

#[derive(Default)]
struct State {
    exited: HashMap<u32, (Exit, Instant)>,
}

/// How long an exit nobody asked about is kept.
const UNCLAIMED: Duration = Duration::from_secs(60);

/// The reaper's shared state: exits by PID.
#[derive(Clone, Default)]
pub struct Reaper {
    inner: Arc<(Mutex<State>, Condvar)>,
}

impl Reaper {
    /// Starts the reaping thread.
    pub fn start() -> std::io::Result<Self> {
        let reaper = Self::default();
        let inner = Arc::clone(&reaper.inner);
        std::thread::Builder::new().name("reaper".into()).spawn(move || {
            loop {
                match waitpid(None, WaitOptions::empty()) {
                    Ok(Some((pid, status))) => {
                        let pid = pid.as_raw_nonzero().get().unsigned_abs();
                        let exit = Exit { code: status.exit_status(), signal: status.terminating_signal() };
                        let (lock, cond) = &*inner;
                        let mut state = lock.lock().unwrap_or_else(PoisonError::into_inner);
                        let now = Instant::now();
                        state.exited.retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED);
                        state.exited.insert(pid, (exit, now));
                        cond.notify_all();
                    }
                    // No children at the moment: wait for one to exist.
                    Ok(None) | Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        })?;
        Ok(reaper)
    }

    /// Waits for `pid`, a child of the agent spawned within the last minute
    /// or still running, to exit. One caller per PID: the status is handed
    /// over, not copied.
    pub fn wait(&self, pid: u32) -> Exit {
        let (lock, cond) = &*self.inner;
        let mut state = lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some((exit, _)) = state.exited.remove(&pid) {
                return exit;
            }
            state = cond.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }
}
