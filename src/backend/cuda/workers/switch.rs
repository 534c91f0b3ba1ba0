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
    /// Grows every rank's KV pool to `blocks` blocks, keeping blocks `[0, used)` (after a switch,
    /// into the weight bytes it freed); returns the blocks every rank now holds. On error each
    /// rank keeps a pool of at least its old blocks, those intact, and the first rank's cause is
    /// returned.
    pub fn grow_kv(&mut self, blocks: usize, used: usize) -> Result<usize> {
        let grown = self.all(|_, reply| Job::GrowKv {
            blocks,
            used,
            reply,
        })?;
        let mut least = usize::MAX;
        let mut first = None;
        for (rank, g) in grown.into_iter().enumerate() {
            if let Some(u) = self.uploaded.get_mut(rank) {
                u.kv_bytes = g.kv_bytes;
            }
            least = least.min(g.blocks);
            if let (None, Some(e)) = (&first, g.error) {
                first = Some(Error::Rank {
                    rank,
                    msg: e.to_string(),
                });
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(least),
        }
    }

    /// Every rank's shard and KV pool as f32 host copies, rank order (all ranks at once).
    pub fn download(&self) -> Result<Vec<(RankWeights, KvPool)>> {
        let hosts = self.all(|_, reply| Job::Download { reply })?;
        Ok(hosts.into_iter().map(|h| (*h.weights, *h.kv)).collect())
    }

    /// Makes every rank again from host copies (`ranks[r]` for physical rank r) as the ranks of
    /// `layout`, then gives every replica its group (cached from an earlier visit to the same
    /// replica, else made and cached: `group_counts`). Each rank's old buffers are freed before
    /// its new ones are allocated. On error the ranks are in no usable layout: the caller
    /// restores them (again with `replace`) or gives up on them.
    pub fn replace(&mut self, layout: &Layout, ranks: Vec<(RankWeights, KvPool)>) -> Result<()> {
        if layout.world != self.workers.len() {
            return Err(Error::Layout(format!(
                "replace: a layout of world {} for {} GPU ranks",
                layout.world,
                self.workers.len()
            )));
        }
        let group_kinds = self.group_kinds_for(layout)?;
        let uploaded = self.all_with(ranks, |_, (w, kv), reply| Job::Replace {
            rank: HostRank {
                weights: Box::new(w),
                kv: Box::new(kv),
            },
            reply,
        })?;
        self.uploaded = uploaded;
        self.layout = layout.clone();
        self.group_kinds = group_kinds;
        self.broken = None;
        self.group_all(layout)
    }

    /// The layout the ranks hold now.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Marks the ranks unusable (every later step errors with `why`).
    pub fn set_broken(&mut self, why: String) {
        self.broken = Some(why);
    }

    /// Why the ranks are unusable, if they are.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Errors unless every replica of `layout` can form a device group on these ranks' GPUs.
    pub fn check_groups(&self, layout: &Layout) -> Result<()> {
        self.group_kinds_for(layout).map(|_| ())
    }

    /// A switch on the devices, phase 1: the world group (made once) and `new`'s replica groups
    /// (made and cached, not used yet), then every rank's new KV pool. `fault`: this rank fails.
    pub fn switch_begin(
        &mut self,
        plan: Arc<SwitchPrograms>,
        new: &Layout,
        fault: Option<usize>,
    ) -> Result<()> {
        if let Some(why) = &self.broken {
            return Err(Error::Device(format!(
                "the GPU ranks are unusable after an earlier failure: {why}"
            )));
        }
        let t = Instant::now();
        self.ensure_world()?;
        self.new_cached = Some(self.prepare_groups(new)?);
        self.groups.last_ms = t.elapsed().as_secs_f64() * 1e3;
        let kp = &plan.kv_plan;
        let heads = kp.num_kv_heads / plan.new_tp.max(1);
        let pool = 2 * kp.num_layers * plan.new_blocks * heads * plan.block_size * kp.head_dim;
        let elem = self.dtype.size();
        self.check_room("its new KV pool", |_| pool * elem)?;
        self.all(|rank, reply| Job::SwitchBegin {
            plan: plan.clone(),
            fail: fault == Some(rank),
            reply,
        })?;
        Ok(())
    }

    /// Phase 2: every rank stages (checks, message buffers, the KV that stays copied into the
    /// new pool; no communication), and
    /// only when all have, every rank exchanges through the world group. A failed exchange
    /// poisons the world group, which the next switch makes again. An injected `fault` fails
    /// that rank's KV scatter, between the KV and the weight exchanges: the hardest place, since
    /// its peers are mid-protocol (a failure at stage returns before any exchange).
    /// The KV time reported counts the stage (copies within a rank) and the KV exchange with its
    /// copies or scatters; the weight time, the rows' exchange.
    pub fn switch_apply(&mut self, fault: Option<usize>) -> Result<DeviceApplied> {
        let t = Instant::now();
        let peaks = self.all(|_, reply| Job::SwitchStage { reply })?;
        let stage_ms = t.elapsed().as_secs_f64() * 1e3;
        let stats = self.all(|rank, reply| Job::SwitchExchange {
            fail: fault == Some(rank),
            reply,
        });
        let stats = stats.inspect_err(|_| self.world_group = false)?;
        let mut out = DeviceApplied::default();
        for s in &stats {
            out.kv.bytes_cross_rank += s.kv.bytes_cross_rank;
            out.kv.bytes_in_place += s.kv.bytes_in_place;
            out.kv.pieces += s.kv.pieces;
            out.memory_bytes += s.memory_bytes;
            out.kv_ms = out.kv_ms.max(s.kv_ms);
            out.weight_ms = out.weight_ms.max(s.weight_ms);
        }
        out.kv_ms += stage_ms;
        out.kv.peak_staging_bytes = peaks.into_iter().max().unwrap_or(0);
        Ok(out)
    }

    /// Phase 3: every rank builds its new shard (fallible, the old one untouched), and only
    /// when all have, every rank swaps to the new buffers and pool; then `new`'s groups go into
    /// use. A failure after the first swap (a rank's worker died) leaves the ranks unusable.
    pub fn switch_commit(
        &mut self,
        plan: &SwitchPrograms,
        new: &Layout,
        fault: Option<usize>,
    ) -> Result<()> {
        let elem = self.dtype.size();
        self.check_room("its new weight shard", |r| {
            let wp = &plan.weights[r];
            let rows: usize = wp.roles.iter().map(|rp| rp.repeats * rp.new_rows).sum();
            rows * wp.hidden * elem
        })?;
        self.all(|rank, reply| Job::SwitchBuild {
            fail: fault == Some(rank),
            reply,
        })?;
        let group_kinds = self.group_kinds_for(new)?;
        let uploaded = self
            .all(|_, reply| Job::SwitchSwap { reply })
            .map_err(|e| {
                let why = format!("a switch failed mid-swap: {e}");
                self.broken = Some(why.clone());
                Error::Device(format!("{why}; the GPU ranks are unusable"))
            })?;
        self.uploaded = uploaded;
        self.layout = new.clone();
        self.group_kinds = group_kinds;
        let t = Instant::now();
        let cached = self.new_cached.take().unwrap_or_default();
        self.activate_all(new, &cached).map_err(|e| {
            let why = format!("the switch swapped every rank but its groups failed: {e}");
            self.broken = Some(why.clone());
            Error::Device(format!("{why}; the GPU ranks are unusable"))
        })?;
        self.groups.last_ms += t.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    /// Errors, naming the sizes, unless every GPU can hold what its ranks are about to allocate
    /// at once (`need(rank)` bytes each) in the memory an allocation can get now.
    fn check_room(&self, what: &str, need: impl Fn(usize) -> usize) -> Result<()> {
        let free = self.free_bytes()?;
        let mut ords = self.devices.clone();
        ords.sort_unstable();
        ords.dedup();
        for o in ords {
            let ranks: Vec<usize> = (0..self.devices.len())
                .filter(|&r| self.devices[r] == o)
                .collect();
            let total: usize = ranks.iter().map(|&r| need(r)).sum();
            let avail = ranks.first().map_or(0, |&r| free[r]);
            if total > avail {
                let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                return Err(Error::KvExhausted(format!(
                    "a switch on the devices: each rank on GPU {o} needs {what} next to its current \
                     layout, {:.2} GiB for its {} rank(s), but {:.2} GiB can be allocated (lower \
                     `kv_blocks`, or switch through the host with --gpu-switch host); still \
                     decoding at the old layout",
                    gib(total),
                    ranks.len(),
                    gib(avail)
                )));
            }
        }
        Ok(())
    }

    /// Drops whatever the switch made on every rank; the current layout keeps decoding.
    pub fn switch_abort(&mut self) {
        self.new_cached = None;
        let _ = self.all(|_, reply| Job::SwitchAbort { reply });
    }
}
