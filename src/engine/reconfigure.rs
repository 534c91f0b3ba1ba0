//! `Engine::reconfigure`: change the tp degree between two decode steps, exactly.
//!
//! Order: validate -> nested layout -> place live sequences on new replicas (balanced by KV,
//! ties to the replica holding their cache) -> migrate-or-recompute per sequence (cost model) ->
//! size the new pools from the old pool plus the weight bytes the reshard frees -> allocate
//! new pools and tables -> migrate KV into them -> reshard weights in place -> swap -> create or
//! reuse comm groups -> recompute the sequences chosen for it. Every fallible step but the recompute
//! runs before the swap, so such an error leaves the engine decoding in its old layout with
//! nothing lost; a recompute failure (after the swap) returns the error with the new layout live
//! and the sequences it had not finished holding the KV its passes computed (none, or part),
//! so the next steps prefill the rest.

use std::time::Instant;

use super::ranks::{SwitchPhase, SwitchWork};
use super::{kv_block_bytes, Engine};
use crate::error::{Error, Result};
use crate::kv::{blocks_for, BlockAllocator};
use crate::parallel::layout::check_tp_for_model;
use crate::parallel::placement::balance_onto;
use crate::parallel::shard::weight_bytes_per_rank;
use crate::reshard::cost::{CostModel, KvMode, KvPolicy};
use crate::reshard::kv::{self as kvplan, SeqKv};
use crate::reshard::{nested_layout, weights as wplan};
use crate::text::plural;

/// What one switch did and cost (the `pat bench switch` record).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SwitchReport {
    pub from_tp: usize,
    pub to_tp: usize,
    /// Live sequences at the switch.
    pub n_inflight: usize,
    /// Cached KV tokens over the live sequences.
    pub kv_tokens: usize,
    pub kv_policy: String,
    pub n_migrated: usize,
    pub n_recomputed: usize,
    pub weight_reshard_ms: f64,
    /// Migration plus recompute.
    pub kv_ms: f64,
    pub kv_migrate_ms: f64,
    pub kv_recompute_ms: f64,
    /// Forward passes the recompute took: one, or more where the recomputed tokens' activations
    /// outgrow a step's cap ([`STEP_CAP`](super::STEP_CAP)) or the cap on a step's prompt
    /// tokens (`Engine::cap_step_tokens`); a long sequence is recomputed in chunks.
    pub kv_recompute_passes: usize,
    /// Allocating the new layout's KV pools (not part of `kv_ms`).
    pub kv_alloc_ms: f64,
    /// The commit: every rank's new shard built (CPU: compacted in place; GPU ranks switching
    /// on the devices: copied from the rows kept and received; through the host: rebuilt and
    /// uploaded with the new KV pools) and swapped in (not part of `weight_reshard_ms`, which is
    /// the rows' exchange).
    pub commit_ms: f64,
    pub comm_group_ms: f64,
    pub total_ms: f64,
    pub bytes_moved_cross_rank: u64,
    pub bytes_moved_in_place: u64,
    /// The weights' share of `bytes_moved_cross_rank` (zero when tp grows by a power of two:
    /// shards nest).
    pub weight_bytes_cross_rank: u64,
    /// Largest extra memory on one rank during the switch: the new KV pool while the old one is
    /// still held, plus the larger of KV staging and weight-reshard scratch.
    pub peak_extra_bytes: u64,
    /// Bytes the switch read plus wrote in the ranks' memory to move KV (migrated sequences)
    /// and weights (the rows' exchange and the new shards' build), counted by GPU ranks
    /// switching on the devices from the copies they launch; `None` elsewhere. Over
    /// `total_ms` it is the switch's achieved memory bandwidth, to set against the device's
    /// copy bandwidth.
    pub memory_bytes: Option<u64>,
    pub kv_blocks_per_rank_before: usize,
    pub kv_blocks_per_rank_after: usize,
    /// The blocks per rank the new pool may grow to later: the old pool plus the weight bytes
    /// the reshard frees. Above `kv_blocks_per_rank_after` where the devices could not hold
    /// them next to the old layout; the pool grows into them at the first step that needs more
    /// blocks ([`StepReport::pool_growth`](crate::engine::StepReport)).
    pub kv_blocks_per_rank_goal: usize,
    pub groups_created: usize,
    pub groups_reused: usize,
    /// Cost-model predictions for this switch's KV work.
    pub predicted_migrate_ms: f64,
    pub predicted_recompute_ms: f64,
}

impl Engine {
    /// Switches every replica to tensor-parallel degree `new_tp`, placing the live sequences by
    /// the engine's own rule (balanced by remaining KV footprint, ties staying home).
    pub fn reconfigure(
        &mut self,
        new_tp: usize,
        policy: KvPolicy,
        cost: &CostModel,
    ) -> Result<SwitchReport> {
        self.reconfigure_placed(new_tp, policy, cost, None)
    }

    /// [`Engine::reconfigure`] with the live sequences (in [`Engine::live_seqs`] order) placed on
    /// the new replicas `placement[i]` when given (the placement a policy's forecast assumed).
    pub fn reconfigure_placed(
        &mut self,
        new_tp: usize,
        policy: KvPolicy,
        cost: &CostModel,
        placement: Option<&[usize]>,
    ) -> Result<SwitchReport> {
        let t0 = Instant::now();
        let (cfg, old) = (&self.cfg, self.layout.clone());
        // The planners count bytes in the ranks' own element size (f32 on the CPU).
        let elem = self.ranks.set_ref().elem_bytes();
        if new_tp == old.tp {
            return Err(Error::Invalid(format!(
                "the engine already runs at tp {new_tp}"
            )));
        }
        check_tp_for_model(new_tp, cfg)?;
        let new = nested_layout(&old, new_tp)?;
        cost.validate()?;
        let live: Vec<usize> = (0..self.seqs.len())
            .filter(|&i| self.seqs[i].finished.is_none())
            .collect();
        if live.is_empty() {
            return Err(Error::Invalid(
                "no live sequences: there is nothing to switch".into(),
            ));
        }

        // Place live sequences: the caller's placement, else largest remaining footprint first
        // onto the least-loaded new replica, ties going to the replica that already holds the
        // sequence's old ranks.
        let mut target = vec![usize::MAX; self.seqs.len()];
        let at = match placement {
            Some(p) => {
                if p.len() != live.len() {
                    return Err(Error::Invalid(format!(
                        "placement lists {} replicas for {} live sequences",
                        p.len(),
                        live.len()
                    )));
                }
                if let Some(&d) = p.iter().find(|&&d| d >= new.dp()) {
                    return Err(Error::Invalid(format!(
                        "placement names replica {d} but tp {new_tp} has {} replicas",
                        new.dp()
                    )));
                }
                p.to_vec()
            }
            None => {
                let weights: Vec<f64> = live
                    .iter()
                    .map(|&i| self.seqs[i].footprint() as f64)
                    .collect();
                let home: Vec<usize> = live
                    .iter()
                    .map(|&i| new.position(old.rank_of(self.seqs[i].replica, 0)).0)
                    .collect();
                balance_onto(&weights, &vec![0.0; new.dp()], Some(&home))
            }
        };
        for (&i, d) in live.iter().zip(at) {
            target[i] = d;
        }

        // Migrate or recompute, per sequence with cached KV.
        let mut report = SwitchReport {
            from_tp: old.tp,
            to_tp: new_tp,
            n_inflight: live.len(),
            kv_policy: policy.to_string(),
            ..Default::default()
        };
        let mut mode = vec![None; self.seqs.len()];
        // What each rank's KV message buffers will hold (sent + received, all layers; a round of
        // layers at a time on the devices), for the pool budget.
        let mut messages = vec![0u64; old.world];
        for &i in &live {
            let s = &self.seqs[i];
            if s.cached == 0 {
                continue;
            }
            // Every KV byte is copied once (the heads per rank change, so even bytes that stay on
            // their rank are re-laid out); on the CPU both kinds go at the same memcpy rate.
            let (cross, local) =
                kvplan::seq_bytes(cfg, &old, &new, s.replica, target[i], s.cached, elem)?;
            report.kv_tokens += s.cached;
            report.predicted_migrate_ms += cost.migrate_s((cross + local) as f64) * 1e3;
            report.predicted_recompute_ms += cost.recompute_s(new_tp, s.cached) * 1e3;
            mode[i] = Some(policy.mode(cost, new_tp, s.cached, (cross + local) as f64));
            if mode[i] == Some(KvMode::Migrate) {
                kvplan::seq_messages(
                    cfg,
                    &old,
                    &new,
                    (s.replica, target[i]),
                    s.cached,
                    elem,
                    &mut messages,
                )?;
            }
        }

        // New pools: the old pool's bytes plus what the weight reshard frees (or minus what it
        // takes), as far as the backend can hold them next to the old layout
        // (`new_pool_room`); what it cannot hold yet the pools may grow into after the swap.
        let bs = self.opts.block_size;
        let block_bytes = kv_block_bytes(cfg, new_tp, bs, elem as usize);
        let (old_w, new_w) = (
            weight_bytes_per_rank(cfg, old.tp, elem as usize),
            weight_bytes_per_rank(cfg, new_tp, elem as usize),
        );
        // The old pool counts at its goal where an earlier switch left it short of that.
        let old_pool = (self.ranks.set_ref().rank_bytes(0).1 as u64).max(
            kv_block_bytes(cfg, old.tp, bs, elem as usize).saturating_mul(self.pool_goal as u64),
        );
        let grown = (old_pool + old_w).saturating_sub(new_w);
        let room = self.ranks.set_ref().new_pool_room(
            old_w,
            new_w,
            &kvplan::batch::round_messages(&messages, cfg.num_layers),
        )?;
        let budget = room.map_or(grown, |r| r.min(grown));
        let new_blocks =
            ((budget / block_bytes) as usize).min(self.switch_pool_cap.unwrap_or(usize::MAX));
        let mut allocs: Vec<BlockAllocator> = (0..new.dp())
            .map(|_| BlockAllocator::new(new_blocks))
            .collect();
        let mut tables = vec![Vec::new(); self.seqs.len()];
        for &i in &live {
            let n = blocks_for(self.seqs[i].cached, bs);
            tables[i] = allocs[target[i]].alloc(n).map_err(|_| {
                Error::KvExhausted(format!(
                    "at tp {new_tp} a rank's pool holds {} (its old pool plus the weight bytes the reshard frees, as far as the devices hold them) and replica {} cannot fit the live sequences; still decoding at tp {}",
                    plural(new_blocks, "block"), target[i], old.tp
                ))
            })?;
        }

        // The cached KV fits; the scheduler's invariant must hold too: the running sequences of
        // each new replica may all grow to their whole footprint (prompt + max_new_tokens) in
        // its pool, so no later step runs out of blocks. A shrink that breaks it is refused now,
        // while the old layout can go on, rather than failing a step later.
        let mut owed = vec![0usize; new.dp()];
        for &i in &live {
            let s = &self.seqs[i];
            if s.cached > 0 || !s.table.is_empty() {
                owed[target[i]] += blocks_for(s.footprint(), bs);
            }
        }
        if let Some(r) = (0..new.dp()).find(|&r| owed[r] > new_blocks) {
            return Err(Error::KvExhausted(format!(
                "at tp {new_tp} a rank's pool holds {} (its old pool plus the weight bytes the reshard frees, as far as the devices hold them) but the running sequences placed on replica {r} may grow to {} blocks (prompt + max_new_tokens); still decoding at tp {}",
                plural(new_blocks, "block"), owed[r], old.tp
            )));
        }
        // A waiting request must fit a whole pool, at least once the pools grow to their goal,
        // or it could never run.
        let goal_blocks = grown / block_bytes;
        if let Some(&i) = live.iter().find(|&&i| {
            let s = &self.seqs[i];
            s.cached == 0
                && s.table.is_empty()
                && blocks_for(s.footprint(), bs) as u64 > goal_blocks
        }) {
            return Err(Error::KvExhausted(format!(
                "at tp {new_tp} a rank's pool holds at most {} (its old pool plus the weight bytes the reshard frees) but waiting request {i} needs {} (prompt + max_new_tokens); still decoding at tp {}",
                plural(goal_blocks, "block"),
                blocks_for(self.seqs[i].footprint(), bs),
                old.tp
            )));
        }

        // Plans and per-rank programs: pure data, before anything moves.
        let migrated: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&i| mode[i] == Some(KvMode::Migrate))
            .collect();
        let seq_kv: Vec<SeqKv> = migrated
            .iter()
            .map(|&i| {
                let s = &self.seqs[i];
                SeqKv {
                    old_replica: s.replica,
                    new_replica: target[i],
                    len: s.cached,
                    old_table: s.table.clone(),
                    new_table: tables[i].clone(),
                }
            })
            .collect();
        let kp = kvplan::plan(cfg, &old, &new, bs, &seq_kv, elem)?;
        let wp = wplan::plan(cfg, &old, &new, elem)?;
        let (kv_progs, w_progs) = (
            kvplan::program::programs(&kp),
            wplan::program::programs(&wp),
        );
        let work = SwitchWork {
            cfg,
            new: &new,
            weights: &w_progs,
            kv_plan: &kp,
            kv: &kv_progs,
            new_blocks,
            block_size: bs,
        };
        let fault = |phase: SwitchPhase| self.fault.filter(|f| f.phase == phase).map(|f| f.rank);
        let (f_begin, f_apply, f_commit) = (
            fault(SwitchPhase::Begin),
            fault(SwitchPhase::Apply),
            fault(SwitchPhase::Commit),
        );

        // Begin, apply, commit on every rank; any failure before the commit's rebuild aborts
        // and leaves the old layout decoding. Groups (the world group the programs exchange
        // through, then the new replicas') come from the cache and are counted.
        let (c0, r0) = (self.groups.created, self.groups.reused);
        let ranks = self.ranks.set();
        let device0 = ranks.device_groups();
        report.kv_alloc_ms = ranks.begin_switch(&work, f_begin)?;
        let done = match ranks.apply_switch(&work, &mut self.groups, f_apply) {
            Ok(d) => d,
            Err(e) => {
                ranks.abort_switch();
                return Err(e.context(format!(
                    "switch to tp {new_tp} aborted, still at tp {}",
                    old.tp
                )));
            }
        };
        report.commit_ms = match ranks.commit_switch(&work, f_commit) {
            Ok(ms) => ms,
            Err(e) => {
                ranks.abort_switch();
                let at = match ranks.unusable() {
                    Some(_) => {
                        format!(
                            "switch to tp {new_tp} failed after the swap; the ranks are unusable"
                        )
                    }
                    None => format!("switch to tp {new_tp} aborted, still at tp {}", old.tp),
                };
                return Err(e.context(at));
            }
        };
        report.kv_migrate_ms = done.kv_migrate_ms;
        report.weight_reshard_ms = done.weight_ms;
        let ks = done.kv;
        let w_recv: u64 = w_progs.iter().map(|p| p.bytes_received).sum();
        let w_local: u64 = w_progs.iter().map(|p| p.bytes_in_place).sum();
        let w_peak = done.weight_peak_bytes.unwrap_or_else(|| {
            w_progs
                .iter()
                .map(|p| p.peak_extra_bytes)
                .max()
                .unwrap_or(0)
        });

        // Swap: nothing below can fail until the recompute.
        report.kv_blocks_per_rank_before = self.opts.kv_blocks;
        report.kv_blocks_per_rank_after = new_blocks;
        report.peak_extra_bytes = done.new_pool_bytes + ks.peak_staging_bytes.max(w_peak);
        report.memory_bytes = done.memory_bytes;
        report.bytes_moved_cross_rank = ks.bytes_cross_rank + w_recv;
        report.bytes_moved_in_place = ks.bytes_in_place + w_local;
        report.weight_bytes_cross_rank = w_recv;
        self.allocs = allocs;
        self.layout = new;
        self.opts.tp = new_tp;
        self.opts.kv_blocks = new_blocks;
        self.pool_goal = usize::try_from(goal_blocks)
            .unwrap_or(u32::MAX as usize)
            .clamp(new_blocks, u32::MAX as usize);
        report.kv_blocks_per_rank_goal = self.pool_goal;
        self.grow_tried = false;
        // Each recomputed sequence with the tokens its KV held: what the recompute feeds again.
        let mut recompute: Vec<(usize, usize)> = Vec::new();
        for &i in &live {
            let s = &mut self.seqs[i];
            s.replica = target[i];
            s.table = std::mem::take(&mut tables[i]);
            if mode[i] == Some(KvMode::Recompute) {
                recompute.push((i, s.cached));
                s.cached = 0;
            }
        }
        report.n_migrated = migrated.len();
        report.n_recomputed = recompute.len();

        match (device0, self.ranks.set_ref().device_groups()) {
            // GPU ranks: the switch made or reused every replica's device group and, on the
            // devices, the world group (through the host, the staging's CPU world group is an
            // implementation detail and not counted).
            (Some(g0), Some(g1)) => {
                report.groups_created = g1.created - g0.created;
                report.groups_reused = g1.reused - g0.reused;
                report.comm_group_ms = g1.last_ms;
            }
            _ => {
                let tg = Instant::now();
                for d in 0..self.layout.dp() {
                    let _ = self.groups.get(self.layout.replica_ranks(d));
                }
                report.groups_created = self.groups.created - c0;
                report.groups_reused = self.groups.reused - r0;
                report.comm_group_ms = tg.elapsed().as_secs_f64() * 1e3;
            }
        }

        // Recompute: prefill again what each sequence's KV held (everything but its last
        // sampled token, or the chunks of a prompt fed so far) under the new layout, in passes
        // that each fit a step's cap, the cap read again for the new shards and pools. A pass
        // takes, in request order, what fits of each sequence (the rest of a long one waits
        // for the next pass, in chunks); the first of a pass takes at least one token.
        let fail = fault(SwitchPhase::Recompute);
        self.refresh_step_cap_or_least();
        let tr = Instant::now();
        let mut rest = recompute;
        rest.sort_unstable();
        while !rest.is_empty() {
            let mut room = self.step_room();
            let mut per_replica = vec![Vec::new(); self.layout.dp()];
            for &(i, goal) in &rest {
                let s = &self.seqs[i];
                let n = room.take(s.replica, goal - s.cached);
                if n > 0 {
                    per_replica[s.replica].push((i, s.cached + n));
                }
            }
            self.forward_replicas_failing(&per_replica, fail)
                .map_err(|e| {
                    e.context(format!(
                        "switched to tp {new_tp}, but recomputing the KV of {} failed; the next steps prefill them again",
                        plural(rest.len(), "sequence")
                    ))
                })?;
            for &(i, upto) in per_replica.iter().flatten() {
                self.seqs[i].cached = upto;
            }
            report.kv_recompute_passes += 1;
            rest.retain(|&(i, goal)| self.seqs[i].cached < goal);
        }
        report.kv_recompute_ms = tr.elapsed().as_secs_f64() * 1e3;
        report.kv_ms = report.kv_migrate_ms + report.kv_recompute_ms;
        report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(report)
    }
}
