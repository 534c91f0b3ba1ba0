//! GPU ranks behind the engine's [`RankSet`]: `backend::cuda::GpuRanks`, one long-lived worker
//! thread per rank owning its device, shard and KV pool (a stub that refuses to start in builds
//! without the `cuda` feature), plus the state of a live switch.
//!
//! A live switch on GPU ranks runs one of two ways ([`GpuSwitch`]):
//!
//! - **On the devices** (the default wherever the world forms one device group: every rank on
//!   one GPU, at most 16, or each on its own GPU): the same per-rank programs as the CPU backend,
//!   each rank executing its own on its own buffers with the `reshard.cu` kernels
//!   (`backend::cuda::rank::switch`), bytes crossing ranks through a world device group
//!   (same-device reads of the sender's buffers or grouped NCCL send/recv) made once and
//!   reused. `begin` allocates the new pools; `apply` stages on every rank (checks, buffers,
//!   moves within a rank; no communication) and only then exchanges, a round of layers at a
//!   time; `commit` builds every new shard (the old one only read) and only then swaps
//!   on every rank. A failure before the swap leaves the old layout decoding.
//! - **Through the host** (`--gpu-switch host`, or a placement the device path cannot group):
//!   `begin` downloads every rank's shard and KV pool (f32, exact) and allocates the new host
//!   pools; `apply` runs the CPU backend's programs on those copies; `commit` rebuilds the shards
//!   and makes every GPU rank again from them. Exactly the CPU's reshard at the price of a round
//!   trip through host memory; a failed commit restores the old layout from the host copies.
//!
//! Either way each replica's device group (its ranks in tp order) is made at the first visit to
//! that replica and reused by every later one.

use std::time::Instant;

use super::cpu::{host_apply, injected, new_pools};
use super::{PoolGrow, RankSet, StepCtx, SwitchDone, SwitchWork};
use crate::backend::cuda::GpuRanks;
use crate::engine::step_cap::StepCap;
use crate::error::{Error, Result};
use crate::kv::KvPool;
use crate::model::config::ModelConfig;
use crate::model::decoder::{RankWeights, SeqInput};
use crate::parallel::GroupCache;
use crate::reshard::cpu as run;
use crate::reshard::weights::program::Staged;
use crate::reshard::SwitchPrograms;

/// How GPU ranks make a live switch (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GpuSwitch {
    /// On the devices, where the world forms one device group; through the host elsewhere.
    #[default]
    Device,
    /// Through host memory (exact, slow): the cross-check for the device path.
    Host,
}

impl GpuSwitch {
    pub fn name(self) -> &'static str {
        match self {
            GpuSwitch::Device => "device",
            GpuSwitch::Host => "host",
        }
    }
}

/// GPU ranks and the switch being made on them.
pub(crate) struct GpuSet {
    pub ranks: GpuRanks,
    how: GpuSwitch,
    pending: Option<Pending>,
}

enum Pending {
    Host(Staging),
    /// A switch on the devices: the state lives on the workers; every rank's programs.
    Device(std::sync::Arc<SwitchPrograms>),
}

/// A host-staged switch between `begin` and `commit`.
struct Staging {
    weights: Vec<RankWeights>,
    kv: Vec<KvPool>,
    new_kv: Vec<KvPool>,
    staged: Option<Vec<Vec<Vec<Staged>>>>,
}

impl GpuSet {
    pub fn new(ranks: GpuRanks, how: GpuSwitch) -> Self {
        GpuSet {
            ranks,
            how,
            pending: None,
        }
    }

    /// Whether the next switch runs on the devices.
    fn on_device(&self) -> bool {
        self.how == GpuSwitch::Device && self.ranks.world_kind().is_some()
    }

    fn device_begin(&mut self, work: &SwitchWork<'_>, fault: Option<usize>) -> Result<f64> {
        let t = Instant::now();
        let world = work.weights.len();
        let plan = std::sync::Arc::new(SwitchPrograms {
            new_tp: work.new.tp,
            new_tp_ranks: (0..world).map(|p| work.new.position(p).1).collect(),
            weights: work.weights.to_vec(),
            kv_plan: work.kv_plan.clone(),
            kv: work.kv.to_vec(),
            new_blocks: work.new_blocks,
            block_size: work.block_size,
        });
        self.pending = Some(Pending::Device(plan.clone()));
        if let Err(e) = self.ranks.switch_begin(plan, work.new, fault) {
            self.abort_switch();
            return Err(e);
        }
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }
}

/// Bytes a GPU keeps free for activations besides what a switch or a pool growth allocates.
const ACTIVATIONS: u64 = 512 << 20;

/// The tenths of a rank's share of its GPU's free memory a step's activations may take: the
/// memory pool keeps freed buffers as pieces that serve only allocations that fit them.
const STEP_SHARE_TENTHS: u64 = 9;

/// The pool bytes every rank may allocate next to what it holds besides (`need[r]`): on each
/// GPU, its free bytes (`free[r]`, as each of its ranks reports them; the least is taken) less
/// every one of its ranks' needs, shared evenly by those ranks; the least over GPUs. One rank
/// that receives more KV than the others thus narrows its GPU's share, not every GPU's.
pub fn pool_room(free: &[usize], devices: &[usize], need: &[u64]) -> u64 {
    let mut ords = devices.to_vec();
    ords.sort_unstable();
    ords.dedup();
    ords.iter()
        .map(|&o| {
            let ranks: Vec<usize> = (0..devices.len()).filter(|&r| devices[r] == o).collect();
            let avail = ranks
                .iter()
                .map(|&r| free.get(r).copied().unwrap_or(0))
                .min();
            let taken: u64 = ranks
                .iter()
                .map(|&r| need.get(r).copied().unwrap_or(0))
                .sum();
            (avail.unwrap_or(0) as u64).saturating_sub(taken) / ranks.len().max(1) as u64
        })
        .min()
        .unwrap_or(0)
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
    /// Each rank's share of its GPU's free memory (what an allocation can get now) less what
    /// every step holds ([`GpuRanks::step_fixed_bytes`]), nine tenths of it ([`pool_room`]).
    fn step_cap(&self, cfg: &ModelConfig, tp: usize, block_size: usize) -> Result<Option<StepCap>> {
        let fixed = self.ranks.step_fixed_bytes(cfg, tp, block_size);
        let room = pool_room(&self.ranks.free_bytes()?, self.ranks.devices(), &fixed);
        Ok(Some(StepCap::DeviceBytes {
            per_rank: room / 10 * STEP_SHARE_TENTHS,
            elem: self.ranks.elem_bytes(),
        }))
    }

    /// On the devices the new pool is allocated next to the old layout, so it gets no more than
    /// its GPU's free memory leaves after what every rank there holds besides: its new shard,
    /// the weight rows it receives into staging (what the shard grows by), its own KV messages
    /// (sent and received copies of one round of layers; none where all ranks share one GPU and
    /// read each other's KV in place) and 512 MiB for activations ([`pool_room`]). The freed
    /// weight bytes it cannot take now it takes after the swap ([`RankSet::grow_pools`]).
    fn new_pool_room(&self, old_w: u64, new_w: u64, messages: &[u64]) -> Result<Option<u64>> {
        if !self.on_device() {
            return Ok(None);
        }
        let besides = new_w + new_w.saturating_sub(old_w) + ACTIVATIONS;
        let in_place = self.ranks.world_shares_memory();
        let need: Vec<u64> = (0..self.ranks.devices().len())
            .map(|r| match in_place {
                true => besides,
                false => besides + messages.get(r).copied().unwrap_or(0),
            })
            .collect();
        Ok(Some(pool_room(
            &self.ranks.free_bytes()?,
            self.ranks.devices(),
            &need,
        )))
    }

    /// Each GPU's free memory now, less per rank one layer's new K (or V) buffer (held next to
    /// the old one while its kept blocks are copied) and 512 MiB for activations, shared by its
    /// ranks ([`pool_room`]), in whole blocks on top of `g.blocks`, up to `g.goal`.
    fn grow_pools(&mut self, g: &PoolGrow) -> Result<(usize, u64)> {
        if g.goal <= g.blocks || g.block_bytes == 0 {
            return Ok((g.blocks, 0));
        }
        let layer = g.block_bytes / (2 * g.layers.max(1)) as u64 * g.goal as u64;
        let need = vec![layer + ACTIVATIONS; self.ranks.devices().len()];
        let room = pool_room(&self.ranks.free_bytes()?, self.ranks.devices(), &need);
        let more = usize::try_from(room / g.block_bytes).unwrap_or(usize::MAX);
        let target = g.goal.min(g.blocks.saturating_add(more));
        if target <= g.blocks {
            return Ok((g.blocks, 0));
        }
        let blocks = self.ranks.grow_kv(target, g.used)?;
        // Each rank read and wrote its kept blocks once.
        let kept = 2 * g.block_bytes * g.used as u64 * self.ranks.devices().len() as u64;
        Ok((blocks, kept))
    }

    fn begin_switch(&mut self, work: &SwitchWork<'_>, fault: Option<usize>) -> Result<f64> {
        self.pending = None;
        if let Some(why) = self.ranks.broken() {
            return Err(Error::Device(format!(
                "the GPU ranks are unusable after an earlier failure: {why}"
            )));
        }
        if self.on_device() {
            return self.device_begin(work, fault);
        }
        // The new layout's groups must be possible before anything is downloaded.
        self.ranks.check_groups(work.new)?;
        let t = Instant::now();
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
        if let Some(avail) = crate::backend::host_available_bytes() {
            if need > avail {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                return Err(Error::KvExhausted(format!(
                    "this GPU switch goes through host memory (--gpu-switch host, or a placement \
                     the device path cannot group) and needs {:.2} GiB of it (every rank's shard \
                     twice and its old and new KV pools, in f32); {:.2} GiB are available. Still \
                     decoding at the old layout",
                    gib(need),
                    gib(avail)
                )));
            }
        }
        let (weights, kv): (Vec<RankWeights>, Vec<KvPool>) =
            self.ranks.download()?.into_iter().unzip();
        let new_kv = new_pools(work, weights.len(), fault)?;
        self.pending = Some(Pending::Host(Staging {
            weights,
            kv,
            new_kv,
            staged: None,
        }));
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    fn apply_switch(
        &mut self,
        work: &SwitchWork<'_>,
        groups: &mut GroupCache,
        fault: Option<usize>,
    ) -> Result<SwitchDone> {
        let p = match self.pending.as_mut() {
            Some(Pending::Host(p)) => p,
            Some(Pending::Device(_)) => {
                let a = self.ranks.switch_apply(fault)?;
                let elem = self.ranks.elem_bytes();
                // Every re-sharded buffer is built fresh next to the old shard and the rows
                // received into staging.
                let weight_peak = work
                    .weights
                    .iter()
                    .map(|p| {
                        let fresh: u64 = p
                            .roles
                            .iter()
                            .map(|r| (r.repeats * r.new_rows * p.hidden) as u64 * elem)
                            .sum();
                        fresh + p.bytes_received
                    })
                    .max();
                return Ok(SwitchDone {
                    kv: a.kv,
                    kv_migrate_ms: a.kv_ms,
                    weight_ms: a.weight_ms,
                    new_pool_bytes: crate::kv::kv_block_bytes(
                        work.cfg,
                        work.new.tp,
                        work.block_size,
                        elem as usize,
                    ) * work.new_blocks as u64,
                    weight_peak_bytes: weight_peak,
                    memory_bytes: Some(
                        a.memory_bytes
                            + (work.weights.iter())
                                .map(|p| p.rebuild_bytes())
                                .sum::<u64>(),
                    ),
                });
            }
            None => return Err(Error::Internal("apply_switch before begin_switch".into())),
        };
        // Through the host nothing is counted (`memory_bytes` None, as on the CPU).
        let (mut done, staged) = host_apply(work, groups, &p.weights, &p.kv, &mut p.new_kv, fault)?;
        p.staged = Some(staged);
        // The device pools hold the device dtype, not the host copies' f32.
        done.new_pool_bytes = done.new_pool_bytes / 4 * self.ranks.elem_bytes();
        Ok(done)
    }

    fn commit_switch(&mut self, work: &SwitchWork<'_>, fault: Option<usize>) -> Result<f64> {
        if let Some(Pending::Device(plan)) = &self.pending {
            let t = Instant::now();
            let plan = plan.clone();
            self.ranks.switch_commit(&plan, work.new, fault)?;
            self.pending = None;
            return Ok(t.elapsed().as_secs_f64() * 1e3);
        }
        if let Some(p) = fault {
            return Err(injected(p, "committing the switch"));
        }
        let Some(Pending::Host(Staging {
            weights,
            kv,
            new_kv,
            staged: Some(staged),
        })) = self.pending.take()
        else {
            return Err(Error::Internal("commit_switch before apply_switch".into()));
        };
        let t = Instant::now();
        let old = self.ranks.layout().clone();
        // The old shards stay on the host until the new layout is up, to restore it on failure.
        let mut new_w = weights
            .iter()
            .map(|w| w.try_map(|b| Ok(b.clone())))
            .collect::<Result<Vec<_>>>()?;
        run::rebuild_weights(work.weights, work.new, &mut new_w, staged);
        if let Err(e) = self
            .ranks
            .replace(work.new, new_w.into_iter().zip(new_kv).collect())
        {
            let ranks = weights.into_iter().zip(kv).collect();
            if let Err(r) = self.ranks.replace(&old, ranks) {
                self.ranks.set_broken(format!(
                    "a failed switch ({e}) could not restore the old layout: {r}"
                ));
            }
            return Err(e);
        }
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    fn unusable(&self) -> Option<String> {
        self.ranks.broken().map(str::to_owned)
    }

    fn abort_switch(&mut self) {
        if let Some(Pending::Device(_)) = self.pending.take() {
            self.ranks.switch_abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pool_room;

    #[test]
    fn pool_room_shares_each_gpu_after_its_ranks_needs() {
        // Four ranks on one GPU with 100 free: needs 10 + 10 + 30 + 10 leave 40, 10 each.
        assert_eq!(pool_room(&[100; 4], &[0; 4], &[10, 10, 30, 10]), 10);
        // One rank per GPU: each GPU's own free less its own rank's need; the least is 45.
        assert_eq!(pool_room(&[100, 80, 100], &[0, 1, 2], &[10, 35, 10]), 45);
        // Two GPUs of two ranks; GPU 1's ranks report 60 and 64 (the least counts): (60 - 20) / 2.
        assert_eq!(
            pool_room(&[100, 100, 60, 64], &[0, 0, 1, 1], &[5, 5, 10, 10]),
            20
        );
        // Needs beyond what is free leave nothing, not an underflow.
        assert_eq!(pool_room(&[10, 10], &[0, 0], &[8, 8]), 0);
    }
}
