//! One rank's shard of the decoder's weights (split axis outermost, see `parallel::shard`), generic
//! over where it is stored: loaded from the checkpoint into host memory (only this rank's rows),
//! then used in place (CPU) or uploaded (GPU ranks).

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::weights::{round_to_bf16, round_to_f16, Checkpoint};
use crate::parallel::shard::{self, Role, Source};

/// One layer's weights as held by one rank (split axis outermost, see `parallel::shard`), in
/// storage `W`: host `Vec<f32>` (the default), or a device buffer on GPU ranks.
pub struct LayerWeights<W = Vec<f32>> {
    pub input_norm: W,
    pub post_norm: W,
    pub q_norm: Option<W>,
    pub k_norm: Option<W>,
    /// [(q_local + 2 kv_local) * head_dim, hidden]
    pub qkv: W,
    /// [q_local * head_dim, hidden] (o_proj transposed)
    pub o: W,
    /// [2 * inter_local, hidden]
    pub gate_up: W,
    /// [inter_local, hidden] (down_proj transposed)
    pub down: W,
}

/// All weights one rank holds at a given tp degree, in storage `W`.
pub struct RankWeights<W = Vec<f32>> {
    pub tp: usize,
    pub tp_rank: usize,
    /// [padded_vocab / tp, hidden]
    pub embed: W,
    /// Same shape as `embed`; `None` when tied (the embedding shard doubles as the head).
    pub lm_head: Option<W>,
    pub final_norm: W,
    pub layers: Vec<LayerWeights<W>>,
}

impl<W> RankWeights<W> {
    /// The same shard in another storage (an upload, say), buffer by buffer in a fixed order;
    /// the first error stops it.
    pub fn try_map<V>(&self, mut f: impl FnMut(&W) -> Result<V>) -> Result<RankWeights<V>> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(LayerWeights {
                input_norm: f(&l.input_norm)?,
                post_norm: f(&l.post_norm)?,
                q_norm: l.q_norm.as_ref().map(&mut f).transpose()?,
                k_norm: l.k_norm.as_ref().map(&mut f).transpose()?,
                qkv: f(&l.qkv)?,
                o: f(&l.o)?,
                gate_up: f(&l.gate_up)?,
                down: f(&l.down)?,
            });
        }
        Ok(RankWeights {
            tp: self.tp,
            tp_rank: self.tp_rank,
            embed: f(&self.embed)?,
            lm_head: self.lm_head.as_ref().map(&mut f).transpose()?,
            final_norm: f(&self.final_norm)?,
            layers,
        })
    }

    /// Every buffer of the shard.
    pub fn buffers(&self) -> Vec<&W> {
        let mut v = vec![&self.embed, &self.final_norm];
        v.extend(&self.lm_head);
        for l in &self.layers {
            v.extend([
                &l.input_norm,
                &l.post_norm,
                &l.qkv,
                &l.o,
                &l.gate_up,
                &l.down,
            ]);
            v.extend(l.q_norm.iter().chain(&l.k_norm));
        }
        v
    }

    /// Bytes held, given each buffer's size, and the bytes a decode step reads: all of them but
    /// an untied embedding table, of which a step reads only the rows of its tokens.
    pub fn held_and_read_bytes(&self, size: impl Fn(&W) -> usize) -> (usize, usize) {
        let held: usize = self.buffers().into_iter().map(&size).sum();
        let untied_embed = if self.lm_head.is_some() {
            size(&self.embed)
        } else {
            0
        };
        (held, held - untied_embed)
    }
}

/// Loads the rows of `role` owned by tp-rank `r` as one contiguous buffer [rows, hidden].
pub fn load_role(
    ck: &Checkpoint,
    cfg: &ModelConfig,
    role: Role,
    layer: usize,
    tp: usize,
    r: usize,
) -> Result<Vec<f32>> {
    let h = cfg.hidden_size;
    let segs = shard::segments(cfg, role, layer, tp, r);
    // Every tensor's header against the config before anything is allocated from the config's
    // sizes (a corrupt config.json must not allocate what the checkpoint does not hold).
    for seg in &segs {
        if let Source::Tensor {
            name,
            transposed,
            total_rows,
        } = &seg.source
        {
            let shape = if *transposed {
                [h, *total_rows]
            } else {
                [*total_rows, h]
            };
            ck.info(name, &shape)?;
        }
    }
    let mut out = Vec::with_capacity(shard::rows(cfg, role, tp) * h);
    for seg in segs {
        match seg.source {
            Source::Zeros => out.resize(out.len() + seg.rows.len() * h, 0.0),
            Source::Tensor {
                name,
                transposed: false,
                total_rows,
            } => out.extend(ck.read_rows(&name, &[total_rows, h], seg.rows)?),
            Source::Tensor {
                name,
                transposed: true,
                total_rows,
            } => out.extend(ck.read_cols_transposed(&name, &[h, total_rows], seg.rows)?),
        }
    }
    Ok(out)
}

impl RankWeights<Vec<f32>> {
    /// Reads only this rank's shard from the checkpoint.
    pub fn load(
        ck: &Checkpoint,
        cfg: &ModelConfig,
        tp: usize,
        r: usize,
        dtype: Dtype,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let norm = |name: String, n: usize| ck.read(&name, &[n]);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let (q_norm, k_norm) = if cfg.has_qk_norm() {
                (
                    Some(norm(format!("{p}.self_attn.q_norm.weight"), cfg.head_dim)?),
                    Some(norm(format!("{p}.self_attn.k_norm.weight"), cfg.head_dim)?),
                )
            } else {
                (None, None)
            };
            layers.push(LayerWeights {
                input_norm: norm(format!("{p}.input_layernorm.weight"), h)?,
                post_norm: norm(format!("{p}.post_attention_layernorm.weight"), h)?,
                q_norm,
                k_norm,
                qkv: load_role(ck, cfg, Role::Qkv, l, tp, r)?,
                o: load_role(ck, cfg, Role::O, l, tp, r)?,
                gate_up: load_role(ck, cfg, Role::GateUp, l, tp, r)?,
                down: load_role(ck, cfg, Role::Down, l, tp, r)?,
            });
        }
        if !cfg.tie_word_embeddings && !ck.contains("lm_head.weight") {
            return Err(Error::Checkpoint {
                path: "checkpoint".into(),
                msg: "missing tensor `lm_head.weight` and tie_word_embeddings is false".into(),
            });
        }
        let mut w = RankWeights {
            tp,
            tp_rank: r,
            embed: load_role(ck, cfg, Role::Embed, 0, tp, r)?,
            lm_head: if cfg.tie_word_embeddings {
                None
            } else {
                Some(load_role(ck, cfg, Role::LmHead, 0, tp, r)?)
            },
            final_norm: norm("model.norm.weight".into(), h)?,
            layers,
        };
        match dtype {
            Dtype::F32 => {}
            Dtype::Bf16 => w.for_each_buffer(round_to_bf16),
            Dtype::F16 => w.for_each_buffer(round_to_f16),
        }
        Ok(w)
    }

    fn for_each_buffer(&mut self, mut f: impl FnMut(&mut [f32])) {
        f(&mut self.embed);
        if let Some(h) = &mut self.lm_head {
            f(h);
        }
        f(&mut self.final_norm);
        for l in &mut self.layers {
            for b in [
                &mut l.input_norm,
                &mut l.post_norm,
                &mut l.qkv,
                &mut l.o,
                &mut l.gate_up,
                &mut l.down,
            ] {
                f(b);
            }
            for b in [&mut l.q_norm, &mut l.k_norm].into_iter().flatten() {
                f(b);
            }
        }
    }

    /// Weight bytes a decode step reads: all of them but an untied embedding table, of which a
    /// step reads only the rows of its tokens.
    pub fn decode_read_bytes(&self) -> usize {
        self.held_and_read_bytes(|b| b.len() * 4).1
    }

    /// Bytes of weights held (f32).
    pub fn bytes(&self) -> usize {
        self.held_and_read_bytes(|b| b.len() * 4).0
    }
}
