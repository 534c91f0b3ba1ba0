//! The decoder, written once: one rank's forward pass over a packed batch of sequences, generic
//! over the backend ([`RankOps`]): the CPU reference and the CUDA kernels run this same code.
//!
//! The same forward serves prefill (many new tokens per sequence), decode (one) and recompute:
//! each sequence brings `tokens` that start at `start_pos`; their K/V are appended to the paged
//! cache and they attend causally to everything cached before them. Two all-reduces per layer
//! (after attention-out and MLP-down), one for the vocab-parallel embedding, one gather of logits.
//! The residual add is folded into the next norm (`x += proj; h = rmsnorm(x)`), the order the
//! CPU oracle and the fused GPU kernel share.

pub use crate::backend::SeqInput;
pub use crate::model::rank_weights::{load_role, LayerWeights, RankWeights};

use crate::backend::cpu::{CpuOps, Gemm};
use crate::backend::{AttnShape, RankOps};
use crate::error::{Error, Result};
use crate::kv::KvPool;
use crate::model::config::ModelConfig;
use crate::parallel::shard::{self, Role};
use crate::parallel::Comm;

/// Runs this rank's shard `w` of the decoder over `seqs` with the backend `ops`; returns logits
/// [n_seqs, vocab] for each sequence's last token (identical on every rank of the group).
///
/// Every buffer of the call is allocated before the first collective: a rank that runs out of
/// memory fails before its peers enter a collective it would never join. Shapes are equal on
/// every member, so a shape check fails on all members at the same call.
pub fn forward<O: RankOps>(
    ops: &mut O,
    cfg: &ModelConfig,
    w: &RankWeights<O::Weight>,
    seqs: &[SeqInput],
) -> Result<Vec<f32>> {
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    let tp = w.tp;
    if tp == 0 || !cfg.num_heads.is_multiple_of(tp) || !cfg.num_kv_heads.is_multiple_of(tp) {
        return Err(Error::Layout(format!(
            "rank weights for tp {tp} do not split the model's heads"
        )));
    }
    if w.layers.len() != cfg.num_layers {
        return Err(Error::Layout(format!(
            "rank weights hold {} layers, the config has {}",
            w.layers.len(),
            cfg.num_layers
        )));
    }
    let (h, hd, eps) = (cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps);
    let (hq, hkv) = (cfg.num_heads / tp, cfg.num_kv_heads / tp);
    let inter = cfg.intermediate_size / tp;
    let qkv_w = (hq + 2 * hkv) * hd;
    let vl = shard::rows(cfg, Role::Embed, tp);
    let shape = AttnShape {
        q_heads: hq,
        kv_heads: hkv,
        head_dim: hd,
        eps,
        scale: 1.0 / (hd as f32).sqrt(),
    };

    let b = ops.batch(seqs, cfg.vocab_size)?;
    let (n, ns) = (
        seqs.iter().map(|s| s.tokens.len()).sum::<usize>(),
        seqs.len(),
    );
    let mut x = ops.zeros(n * h)?;
    let (mut hbuf, mut qkv) = (ops.zeros(n * h)?, ops.zeros(n * qkv_w)?);
    let (mut att, mut proj) = (ops.zeros(n * hq * hd)?, ops.zeros(n * h)?);
    let (mut gu, mut act) = (ops.zeros(n * 2 * inter)?, ops.zeros(n * inter)?);
    let (mut last, mut local) = (ops.zeros(ns * h)?, ops.zeros(ns * vl)?);
    let mut gathered = ops.zeros(tp * ns * vl)?;

    ops.embedding(&mut x, &b, &w.embed, h, w.tp_rank * vl)?;
    ops.all_reduce_sum(&mut x)?;
    for (l, lw) in w.layers.iter().enumerate() {
        if l == 0 {
            ops.rmsnorm(&mut hbuf, &x, &lw.input_norm, n, eps)?;
        } else {
            ops.add_rmsnorm(&mut hbuf, &mut x, &proj, &lw.input_norm, n, eps)?;
        }
        ops.gemm_nt(&mut qkv, &hbuf, &lw.qkv, n, h, qkv_w)?;
        let qk_norm = lw.q_norm.as_ref().zip(lw.k_norm.as_ref());
        ops.attention(l, &mut att, &mut qkv, &b, qk_norm, shape)?;
        ops.gemm_nn(&mut proj, &att, &lw.o, n, hq * hd, h)?;
        ops.all_reduce_sum(&mut proj)?;

        ops.add_rmsnorm(&mut hbuf, &mut x, &proj, &lw.post_norm, n, eps)?;
        ops.gemm_nt(&mut gu, &hbuf, &lw.gate_up, n, h, 2 * inter)?;
        ops.silu_mul(&mut act, &gu, n, inter)?;
        ops.gemm_nn(&mut proj, &act, &lw.down, n, inter, h)?;
        ops.all_reduce_sum(&mut proj)?;
    }

    // Final residual + norm, then each sequence's last row through the vocab-parallel head.
    if w.layers.is_empty() {
        ops.rmsnorm(&mut hbuf, &x, &w.final_norm, n, eps)?;
    } else {
        ops.add_rmsnorm(&mut hbuf, &mut x, &proj, &w.final_norm, n, eps)?;
    }
    ops.last_rows(&mut last, &hbuf, &b, h)?;
    let head = w.lm_head.as_ref().unwrap_or(&w.embed);
    ops.gemm_nt(&mut local, &last, head, ns, h, vl)?;
    ops.all_gather(&local, &mut gathered)?;
    let gathered = ops.to_host(&gathered)?;
    Ok(assemble_logits(&gathered, tp, ns, vl, cfg.vocab_size))
}

/// Logits [ns, vocab] from the gathered vocab-parallel shards [tp][ns][vl] (padding rows dropped).
fn assemble_logits(gathered: &[f32], tp: usize, ns: usize, vl: usize, vocab: usize) -> Vec<f32> {
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
    logits
}

/// [`forward`] on the CPU reference backend: the rank's host shard `w`, its KV pool and its group,
/// its GEMMs on one thread.
pub fn forward_cpu(
    cfg: &ModelConfig,
    w: &RankWeights,
    kv: &mut KvPool,
    inv_freq: &[f32],
    comm: &dyn Comm,
    seqs: &[SeqInput],
) -> Result<Vec<f32>> {
    forward_cpu_on(cfg, w, kv, inv_freq, comm, seqs, Gemm::default())
}

/// [`forward_cpu`] with the rank's GEMMs on `gemm`'s threads.
pub fn forward_cpu_on(
    cfg: &ModelConfig,
    w: &RankWeights,
    kv: &mut KvPool,
    inv_freq: &[f32],
    comm: &dyn Comm,
    seqs: &[SeqInput],
    gemm: Gemm,
) -> Result<Vec<f32>> {
    forward(
        &mut CpuOps::new(kv, comm, inv_freq).with_gemm(gemm),
        cfg,
        w,
        seqs,
    )
}
