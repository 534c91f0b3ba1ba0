//! A [`WeightPlan`] lowered to one program per physical rank: what that rank does with its own
//! buffers, and the messages it exchanges. Programs are data (printable, counted, and exported
//! through the C ABI); [`exchange`] and [`rebuild_all`] execute one on the CPU.
//!
//! For every role and layer, a rank's program runs in two phases:
//!
//! 1. **Exchange** (fallible, changes nothing): every [`Step::Send`] reads rows of the rank's old
//!    buffer and sends them; every [`Step::Recv`] receives rows into a staging buffer. Sends come
//!    first and are buffered, so no rank waits on a peer that is itself waiting.
//! 2. **Rebuild** (after every rank's exchange succeeded; cannot fail): the [`Step::Move`]s in
//!    their listed order, then the received rows and the [`Step::Zero`]s. With `in_place` the
//!    moves compact the old buffer (every move goes down, in increasing destination order, so no
//!    row is overwritten before it is read); otherwise a fresh buffer is built and the old one
//!    dropped.
//!
//! Messages between two ranks are sent and received in the same order (the receiver's
//! destination-row order), which is what a FIFO channel, a same-device copy queue or NCCL's
//! grouped send/recv needs.

use super::{Op, WeightPlan};
use crate::error::{Error, Result};
use crate::model::decoder::RankWeights;
use crate::parallel::shard::Role;
use crate::parallel::Comm;

/// One step of a rank's program for one role (rows of `hidden` elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send rows [src_row, src_row + rows) of this rank's old buffer to rank `to`.
    Send {
        to: usize,
        src_row: usize,
        rows: usize,
    },
    /// Receive `rows` rows from rank `from` into new rows [dst_row, dst_row + rows).
    Recv {
        from: usize,
        dst_row: usize,
        rows: usize,
    },
    /// Move this rank's own rows [src_row, ..) to new rows [dst_row, ..).
    Move {
        src_row: usize,
        dst_row: usize,
        rows: usize,
    },
    /// Zero new rows [dst_row, dst_row + rows) (vocab padding).
    Zero { dst_row: usize, rows: usize },
}

/// What one rank does for one role, in every one of its `repeats` layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleProgram {
    pub role: Role,
    pub repeats: usize,
    pub old_rows: usize,
    pub new_rows: usize,
    /// Compact the old buffer in place (the buffer does not grow and every move goes down).
    pub in_place: bool,
    /// Sends (in message order per peer), then moves (in execution order), then receives (in
    /// message order per peer) and zeros.
    pub steps: Vec<Step>,
}

/// One physical rank's whole weight reshard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightProgram {
    pub rank: usize,
    pub hidden: usize,
    pub elem_bytes: u64,
    pub roles: Vec<RoleProgram>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Rows kept from the rank's own buffer (moved or left where they are).
    pub bytes_in_place: u64,
    pub bytes_zeroed: u64,
    /// Most extra memory at once: every received row (staged until all ranks exchanged) plus the
    /// largest fresh buffer when a role is not rebuilt in place.
    pub peak_extra_bytes: u64,
}

impl WeightProgram {
    /// Bytes read plus written to build every re-sharded buffer anew from the old one and the
    /// rows received (how GPU ranks commit a switch; the CPU compacts in place instead): each
    /// moved or received row read once and written once, each zero row written once.
    pub fn rebuild_bytes(&self) -> u64 {
        let rows: usize = (self.roles.iter())
            .map(|rp| {
                let per: usize = (rp.steps.iter())
                    .map(|s| match *s {
                        Step::Move { rows, .. } | Step::Recv { rows, .. } => 2 * rows,
                        Step::Zero { rows, .. } => rows,
                        Step::Send { .. } => 0,
                    })
                    .sum();
                rp.repeats * per
            })
            .sum();
        (rows * self.hidden) as u64 * self.elem_bytes
    }
}

/// Lowers `plan` to one program per physical rank (index = rank).
pub fn programs(plan: &WeightPlan) -> Vec<WeightProgram> {
    let world = plan.old.world;
    let (h, eb) = (plan.hidden as u64, plan.elem_bytes);
    let mut out: Vec<WeightProgram> = (0..world)
        .map(|rank| WeightProgram {
            rank,
            hidden: plan.hidden,
            elem_bytes: eb,
            roles: Vec::new(),
            bytes_sent: 0,
            bytes_received: 0,
            bytes_in_place: 0,
            bytes_zeroed: 0,
            peak_extra_bytes: 0,
        })
        .collect();
    // Largest fresh (not in place) buffer per rank.
    let mut fresh = vec![0u64; world];
    for ro in &plan.ops {
        let reps = ro.repeats as u64;
        for (me, prog) in out.iter_mut().enumerate() {
            let mine = &ro.ranks[me];
            let mut steps = Vec::new();
            // Sends, in each receiver's destination-row order.
            for dst in &ro.ranks {
                for op in &dst.ops {
                    if let Op::Copy {
                        src_rank,
                        src_row,
                        rows,
                        ..
                    } = *op
                    {
                        if src_rank == me && dst.rank != me {
                            steps.push(Step::Send {
                                to: dst.rank,
                                src_row,
                                rows,
                            });
                        }
                    }
                }
            }
            let (mut moves, mut fills) = (Vec::new(), Vec::new());
            let (mut recv_rows, mut zero_rows, mut own_rows) = (0u64, 0u64, 0u64);
            for op in &mine.ops {
                match *op {
                    Op::Copy {
                        src_rank,
                        src_row,
                        dst_row,
                        rows,
                    } if src_rank == me => {
                        own_rows += rows as u64;
                        moves.push(Step::Move {
                            src_row,
                            dst_row,
                            rows,
                        });
                    }
                    Op::Copy {
                        src_rank,
                        dst_row,
                        rows,
                        ..
                    } => {
                        recv_rows += rows as u64;
                        fills.push(Step::Recv {
                            from: src_rank,
                            dst_row,
                            rows,
                        });
                    }
                    Op::Zero { dst_row, rows } => {
                        zero_rows += rows as u64;
                        fills.push(Step::Zero { dst_row, rows });
                    }
                }
            }
            let in_place = mine.new_rows <= mine.old_rows
                && moves.iter().all(|m| match *m {
                    Step::Move {
                        src_row, dst_row, ..
                    } => src_row >= dst_row,
                    _ => true,
                });
            let sent: u64 = steps
                .iter()
                .map(|s| match *s {
                    Step::Send { rows, .. } => rows as u64,
                    _ => 0,
                })
                .sum();
            steps.extend(moves);
            steps.extend(fills);
            let layer_recv = recv_rows * h * eb;
            if !in_place {
                fresh[me] = fresh[me].max(mine.new_rows as u64 * h * eb);
            }
            prog.bytes_sent += reps * sent * h * eb;
            prog.bytes_received += reps * layer_recv;
            prog.bytes_in_place += reps * own_rows * h * eb;
            prog.bytes_zeroed += reps * zero_rows * h * eb;
            prog.roles.push(RoleProgram {
                role: ro.role,
                repeats: ro.repeats,
                old_rows: mine.old_rows,
                new_rows: mine.new_rows,
                in_place,
                steps,
            });
        }
    }
    // Every layer's rows are received before any is rebuilt; then one fresh buffer at a time.
    for (p, prog) in out.iter_mut().enumerate() {
        prog.peak_extra_bytes = prog.bytes_received + fresh[p];
    }
    out
}

/// The rows a rank received for one role in one layer, in its `Recv` order.
pub type Staged = Vec<f32>;

/// Phase 1 of one role in one layer on this rank: sends rows of `old` (this rank's buffer, `rows
/// x hidden`) and receives its rows from peers. `comm` is a group of every rank of the world, in
/// physical-rank order. Changes nothing but the returned staging.
pub fn exchange(rp: &RoleProgram, hidden: usize, old: &[f32], comm: &dyn Comm) -> Result<Staged> {
    if old.len() != rp.old_rows * hidden {
        return Err(Error::Internal(format!(
            "{:?}: the buffer holds {} elements, the program expects {} rows of {hidden}",
            rp.role,
            old.len(),
            rp.old_rows
        )));
    }
    let mut staged = Vec::new();
    for st in &rp.steps {
        match *st {
            Step::Send { to, src_row, rows } => {
                let rows_in = old.get(src_row * hidden..(src_row + rows) * hidden);
                let data = rows_in.ok_or_else(|| {
                    Error::Internal(format!("{:?}: send of rows {src_row}+{rows}", rp.role))
                })?;
                comm.send(to, data)?;
            }
            Step::Recv { from, rows, .. } => {
                let at = staged.len();
                staged.resize(at + rows * hidden, 0.0);
                comm.recv(from, &mut staged[at..])?;
            }
            Step::Move { .. } | Step::Zero { .. } => {}
        }
    }
    Ok(staged)
}

/// Phase 2 of one role in one layer: builds the new buffer from the old one and the staging
/// [`exchange`] returned. Cannot fail once the program and buffer passed [`exchange`].
pub fn rebuild(rp: &RoleProgram, hidden: usize, buf: &mut Vec<f32>, staged: &[f32]) {
    let h = hidden;
    let new_len = rp.new_rows * h;
    let moves = rp.steps.iter().filter_map(|s| match *s {
        Step::Move {
            src_row,
            dst_row,
            rows,
        } => Some((src_row, dst_row, rows)),
        _ => None,
    });
    if rp.in_place {
        for (src, dst, n) in moves.filter(|m| m.0 != m.1) {
            buf.copy_within(src * h..(src + n) * h, dst * h);
        }
        fill(rp, h, buf, staged);
        buf.truncate(new_len);
        buf.shrink_to_fit();
    } else {
        let mut out = vec![0f32; new_len];
        for (src, dst, n) in moves {
            out[dst * h..(dst + n) * h].copy_from_slice(&buf[src * h..(src + n) * h]);
        }
        fill(rp, h, &mut out, staged);
        *buf = out;
    }
}

/// Writes the received rows (in `Recv` order) and the zero rows.
fn fill(rp: &RoleProgram, h: usize, buf: &mut [f32], staged: &[f32]) {
    let mut at = 0;
    for st in &rp.steps {
        match *st {
            Step::Recv { dst_row, rows, .. } => {
                buf[dst_row * h..(dst_row + rows) * h].copy_from_slice(&staged[at..at + rows * h]);
                at += rows * h;
            }
            Step::Zero { dst_row, rows } => buf[dst_row * h..(dst_row + rows) * h].fill(0.0),
            _ => {}
        }
    }
}

/// Every buffer of a shard (host or device) for one role, one per layer (or the single
/// embedding / head).
pub fn role_buffers<W>(w: &RankWeights<W>, role: Role) -> Vec<&W> {
    match role {
        Role::Embed => vec![&w.embed],
        Role::LmHead => w.lm_head.iter().collect(),
        _ => w
            .layers
            .iter()
            .map(|l| match role {
                Role::Qkv => &l.qkv,
                Role::O => &l.o,
                Role::GateUp => &l.gate_up,
                _ => &l.down,
            })
            .collect(),
    }
}

/// [`role_buffers`], mutable.
pub fn role_buffers_mut<W>(w: &mut RankWeights<W>, role: Role) -> Vec<&mut W> {
    match role {
        Role::Embed => vec![&mut w.embed],
        Role::LmHead => w.lm_head.iter_mut().collect(),
        _ => w
            .layers
            .iter_mut()
            .map(|l| match role {
                Role::Qkv => &mut l.qkv,
                Role::O => &mut l.o,
                Role::GateUp => &mut l.gate_up,
                _ => &mut l.down,
            })
            .collect(),
    }
}

/// Phase 1 for a whole host shard: every role and layer; returns the staging of each, in
/// program order. Nothing in `w` changes.
pub fn exchange_all(
    prog: &WeightProgram,
    w: &RankWeights,
    comm: &dyn Comm,
) -> Result<Vec<Vec<Staged>>> {
    let mut all = Vec::with_capacity(prog.roles.len());
    for rp in &prog.roles {
        let bufs = role_buffers(w, rp.role);
        if bufs.len() != rp.repeats {
            return Err(Error::Internal(format!(
                "{:?}: the shard has {} buffers, the program {} layers",
                rp.role,
                bufs.len(),
                rp.repeats
            )));
        }
        let mut per_layer = Vec::with_capacity(rp.repeats);
        for b in bufs {
            per_layer.push(exchange(rp, prog.hidden, b, comm)?);
        }
        all.push(per_layer);
    }
    Ok(all)
}

/// Phase 2 for a whole host shard, with the staging [`exchange_all`] returned.
pub fn rebuild_all(prog: &WeightProgram, w: &mut RankWeights, staged: &[Vec<Staged>]) {
    for (rp, st) in prog.roles.iter().zip(staged) {
        for (b, s) in role_buffers_mut(w, rp.role).into_iter().zip(st) {
            rebuild(rp, prog.hidden, b, s);
        }
    }
}
