//! [`CpuOps`]: the reference backend's [`RankOps`] — host `Vec<f32>` buffers, the kernels of
//! `backend::cpu`, the rank's `KvPool`, and a host `Comm` group.

use super::AttnSeq;
use super::{paged_attention_on, rmsnorm, rmsnorm_inplace, rope, silu_mul, Gemm};
use crate::backend::{AttnShape, BatchPlan, RankOps, SeqInput};
use crate::error::{Error, Result};
use crate::kv::KvPool;
use crate::parallel::Comm;

/// One CPU rank's operations: its KV pool, its tp group and the RoPE frequencies.
pub struct CpuOps<'a> {
    pub kv: &'a mut KvPool,
    pub comm: &'a dyn Comm,
    pub inv_freq: &'a [f32],
    /// Scratch for the attention core, reused across layers: q, k, v.
    scratch: [Vec<f32>; 3],
    /// The threads this rank's GEMMs use.
    pub gemm: Gemm,
}

impl<'a> CpuOps<'a> {
    pub fn new(kv: &'a mut KvPool, comm: &'a dyn Comm, inv_freq: &'a [f32]) -> Self {
        CpuOps {
            kv,
            comm,
            inv_freq,
            scratch: Default::default(),
            gemm: Gemm::default(),
        }
    }

    /// The same, with the rank's GEMMs on `gemm`'s threads.
    pub fn with_gemm(mut self, gemm: Gemm) -> Self {
        self.gemm = gemm;
        self
    }
}

/// A batch on the host: the plan plus the forms the CPU kernels take.
pub struct CpuBatch {
    pub plan: BatchPlan,
    positions: Vec<usize>,
    slots: Vec<usize>,
    /// Each sequence's block table (the plan's padded i32 rows, unpadded).
    tables: Vec<Vec<u32>>,
}

fn check(len: usize, need: usize, what: &str) -> Result<()> {
    if len < need {
        return Err(Error::Internal(format!(
            "{what}: buffer of {len} elements, the call needs {need}"
        )));
    }
    Ok(())
}

impl RankOps for CpuOps<'_> {
    type Buf = Vec<f32>;
    type Weight = Vec<f32>;
    type Batch = CpuBatch;

    fn batch(&mut self, seqs: &[SeqInput], vocab_size: usize) -> Result<CpuBatch> {
        let plan = BatchPlan::new(seqs, vocab_size, self.kv.block_size, self.kv.num_blocks)?;
        let positions = plan.positions.iter().map(|&p| p as usize).collect();
        let slots = plan.slots.iter().map(|&s| s as usize).collect();
        let tables = (0..plan.num_seqs())
            .map(|s| {
                let (_, len, start, t) = plan.seq(s);
                let need = (start + len).div_ceil(self.kv.block_size);
                t[..need].iter().map(|&b| b as u32).collect()
            })
            .collect();
        Ok(CpuBatch {
            plan,
            positions,
            slots,
            tables,
        })
    }

    fn zeros(&mut self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0f32; len])
    }

    fn embedding(
        &mut self,
        out: &mut Vec<f32>,
        b: &CpuBatch,
        table: &Vec<f32>,
        hidden: usize,
        vocab_start: usize,
    ) -> Result<()> {
        let ids = &b.plan.ids;
        check(out.len(), ids.len() * hidden, "embedding")?;
        let rows = table.len() / hidden.max(1);
        for (row, &t) in ids.iter().enumerate() {
            let o = &mut out[row * hidden..(row + 1) * hidden];
            match (t as usize).checked_sub(vocab_start).filter(|&r| r < rows) {
                Some(r) => o.copy_from_slice(&table[r * hidden..(r + 1) * hidden]),
                None => o.fill(0.0),
            }
        }
        Ok(())
    }

    fn rmsnorm(
        &mut self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        let n = rows * w.len();
        check(out.len().min(x.len()), n, "rmsnorm")?;
        rmsnorm(&mut out[..n], &x[..n], w, eps);
        Ok(())
    }

    fn add_rmsnorm(
        &mut self,
        out: &mut Vec<f32>,
        x: &mut Vec<f32>,
        add: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        let n = rows * w.len();
        check(out.len().min(x.len()).min(add.len()), n, "add_rmsnorm")?;
        x[..n].iter_mut().zip(&add[..n]).for_each(|(a, b)| *a += b);
        rmsnorm(&mut out[..n], &x[..n], w, eps);
        Ok(())
    }

    fn gemm_nt(
        &mut self,
        out: &mut Vec<f32>,
        a: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        check(out.len(), n * m, "gemm_nt out")?;
        check(a.len(), n * k, "gemm_nt a")?;
        check(w.len(), m * k, "gemm_nt w")?;
        self.gemm
            .nt(&mut out[..n * m], &a[..n * k], &w[..m * k], n, k, m);
        Ok(())
    }

    fn gemm_nn(
        &mut self,
        out: &mut Vec<f32>,
        a: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        check(out.len(), n * m, "gemm_nn out")?;
        check(a.len(), n * k, "gemm_nn a")?;
        check(w.len(), k * m, "gemm_nn w")?;
        self.gemm
            .nn(&mut out[..n * m], &a[..n * k], &w[..k * m], n, k, m);
        Ok(())
    }

    fn attention(
        &mut self,
        layer: usize,
        out: &mut Vec<f32>,
        qkv: &mut Vec<f32>,
        b: &CpuBatch,
        qk_norm: Option<(&Vec<f32>, &Vec<f32>)>,
        s: AttnShape,
    ) -> Result<()> {
        let (hq, hkv, hd) = (s.q_heads, s.kv_heads, s.head_dim);
        let n = b.plan.num_tokens();
        let width = (hq + 2 * hkv) * hd;
        check(qkv.len(), n * width, "attention qkv")?;
        check(out.len(), n * hq * hd, "attention out")?;
        if hkv != self.kv.kv_heads || hd != self.kv.head_dim || hkv == 0 || hq % hkv != 0 {
            return Err(Error::Internal(format!(
                "attention with {hq} q / {hkv} kv heads of {hd} on a pool of {} kv heads of {}",
                self.kv.kv_heads, self.kv.head_dim
            )));
        }
        let [q, k, v] = &mut self.scratch;
        q.resize(n * hq * hd, 0.0);
        k.resize(n * hkv * hd, 0.0);
        v.resize(n * hkv * hd, 0.0);
        for t in 0..n {
            let r = &qkv[t * width..(t + 1) * width];
            q[t * hq * hd..(t + 1) * hq * hd].copy_from_slice(&r[..hq * hd]);
            k[t * hkv * hd..(t + 1) * hkv * hd].copy_from_slice(&r[hq * hd..(hq + hkv) * hd]);
            v[t * hkv * hd..(t + 1) * hkv * hd].copy_from_slice(&r[(hq + hkv) * hd..]);
        }
        if let Some((qn, kn)) = qk_norm {
            rmsnorm_inplace(q, qn, s.eps);
            rmsnorm_inplace(k, kn, s.eps);
        }
        rope(q, hq, &b.positions, self.inv_freq);
        rope(k, hkv, &b.positions, self.inv_freq);
        self.kv.append(layer, k, v, &b.slots);
        let seqs: Vec<AttnSeq> = (0..b.plan.num_seqs())
            .map(|i| {
                let (row, len, start_pos, _) = b.plan.seq(i);
                AttnSeq {
                    row,
                    len,
                    start_pos,
                    table: &b.tables[i],
                }
            })
            .collect();
        paged_attention_on(
            self.gemm,
            &mut out[..n * hq * hd],
            q,
            self.kv,
            layer,
            &seqs,
            hq,
            s.scale,
        );
        Ok(())
    }

    fn silu_mul(
        &mut self,
        out: &mut Vec<f32>,
        gu: &Vec<f32>,
        rows: usize,
        inter: usize,
    ) -> Result<()> {
        check(out.len(), rows * inter, "silu_mul out")?;
        check(gu.len(), rows * 2 * inter, "silu_mul gu")?;
        silu_mul(&mut out[..rows * inter], &gu[..rows * 2 * inter], inter);
        Ok(())
    }

    fn last_rows(
        &mut self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        b: &CpuBatch,
        hidden: usize,
    ) -> Result<()> {
        let rows = &b.plan.last_rows;
        check(out.len(), rows.len() * hidden, "last_rows")?;
        for (i, &r) in rows.iter().enumerate() {
            let r = r as usize;
            check(x.len(), (r + 1) * hidden, "last_rows x")?;
            out[i * hidden..(i + 1) * hidden].copy_from_slice(&x[r * hidden..(r + 1) * hidden]);
        }
        Ok(())
    }

    fn all_reduce_sum(&mut self, buf: &mut Vec<f32>) -> Result<()> {
        self.comm.all_reduce_sum(buf)
    }

    fn all_gather(&mut self, local: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        self.comm.all_gather(local, out)
    }

    fn to_host(&mut self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
}
