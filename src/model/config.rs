//! HF `config.json` parsing into one validated `ModelConfig` (LLaMA-3.x and Qwen3).
//!
//! Both rope styles are read: `rope_theta` + `rope_scaling` (published checkpoints) and
//! `rope_parameters` (newer transformers). Anything the decoder does not implement is refused with
//! an error naming the field, never silently ignored.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The decoder architectures this engine implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Arch {
    /// `LlamaForCausalLM`: GQA, optional "llama3" rope scaling, tied or untied lm_head.
    Llama,
    /// `Qwen3ForCausalLM`: per-head q/k RMSNorm before RoPE, explicit head_dim.
    Qwen3,
}

/// LLaMA-3.x frequency-dependent RoPE scaling ("rope_type": "llama3").
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// A validated decoder configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Tokens that end a sequence (config.json, extended by generation_config.json).
    pub eos_token_ids: Vec<u32>,
    /// `torch_dtype` / `dtype` as written, if any.
    pub dtype: Option<String>,
}

/// Bounds on config sizes, far above any published model, that keep every product of them
/// (weight and KV sizes) inside u64 and refuse a corrupt file before anything is allocated.
pub const MAX_DIM: usize = 1 << 24;
pub const MAX_LAYERS: usize = 1 << 12;
pub const MAX_HEADS: usize = 1 << 14;
pub const MAX_HEAD_DIM: usize = 1 << 12;
pub const MAX_POSITIONS: usize = 1 << 30;
/// Parameters (about 17.6 T): byte counts of any plan over such a model fit a u64.
pub const MAX_PARAMS: u64 = 1 << 44;

/// `text` without a leading UTF-8 byte-order mark (some editors write one; JSON parsers refuse it).
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, msg: String) -> Error {
        Error::config(self.path, msg)
    }
    fn usize(&self, key: &str) -> Result<usize> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Err(self.err(format!("missing field `{key}`"))),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| self.err(format!("`{key}` must be a positive integer, got {v}"))),
        }
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.usize(key).map(Some),
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| self.err(format!("`{key}` must be a positive number, got {v}"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(format!("`{key}` must be true or false, got {v}"))),
        }
    }
    /// A token id field that may be an integer or a list of integers.
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = |v: &Value| {
            self.err(format!(
                "`{key}` must be a token id or a list of ids, got {v}"
            ))
        };
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| bad(x))
                })
                .collect(),
            Some(v) => Ok(vec![v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(v))?]),
        }
    }
}

fn parse_rope_scaling(
    f: &Fields,
    key: &str,
    obj: &Map<String, Value>,
) -> Result<Option<Llama3Scaling>> {
    // `type` is the legacy spelling of `rope_type`. transformers cannot build a model from a
    // `rope_scaling` without either, so neither does pat (no silent fallback to default RoPE).
    let kind = match obj.get("rope_type").or_else(|| obj.get("type")) {
        Some(Value::String(k)) => k.as_str(),
        Some(v) => return Err(f.err(format!("`{key}.rope_type` must be a string, got {v}"))),
        None if key == "rope_parameters" => "default",
        None => {
            return Err(f.err(format!(
                "`{key}` has neither `rope_type` nor `type` (transformers refuses it too)"
            )))
        }
    };
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let sub = Fields { obj, path: f.path };
            let s = Llama3Scaling {
                factor: sub.f64_or("factor", f64::NAN)?,
                low_freq_factor: sub.f64_or("low_freq_factor", f64::NAN)?,
                high_freq_factor: sub.f64_or("high_freq_factor", f64::NAN)?,
                original_max_position_embeddings: sub
                    .f64_or("original_max_position_embeddings", f64::NAN)?,
            };
            let fields = [
                ("factor", s.factor),
                ("low_freq_factor", s.low_freq_factor),
                ("high_freq_factor", s.high_freq_factor),
                (
                    "original_max_position_embeddings",
                    s.original_max_position_embeddings,
                ),
            ];
            if let Some((name, _)) = fields.iter().find(|(_, v)| v.is_nan()) {
                return Err(f.err(format!("`{key}` (llama3) is missing `{name}`")));
            }
            if s.high_freq_factor <= s.low_freq_factor {
                return Err(f.err(format!(
                    "`{key}`: high_freq_factor ({}) must exceed low_freq_factor ({})",
                    s.high_freq_factor, s.low_freq_factor
                )));
            }
            Ok(Some(s))
        }
        other => Err(Error::unsupported(
            &format!("{key}.rope_type"),
            other,
            "only default and llama3 RoPE are implemented",
        )),
    }
}

impl ModelConfig {
    /// Reads `DIR/config.json`, and `DIR/generation_config.json` for extra EOS ids when present.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut cfg = Self::from_json(&text, &path)?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let text = std::fs::read_to_string(&gen_path).map_err(|e| Error::io(&gen_path, e))?;
            cfg.apply_generation_config(&text, &gen_path)?;
        }
        Ok(cfg)
    }

    /// Adds the EOS ids of generation_config.json text (`path` only names it in messages). Ids
    /// outside the vocabulary are refused, as they are in config.json.
    pub fn apply_generation_config(&mut self, text: &str, path: &Path) -> Result<()> {
        let v: Value = serde_json::from_str(strip_bom(text))
            .map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
        let Some(obj) = v.as_object() else {
            return Err(Error::config(path, "top level must be a JSON object"));
        };
        let f = Fields { obj, path };
        for id in f.token_ids("eos_token_id")? {
            if id as usize >= self.vocab_size {
                return Err(f.err(format!(
                    "`eos_token_id` {id} is outside the vocabulary (vocab_size {} in config.json)",
                    self.vocab_size
                )));
            }
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        Ok(())
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(strip_bom(text))
            .map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::config(path, "top level must be a JSON object"))?;
        let f = Fields { obj, path };
        let arch_name = match obj.get("architectures") {
            None | Some(Value::Null) => return Err(f.err("missing field `architectures`".into())),
            Some(Value::Array(a)) => match a.first() {
                Some(Value::String(s)) => s.as_str(),
                _ => {
                    return Err(f.err(format!(
                        "`architectures` must be a list holding a class name such as \"LlamaForCausalLM\", got {}",
                        Value::Array(a.clone())
                    )))
                }
            },
            Some(v) => {
                return Err(f.err(format!(
                    "`architectures` must be a list such as [\"LlamaForCausalLM\"], got {v}"
                )))
            }
        };
        let arch = match arch_name {
            "LlamaForCausalLM" => Arch::Llama,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            other => {
                return Err(Error::unsupported(
                    "architectures",
                    other,
                    "supported: LlamaForCausalLM, Qwen3ForCausalLM",
                ))
            }
        };
        if let Some(act) = obj.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(Error::unsupported(
                    "hidden_act",
                    act,
                    "only silu is implemented",
                ));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if f.bool_or(key, false)? {
                return Err(Error::unsupported(key, true, "biases are not implemented"));
            }
        }
        if f.bool_or("use_sliding_window", false)? {
            return Err(Error::unsupported(
                "use_sliding_window",
                true,
                "sliding-window attention is not implemented",
            ));
        }
        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(f.err(format!(
                    "no `head_dim` and hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
                )))
            }
        };
        if num_heads % num_kv_heads != 0 {
            return Err(f.err(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(f.err(format!("head_dim {head_dim} must be even for RoPE")));
        }
        // Rope: `rope_parameters` (newer transformers) holds theta and the scaling together.
        let (rope_theta, rope_scaling) = match obj.get("rope_parameters") {
            Some(Value::Object(rp)) => {
                let sub = Fields { obj: rp, path };
                (
                    sub.f64_or("rope_theta", 10000.0)?,
                    parse_rope_scaling(&f, "rope_parameters", rp)?,
                )
            }
            Some(Value::Null) | None => {
                let scaling = match obj.get("rope_scaling") {
                    Some(Value::Object(rs)) => parse_rope_scaling(&f, "rope_scaling", rs)?,
                    Some(Value::Null) | None => None,
                    Some(v) => {
                        return Err(
                            f.err(format!("`rope_scaling` must be an object or null, got {v}"))
                        )
                    }
                };
                (f.f64_or("rope_theta", 10000.0)?, scaling)
            }
            Some(v) => return Err(f.err(format!("`rope_parameters` must be an object, got {v}"))),
        };
        let rms_norm_eps = f.f64_or("rms_norm_eps", 1e-6)? as f32;
        let dtype = obj
            .get("torch_dtype")
            .or_else(|| obj.get("dtype"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let tie_default = false;
        let cfg = ModelConfig {
            arch,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_layers: f.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: f.bool_or("tie_word_embeddings", tie_default)?,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
            dtype,
        };
        cfg.check_sizes().map_err(|m| f.err(m))?;
        for &id in cfg.eos_token_ids.iter().chain(cfg.bos_token_id.iter()) {
            if id as usize >= cfg.vocab_size {
                return Err(f.err(format!(
                    "special token id {id} is outside the vocabulary (vocab_size {})",
                    cfg.vocab_size
                )));
            }
        }
        Ok(cfg)
    }

    /// Checks every size against the bounds (`MAX_DIM` and the others) that keep products of
    /// them inside u64 and allocations sane; the message names the config.json key.
    pub fn check_sizes(&self) -> std::result::Result<(), String> {
        for (key, v, max) in [
            ("vocab_size", self.vocab_size, MAX_DIM),
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("intermediate_size", self.intermediate_size, MAX_DIM),
            ("num_hidden_layers", self.num_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_kv_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_POSITIONS,
            ),
        ] {
            if v > max {
                return Err(format!(
                    "`{key}` {v} is larger than pat supports ({max}); is the file corrupt?"
                ));
            }
        }
        let (h, l) = (self.hidden_size as u128, self.num_layers as u128);
        let (q, kv) = (
            (self.num_heads * self.head_dim) as u128,
            (self.num_kv_heads * self.head_dim) as u128,
        );
        let params = l * (h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size as u128)
            + 2 * self.vocab_size as u128 * h;
        if params > MAX_PARAMS as u128 {
            return Err(format!(
                "these sizes make {params} parameters, more than pat supports ({MAX_PARAMS}); is the file corrupt?"
            ));
        }
        Ok(())
    }

    /// Query width of the attention block (num_heads * head_dim); may differ from hidden_size.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Does the model have per-head q/k RMSNorm (Qwen3)?
    pub fn has_qk_norm(&self) -> bool {
        self.arch == Arch::Qwen3
    }
    /// KV-cache bytes per token over all layers and heads at `elem_bytes` per element.
    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.num_layers * self.kv_dim() * elem_bytes
    }

    /// RoPE inverse frequencies [head_dim / 2], with llama3 scaling applied when configured
    /// (same formula as transformers' `_compute_llama3_parameters`).
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim as f64;
        (0..self.head_dim / 2)
            .map(|i| {
                let base = 1.0 / self.rope_theta.powf((2 * i) as f64 / d);
                let Some(s) = self.rope_scaling else {
                    return base as f32;
                };
                let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                let wavelen = 2.0 * std::f64::consts::PI / base;
                let f = if wavelen < high_wavelen {
                    base
                } else if wavelen > low_wavelen {
                    base / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * base / s.factor + smooth * base
                };
                f as f32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
