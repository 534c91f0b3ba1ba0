//! `GpuRank`: one tensor-parallel rank on a GPU — its weight shard and paged KV pool in device
//! memory, and the decoder forward (in `forward.rs`) mirroring `model::decoder::forward`.
//!
//! Weights come from a host `RankWeights` (same layout: split axis outermost, fused [q; k; v] and
//! [gate; up] rows of `hidden`, o and down stored transposed, vocab-parallel embed/head) and are
//! stored in the rank's dtype (f32, bf16 or f16); every activation uses that dtype too, with f32
//! arithmetic inside each kernel and GEMM.

mod forward;

use super::buffer::{DBuf, DType};
use super::device::CudaDev;
use super::ops::KvCacheView;
use crate::error::{Error, Result};
use crate::kv::KvPool;
use crate::model::config::ModelConfig;
use crate::model::decoder::RankWeights;
use crate::parallel::layout::check_tp_for_model;

/// One rank's K and V pools on the device, per layer `[num_blocks, kv_heads, block_size,
/// head_dim]` — the layout of `kv::KvPool`, so block ids and slots mean the same thing.
pub struct GpuKvPool {
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    k: Vec<DBuf>,
    v: Vec<DBuf>,
}

impl GpuKvPool {
    /// A zeroed pool of `num_blocks` blocks for each of `layers` layers.
    pub fn new(
        dev: &CudaDev,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::Invalid("block size must be at least 1".into()));
        }
        let per_layer = num_blocks
            .checked_mul(kv_heads * block_size * head_dim)
            .ok_or_else(|| Error::KvExhausted("pool size overflows".into()))?;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(DBuf::zeros(dev, dtype, per_layer)?);
            v.push(DBuf::zeros(dev, dtype, per_layer)?);
        }
        Ok(GpuKvPool {
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
            k,
            v,
        })
    }

    pub fn layers(&self) -> usize {
        self.k.len()
    }

    /// Layer `l`'s K and V caches as kernel arguments.
    pub fn layer(&self, l: usize) -> Result<KvCacheView<'_>> {
        let (k, v) = self
            .k
            .get(l)
            .zip(self.v.get(l))
            .ok_or_else(|| Error::Device(format!("KV pool has no layer {l}")))?;
        Ok(KvCacheView {
            k: k.view(),
            v: v.view(),
            num_blocks: self.num_blocks,
            num_kv_heads: self.kv_heads,
            block_size: self.block_size,
            head_dim: self.head_dim,
        })
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(DBuf::bytes).sum()
    }

    /// An f32 host copy with the same layout (for comparisons against the CPU engine).
    pub fn to_host(&self, dev: &CudaDev) -> Result<KvPool> {
        let mut p = KvPool::new(
            self.layers(),
            self.num_blocks,
            self.block_size,
            self.kv_heads,
            self.head_dim,
        )?;
        for l in 0..self.layers() {
            p.k[l] = self.k[l].to_f32(dev)?;
            p.v[l] = self.v[l].to_f32(dev)?;
        }
        Ok(p)
    }
}

/// One layer's weights on the device (see `model::decoder::LayerWeights` for shapes).
struct GpuLayer {
    input_norm: DBuf,
    post_norm: DBuf,
    qk_norm: Option<(DBuf, DBuf)>,
    qkv: DBuf,
    o: DBuf,
    gate_up: DBuf,
    down: DBuf,
}

/// A rank's shard and KV pool on its device. Thread-confined, like its `CudaDev`.
pub struct GpuRank {
    tp: usize,
    tp_rank: usize,
    dtype: DType,
    embed: DBuf,
    lm_head: Option<DBuf>,
    final_norm: DBuf,
    layers: Vec<GpuLayer>,
    kv: GpuKvPool,
    /// Last: buffers are freed (in stream order) before the device's handles go.
    dev: CudaDev,
}

/// Errors unless `buf` has exactly `want` elements.
fn check_len(buf: &[f32], want: usize, what: &str, layer: usize) -> Result<()> {
    if buf.len() == want {
        Ok(())
    } else {
        Err(Error::Layout(format!(
            "rank weights: layer {layer} {what} has {} elements, the config implies {want}",
            buf.len()
        )))
    }
}

impl GpuRank {
    /// Uploads `w` (converted to `dtype`) onto `dev` and allocates a zeroed KV pool of `kv_blocks`
    /// blocks of `block_size` tokens per layer.
    pub fn new(
        dev: CudaDev,
        cfg: &ModelConfig,
        w: &RankWeights,
        dtype: DType,
        kv_blocks: usize,
        block_size: usize,
    ) -> Result<Self> {
        if !dtype.is_float() {
            return Err(Error::Invalid(format!(
                "GPU rank dtype must be f32, bf16 or f16, not {}",
                dtype.name()
            )));
        }
        let tp = w.tp;
        if tp == 0 || w.tp_rank >= tp {
            return Err(Error::Layout(format!(
                "rank weights for tp-rank {} of tp {tp}",
                w.tp_rank
            )));
        }
        check_tp_for_model(tp, cfg)?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (hq, hkv) = (cfg.num_heads / tp, cfg.num_kv_heads / tp);
        let inter = cfg.intermediate_size / tp;
        if w.layers.len() != cfg.num_layers {
            return Err(Error::Layout(format!(
                "rank weights hold {} layers, the config has {}",
                w.layers.len(),
                cfg.num_layers
            )));
        }
        if h == 0 || w.embed.len() % h != 0 || (w.embed.len() / h) * tp < cfg.vocab_size {
            return Err(Error::Layout(format!(
                "rank weights: embedding shard of {} elements does not hold {} / {tp} rows of {h}",
                w.embed.len(),
                cfg.vocab_size
            )));
        }
        if let Some(head) = &w.lm_head {
            check_len(head, w.embed.len(), "lm_head", 0)?;
        }
        check_len(&w.final_norm, h, "final_norm", 0)?;
        let up = |b: &[f32]| DBuf::from_f32(&dev, b, dtype);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for (l, lw) in w.layers.iter().enumerate() {
            check_len(&lw.input_norm, h, "input_norm", l)?;
            check_len(&lw.post_norm, h, "post_norm", l)?;
            check_len(&lw.qkv, (hq + 2 * hkv) * hd * h, "qkv", l)?;
            check_len(&lw.o, hq * hd * h, "o", l)?;
            check_len(&lw.gate_up, 2 * inter * h, "gate_up", l)?;
            check_len(&lw.down, inter * h, "down", l)?;
            let qk_norm = match (&lw.q_norm, &lw.k_norm, cfg.has_qk_norm()) {
                (Some(q), Some(k), true) => {
                    check_len(q, hd, "q_norm", l)?;
                    check_len(k, hd, "k_norm", l)?;
                    Some((up(q)?, up(k)?))
                }
                (None, None, false) => None,
                _ => {
                    return Err(Error::Layout(format!(
                        "rank weights: layer {l} q/k norms do not match the model architecture"
                    )))
                }
            };
            layers.push(GpuLayer {
                input_norm: up(&lw.input_norm)?,
                post_norm: up(&lw.post_norm)?,
                qk_norm,
                qkv: up(&lw.qkv)?,
                o: up(&lw.o)?,
                gate_up: up(&lw.gate_up)?,
                down: up(&lw.down)?,
            });
        }
        let embed = up(&w.embed)?;
        let lm_head = w.lm_head.as_deref().map(up).transpose()?;
        let final_norm = up(&w.final_norm)?;
        let kv = GpuKvPool::new(&dev, cfg.num_layers, kv_blocks, block_size, hkv, hd, dtype)?;
        dev.synchronize()?;
        Ok(GpuRank {
            tp,
            tp_rank: w.tp_rank,
            dtype,
            embed,
            lm_head,
            final_norm,
            layers,
            kv,
            dev,
        })
    }

    pub fn dev(&self) -> &CudaDev {
        &self.dev
    }
    pub fn kv(&self) -> &GpuKvPool {
        &self.kv
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn tp(&self) -> usize {
        self.tp
    }
    pub fn tp_rank(&self) -> usize {
        self.tp_rank
    }

    /// Weight bytes a decode step reads: all of them but an untied embedding table, of which a
    /// step reads only the rows of its tokens.
    pub fn decode_read_bytes(&self) -> usize {
        let untied_embed = if self.lm_head.is_some() {
            self.embed.bytes()
        } else {
            0
        };
        self.weight_bytes() - untied_embed
    }

    /// Bytes of weights held on the device.
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.embed.bytes()
            + self.lm_head.as_ref().map_or(0, DBuf::bytes)
            + self.final_norm.bytes();
        for l in &self.layers {
            n += [
                &l.input_norm,
                &l.post_norm,
                &l.qkv,
                &l.o,
                &l.gate_up,
                &l.down,
            ]
            .iter()
            .map(|b| b.bytes())
            .sum::<usize>();
            n += l.qk_norm.as_ref().map_or(0, |(q, k)| q.bytes() + k.bytes());
        }
        n
    }
}
