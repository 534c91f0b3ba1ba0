//! The engine: requests spread over dp replicas of tp ranks, paged KV, and the shrinking batch of
//! live sequences; the ranks run on the CPU (one thread per rank per step) or on GPU workers.
//!
//! Every step each live sequence feeds the tokens not yet in its KV cache (the prompt on its first
//! step, or the chunk of it the step's cap leaves room for; then the last sampled token), so
//! prefill, chunked prefill, decode and recompute are one code path.
//!
//! - [`sequence`]: requests, outputs, step reports, the per-request state.
//! - [`options`]: settings and KV pool sizing from a memory budget.
//! - `scheduler`: admission, replica placement, per-step block grants.
//! - `step_cap`: what one step may prefill, from the memory its activations take.
//! - [`requests`]: request files (JSONL).
//! - `ranks`: the ranks behind the engine, one interface over the backends.
//! - `reconfigure`: live tp switches.
//! - [`adaptive`]: the engine as a `policy::StepSource`, so the one adaptive loop drives it.
//! - [`profiler`]: measuring a profile of this engine.

pub mod adaptive;
pub mod options;
pub mod profiler;
mod ranks;
mod reconfigure;
pub mod requests;
mod scheduler;
pub mod sequence;
mod step_cap;

pub use crate::kv::kv_block_bytes;
/// A live sequence as the policy sees it (one type for the engine and the simulator).
pub use crate::policy::LiveSeq;
pub use adaptive::EngineSource;
pub use options::{EngineOptions, DEFAULT_BLOCK_SIZE};
pub use ranks::{Backend, GpuSwitch, SwitchFault, SwitchPhase};
pub use reconfigure::SwitchReport;
pub use requests::parse_requests_jsonl;
pub use scheduler::{check_lengths, check_request};
pub use sequence::{FinishReason, Output, PoolGrowth, Request, StepReport};
pub use step_cap::{
    device_step_bytes, host_step_bytes, host_step_fixed_bytes, STEP_CAP, STEP_FIXED_BYTES_PER_RANK,
};

use std::time::Instant;

use crate::backend::cuda::{GpuOptions, GpuRanks};
use crate::error::{Error, Result};
use crate::kv::{blocks_for, BlockAllocator};
use crate::model::config::ModelConfig;
use crate::model::decoder::SeqInput;
use crate::model::sampling::sample;
use crate::model::weights::Checkpoint;
use crate::model::ModelDir;
use crate::parallel::{GroupCache, Layout};
use crate::text::plural;
use ranks::{CpuRanks, GpuSet, Ranks, StepCtx};

use sequence::Sequence;
use step_cap::StepCap;

/// A running generation over `world` ranks.
pub struct Engine {
    cfg: ModelConfig,
    layout: Layout,
    opts: EngineOptions,
    inv_freq: Vec<f32>,
    /// Per physical rank: its weight shard and its KV pool, on the backend that runs it.
    ranks: Ranks,
    allocs: Vec<BlockAllocator>,
    /// Blocks per rank the pools may grow to: the last switch's old pool plus the shard bytes
    /// it freed (above `opts.kv_blocks` where the devices could not hold the whole new pools
    /// next to the old layout; see `grow_pools`). A later switch counts the old pool at least
    /// this large.
    pool_goal: usize,
    /// Whether a growth toward `pool_goal` was tried since the last switch (once per switch).
    grow_tried: bool,
    /// A growth made outside a step (`add_requests`), for the next step's report.
    growth: Option<PoolGrowth>,
    /// Tests: the most blocks per rank a switch gives the new pools.
    switch_pool_cap: Option<usize>,
    /// What one step's (and one pass of a switch's recompute's) activations may take: a longer
    /// queue is prefilled over several steps, a prompt longer than the cap in chunks.
    step_cap: StepCap,
    /// The most prompt tokens a step (or a recompute pass) prefills besides, if set
    /// (`cap_step_tokens`).
    prefill_tokens: Option<usize>,
    /// Whether the last read of the ranks' memory failed (the cap is the least until a read
    /// succeeds; the next step reads again).
    step_cap_stale: bool,
    groups: GroupCache,
    seqs: Vec<Sequence>,
    steps: usize,
    /// When set, (sequence, logits) of the latest step are kept for inspection.
    record_logits: bool,
    /// Tests of the failure paths: the next switches fail as told.
    fault: Option<SwitchFault>,
    recorded: Vec<(usize, Vec<f32>)>,
}

impl Engine {
    /// Loads every rank's shard onto the CPU backend (ranks load in parallel, each reading only
    /// its rows).
    pub fn new(cfg: ModelConfig, ck: &Checkpoint, opts: EngineOptions) -> Result<Self> {
        Self::with_backend(cfg, ck, opts, &Backend::Cpu)
    }

    /// Loads every rank's shard of an opened model directory onto `backend`.
    pub fn from_dir(model: &ModelDir, opts: EngineOptions, backend: &Backend) -> Result<Self> {
        Self::with_backend(model.cfg.clone(), &model.ck, opts, backend)
    }

    /// Loads every rank's shard onto `backend`. GPU ranks need a build with `--features cuda`;
    /// without it this is a clear error.
    pub fn with_backend(
        cfg: ModelConfig,
        ck: &Checkpoint,
        opts: EngineOptions,
        backend: &Backend,
    ) -> Result<Self> {
        let layout = Layout::new(opts.world, opts.tp)?;
        layout.validate_for(&cfg)?;
        if opts.block_size == 0 || opts.block_size > cfg.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "`block_size` is {}, expected 1 ..= max_position_embeddings ({})",
                opts.block_size, cfg.max_position_embeddings
            )));
        }
        if opts.kv_blocks == 0 {
            return Err(Error::KvExhausted(
                "the pool has 0 blocks (raise `kv_blocks`)".into(),
            ));
        }
        if opts.kv_blocks > u32::MAX as usize {
            // Block ids are u32 (block tables, the C ABI).
            return Err(Error::Invalid(format!(
                "`kv_blocks` is {}, more than block ids count ({})",
                opts.kv_blocks,
                u32::MAX
            )));
        }
        opts.sampling.validate()?;
        let inv_freq = cfg.inv_freq();
        let ranks = match backend {
            Backend::Cpu => Ranks::Cpu(CpuRanks::load(&cfg, ck, &layout, &opts)?),
            Backend::Cuda { devices, switch } => Ranks::Gpu(
                GpuRanks::new(
                    &cfg,
                    ck,
                    &layout,
                    &GpuOptions {
                        devices: devices.clone(),
                        dtype: opts.dtype,
                        kv_blocks: opts.kv_blocks,
                        block_size: opts.block_size,
                        inv_freq: inv_freq.clone(),
                    },
                )
                .map(|r| Box::new(GpuSet::new(r, *switch)))?,
            ),
        };
        let allocs = (0..layout.dp())
            .map(|_| BlockAllocator::new(opts.kv_blocks))
            .collect();
        let pool_goal = opts.kv_blocks;
        let step_cap = match (backend, crate::backend::host_available_bytes()) {
            // Half of what the host has left once the KV pools fill (their pages are zeroed
            // lazily, so the memory available now still counts them), less what a step holds
            // whatever it feeds (the GEMMs' packing, the step's own bookkeeping).
            (Backend::Cpu, Some(avail)) => {
                let pools: u64 = (0..opts.world)
                    .map(|r| ranks.set_ref().rank_bytes(r).1 as u64)
                    .sum();
                let fixed = step_cap::host_step_fixed_bytes(&cfg, opts.world, true);
                StepCap::HostBytes((avail.saturating_sub(pools) / 2).saturating_sub(fixed))
            }
            _ => StepCap::None,
        };
        let mut e = Engine {
            inv_freq,
            cfg,
            layout,
            opts,
            ranks,
            allocs,
            pool_goal,
            grow_tried: false,
            growth: None,
            switch_pool_cap: None,
            step_cap,
            prefill_tokens: None,
            step_cap_stale: false,
            groups: GroupCache::default(),
            seqs: Vec::new(),
            steps: 0,
            record_logits: false,
            recorded: Vec::new(),
            fault: None,
        };
        // GPU ranks: each rank's share of its GPU's memory left after the weights and pools.
        e.refresh_step_cap()?;
        Ok(e)
    }

    /// The backend running the ranks: "cpu" or "cuda".
    pub fn backend(&self) -> &'static str {
        self.ranks.backend()
    }
    /// Where the ranks run, for reports.
    pub fn describe_ranks(&self) -> String {
        self.ranks.set_ref().describe()
    }
    /// Weight bytes physical rank `rank` reads per decode step (what a bandwidth roofline counts).
    pub fn decode_read_bytes(&self, rank: usize) -> usize {
        self.ranks.set_ref().decode_read_bytes(rank)
    }
    /// Measured bandwidth (bytes/s, read + write) of the memory behind each id of
    /// [`Engine::rank_memory_ids`]: host memory on the CPU (copied by `threads` threads at once),
    /// each GPU's memory on cuda.
    pub fn memory_bandwidths(&self, threads: usize) -> Result<Vec<(usize, f64)>> {
        self.ranks.set_ref().memory_bandwidths(threads)
    }
    /// Per physical rank, which memory it reads its weights from (equal ids share bandwidth).
    pub fn rank_memory_ids(&self) -> Vec<usize> {
        self.ranks.set_ref().memory_ids()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// The settings in force (`tp` and `kv_blocks` change at every switch).
    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }
    pub fn groups(&self) -> &GroupCache {
        &self.groups
    }
    /// Bytes of weights plus KV pool held by one rank.
    pub fn rank_bytes(&self, rank: usize) -> (usize, usize) {
        self.ranks.set_ref().rank_bytes(rank)
    }

    /// Makes switches fail as `fault` says, until cleared with `None` (for tests of the
    /// failure paths: a failed switch must leave the engine decoding with nothing lost).
    pub fn inject_switch_fault(&mut self, fault: Option<SwitchFault>) {
        self.fault = fault;
    }

    /// Caps the KV blocks per rank a switch gives the new pools and a growth after it, until
    /// cleared with `None` (for tests of the pool growth: a GPU that could not hold the whole
    /// new pools, without filling a GPU).
    pub fn cap_switch_pools(&mut self, blocks: Option<usize>) {
        self.switch_pool_cap = blocks;
    }

    /// KV blocks per rank the pools may grow to: the last switch's old pool plus the shard bytes
    /// it freed, above `options().kv_blocks` where the devices could not hold that next to the
    /// old layout (see `grow_kv_pools`); the pools' own size where nothing is short.
    pub fn kv_blocks_goal(&self) -> usize {
        self.pool_goal
    }

    /// Grows the KV pools now toward the goal the last switch left them (the old pool plus the
    /// shard bytes it freed, where the devices could not hold that next to the old layout), as
    /// far as the devices have room: what a step does by itself when it has to leave a request
    /// waiting for blocks, for a caller about to add a batch. `None` when there is nothing to
    /// grow (no switch left the pools short, or a growth was already tried since).
    pub fn grow_kv_pools(&mut self) -> Option<PoolGrowth> {
        self.may_grow().then(|| self.grow_pools())
    }

    /// Keep each step's logits (see `recorded_logits`); off by default.
    pub fn record_logits(&mut self, on: bool) {
        self.record_logits = on;
    }
    /// (request index, logits over the vocabulary) sampled from in the latest step.
    pub fn recorded_logits(&self) -> &[(usize, Vec<f32>)] {
        &self.recorded
    }

    /// Every live sequence, in request order.
    pub fn live_seqs(&self) -> Vec<LiveSeq> {
        self.seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.finished.is_none())
            .map(|(index, s)| LiveSeq {
                index,
                replica: s.replica,
                context: s.tokens.len(),
                kv: s.cached,
                generated: s.generated(),
                max_new_tokens: s.max_new,
                group: None,
            })
            .collect()
    }

    /// Live (unfinished) sequences.
    pub fn live(&self) -> usize {
        self.seqs.iter().filter(|s| s.finished.is_none()).count()
    }

    /// Live sequences still to prefill: prompts waiting (for blocks or for room in a step's
    /// cap) or part way through in chunks, and sequences to prefill again after a failed step
    /// or recompute. The others decode.
    pub fn unprefilled(&self) -> usize {
        self.seqs
            .iter()
            .filter(|s| s.finished.is_none() && !s.decoding())
            .count()
    }

    /// Runs one step on every replica with live sequences (the scheduler admits waiting ones as
    /// their KV blocks fit; see `admitted`). On error no token has been sampled
    /// and no sequence has advanced (blocks granted for the step stay in its tables, to be used
    /// by the next try).
    pub fn step(&mut self) -> Result<StepReport> {
        let t0 = Instant::now();
        let dp = self.layout.dp();
        let mut live_per_replica = vec![0; dp];
        if self.step_cap_stale {
            self.refresh_step_cap_or_least();
        }
        // The sequences that run this step: those already running, and waiting ones whose whole
        // footprint fits what their replica's pool has left (the rest wait for blocks to free),
        // each as far as the step's cap lets it feed.
        let (mut run, short) = self.admitted();
        if self.may_grow() && short {
            // Kept for this step's report (or, if the step fails, the next one's).
            self.growth = Some(self.grow_pools());
            run = self.admitted().0;
        }
        if run.is_empty() {
            if let Some((i, s)) = self
                .seqs
                .iter()
                .enumerate()
                .find(|(_, s)| s.finished.is_none())
            {
                // Only a request larger than a whole pool waits with nothing running: a pool
                // a switch left short that could not grow enough.
                return Err(Error::KvExhausted(format!(
                    "request {i} needs {} of {} but a rank's pool holds {} (a switch left it short and it could not grow: {}); switch to a layout with more KV per rank",
                    plural(blocks_for(s.footprint(), self.opts.block_size), "block"),
                    plural(self.opts.block_size, "token"),
                    self.opts.kv_blocks,
                    self.growth
                        .as_ref()
                        .and_then(|g| g.note.clone())
                        .unwrap_or_else(|| "tried before".into())
                )));
            }
        }
        for &(i, _) in &run {
            live_per_replica[self.seqs[i].replica] += 1;
        }
        self.grant_blocks(&run)?;

        let per_replica: Vec<Vec<(usize, usize)>> = (0..dp)
            .map(|d| {
                run.iter()
                    .copied()
                    .filter(|&(i, _)| self.seqs[i].replica == d)
                    .collect()
            })
            .collect();
        let (mut tokens_in, mut prefill_tokens) = (0, 0);
        for &(i, upto) in &run {
            let s = &self.seqs[i];
            tokens_in += upto - s.cached;
            if !s.decoding() {
                prefill_tokens += upto - s.cached;
            }
        }
        let logits_per_replica = self.forward_replicas(&per_replica)?;

        let (vocab, mut finished, mut sampled) = (self.cfg.vocab_size, 0, 0);
        // NaN or inf logits would sample garbage silently: an error, before anything advances.
        for (d, ids) in per_replica.iter().enumerate() {
            for (row, &(i, _)) in ids.iter().enumerate() {
                let l = &logits_per_replica[d][row * vocab..(row + 1) * vocab];
                if let Some(t) = l.iter().position(|x| !x.is_finite()) {
                    return Err(Error::Invalid(format!(
                        "request {i}: the model produced a non-finite logit ({}) for token {t} at step {}: \
                         the weights overflow in this dtype (try `dtype` f32) or are corrupt",
                        l[t], self.steps
                    )));
                }
            }
        }
        self.recorded.clear();
        for (d, ids) in per_replica.iter().enumerate() {
            for (row, &(i, upto)) in ids.iter().enumerate() {
                let s = &mut self.seqs[i];
                s.cached = upto;
                if upto < s.tokens.len() {
                    // A chunk of a prompt: it samples once its last chunk is in.
                    continue;
                }
                let row_logits = &logits_per_replica[d][row * vocab..(row + 1) * vocab];
                if self.record_logits {
                    self.recorded.push((i, row_logits.to_vec()));
                }
                let tok = sample(row_logits, &self.opts.sampling, &mut s.rng);
                s.tokens.push(tok);
                sampled += 1;
                if !s.ignore_eos && self.cfg.eos_token_ids.contains(&tok) {
                    s.finished = Some(FinishReason::Stop);
                } else if s.generated() >= s.max_new {
                    s.finished = Some(FinishReason::Length);
                }
                if s.finished.is_some() {
                    finished += 1;
                    self.allocs[d].release(&std::mem::take(&mut s.table));
                }
            }
        }
        let report = StepReport {
            step: self.steps,
            live_per_replica,
            tokens_in,
            prefill_tokens,
            tokens_out: sampled,
            finished,
            elapsed_ms: t0.elapsed().as_secs_f64() * 1e3,
            pool_growth: self.growth.take(),
        };
        self.steps += 1;
        Ok(report)
    }

    /// Runs every replica's sequences (`per_replica[d]`: indices into `seqs`, each with how
    /// far its tokens are fed) through the model, feeding tokens `cached..upto` of each; one
    /// thread per rank. Returns each replica's logits [n_seqs, vocab] (empty for idle
    /// replicas). Caller updates `cached`.
    fn forward_replicas(&mut self, per_replica: &[Vec<(usize, usize)>]) -> Result<Vec<Vec<f32>>> {
        self.forward_replicas_failing(per_replica, None)
    }

    /// [`Engine::forward_replicas`] with rank `fail_rank` failing (tests of the failure paths).
    fn forward_replicas_failing(
        &mut self,
        per_replica: &[Vec<(usize, usize)>],
        fail_rank: Option<usize>,
    ) -> Result<Vec<Vec<f32>>> {
        let seqs = &self.seqs;
        let inputs: Vec<Vec<SeqInput>> = per_replica
            .iter()
            .map(|ids| {
                ids.iter()
                    .map(|&(i, upto)| {
                        let s = &seqs[i];
                        SeqInput {
                            tokens: &s.tokens[s.cached..upto],
                            start_pos: s.cached,
                            table: &s.table,
                        }
                    })
                    .collect()
            })
            .collect();
        let ctx = StepCtx {
            cfg: &self.cfg,
            layout: &self.layout,
            inv_freq: &self.inv_freq,
            groups: &mut self.groups,
            fail_rank,
        };
        self.ranks.set().forward(ctx, &inputs)
    }

    /// Steps until every sequence has finished, calling `on_step` after each step.
    pub fn run(&mut self, mut on_step: impl FnMut(&StepReport)) -> Result<()> {
        while self.live() > 0 {
            let r = self.step()?;
            on_step(&r);
        }
        Ok(())
    }

    /// Results of every finished request, in input order.
    pub fn outputs(&self) -> Vec<Output> {
        self.seqs
            .iter()
            .enumerate()
            .filter_map(|(index, s)| {
                s.finished.map(|finish_reason| Output {
                    index,
                    input_ids: s.tokens[..s.prompt_len].to_vec(),
                    output_ids: s.tokens[s.prompt_len..].to_vec(),
                    finish_reason,
                })
            })
            .collect()
    }
}
