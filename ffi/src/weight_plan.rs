//! Weight reshard plans as flat per-rank programs (`pat::reshard::weights::{plan, program}`); the
//! execution contract a foreign engine follows is on `pat_weight_step`, so the header carries it.

use pat::reshard::weights::program::{programs, Step, WeightProgram};
use pat::reshard::weights::{self, min_cross_rank_bytes};

use crate::handle;
use crate::layout::{layout_of, pat_layout};
use crate::model::{config_of, pat_model_dims, role_code};
use crate::status::{guard, guard_void, pat_status, Fail, FfiResult};
use crate::util::{copy_out, Out};

/// A weight reshard plan lowered to one program per physical rank. Opaque and immutable: every
/// query on it is thread-safe. Free with `pat_weight_plan_free`.
pub struct pat_weight_plan {
    _opaque: [u8; 0],
}

/// Send rows [src_row, src_row + rows) of this rank's old buffer to rank `peer`.
pub const PAT_STEP_SEND: u32 = 0;
/// Receive `rows` rows from rank `peer` into new rows [dst_row, dst_row + rows).
pub const PAT_STEP_RECV: u32 = 1;
/// Move this rank's own old rows [src_row, ..) to new rows [dst_row, ..) (`peer` = this rank).
pub const PAT_STEP_MOVE: u32 = 2;
/// Zero new rows [dst_row, dst_row + rows): vocab padding (`peer` = this rank).
pub const PAT_STEP_ZERO: u32 = 3;

/// One step of a rank's weight program (`pat::reshard::weights::program::Step`). Rows are rows of
/// `hidden_size` elements along the role's split axis, in pat's per-rank buffer order (see
/// `PAT_ROLE_*`; an engine that stores a role otherwise maps rows to its own strides). Fields a
/// kind does not use are 0.
///
/// How to run a plan: for every role of `pat_weight_plan_roles` (in that order) and every layer
/// of it (`repeats` times, each on that layer's buffer; the embedding and head once), each rank
/// runs its steps of that role in two phases:
/// 1. Exchange (reads the old buffers only): the SENDs in listed order, then the RECVs in listed
///    order into a staging area. Two ranks list their messages to each other in the same order,
///    as a FIFO channel or NCCL's grouped send/recv needs; sends come first, so buffered sends
///    never wait on a peer that is itself waiting.
/// 2. Rebuild, only once every rank has finished phase 1 for that buffer (no rank may rewrite a
///    buffer a peer still reads). With `in_place`: the MOVEs in listed order as memmoves inside
///    the old buffer (each goes down, in increasing destination order, so no row is overwritten
///    before it is read), then the received rows and the ZEROs, then cut the buffer to
///    `new_rows`. Without: a fresh buffer of `new_rows` rows gets the MOVEs (read from the old
///    buffer), the received rows and the ZEROs, and replaces the old one.
///
/// A rank's MOVE, RECV and ZERO steps of one role tile its new rows [0, new_rows) exactly once.
/// pat runs phase 1 of every role and layer before any phase 2 (`peak_extra_bytes` counts that).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pat_weight_step {
    /// `PAT_ROLE_*`.
    pub role: u32,
    /// `PAT_STEP_*`.
    pub kind: u32,
    /// The other rank of a SEND or RECV; this rank for MOVE and ZERO.
    pub peer: u32,
    pub reserved: u32,
    /// Row of this rank's old buffer (SEND, MOVE).
    pub src_row: u64,
    /// Row of this rank's new buffer (RECV, MOVE, ZERO).
    pub dst_row: u64,
    pub rows: u64,
}

/// One role of one rank's program: its steps are `steps[first_step .. first_step + n_steps)` of
/// `pat_weight_plan_steps` for the same rank.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pat_weight_role {
    /// `PAT_ROLE_*`.
    pub role: u32,
    /// Layers the steps apply to, each on its own buffer (1 for the embedding and head).
    pub repeats: u32,
    /// Rows of the rank's buffer before and after.
    pub old_rows: u64,
    pub new_rows: u64,
    pub first_step: u64,
    pub n_steps: u64,
    /// Rebuild by compacting the old buffer in place (it does not grow and every move goes down);
    /// otherwise into a fresh buffer.
    pub in_place: bool,
}

/// A whole plan's counts (bytes at the plan's `elem_bytes`, over all layers and ranks).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pat_weight_plan_info {
    pub world: u32,
    pub old_tp: u32,
    pub new_tp: u32,
    pub hidden_size: u32,
    /// Roles per rank program (5 with tied embeddings, else 6).
    pub n_roles: u32,
    pub reserved: u32,
    pub elem_bytes: u64,
    /// Rows that cross ranks (sent = received).
    pub bytes_cross_rank: u64,
    /// Rows each rank keeps from its own old buffer (moved or left where they are).
    pub bytes_in_place: u64,
    pub bytes_zeroed: u64,
    /// The least any reshard between these layouts must move between ranks (0 when tp grows by
    /// a factor and the new layout is nested).
    pub min_cross_rank_bytes: u64,
    /// The largest `peak_extra_bytes` of a rank.
    pub peak_extra_bytes: u64,
}

/// One rank's counts, in bytes, over all layers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pat_rank_bytes {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub bytes_in_place: u64,
    pub bytes_zeroed: u64,
    /// Weights: every received row (staged until all ranks exchanged) plus the largest fresh
    /// buffer. KV: the largest piece staged at once.
    pub peak_extra_bytes: u64,
}

pub(crate) struct WeightPlanState {
    info: pat_weight_plan_info,
    progs: Vec<WeightProgram>,
    steps: Vec<Vec<pat_weight_step>>,
    roles: Vec<Vec<pat_weight_role>>,
}

fn lower(prog: &WeightProgram) -> (Vec<pat_weight_step>, Vec<pat_weight_role>) {
    let me = prog.rank as u32;
    let (mut steps, mut roles) = (Vec::new(), Vec::new());
    for rp in &prog.roles {
        let role = role_code(rp.role);
        let first = steps.len();
        for st in &rp.steps {
            let (kind, peer, src, dst, rows) = match *st {
                Step::Send { to, src_row, rows } => (PAT_STEP_SEND, to as u32, src_row, 0, rows),
                Step::Recv {
                    from,
                    dst_row,
                    rows,
                } => (PAT_STEP_RECV, from as u32, 0, dst_row, rows),
                Step::Move {
                    src_row,
                    dst_row,
                    rows,
                } => (PAT_STEP_MOVE, me, src_row, dst_row, rows),
                Step::Zero { dst_row, rows } => (PAT_STEP_ZERO, me, 0, dst_row, rows),
            };
            steps.push(pat_weight_step {
                role,
                kind,
                peer,
                reserved: 0,
                src_row: src as u64,
                dst_row: dst as u64,
                rows: rows as u64,
            });
        }
        roles.push(pat_weight_role {
            role,
            repeats: rp.repeats as u32,
            old_rows: rp.old_rows as u64,
            new_rows: rp.new_rows as u64,
            first_step: first as u64,
            n_steps: (steps.len() - first) as u64,
            in_place: rp.in_place,
        });
    }
    (steps, roles)
}

/// Plans the reshard of every tensor-parallel weight from `old_layout` to `new_layout` (same
/// world) and lowers it to one program per physical rank. Rows a rank already holds come from its
/// own old buffer; the others from another holder of those rows (one in the rank's new replica
/// first, then the nearest rank id). `elem_bytes` (1 to 8, e.g. 2 for bf16) only scales the byte
/// counts.
/// For the fewest bytes use the nested placement (`pat_layout_nested`) as the new layout: with
/// `new_layout->placement` NULL the contiguous one is used. Errors: `PAT_ERR_INVALID_ARGUMENT`
/// for bad dims, layouts, a tp that does not split the model, or `elem_bytes` outside 1 to 8.
/// Thread-safe.
///
/// # Safety
/// `dims`, `old_layout` and `new_layout` are readable (their placements NULL or `world` entries);
/// `out` is a writable `pat_weight_plan *`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_weight_plan_new(
    dims: *const pat_model_dims,
    old_layout: *const pat_layout,
    new_layout: *const pat_layout,
    elem_bytes: u32,
    out: *mut *mut pat_weight_plan,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is writable).
        let out = unsafe { Out::new(out, "out") }?;
        // SAFETY: forwarded contract.
        let (cfg, old, new) = unsafe {
            (
                config_of(dims)?,
                layout_of(old_layout, "old_layout")?,
                layout_of(new_layout, "new_layout")?,
            )
        };
        if elem_bytes == 0 {
            return Err(Fail::Invalid("`elem_bytes` must be at least 1".into()));
        }
        let eb = elem_bytes as u64;
        let plan = weights::plan(&cfg, &old, &new, eb)?;
        let progs = programs(&plan);
        let (steps, roles) = progs.iter().map(lower).unzip();
        let info = pat_weight_plan_info {
            world: old.world as u32,
            old_tp: old.tp as u32,
            new_tp: new.tp as u32,
            hidden_size: cfg.hidden_size as u32,
            n_roles: plan.ops.len() as u32,
            reserved: 0,
            elem_bytes: eb,
            bytes_cross_rank: plan.bytes_cross_rank,
            bytes_in_place: plan.bytes_in_place,
            bytes_zeroed: plan.bytes_zeroed,
            min_cross_rank_bytes: min_cross_rank_bytes(&cfg, &old, &new, eb),
            peak_extra_bytes: progs.iter().map(|p| p.peak_extra_bytes).max().unwrap_or(0),
        };
        let state = WeightPlanState {
            info,
            progs,
            steps,
            roles,
        };
        out.put(handle::register("pat_weight_plan", state));
        Ok(())
    })
}

/// Frees a plan. NULL, or a plan already freed, is a no-op. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn pat_weight_plan_free(plan: *mut pat_weight_plan) {
    guard_void(|| handle::release::<WeightPlanState, _>(plan));
}

/// The plan's counts. Thread-safe.
///
/// # Safety
/// `out` is a writable `pat_weight_plan_info`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_weight_plan_get_info(
    plan: *const pat_weight_plan,
    out: *mut pat_weight_plan_info,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is writable).
        let out = unsafe { Out::new(out, "out") }?;
        let info = handle::with(
            plan,
            "plan",
            "pat_weight_plan",
            |s: &mut WeightPlanState| Ok(s.info),
        )?;
        out.put(info);
        Ok(())
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

/// Physical rank `rank`'s roles, in execution order (`n_roles` entries; buffer negotiation as
/// `pat_model_load_shard`). Thread-safe.
///
/// # Safety
/// `buf` is NULL or holds `cap` writable entries; `n` is a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_weight_plan_roles(
    plan: *const pat_weight_plan,
    rank: u32,
    buf: *mut pat_weight_role,
    cap: usize,
    n: *mut usize,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`n` is writable).
        let n = unsafe { Out::new(n, "n") }?;
        handle::with(
            plan,
            "plan",
            "pat_weight_plan",
            |s: &mut WeightPlanState| {
                let r = rank_index(rank, s.progs.len())?;
                // SAFETY: forwarded contract.
                unsafe { copy_out(&s.roles[r], buf, cap, &n, "buf") }
            },
        )
    })
}

/// Physical rank `rank`'s steps, role by role in the order of `pat_weight_plan_roles`, each
/// role's steps in execution order (buffer negotiation as `pat_model_load_shard`). Thread-safe.
///
/// # Safety
/// `buf` is NULL or holds `cap` writable entries; `n` is a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_weight_plan_steps(
    plan: *const pat_weight_plan,
    rank: u32,
    buf: *mut pat_weight_step,
    cap: usize,
    n: *mut usize,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`n` is writable).
        let n = unsafe { Out::new(n, "n") }?;
        handle::with(
            plan,
            "plan",
            "pat_weight_plan",
            |s: &mut WeightPlanState| {
                let r = rank_index(rank, s.progs.len())?;
                // SAFETY: forwarded contract.
                unsafe { copy_out(&s.steps[r], buf, cap, &n, "buf") }
            },
        )
    })
}

/// Physical rank `rank`'s byte counts. Thread-safe.
///
/// # Safety
/// `out` is a writable `pat_rank_bytes`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_weight_plan_rank_bytes(
    plan: *const pat_weight_plan,
    rank: u32,
    out: *mut pat_rank_bytes,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is writable).
        let out = unsafe { Out::new(out, "out") }?;
        let b = handle::with(
            plan,
            "plan",
            "pat_weight_plan",
            |s: &mut WeightPlanState| {
                let p = &s.progs[rank_index(rank, s.progs.len())?];
                Ok(pat_rank_bytes {
                    bytes_sent: p.bytes_sent,
                    bytes_received: p.bytes_received,
                    bytes_in_place: p.bytes_in_place,
                    bytes_zeroed: p.bytes_zeroed,
                    peak_extra_bytes: p.peak_extra_bytes,
                })
            },
        )?;
        out.put(b);
        Ok(())
    })
}
