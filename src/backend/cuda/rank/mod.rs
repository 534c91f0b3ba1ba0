//! `GpuRank`: one tensor-parallel rank on a GPU — its weight shard and paged KV pool in device
//! memory; its forward is `model::decoder::forward` over [`GpuOps`] (in `ops.rs`).
//!
//! Weights come from a host `RankWeights` (same layout: split axis outermost, fused [q; k; v] and
//! [gate; up] rows of `hidden`, o and down stored transposed, vocab-parallel embed/head) and are
//! stored in the rank's dtype (f32, bf16 or f16); every activation uses that dtype too, with f32
//! arithmetic inside each kernel and GEMM.

mod ops;
mod switch;
mod switch_kv;

pub use ops::{GpuBatch, GpuOps};
pub use switch::{ExchangeStats, RankSwitch};

use super::buffer::{DBuf, DType};
use super::comm::{copy_into, DeviceComm};
use super::device::CudaDev;
use super::ops::KvCacheView;
use crate::error::{Error, Result};
use crate::kv::KvPool;
use crate::model::config::ModelConfig;
use crate::model::decoder::{self, RankWeights, SeqInput};
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
    /// A pool of `num_blocks` blocks for each of `layers` layers: zeroed, or (`zeroed` false) as
    /// the allocator gives it, for a pool whose every read position is written first (attention
    /// reads a sequence's first `len` positions only, each written by an append or a switch).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dev: &CudaDev,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        zeroed: bool,
    ) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::Invalid("block size must be at least 1".into()));
        }
        let per_layer = num_blocks
            .checked_mul(kv_heads * block_size * head_dim)
            .ok_or_else(|| Error::KvExhausted("pool size overflows".into()))?;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        let make = |n| match zeroed {
            true => DBuf::zeros(dev, dtype, n),
            false => DBuf::uninit(dev, dtype, n),
        };
        for _ in 0..layers {
            k.push(make(per_layer)?);
            v.push(make(per_layer)?);
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

    /// Grows the pool to `blocks` blocks per layer, keeping blocks `[0, used)`: one layer's K or
    /// V at a time, a fresh buffer (the new blocks left as the allocator gives them: attention
    /// reads only written positions), the kept blocks copied in, the old buffer freed in stream
    /// order after the copy; so beyond the pool the device holds at most one layer's new buffer.
    /// On error (an allocation the device cannot make) the layers grown so far keep their larger
    /// buffers, the pool keeps its block count and every kept block is intact.
    pub fn grow(&mut self, dev: &CudaDev, blocks: usize, used: usize) -> Result<()> {
        if used > self.num_blocks {
            return Err(Error::Internal(format!(
                "growing a pool of {} blocks while keeping {used}",
                self.num_blocks
            )));
        }
        if blocks <= self.num_blocks {
            return Ok(());
        }
        let per_block = self.kv_heads * self.block_size * self.head_dim;
        let per_layer = blocks
            .checked_mul(per_block)
            .ok_or_else(|| Error::KvExhausted("pool size overflows".into()))?;
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            if buf.len() >= per_layer {
                continue; // grown by an earlier try that stopped short
            }
            let new = DBuf::uninit(dev, buf.dtype(), per_layer)?;
            if used > 0 {
                let kept = buf.view().slice(0, used * per_block)?;
                copy_into(dev, new.view(), 0, kept)?;
            }
            *buf = new;
        }
        dev.synchronize()?;
        self.num_blocks = blocks;
        Ok(())
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(DBuf::bytes).sum()
    }

    /// Replaces every layer's K and V with `p`'s contents (converted to the pool's dtype); `p`
    /// must have this pool's geometry.
    pub fn upload(&mut self, dev: &CudaDev, p: &KvPool) -> Result<()> {
        if (
            p.k.len(),
            p.num_blocks,
            p.block_size,
            p.kv_heads,
            p.head_dim,
        ) != (
            self.layers(),
            self.num_blocks,
            self.block_size,
            self.kv_heads,
            self.head_dim,
        ) {
            return Err(Error::Layout(format!(
                "KV upload: a host pool of {} layers x {} blocks x {} heads does not match the \
                 device pool's {} x {} x {}",
                p.k.len(),
                p.num_blocks,
                p.kv_heads,
                self.layers(),
                self.num_blocks,
                self.kv_heads
            )));
        }
        for l in 0..self.layers() {
            let dtype = self.k[l].dtype();
            self.k[l] = DBuf::from_f32(dev, &p.k[l], dtype)?;
            self.v[l] = DBuf::from_f32(dev, &p.v[l], dtype)?;
        }
        Ok(())
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
        // A layer's buffer may be larger than the pool (a growth that stopped short).
        let n = self.num_blocks * self.kv_heads * self.block_size * self.head_dim;
        for l in 0..self.layers() {
            p.k[l] = self.k[l].view().slice(0, n)?.to_f32(dev)?;
            p.v[l] = self.v[l].view().slice(0, n)?.to_f32(dev)?;
        }
        Ok(p)
    }
}

/// A rank's shard and KV pool on its device. Thread-confined, like its `CudaDev`.
pub struct GpuRank {
    dtype: DType,
    /// The shard in device memory (same shapes as the host `RankWeights`).
    w: RankWeights<DBuf>,
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
        for (l, lw) in w.layers.iter().enumerate() {
            check_len(&lw.input_norm, h, "input_norm", l)?;
            check_len(&lw.post_norm, h, "post_norm", l)?;
            check_len(&lw.qkv, (hq + 2 * hkv) * hd * h, "qkv", l)?;
            check_len(&lw.o, hq * hd * h, "o", l)?;
            check_len(&lw.gate_up, 2 * inter * h, "gate_up", l)?;
            check_len(&lw.down, inter * h, "down", l)?;
            match (&lw.q_norm, &lw.k_norm, cfg.has_qk_norm()) {
                (Some(q), Some(k), true) => {
                    check_len(q, hd, "q_norm", l)?;
                    check_len(k, hd, "k_norm", l)?;
                }
                (None, None, false) => {}
                _ => {
                    return Err(Error::Layout(format!(
                        "rank weights: layer {l} q/k norms do not match the model architecture"
                    )))
                }
            }
        }
        let up = w.try_map(|b| DBuf::from_f32(&dev, b, dtype))?;
        let kv = GpuKvPool::new(
            &dev,
            cfg.num_layers,
            kv_blocks,
            block_size,
            hkv,
            hd,
            dtype,
            true,
        )?;
        dev.synchronize()?;
        Ok(GpuRank {
            dtype,
            w: up,
            kv,
            dev,
        })
    }

    /// Runs this rank's shard over a packed batch (`model::decoder::forward` on [`GpuOps`]);
    /// returns logits [n_seqs, vocab] (f32) for each sequence's last token, identical on every
    /// rank of the group. On error the group is poisoned so peers do not wait forever.
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
        let tp = self.w.tp;
        if comm.size() != tp || comm.rank() != self.w.tp_rank {
            return Err(Error::Layout(format!(
                "rank {} of tp {tp} called with comm member {} of {}",
                self.w.tp_rank,
                comm.rank(),
                comm.size()
            )));
        }
        if cfg.hidden_size != self.w.final_norm.len()
            || cfg.num_layers != self.w.layers.len()
            || cfg.head_dim != self.kv.head_dim
            || cfg.num_kv_heads / tp != self.kv.kv_heads
        {
            return Err(Error::Layout(
                "forward called with a model config other than the one the rank was built for"
                    .into(),
            ));
        }
        if inv_freq.len() != cfg.head_dim / 2 {
            return Err(Error::Device(format!(
                "inv_freq has {} entries, head_dim {} needs {}",
                inv_freq.len(),
                cfg.head_dim,
                cfg.head_dim / 2
            )));
        }
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut ops = GpuOps {
            dev: &self.dev,
            kv: &self.kv,
            comm,
            dtype: self.dtype,
            inv_freq: DBuf::from_slice(&self.dev, inv_freq)?,
        };
        decoder::forward(&mut ops, cfg, &self.w, seqs)
    }

    /// The rank's shard and KV pool as f32 host copies, in the layouts of `RankWeights` and
    /// `KvPool` (exact: every device dtype widens to f32 without rounding). A live TP switch
    /// stages through them.
    pub fn to_host(&self) -> Result<(RankWeights, KvPool)> {
        let w = self.w.try_map(|b| b.to_f32(&self.dev))?;
        Ok((w, self.kv.to_host(&self.dev)?))
    }

    /// A rank made from host copies: `w` uploaded as [`GpuRank::new`] does, and a KV pool of
    /// `kv`'s geometry holding its contents.
    pub fn from_host(
        dev: CudaDev,
        cfg: &ModelConfig,
        w: &RankWeights,
        kv: &KvPool,
        dtype: DType,
    ) -> Result<Self> {
        let mut r = GpuRank::new(dev, cfg, w, dtype, kv.num_blocks, kv.block_size)?;
        r.kv.upload(&r.dev, kv)?;
        r.dev.synchronize()?;
        Ok(r)
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
        self.w.tp
    }
    pub fn tp_rank(&self) -> usize {
        self.w.tp_rank
    }

    /// Weight bytes a decode step reads: all of them but an untied embedding table, of which a
    /// step reads only the rows of its tokens.
    pub fn decode_read_bytes(&self) -> usize {
        self.w.held_and_read_bytes(DBuf::bytes).1
    }

    /// Grows the KV pool to `blocks` blocks, keeping blocks `[0, used)` ([`GpuKvPool::grow`]).
    pub fn grow_kv(&mut self, blocks: usize, used: usize) -> Result<()> {
        self.kv.grow(&self.dev, blocks, used)
    }

    /// Bytes of weights held on the device.
    pub fn weight_bytes(&self) -> usize {
        self.w.held_and_read_bytes(DBuf::bytes).0
    }
}
