//! GPU ranks behind the engine's [`RankSet`]: `backend::cuda::GpuRanks`, one long-lived worker
//! thread per rank owning its device, shard and KV pool (a stub that refuses to start in builds
//! without the `cuda` feature), plus the state of a live switch.
//!
//! A live switch on GPU ranks is host-staged for now: `begin` downloads every rank's shard and
//! KV pool (f32, exact) and allocates the new host pools; `apply` runs the same per-rank
//! programs as the CPU backend on those host copies (one thread per rank, bytes across ranks
//! only through the CPU `Comm`); `commit` rebuilds the shards and makes every GPU rank again from
//! them in the new layout, with its device groups (made at the first visit to a tp, reused by
//! every later one). So a GPU switch is exactly the CPU's, tested
//! reshard, at the price of a round trip through host memory: correct, not fast. A failed commit
//! restores the old layout from the host copies kept until then. The device-side path (the
//! `reshard.cu` kernels, point-to-point device copies) is issue #10's next step.

use std::time::Instant;

use super::cpu::{host_apply, injected, new_pools};
use super::{RankSet, StepCtx, SwitchDone, SwitchWork};
use crate::backend::cuda::GpuRanks;
use crate::error::{Error, Result};
use crate::kv::KvPool;
use crate::model::decoder::{RankWeights, SeqInput};
use crate::parallel::GroupCache;
use crate::reshard::cpu as run;
use crate::reshard::weights::program::Staged;

/// GPU ranks and the switch being made on them.
pub(crate) struct GpuSet {
    pub ranks: GpuRanks,
    pending: Option<Staging>,
}

/// A host-staged switch between `begin` and `commit`.
struct Staging {
    weights: Vec<RankWeights>,
    kv: Vec<KvPool>,
    new_kv: Vec<KvPool>,
    staged: Option<Vec<Vec<Vec<Staged>>>>,
}

impl GpuSet {
    pub fn new(ranks: GpuRanks) -> Self {
        GpuSet {
            ranks,
            pending: None,
        }
    }
}

impl RankSet for GpuSet {
    fn forward(&mut self, ctx: StepCtx<'_>, inputs: &[Vec<SeqInput<'_>>]) -> Result<Vec<Vec<f32>>> {
        // A test of the failure paths: fail before anything is launched (no rank has changed).
        if let Some(rank) = ctx.fail_rank {
            return Err(injected(rank, "the step"));
        }
        self.ranks.step(ctx.layout, inputs)
    }
    fn rank_bytes(&self, rank: usize) -> (usize, usize) {
        self.ranks.bytes(rank)
    }
    fn decode_read_bytes(&self, rank: usize) -> usize {
        self.ranks.read_bytes(rank)
    }
    fn memory_ids(&self) -> Vec<usize> {
        self.ranks.devices().to_vec()
    }
    fn memory_bandwidths(&self, _threads: usize) -> Result<Vec<(usize, f64)>> {
        self.ranks.copy_bandwidths()
    }
    fn describe(&self) -> String {
        self.ranks.describe()
    }
    fn elem_bytes(&self) -> u64 {
        self.ranks.elem_bytes()
    }
    fn device_groups(&self) -> Option<crate::backend::GroupCounts> {
        Some(self.ranks.group_counts())
    }

    fn begin_switch(&mut self, work: &SwitchWork<'_>, fault: Option<usize>) -> Result<f64> {
        let t = Instant::now();
        self.pending = None;
        let cfg = work.cfg;
        // Host staging holds, in f32, every rank's shard twice (old, kept to restore a failed
        // commit, and new), its old KV pool and its new one: refuse up front when that does not
        // fit in the host's available memory.
        let elem = self.ranks.elem_bytes().max(1);
        let world = work.weights.len();
        let held: u64 = (0..world)
            .map(|r| {
                let (w, kv) = self.ranks.bytes(r);
                (2 * w as u64 + kv as u64) / elem * 4
            })
            .sum();
        let new_kv_bytes = crate::kv::kv_block_bytes(cfg, work.new.tp, work.block_size, 4)
            .saturating_mul(work.new_blocks as u64)
            .saturating_mul(world as u64);
        let need = held.saturating_add(new_kv_bytes);
        if let Some(avail) = crate::backend::cuda::host_available_bytes() {
            if need > avail {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                return Err(Error::KvExhausted(format!(
                    "a GPU switch is staged through host memory for now and needs {:.2} GiB of it \
                     (every rank's shard twice and its old and new KV pools, in f32); {:.2} GiB \
                     are available. Still decoding at the old layout",
                    gib(need),
                    gib(avail)
                )));
            }
        }
        let (weights, kv): (Vec<RankWeights>, Vec<KvPool>) =
            self.ranks.download()?.into_iter().unzip();
        let new_kv = new_pools(work, weights.len(), fault)?;
        self.pending = Some(Staging {
            weights,
            kv,
            new_kv,
            staged: None,
        });
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    fn apply_switch(
        &mut self,
        work: &SwitchWork<'_>,
        groups: &mut GroupCache,
        fault: Option<usize>,
    ) -> Result<SwitchDone> {
        let p = self
            .pending
            .as_mut()
            .ok_or_else(|| Error::Internal("apply_switch before begin_switch".into()))?;
        let (mut done, staged) = host_apply(work, groups, &p.weights, &p.kv, &mut p.new_kv, fault)?;
        p.staged = Some(staged);
        // The device pools hold the device dtype, not the host copies' f32.
        done.new_pool_bytes = done.new_pool_bytes / 4 * self.ranks.elem_bytes();
        Ok(done)
    }

    fn commit_switch(&mut self, work: &SwitchWork<'_>, fault: Option<usize>) -> Result<f64> {
        if let Some(p) = fault {
            return Err(injected(p, "committing the switch"));
        }
        let Some(Staging {
            weights,
            kv,
            new_kv,
            staged: Some(staged),
        }) = self.pending.take()
        else {
            return Err(Error::Internal("commit_switch before apply_switch".into()));
        };
        let t = Instant::now();
        let old_tp = weights.first().map_or(1, |w| w.tp);
        // The old shards stay on the host until the new layout is up, to restore it on failure.
        let mut new_w = weights
            .iter()
            .map(|w| w.try_map(|b| Ok(b.clone())))
            .collect::<Result<Vec<_>>>()?;
        run::rebuild_weights(work.weights, work.new, &mut new_w, staged);
        if let Err(e) = self
            .ranks
            .replace(work.new.tp, new_w.into_iter().zip(new_kv).collect())
        {
            let old = weights.into_iter().zip(kv).collect();
            if let Err(r) = self.ranks.replace(old_tp, old) {
                self.ranks.set_broken(format!(
                    "a failed switch ({e}) could not restore the old layout: {r}"
                ));
            }
            return Err(e);
        }
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    fn abort_switch(&mut self) {
        self.pending = None;
    }
}
