//! `GpuRank::forward`: the rank's decoder shard on its device, step for step the same as
//! `model::decoder::forward` (embedding, all-reduce, then per layer rmsnorm, qkv gemm, qk_norm,
//! rope, kv_append, attention, o gemm, all-reduce, residual + rmsnorm, gate_up gemm, silu_mul,
//! down gemm, all-reduce; final norm, vocab-parallel head, gather).
//!
//! The residual adds are folded into `fused_add_rmsnorm` (x += proj, then normalise), which is the
//! CPU order exactly. Attention is the paged decode kernel when every sequence feeds one token,
//! else the prefill kernel (which also serves chunked prefill and recompute).

use std::collections::HashSet;

use super::{GpuKvPool, GpuRank};
use crate::backend::cuda::buffer::DBuf;
use crate::backend::cuda::comm::DeviceComm;
use crate::backend::cuda::ops::{self, Heads, SeqMeta};
use crate::error::{Error, Result};
use crate::kv::blocks_for;
use crate::model::config::ModelConfig;
use crate::model::decoder::SeqInput;

/// Host-side metadata of one forward call, validated before it is uploaded.
#[derive(Default)]
struct Batch {
    ids: Vec<u32>,
    positions: Vec<i32>,
    slots: Vec<i64>,
    /// [num_seqs, max_blocks], padded with block 0 (never read past a sequence's context).
    tables: Vec<i32>,
    max_blocks: usize,
    context: Vec<i32>,
    cu_q: Vec<i32>,
    /// Row of each sequence's last token.
    last_rows: Vec<u32>,
    max_context: usize,
    max_q: usize,
}

/// Validates `seqs` against the model and the pool (the kernels cannot check index contents) and
/// builds the per-token and per-sequence metadata.
fn plan(cfg: &ModelConfig, kv: &GpuKvPool, seqs: &[SeqInput]) -> Result<Batch> {
    let bs = kv.block_size;
    let bad = |i: usize, m: String| Error::Request(format!("sequence {i}: {m}"));
    let mut b = Batch {
        cu_q: vec![0],
        ..Batch::default()
    };
    b.max_blocks = seqs
        .iter()
        .map(|s| blocks_for(s.start_pos.saturating_add(s.tokens.len()), bs))
        .max()
        .unwrap_or(0);
    let mut seen = HashSet::new();
    for (i, s) in seqs.iter().enumerate() {
        if s.tokens.is_empty() {
            return Err(bad(i, "no tokens to feed".into()));
        }
        let end = s.start_pos.saturating_add(s.tokens.len());
        if end > i32::MAX as usize {
            return Err(bad(i, format!("position {end} out of range")));
        }
        let need = blocks_for(end, bs);
        if s.table.len() < need {
            return Err(bad(
                i,
                format!(
                    "block table has {} blocks, positions up to {end} need {need}",
                    s.table.len()
                ),
            ));
        }
        if let Some(blk) = s.table[..need]
            .iter()
            .find(|&&blk| blk as usize >= kv.num_blocks)
        {
            return Err(bad(
                i,
                format!("block {blk} outside the pool of {}", kv.num_blocks),
            ));
        }
        for (j, &t) in s.tokens.iter().enumerate() {
            if t as usize >= cfg.vocab_size {
                return Err(bad(
                    i,
                    format!("token id {t} out of range (vocab_size {})", cfg.vocab_size),
                ));
            }
            let p = s.start_pos + j;
            let slot = s.table[p / bs] as usize * bs + p % bs;
            if !seen.insert(slot) {
                return Err(bad(
                    i,
                    format!("cache slot {slot} written twice in one call"),
                ));
            }
            b.ids.push(t);
            b.positions.push(p as i32);
            b.slots.push(slot as i64);
        }
        b.tables.extend(s.table[..need].iter().map(|&x| x as i32));
        b.tables.resize((i + 1) * b.max_blocks, 0);
        b.context.push(end as i32);
        let rows = i32::try_from(b.ids.len())
            .map_err(|_| Error::Request(format!("{} tokens in one call", b.ids.len())))?;
        b.cu_q.push(rows);
        b.last_rows.push(rows as u32 - 1);
        b.max_context = b.max_context.max(end);
        b.max_q = b.max_q.max(s.tokens.len());
    }
    Ok(b)
}

impl GpuRank {
    /// Runs this rank's shard over a packed batch; returns logits [n_seqs, vocab] (f32) for each
    /// sequence's last token, identical on every rank of the group. On error the group is
    /// poisoned so peers do not wait forever.
    pub fn forward(
        &mut self,
        cfg: &ModelConfig,
        inv_freq: &[f32],
        comm: &dyn DeviceComm,
        seqs: &[SeqInput],
    ) -> Result<Vec<f32>> {
        let r = self.forward_inner(cfg, inv_freq, comm, seqs);
        if r.is_err() {
            comm.poison();
        }
        r
    }

    fn forward_inner(
        &mut self,
        cfg: &ModelConfig,
        inv_freq: &[f32],
        comm: &dyn DeviceComm,
        seqs: &[SeqInput],
    ) -> Result<Vec<f32>> {
        if comm.size() != self.tp || comm.rank() != self.tp_rank {
            return Err(Error::Layout(format!(
                "rank {} of tp {} called with comm member {} of {}",
                self.tp_rank,
                self.tp,
                comm.rank(),
                comm.size()
            )));
        }
        let tp = self.tp;
        if cfg.hidden_size != self.final_norm.len()
            || cfg.num_layers != self.layers.len()
            || cfg.head_dim != self.kv.head_dim
            || cfg.num_kv_heads / tp != self.kv.kv_heads
        {
            return Err(Error::Layout(
                "forward called with a model config other than the one the rank was built for"
                    .into(),
            ));
        }
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let (dev, t) = (&self.dev, self.dtype);
        let (h, hd, eps) = (cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps);
        let (hq, hkv) = (cfg.num_heads / tp, cfg.num_kv_heads / tp);
        let inter = cfg.intermediate_size / tp;
        let qkv_w = (hq + 2 * hkv) * hd;
        if inv_freq.len() != hd / 2 {
            return Err(Error::Device(format!(
                "inv_freq has {} entries, head_dim {hd} needs {}",
                inv_freq.len(),
                hd / 2
            )));
        }
        let b = plan(cfg, &self.kv, seqs)?;
        let (n, ns) = (b.ids.len(), seqs.len());
        let vl = self.embed.len() / h;

        let ids = DBuf::from_slice(dev, &b.ids)?;
        let positions = DBuf::from_slice(dev, &b.positions)?;
        let slots = DBuf::from_slice(dev, &b.slots)?;
        let tables = DBuf::from_slice(dev, &b.tables)?;
        let context = DBuf::from_slice(dev, &b.context)?;
        let cu_q = DBuf::from_slice(dev, &b.cu_q)?;
        let last_rows = DBuf::from_slice(dev, &b.last_rows)?;
        let inv = DBuf::from_slice(dev, inv_freq)?;
        let meta = SeqMeta {
            num_seqs: ns,
            block_tables: tables.view(),
            max_blocks_per_seq: b.max_blocks,
            context_lens: context.view(),
            max_context: b.max_context,
            cu_seqlens_q: Some(cu_q.view()),
            total_q: n,
            max_q_len: b.max_q,
        };

        // Every buffer of the step is allocated before the first collective: a rank that runs
        // out of memory must fail before its peers enter a collective it would never join
        // (NCCL cannot be woken from one). Shapes are equal on every member, so the launch
        // wrappers' checks fail on all members at the same call.
        let buf = |len: usize| DBuf::zeros(dev, t, len);
        let x = buf(n * h)?;
        let (hbuf, qkv, att) = (buf(n * h)?, buf(n * qkv_w)?, buf(n * hq * hd)?);
        let (proj, gu, act) = (buf(n * h)?, buf(n * 2 * inter)?, buf(n * inter)?);
        let (last, local, gathered) = (buf(ns * h)?, buf(ns * vl)?, buf(tp * ns * vl)?);
        ops::embedding(
            dev,
            x.view(),
            ids.view(),
            self.embed.view(),
            h,
            self.tp_rank * vl,
        )?;
        comm.all_reduce_sum(dev, x.view())?;

        let scale = 1.0 / (hd as f32).sqrt();
        let decode = b.max_q == 1;
        let split = if decode {
            ops::auto_partition(dev, ns, hkv, b.max_context, self.kv.block_size)
        } else {
            None
        };
        for (l, lw) in self.layers.iter().enumerate() {
            if l == 0 {
                ops::rmsnorm(dev, hbuf.view(), x.view(), lw.input_norm.view(), n, eps)?;
            } else {
                let w = lw.input_norm.view();
                ops::fused_add_rmsnorm(dev, hbuf.view(), proj.view(), x.view(), w, n, eps)?;
            }
            ops::gemm_nt(dev, qkv.view(), hbuf.view(), lw.qkv.view(), n, h, qkv_w)?;
            let heads = |offset: usize, count: usize| -> Result<Heads<'_>> {
                Ok(Heads {
                    data: qkv.view().at(offset)?,
                    heads: count,
                    head_dim: hd,
                    token_stride: qkv_w,
                })
            };
            let (q, k, v) = (
                heads(0, hq)?,
                heads(hq * hd, hkv)?,
                heads((hq + hkv) * hd, hkv)?,
            );
            if let Some((qn, kn)) = &lw.qk_norm {
                ops::qk_norm(dev, q, k, qn.view(), kn.view(), n, eps)?;
            }
            ops::rope(dev, q, k, positions.view(), inv.view(), n)?;
            let cache = self.kv.layer(l)?;
            ops::kv_append(dev, &cache, k, v, slots.view(), n)?;
            if decode {
                ops::paged_attention(dev, att.view(), q, &cache, &meta, scale, split)?;
            } else {
                ops::prefill_attention(dev, att.view(), q, &cache, &meta, scale)?;
            }
            ops::gemm_nn(dev, proj.view(), att.view(), lw.o.view(), n, hq * hd, h)?;
            comm.all_reduce_sum(dev, proj.view())?;

            let w = lw.post_norm.view();
            ops::fused_add_rmsnorm(dev, hbuf.view(), proj.view(), x.view(), w, n, eps)?;
            ops::gemm_nt(
                dev,
                gu.view(),
                hbuf.view(),
                lw.gate_up.view(),
                n,
                h,
                2 * inter,
            )?;
            ops::silu_mul(dev, act.view(), gu.view(), n, inter)?;
            ops::gemm_nn(dev, proj.view(), act.view(), lw.down.view(), n, inter, h)?;
            comm.all_reduce_sum(dev, proj.view())?;
        }

        // Final residual + norm over every row, then gather each sequence's last row (the
        // embedding kernel as a row gather) and apply the vocab-parallel head to those only.
        let fin = self.final_norm.view();
        if self.layers.is_empty() {
            ops::rmsnorm(dev, hbuf.view(), x.view(), fin, n, eps)?;
        } else {
            ops::fused_add_rmsnorm(dev, hbuf.view(), proj.view(), x.view(), fin, n, eps)?;
        }
        ops::embedding(dev, last.view(), last_rows.view(), hbuf.view(), h, 0)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        ops::gemm_nt(dev, local.view(), last.view(), head.view(), ns, h, vl)?;
        comm.all_gather(dev, local.view(), gathered.view())?;
        let g = gathered.to_f32(dev)?;

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
                    .copy_from_slice(&g[(r * ns + s) * vl..][..take]);
            }
        }
        Ok(logits)
    }
}
