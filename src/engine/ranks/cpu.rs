//! Host ranks: each rank's shard and KV pool in host memory; a step runs one scoped thread per
//! busy rank over the decoder on the CPU backend, with `CpuComm` groups from the engine's cache.

use std::time::Instant;

use super::{RankSet, StepCtx, SwitchDone, SwitchWork};
use crate::backend::cpu::Gemm;
use crate::engine::EngineOptions;
use crate::error::{Error, Result};
use crate::kv::KvPool;
use crate::model::config::ModelConfig;
use crate::model::decoder::{forward_cpu_on, RankWeights, SeqInput};
use crate::model::weights::Checkpoint;
use crate::parallel::Layout;
use crate::parallel::{first_cause, Comm, GroupCache};
use crate::reshard::cpu as run;
use crate::reshard::weights::program::Staged;
use crate::text::plural;

/// Host ranks: shards and pools in host memory.
pub(crate) struct CpuRanks {
    pub weights: Vec<RankWeights>,
    pub pools: Vec<KvPool>,
    /// A switch in progress: the new pools (after `begin_switch`) and each rank's staged weight
    /// rows (after `apply_switch`).
    pending: Option<Pending>,
}

struct Pending {
    pools: Vec<KvPool>,
    staged: Option<Vec<Vec<Vec<Staged>>>>,
}

impl CpuRanks {
    /// Every rank's shard and a zeroed KV pool in host memory, loaded by one thread per rank.
    pub(crate) fn load(
        cfg: &ModelConfig,
        ck: &Checkpoint,
        layout: &Layout,
        opts: &EngineOptions,
    ) -> Result<CpuRanks> {
        let block = host_block_bytes(
            cfg.num_layers,
            opts.block_size,
            cfg.num_kv_heads / opts.tp,
            cfg.head_dim,
        );
        let weights = crate::parallel::shard::weight_bytes_per_rank(cfg, opts.tp, 4);
        check_host_room(weights, opts.kv_blocks, block, opts.world)?;
        let loaded = crate::parallel::per_rank(opts.world, "loader", |rank| {
            let (_, t) = layout.position(rank);
            let weights = RankWeights::load(ck, cfg, opts.tp, t, opts.dtype)?;
            let kv = KvPool::new(
                cfg.num_layers,
                opts.kv_blocks,
                opts.block_size,
                cfg.num_kv_heads / opts.tp,
                cfg.head_dim,
            )?;
            Ok((weights, kv))
        })?;
        let (weights, pools) = loaded.into_iter().unzip();
        Ok(CpuRanks::new(weights, pools))
    }

    pub fn new(weights: Vec<RankWeights>, pools: Vec<KvPool>) -> Self {
        CpuRanks {
            weights,
            pools,
            pending: None,
        }
    }
}

/// Refuses to load `ranks` CPU ranks, each holding `weight_bytes` of weights and a KV pool of
/// `blocks` blocks of `block_bytes` each (every layer's K and V), when the host has less memory
/// available than they need: the weights are written as they load, so a host short of them
/// would kill the process part way; the pools' pages are zeroed lazily, so pools the host cannot
/// back would be allocated anyway and the process killed when a step first writes them. A
/// switch's new pools need no check of their own, being the old pools plus the weight bytes the
/// reshard frees (or less what it takes), all given back at its commit.
pub(crate) fn check_host_room(
    weight_bytes: u64,
    blocks: usize,
    block_bytes: u64,
    ranks: usize,
) -> Result<()> {
    let weights = weight_bytes.checked_mul(ranks as u64);
    let pools = (blocks as u64)
        .checked_mul(block_bytes)
        .and_then(|b| b.checked_mul(ranks as u64));
    let show = |b: Option<u64>| b.map_or("more than 2^64 bytes".into(), gib);
    // Where the host's memory cannot be read, only sizes past u64 are refused.
    let avail = crate::backend::host_available_bytes().unwrap_or(u64::MAX);
    match (weights, pools) {
        (Some(w), _) if w > avail => Err(Error::HostMemory(format!(
            "the weights ({} per rank x {}, f32 on the CPU) need {} but the host has {} available; \
             use fewer ranks (`world`), more tp per replica, or a smaller model",
            gib(weight_bytes),
            plural(ranks, "rank"),
            gib(w),
            gib(avail)
        ))),
        (None, _) => Err(Error::HostMemory(format!(
            "the weights ({} per rank x {}) need more than 2^64 bytes",
            gib(weight_bytes),
            plural(ranks, "rank")
        ))),
        (Some(w), Some(p)) if p <= avail - w => Ok(()),
        (Some(w), p) => Err(Error::KvExhausted(format!(
            "the KV pools (`kv_blocks` {blocks} per rank x {}) need {} but the host has {} \
             available next to the weights' {}",
            plural(ranks, "rank"),
            show(p),
            gib(avail - w),
            gib(w),
        ))),
    }
}

/// Bytes of one host KV block over `layers` layers' K and V (f32).
pub(crate) fn host_block_bytes(
    layers: usize,
    block_size: usize,
    kv_local: usize,
    hd: usize,
) -> u64 {
    [layers, block_size, kv_local, hd]
        .iter()
        .fold(8u64, |a, &x| a.saturating_mul(x as u64))
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / crate::text::GIB)
}

/// The new layout's KV pools, one per rank, on the host (a switch's `begin`).
pub(super) fn new_pools(
    work: &SwitchWork<'_>,
    n: usize,
    fault: Option<usize>,
) -> Result<Vec<KvPool>> {
    let cfg = work.cfg;
    let kv_local = cfg.num_kv_heads / work.new.tp;
    crate::parallel::per_rank(n, "KV pool allocation", |p| {
        if fault == Some(p) {
            return Err(injected(p, "allocating the new KV pool"));
        }
        KvPool::new(
            cfg.num_layers,
            work.new_blocks,
            work.block_size,
            kv_local,
            cfg.head_dim,
        )
    })
}

/// A switch's `apply` on host shards and pools: every rank's KV programs (`pools` into
/// `new_pools`), then its weight exchange, one thread per rank over a CPU group of the world.
/// Returns what was done (the new pools' bytes in f32) and the staged weight rows.
pub(super) fn host_apply(
    work: &SwitchWork<'_>,
    groups: &mut GroupCache,
    weights: &[RankWeights],
    pools: &[KvPool],
    new_pools: &mut [KvPool],
    fault: Option<usize>,
) -> Result<(SwitchDone, Vec<Vec<Vec<Staged>>>)> {
    let world: Vec<usize> = (0..weights.len()).collect();
    let comms = groups.get(&world);
    let t = Instant::now();
    let kv = run::migrate_kv(work.kv_plan, work.kv, pools, new_pools, &comms, fault)?;
    let kv_migrate_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let staged = run::exchange_weights(work.weights, weights, &comms, fault)?;
    let done = SwitchDone {
        kv,
        kv_migrate_ms,
        weight_ms: t.elapsed().as_secs_f64() * 1e3,
        new_pool_bytes: new_pools.first().map_or(0, |p| p.bytes() as u64),
        weight_peak_bytes: None,
        memory_bytes: None,
    };
    Ok((done, staged))
}

pub(super) fn injected(rank: usize, what: &str) -> Error {
    Error::Rank {
        rank,
        msg: format!("injected failure in {what}"),
    }
}

impl RankSet for CpuRanks {
    /// Host memory: every rank's pool grows to the goal (a switch gives it the goal unless a
    /// test capped it). The allocator's moves are not counted.
    fn grow_pools(&mut self, g: &super::PoolGrow) -> Result<(usize, u64)> {
        for p in &mut self.pools {
            p.grow(g.goal)?;
        }
        Ok((g.goal.max(g.blocks), 0))
    }
    fn forward(&mut self, ctx: StepCtx<'_>, inputs: &[Vec<SeqInput<'_>>]) -> Result<Vec<Vec<f32>>> {
        let StepCtx {
            cfg,
            layout,
            inv_freq,
            groups,
            fail_rank,
        } = ctx;
        let dp = layout.dp();
        let comms: Vec<_> = (0..dp)
            .map(|d| {
                if inputs[d].is_empty() {
                    Vec::new()
                } else {
                    groups.get(layout.replica_ranks(d))
                }
            })
            .collect();
        // The busy ranks share the machine's cores: each rank's GEMMs split over its share.
        let busy = (0..layout.world)
            .filter(|&r| !inputs[layout.position(r).0].is_empty())
            .count();
        let gemm = Gemm::share(busy);
        let results: Vec<(usize, usize, Result<Vec<f32>>)> = std::thread::scope(|sc| {
            let hs: Vec<_> = self
                .weights
                .iter()
                .zip(self.pools.iter_mut())
                .enumerate()
                .filter_map(|(rank, (w, kv))| {
                    let (d, t) = layout.position(rank);
                    if inputs[d].is_empty() {
                        return None;
                    }
                    let comm = comms[d][t].clone();
                    let inp = &inputs[d];
                    Some((
                        rank,
                        t,
                        sc.spawn(move || {
                            let r = if fail_rank == Some(rank) {
                                Err(injected(rank, "the step"))
                            } else {
                                forward_cpu_on(cfg, w, kv, inv_freq, &comm, inp, gemm)
                            };
                            if r.is_err() {
                                comm.poison();
                            }
                            r
                        }),
                    ))
                })
                .collect();
            // Join every rank, so a failure anywhere is reported rather than left behind.
            hs.into_iter()
                .map(|(rank, t, h)| {
                    let r = h.join().unwrap_or_else(|_| {
                        Err(Error::Rank {
                            rank,
                            msg: "worker panicked".into(),
                        })
                    });
                    (rank, t, r)
                })
                .collect()
        });
        let mut logits = vec![Vec::new(); dp];
        let where_: Vec<(usize, usize)> = results.iter().map(|(rank, t, _)| (*rank, *t)).collect();
        let values = first_cause(results.into_iter().map(|(_, _, r)| r).collect())?;
        for ((rank, t), l) in where_.into_iter().zip(values) {
            if t == 0 {
                logits[layout.position(rank).0] = l;
            }
        }
        Ok(logits)
    }

    fn rank_bytes(&self, rank: usize) -> (usize, usize) {
        (self.weights[rank].bytes(), self.pools[rank].bytes())
    }
    fn decode_read_bytes(&self, rank: usize) -> usize {
        self.weights[rank].decode_read_bytes()
    }
    fn memory_ids(&self) -> Vec<usize> {
        vec![0; self.weights.len()]
    }
    fn memory_bandwidths(&self, threads: usize) -> Result<Vec<(usize, f64)>> {
        Ok(vec![(0, crate::backend::cpu::copy_bandwidth(threads))])
    }
    fn describe(&self) -> String {
        format!("{} CPU rank thread(s)", self.weights.len())
    }
    fn elem_bytes(&self) -> u64 {
        4
    }

    fn begin_switch(&mut self, work: &SwitchWork<'_>, fault: Option<usize>) -> Result<f64> {
        let t = Instant::now();
        self.pending = None;
        let pools = new_pools(work, self.weights.len(), fault)?;
        self.pending = Some(Pending {
            pools,
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
        let pending = self
            .pending
            .as_mut()
            .ok_or_else(|| Error::Internal("apply_switch before begin_switch".into()))?;
        let (done, staged) = host_apply(
            work,
            groups,
            &self.weights,
            &self.pools,
            &mut pending.pools,
            fault,
        )?;
        pending.staged = Some(staged);
        Ok(done)
    }

    fn commit_switch(&mut self, work: &SwitchWork<'_>, fault: Option<usize>) -> Result<f64> {
        if let Some(p) = fault {
            return Err(injected(p, "committing the switch"));
        }
        let Some(Pending {
            pools,
            staged: Some(staged),
        }) = self.pending.take()
        else {
            return Err(Error::Internal("commit_switch before apply_switch".into()));
        };
        let t = Instant::now();
        run::rebuild_weights(work.weights, work.new, &mut self.weights, staged);
        self.pools = pools;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    fn abort_switch(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_pools_and_weights_beyond_the_host_memory_are_refused_before_allocation() {
        // One block of one byte next to one byte of weights fits any host; 2^62 blocks of 1 MiB
        // on 4 ranks overflow u64.
        check_host_room(1, 1, 1, 1).unwrap();
        let e = check_host_room(1, 1 << 62, 1 << 20, 4).unwrap_err();
        assert!(e.to_string().contains("more than 2^64 bytes"), "{e}");
        assert!(matches!(e, Error::KvExhausted(_)), "{e}");
        let e = check_host_room(1 << 62, 1, 1, 8).unwrap_err();
        assert!(e.to_string().contains("more than 2^64 bytes"), "{e}");
        assert!(matches!(e, Error::HostMemory(_)), "{e}");
        let Some(avail) = crate::backend::host_available_bytes() else {
            return;
        };
        // More than the host has: all of it and a GiB more, on one rank, in pools...
        let e = check_host_room(1, 1, avail + (1 << 30), 1).unwrap_err();
        assert!(matches!(e, Error::KvExhausted(_)), "{e}");
        assert!(e.to_string().contains("the host has"), "{e}");
        // ... in weights (a GiB more than the host over 2 ranks) ...
        let e = check_host_room(avail / 2 + (1 << 30), 1, 1, 2).unwrap_err();
        assert!(matches!(e, Error::HostMemory(_)), "{e}");
        assert!(e.to_string().contains("x 2 ranks"), "{e}");
        // ... and in the two together where each alone fits (a third of the host each, on 2
        // ranks: the pools need 2/3 of the host next to the weights' 2/3).
        let third = avail / 3;
        check_host_room(third, 1, 1, 2).unwrap();
        check_host_room(1, 1, third, 2).unwrap();
        let e = check_host_room(third, 1, third, 2).unwrap_err();
        assert!(matches!(e, Error::KvExhausted(_)), "{e}");
        assert!(e.to_string().contains("next to the weights"), "{e}");
    }
}
