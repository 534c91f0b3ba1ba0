//! One rank's shard of the decoder and its forward pass over a packed batch of sequences.
//!
//! The same forward serves prefill (many new tokens per sequence), decode (one) and recompute:
//! each sequence brings `tokens` that start at `start_pos`; their K/V are appended to the paged
//! cache and they attend causally to everything cached before them. Two all-reduces per layer
//! (after attention-out and MLP-down), one for the vocab-parallel embedding, one gather of logits.

use crate::backend::cpu;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::kv::{slot, KvPool};
use crate::model::config::ModelConfig;
use crate::model::weights::{round_to_bf16, round_to_f16, Checkpoint};
use crate::parallel::shard::{self, Role, Source};
use crate::parallel::Comm;

/// One layer's weights as held by one rank (split axis outermost, see `parallel::shard`).
pub struct LayerWeights {
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// [(q_local + 2 kv_local) * head_dim, hidden]
    pub qkv: Vec<f32>,
    /// [q_local * head_dim, hidden] (o_proj transposed)
    pub o: Vec<f32>,
    /// [2 * inter_local, hidden]
    pub gate_up: Vec<f32>,
    /// [inter_local, hidden] (down_proj transposed)
    pub down: Vec<f32>,
}

/// All weights one rank holds at a given tp degree.
pub struct RankWeights {
    pub tp: usize,
    pub tp_rank: usize,
    /// [padded_vocab / tp, hidden]
    pub embed: Vec<f32>,
    /// Same shape as `embed`; `None` when tied (the embedding shard doubles as the head).
    pub lm_head: Option<Vec<f32>>,
    pub final_norm: Vec<f32>,
    pub layers: Vec<LayerWeights>,
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
    let mut out = Vec::with_capacity(shard::rows(cfg, role, tp) * h);
    for seg in shard::segments(cfg, role, layer, tp, r) {
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

impl RankWeights {
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
        let untied_embed = if self.lm_head.is_some() {
            self.embed.len() * 4
        } else {
            0
        };
        self.bytes() - untied_embed
    }

    /// Bytes of weights held (f32).
    pub fn bytes(&self) -> usize {
        let mut n =
            self.embed.len() + self.lm_head.as_ref().map_or(0, Vec::len) + self.final_norm.len();
        for l in &self.layers {
            n += l.input_norm.len()
                + l.post_norm.len()
                + l.qkv.len()
                + l.o.len()
                + l.gate_up.len()
                + l.down.len();
            n += l.q_norm.as_ref().map_or(0, Vec::len) + l.k_norm.as_ref().map_or(0, Vec::len);
        }
        n * 4
    }
}

/// One sequence's part of a forward call.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    /// Position of tokens[0]; positions before it are already in the cache.
    pub start_pos: usize,
    /// Block table covering at least start_pos + tokens.len() positions.
    pub table: &'a [u32],
}

/// Runs this rank's shard of the decoder; returns logits [n_seqs, vocab] for each sequence's last
/// token (identical on every rank of the group).
pub fn forward(
    cfg: &ModelConfig,
    w: &RankWeights,
    kv: &mut KvPool,
    inv_freq: &[f32],
    comm: &dyn Comm,
    seqs: &[SeqInput],
) -> Result<Vec<f32>> {
    let (h, hd, tp) = (cfg.hidden_size, cfg.head_dim, w.tp);
    let (hq, hkv) = (cfg.num_heads / tp, cfg.num_kv_heads / tp);
    let inter = cfg.intermediate_size / tp;
    let qkv_w = (hq + 2 * hkv) * hd;
    let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    let vl = w.embed.len() / h;
    let v_start = w.tp_rank * vl;

    let mut positions = Vec::with_capacity(n);
    let mut slots = Vec::with_capacity(n);
    let mut attn = Vec::with_capacity(seqs.len());
    let mut x = vec![0f32; n * h];
    let mut row = 0;
    for s in seqs {
        for (i, &t) in s.tokens.iter().enumerate() {
            let p = s.start_pos + i;
            positions.push(p);
            slots.push(slot(s.table, p, kv.block_size));
            let t = t as usize;
            if (v_start..v_start + vl).contains(&t) {
                x[(row + i) * h..(row + i + 1) * h]
                    .copy_from_slice(&w.embed[(t - v_start) * h..(t - v_start + 1) * h]);
            }
        }
        attn.push(cpu::AttnSeq {
            row,
            len: s.tokens.len(),
            start_pos: s.start_pos,
            table: s.table,
        });
        row += s.tokens.len();
    }
    comm.all_reduce_sum(&mut x)?;

    let scale = 1.0 / (hd as f32).sqrt();
    let mut hbuf = vec![0f32; n * h];
    let mut qkv = vec![0f32; n * qkv_w];
    let (mut q, mut k, mut v) = (
        vec![0f32; n * hq * hd],
        vec![0f32; n * hkv * hd],
        vec![0f32; n * hkv * hd],
    );
    let mut att = vec![0f32; n * hq * hd];
    let mut proj = vec![0f32; n * h];
    let mut gu = vec![0f32; n * 2 * inter];
    let mut act = vec![0f32; n * inter];
    for (l, lw) in w.layers.iter().enumerate() {
        cpu::rmsnorm(&mut hbuf, &x, &lw.input_norm, cfg.rms_norm_eps);
        cpu::matmul_nt(&mut qkv, &hbuf, &lw.qkv, n, h, qkv_w);
        for t in 0..n {
            let r = &qkv[t * qkv_w..(t + 1) * qkv_w];
            q[t * hq * hd..(t + 1) * hq * hd].copy_from_slice(&r[..hq * hd]);
            k[t * hkv * hd..(t + 1) * hkv * hd].copy_from_slice(&r[hq * hd..(hq + hkv) * hd]);
            v[t * hkv * hd..(t + 1) * hkv * hd].copy_from_slice(&r[(hq + hkv) * hd..]);
        }
        if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
            cpu::rmsnorm_inplace(&mut q, qn, cfg.rms_norm_eps);
            cpu::rmsnorm_inplace(&mut k, kn, cfg.rms_norm_eps);
        }
        cpu::rope(&mut q, hq, &positions, inv_freq);
        cpu::rope(&mut k, hkv, &positions, inv_freq);
        kv.append(l, &k, &v, &slots);
        cpu::paged_attention(&mut att, &q, kv, l, &attn, hq, scale);
        cpu::matmul_nn(&mut proj, &att, &lw.o, n, hq * hd, h);
        comm.all_reduce_sum(&mut proj)?;
        x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);

        cpu::rmsnorm(&mut hbuf, &x, &lw.post_norm, cfg.rms_norm_eps);
        cpu::matmul_nt(&mut gu, &hbuf, &lw.gate_up, n, h, 2 * inter);
        cpu::silu_mul(&mut act, &gu, inter);
        cpu::matmul_nn(&mut proj, &act, &lw.down, n, inter, h);
        comm.all_reduce_sum(&mut proj)?;
        x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
    }

    // Final norm and the vocab-parallel head, for each sequence's last token only.
    let ns = seqs.len();
    let mut last = vec![0f32; ns * h];
    for (i, a) in attn.iter().enumerate() {
        let t = a.row + a.len - 1;
        last[i * h..(i + 1) * h].copy_from_slice(&x[t * h..(t + 1) * h]);
    }
    let mut normed = vec![0f32; ns * h];
    cpu::rmsnorm(&mut normed, &last, &w.final_norm, cfg.rms_norm_eps);
    let head = w.lm_head.as_ref().unwrap_or(&w.embed);
    let mut local = vec![0f32; ns * vl];
    cpu::matmul_nt(&mut local, &normed, head, ns, h, vl);
    let mut gathered = vec![0f32; tp * ns * vl];
    comm.all_gather(&local, &mut gathered)?;
    let vocab = cfg.vocab_size;
    let mut logits = vec![0f32; ns * vocab];
    for s in 0..ns {
        for r in 0..tp {
            let lo = r * vl;
            if lo >= vocab {
                break;
            }
            let take = vl.min(vocab - lo);
            logits[s * vocab + lo..s * vocab + lo + take]
                .copy_from_slice(&gathered[(r * ns + s) * vl..][..take]);
        }
    }
    Ok(logits)
}
