//! A live switch's side of the GPU ranks, two ways (see `engine::ranks::gpu`):
//!
//! - on the devices (`switch_begin` .. `switch_commit`): each rank runs its per-rank programs on
//!   its own buffers with the `reshard.cu` kernels (`rank::switch`), bytes crossing ranks through
//!   a world device group (made once, reused);
//! - through the host (`download`, `replace`): host copies of every rank, every rank made again
//!   from host copies in the new layout.

use std::time::Instant;

use super::*;
use crate::backend::DeviceApplied;

impl GpuRanks {
    /// Every rank's shard and KV pool as f32 host copies, rank order (all ranks at once).
    pub fn download(&self) -> Result<Vec<(RankWeights, KvPool)>> {
        let hosts = self.all(|_, reply| Job::Download { reply })?;
        Ok(hosts.into_iter().map(|h| (*h.weights, *h.kv)).collect())
    }

    /// Makes every rank again from host copies (`ranks[r]` for physical rank r) as the ranks of
    /// a layout of `tp`, then gives every replica its group (cached from an earlier visit to this
    /// tp, else made and cached: `group_counts`). Each rank's old buffers are
    /// freed before its new ones are allocated. On error the ranks are in no usable layout: the
    /// caller restores them (again with `replace`) or gives up on them.
    pub fn replace(&mut self, tp: usize, ranks: Vec<(RankWeights, KvPool)>) -> Result<()> {
        let layout = Layout::new(self.workers.len(), tp)?;
        let group_kinds = self.group_kinds_for(&layout)?;
        let uploaded = self.all_with(ranks, |_, (w, kv), reply| Job::Replace {
            rank: HostRank {
                weights: Box::new(w),
                kv: Box::new(kv),
            },
            reply,
        })?;
        self.uploaded = uploaded;
        self.tp = tp;
        self.group_kinds = group_kinds;
        self.broken = None;
        self.group_all(&layout)
    }

    /// Marks the ranks unusable (every later step errors with `why`).
    pub fn set_broken(&mut self, why: String) {
        self.broken = Some(why);
    }

    /// A switch on the devices, phase 1: the world group (made once) and `new`'s replica groups
    /// (made and cached, not used yet), then every rank's new KV pool. `fault`: this rank fails.
    pub fn switch_begin(
        &mut self,
        plan: Arc<SwitchPrograms>,
        new: &Layout,
        fault: Option<usize>,
    ) -> Result<()> {
        let t = Instant::now();
        self.ensure_world()?;
        self.new_cached = Some(self.prepare_groups(new)?);
        self.groups.last_ms = t.elapsed().as_secs_f64() * 1e3;
        self.all(|rank, reply| Job::SwitchBegin {
            plan: plan.clone(),
            fail: fault == Some(rank),
            reply,
        })?;
        Ok(())
    }

    /// Phase 2: every rank stages (checks, message buffers, KV gathers; no communication), and
    /// only when all have, every rank exchanges through the world group. A failed exchange
    /// poisons the world group, which the next switch makes again.
    pub fn switch_apply(&mut self, fault: Option<usize>) -> Result<DeviceApplied> {
        let peaks = self.all(|rank, reply| Job::SwitchStage {
            fail: fault == Some(rank),
            reply,
        })?;
        let stats = self.all(|_, reply| Job::SwitchExchange { reply });
        let stats = stats.inspect_err(|_| self.world_group = false)?;
        let mut out = DeviceApplied::default();
        for s in &stats {
            out.kv.bytes_cross_rank += s.kv.bytes_cross_rank;
            out.kv.bytes_in_place += s.kv.bytes_in_place;
            out.kv.pieces += s.kv.pieces;
            out.kv_ms = out.kv_ms.max(s.kv_ms);
            out.weight_ms = out.weight_ms.max(s.weight_ms);
        }
        out.kv.peak_staging_bytes = peaks.into_iter().max().unwrap_or(0);
        Ok(out)
    }

    /// Phase 3: every rank builds its new shard (fallible, the old one untouched), and only
    /// when all have, every rank swaps to the new buffers and pool; then `new`'s groups go into
    /// use. A failure after the first swap (a rank's worker died) leaves the ranks unusable.
    pub fn switch_commit(&mut self, new: &Layout, fault: Option<usize>) -> Result<()> {
        self.all(|rank, reply| Job::SwitchBuild {
            fail: fault == Some(rank),
            reply,
        })?;
        let group_kinds = self.group_kinds_for(new)?;
        let uploaded = self
            .all(|_, reply| Job::SwitchSwap { reply })
            .inspect_err(|e| self.broken = Some(format!("a switch failed mid-swap: {e}")))?;
        self.uploaded = uploaded;
        self.tp = new.tp;
        self.group_kinds = group_kinds;
        let t = Instant::now();
        let cached = self.new_cached.take().unwrap_or(false);
        self.activate_all(new, cached)
            .inspect_err(|e| self.broken = Some(format!("no groups after a switch: {e}")))?;
        self.groups.last_ms += t.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    /// Drops whatever the switch made on every rank; the current layout keeps decoding.
    pub fn switch_abort(&mut self) {
        self.new_cached = None;
        let _ = self.all(|_, reply| Job::SwitchAbort { reply });
    }
}
