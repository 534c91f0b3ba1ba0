//! KV migration plans as flat data (`pat::reshard::kv::{plan, program}`): per (sequence, kv head)
//! pieces, and per-rank programs over them. The pool layout, a piece's byte order and the
//! execution order are on `pat_kv_piece` and `pat_kv_step`, so the header carries them.

use pat::reshard::kv::program::{programs, KvProgram, KvStep};
use pat::reshard::kv::{self, SeqKv};

use crate::handle;
use crate::layout::{layout_of, pat_layout};
use crate::model::{config_of, pat_model_dims};
use crate::status::{guard, guard_void, pat_status, Fail, FfiResult};
use crate::util::{copy_out, slice, Out};
use crate::weight_plan::pat_rank_bytes;

/// A KV migration plan. Opaque and immutable: every query on it is thread-safe. Free with
/// `pat_kv_plan_free`.
pub struct pat_kv_plan {
    _opaque: [u8; 0],
}

/// One live sequence to migrate (`pat::reshard::kv::SeqKv`). The tables are copied by
/// `pat_kv_plan_new`; each needs at least ceil(len / block_size) blocks, and only those are used.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pat_seq_kv {
    /// Its replica in the old layout and in the new one.
    pub old_replica: u32,
    pub new_replica: u32,
    /// Tokens whose K/V are cached.
    pub len: u64,
    /// Block ids in the old replica's pools.
    pub old_table: *const u32,
    pub old_table_len: usize,
    /// Block ids in the new replica's pools (no block given to two sequences).
    pub new_table: *const u32,
    pub new_table_len: usize,
}

/// One kv head of one sequence (`pat::reshard::kv::KvPiece`), in plan order: by sequence, then
/// head.
///
/// Pools, as pat lays them out: per rank and layer, K and V each `[num_blocks, heads_local,
/// block_size, head_dim]` with `heads_local = num_kv_heads / tp`; global kv head `h` of a replica
/// lives on its tp-rank `h / heads_local` as local head `h % heads_local`. (Any pool layout works
/// if both sides agree on a piece's element order.)
///
/// A piece's elements, as gathered and sent: for each layer in order, K then V, the sequence's
/// first `len` tokens of that local head, gathered block by block along its table (block i holds
/// tokens [i * block_size, (i + 1) * block_size), the last block partial), `head_dim` elements
/// per token: `2 * num_layers * len * head_dim` elements. The source reads the old table in its
/// old pool; the destination writes the new table (allocated by the engine beforehand) in its
/// new pool.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pat_kv_piece {
    /// Index into the `seqs` given to `pat_kv_plan_new`.
    pub seq: u32,
    /// Global kv head.
    pub head: u32,
    pub src_rank: u32,
    /// Local head in the source rank's old pool.
    pub src_head: u32,
    pub dst_rank: u32,
    /// Local head in the destination rank's new pool.
    pub dst_head: u32,
    /// 2 * num_layers * len * head_dim * elem_bytes.
    pub bytes: u64,
}

/// Gather local head `src_head` of sequence `seq` from the old pool and send it to rank `peer`.
pub const PAT_KV_SEND: u32 = 0;
/// Gather local head `src_head` from the old pool, scatter it into local head `dst_head` of the
/// new pool (`peer` = this rank).
pub const PAT_KV_LOCAL: u32 = 1;
/// Receive sequence `seq`'s piece from rank `peer` and scatter it into local head `dst_head` of
/// the new pool.
pub const PAT_KV_RECV: u32 = 2;

/// One step of a rank's KV program (`pat::reshard::kv::program::KvStep`). Unused fields are 0.
///
/// A rank runs its SENDs (gather from the old pool, send) in listed order, then its LOCALs
/// (gather from the old pool, scatter into the new one: the heads per rank change, so even data
/// that stays on its rank is re-laid out), then its RECVs (receive, scatter into the new pool) in
/// listed order. Between two ranks messages go in plan order (sequence, then head) on both
/// sides. Old pools are only read and new pools only written, so a failure anywhere leaves the
/// old layout intact.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pat_kv_step {
    /// `PAT_KV_*`.
    pub kind: u32,
    pub peer: u32,
    pub seq: u32,
    pub src_head: u32,
    pub dst_head: u32,
    pub reserved: u32,
}

/// A KV plan's geometry and counts (bytes at the plan's `elem_bytes`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pat_kv_plan_info {
    pub world: u32,
    pub old_tp: u32,
    pub new_tp: u32,
    pub num_layers: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub block_size: u32,
    pub n_seqs: u32,
    pub n_pieces: u64,
    pub elem_bytes: u64,
    pub bytes_cross_rank: u64,
    pub bytes_in_place: u64,
    /// The largest piece (what one rank stages at once).
    pub peak_staging_bytes: u64,
}

pub(crate) struct KvPlanState {
    info: pat_kv_plan_info,
    pieces: Vec<pat_kv_piece>,
    progs: Vec<KvProgram>,
    steps: Vec<Vec<pat_kv_step>>,
}

fn lower(prog: &KvProgram) -> Vec<pat_kv_step> {
    let u = |x: usize| x as u32;
    prog.steps
        .iter()
        .map(|st| match *st {
            KvStep::Send { to, seq, src_head } => pat_kv_step {
                kind: PAT_KV_SEND,
                peer: u(to),
                seq: u(seq),
                src_head: u(src_head),
                ..Default::default()
            },
            KvStep::Local {
                seq,
                src_head,
                dst_head,
            } => pat_kv_step {
                kind: PAT_KV_LOCAL,
                peer: u(prog.rank),
                seq: u(seq),
                src_head: u(src_head),
                dst_head: u(dst_head),
                reserved: 0,
            },
            KvStep::Recv {
                from,
                seq,
                dst_head,
            } => pat_kv_step {
                kind: PAT_KV_RECV,
                peer: u(from),
                seq: u(seq),
                dst_head: u(dst_head),
                ..Default::default()
            },
        })
        .collect()
}

/// Plans the KV migration of `seqs` (`n_seqs` live sequences) from `old_layout` to
/// `new_layout` (same world) with pools of `block_size` tokens per block, and lowers it to one
/// program per physical rank. `elem_bytes` (1 to 8) only scales the byte counts. Errors:
/// `PAT_ERR_INVALID_ARGUMENT` for bad dims or layouts, a replica out of range, a table shorter
/// than the sequence, a new block given to two sequences, or `elem_bytes` outside 1 to 8.
/// Thread-safe.
///
/// # Safety
/// `dims` and the layouts are readable (placements NULL or `world` entries); `seqs` is NULL with
/// `n_seqs` 0 or holds `n_seqs` entries whose tables hold their lengths; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_kv_plan_new(
    dims: *const pat_model_dims,
    old_layout: *const pat_layout,
    new_layout: *const pat_layout,
    block_size: u32,
    seqs: *const pat_seq_kv,
    n_seqs: usize,
    elem_bytes: u32,
    out: *mut *mut pat_kv_plan,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is writable).
        let out = unsafe { Out::new(out, "out") }?;
        // SAFETY: forwarded contract.
        let (cfg, old, new, seqs) = unsafe {
            (
                config_of(dims)?,
                layout_of(old_layout, "old_layout")?,
                layout_of(new_layout, "new_layout")?,
                slice(seqs, n_seqs, "seqs")?,
            )
        };
        if elem_bytes == 0 {
            return Err(Fail::Invalid("`elem_bytes` must be at least 1".into()));
        }
        let mut owned = Vec::with_capacity(seqs.len());
        for s in seqs {
            // SAFETY: each table holds its length (contract).
            let (ot, nt) = unsafe {
                (
                    slice(s.old_table, s.old_table_len, "old_table")?,
                    slice(s.new_table, s.new_table_len, "new_table")?,
                )
            };
            owned.push(SeqKv {
                old_replica: s.old_replica as usize,
                new_replica: s.new_replica as usize,
                len: usize::try_from(s.len).map_err(|_| {
                    Fail::Invalid(format!("sequence length {} is too large", s.len))
                })?,
                old_table: ot.to_vec(),
                new_table: nt.to_vec(),
            });
        }
        let plan = kv::plan(
            &cfg,
            &old,
            &new,
            block_size as usize,
            &owned,
            elem_bytes as u64,
        )?;
        let progs = programs(&plan);
        let pieces: Vec<pat_kv_piece> = plan
            .pieces
            .iter()
            .map(|p| pat_kv_piece {
                seq: p.seq as u32,
                head: p.head as u32,
                src_rank: p.src_rank as u32,
                src_head: p.src_head as u32,
                dst_rank: p.dst_rank as u32,
                dst_head: p.dst_head as u32,
                bytes: p.bytes,
            })
            .collect();
        let info = pat_kv_plan_info {
            world: old.world as u32,
            old_tp: old.tp as u32,
            new_tp: new.tp as u32,
            num_layers: cfg.num_layers as u32,
            num_kv_heads: cfg.num_kv_heads as u32,
            head_dim: cfg.head_dim as u32,
            block_size,
            n_seqs: seqs.len() as u32,
            n_pieces: pieces.len() as u64,
            elem_bytes: elem_bytes as u64,
            bytes_cross_rank: plan.bytes_cross_rank,
            bytes_in_place: plan.bytes_in_place,
            peak_staging_bytes: pieces.iter().map(|p| p.bytes).max().unwrap_or(0),
        };
        let steps = progs.iter().map(lower).collect();
        let state = KvPlanState {
            info,
            pieces,
            progs,
            steps,
        };
        out.put(handle::register("pat_kv_plan", state));
        Ok(())
    })
}

/// Frees a plan. NULL, or a plan already freed, is a no-op. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn pat_kv_plan_free(plan: *mut pat_kv_plan) {
    guard_void(|| handle::release::<KvPlanState, _>(plan));
}

/// The plan's geometry and counts. Thread-safe.
///
/// # Safety
/// `out` is a writable `pat_kv_plan_info`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_kv_plan_get_info(
    plan: *const pat_kv_plan,
    out: *mut pat_kv_plan_info,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is writable).
        let out = unsafe { Out::new(out, "out") }?;
        let info = handle::with(
            plan,
            "plan",
            "pat_kv_plan",
            |s: &mut KvPlanState| Ok(s.info),
        )?;
        out.put(info);
        Ok(())
    })
}

/// Every piece, by sequence then head (buffer negotiation as `pat_model_load_shard`).
/// Thread-safe.
///
/// # Safety
/// `buf` is NULL or holds `cap` writable entries; `n` is a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_kv_plan_pieces(
    plan: *const pat_kv_plan,
    buf: *mut pat_kv_piece,
    cap: usize,
    n: *mut usize,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`n` is writable).
        let n = unsafe { Out::new(n, "n") }?;
        handle::with(plan, "plan", "pat_kv_plan", |s: &mut KvPlanState| {
            // SAFETY: forwarded contract.
            unsafe { copy_out(&s.pieces, buf, cap, &n, "buf") }
        })
    })
}

fn rank_index(rank: u32, world: usize) -> FfiResult<usize> {
    let r = rank as usize;
    if r >= world {
        return Err(Fail::Invalid(format!(
            "rank {rank} is outside world {world}"
        )));
    }
    Ok(r)
}

/// Physical rank `rank`'s steps in execution order (buffer negotiation as
/// `pat_model_load_shard`). Thread-safe.
///
/// # Safety
/// `buf` is NULL or holds `cap` writable entries; `n` is a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_kv_plan_steps(
    plan: *const pat_kv_plan,
    rank: u32,
    buf: *mut pat_kv_step,
    cap: usize,
    n: *mut usize,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`n` is writable).
        let n = unsafe { Out::new(n, "n") }?;
        handle::with(plan, "plan", "pat_kv_plan", |s: &mut KvPlanState| {
            let r = rank_index(rank, s.steps.len())?;
            // SAFETY: forwarded contract.
            unsafe { copy_out(&s.steps[r], buf, cap, &n, "buf") }
        })
    })
}

/// Physical rank `rank`'s byte counts (`bytes_zeroed` is 0; `peak_extra_bytes` is the largest
/// piece it stages). Thread-safe.
///
/// # Safety
/// `out` is a writable `pat_rank_bytes`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_kv_plan_rank_bytes(
    plan: *const pat_kv_plan,
    rank: u32,
    out: *mut pat_rank_bytes,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is writable).
        let out = unsafe { Out::new(out, "out") }?;
        let b = handle::with(plan, "plan", "pat_kv_plan", |s: &mut KvPlanState| {
            let p = &s.progs[rank_index(rank, s.progs.len())?];
            Ok(pat_rank_bytes {
                bytes_sent: p.bytes_sent,
                bytes_received: p.bytes_received,
                bytes_in_place: p.bytes_in_place,
                bytes_zeroed: 0,
                peak_extra_bytes: p.peak_staging_bytes,
            })
        })?;
        out.put(b);
        Ok(())
    })
}
