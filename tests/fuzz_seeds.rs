//! The committed fuzz seeds (fuzz/seeds/<target>/) replayed through the functions their targets
//! call, in plain `cargo test` (no fuzzer): each input gives a value whose invariants hold or a
//! clean error; and the inputs that crashed a target before its fix, as regression tests.

use std::path::{Path, PathBuf};

use pat::engine::{check_request, parse_requests_jsonl};
use pat::model::config::ModelConfig;
use pat::model::weights::Checkpoint;
use pat::policy::profile::Profile;
use pat::policy::trace::Trace;

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no seeds in {}", dir.display());
    v
}

/// An `import_*` seed of the trace_jsonl target: what `pat trace import` makes of it, against
/// lengths counted here (the byte-level tokenizer makes one token per byte, a BOS with special
/// tokens; a response gets the EOS the dump dropped).
fn imported(p: &Path, kind: &str, text: &str) {
    use pat::policy::import::{import, ImportOptions, Source};
    let tok = pat::model::tokenizer::Tokenizer::byte_level(300).unwrap();
    let source = if kind.starts_with("verl") {
        Source::Verl
    } else {
        Source::Mooncake
    };
    let opts = ImportOptions {
        source,
        step: (source == Source::Verl).then_some(3),
        cap: Some(400),
        group_size: None,
    };
    let r = import(p, text, &opts, Some(&tok), &|_| {}).unwrap();
    let all: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kept = all
        .iter()
        .filter(|v| source == Source::Mooncake || v["step"] == 3)
        .count();
    assert_eq!(r.trace.requests.len(), kept);
    for (q, &line) in r.trace.requests.iter().zip(&r.lines) {
        let v = &all[line - 1];
        let (prompt, response) = match source {
            Source::Verl => (
                v["input"].as_str().unwrap().len() + 1,
                v["output"].as_str().unwrap().len() + 1,
            ),
            Source::Mooncake => {
                let n = |a: &str, b: &str| v.get(a).or(v.get(b)).unwrap().as_u64().unwrap();
                let (i, o) = (
                    n("input_length", "input_tokens"),
                    n("output_length", "output_tokens"),
                );
                (i as usize, o as usize)
            }
        };
        assert_eq!((q.prompt_len, q.response_len), (prompt, response.min(400)));
    }
    assert_eq!(Trace::parse(p, &r.trace.to_jsonl()).unwrap(), r.trace);
}

#[test]
fn config_and_generation_config_seeds() {
    for (p, b) in seeds("config_json") {
        let c = ModelConfig::from_json(std::str::from_utf8(&b).unwrap(), &p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(c.inv_freq().len(), c.head_dim / 2);
        assert!(c.check_sizes().is_ok());
    }
    let base = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":301,"hidden_size":64,
        "intermediate_size":96,"num_hidden_layers":2,"num_attention_heads":8,"eos_token_id":2}"#;
    for (p, b) in seeds("generation_config") {
        let mut c = ModelConfig::from_json(base, Path::new("config.json")).unwrap();
        c.apply_generation_config(std::str::from_utf8(&b).unwrap(), &p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(c.eos_token_ids.iter().all(|&t| (t as usize) < c.vocab_size));
    }
}

#[test]
fn safetensors_seeds_read_whole_including_0_d_and_empty_tensors() {
    for (p, b) in seeds("safetensors_file") {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), &b).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let all: Vec<(String, Vec<usize>)> = ck
            .tensors()
            .map(|(n, i)| (n.to_string(), i.shape.clone()))
            .collect();
        assert!(!all.is_empty());
        for (name, shape) in all {
            // A 0-D tensor (shape []) is one value; it used to index shape[0] and panic.
            let want: usize = shape.iter().product();
            assert_eq!(ck.read(&name, &shape).unwrap().len(), want, "{name}");
        }
    }
    // The seed's values, decoded independently: F32 [3, 2] = 1..6, BF16 [2] = 1.0, 2.0.
    let b = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds/safetensors_file/two_tensors.safetensors"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.safetensors"), b).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let e = ck
        .read_rows("model.embed_tokens.weight", &[3, 2], 1..3)
        .unwrap();
    assert_eq!(e, vec![3.0, 4.0, 5.0, 6.0]);
    assert_eq!(ck.read("model.norm.weight", &[2]).unwrap(), vec![1.0, 2.0]);
}

#[test]
fn request_trace_and_profile_seeds() {
    let cfg = ModelConfig::from_json(
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":64,"hidden_size":32,
            "intermediate_size":48,"num_hidden_layers":2,"num_attention_heads":8,
            "num_key_value_heads":2,"max_position_embeddings":512}"#,
        Path::new("config.json"),
    )
    .unwrap();
    let mut refused = 0;
    for (p, b) in seeds("requests_jsonl") {
        let reqs = parse_requests_jsonl(&p, std::str::from_utf8(&b).unwrap(), None, 8, false)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        for (i, r) in reqs.iter().enumerate() {
            match check_request(&cfg, i, r) {
                Ok(()) => assert!(r.input_ids.len() + r.max_new_tokens <= 512),
                Err(e) => {
                    assert!(
                        e.to_string()
                            .contains("exceeds max_position_embeddings 512"),
                        "{e}"
                    );
                    refused += 1;
                }
            }
        }
    }
    // u64::MAX new tokens after a BOM (bom_huge.jsonl) and 3 + 510 (past_positions.jsonl): no
    // wrap-around lets either through.
    assert_eq!(refused, 2);
    let mut traces = 0;
    for (p, b) in seeds("trace_jsonl") {
        let text = std::str::from_utf8(&b).unwrap();
        let name = p.file_name().unwrap().to_string_lossy();
        if let Some(kind) = name.strip_prefix("import_") {
            imported(&p, kind, text);
            continue;
        }
        match Trace::parse(&p, text) {
            Ok(t) => {
                traces += 1;
                assert_eq!(Trace::parse(&p, &t.to_jsonl()).unwrap(), t);
            }
            // huge.jsonl: lengths past any model's context are refused, not summed.
            Err(e) => assert!(
                e.to_string().contains("longer than any model's context"),
                "{e}"
            ),
        }
    }
    assert_eq!(traces, 1);
    for (p, b) in seeds("profile_json") {
        let pr = Profile::from_json(std::str::from_utf8(&b).unwrap(), &p).unwrap();
        assert!(pr.cost_model().validate().is_ok());
        // What the profile_json target found (a step_ms of 1.67e43 then, in a rate now that a
        // step is at most ten minutes: rate_1e43_roundtrip.json): serde_json's default float
        // parser is off by an ulp on some numbers, so a saved profile read back differently
        // (1.6666666666666658e43 became ...660e43); with float_roundtrip every value survives.
        let back = Profile::from_json(&pr.to_json(), &p).unwrap();
        assert_eq!(back.decode, pr.decode, "{}", p.display());
        assert_eq!(
            back.transfer_bytes_per_s.to_bits(),
            pr.transfer_bytes_per_s.to_bits()
        );
    }
    let x = 1.6666666666666658e43_f64;
    let parsed: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
    assert_eq!(parsed.to_bits(), x.to_bits());
}
