//! Shard rules: which rows of which checkpoint tensor each tp-rank holds, split axis outermost.
//!
//! Every tensor-parallel weight is viewed as a matrix whose rows run along the split axis and whose
//! row length is `hidden_size`: column-parallel weights as HF stores them ([out, in]), row-parallel
//! weights transposed ([in, out]). A rank's buffer for a weight is the concatenation of a few
//! contiguous row ranges ("segments"): fused QKV has three, gate_up two, the others one. The loader
//! and the reshard planner both read this one description.

use std::ops::Range;

use crate::model::config::ModelConfig;

/// The tensor-parallel weights of the decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Fused [q; k; v] projection (column-parallel over heads).
    Qkv,
    /// Attention output projection (row-parallel over q heads), stored transposed.
    O,
    /// Fused [gate; up] projection (column-parallel over the intermediate size).
    GateUp,
    /// MLP down projection (row-parallel over the intermediate size), stored transposed.
    Down,
    /// Vocab-parallel token embedding.
    Embed,
    /// Vocab-parallel output head (the embedding when tied).
    LmHead,
}

impl Role {
    pub const LAYER: [Role; 4] = [Role::Qkv, Role::O, Role::GateUp, Role::Down];
}

/// Where a segment's rows come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Rows of a checkpoint tensor; `transposed` when the checkpoint stores [hidden, rows].
    Tensor {
        name: String,
        transposed: bool,
        total_rows: usize,
    },
    /// Zero padding (vocab padded to a multiple of lcm(tp, 64)).
    Zeros,
}

/// One contiguous run of rows in a rank's buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub source: Source,
    /// Rows of the source matrix (for `Zeros`, an index range in the padded axis).
    pub rows: Range<usize>,
}

/// Rows [r * n / tp, (r + 1) * n / tp) of an axis of `n` split `tp` ways.
pub fn split(n: usize, tp: usize, r: usize) -> Range<usize> {
    let per = n / tp;
    r * per..(r + 1) * per
}

/// The vocabulary rounded up to a multiple of lcm(tp, 64). For the power-of-two degrees (up
/// to 64) the padded size is then the same at every tp, so vocab shards nest like the others and
/// growing tp moves no embedding or head rows between ranks; the price is at most 63 zero rows.
///
/// ```
/// use pat::parallel::shard::{padded_vocab, split};
/// // LLaMA-3's 128256 is already a multiple of 64: no padding at tp 1..8.
/// assert_eq!(padded_vocab(128256, 8), 128256);
/// // 301 pads to 320 at tp 2 and tp 4 alike, so tp-rank 1 of 4 sits inside tp-rank 0 of 2.
/// assert_eq!(padded_vocab(301, 2), padded_vocab(301, 4));
/// assert_eq!((split(320, 4, 1), split(320, 2, 0)), (80..160, 0..160));
/// // A degree that is not a power of two pads further (lcm(3, 64) = 192).
/// assert_eq!(padded_vocab(301, 3), 384);
/// ```
pub fn padded_vocab(vocab: usize, tp: usize) -> usize {
    let m = lcm(tp, VOCAB_PAD);
    vocab.div_ceil(m) * m
}

/// Vocabulary padding granule (see `padded_vocab`).
pub const VOCAB_PAD: usize = 64;

fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

fn tensor(name: String, transposed: bool, total_rows: usize, rows: Range<usize>) -> Segment {
    Segment {
        source: Source::Tensor {
            name,
            transposed,
            total_rows,
        },
        rows,
    }
}

/// The segments of `role` (in `layer`, ignored for Embed/LmHead) held by tp-rank `r` of `tp`.
pub fn segments(cfg: &ModelConfig, role: Role, layer: usize, tp: usize, r: usize) -> Vec<Segment> {
    let p = format!("model.layers.{layer}");
    let hd = cfg.head_dim;
    let heads = |n: usize| {
        let h = split(n, tp, r);
        h.start * hd..h.end * hd
    };
    match role {
        Role::Qkv => vec![
            tensor(
                format!("{p}.self_attn.q_proj.weight"),
                false,
                cfg.q_dim(),
                heads(cfg.num_heads),
            ),
            tensor(
                format!("{p}.self_attn.k_proj.weight"),
                false,
                cfg.kv_dim(),
                heads(cfg.num_kv_heads),
            ),
            tensor(
                format!("{p}.self_attn.v_proj.weight"),
                false,
                cfg.kv_dim(),
                heads(cfg.num_kv_heads),
            ),
        ],
        Role::O => vec![tensor(
            format!("{p}.self_attn.o_proj.weight"),
            true,
            cfg.q_dim(),
            heads(cfg.num_heads),
        )],
        Role::GateUp => {
            let i = split(cfg.intermediate_size, tp, r);
            vec![
                tensor(
                    format!("{p}.mlp.gate_proj.weight"),
                    false,
                    cfg.intermediate_size,
                    i.clone(),
                ),
                tensor(
                    format!("{p}.mlp.up_proj.weight"),
                    false,
                    cfg.intermediate_size,
                    i,
                ),
            ]
        }
        Role::Down => vec![tensor(
            format!("{p}.mlp.down_proj.weight"),
            true,
            cfg.intermediate_size,
            split(cfg.intermediate_size, tp, r),
        )],
        Role::Embed | Role::LmHead => {
            let name = if role == Role::LmHead && !cfg.tie_word_embeddings {
                "lm_head.weight"
            } else {
                "model.embed_tokens.weight"
            };
            let all = split(padded_vocab(cfg.vocab_size, tp), tp, r);
            let real = all.start.min(cfg.vocab_size)..all.end.min(cfg.vocab_size);
            let mut segs = Vec::new();
            if !real.is_empty() {
                segs.push(tensor(
                    name.to_string(),
                    false,
                    cfg.vocab_size,
                    real.clone(),
                ));
            }
            if real.end < all.end {
                segs.push(Segment {
                    source: Source::Zeros,
                    rows: real.end.max(all.start)..all.end,
                });
            }
            segs
        }
    }
}

/// Total rows of `role` held by one rank at degree `tp` (every rank holds the same number).
pub fn rows(cfg: &ModelConfig, role: Role, tp: usize) -> usize {
    segments(cfg, role, 0, tp, 0)
        .iter()
        .map(|s| s.rows.len())
        .sum()
}

/// Weight bytes one rank holds at degree `tp` at `elem_bytes` per element (what
/// `RankWeights::bytes` reports at 4).
pub fn weight_bytes_per_rank(cfg: &ModelConfig, tp: usize, elem_bytes: usize) -> u64 {
    let h = cfg.hidden_size as u64;
    let layer_rows: usize = Role::LAYER.iter().map(|&r| rows(cfg, r, tp)).sum();
    let vocab_rows = rows(cfg, Role::Embed, tp) * if cfg.tie_word_embeddings { 1 } else { 2 };
    let norms = cfg.num_layers
        * (2 * cfg.hidden_size
            + if cfg.has_qk_norm() {
                2 * cfg.head_dim
            } else {
                0
            })
        + cfg.hidden_size;
    ((cfg.num_layers * layer_rows + vocab_rows) as u64 * h + norms as u64) * elem_bytes as u64
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::config::Arch;

    /// A small Llama config (8 heads, 4 kv heads) with `vocab` entries, for tests.
    pub(crate) fn cfg(vocab: usize) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            vocab_size: vocab,
            hidden_size: 64,
            intermediate_size: 96,
            num_layers: 2,
            num_heads: 8,
            num_kv_heads: 4,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            rope_scaling: None,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            dtype: None,
        }
    }

    #[test]
    fn shards_tile_each_tensor_exactly_once() {
        let c = cfg(301);
        for tp in [1, 2, 4] {
            for role in [
                Role::Qkv,
                Role::O,
                Role::GateUp,
                Role::Down,
                Role::Embed,
                Role::LmHead,
            ] {
                let mut covered: std::collections::HashMap<String, Vec<usize>> = Default::default();
                let mut zeros = 0;
                for r in 0..tp {
                    let segs = segments(&c, role, 1, tp, r);
                    assert_eq!(
                        segs.iter().map(|s| s.rows.len()).sum::<usize>(),
                        rows(&c, role, tp)
                    );
                    for s in segs {
                        match s.source {
                            Source::Tensor {
                                name, total_rows, ..
                            } => {
                                let v = covered.entry(name).or_insert_with(|| vec![0; total_rows]);
                                s.rows.for_each(|i| v[i] += 1);
                            }
                            Source::Zeros => zeros += s.rows.len(),
                        }
                    }
                }
                for (name, v) in covered {
                    assert!(v.iter().all(|&n| n == 1), "{role:?} tp{tp} {name}");
                }
                if matches!(role, Role::Embed | Role::LmHead) {
                    assert_eq!(zeros, padded_vocab(301, tp) - 301);
                }
            }
        }
    }

    #[test]
    fn tied_head_reads_the_embedding() {
        let mut c = cfg(300);
        c.tie_word_embeddings = true;
        let s = segments(&c, Role::LmHead, 0, 2, 1);
        assert!(
            matches!(&s[0].source, Source::Tensor { name, .. } if name == "model.embed_tokens.weight")
        );
        // 300 pads to 320 (a multiple of 64): rank 1 of 2 holds rows 160..320, 20 of them zeros.
        assert_eq!(s[0].rows, 160..300);
        assert_eq!(
            s[1],
            Segment {
                source: Source::Zeros,
                rows: 300..320
            }
        );
    }
}
