//! Your own lengths: `pat trace import` (a VeRL generation dump and a Mooncake trace through the
//! binary, what it refuses, and that the simulator takes what it writes) and `pat rollout
//! --lengths-from`. The model made by `pat init-model`
//! carries the built-in byte-level tokenizer (one token per UTF-8 byte, a BOS with special
//! tokens), so every expected length is a byte count made here.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn pat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pat"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run pat")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(args: &[&str]) -> Output {
    let o = pat(args);
    assert!(o.status.success(), "pat {args:?}: {}", text(&o.stderr));
    o
}

fn refused(code: i32, args: &[&str], needle: &str) {
    let o = pat(args);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "pat {args:?}: {err}");
    assert!(
        err.contains(needle),
        "pat {args:?}: expected {needle:?} in {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The tiny random model `pat init-model` makes, in `dir`/m.
fn tiny(dir: &Path) -> std::path::PathBuf {
    let m = dir.join("m");
    ok(&["init-model", "--preset", "tiny", "--out", s(&m)]);
    m
}

/// Steps 5 and 6, each 3 prompts x 4 responses; response r of prompt p in step t is
/// `(7 p + 3 r + 11 t) mod 40 + 1` copies of "é" (2 bytes each).
fn dump(path: &Path) -> Vec<(String, String, u64)> {
    let mut rows = Vec::new();
    for t in [5u64, 6] {
        for p in 0..3u64 {
            for r in 0..4u64 {
                let out = "é".repeat(((7 * p + 3 * r + 11 * t) % 40 + 1) as usize);
                rows.push((format!("Solve problem {p}."), out, t));
            }
        }
    }
    let lines: Vec<String> = rows
        .iter()
        .map(|(i, o, t)| {
            serde_json::json!({"input": i, "output": o, "gts": "x", "score": 0.5, "step": t})
                .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    rows
}

#[test]
fn a_verl_dump_becomes_a_trace_the_simulator_takes() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let d = dir.path().join("dump.jsonl");
    let rows = dump(&d);
    let o = ok(&[
        "trace",
        "import",
        s(&d),
        "--tokenizer",
        s(&m),
        "--step",
        "6",
        "--cap",
        "60",
    ]);
    let got: Vec<serde_json::Value> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("stdout holds only JSON lines"))
        .collect();
    let want: Vec<_> = rows.iter().filter(|r| r.2 == 6).collect();
    assert_eq!(got.len(), want.len());
    let mut cut = 0;
    for (k, (g, (input, output, _))) in got.iter().zip(&want).enumerate() {
        assert_eq!(g["prompt_len"], input.len() + 1, "request {k}");
        // Bytes + the dropped EOS, at most the cap.
        assert_eq!(g["response_len"], (output.len() + 1).min(60), "request {k}");
        cut += usize::from(output.len() > 60);
        assert_eq!(g["group"], k / 4, "request {k}");
    }
    assert!(cut > 0, "the fixture should cut some responses");
    let err = text(&o.stderr);
    for needle in [
        "imported 12 responses",
        "(step 6; 12 lines of other steps left out)",
        "3 groups of 4",
        &format!("{cut} cut to --cap 60"),
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
    let t = dir.path().join("t.jsonl");
    std::fs::write(&t, &o.stdout).unwrap();
    ok(&["simulate", "--trace", s(&t), "--world", "2", "--json"]);
    let st: serde_json::Value =
        serde_json::from_slice(&ok(&["trace", "stats", s(&t), "--json"]).stdout).unwrap();
    assert_eq!(
        st["groups"],
        serde_json::json!({"count": 3, "min_size": 4, "max_size": 4})
    );
    refused(
        1,
        &["trace", "import", s(&d), "--tokenizer", s(&m)],
        "the file holds steps 5, 6: choose one (one synchronous batch) with --step",
    );
    refused(
        2,
        &["trace", "import", s(&d)],
        "a VeRL dump holds text: give --tokenizer",
    );
    refused(
        2,
        &["trace", "import", s(&d), "--tokenizer", s(dir.path())],
        "holds no tokenizer.json",
    );
}

#[test]
fn a_mooncake_trace_and_what_cannot_be_told() {
    let dir = tempfile::tempdir().unwrap();
    let mc = dir.path().join("mc.jsonl");
    std::fs::write(
        &mc,
        "{\"timestamp\":0,\"input_length\":300,\"output_length\":41,\"hash_ids\":[0]}\n\
         {\"timestamp\":9,\"input_length\":12,\"output_length\":7}\n",
    )
    .unwrap();
    let o = ok(&["trace", "import", s(&mc)]);
    assert_eq!(
        text(&o.stdout),
        "{\"prompt_len\":300,\"response_len\":41}\n{\"prompt_len\":12,\"response_len\":7}\n"
    );
    refused(
        2,
        &["trace", "import", s(&mc), "--group-size", "8"],
        "--group-size is for VeRL dumps",
    );
    let t = dir.path().join("t.jsonl");
    std::fs::write(&t, "{\"prompt_len\":3,\"response_len\":4}\n").unwrap();
    refused(1, &["trace", "import", s(&t)], "already a pat trace");
    std::fs::write(&t, "\n{\"prompt\":\"hi\",\"completion\":\"yo\"}\n").unwrap();
    refused(
        1,
        &["trace", "import", s(&t)],
        ":2: cannot tell what wrote this line (keys: completion, prompt); give --format",
    );
}

/// `rollout --lengths-from`: the estimator learns from another trace. From the batch's own
/// lengths it decides exactly as by default (the same switches at the same steps, the same
/// forecasts); from a trace whose responses all end at 20 tokens it expects the one sequence left
/// at step 6 to run 14 more steps, not 34; with the oracle, or with a static layout, the flag is a
/// usage error. The profile is written by hand so that a switch pays: tp 1 (two replicas) is
/// cheap per sequence, tp 2 fast for one.
#[test]
fn rollout_learns_lengths_from_another_trace() {
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
        "1,4",
        "--contexts",
        "4,32",
        "--steps",
        "1",
        "--out",
        s(&prof),
    ]);
    let mut p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&prof).unwrap()).unwrap();
    for d in p["decode"].as_array_mut().unwrap() {
        let key = (d["tp"].as_u64().unwrap(), d["batch"].as_u64().unwrap());
        d["step_ms"] = match key {
            (1, 1) => 1.0,
            (1, _) => 1.2,
            (2, 1) => 0.3,
            _ => 3.0,
        }
        .into();
        d["spread_ms"] = 0.001.into();
    }
    std::fs::write(&prof, p.to_string()).unwrap();
    let lengths = |rs: &[usize]| -> String {
        rs.iter()
            .map(|r| format!("{{\"prompt_len\":4,\"response_len\":{r}}}\n"))
            .collect()
    };
    let t = dir.path().join("t.jsonl");
    std::fs::write(&t, lengths(&[40, 6, 6, 6, 6, 6, 6, 6])).unwrap();
    let twenty = dir.path().join("twenty.jsonl");
    std::fs::write(&twenty, lengths(&[20; 8])).unwrap();
    let run = [
        "rollout",
        "--model",
        s(&m),
        "--trace",
        s(&t),
        "--world",
        "2",
        "--profile",
        s(&prof),
        "--check-every",
        "2",
    ];
    // Each switch as (step, from tp, to tp, the decision's predicted ms of staying).
    let switches = |o: &Output| -> Vec<(u64, u64, u64, f64)> {
        assert!(o.status.success(), "{}", text(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| {
                let sw = v.get("switch")?;
                Some((
                    v["step"].as_u64()?,
                    sw["from_tp"].as_u64()?,
                    sw["to_tp"].as_u64()?,
                    v["decision"]["predicted_stay_ms"].as_f64()?,
                ))
            })
            .collect()
    };
    let own = switches(&ok(&run));
    // Once the short ones end, tp 2 is three times as fast for the one left; staying at tp 1
    // would take its remaining steps at 1.0 ms each.
    let stays = |sw: &[(u64, u64, u64, f64)], remaining: f64| {
        sw.len() == 1 && sw[0].0 == 6 && (sw[0].1, sw[0].2) == (1, 2) && {
            (sw[0].3 - remaining).abs() < 1e-6
        }
    };
    assert!(stays(&own, 34.0), "{own:?}");
    let same = switches(&ok(&[&run[..], &["--lengths-from", s(&t)]].concat()));
    assert_eq!(own, same);
    let other = switches(&ok(&[&run[..], &["--lengths-from", s(&twenty)]].concat()));
    assert!(stays(&other, 14.0), "{other:?}");
    let o = pat(&[
        &run[..],
        &["--lengths-from", s(&t), "--estimator", "oracle"],
    ]
    .concat());
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("--lengths-from is for --estimator empirical"));
    let o = pat(&[
        &run[..3],
        &[
            "--trace",
            s(&t),
            "--world",
            "2",
            "--policy",
            "static:2",
            "--lengths-from",
            s(&t),
        ],
    ]
    .concat());
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("is for --policy adaptive"),
        "{}",
        text(&o.stderr)
    );
}
