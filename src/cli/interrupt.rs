//! An interrupted command (Ctrl-C, SIGTERM, SIGHUP) removes what it made for itself and had
//! not finished, then ends by the signal as it would have without this handler (so a shell loop
//! stops on Ctrl-C, and the status is the usual 128 + signal): the demo's scratch model directory,
//! an output file claimed before the run and not yet written. Drop guards remove the same paths
//! on every other way out; a signal ends the process without running them. A signal the command
//! was started ignoring (`nohup`, `trap '' INT`) stays ignored.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Paths to remove on an interrupt, each under the id of the guard that registered it.
static PENDING: Mutex<Vec<(u64, PathBuf)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);
/// Set when a signal arrived: the handler is removing the scratch and will end the process.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn pending() -> MutexGuard<'static, Vec<(u64, PathBuf)>> {
    // A panic while the list was held leaves it whole (pushes and removes only).
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `sig` is ignored (inherited from the parent: `nohup`, `trap '' SIG`).
fn ignored(sig: libc::c_int) -> bool {
    // SAFETY: sigaction with a null new action only reads the current disposition into `old`,
    // a zeroed, properly sized and aligned sigaction owned by this frame.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Installs the handler, once, from `main`, for the signals not ignored. Where it cannot be
/// installed the command runs without it (an interrupt then leaves the scratch behind, as the
/// default action does).
pub fn install() {
    let sigs: Vec<libc::c_int> = [SIGINT, SIGTERM, SIGHUP]
        .into_iter()
        .filter(|&s| !ignored(s))
        .collect();
    let Ok(mut signals) = Signals::new(&sigs) else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("pat-interrupt".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                INTERRUPTED.store(true, Ordering::SeqCst);
                let paths: Vec<PathBuf> = pending().drain(..).map(|(_, p)| p).collect();
                for p in &paths {
                    let _ = if p.is_dir() {
                        std::fs::remove_dir_all(p)
                    } else {
                        std::fs::remove_file(p)
                    };
                }
                // Off the progress bar's line, where one is drawn.
                let clear = if std::io::stderr().is_terminal() {
                    "\r\x1b[2K"
                } else {
                    ""
                };
                errln!("{clear}interrupted");
                let _ = signal_hook::low_level::emulate_default_handler(sig);
                // The default action of these three ends the process; should it not have:
                std::process::exit(128 + sig);
            }
        });
    drop(spawned);
}

/// Whether an interrupt is being handled: the process is about to end by it, so what fails
/// now (a file the handler removed) is not to be reported as the command's error.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
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
