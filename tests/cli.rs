//! End-to-end tests of the `pat` binary: tp-invariant generation on an `init-model` model, a
//! sharded checkpoint, live switches. Bad input is table-driven in `tests/cli_bad_input/`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn pat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pat"))
        .args(args)
        .output()
        .expect("run pat")
}

fn ok(args: &[&str]) -> String {
    let o = pat(args);
    assert!(
        o.status.success(),
        "pat {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs pat expecting failure; returns stderr, asserting it names `needle` and did not panic.
fn fails(args: &[&str], needle: &str) -> String {
    let o = pat(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "pat {args:?} should fail");
    assert!(!err.contains("panicked"), "pat {args:?} panicked: {err}");
    assert!(
        err.contains(needle),
        "pat {args:?}: expected {needle:?} in: {err}"
    );
    err
}

/// `pat ARGS --requests -` with `input` on its stdin.
fn with_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pat"))
        .args(args)
        .args(["--requests", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn tiny(dir: &Path, arch: &str) -> PathBuf {
    let out = dir.join(arch);
    ok(&[
        "init-model",
        "--arch",
        arch,
        "--preset",
        "tiny",
        "--out",
        out.to_str().unwrap(),
        "--seed",
        "3",
    ]);
    out
}

fn output_ids(stdout: &str) -> Vec<Vec<u64>> {
    stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["output_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn generate_gives_the_same_tokens_for_every_tp() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen3"] {
        let m = tiny(tmp.path(), arch);
        let reqs = tmp.path().join("reqs.jsonl");
        std::fs::write(
            &reqs,
            "{\"input_ids\":[5,6,7,8,9]}\n{\"prompt\":\"hello world\",\"max_new_tokens\":7}\n{\"input_ids\":[300],\"max_new_tokens\":20}\n",
        )
        .unwrap();
        let run_with = |world: &str, tp: &str, extra: &[&str]| {
            let mut args = vec![
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--world",
                world,
                "--tp",
                tp,
                "--requests",
                reqs.to_str().unwrap(),
                "--max-new-tokens",
                "12",
                "--ignore-eos",
            ];
            args.extend(extra);
            let out = ok(&args);
            let lines: Vec<serde_json::Value> = out
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(lines.len(), 3);
            for (i, l) in lines.iter().enumerate() {
                assert_eq!(l["index"], i);
                assert_eq!(l["finish_reason"], "length");
                assert!(l["text"].is_string(), "text is present when a tokenizer is");
            }
            assert_eq!(lines[1]["output_ids"].as_array().unwrap().len(), 7);
            output_ids(&out)
        };
        let run = |world: &str, tp: &str| run_with(world, tp, &[]);
        let base = run("1", "1");
        for (w, t) in [("2", "2"), ("4", "2"), ("4", "4"), ("4", "1")] {
            assert_eq!(run(w, t), base, "{arch} world {w} tp {t}");
        }
        // Prompts fed in chunks of 2 or 3 tokens a step: the same tokens.
        for (w, t, n) in [("1", "1", "2"), ("4", "2", "3")] {
            let chunked = run_with(w, t, &["--prefill-tokens", n]);
            assert_eq!(chunked, base, "{arch} world {w} tp {t} prefill tokens {n}");
        }
        // Seeded sampling is reproducible and independent of the layout and the chunks.
        let sample = |tp: &str, chunk: &str| {
            ok(&[
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--world",
                "2",
                "--tp",
                tp,
                "--prompt-ids",
                "9,8,7",
                "--temperature",
                "0.8",
                "--top-k",
                "40",
                "--top-p",
                "0.9",
                "--seed",
                "11",
                "--ignore-eos",
                "--prefill-tokens",
                chunk,
            ])
        };
        let first = output_ids(&sample("1", "100"));
        assert_eq!(first, output_ids(&sample("2", "100")));
        assert_eq!(first, output_ids(&sample("2", "1")));
        // A cap of 0 tokens is refused by name.
        fails(
            &[
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--prompt-ids",
                "1,2",
                "--prefill-tokens",
                "0",
            ],
            "--prefill-tokens",
        );
    }
}

#[test]
fn sharded_checkpoint_matches_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path(), "llama");
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    for f in ["config.json", "generation_config.json", "tokenizer.json"] {
        std::fs::copy(m.join(f), sharded.join(f)).unwrap();
    }
    // Split the tensors over two files with an index, as HF does for large checkpoints.
    let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (part, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", part + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = chunk
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &sharded.join(&file)).unwrap();
        for n in chunk {
            map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let args = |d: &Path| {
        ok(&[
            "generate",
            "--model",
            d.to_str().unwrap(),
            "--world",
            "2",
            "--tp",
            "2",
            "--prompt-ids",
            "4,5,6",
            "--max-new-tokens",
            "8",
        ])
    };
    assert_eq!(args(&m), args(&sharded));
}

#[test]
fn live_switches_keep_generate_output_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path(), "qwen3");
    let ms = m.to_str().unwrap();
    // The prompt on 4 ranks at tp 1, with `extra` flags.
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            ms,
            "--world",
            "4",
            "--tp",
            "1",
            "--prompt-ids",
            "5,6,7,8",
            "--max-new-tokens",
            "24",
            "--ignore-eos",
        ];
        args.extend(extra);
        let o = pat(&args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{extra:?}: {err}");
        // The switch records: one JSON object each on stderr, in order.
        let switched: Vec<(u64, u64)> = err
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v.get("from_tp")?.as_u64()?, v["to_tp"].as_u64()?)))
            .collect();
        (String::from_utf8(o.stdout).unwrap(), switched)
    };
    let (base, _) = generate(&[]);
    for mode in ["migrate", "recompute", "auto"] {
        let plan = [
            "--reconfigure",
            "3:2",
            "--reconfigure",
            "9:4",
            "--reconfigure",
            "15:1",
        ];
        let (out, switched) = generate(&[&plan[..], &["--kv-transfer", mode]].concat());
        assert_eq!(out, base, "--kv-transfer {mode}");
        // Every planned switch happened.
        assert_eq!(switched, [(1, 2), (2, 4), (4, 1)], "--kv-transfer {mode}");
    }
    // Switches while the prompt is fed one token a step: after its first and second tokens.
    for mode in ["migrate", "recompute"] {
        let plan = [
            "--prefill-tokens",
            "1",
            "--reconfigure",
            "0:2",
            "--reconfigure",
            "1:4",
        ];
        let (out, switched) = generate(&[&plan[..], &["--kv-transfer", mode]].concat());
        assert_eq!(out, base, "chunks, {mode}");
        assert_eq!(switched.len(), 2, "chunks, {mode}: {switched:?}");
    }
    fails(
        &[
            "generate",
            "--model",
            ms,
            "--world",
            "4",
            "--prompt-ids",
            "1",
            "--reconfigure",
            "2:3",
        ],
        "--reconfigure 2:3",
    );
    fails(
        &[
            "generate",
            "--model",
            ms,
            "--world",
            "4",
            "--prompt-ids",
            "1",
            "--reconfigure",
            "x",
        ],
        "expected STEP:TP",
    );
    fails(
        &[
            "generate",
            "--model",
            ms,
            "--world",
            "4",
            "--prompt-ids",
            "1",
            "--kv-transfer",
            "teleport",
        ],
        "teleport",
    );
    // A switch planned after every request finished is reported, not silently dropped.
    let o = pat(&[
        "generate",
        "--model",
        ms,
        "--world",
        "2",
        "--prompt-ids",
        "1",
        "--max-new-tokens",
        "2",
        "--reconfigure",
        "50:2",
    ]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not applied"));

    let out = ok(&[
        "bench",
        "switch",
        "--model",
        ms,
        "--world",
        "4",
        "--from",
        "1",
        "--to",
        "2,4,1",
        "--batch",
        "3",
        "--context",
        "40",
        "--kv-transfer",
        "auto",
        "--kv-mib",
        "4",
    ]);
    let recs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 3);
    for key in [
        "from_tp",
        "to_tp",
        "n_inflight",
        "kv_tokens",
        "kv_policy",
        "weight_reshard_ms",
        "kv_ms",
        "comm_group_ms",
        "commit_ms",
        "total_ms",
        "bytes_moved_cross_rank",
        "bytes_moved_in_place",
        "peak_extra_bytes",
        "post_switch_step_latency_ms",
    ] {
        assert!(
            recs.iter().all(|r| r.get(key).is_some()),
            "bench switch record lacks {key}"
        );
    }
    assert!(
        recs[0]["bytes_moved_cross_rank"].as_u64().unwrap() > 0,
        "KV of the other heads crosses ranks"
    );
    assert_eq!(
        (recs[2]["from_tp"].as_u64(), recs[2]["to_tp"].as_u64()),
        (Some(4), Some(1))
    );
}

/// Requests read from stdin, or given as repeated `--prompt-ids` (one request per occurrence),
/// are those of the same requests in a file.
#[test]
fn requests_from_stdin_or_repeated_flags_equal_requests_from_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path(), "llama");
    let text = "{\"input_ids\":[5,6,7]}\n{\"input_ids\":[9],\"max_new_tokens\":4}\n";
    let reqs = tmp.path().join("reqs.jsonl");
    std::fs::write(&reqs, text).unwrap();
    let args = [
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--max-new-tokens",
        "6",
    ];
    let mut from_file = args.to_vec();
    from_file.extend(["--requests", reqs.to_str().unwrap()]);
    let want = ok(&from_file);
    let o = with_stdin(&args, text.as_bytes());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = String::from_utf8(o.stdout).unwrap();
    assert_eq!(output_ids(&got), output_ids(&want));
    assert_eq!(output_ids(&want).len(), 2);
    // A bad request on stdin is named by its line there and its request number.
    let o = with_stdin(&args, b"{\"input_ids\":[5]}\n{\"input_ids\":[5,99999]}\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("<stdin>:2: request 1: token id 99999"),
        "{err}"
    );
    // Repeated --prompt-ids: two requests, in order, not one merged prompt.
    std::fs::write(&reqs, "{\"input_ids\":[5,6,7]}\n{\"input_ids\":[9]}\n").unwrap();
    let mut flags = args.to_vec();
    flags.extend(["--prompt-ids", "5,6,7", "--prompt-ids", "9"]);
    let mut from_file = args.to_vec();
    from_file.extend(["--requests", reqs.to_str().unwrap()]);
    let got = ok(&flags);
    assert_eq!(output_ids(&got), output_ids(&ok(&from_file)));
    assert_eq!(output_ids(&got).len(), 2);
}

#[test]
fn bad_environment_variables_are_named_before_any_work() {
    for (var, val, needle) in [
        (
            "PAT_THREADS",
            "0",
            "PAT_THREADS must be a positive number of threads, got \"0\"",
        ),
        (
            "PAT_THREADS",
            "abc",
            "PAT_THREADS must be a positive number of threads",
        ),
        (
            "PAT_CPU_ISA",
            "avx9",
            "PAT_CPU_ISA must be portable, avx2 or avx512, got \"avx9\"",
        ),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_pat"))
            .args(["trace", "gen", "--kind", "grpo"])
            .env(var, val)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{var}={val}: {err}");
        assert!(err.contains(needle), "{var}={val}: {err}");
        assert!(o.stdout.is_empty(), "{var}={val}: nothing written");
    }
    // A good value runs.
    let o = Command::new(env!("CARGO_BIN_EXE_pat"))
        .args(["trace", "gen", "--kind", "grpo"])
        .env("PAT_THREADS", "1")
        .env("PAT_CPU_ISA", "portable")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
