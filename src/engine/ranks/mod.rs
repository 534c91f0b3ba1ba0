//! The ranks behind an engine, whatever runs them: one interface ([`RankSet`]), two backends.
//!
//! - `cpu`: the reference. Each rank's shard and KV pool are host memory; a step runs one
//!   scoped thread per busy rank over `model::decoder::forward`, with `CpuComm` groups from the
//!   engine's `GroupCache`.
//! - `gpu`: `backend::cuda::GpuRanks`, each rank a long-lived worker thread owning its device,
//!   shard and KV pool; a step sends each busy rank its packed batch. In builds without the `cuda`
//!   feature the type is a stub whose constructor says how to build it, so this module has no
//!   `cfg` arms.
//!
//! The engine owns everything above the ranks (requests, block tables, allocators, sampling), so
//! the scheduling, the paged-KV bookkeeping and the sampler are the same code on both backends.

mod cpu;
mod gpu;

pub(crate) use cpu::CpuRanks;
pub(crate) use gpu::GpuSet;
pub use gpu::GpuSwitch;

use super::step_cap::StepCap;
use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::decoder::SeqInput;
use crate::parallel::{GroupCache, Layout};
use crate::reshard::kv::{KvPlan, KvProgram, KvStats};
use crate::reshard::weights::WeightProgram;

/// Which backend runs the ranks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// Host threads, f32 compute (the reference).
    #[default]
    Cpu,
    /// GPU ranks (needs a build with `--features cuda`). `devices[r]` is rank r's CUDA ordinal;
    /// `None` picks one GPU per rank when there are at least `world` GPUs, else GPU 0 for all.
    /// `switch`: how live switches run (on the devices by default).
    Cuda {
        devices: Option<Vec<usize>>,
        switch: GpuSwitch,
    },
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda { .. } => "cuda",
        }
    }
}

/// What a step needs from the engine besides the batch.
pub(crate) struct StepCtx<'a> {
    pub cfg: &'a ModelConfig,
    pub layout: &'a Layout,
    pub inv_freq: &'a [f32],
    pub groups: &'a mut GroupCache,
    /// Tests of the failure paths: this physical rank fails the step.
    pub fail_rank: Option<usize>,
}

/// A planned switch's per-rank work (pure data, computed by the engine before anything moves).
pub(crate) struct SwitchWork<'a> {
    pub cfg: &'a ModelConfig,
    pub new: &'a Layout,
    pub weights: &'a [WeightProgram],
    pub kv_plan: &'a KvPlan,
    pub kv: &'a [KvProgram],
    /// KV blocks of each rank's new pool.
    pub new_blocks: usize,
    pub block_size: usize,
}

/// A KV pool growth: after a switch whose devices could not hold the new pools' whole share
/// of the freed weight bytes next to the old layout (`RankSet::grow_pools`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PoolGrow {
    /// Blocks per rank now, and the most it may grow to.
    pub blocks: usize,
    pub goal: usize,
    /// Blocks `[0, used)` hold live KV and are kept.
    pub used: usize,
    /// Bytes of one block on one rank, over its `layers` layers' K and V.
    pub block_bytes: u64,
    pub layers: usize,
}

/// What the switch phases did.
#[derive(Clone, Debug, Default)]
pub(crate) struct SwitchDone {
    pub kv: KvStats,
    pub kv_migrate_ms: f64,
    pub weight_ms: f64,
    /// The new pools' bytes on one rank.
    pub new_pool_bytes: u64,
    /// Most extra weight bytes one rank holds, where the backend knows better than the
    /// programs' count (a switch on the devices builds every re-sharded buffer fresh).
    pub weight_peak_bytes: Option<u64>,
    /// Bytes the switch reads plus writes in the ranks' memory to move KV and weights, where
    /// the backend counts them (GPU ranks switching on the devices).
    pub memory_bytes: Option<u64>,
}

/// Where a switch may be made to fail, for tests of the failure paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchPhase {
    /// Allocating the destination KV pools.
    Begin,
    /// Migrating KV and exchanging weight rows (nothing of the old layout is written).
    Apply,
    /// Before the weights are rebuilt and the pools swapped.
    Commit,
    /// Re-prefilling the sequences chosen for recompute, after the swap.
    Recompute,
}

/// An injected switch failure: `rank` fails in `phase`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwitchFault {
    pub phase: SwitchPhase,
    pub rank: usize,
}

/// A set of `world` ranks arranged as `layout`: runs one step and reports memory.
pub(crate) trait RankSet {
    /// Runs replica d's packed batch `inputs[d]` through its tp ranks (idle replicas have an empty
    /// batch). Returns each replica's logits [n_seqs, vocab] (empty for idle replicas). On error
    /// no sequence's cached-token count may be assumed to have advanced.
    fn forward(&mut self, ctx: StepCtx<'_>, inputs: &[Vec<SeqInput<'_>>]) -> Result<Vec<Vec<f32>>>;
    /// (weight bytes, KV pool bytes) held by physical rank `rank`.
    fn rank_bytes(&self, rank: usize) -> (usize, usize);
    /// Weight bytes physical rank `rank` reads per decode step (an untied embedding is not read
    /// whole): what the bandwidth roofline counts.
    fn decode_read_bytes(&self, rank: usize) -> usize;
    /// Which memory each physical rank reads its weights from: ranks with the same id share one
    /// memory's bandwidth (every CPU rank shares host memory; GPU ranks their GPU's).
    fn memory_ids(&self) -> Vec<usize>;
    /// Measured copy bandwidth (bytes/s, read + write) of each distinct memory id, ascending;
    /// `threads` host threads copy at once on the CPU.
    fn memory_bandwidths(&self, threads: usize) -> Result<Vec<(usize, f64)>>;
    /// Where the ranks run, for reports, e.g. "2 ranks on NVIDIA H100 80GB HBM3 (GPU 0)".
    fn describe(&self) -> String;
    /// Bytes per element of the ranks' weight and KV buffers (4 on the CPU, whose buffers are
    /// f32 whatever the checkpoint's dtype; the device dtype's size on GPUs): what the switch
    /// planners count bytes in.
    fn elem_bytes(&self) -> u64;
    /// The device groups the backend keeps itself (GPU ranks: one per replica per tp, made once
    /// and reused by a switch back); `None` where the engine's `GroupCache` holds the groups.
    fn device_groups(&self) -> Option<crate::backend::GroupCounts> {
        None
    }

    /// What a step may feed on these ranks now, at degree `tp` with KV blocks of `block_size`
    /// tokens, where the ranks' own memory says (GPU ranks: each rank's share of its GPU's free
    /// memory); `None` (the default) where the engine's cap from load stands (host memory).
    fn step_cap(&self, cfg: &ModelConfig, tp: usize, block_size: usize) -> Result<Option<StepCap>> {
        let _ = (cfg, tp, block_size);
        Ok(None)
    }

    /// Bytes each rank's new KV pool may take next to the old layout at a switch from shards of
    /// `old_w` bytes to `new_w`, where `messages[r]` bytes of KV messages are held at once on
    /// rank `r` (sent plus received, one round of layers: `reshard::kv::batch::round_messages`);
    /// `None` (the default) where nothing limits it below the old pool plus what the reshard
    /// frees. Where it is less, the pool grows into the freed bytes later ([`grow_pools`]).
    ///
    /// [`grow_pools`]: RankSet::grow_pools
    fn new_pool_room(&self, old_w: u64, new_w: u64, messages: &[u64]) -> Result<Option<u64>> {
        let _ = (old_w, new_w, messages);
        Ok(None)
    }
    /// Grows every rank's KV pool from `g.blocks` toward `g.goal` blocks, as far as the
    /// backend's memory allows, keeping blocks `[0, g.used)`; returns the blocks every rank now
    /// holds (at least `g.blocks`: an error leaves each rank with a pool of at least its old
    /// blocks, the old ones intact) and the bytes read plus written doing it. By default pools
    /// never need it (a switch gives them the whole goal).
    fn grow_pools(&mut self, g: &PoolGrow) -> Result<(usize, u64)> {
        Ok((g.blocks, 0))
    }
    /// Switch phase 1: allocates every rank's destination KV pool (and scratch). Nothing the
    /// ranks decode with changes; on error nothing is kept.
    fn begin_switch(&mut self, work: &SwitchWork<'_>, fault: Option<usize>) -> Result<f64>;
    /// Switch phase 2: every rank runs its programs' fallible part (KV into the new pool, weight
    /// rows exchanged into staging), bytes crossing ranks through `world` (a group of every rank).
    /// The old layout is not written; on error the caller aborts.
    fn apply_switch(
        &mut self,
        work: &SwitchWork<'_>,
        groups: &mut GroupCache,
        fault: Option<usize>,
    ) -> Result<SwitchDone>;
    /// Switch phase 3: every rank rebuilds its shard in place and swaps in its new pool. Fails
    /// only before anything changes (then the caller aborts).
    fn commit_switch(&mut self, work: &SwitchWork<'_>, fault: Option<usize>) -> Result<f64>;
    /// Drops whatever `begin_switch` and `apply_switch` made; the old layout keeps decoding.
    fn abort_switch(&mut self);
    /// Why the ranks cannot run any more (a switch failed after some rank swapped and the old
    /// layout could not be restored), if so.
    fn unusable(&self) -> Option<String> {
        None
    }
}

/// The ranks of an engine on one of the backends.
pub(crate) enum Ranks {
    Cpu(CpuRanks),
    Gpu(Box<GpuSet>),
}

impl Ranks {
    pub fn set(&mut self) -> &mut dyn RankSet {
        match self {
            Ranks::Cpu(c) => c,
            Ranks::Gpu(g) => g.as_mut(),
        }
    }
    pub fn set_ref(&self) -> &dyn RankSet {
        match self {
            Ranks::Cpu(c) => c,
            Ranks::Gpu(g) => g.as_ref(),
        }
    }
    pub fn backend(&self) -> &'static str {
        match self {
            Ranks::Cpu(_) => "cpu",
            Ranks::Gpu(_) => "cuda",
        }
    }
}
