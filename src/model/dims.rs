//! The one model-dimensions type: what a profile, the simulator's modeled shapes, the random-model
//! presets and the cost formulas need to know of a model (a subset of `ModelConfig`).

use serde::{Deserialize, Serialize};

use crate::model::config::{Arch, ModelConfig};

fn default_dtype_bytes() -> usize {
    2
}

/// A model's dimensions (compared field by field when a profile is loaded for a model).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDims {
    pub arch: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bytes per weight / KV element (2 for bf16).
    #[serde(default = "default_dtype_bytes")]
    pub dtype_bytes: usize,
}

impl ModelDims {
    /// The dims of a loaded model config (bf16 storage assumed for the byte counts).
    pub fn from_config(c: &ModelConfig) -> ModelDims {
        ModelDims {
            arch: match c.arch {
                Arch::Llama => "llama",
                Arch::Qwen3 => "qwen3",
            }
            .into(),
            num_layers: c.num_layers,
            hidden_size: c.hidden_size,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            intermediate_size: c.intermediate_size,
            vocab_size: c.vocab_size,
            tie_word_embeddings: c.tie_word_embeddings,
            dtype_bytes: 2,
        }
    }

    /// Parameters of one decoder layer's tp-split matrices: qkv, o, gate_up, down.
    pub fn layer_params(&self) -> f64 {
        let (h, q, kv) = (
            self.hidden_size as f64,
            (self.num_heads * self.head_dim) as f64,
            (self.num_kv_heads * self.head_dim) as f64,
        );
        h * (q + 2.0 * kv) + q * h + 3.0 * h * self.intermediate_size as f64
    }

    /// Parameters read by one decode step: every layer plus the lm_head (the embedding is a lookup).
    pub fn step_read_params(&self) -> f64 {
        self.num_layers as f64 * self.layer_params() + (self.vocab_size * self.hidden_size) as f64
    }

    /// Bytes of every tp-split weight (layers, lm_head, and the embedding when untied).
    pub fn sharded_weight_bytes(&self) -> f64 {
        let embed = if self.tie_word_embeddings {
            0.0
        } else {
            (self.vocab_size * self.hidden_size) as f64
        };
        (self.step_read_params() + embed) * self.dtype_bytes as f64
    }

    /// KV-cache bytes per token over all layers and kv heads (K and V).
    pub fn kv_bytes_per_token(&self) -> f64 {
        (2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes) as f64
    }

    /// Tp degrees that divide `world`, the q heads, the kv heads and the intermediate size.
    pub fn candidate_tps(&self, world: usize) -> Vec<usize> {
        (1..=world)
            .filter(|t| {
                world.is_multiple_of(*t)
                    && self.num_heads.is_multiple_of(*t)
                    && self.num_kv_heads.is_multiple_of(*t)
                    && self.intermediate_size.is_multiple_of(*t)
            })
            .collect()
    }
}
