//! Running per-rank switch programs on CPU ranks: one scoped thread per physical rank, each
//! touching only its own shard and pools; bytes cross ranks only through its `Comm` (a group of
//! every rank of the world, in physical-rank order). A rank that fails poisons the group, so its
//! peers stop waiting and every thread is joined.
//!
//! The weight switch is two-phase: [`exchange_weights`] (sends and receives into staging; changes
//! nothing) on every rank, then, only if every rank succeeded, [`rebuild_weights`] (local moves;
//! cannot fail). [`migrate_kv`] reads only the old pools. So a failure before the rebuild leaves
//! the old layout whole.

use super::kv::{program as kvprog, KvPlan, KvProgram, KvStats};
use super::weights::program::{exchange_all, rebuild_all, Staged, WeightProgram};
use crate::error::{Error, Result};
use crate::kv::KvPool;
use crate::model::decoder::RankWeights;
use crate::parallel::{first_cause, per_rank, Comm, CpuComm, Layout};

/// An injected failure, for tests of the failure paths: this rank fails at the start of its part.
pub type FailRank = Option<usize>;

fn injected(rank: usize, what: &str) -> Error {
    Error::Rank {
        rank,
        msg: format!("injected failure in {what}"),
    }
}

fn check_world(n: usize, comms: &[CpuComm], what: &str) -> Result<()> {
    if comms.len() != n || comms.iter().any(|c| c.size() != n) {
        return Err(Error::Internal(format!(
            "{what}: {n} ranks but a group of {} handles",
            comms.len()
        )));
    }
    Ok(())
}

/// Phase 1 of a weight switch on every rank at once: returns each rank's staged rows (per role,
/// per layer). Nothing in `ranks` changes.
pub fn exchange_weights(
    progs: &[WeightProgram],
    ranks: &[RankWeights],
    comms: &[CpuComm],
    fail: FailRank,
) -> Result<Vec<Vec<Vec<Staged>>>> {
    let n = ranks.len();
    check_world(n, comms, "weight exchange")?;
    if progs.len() != n {
        return Err(Error::Internal(format!(
            "{} programs for {n} ranks",
            progs.len()
        )));
    }
    per_rank(n, "weight exchange", |p| {
        let comm = &comms[p];
        let r = if fail == Some(p) {
            Err(injected(p, "the weight exchange"))
        } else {
            exchange_all(&progs[p], &ranks[p], comm)
        };
        if r.is_err() {
            comm.poison();
        }
        r
    })
}

/// Phase 2: every rank rebuilds its shard from its old buffers and its staging, one thread per
/// rank, and takes its place in `new`.
pub fn rebuild_weights(
    progs: &[WeightProgram],
    new: &Layout,
    ranks: &mut [RankWeights],
    staged: Vec<Vec<Vec<Staged>>>,
) {
    std::thread::scope(|s| {
        for ((p, w), st) in ranks.iter_mut().enumerate().zip(staged) {
            let prog = &progs[p];
            s.spawn(move || {
                rebuild_all(prog, w, &st);
                w.tp = new.tp;
                w.tp_rank = new.position(p).1;
            });
        }
    });
}

/// A KV migration on every rank at once: rank p reads `old[p]` and writes `new[p]`.
pub fn migrate_kv(
    plan: &KvPlan,
    progs: &[KvProgram],
    old: &[KvPool],
    new: &mut [KvPool],
    comms: &[CpuComm],
    fail: FailRank,
) -> Result<KvStats> {
    let n = old.len();
    check_world(n, comms, "KV migration")?;
    if new.len() != n || progs.len() != n {
        return Err(Error::Layout(format!(
            "KV migration: {n} old pools, {} new pools, {} programs",
            new.len(),
            progs.len()
        )));
    }
    let results: Vec<Result<KvStats>> = std::thread::scope(|s| {
        let hs: Vec<_> = new
            .iter_mut()
            .enumerate()
            .map(|(p, dst)| {
                let (comm, src, prog) = (&comms[p], &old[p], &progs[p]);
                s.spawn(move || {
                    let r = if fail == Some(p) {
                        Err(injected(p, "the KV migration"))
                    } else {
                        kvprog::execute_rank(plan, prog, src, dst, comm)
                    };
                    if r.is_err() {
                        comm.poison();
                    }
                    r
                })
            })
            .collect();
        hs.into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Rank {
                        rank,
                        msg: "KV migration thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut total = KvStats::default();
    for st in first_cause(results)? {
        total.bytes_cross_rank += st.bytes_cross_rank;
        total.bytes_in_place += st.bytes_in_place;
        total.pieces += st.pieces;
        total.peak_staging_bytes = total.peak_staging_bytes.max(st.peak_staging_bytes);
    }
    Ok(total)
}

/// A fresh group of every rank of a `world` (for callers without an engine's group cache).
pub fn world_group(world: usize) -> Vec<CpuComm> {
    crate::parallel::GroupCache::default().get(&(0..world).collect::<Vec<_>>())
}
