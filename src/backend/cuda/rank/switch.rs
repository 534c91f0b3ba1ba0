//! A live TP switch on one GPU rank, on its device: the rank's part of the switch's per-rank
//! programs (`reshard::weights::program`, `reshard::kv::program`) run with the `reshard.cu`
//! kernels; bytes cross ranks only through a world group's [`DeviceComm`] (`exchange`, or
//! `share` where the ranks share a GPU).
//!
//! Phases (each a job of the rank's worker; the engine runs a phase on every rank before the
//! next, and aborts every rank if any fails before the swap):
//! 1. [`GpuRank::switch_begin`]: the new layout's KV pool, checked against free memory.
//! 2. [`GpuRank::switch_stage`] (no communication): the programs checked against this rank's
//!    buffers, every message buffer allocated (one round of layers each, below; none where the
//!    ranks share a GPU), and each KV batch that stays on the rank copied from the old pool into
//!    the new one in one pass, a launch per layer (`kv_copy`, no scratch). A batch
//!    (`reshard::kv::batch`) is the pieces of one peer, source head and destination head, all
//!    sequences together: one launch per batch and layer, not per piece (sequence) and layer.
//!    Every rank stages before any exchanges, so a bad plan or a full device is an error on the
//!    host with no peer inside a collective (NCCL cannot be woken from one).
//! 3. [`GpuRank::switch_exchange`]: the KV batches that change rank, then one exchange of
//!    weight rows (sent straight out of the old shard, received into staging). The KV goes one
//!    of two ways:
//!    - ranks sharing a GPU (`DeviceComm::shares_memory`): each sender offers its batches in
//!      place (where its blocks lie in its old pool) and each receiver copies them into its new
//!      pool in one pass (`kv_copy`): no gather, no message, half the memory traffic;
//!    - otherwise by messages a round of layers at a time (as many layers as keep the busiest
//!      rank's messages within `batch::ROUND_BYTES`, the same round on every rank): each round
//!      gathers its layers of every batch sent (`kv_gather`), exchanges them and scatters those
//!      received into the new pool (`kv_scatter`); the message buffers are reused in stream
//!      order, so a rank holds one round of messages, not all of them.
//!
//!    A rank takes part in every exchange even when a copy, gather or scatter of its own fails,
//!    and reports that failure after, so no peer is left inside one.
//! 4. [`GpuRank::switch_build`]: every re-sharded buffer made anew: moved rows from the old
//!    buffer and received rows from staging (`strided_copy`), zero rows (vocab padding) by a
//!    memset; those steps tile the new rows, so nothing else is zeroed (nor the new KV pool).
//!    The old shard is not written, so a failure still leaves it whole.
//! 5. [`GpuRank::switch_swap`] (cannot fail): the new buffers and pool replace the old ones,
//!    which are freed in stream order.
//!
//! A KV message carries `[round layers][2 (K, V)][blocks][block_size][head_dim]` per round, in
//! the device dtype, its sequences' blocks in plan order: whole blocks, so a partly filled last
//! block carries its unused slots too (never read: attention reads a sequence's first `len`
//! positions only).

use std::time::Instant;

use super::switch_kv::{batch_ids, batch_len, kv_copy_layer, message_blocks, Message};
use super::{GpuKvPool, GpuRank};
use crate::backend::cuda::buffer::DBuf;
use crate::backend::cuda::comm::DeviceComm;
use crate::backend::cuda::ops::{self, Strided};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::reshard::kv::batch::{batches, round_layers, BatchKind};
use crate::reshard::kv::program::{check_steps, KvStep};
use crate::reshard::kv::KvStats;
use crate::reshard::weights::program::{role_buffers, role_buffers_mut, Step, WeightProgram};
use crate::reshard::SwitchPrograms;

/// One rank's switch between `begin` and `swap`.
pub struct RankSwitch {
    pub(super) new_kv: GpuKvPool,
    /// This rank's programs and the plan they came from (shared by every rank).
    pub(super) plan: std::sync::Arc<SwitchPrograms>,
    /// KV batches this rank sends, in its send order.
    pub(super) outbox: Vec<Message>,
    /// KV batches this rank receives, in its receive order.
    pub(super) inbox: Vec<Message>,
    /// Layers per exchange round (the same on every rank).
    pub(super) round: usize,
    /// The KV goes by offers read in place (`DeviceComm::share`), not messages.
    in_place: bool,
    /// Bytes of KV moved within the rank (staged already).
    local_bytes: u64,
    /// Received weight rows per role and layer (program order), `None` where none are received.
    staged: Vec<Vec<Option<DBuf>>>,
    /// The re-sharded buffers per role and layer, after `build`.
    built: Option<Vec<Vec<DBuf>>>,
}

/// What a rank's exchange did: the same record as every rank's together.
pub type ExchangeStats = crate::backend::DeviceApplied;

fn internal(rank: usize, msg: String) -> Error {
    Error::Rank { rank, msg }
}

impl GpuRank {
    /// Phase 1: the new layout's KV pool, not zeroed (every position a sequence reads is written
    /// by this switch or a later append; zeroing would cost a memset of the whole pool). The
    /// caller checked that every rank's fits.
    pub fn switch_begin(
        &self,
        cfg: &ModelConfig,
        plan: std::sync::Arc<SwitchPrograms>,
    ) -> Result<RankSwitch> {
        let heads = cfg.num_kv_heads / plan.new_tp.max(1);
        let new_kv = GpuKvPool::new(
            &self.dev,
            cfg.num_layers,
            plan.new_blocks,
            plan.block_size,
            heads,
            cfg.head_dim,
            self.dtype,
            false,
        )?;
        Ok(RankSwitch {
            new_kv,
            plan,
            outbox: Vec::new(),
            inbox: Vec::new(),
            round: 1,
            in_place: false,
            local_bytes: 0,
            staged: Vec::new(),
            built: None,
        })
    }

    /// Phase 2 (no communication): checks, allocates every message buffer (one round of layers
    /// of each batch it sends or receives; none when `in_place`: the ranks share device memory,
    /// and each receiver copies its batches straight out of its peers' old pools) and moves the
    /// KV batches that stay. Returns the bytes of KV message buffers it holds.
    pub fn switch_stage(&self, sw: &mut RankSwitch, rank: usize, in_place: bool) -> Result<u64> {
        let plans = sw.plan.clone();
        let (plan, kp, wp) = (&plans.kv_plan, &plans.kv[rank], &plans.weights[rank]);
        if kp.rank != rank || wp.rank != rank {
            return Err(internal(rank, "switch programs of another rank".into()));
        }
        let old = (self.kv.kv_heads, self.kv.num_blocks);
        check_steps(plan, kp, old, (sw.new_kv.kv_heads, sw.new_kv.num_blocks))?;
        if (plan.head_dim, plan.block_size) != (self.kv.head_dim, self.kv.block_size) {
            return Err(internal(
                rank,
                "the KV plan's geometry is not the pool's".into(),
            ));
        }
        self.check_weights(wp, rank)?;
        let es = self.dtype.size();
        let layers = plan.num_layers;
        // One layer of one block (K and V).
        let block_layer = batch_len(plan, 1, 1) * es;
        let mut held = 0u64;
        // Messages go a round of layers at a time; every rank derives the same round.
        let per_layer = (0..plans.kv.len())
            .map(|r| message_blocks(plan, &plans.kv[r]) * block_layer)
            .max()
            .unwrap_or(0);
        sw.round = round_layers(per_layer as u64, layers);
        sw.in_place = in_place;
        // Local batches are copied pool to pool without scratch: none is cut.
        for b in batches(plan, kp, usize::MAX) {
            let n = batch_len(plan, layers, b.blocks);
            let round_len = if in_place {
                0
            } else {
                batch_len(plan, sw.round, b.blocks)
            };
            // The batch's global kv head: the old pool's heads of this rank's old tp-rank (a
            // send) or the new pool's of its new one (a receive).
            let global = |head: usize, new: bool| match new {
                false => self.w.tp_rank * self.kv.kv_heads + head,
                true => plans.new_tp_ranks[rank] * sw.new_kv.kv_heads + head,
            };
            // A message of one round of this batch's layers, and its blocks in the old pool (a
            // send) or the `new` one (a receive).
            let message = |peer, head, new| -> Result<Message> {
                Ok(Message {
                    peer,
                    head,
                    ids: batch_ids(&self.dev, plan, &b, new)?,
                    blocks: b.blocks,
                    key: [
                        global(head, new) as u64,
                        b.seqs.first().map_or(0, |&s| s as u64),
                        b.seqs.len() as u64,
                    ],
                    data: (!in_place)
                        .then(|| DBuf::uninit(&self.dev, self.dtype, round_len))
                        .transpose()?,
                })
            };
            match (b.kind, b.src_head, b.dst_head) {
                (BatchKind::Send { to }, Some(h), _) => {
                    sw.outbox.push(message(to, h, false)?);
                    held += (round_len * es) as u64;
                }
                (BatchKind::Local, Some(h), Some(d)) => {
                    // Old pool to new pool in one pass, a launch per layer.
                    let src = batch_ids(&self.dev, plan, &b, false)?;
                    let dst = batch_ids(&self.dev, plan, &b, true)?;
                    for l in 0..layers {
                        kv_copy_layer(&self.dev, (&self.kv, &src, h), (&sw.new_kv, &dst, d), l)?;
                    }
                    sw.local_bytes += (n * es) as u64;
                }
                (BatchKind::Recv { from }, _, Some(d)) => {
                    sw.inbox.push(message(from, d, true)?);
                    held += (round_len * es) as u64;
                }
                _ => return Err(internal(rank, format!("malformed KV batch {b:?}"))),
            }
        }
        // Staging for the weight rows this rank receives.
        let h = wp.hidden;
        sw.staged = wp
            .roles
            .iter()
            .map(|rp| {
                let rows: usize = rp
                    .steps
                    .iter()
                    .map(|s| match *s {
                        Step::Recv { rows, .. } => rows,
                        _ => 0,
                    })
                    .sum();
                (0..rp.repeats)
                    .map(|_| {
                        (rows > 0)
                            .then(|| DBuf::uninit(&self.dev, self.dtype, rows * h))
                            .transpose()
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        self.dev.synchronize()?;
        Ok(held)
    }

    /// Errors unless `wp` fits this rank's shard: its roles' buffers, one per layer, of the
    /// program's old rows, and every step's rows inside the old or new buffer. So nothing in the
    /// exchange can fail on a bad program (with NCCL a peer could not be woken).
    fn check_weights(&self, wp: &WeightProgram, rank: usize) -> Result<()> {
        let inside =
            |at: usize, rows: usize, of: usize| at.checked_add(rows).is_some_and(|e| e <= of);
        for rp in &wp.roles {
            let bufs = role_buffers(&self.w, rp.role);
            let steps_fit = rp.steps.iter().all(|s| match *s {
                Step::Send { src_row, rows, .. } => inside(src_row, rows, rp.old_rows),
                Step::Recv { dst_row, rows, .. } | Step::Zero { dst_row, rows } => {
                    inside(dst_row, rows, rp.new_rows)
                }
                Step::Move {
                    src_row,
                    dst_row,
                    rows,
                } => inside(src_row, rows, rp.old_rows) && inside(dst_row, rows, rp.new_rows),
            });
            let ok = steps_fit
                && bufs.len() == rp.repeats
                && bufs.iter().all(|b| b.len() == rp.old_rows * wp.hidden);
            if !ok {
                return Err(internal(
                    rank,
                    format!(
                        "{:?}: the shard's buffers do not hold {} layers of {} rows of {}",
                        rp.role, rp.repeats, rp.old_rows, wp.hidden
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Phase 3: the KV exchange (offered in place and copied pool to pool where the ranks share
    /// a GPU, `kv_in_place`; else by messages round by round, `kv_rounds`) and
    /// the weight exchange, over `world` (a group of every rank, member index = physical rank).
    ///
    /// Every rank makes every exchange whatever happened to it in between: a copy, gather or
    /// scatter that fails on this rank is reported only after the weight exchange, so no peer
    /// waits in a grouped NCCL send/recv this rank never joins (only an error in an exchange
    /// itself, after which the worker poisons the group, or a device fault that stops the
    /// rank's stream, can still leave peers waiting).
    /// `fail`: an error to report as this rank's scatter failure (injected by tests).
    pub fn switch_exchange(
        &self,
        sw: &mut RankSwitch,
        world: &dyn DeviceComm,
        fail: Option<Error>,
    ) -> Result<ExchangeStats> {
        let es = self.dtype.size() as u64;
        let mut st = ExchangeStats::default();
        let t = Instant::now();
        let layers = sw.plan.kv_plan.num_layers;
        // A gather, scatter or copy that fails (or the injected failure) is reported after both
        // exchanges: every exchange still runs, so no peer waits for this rank.
        let mut failed = fail;
        if sw.in_place {
            self.kv_in_place(sw, world, &mut failed)?;
        } else {
            self.kv_rounds(sw, world, &mut failed)?;
        }
        let scattered = failed.map_or(Ok(()), Err);
        let scattered = scattered.and_then(|()| self.dev.synchronize());
        st.kv_ms = t.elapsed().as_secs_f64() * 1e3;
        let rank = world.rank();
        let kp = &sw.plan.kv[rank];
        let sent: u64 = (sw.outbox.iter())
            .map(|m| batch_len(&sw.plan.kv_plan, layers, m.blocks) as u64 * es)
            .sum();
        let got: u64 = (sw.inbox.iter())
            .map(|m| batch_len(&sw.plan.kv_plan, layers, m.blocks) as u64 * es)
            .sum();
        // Device memory traffic: the local copies (read + write); received batches copied pool
        // to pool (in place), or gathered, sent (read here, written there) and scattered.
        st.memory_bytes = 2 * sw.local_bytes
            + match sw.in_place {
                true => 2 * got,
                false => 3 * (sent + got),
            };
        let received = kp
            .steps
            .iter()
            .filter(|s| matches!(s, KvStep::Recv { .. }))
            .count();
        st.kv = KvStats {
            bytes_cross_rank: sent,
            bytes_in_place: sw.local_bytes,
            peak_staging_bytes: 0,
            pieces: kp.steps.len() - received,
        };
        // The pieces are in the new pool; their buffers go (stream ordered: after the peers'
        // reads, which the exchange made this stream wait for).
        sw.outbox.clear();
        sw.inbox.clear();

        let t = Instant::now();
        let wp = &sw.plan.weights[rank];
        let h = wp.hidden;
        let mut sends = Vec::new();
        let mut recvs = Vec::new();
        for (rp, staged) in wp.roles.iter().zip(&sw.staged) {
            for (old, stage) in role_buffers(&self.w, rp.role).into_iter().zip(staged) {
                let mut at = 0;
                for s in &rp.steps {
                    match *s {
                        Step::Send { to, src_row, rows } => {
                            sends.push((to, old.view().slice(src_row * h, rows * h)?));
                        }
                        Step::Recv { from, rows, .. } => {
                            let buf = stage.as_ref().ok_or_else(|| {
                                internal(rank, format!("{:?}: no staging", rp.role))
                            })?;
                            recvs.push((from, buf.view().slice(at, rows * h)?));
                            at += rows * h;
                        }
                        Step::Move { .. } | Step::Zero { .. } => {}
                    }
                }
            }
        }
        let exchanged = world
            .exchange(&self.dev, &sends, &recvs)
            .and_then(|()| self.dev.synchronize());
        // Each row read here when sent and written here when received.
        st.memory_bytes += (sends.iter().chain(&recvs))
            .map(|(_, v)| (v.len() * v.dtype().size()) as u64)
            .sum::<u64>();
        st.weight_ms = t.elapsed().as_secs_f64() * 1e3;
        // The first failure is the one to report.
        scattered.and(exchanged).map(|()| st)
    }

    /// Phase 4: every re-sharded buffer built anew from the old one and the staging (the old
    /// shard is only read). The caller checked that every rank's new shard fits.
    pub fn switch_build(&self, sw: &mut RankSwitch, rank: usize) -> Result<()> {
        let wp = &sw.plan.weights[rank];
        let h = wp.hidden;
        let es = self.dtype.size();
        let row = |n: usize| Strided {
            rows: 1,
            row_bytes: n * h * es,
            dst_stride: 0,
            src_stride: 0,
        };
        let mut built = Vec::with_capacity(wp.roles.len());
        for (rp, staged) in wp.roles.iter().zip(&sw.staged) {
            let mut layers = Vec::with_capacity(rp.repeats);
            for (old, stage) in role_buffers(&self.w, rp.role).into_iter().zip(staged) {
                // The steps tile the new rows exactly once (moves, receives, zero fills).
                let out = DBuf::uninit(&self.dev, self.dtype, rp.new_rows * h)?;
                let mut at = 0;
                for s in &rp.steps {
                    match *s {
                        Step::Move {
                            src_row,
                            dst_row,
                            rows,
                        } => ops::strided_copy(
                            &self.dev,
                            out.view().slice(dst_row * h, rows * h)?,
                            old.view().slice(src_row * h, rows * h)?,
                            row(rows),
                        )?,
                        Step::Recv { dst_row, rows, .. } => {
                            let buf = stage.as_ref().ok_or_else(|| {
                                internal(rank, format!("{:?}: no staging", rp.role))
                            })?;
                            ops::strided_copy(
                                &self.dev,
                                out.view().slice(dst_row * h, rows * h)?,
                                buf.view().slice(at, rows * h)?,
                                row(rows),
                            )?;
                            at += rows * h;
                        }
                        Step::Zero { dst_row, rows } => {
                            let v = out.view().slice(dst_row * h, rows * h)?;
                            // SAFETY: `v` is a live view of this rank's new buffer.
                            unsafe { self.dev.memset(v.ptr(), 0, rows * h * es)? };
                        }
                        Step::Send { .. } => {}
                    }
                }
                layers.push(out);
            }
            built.push(layers);
        }
        self.dev.synchronize()?;
        sw.built = Some(built);
        sw.staged.clear();
        Ok(())
    }

    /// Phase 5: the built buffers and the new pool replace the old ones (freed in stream order,
    /// then waited for). Errors, changing nothing, when `build` has not run; after the swap, only
    /// when the device fails.
    pub fn switch_swap(&mut self, mut sw: RankSwitch, rank: usize) -> Result<()> {
        let built = sw
            .built
            .take()
            .ok_or_else(|| internal(rank, "swap before build".into()))?;
        let wp = &sw.plan.weights[rank];
        for (rp, layers) in wp.roles.iter().zip(built) {
            for (slot, new) in role_buffers_mut(&mut self.w, rp.role)
                .into_iter()
                .zip(layers)
            {
                *slot = new;
            }
        }
        self.w.tp = sw.plan.new_tp;
        self.w.tp_rank = sw.plan.new_tp_ranks[rank];
        self.kv = sw.new_kv;
        // The old shard and pool are freed in stream order: wait for that, so the switch ends
        // with their memory back on the device (what a pool growth after it counts).
        self.dev.synchronize()
    }
}
