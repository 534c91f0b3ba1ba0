//! Random-weight HF model directories (config, safetensors, tokenizer): the tool runs with no downloads.

use std::path::Path;

use safetensors::{tensor::View, SafeTensorError};
use serde_json::{json, Value};

#[cfg(test)]
use super::random::CHUNK;
use super::random::{info, Init, LazyTensor};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::model::config::Arch;
use crate::model::dims::ModelDims;
use crate::model::tokenizer::{Tokenizer, MIN_BYTE_LEVEL_VOCAB};

/// Model size presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// ~0.1M parameters: unit tests and CPU smoke runs.
    Tiny,
    /// ~30M parameters: CPU/GPU functional runs.
    Small,
    /// Exactly LLaMA-3.1-8B dims (Qwen3-14B dims for the Qwen3 arch): realistic memory and timing.
    Llama3_8bShape,
    /// SmolLM2-135M dims (30 layers, hidden 576, 9/3 heads, ffn 1536, vocab 49152, tied): a real
    /// shape small enough for CPU benchmarks against torch.
    Smollm135mShape,
}

impl Preset {
    /// The preset's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Llama3_8bShape => "llama3-8b-shape",
            Preset::Smollm135mShape => "smollm-135m-shape",
        }
    }
}

/// What `init_model` writes.
#[derive(Clone, Copy, Debug)]
pub struct InitOptions {
    pub arch: Arch,
    pub preset: Preset,
    pub seed: u64,
    pub dtype: Dtype,
    /// Write into an existing non-empty directory (files of the same names are replaced).
    pub force: bool,
    /// Write one rank's shard of TP-`shard` as a model of its own (heads, kv heads, intermediate
    /// size and vocab divided by `shard`): profiling it on one GPU measures a TP-`shard` rank's
    /// compute without the collectives. 1: the whole model.
    pub shard: usize,
}

/// One (arch, preset) pair: the model's dimensions plus what config.json needs beyond them.
#[derive(Clone, Debug, PartialEq)]
pub struct PresetDims {
    pub dims: ModelDims,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
}

/// The dimensions of `preset` for `arch`.
pub fn preset_dims(arch: Arch, preset: Preset) -> PresetDims {
    let qwen = arch == Arch::Qwen3;
    // (vocab, hidden, intermediate, layers, heads, kv heads, head_dim, max positions)
    let (vocab, hidden, inter, layers, heads, kv, head_dim, max_pos) = match (preset, qwen) {
        (Preset::Tiny, _) => (320, 64, 128, 2, 8, 4, if qwen { 16 } else { 8 }, 512),
        (Preset::Small, _) => (2048, 512, 1536, 8, 8, 4, if qwen { 128 } else { 64 }, 4096),
        // LLaMA-3.1-8B.
        (Preset::Llama3_8bShape, false) => (128_256, 4096, 14_336, 32, 32, 8, 128, 131_072),
        // Qwen3-14B.
        (Preset::Llama3_8bShape, true) => (151_936, 5120, 17_408, 40, 40, 8, 128, 40_960),
        // SmolLM2-135M (a LLaMA; the same dims for the Qwen3 arch).
        (Preset::Smollm135mShape, _) => (49_152, 576, 1536, 30, 9, 3, 64, 8192),
    };
    PresetDims {
        dims: ModelDims {
            arch: if qwen { "qwen3" } else { "llama" }.into(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            tie_word_embeddings: (qwen && preset != Preset::Llama3_8bShape)
                || preset == Preset::Smollm135mShape,
            dtype_bytes: 2,
        },
        max_position_embeddings: max_pos,
        rope_theta: if qwen { 1e6 } else { 500_000.0 },
    }
}

/// `d` cut to one rank's shard of TP-`k` (see [`InitOptions::shard`]); an error names what `k`
/// does not divide.
pub fn shard_dims(mut d: PresetDims, k: usize) -> Result<PresetDims> {
    let m = &d.dims;
    for (what, n) in [
        ("attention heads", m.num_heads),
        ("kv heads", m.num_kv_heads),
        ("intermediate size", m.intermediate_size),
        ("vocab size", m.vocab_size),
    ] {
        if k == 0 || n % k != 0 {
            return Err(Error::Invalid(format!(
                "`shard` {k} does not divide the {what} ({n})"
            )));
        }
    }
    d.dims.num_heads /= k;
    d.dims.num_kv_heads /= k;
    d.dims.intermediate_size /= k;
    d.dims.vocab_size /= k;
    Ok(d)
}

/// `original_max_position_embeddings` of the llama3 rope scaling: small enough that scaling is active.
fn llama_original_max_pos(preset: Preset) -> usize {
    match preset {
        Preset::Tiny => 64,
        Preset::Small => 512,
        Preset::Llama3_8bShape | Preset::Smollm135mShape => 8192,
    }
}

/// config.json as transformers writes it.
fn config_json(opts: &InitOptions, d: &PresetDims) -> Value {
    let mut c = json!({
        "vocab_size": d.dims.vocab_size,
        "hidden_size": d.dims.hidden_size,
        "intermediate_size": d.dims.intermediate_size,
        "num_hidden_layers": d.dims.num_layers,
        "num_attention_heads": d.dims.num_heads,
        "num_key_value_heads": d.dims.num_kv_heads,
        "head_dim": d.dims.head_dim,
        "hidden_act": "silu",
        "rope_theta": d.rope_theta,
        "max_position_embeddings": d.max_position_embeddings,
        "tie_word_embeddings": d.dims.tie_word_embeddings,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": info(opts.dtype).2,
        "initializer_range": 0.02,
        "use_cache": true,
    });
    let extra = match opts.arch {
        Arch::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "rms_norm_eps": 1e-5,
            "mlp_bias": false,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": llama_original_max_pos(opts.preset),
            },
        }),
        Arch::Qwen3 => json!({
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "rms_norm_eps": 1e-6,
            "rope_scaling": null,
            "use_sliding_window": false,
            "sliding_window": null,
            "max_window_layers": d.dims.num_layers,
        }),
    };
    if let (Some(c), Value::Object(e)) = (c.as_object_mut(), extra) {
        c.extend(e);
    }
    c
}

/// Every tensor of the model, with HF names and shapes.
fn tensors(opts: &InitOptions, d: &PresetDims) -> Vec<(String, LazyTensor)> {
    let (h, inter, hd) = (
        d.dims.hidden_size,
        d.dims.intermediate_size,
        d.dims.head_dim,
    );
    let (q, kv) = (d.dims.num_heads * hd, d.dims.num_kv_heads * hd);
    let lin = |fan_in| Init::Linear { fan_in };
    let mut v = Vec::new();
    let mut push = |name: &str, shape: Vec<usize>, init| {
        v.push(LazyTensor::new(name, shape, init, opts.seed, opts.dtype))
    };
    push(
        "model.embed_tokens.weight",
        vec![d.dims.vocab_size, h],
        Init::Embedding,
    );
    for i in 0..d.dims.num_layers {
        let p = |name: &str| format!("model.layers.{i}.{name}");
        push(&p("input_layernorm.weight"), vec![h], Init::Norm);
        push(&p("self_attn.q_proj.weight"), vec![q, h], lin(h));
        push(&p("self_attn.k_proj.weight"), vec![kv, h], lin(h));
        push(&p("self_attn.v_proj.weight"), vec![kv, h], lin(h));
        push(&p("self_attn.o_proj.weight"), vec![h, q], lin(q));
        if opts.arch == Arch::Qwen3 {
            push(&p("self_attn.q_norm.weight"), vec![hd], Init::Norm);
            push(&p("self_attn.k_norm.weight"), vec![hd], Init::Norm);
        }
        push(&p("post_attention_layernorm.weight"), vec![h], Init::Norm);
        push(&p("mlp.gate_proj.weight"), vec![inter, h], lin(h));
        push(&p("mlp.up_proj.weight"), vec![inter, h], lin(h));
        push(&p("mlp.down_proj.weight"), vec![h, inter], lin(inter));
    }
    push("model.norm.weight", vec![h], Init::Norm);
    if !d.dims.tie_word_embeddings {
        push("lm_head.weight", vec![d.dims.vocab_size, h], lin(h));
    }
    v
}

#[cfg(test)]
thread_local! {
    /// Tests: the file whose write fails (a disk filling up at that point).
    static FAIL_WRITING: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// The files one `init_model` run has written, removed again unless the run completes.
struct Written {
    dir: std::path::PathBuf,
    files: Vec<std::path::PathBuf>,
    /// The first directory this run created (the output or an ancestor of it), if any.
    created: Option<std::path::PathBuf>,
    done: bool,
}

impl Written {
    /// Runs `write` on `DIR/NAME.tmp`, then renames it to `DIR/NAME`.
    fn write_atomic(&mut self, name: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let fin = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        #[cfg(test)]
        let write = |p: &Path| match FAIL_WRITING.with(|f| f.get()) {
            Some(n) if n == name => Err(Error::io(p, std::io::Error::other("injected failure"))),
            _ => write(p),
        };
        if let Err(e) = write(&tmp) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&fin, e))?;
        self.files.push(fin);
        Ok(())
    }

    fn write_json(&mut self, name: &str, v: &Value) -> Result<()> {
        let text = serde_json::to_string_pretty(v)
            .map_err(|e| Error::config(self.dir.join(name), e.to_string()))?;
        self.write_atomic(name, |p| {
            std::fs::write(p, text + "\n").map_err(|e| Error::io(p, e))
        })
    }
}

impl Drop for Written {
    /// An unfinished run takes back what it wrote: its files, and the directories it created.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if let Some(top) = &self.created {
            // Only directories this run created; remove_dir refuses any that hold other files.
            let mut d = self.dir.clone();
            loop {
                let _ = std::fs::remove_dir(&d);
                if d == *top || !d.pop() {
                    break;
                }
            }
        }
    }
}

/// Refuses an existing non-empty directory unless `force`; creates it if missing. Returns the
/// first directory it created (`out` or an ancestor), if any.
fn prepare_dir(out: &Path, force: bool) -> Result<Option<std::path::PathBuf>> {
    match std::fs::read_dir(out) {
        Ok(mut entries) => match entries.next() {
            Some(_) if !force => Err(Error::Invalid(format!(
                "{}: directory is not empty (set `force` to write into it)",
                out.display()
            ))),
            _ => {
                // A stale shard index would take precedence over the new single file.
                let index = out.join("model.safetensors.index.json");
                match std::fs::remove_file(&index) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&index, e)),
                    _ => Ok(None),
                }
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let top = out
                .ancestors()
                .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
                .last()
                .unwrap_or(out)
                .to_path_buf();
            std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
            Ok(Some(top))
        }
        Err(e) => Err(Error::io(out, e)),
    }
}

/// The byte-level tokenizer of `d`; an error names the shard or preset whose vocab is too small.
fn tokenizer_for(opts: &InitOptions, d: &PresetDims) -> Result<Tokenizer> {
    let vocab = d.dims.vocab_size;
    if vocab < MIN_BYTE_LEVEL_VOCAB {
        let full = preset_dims(opts.arch, opts.preset).dims.vocab_size;
        let what = if opts.shard > 1 {
            format!(
                "`shard` {} with preset {}: the shard's vocab is {full}/{} = {vocab}",
                opts.shard,
                opts.preset.name(),
                opts.shard
            )
        } else {
            format!("preset {}: its vocab is {vocab}", opts.preset.name())
        };
        return Err(Error::Invalid(format!(
            "{what}, below the {MIN_BYTE_LEVEL_VOCAB} tokens of the byte-level tokenizer \
             (3 specials + 256 bytes); use a smaller `shard` or a larger preset"
        )));
    }
    Tokenizer::byte_level(vocab)
}

/// Writes DIR/{config.json, generation_config.json, model.safetensors, tokenizer.json}.
/// Returns the bytes of weights written. config.json is written last, so an interrupted run
/// never leaves a directory that looks like a complete model; a run that fails removes the
/// files it wrote and the directories it created.
pub fn init_model(out: &Path, opts: &InitOptions) -> Result<u64> {
    let d = shard_dims(preset_dims(opts.arch, opts.preset), opts.shard)?;
    let tok = tokenizer_for(opts, &d)?;
    let created = prepare_dir(out, opts.force)?;
    let mut w = Written {
        dir: out.to_path_buf(),
        files: Vec::new(),
        created,
        done: false,
    };

    let tensors = tensors(opts, &d);
    let bytes: u64 = tensors.iter().map(|(_, t)| t.data_len() as u64).sum();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    w.write_atomic("model.safetensors", |p| {
        // safetensors writes through a private (0600) temporary file; give the result the
        // permissions of a file created here, as the other files have.
        let perms = std::fs::File::create(p)
            .and_then(|f| f.metadata())
            .map_err(|e| Error::io(p, e))?
            .permissions();
        safetensors::serialize_to_file(tensors, Some(meta), p).map_err(|e| match e {
            SafeTensorError::IoError(io) => Error::io(p, io),
            other => Error::checkpoint(p, other.to_string()),
        })?;
        std::fs::set_permissions(p, perms).map_err(|e| Error::io(p, e))
    })?;

    w.write_atomic("tokenizer.json", |p| tok.save(p))?;
    w.write_json(
        "generation_config.json",
        &json!({"bos_token_id": 1, "eos_token_id": 2, "do_sample": false}),
    )?;
    w.write_json("config.json", &config_json(opts, &d))?;
    w.done = true;
    Ok(bytes)
}

#[cfg(test)]
mod tests;
