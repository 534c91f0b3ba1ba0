//! pat's own engine (`pat::engine::Engine`): ranks, paged KV, requests, steps, live tp switches.

use pat::engine::{Backend, Engine, EngineOptions, FinishReason, Request};
use pat::model::sampling::SamplingParams;
use pat::model::ModelDir;
use pat::reshard::cost::{CostModel, KvPolicy};
use pat::Dtype;

use crate::handle;
use crate::model::pat_model;
use crate::status::{guard, guard_void, pat_status, Fail, FfiResult};
use crate::util::{copy_out, read_params, slice, u32_of, Out};

mod types;

pub use types::*;

pub(crate) struct EngineState {
    engine: Engine,
    n_requests: usize,
    n_steps: usize,
    /// Requests whose output was taken.
    taken: Vec<bool>,
}

fn dtype_of(d: u32) -> FfiResult<Dtype> {
    match d {
        PAT_DTYPE_F32 => Ok(Dtype::F32),
        PAT_DTYPE_BF16 => Ok(Dtype::Bf16),
        PAT_DTYPE_F16 => Ok(Dtype::F16),
        o => Err(Fail::Invalid(format!("`dtype` {o} is not a PAT_DTYPE_*"))),
    }
}

/// Loads every rank's shard of `model` (ranks read only their rows, in parallel) and makes an
/// engine. `params` NULL means the defaults. Errors: `PAT_ERR_INVALID_ARGUMENT` (an impossible
/// world/tp, a bad enum, `struct_size`, sampling value or block size), `PAT_RESOURCE_EXHAUSTED`
/// (a KV budget below one block), `PAT_ERR_BAD_FILE`, `PAT_ERR_DEVICE`. Thread-safe.
///
/// # Safety
/// `params` is NULL or a readable `pat_engine_params`; `out` is a writable `pat_engine *`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_engine_new(
    model: *const pat_model,
    params: *const pat_engine_params,
    out: *mut *mut pat_engine,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is writable).
        let out = unsafe { Out::new(out, "out") }?;
        // SAFETY: forwarded contract.
        let p = unsafe { read_params(params, "params") }?;
        let backend = match p.backend {
            PAT_BACKEND_CPU => Backend::Cpu,
            PAT_BACKEND_CUDA => Backend::Cuda {
                devices: None,
                switch: Default::default(),
            },
            o => {
                return Err(Fail::Invalid(format!(
                    "`backend` {o} is not a PAT_BACKEND_*"
                )))
            }
        };
        let mut opts = EngineOptions {
            world: p.world as usize,
            tp: p.tp as usize,
            block_size: p.block_size as usize,
            kv_blocks: p.kv_blocks as usize,
            dtype: dtype_of(p.dtype)?,
            sampling: SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k as usize,
                top_p: p.top_p,
                seed: p.seed,
            },
        };
        let engine = handle::with(model, "model", "pat_model", |m: &mut ModelDir| {
            if opts.kv_blocks == 0 {
                opts.kv_blocks = opts.blocks_in(&m.cfg, &backend, p.kv_bytes_per_rank)?;
            }
            Ok(Engine::from_dir(m, opts, &backend)?)
        })?;
        let state = EngineState {
            engine,
            n_requests: 0,
            n_steps: 0,
            taken: Vec::new(),
        };
        out.put(handle::register("pat_engine", state));
        Ok(())
    })
}

/// Frees an engine and its ranks. NULL, or an engine already freed, is a no-op; a poisoned
/// engine can be freed. Thread-safe (dropped when no other call is using it).
#[unsafe(no_mangle)]
pub extern "C" fn pat_engine_free(engine: *mut pat_engine) {
    guard_void(|| handle::release::<EngineState, _>(engine));
}

fn with_engine<R>(
    e: *const pat_engine,
    f: impl FnOnce(&mut EngineState) -> FfiResult<R>,
) -> FfiResult<R> {
    handle::with(e, "engine", "pat_engine", f)
}

/// Adds one request: `n_ids` prompt token ids, up to `max_new_tokens` new tokens, stopping at an
/// EOS token unless `ignore_eos` is nonzero. On success `*index` (if not NULL) is its index:
/// requests are numbered 0, 1, ... in the order they were added. Errors:
/// `PAT_ERR_INVALID_ARGUMENT` (empty prompt, `max_new_tokens` 0, a token outside the vocabulary,
/// a request longer than the model's context), `PAT_RESOURCE_EXHAUSTED` (longer than a rank's
/// whole KV pool); nothing is added then. Thread-safe (calls on one engine run one at a time).
///
/// # Safety
/// `ids` holds `n_ids` token ids; `index` is NULL or a writable `uint64_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_engine_add_request(
    engine: *mut pat_engine,
    ids: *const u32,
    n_ids: usize,
    max_new_tokens: u32,
    ignore_eos: u32,
    index: *mut u64,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract.
        let ids = unsafe { slice(ids, n_ids, "ids") }?;
        // SAFETY: forwarded contract (`index` is NULL or writable).
        let index = unsafe { Out::optional(index) };
        let i = with_engine(engine, |s| {
            s.engine.add_requests(&[Request {
                input_ids: ids.to_vec(),
                max_new_tokens: max_new_tokens as usize,
                ignore_eos: ignore_eos != 0,
            }])?;
            s.n_requests += 1;
            s.taken.push(false);
            Ok(s.n_requests - 1)
        })?;
        index.put(i as u64);
        Ok(())
    })
}

/// Runs one step on every replica with live requests: prefill of new prompts and one decode
/// token for the others, in one pass. `out` may be NULL. A request starts once its whole KV
/// (prompt + `max_new_tokens`) fits beside the running ones; until then it waits. A step also
/// prefills only what its activations may take next to its decodes (half the host's available
/// memory less the KV pools on CPU ranks, each rank's share of its GPU's free memory on GPU
/// ranks; `pat_engine_refresh_step_cap`), so a long queue (or the requests a failed recompute
/// left) is prefilled over several steps, and a prompt longer than that in chunks: such a step
/// samples no token for the prompt until its last chunk is in (`tokens_out` counts the tokens
/// sampled). Error
/// `PAT_RESOURCE_EXHAUSTED` (only after a switch to a layout with less KV): the pool cannot hold
/// this step's tokens; as on every error, no token was sampled and no request advanced (finish
/// or free requests, or retry after a switch to a layout with more KV).
/// Thread-safe (calls on one engine run one at a time).
///
/// # Safety
/// `out` is NULL or a writable `pat_step_report`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_engine_step(
    engine: *mut pat_engine,
    out: *mut pat_step_report,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is NULL or writable).
        let out = unsafe { Out::optional(out) };
        let r = with_engine(engine, |s| {
            let r = s.engine.step()?;
            s.n_steps += 1;
            Ok(r)
        })?;
        out.put(pat_step_report {
            step: r.step as u64,
            tokens_in: r.tokens_in as u64,
            tokens_out: r.tokens_out as u64,
            prefill_tokens: r.prefill_tokens as u64,
            finished: r.finished as u64,
            elapsed_ms: r.elapsed_ms,
        });
        Ok(())
    })
}

/// Switches every replica to `params->new_tp` between two steps (`Engine::reconfigure`):
/// nested layout, weights resharded in place, live sequences' KV migrated or recomputed as
/// `kv_policy` says, KV pools resized by the weight bytes freed. `out` may be NULL.
/// Errors before the swap (`PAT_ERR_INVALID_ARGUMENT`: same tp, a tp that does not split the
/// model or world, no live request; `PAT_RESOURCE_EXHAUSTED`: the new pools cannot hold the live
/// requests) leave the engine decoding at its old tp with nothing lost. If recomputing the KV
/// fails after the swap, the new tp is live and the next steps prefill what those requests' KV
/// lacks.
/// Thread-safe (calls on one engine run one at a time).
///
/// # Safety
/// `params` is a readable `pat_switch_params` whose prefill arrays hold `n_prefill` entries;
/// `out` is NULL or a writable `pat_switch_report`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_engine_reconfigure(
    engine: *mut pat_engine,
    params: *const pat_switch_params,
    out: *mut pat_switch_report,
) -> pat_status {
    guard(|| {
        if params.is_null() {
            return Err(Fail::Null("params"));
        }
        // SAFETY: forwarded contract (`out` is NULL or writable).
        let out = unsafe { Out::optional(out) };
        // SAFETY: forwarded contract.
        let p = unsafe { read_params(params, "params") }?;
        // SAFETY: forwarded contract.
        let (tps, rates) = unsafe {
            (
                slice(p.prefill_tp, p.n_prefill, "prefill_tp")?,
                slice(p.prefill_tokens_per_s, p.n_prefill, "prefill_tokens_per_s")?,
            )
        };
        let policy = match p.kv_policy {
            PAT_KV_MIGRATE => KvPolicy::Migrate,
            PAT_KV_RECOMPUTE => KvPolicy::Recompute,
            PAT_KV_AUTO => KvPolicy::Auto,
            o => return Err(Fail::Invalid(format!("`kv_policy` {o} is not a PAT_KV_*"))),
        };
        let cost = CostModel {
            transfer_bytes_per_s: p.transfer_bytes_per_s,
            fixed_transfer_s: p.fixed_transfer_s,
            prefill_tokens_per_s: tps
                .iter()
                .map(|&t| t as usize)
                .zip(rates.iter().copied())
                .collect(),
            fixed_prefill_s: p.fixed_prefill_s,
        };
        let r = with_engine(engine, |s| {
            Ok(s.engine.reconfigure(p.new_tp as usize, policy, &cost)?)
        })?;
        let u = |x: usize| x as u64;
        out.put(pat_switch_report {
            from_tp: u32_of(r.from_tp),
            to_tp: u32_of(r.to_tp),
            n_inflight: u(r.n_inflight),
            kv_tokens: u(r.kv_tokens),
            n_migrated: u(r.n_migrated),
            n_recomputed: u(r.n_recomputed),
            weight_reshard_ms: r.weight_reshard_ms,
            kv_migrate_ms: r.kv_migrate_ms,
            kv_recompute_ms: r.kv_recompute_ms,
            kv_alloc_ms: r.kv_alloc_ms,
            comm_group_ms: r.comm_group_ms,
            total_ms: r.total_ms,
            bytes_cross_rank: r.bytes_moved_cross_rank,
            bytes_in_place: r.bytes_moved_in_place,
            weight_bytes_cross_rank: r.weight_bytes_cross_rank,
            peak_extra_bytes: r.peak_extra_bytes,
            kv_blocks_before: u(r.kv_blocks_per_rank_before),
            kv_blocks_after: u(r.kv_blocks_per_rank_after),
            predicted_migrate_ms: r.predicted_migrate_ms,
            predicted_recompute_ms: r.predicted_recompute_ms,
            kv_blocks_goal: u(r.kv_blocks_per_rank_goal),
            kv_recompute_passes: u(r.kv_recompute_passes),
        });
        Ok(())
    })
}

/// Grows the KV pools now toward the goal the last switch left them (`kv_blocks_goal` in its
/// report: the old pool plus the weight bytes it freed, where the devices could not hold that
/// next to the old layout), as far as the devices have room, keeping every block in use. A step
/// does this by itself when it has to leave a request waiting for blocks; call it to have it
/// happen now, e.g. before adding a batch. Tried once per switch: `out->tried` is 0 where there
/// is nothing to grow. The engine goes on with what the pools hold whatever happens, so this
/// fails only on a bad argument. Thread-safe (calls on one engine run one at a time).
///
/// # Safety
/// `out` is a writable `pat_pool_growth`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_engine_grow_kv_pools(
    engine: *mut pat_engine,
    out: *mut pat_pool_growth,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is writable).
        let out = unsafe { Out::new(out, "out") }?;
        let g = with_engine(engine, |s| {
            let blocks = s.engine.options().kv_blocks as u64;
            Ok(match s.engine.grow_kv_pools() {
                Some(g) => pat_pool_growth {
                    tried: 1,
                    reached_goal: u32::from(g.to_blocks >= g.goal_blocks),
                    from_blocks: g.from_blocks as u64,
                    to_blocks: g.to_blocks as u64,
                    goal_blocks: g.goal_blocks as u64,
                    copied_bytes: g.copied_bytes,
                    elapsed_ms: g.ms,
                },
                None => pat_pool_growth {
                    tried: 0,
                    reached_goal: u32::from(s.engine.kv_blocks_goal() <= blocks as usize),
                    from_blocks: blocks,
                    to_blocks: blocks,
                    goal_blocks: s.engine.kv_blocks_goal() as u64,
                    ..Default::default()
                },
            })
        })?;
        out.put(g);
        Ok(())
    })
}

/// Reads the step cap again from what the ranks' memory holds now and writes the bytes a
/// step's activations may take to `*cap_bytes`: on GPU ranks each rank's share of its GPU's free
/// memory (each replica counted apart), for an embedder that shares the GPUs with something else
/// (a trainer colocated with the rollout) after it took or gave back memory; on CPU ranks the
/// whole step's share of host memory, read once at load. `UINT64_MAX` where nothing caps a step
/// in bytes. The engine reads it itself at load, after each switch and after each pool growth;
/// a step prefills what fits (at least one token), so a long queue is prefilled over several
/// steps, a long prompt in chunks. Errors: `PAT_ERR_DEVICE` (a GPU could not be read),
/// `PAT_ERR_INTERNAL` (a GPU rank's worker is gone); the cap stays as it was. Thread-safe
/// (calls on one engine run one at a time).
///
/// # Safety
/// `cap_bytes` is a writable `uint64_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_engine_refresh_step_cap(
    engine: *mut pat_engine,
    cap_bytes: *mut u64,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`cap_bytes` is writable).
        let out = unsafe { Out::new(cap_bytes, "cap_bytes") }?;
        let cap = with_engine(engine, |s| {
            s.engine.refresh_step_cap()?;
            Ok(s.engine.step_cap_bytes().unwrap_or(u64::MAX))
        })?;
        out.put(cap);
        Ok(())
    })
}

/// Caps the prompt tokens one step (or one pass of a switch's recompute) prefills at `tokens`,
/// besides what its activations may take in memory (`pat_engine_refresh_step_cap`); 0 lifts the
/// cap. Decodes are not counted: the cap bounds how long a step that prefills keeps the running
/// requests waiting. A longer queue is prefilled over more steps, a longer prompt in chunks (a
/// step samples no token for a prompt until its last chunk is in); at least one token a step is
/// prefilled whatever the cap. Switches keep it. Thread-safe (calls on one engine run one at a
/// time).
#[unsafe(no_mangle)]
pub extern "C" fn pat_engine_cap_step_tokens(engine: *mut pat_engine, tokens: u64) -> pat_status {
    guard(|| {
        with_engine(engine, |s| {
            let cap = usize::try_from(tokens).unwrap_or(usize::MAX);
            s.engine.cap_step_tokens((cap > 0).then_some(cap));
            Ok(())
        })
    })
}

/// Takes the finished request with the lowest index not taken yet: writes its record to `out`,
/// its generated ids to `ids` and their count to `*n_ids`. Each output is taken once.
/// `PAT_NO_OUTPUT`: none is waiting (step more). `PAT_BUFFER_TOO_SMALL`: `cap` is below the
/// count; only `*n_ids` is written and the output stays to be taken. Thread-safe (calls on one
/// engine run one at a time).
///
/// # Safety
/// `out` is a writable `pat_output`; `ids` is NULL or holds `cap` writable ids; `n_ids` is a
/// writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_engine_take_output(
    engine: *mut pat_engine,
    out: *mut pat_output,
    ids: *mut u32,
    cap: usize,
    n_ids: *mut usize,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is writable).
        let out = unsafe { Out::new(out, "out") }?;
        // SAFETY: forwarded contract (`n_ids` is writable).
        let n_ids = unsafe { Out::new(n_ids, "n_ids") }?;
        with_engine(engine, |s| {
            let taken = &s.taken;
            let o = s
                .engine
                .outputs()
                .into_iter()
                .find(|o| !taken[o.index])
                .ok_or(Fail::NoOutput)?;
            // SAFETY: forwarded contract.
            unsafe { copy_out(&o.output_ids, ids, cap, &n_ids, "ids") }?;
            s.taken[o.index] = true;
            out.put(pat_output {
                index: o.index as u64,
                n_input_ids: o.input_ids.len() as u64,
                n_output_ids: o.output_ids.len() as u64,
                finish_reason: match o.finish_reason {
                    FinishReason::Length => PAT_FINISH_LENGTH,
                    FinishReason::Stop => PAT_FINISH_STOP,
                },
                reserved: 0,
            });
            Ok(())
        })
    })
}

/// What the engine runs now. Thread-safe.
///
/// # Safety
/// `out` is a writable `pat_engine_info`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_engine_get_info(
    engine: *const pat_engine,
    out: *mut pat_engine_info,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is writable).
        let out = unsafe { Out::new(out, "out") }?;
        let info = with_engine(engine, |s| {
            let (l, o) = (s.engine.layout(), s.engine.options());
            Ok(pat_engine_info {
                world: u32_of(l.world),
                tp: u32_of(l.tp),
                dp: u32_of(l.dp()),
                block_size: u32_of(o.block_size),
                kv_blocks: o.kv_blocks as u64,
                n_requests: s.n_requests as u64,
                n_live: s.engine.live() as u64,
                n_steps: s.n_steps as u64,
            })
        })?;
        out.put(info);
        Ok(())
    })
}

/// The live (unfinished) requests in index order (buffer negotiation as
/// `pat_model_load_shard`), `est_remaining` NaN: ready for `pat_policy_decide`. Thread-safe.
///
/// # Safety
/// `buf` is NULL or holds `cap` writable entries; `n` is a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_engine_live(
    engine: *const pat_engine,
    buf: *mut pat_live_seq,
    cap: usize,
    n: *mut usize,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`n` is writable).
        let n = unsafe { Out::new(n, "n") }?;
        with_engine(engine, |s| {
            let live: Vec<pat_live_seq> = s
                .engine
                .live_seqs()
                .iter()
                .map(|l| pat_live_seq {
                    index: l.index as u64,
                    replica: u32_of(l.replica),
                    reserved: 0,
                    context: l.context as u64,
                    kv_tokens: l.kv as u64,
                    generated: l.generated as u64,
                    max_new_tokens: l.max_new_tokens as u64,
                    est_remaining: f64::NAN,
                })
                .collect();
            // SAFETY: forwarded contract.
            unsafe { copy_out(&live, buf, cap, &n, "buf") }
        })
    })
}

#[cfg(test)]
mod tests;
