//! Command-line inputs of `pat trace`, `pat profile` and `pat init-model` that must be refused
//! up front (naming the flag, before any work or any file is written), and what they print;
//! traces read from stdin (`--trace -`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn pat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pat"))
        .args(args)
        .output()
        .expect("run pat")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs pat expecting exit code 1 (a refused input); returns stderr, asserting it holds every
/// needle and no panic.
fn refused(args: &[&str], needles: &[&str]) -> String {
    refused_with(1, args, needles)
}

/// [`refused`] for a usage error: what the command line alone gets wrong exits 2.
fn misused(args: &[&str], needles: &[&str]) -> String {
    refused_with(2, args, needles)
}

fn refused_with(code: i32, args: &[&str], needles: &[&str]) -> String {
    let o = pat(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "pat {args:?}: {err}");
    assert!(!err.contains("panicked"), "pat {args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "pat {args:?}: expected {n:?} in: {err}");
    }
    err
}

fn ok(args: &[&str]) -> Output {
    let o = pat(args);
    assert!(o.status.success(), "pat {args:?} failed: {}", stderr(&o));
    o
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `pat profile --model m --world 1 --out out` and `extra`.
fn profile<'a>(m: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["profile", "--model", s(m), "--world", "1", "--out", s(out)];
    v.extend_from_slice(extra);
    v
}

/// A straggler trace of 24, 24, 320 tokens.
fn straggler(dir: &Path) -> PathBuf {
    let t = dir.join("t.jsonl");
    ok(&[
        "trace",
        "gen",
        "--kind",
        "straggler",
        "--n",
        "3",
        "--short",
        "24",
        "--long",
        "320",
        "--out",
        s(&t),
    ]);
    t
}

fn tiny(dir: &Path) -> PathBuf {
    let m = dir.join("m");
    ok(&["init-model", "--preset", "tiny", "--out", s(&m)]);
    m
}

#[test]
fn trace_stats_refuses_a_response_longer_than_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let t = straggler(dir.path());
    // Line 3 holds the 320-token response, request 2.
    refused(
        &["trace", "stats", s(&t), "--cap", "100"],
        &[
            &format!("{}:3: request 2: `response_len` 320", t.display()),
            "--cap 100",
        ],
    );
    misused(
        &["trace", "stats", s(&t), "--cap", "0"],
        &["invalid value '0' for '--cap <CAP>': must be at least 1"],
    );
    let o = ok(&["trace", "stats", s(&t), "--cap", "320", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["frac_at_cap"], 1.0 / 3.0);
}

/// Runs pat with `input` on its stdin.
fn piped(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pat"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn trace_stats_reads_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read(straggler(dir.path())).unwrap();
    let o = piped(&["trace", "stats", "-", "--json"], &text);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["count"].as_u64(), v["cap"].as_u64()),
        (Some(3), Some(320))
    );
}

#[test]
fn trace_gen_keeps_lengths_within_the_cap() {
    misused(
        &[
            "trace", "gen", "--kind", "uniform", "--hi", "50000", "--cap", "100",
        ],
        &["--hi 50000", "--cap 100"],
    );
    misused(
        &[
            "trace",
            "gen",
            "--kind",
            "straggler",
            "--long",
            "200",
            "--cap",
            "100",
        ],
        &["--long 200", "--cap 100"],
    );
    let o = ok(&[
        "trace", "gen", "--kind", "uniform", "--lo", "90", "--hi", "100", "--cap", "100",
    ]);
    let text = String::from_utf8(o.stdout).unwrap();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["response_len"].as_u64().unwrap() <= 100, "{l}");
    }
}

#[test]
fn trace_gen_refuses_flags_the_kind_does_not_use() {
    for (kind, flag, value) in [
        ("deepscaler", "--rho", "0.3"),
        ("deepscaler", "--lo", "5"),
        ("uniform", "--long", "5"),
        ("grpo", "--n", "4"),
        ("straggler", "--seed", "1"),
    ] {
        misused(
            &["trace", "gen", "--kind", kind, flag, value],
            &[&format!("{flag} is not used by --kind {kind}")],
        );
    }
    misused(
        &[
            "trace",
            "gen",
            "--kind",
            "straggler",
            "--short",
            "20",
            "--long",
            "10",
        ],
        &["--long 10 is shorter than --short 20"],
    );
}

#[test]
fn profile_refuses_a_grid_too_small_to_validate_before_measuring() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let out = dir.path().join("p.json");
    let err = misused(
        &profile(
            &m,
            &out,
            &[
                "--validate",
                "--batches",
                "1,2",
                "--contexts",
                "4,8",
                "--steps",
                "1",
            ],
        ),
        &[
            "--validate needs at least 5",
            "--batches x --contexts gives 2 x 2 = 4",
        ],
    );
    assert!(!err.contains("profiling"), "{err}");
    assert!(!out.exists());
}

#[test]
fn profile_refuses_an_output_it_cannot_write_before_measuring() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let out = dir.path().join("missing/p.json");
    let err = refused(
        &profile(
            &m,
            &out,
            &["--batches", "1", "--contexts", "4", "--steps", "1"],
        ),
        &[&format!("--out {}", out.display()), "does not exist"],
    );
    assert!(!err.contains("profiling"), "{err}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn profile_on_cuda_without_the_feature_blames_the_backend_first() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let out = dir.path().join("p.json");
    let err = refused(
        &profile(
            &m,
            &out,
            &[
                "--batches",
                "1",
                "--contexts",
                "4",
                "--steps",
                "1",
                "--backend",
                "cuda",
            ],
        ),
        &["error: --backend cuda: this pat was built without the `cuda` feature"],
    );
    assert!(
        !err.contains("profiling") && !err.contains("--batches"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn profile_labels_the_context_it_measured() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let out = dir.path().join("p.json");
    let o = ok(&profile(
        &m,
        &out,
        &["--batches", "1", "--contexts", "32", "--steps", "5"],
    ));
    // The sample's context is the asked 32 plus half the 5 timed steps, and says so.
    let err = stderr(&o);
    assert!(err.contains("(each --contexts value + 2)"), "{err}");
    assert!(err.contains("batch  mid ctx"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.split_whitespace().take(3).eq(["1", "1", "34"])),
        "no row of context 34 in: {err}"
    );
}

#[test]
fn init_model_refuses_a_shard_too_small_for_the_tokenizer_writing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d");
    refused(
        &[
            "init-model",
            "--preset",
            "tiny",
            "--out",
            s(&out),
            "--shard",
            "2",
        ],
        &["--shard 2 with preset tiny", "160", "259"],
    );
    assert!(!out.exists(), "a refused run leaves nothing behind");
    ok(&["init-model", "--preset", "tiny", "--out", s(&out)]);
}

#[cfg(unix)]
#[test]
fn init_model_weights_have_the_permissions_of_the_other_files() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let mode = |name: &str| {
        std::fs::metadata(m.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("model.safetensors"), mode("config.json"));
    assert_eq!(mode("model.safetensors"), mode("tokenizer.json"));
}

/// `simulate --trace -` reads the trace from stdin: the same report as from the file, the trace
/// named `<stdin>`, and a bad request named by its stdin line.
#[test]
fn simulate_reads_the_trace_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t.jsonl");
    let gen = [
        "trace", "gen", "--kind", "uniform", "--n", "8", "--lo", "10",
    ];
    ok(&[&gen[..], &["--hi", "300", "--out", s(&t)]].concat());
    let text = std::fs::read(&t).unwrap();
    let sim = ["simulate", "--world", "2", "--json", "--trace"];
    let from_file = ok(&[&sim[..], &[s(&t)]].concat());
    let from_stdin = piped(&[&sim[..], &["-"]].concat(), &text);
    assert!(from_stdin.status.success(), "{}", stderr(&from_stdin));
    let mut a: serde_json::Value = serde_json::from_slice(&from_file.stdout).unwrap();
    let mut b: serde_json::Value = serde_json::from_slice(&from_stdin.stdout).unwrap();
    assert_eq!(a["trace_path"], s(&t));
    assert_eq!(b["trace_path"], "<stdin>");
    a["trace_path"] = serde_json::Value::Null;
    b["trace_path"] = serde_json::Value::Null;
    assert_eq!(a, b);
    // Line 3 (after a blank line) is request 1, beyond the default model's context.
    let bad =
        b"{\"prompt_len\":8,\"response_len\":6}\n\n{\"prompt_len\":8,\"response_len\":999999}\n";
    let o = piped(&[&sim[..], &["-"]].concat(), bad);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("<stdin>:3: request 1: `prompt_len` 8 + `response_len` 999999"));
}

/// `rollout --trace -` reads the trace from stdin: the same steps as from the file (every field
/// but the timings), and a bad request named by its stdin line.
#[test]
fn rollout_reads_the_trace_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let t = dir.path().join("t.jsonl");
    let text = b"{\"prompt_len\":8,\"response_len\":6}\n\n{\"prompt_len\":5,\"response_len\":12}\n";
    std::fs::write(&t, text).unwrap();
    let run = [
        "rollout",
        "--model",
        s(&m),
        "--world",
        "2",
        "--policy",
        "static:2",
    ];
    let steps = |o: &Output| -> Vec<Vec<serde_json::Value>> {
        assert!(o.status.success(), "{}", stderr(o));
        let keys = [
            "step",
            "tp",
            "running_reqs",
            "prefill_tokens",
            "tokens_this_step",
        ];
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("summary").is_none())
            .map(|v| keys.iter().map(|k| v[*k].clone()).collect())
            .collect()
    };
    let from_file = steps(&ok(&[&run[..], &["--trace", s(&t)]].concat()));
    let from_stdin = steps(&piped(&[&run[..], &["--trace", "-"]].concat(), text));
    // 12 steps: the longer response's; 18 tokens in all.
    assert_eq!(from_file.len(), 12);
    let tokens: u64 = from_file.iter().map(|r| r[4].as_u64().unwrap()).sum();
    assert_eq!(tokens, 18);
    assert_eq!(from_file, from_stdin);
    let bad =
        b"{\"prompt_len\":8,\"response_len\":6}\n\n{\"prompt_len\":500,\"response_len\":120}\n";
    let o = piped(&[&run[..], &["--trace", "-"]].concat(), bad);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("<stdin>:3: request 1: `prompt_len` 500 + `response_len` 120"));
}

/// A `--start-tp` the profile holds no samples at is refused before the rollout decodes a step
/// (it used to fail at the first decision, after printing steps to stdout).
#[test]
fn rollout_refuses_a_start_tp_its_profile_does_not_cover_before_any_step() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let prof = dir.path().join("p.json");
    ok(&[
        "profile",
        "--model",
        s(&m),
        "--world",
        "2",
        "--batches",
        "1,2",
        "--contexts",
        "4,8",
        "--steps",
        "1",
        "--out",
        s(&prof),
    ]);
    // Only the tp 2 samples kept.
    let mut p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&prof).unwrap()).unwrap();
    let decode = p["decode"].as_array_mut().unwrap();
    decode.retain(|d| d["tp"] == 2);
    assert!(!decode.is_empty());
    std::fs::write(&prof, p.to_string()).unwrap();
    let t = dir.path().join("short.jsonl");
    std::fs::write(
        &t,
        "{\"prompt_len\":4,\"response_len\":6}\n{\"prompt_len\":4,\"response_len\":30}\n",
    )
    .unwrap();
    let args = [
        "rollout",
        "--model",
        s(&m),
        "--trace",
        s(&t),
        "--world",
        "2",
        "--policy",
        "adaptive",
        "--profile",
        s(&prof),
        "--start-tp",
        "1",
    ];
    let o = pat(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--start-tp: the profile has no decode samples at tp 1"),
        "{err}"
    );
    assert!(o.stdout.is_empty(), "steps printed before the refusal");
}
