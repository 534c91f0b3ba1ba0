//! An interrupted command (Ctrl-C, SIGTERM, SIGHUP) removes what it made for itself and had
//! not finished, then exits 130 as an interrupted shell command does: the demo's scratch model
//! directory, an output file claimed before the run and not yet written. Drop guards remove the
//! same paths on every other way out; a signal ends the process without running them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The exit status of an interrupted command (128 + SIGINT).
pub const INTERRUPTED: i32 = 130;

/// Paths to remove on an interrupt, each under the id of the guard that registered it.
static PENDING: Mutex<Vec<(u64, PathBuf)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn pending() -> MutexGuard<'static, Vec<(u64, PathBuf)>> {
    // A panic while the list was held leaves it whole (pushes and removes only).
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Installs the handler, once, from `main`. Where one cannot be installed the command runs
/// without it (an interrupt then leaves the scratch behind, as the default action does).
pub fn install() {
    let _ = ctrlc::set_handler(|| {
        let paths: Vec<PathBuf> = pending().drain(..).map(|(_, p)| p).collect();
        for p in &paths {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
        }
        errln!("interrupted");
        std::process::exit(INTERRUPTED);
    });
}

/// `path`, to be removed if the command is interrupted while this guard lives. Dropping the
/// guard forgets the path (whoever made it removes or keeps it).
pub struct RemoveOnInterrupt(u64);

impl RemoveOnInterrupt {
    pub fn new(path: &Path) -> RemoveOnInterrupt {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        pending().push((id, path.to_path_buf()));
        RemoveOnInterrupt(id)
    }
}

impl Drop for RemoveOnInterrupt {
    fn drop(&mut self) {
        pending().retain(|(id, _)| *id != self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_registers_its_path_until_dropped() {
        let has = |p: &str| pending().iter().any(|(_, q)| q == Path::new(p));
        let a = RemoveOnInterrupt::new(Path::new("/nonexistent/a"));
        let b = RemoveOnInterrupt::new(Path::new("/nonexistent/b"));
        assert!(has("/nonexistent/a") && has("/nonexistent/b"));
        drop(a);
        assert!(!has("/nonexistent/a") && has("/nonexistent/b"));
        drop(b);
        assert!(!has("/nonexistent/b"));
    }
}
