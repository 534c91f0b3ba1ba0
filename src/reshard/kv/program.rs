//! A [`KvPlan`] lowered to one program per physical rank, and its CPU execution: each rank reads
//! only its own old pool and writes only its own new pool; a head slice that changes rank is one
//! message (every layer, K then V) through `Comm`.
//!
//! Order on a rank: every [`KvStep::Send`] (gather from the old pool, buffered send), then every
//! [`KvStep::Local`] (gather and scatter within the rank: the new pool has another head count, so
//! even data that stays is re-laid out), then every [`KvStep::Recv`] (scatter into the new pool).
//! Between two ranks messages go in plan order (sequence, then head) on both sides. The old pools
//! are never written, so a failure anywhere leaves the old layout intact.

use super::exec::{check_blocks, check_pools, gather, scatter, KvStats};
use super::{KvPlan, SeqKv};
use crate::error::{Error, Result};
use crate::kv::{blocks_for, KvPool};
use crate::parallel::Comm;

/// One step of a rank's KV program (a piece: one kv head of one sequence, all layers, K and V).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvStep {
    /// Gather local head `src_head` of sequence `seq` from the old pool and send it to rank `to`.
    Send {
        to: usize,
        seq: usize,
        src_head: usize,
    },
    /// Gather local head `src_head` and scatter it into local head `dst_head` of the new pool.
    Local {
        seq: usize,
        src_head: usize,
        dst_head: usize,
    },
    /// Receive sequence `seq`'s slice from rank `from` into local head `dst_head` of the new pool.
    Recv {
        from: usize,
        seq: usize,
        dst_head: usize,
    },
}

impl KvStep {
    /// (sequence, head read from the old pool, head written in the new pool).
    pub fn parts(&self) -> (usize, Option<usize>, Option<usize>) {
        match *self {
            KvStep::Send { seq, src_head, .. } => (seq, Some(src_head), None),
            KvStep::Local {
                seq,
                src_head,
                dst_head,
            } => (seq, Some(src_head), Some(dst_head)),
            KvStep::Recv { seq, dst_head, .. } => (seq, None, Some(dst_head)),
        }
    }
}

/// One physical rank's part of a KV migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvProgram {
    pub rank: usize,
    pub steps: Vec<KvStep>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub bytes_in_place: u64,
    /// Largest message or staging buffer (one piece: every layer, K and V).
    pub peak_staging_bytes: u64,
}

/// Lowers `plan` to one program per physical rank (index = rank).
pub fn programs(plan: &KvPlan) -> Vec<KvProgram> {
    let mut out: Vec<KvProgram> = (0..plan.old.world)
        .map(|rank| KvProgram {
            rank,
            steps: Vec::new(),
            bytes_sent: 0,
            bytes_received: 0,
            bytes_in_place: 0,
            peak_staging_bytes: 0,
        })
        .collect();
    let (mut sends, mut locals, mut recvs) = (
        vec![Vec::new(); out.len()],
        vec![Vec::new(); out.len()],
        vec![Vec::new(); out.len()],
    );
    for pc in &plan.pieces {
        let (s, d) = (pc.src_rank, pc.dst_rank);
        if s == d {
            locals[s].push(KvStep::Local {
                seq: pc.seq,
                src_head: pc.src_head,
                dst_head: pc.dst_head,
            });
            out[s].bytes_in_place += pc.bytes;
        } else {
            sends[s].push(KvStep::Send {
                to: d,
                seq: pc.seq,
                src_head: pc.src_head,
            });
            recvs[d].push(KvStep::Recv {
                from: s,
                seq: pc.seq,
                dst_head: pc.dst_head,
            });
            out[s].bytes_sent += pc.bytes;
            out[d].bytes_received += pc.bytes;
        }
        for r in [s, d] {
            out[r].peak_staging_bytes = out[r].peak_staging_bytes.max(pc.bytes);
        }
    }
    for (p, prog) in out.iter_mut().enumerate() {
        prog.steps.append(&mut sends[p]);
        prog.steps.append(&mut locals[p]);
        prog.steps.append(&mut recvs[p]);
    }
    out
}

/// Checks this rank's pools and the tables of every sequence its program touches.
fn validate(plan: &KvPlan, prog: &KvProgram, old: &KvPool, new: &KvPool) -> Result<()> {
    let p = prog.rank;
    check_pools(plan, std::slice::from_ref(old), plan.old.tp, "old", Some(p))?;
    check_pools(plan, std::slice::from_ref(new), plan.new.tp, "new", Some(p))?;
    check_steps(
        plan,
        prog,
        (old.kv_heads, old.num_blocks),
        (new.kv_heads, new.num_blocks),
    )
}

/// Checks every step of rank `prog.rank`'s program against its pools' (kv heads, blocks), old
/// and new: each sequence exists, its tables cover its tokens, and every head and block lies
/// inside the pool it is read from or written to. What any executor (CPU or GPU) checks before
/// its first message, so a bad plan is an error on every rank rather than a hang.
pub fn check_steps(
    plan: &KvPlan,
    prog: &KvProgram,
    old: (usize, usize),
    new: (usize, usize),
) -> Result<()> {
    let p = prog.rank;
    for st in &prog.steps {
        let (seq, src, dst) = st.parts();
        let s = seq_of(plan, seq)?;
        let nb = blocks_for(s.len, plan.block_size);
        if let Some(h) = src {
            if h >= old.0 || s.old_table.len() < nb {
                return Err(Error::Invalid(format!(
                    "KV step {st:?} does not fit rank {p}'s old pool"
                )));
            }
            check_blocks(&s.old_table[..nb], old.1, seq, p)?;
        }
        if let Some(h) = dst {
            if h >= new.0 || s.new_table.len() < nb {
                return Err(Error::Invalid(format!(
                    "KV step {st:?} does not fit rank {p}'s new pool"
                )));
            }
            check_blocks(&s.new_table[..nb], new.1, seq, p)?;
        }
    }
    Ok(())
}

fn seq_of(plan: &KvPlan, seq: usize) -> Result<&SeqKv> {
    plan.seqs
        .get(seq)
        .ok_or_else(|| Error::Invalid(format!("KV step names sequence {seq}")))
}

/// Gathers one piece (every layer, K then V) out of `pool` into `out`.
fn gather_piece(out: &mut Vec<f32>, plan: &KvPlan, pool: &KvPool, s: &SeqKv, head: usize) {
    let table = &s.old_table[..blocks_for(s.len, plan.block_size)];
    let mut one = Vec::new();
    out.clear();
    for l in 0..plan.num_layers {
        for buf in [&pool.k[l], &pool.v[l]] {
            gather(&mut one, buf, pool, table, head, s.len);
            out.extend_from_slice(&one);
        }
    }
}

/// Scatters one piece (as [`gather_piece`] laid it out) into `pool`.
fn scatter_piece(data: &[f32], plan: &KvPlan, pool: &mut KvPool, s: &SeqKv, head: usize) {
    let table = &s.new_table[..blocks_for(s.len, plan.block_size)];
    let geom = (pool.kv_heads, pool.block_size, pool.head_dim);
    let per = s.len * plan.head_dim;
    let mut at = 0;
    for l in 0..plan.num_layers {
        for buf in [&mut pool.k[l], &mut pool.v[l]] {
            scatter(buf, geom, table, head, &data[at..at + per]);
            at += per;
        }
    }
}

/// Runs rank `prog.rank`'s program: reads only `old` (its old pool), writes only `new` (its new
/// pool); `comm` is a group of every rank of the world in physical-rank order. Everything is
/// validated before the first message.
pub fn execute_rank(
    plan: &KvPlan,
    prog: &KvProgram,
    old: &KvPool,
    new: &mut KvPool,
    comm: &dyn Comm,
) -> Result<KvStats> {
    validate(plan, prog, old, new)?;
    let mut stats = KvStats::default();
    let mut staging = Vec::new();
    let piece_elems = |s: &SeqKv| 2 * plan.num_layers * s.len * plan.head_dim;
    for st in &prog.steps {
        match *st {
            KvStep::Send { to, seq, src_head } => {
                let s = &plan.seqs[seq];
                gather_piece(&mut staging, plan, old, s, src_head);
                comm.send(to, &staging)?;
                stats.bytes_cross_rank += staging.len() as u64 * 4;
                stats.pieces += 1;
            }
            KvStep::Local {
                seq,
                src_head,
                dst_head,
            } => {
                let s = &plan.seqs[seq];
                gather_piece(&mut staging, plan, old, s, src_head);
                scatter_piece(&staging, plan, new, s, dst_head);
                stats.bytes_in_place += staging.len() as u64 * 4;
                stats.pieces += 1;
            }
            KvStep::Recv {
                from,
                seq,
                dst_head,
            } => {
                let s = &plan.seqs[seq];
                staging.resize(piece_elems(s), 0.0);
                comm.recv(from, &mut staging)?;
                scatter_piece(&staging, plan, new, s, dst_head);
            }
        }
        stats.peak_staging_bytes = stats.peak_staging_bytes.max(staging.len() as u64 * 4);
    }
    Ok(stats)
}
