//! [`GpuOps`]: the CUDA backend's [`RankOps`] — device buffers in the rank's dtype (f32 math
//! inside every kernel and GEMM), the typed kernel wrappers of `ops`, the rank's paged KV pool and
//! a device collective group. The decoder itself is `model::decoder::forward`.
//!
//! The residual adds are the `fused_add_rmsnorm` kernel (x += proj, then normalise: the CPU order
//! exactly). Attention is the paged decode kernel when every sequence feeds one token, else the
//! prefill kernel (which also serves chunked prefill and recompute).

use super::GpuKvPool;
use crate::backend::cuda::buffer::{DBuf, DType};
use crate::backend::cuda::comm::DeviceComm;
use crate::backend::cuda::device::CudaDev;
use crate::backend::cuda::ops::{self, Heads, SeqMeta};
use crate::backend::{AttnShape, BatchPlan, RankOps, SeqInput};
use crate::error::Result;

/// One GPU rank's operations.
pub struct GpuOps<'a> {
    pub dev: &'a CudaDev,
    pub kv: &'a GpuKvPool,
    pub comm: &'a dyn DeviceComm,
    pub dtype: DType,
    /// RoPE inverse frequencies on the device (f32).
    pub inv_freq: DBuf,
}

/// A batch's metadata on the device.
pub struct GpuBatch {
    pub plan: BatchPlan,
    ids: DBuf,
    positions: DBuf,
    slots: DBuf,
    tables: DBuf,
    context: DBuf,
    cu_q: DBuf,
    last_rows: DBuf,
}

impl GpuBatch {
    fn meta(&self) -> SeqMeta<'_> {
        SeqMeta {
            num_seqs: self.plan.num_seqs(),
            block_tables: self.tables.view(),
            max_blocks_per_seq: self.plan.max_blocks,
            context_lens: self.context.view(),
            max_context: self.plan.max_context,
            cu_seqlens_q: Some(self.cu_q.view()),
            total_q: self.plan.num_tokens(),
            max_q_len: self.plan.max_q,
        }
    }
}

impl RankOps for GpuOps<'_> {
    type Buf = DBuf;
    type Weight = DBuf;
    type Batch = GpuBatch;

    fn batch(&mut self, seqs: &[SeqInput], vocab_size: usize) -> Result<GpuBatch> {
        let plan = BatchPlan::new(seqs, vocab_size, self.kv.block_size, self.kv.num_blocks)?;
        let dev = self.dev;
        Ok(GpuBatch {
            ids: DBuf::from_slice(dev, &plan.ids)?,
            positions: DBuf::from_slice(dev, &plan.positions)?,
            slots: DBuf::from_slice(dev, &plan.slots)?,
            tables: DBuf::from_slice(dev, &plan.tables)?,
            context: DBuf::from_slice(dev, &plan.context)?,
            cu_q: DBuf::from_slice(dev, &plan.cu_q)?,
            last_rows: DBuf::from_slice(dev, &plan.last_rows)?,
            plan,
        })
    }

    fn zeros(&mut self, len: usize) -> Result<DBuf> {
        DBuf::zeros(self.dev, self.dtype, len)
    }

    fn embedding(
        &mut self,
        out: &mut DBuf,
        b: &GpuBatch,
        table: &DBuf,
        hidden: usize,
        vocab_start: usize,
    ) -> Result<()> {
        let (o, ids, t) = (out.view(), b.ids.view(), table.view());
        ops::embedding(self.dev, o, ids, t, hidden, vocab_start)
    }

    fn rmsnorm(&mut self, out: &mut DBuf, x: &DBuf, w: &DBuf, rows: usize, eps: f32) -> Result<()> {
        ops::rmsnorm(self.dev, out.view(), x.view(), w.view(), rows, eps)
    }

    fn add_rmsnorm(
        &mut self,
        out: &mut DBuf,
        x: &mut DBuf,
        add: &DBuf,
        w: &DBuf,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        let (o, a, xv, wv) = (out.view(), add.view(), x.view(), w.view());
        ops::fused_add_rmsnorm(self.dev, o, a, xv, wv, rows, eps)
    }

    fn gemm_nt(
        &mut self,
        out: &mut DBuf,
        a: &DBuf,
        w: &DBuf,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        ops::gemm_nt(self.dev, out.view(), a.view(), w.view(), n, k, m)
    }

    fn gemm_nn(
        &mut self,
        out: &mut DBuf,
        a: &DBuf,
        w: &DBuf,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        ops::gemm_nn(self.dev, out.view(), a.view(), w.view(), n, k, m)
    }

    fn attention(
        &mut self,
        layer: usize,
        out: &mut DBuf,
        qkv: &mut DBuf,
        b: &GpuBatch,
        qk_norm: Option<(&DBuf, &DBuf)>,
        s: AttnShape,
    ) -> Result<()> {
        let dev = self.dev;
        let (hq, hkv, hd) = (s.q_heads, s.kv_heads, s.head_dim);
        let n = b.plan.num_tokens();
        let stride = (hq + 2 * hkv) * hd;
        let heads = |offset: usize, count: usize| -> Result<Heads<'_>> {
            Ok(Heads {
                data: qkv.view().at(offset)?,
                heads: count,
                head_dim: hd,
                token_stride: stride,
            })
        };
        let (q, k, v) = (
            heads(0, hq)?,
            heads(hq * hd, hkv)?,
            heads((hq + hkv) * hd, hkv)?,
        );
        if let Some((qn, kn)) = qk_norm {
            ops::qk_norm(dev, q, k, qn.view(), kn.view(), n, s.eps)?;
        }
        ops::rope(dev, q, k, b.positions.view(), self.inv_freq.view(), n)?;
        let cache = self.kv.layer(layer)?;
        ops::kv_append(dev, &cache, k, v, b.slots.view(), n)?;
        let meta = b.meta();
        if b.plan.max_q == 1 {
            let split = ops::auto_partition(
                dev,
                b.plan.num_seqs(),
                hkv,
                b.plan.max_context,
                self.kv.block_size,
            );
            ops::paged_attention(dev, out.view(), q, &cache, &meta, s.scale, split)
        } else {
            ops::prefill_attention(dev, out.view(), q, &cache, &meta, s.scale)
        }
    }

    fn silu_mul(&mut self, out: &mut DBuf, gu: &DBuf, rows: usize, inter: usize) -> Result<()> {
        ops::silu_mul(self.dev, out.view(), gu.view(), rows, inter)
    }

    fn last_rows(&mut self, out: &mut DBuf, x: &DBuf, b: &GpuBatch, hidden: usize) -> Result<()> {
        // The embedding kernel as a row gather: row `last_rows[s]` of x for each sequence.
        ops::embedding(
            self.dev,
            out.view(),
            b.last_rows.view(),
            x.view(),
            hidden,
            0,
        )
    }

    fn all_reduce_sum(&mut self, buf: &mut DBuf) -> Result<()> {
        self.comm.all_reduce_sum(self.dev, buf.view())
    }

    fn all_gather(&mut self, local: &DBuf, out: &mut DBuf) -> Result<()> {
        self.comm.all_gather(self.dev, local.view(), out.view())
    }

    fn to_host(&mut self, buf: &DBuf) -> Result<Vec<f32>> {
        buf.to_f32(self.dev)
    }
}
