//! The `pat` binary's output: a closed pipe or a full disk on stdout is never a panic; the
//! human-readable text on stderr says counts with their nouns in agreement ("1 request",
//! "0 switches") and memory sizes in the binary units it labels them with. Output files and
//! interrupts: tests/cli_files.rs.

use std::path::Path;
use std::process::{Command, Output};

fn pat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pat"))
        .args(args)
        .output()
        .expect("run pat")
}

/// Runs pat expecting success; returns (stdout, stderr).
fn ok(args: &[&str]) -> (String, String) {
    let o = pat(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "pat {args:?} failed: {err}");
    (String::from_utf8(o.stdout).unwrap(), err)
}

fn tiny(dir: &Path) -> String {
    let m = dir.join("m");
    ok(&[
        "init-model",
        "--preset",
        "tiny",
        "--out",
        m.to_str().unwrap(),
    ]);
    m.to_string_lossy().into_owned()
}

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

/// `pat profile` of model `m` at world 1 on contexts 8,16 and batches 1,2 (one timed step), to
/// `out`: a profile made in about a second.
fn small_profile<'a>(m: &'a str, out: &'a str) -> [&'a str; 13] {
    [
        "profile",
        "--model",
        m,
        "--world",
        "1",
        "--contexts",
        "8,16",
        "--batches",
        "1,2",
        "--steps",
        "1",
        "--out",
        out,
    ]
}

#[test]
fn closed_or_full_stderr_loses_no_output() {
    // stderr carries progress, switch records and warnings: where it cannot be written (full,
    // or its reader gone) they are lost, but the command still succeeds with its stdout and its
    // files those of a run that could write them.
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let generate = [
        "generate",
        "--model",
        &m,
        "--world",
        "2",
        "--prompt-ids",
        "5,6,7",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "--reconfigure",
        "2:2",
    ];
    let (want, err) = ok(&generate);
    assert!(
        err.contains("\"to_tp\":2"),
        "a switch record on stderr: {err}"
    );
    let prof = dir.path().join("p.json");
    let profile = small_profile(&m, prof.to_str().unwrap());
    for closed in [false, true] {
        let run = |args: &[&str]| {
            let mut child = Command::new(env!("CARGO_BIN_EXE_pat"))
                .args(args)
                .stdout(Stdio::piped())
                .stderr(if closed {
                    Stdio::piped()
                } else {
                    match std::fs::OpenOptions::new().write(true).open("/dev/full") {
                        Ok(full) => Stdio::from(full),
                        Err(_) => Stdio::piped(),
                    }
                })
                .spawn()
                .unwrap();
            drop(child.stderr.take());
            child.wait_with_output().unwrap()
        };
        let o = run(&generate);
        assert!(
            o.status.success(),
            "generate, stderr closed {closed}: {:?}",
            o.status
        );
        assert_eq!(
            String::from_utf8(o.stdout).unwrap(),
            want,
            "closed {closed}"
        );
        let _ = std::fs::remove_file(&prof);
        let o = run(&profile);
        assert!(
            o.status.success(),
            "profile, stderr closed {closed}: {:?}",
            o.status
        );
        let text = std::fs::read_to_string(&prof).expect("the profile is written");
        assert!(text.contains("\"decode\""), "{text}");
    }
}

#[test]
fn counts_agree_with_their_nouns() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let (_, err) = ok(&[
        "generate",
        "--model",
        &m,
        "--prompt-ids",
        "5,6",
        "--max-new-tokens",
        "1",
    ]);
    assert!(err.contains("1 request, 1 token in "), "{err}");
    let (_, err) = ok(&[
        "generate",
        "--model",
        &m,
        "--prompt-ids",
        "5,6",
        "--max-new-tokens",
        "2",
        "--ignore-eos",
    ]);
    assert!(err.contains("1 request, 2 tokens in "), "{err}");
    // One request, static: no switch.
    let trace = dir.path().join("t.jsonl");
    std::fs::write(&trace, "{\"prompt_len\":3,\"response_len\":2}\n").unwrap();
    let rollout = |extra: &[&str]| {
        let t = trace.to_str().unwrap();
        let mut args = vec!["rollout", "--model", &m, "--trace", t, "--world", "1"];
        args.extend(["--policy", "static:1"].iter().chain(extra));
        ok(&args)
    };
    let (_, err) = rollout(&[]);
    assert!(
        err.contains("static:1: 1 request, 2 tokens in ")
            && err.contains(", 0 switches, final tp 1"),
        "{err}"
    );
    // The prompt fed one token a step: its steps' records say so, and it samples only once the
    // last one is in.
    let (out, err) = rollout(&["--prefill-tokens", "1"]);
    assert!(err.contains("static:1: 1 request, 2 tokens in "), "{err}");
    let steps: Vec<(u64, u64)> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("prefill_tokens").is_some())
        .map(|v| {
            let n = |k: &str| v[k].as_u64().unwrap();
            (n("prefill_tokens"), n("tokens_this_step"))
        })
        .collect();
    assert_eq!(steps, [(1, 0), (1, 0), (1, 1), (0, 1)], "{out}");
}

#[test]
fn memory_sizes_are_in_the_binary_units_they_are_labeled_with() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let o = pat(&[
        "bench",
        "switch",
        "--model",
        &m,
        "--world",
        "2",
        "--from",
        "1",
        "--to",
        "2",
        "--batch",
        "8",
        "--context",
        "256",
        "--kv-mib",
        "4",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let rec: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mib = |key: &str| rec[key].as_u64().unwrap() as f64 / (1u64 << 20) as f64;
    // Here MB and MiB differ in the printed digits (e.g. 0.53 MB is 0.50 MiB).
    for want in [
        format!("{:.2} MiB across ranks", mib("bytes_moved_cross_rank")),
        format!("{:.2} MiB in place", mib("bytes_moved_in_place")),
        format!("peak extra {:.1} MiB", mib("peak_extra_bytes")),
    ] {
        assert!(err.contains(&want), "expected {want:?} in: {err}");
    }
    let (_, err) = ok(&[
        "bench",
        "gemm",
        "--preset",
        "tiny",
        "--rows",
        "1",
        "--threads",
        "1",
        "--iters",
        "1",
    ]);
    assert!(
        err.contains(" MiB of f32 weights") && !err.contains(" MB "),
        "{err}"
    );
}

#[test]
fn a_simulation_on_a_measured_profile_says_where_it_extrapolates() {
    // A profile measured at contexts 8 and 16 (plus its decode steps) and batches 1 and 2: a
    // trace within that stays "measured"; one reaching context 30 with 3 sequences on the one
    // replica is labeled EXTRAPOLATED in the header, a note and a warning, naming both limits.
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let prof = dir.path().join("p.json");
    let p = prof.to_str().unwrap();
    ok(&small_profile(&m, p));
    let trace = |name: &str, n: usize, prompt: usize, response: usize| {
        let t = dir.path().join(name);
        let line = format!("{{\"prompt_len\":{prompt},\"response_len\":{response}}}\n");
        std::fs::write(&t, line.repeat(n)).unwrap();
        t.to_string_lossy().into_owned()
    };
    let within = trace("in.jsonl", 2, 4, 4);
    let (out, err) = ok(&[
        "simulate",
        "--trace",
        &within,
        "--profile",
        p,
        "--world",
        "1",
        "--no-optimum",
    ]);
    assert!(
        !out.contains("EXTRAPOLATED") && !err.contains("extrapolation"),
        "{out}\n{err}"
    );
    let beyond = trace("out.jsonl", 3, 10, 20);
    let (out, err) = ok(&[
        "simulate",
        "--trace",
        &beyond,
        "--profile",
        p,
        "--world",
        "1",
        "--no-optimum",
    ]);
    assert!(out.contains("beyond them EXTRAPOLATED"), "{out}");
    for text in [&out, &err] {
        assert!(
            text.contains("at tp 1 contexts up to 30 tokens (measured up to 16 ")
                && text.contains("up to 3 sequences on a replica (measured up to 2)"),
            "{text}"
        );
    }
}
