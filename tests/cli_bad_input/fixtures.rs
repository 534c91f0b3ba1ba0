//! The files the cases run on, made once per test run under the target's temp dir: a tiny
//! random llama from `pat init-model`, copies of it with one file damaged, hand-written degenerate
//! models (vocabularies of 2 and 3, one layer, one head), request files and traces.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{json, Value};

pub struct Fx {
    pub dir: PathBuf,
}

impl Fx {
    /// The path of fixture `name` as an argument.
    pub fn p(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

pub fn get() -> &'static Fx {
    static FX: OnceLock<Fx> = OnceLock::new();
    FX.get_or_init(make)
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// A copy of the tiny llama named `name` whose `file` holds `content`.
fn broken(fx: &Path, name: &str, file: &str, content: &[u8]) {
    let d = fx.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        std::fs::copy(fx.join("m").join(f), d.join(f)).unwrap();
    }
    write(&d, file, content);
}

/// Safetensors bytes of f32 tensors (name, shape, values), written by hand from the format spec.
fn safetensors(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
    for (name, shape, vals) in tensors {
        let start = data.len();
        data.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// A llama model directory with the given sizes and small deterministic weights; `head_value`
/// (when set) fills lm_head.weight.
fn llama(
    fx: &Path,
    name: &str,
    vocab: usize,
    layers: usize,
    heads: usize,
    head_value: Option<f32>,
) {
    let (h, inter, hd) = (16usize, 32usize, 8usize);
    let q = heads * hd;
    let mut seed = 1u32;
    let mut vals = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.4
            })
            .collect()
    };
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![vocab, h],
            vals(vocab * h),
        ),
        ("model.norm.weight".into(), vec![h], vec![1.0; h]),
    ];
    let head = match head_value {
        Some(x) => vec![x; vocab * h],
        None => vals(vocab * h),
    };
    t.push(("lm_head.weight".into(), vec![vocab, h], head));
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
        ] {
            t.push((format!("{p}.{n}.weight"), shape, vec![1.0; h]));
        }
        for (n, rows, cols) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", q, h),
            ("self_attn.v_proj", q, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", inter, h),
            ("mlp.up_proj", inter, h),
            ("mlp.down_proj", h, inter),
        ] {
            t.push((
                format!("{p}.{n}.weight"),
                vec![rows, cols],
                vals(rows * cols),
            ));
        }
    }
    let d = fx.join(name);
    std::fs::create_dir_all(&d).unwrap();
    write(&d, "model.safetensors", safetensors(&t));
    let cfg = json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "head_dim": hd, "max_position_embeddings": 64,
        "eos_token_id": vocab - 1, "tie_word_embeddings": false
    });
    write(&d, "config.json", cfg.to_string());
}

/// The tiny llama's model.safetensors with the first value of `tensor` set to `x`.
fn poisoned(fx: &Path, name: &str, tensor: &str, x: f32) {
    let mut bytes = std::fs::read(fx.join("m/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header[tensor]["dtype"], "F32");
    let at = 8 + n + header[tensor]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[at..at + 4].copy_from_slice(&x.to_le_bytes());
    broken(fx, name, "model.safetensors", &bytes);
}

/// The tiny llama's model.safetensors with `tensor`'s header field `key` set to `v` (the header
/// rewritten, its length prefix with it; the data as it was).
fn reheadered(fx: &Path, name: &str, tensor: &str, key: &str, v: Value) {
    let bytes = std::fs::read(fx.join("m/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header[tensor][key] = v;
    let h = header.to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    broken(fx, name, "model.safetensors", &out);
}

fn make() -> Fx {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli_bad_input");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let st = Command::new(env!("CARGO_BIN_EXE_pat"))
        .args(["init-model", "--preset", "tiny", "--seed", "3", "--out"])
        .arg(dir.join("m"))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let d = &dir;
    let cfg = std::fs::read_to_string(d.join("m/config.json")).unwrap();
    let set = |key: &str, v: Value| -> Vec<u8> {
        let mut c: Value = serde_json::from_str(&cfg).unwrap();
        c[key] = v;
        c.to_string().into_bytes()
    };
    // Config sizes far past the checkpoint (allocation before validation).
    broken(
        d,
        "layers_1e9",
        "config.json",
        &set("num_hidden_layers", json!(1_000_000_000u64)),
    );
    broken(
        d,
        "vocab_1e12",
        "config.json",
        &set("vocab_size", json!(1_000_000_000_000u64)),
    );
    broken(
        d,
        "head_dim_2p62",
        "config.json",
        &set("head_dim", json!(1u64 << 62)),
    );
    broken(
        d,
        "inter_1e6",
        "config.json",
        &set("intermediate_size", json!(1_000_000)),
    );
    broken(
        d,
        "heads_2p40",
        "config.json",
        &set("num_attention_heads", json!(1u64 << 40)),
    );
    // Damaged files.
    let full = std::fs::read(d.join("m/model.safetensors")).unwrap();
    broken(d, "trunc", "model.safetensors", &full[..full.len() / 2]);
    broken(
        d,
        "garbage",
        "model.safetensors",
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage",
    );
    broken(d, "badjson", "config.json", b"{\"architectures\": [");
    reheadered(d, "reshaped", "model.norm.weight", "shape", json!([1, 1]));
    broken(
        d,
        "arch_gpt2",
        "config.json",
        &set("architectures", json!(["GPT2LMHeadModel"])),
    );
    broken(
        d,
        "bias",
        "config.json",
        &set("attention_bias", json!(true)),
    );
    broken(
        d,
        "shape",
        "config.json",
        &set("intermediate_size", json!(64)),
    );
    // Fewer layers than the checkpoint holds (the tiny preset has 2).
    broken(
        d,
        "layers_1_of_2",
        "config.json",
        &set("num_hidden_layers", json!(1)),
    );
    broken(d, "noweights", "config.json", cfg.as_bytes());
    std::fs::remove_file(d.join("noweights/model.safetensors")).unwrap();
    broken(d, "notok", "config.json", cfg.as_bytes());
    std::fs::remove_file(d.join("notok/tokenizer.json")).unwrap();
    // A tokenizer that adds no BOS token: an empty text prompt is no tokens at all.
    let mut tok: Value =
        serde_json::from_slice(&std::fs::read(d.join("m/tokenizer.json")).unwrap()).unwrap();
    tok["post_processor"] = Value::Null;
    broken(d, "nobos", "tokenizer.json", tok.to_string().as_bytes());
    // Misleading-message models.
    broken(
        d,
        "arch_string",
        "config.json",
        &set("architectures", json!("LlamaForCausalLM")),
    );
    broken(
        d,
        "arch_empty",
        "config.json",
        &set("architectures", json!([])),
    );
    broken(
        d,
        "rope_untyped",
        "config.json",
        &set("rope_scaling", json!({"factor": 8.0})),
    );
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend(cfg.as_bytes());
    broken(d, "bom", "config.json", &bom);
    broken(
        d,
        "gen_eos",
        "generation_config.json",
        br#"{"eos_token_id": [2, 4000]}"#,
    );
    broken(d, "gen_list", "generation_config.json", b"[1, 2]");
    broken(d, "st_dir", "config.json", cfg.as_bytes());
    std::fs::remove_file(d.join("st_dir/model.safetensors")).unwrap();
    std::fs::create_dir(d.join("st_dir/model.safetensors")).unwrap();
    broken(d, "tok_dir", "config.json", cfg.as_bytes());
    std::fs::remove_file(d.join("tok_dir/tokenizer.json")).unwrap();
    std::fs::create_dir(d.join("tok_dir/tokenizer.json")).unwrap();
    broken(
        d,
        "empty_map",
        "model.safetensors.index.json",
        br#"{"weight_map": {}}"#,
    );
    broken(
        d,
        "map_number",
        "model.safetensors.index.json",
        br#"{"weight_map": 5}"#,
    );
    broken(
        d,
        "shard_dir",
        "model.safetensors.index.json",
        br#"{"weight_map": {"model.norm.weight": "shard"}}"#,
    );
    std::fs::create_dir(d.join("shard_dir/shard")).unwrap();
    // Non-finite weights; finite weights whose logits overflow.
    poisoned(d, "nan_norm", "model.norm.weight", f32::NAN);
    poisoned(d, "inf_embed", "model.embed_tokens.weight", f32::INFINITY);
    llama(d, "huge_head", 8, 1, 1, Some(f32::MAX));
    // Degenerate but valid models.
    llama(d, "vocab2", 2, 1, 1, None);
    llama(d, "vocab3", 3, 1, 2, None);
    llama(d, "one_layer_one_head", 64, 1, 1, None);
    // Request files and traces.
    let line = |ids: &[u32], max_new: u64| {
        json!({"input_ids": ids, "max_new_tokens": max_new}).to_string()
    };
    let prompt: Vec<u32> = (3..63).collect();
    let sixteen: Vec<String> = (0..16).map(|_| line(&prompt, 4)).collect();
    write(d, "reqs16.jsonl", sixteen.join("\n"));
    write(
        d,
        "huge_max_new.jsonl",
        line(&[1, 2], 18_446_744_073_709_551_000),
    );
    write(d, "bom.jsonl", format!("\u{feff}{}\n", line(&[1], 2)));
    write(d, "max_new_zero.jsonl", line(&[1, 2], 0));
    write(
        d,
        "bad.jsonl",
        "{\"input_ids\":[1,2]}\n{\"input_ids\":[1,2]\n",
    );
    write(d, "ids_oov.jsonl", line(&[1, 5000], 2));
    // A trace whose third line (after a blank one) gives prompt ids outside the vocabulary.
    write(
        d,
        "trace_ids_oov.jsonl",
        "{\"prompt_len\":2,\"response_len\":3}\n\n{\"prompt_len\":2,\"input_ids\":[1,5000],\"response_len\":3}\n",
    );
    write(d, "empty.jsonl", "");
    // Component-model constants of the wrong kind: a string for a number, a number for a table.
    write(d, "cost_string.json", "{\"hbm_efficiency\":\"x\"}");
    write(d, "cost_table.json", "{\"allreduce\":5}");
    std::fs::create_dir(d.join("a_dir")).unwrap();
    // A symbolic link to a file that is not there.
    std::os::unix::fs::symlink("no_such_file.svg", d.join("dangling.svg")).unwrap();
    // Request 1 on line 4: blank lines are skipped, so requests and lines are numbered apart.
    write(
        d,
        "gaps.jsonl",
        format!("\n{}\n\n{}\n", line(&[1], 2), line(&[1, 5000], 2)),
    );
    write(d, "empty_ids.jsonl", "{\"input_ids\":[]}\n");
    write(d, "empty_text.jsonl", "{\"prompt\":\"\"}\n");
    // Request 1, on line 3 (after a blank line), needs 3 blocks of 16 tokens.
    write(
        d,
        "long_second.jsonl",
        "{\"input_ids\":[1,2],\"max_new_tokens\":1}\n\n{\"input_ids\":[1,2,3],\"max_new_tokens\":40}\n",
    );
    let trace = |p: u64, r: u64| json!({"prompt_len": p, "response_len": r}).to_string();
    write(d, "trace_u64max.jsonl", trace(1, u64::MAX));
    write(d, "trace_2p40.jsonl", trace(4, 1 << 40));
    write(d, "trace_200k.jsonl", trace(8, 200_000));
    write(
        d,
        "trace_long.jsonl",
        [trace(8, 8), trace(100, 1000)].join("\n"),
    );
    write(
        d,
        "trace_small.jsonl",
        [trace(4, 3), trace(2, 5), trace(3, 2)].join("\n"),
    );
    write(
        d,
        "trace_dup_key.jsonl",
        "{\"prompt_len\":4,\"response_len\":3,\"prompt_len\":9}\n",
    );
    // A measured profile of a 2-rank node whose model holds 64 positions.
    let decode: Vec<_> = [1usize, 2]
        .iter()
        .flat_map(|&tp| {
            [(1usize, 8usize), (1, 32), (4, 8), (4, 32)].map(|(batch, context)| {
                let ms = 2.0 / tp as f64 + 0.1 * batch as f64 + 0.001 * (batch * context) as f64;
                json!({"tp": tp, "batch": batch, "context": context, "step_ms": ms})
            })
        })
        .collect();
    let measured = json!({"decode": true, "prefill": true, "transfer": true, "switch": false});
    let profile = json!({
        "version": 1,
        "model": {"arch": "llama", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                  "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 256},
        "world": 2, "backend": "cpu", "device": "test", "decode": decode,
        "prefill": [{"tp": 1, "tokens_per_s": 1000.0}, {"tp": 2, "tokens_per_s": 1800.0}],
        "transfer_bytes_per_s": 1e9,
        "switch": {"fixed_ms": 10.0, "weight_bytes_per_s": 1e9, "kv_bytes_per_s": 1e9},
        "measured": measured, "max_position_embeddings": 64,
    });
    write(d, "prof_w2.json", profile.to_string());
    Fx { dir }
}
