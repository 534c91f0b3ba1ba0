//! The `pat` binary's stdout: a closed pipe or a full disk is never a panic.

use std::process::Command;

#[test]
fn closed_or_full_stdout_is_never_a_panic() {
    use std::process::Stdio;
    // The reader goes away before pat writes: a quiet exit with the closed-pipe status.
    for args in [
        &["trace", "gen", "--kind", "uniform", "--n", "20000"][..],
        &["--help"][..],
        &["simulate", "--help"][..],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pat"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !err.contains("panicked") && err.is_empty(),
            "pat {args:?}: {err}"
        );
        // clap's help printer drops the write error itself: quiet success is quiet too.
        let quiet = if args[0] == "trace" {
            vec![141]
        } else {
            vec![0, 141]
        };
        assert!(
            quiet.contains(&o.status.code().unwrap_or(-1)),
            "pat {args:?}: {:?}",
            o.status
        );
    }
    // A full disk is a clear error naming stdout.
    if let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") {
        let o = Command::new(env!("CARGO_BIN_EXE_pat"))
            .args(["trace", "gen", "--kind", "uniform", "--n", "50"])
            .stdout(full)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && !err.contains("panicked"), "{err}");
        assert!(err.contains("<stdout>"), "{err}");
    }
}
