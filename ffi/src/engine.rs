//! pat's own engine (`pat::engine::Engine`): ranks, paged KV, requests, steps, live tp switches.

use pat::engine::{Backend, Engine, EngineOptions, FinishReason, Request};
use pat::model::sampling::SamplingParams;
use pat::model::ModelDir;
use pat::reshard::cost::{CostModel, KvPolicy};
use pat::Dtype;

use crate::handle;
use crate::model::pat_model;
use crate::status::{guard, guard_void, pat_status, Fail, FfiResult};
use crate::util::{copy_out, read_params, slice, u32_of, Out, Params};

/// A running generation over `world` ranks (pat's own ranks: one thread each on the CPU).
/// Opaque; free with `pat_engine_free`. Calls on one engine from several threads run one at a
/// time (each takes the engine's lock); distinct engines run in parallel.
pub struct pat_engine {
    _opaque: [u8; 0],
}

/// Weights as f32 (the reference).
pub const PAT_DTYPE_F32: u32 = 0;
/// Weights rounded to bf16 (kept as f32 on the CPU: an exact emulation).
pub const PAT_DTYPE_BF16: u32 = 1;
/// Weights rounded to f16.
pub const PAT_DTYPE_F16: u32 = 2;
/// Host threads, f32 compute.
pub const PAT_BACKEND_CPU: u32 = 0;
/// GPU ranks (a library built with pat's `cuda` feature; otherwise `PAT_ERR_INVALID_ARGUMENT`).
pub const PAT_BACKEND_CUDA: u32 = 1;

/// Settings of `pat_engine_new` (`pat::engine::EngineOptions` and `SamplingParams`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pat_engine_params {
    /// sizeof(pat_engine_params), set by `pat_engine_default_params`.
    pub struct_size: u32,
    /// Ranks (default 1).
    pub world: u32,
    /// Tensor-parallel degree: divides world, the heads, the kv heads and the intermediate size
    /// (default 1).
    pub tp: u32,
    /// Tokens per KV block (default 16).
    pub block_size: u32,
    /// KV blocks per rank; 0 (the default): as many as `kv_bytes_per_rank` holds.
    pub kv_blocks: u32,
    /// `PAT_DTYPE_*` (default f32).
    pub dtype: u32,
    /// `PAT_BACKEND_*` (default CPU).
    pub backend: u32,
    /// Keep the k most likely tokens; 0 (the default) = off.
    pub top_k: u32,
    /// KV memory per rank when `kv_blocks` is 0 (default 64 MiB).
    pub kv_bytes_per_rank: u64,
    /// 0 (the default) is greedy.
    pub temperature: f32,
    /// Nucleus mass; 1 (the default) = off.
    pub top_p: f32,
    /// Each request samples from its own stream of this seed (default 0).
    pub seed: u64,
}

impl Params for pat_engine_params {
    const MIN_SIZE: usize = size_of::<pat_engine_params>();
    fn defaults() -> Self {
        pat_engine_params {
            struct_size: size_of::<Self>() as u32,
            world: 1,
            tp: 1,
            block_size: 16,
            kv_blocks: 0,
            dtype: PAT_DTYPE_F32,
            backend: PAT_BACKEND_CPU,
            top_k: 0,
            kv_bytes_per_rank: 64 << 20,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// The defaults of `pat_engine_params` (1 rank, tp 1, greedy, 64 MiB of KV). Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn pat_engine_default_params() -> pat_engine_params {
    pat_engine_params::defaults()
}

/// The KV policy of a switch: migrate every live sequence's cache.
pub const PAT_KV_MIGRATE: u32 = 0;
/// Recompute every live sequence's cache under the new layout (prefill again).
pub const PAT_KV_RECOMPUTE: u32 = 1;
/// Per sequence, whichever the cost model predicts is cheaper.
pub const PAT_KV_AUTO: u32 = 2;

/// Settings of `pat_engine_reconfigure` (`pat::reshard::cost::{KvPolicy, CostModel}`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pat_switch_params {
    /// sizeof(pat_switch_params), set by `pat_switch_default_params`.
    pub struct_size: u32,
    /// The new tensor-parallel degree (required: the default 0 is refused).
    pub new_tp: u32,
    /// `PAT_KV_MIGRATE` (default), `PAT_KV_RECOMPUTE` or `PAT_KV_AUTO`.
    pub kv_policy: u32,
    pub reserved: u32,
    /// Cost model: KV transfer bandwidth (default 1e9) and fixed costs per sequence (default 0).
    pub transfer_bytes_per_s: f64,
    pub fixed_transfer_s: f64,
    pub fixed_prefill_s: f64,
    /// Prefill tokens/s at tp `prefill_tp[i]`, `n_prefill` entries (needed by `PAT_KV_AUTO` and
    /// `PAT_KV_RECOMPUTE`'s predictions; default none). Borrowed for the call.
    pub prefill_tp: *const u32,
    pub prefill_tokens_per_s: *const f64,
    pub n_prefill: usize,
}

impl Params for pat_switch_params {
    const MIN_SIZE: usize = size_of::<pat_switch_params>();
    fn defaults() -> Self {
        pat_switch_params {
            struct_size: size_of::<Self>() as u32,
            new_tp: 0,
            kv_policy: PAT_KV_MIGRATE,
            reserved: 0,
            transfer_bytes_per_s: 1e9,
            fixed_transfer_s: 0.0,
            fixed_prefill_s: 0.0,
            prefill_tp: std::ptr::null(),
            prefill_tokens_per_s: std::ptr::null(),
            n_prefill: 0,
        }
    }
}

/// The defaults of `pat_switch_params` (migrate at 1 GB/s; `new_tp` still to set). Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn pat_switch_default_params() -> pat_switch_params {
    pat_switch_params::defaults()
}

/// What the engine runs now.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pat_engine_info {
    pub world: u32,
    pub tp: u32,
    /// Replicas: world / tp.
    pub dp: u32,
    pub block_size: u32,
    /// KV blocks per rank granted (changes at every switch: the reshard frees or takes weight
    /// memory).
    pub kv_blocks: u64,
    /// Requests added so far (indices 0 .. n_requests - 1).
    pub n_requests: u64,
    /// Unfinished requests.
    pub n_live: u64,
    /// Steps run.
    pub n_steps: u64,
}

/// What one step did (`pat::engine::StepReport`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pat_step_report {
    pub step: u64,
    /// Tokens fed through the model (prefill + decode).
    pub tokens_in: u64,
    /// Tokens sampled.
    pub tokens_out: u64,
    /// Requests that finished in this step.
    pub finished: u64,
    pub elapsed_ms: f64,
}

/// A live sequence: what `pat_engine_live` reports, and what `pat_policy_decide` reads
/// (`replica`, `context`, `generated`, `est_remaining`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pat_live_seq {
    /// Request index.
    pub index: u64,
    /// Its replica in the current layout (0 .. world / tp - 1).
    pub replica: u32,
    pub reserved: u32,
    /// Tokens so far (prompt + generated): the KV it holds.
    pub context: u64,
    pub generated: u64,
    pub max_new_tokens: u64,
    /// Estimated tokens still to generate; NaN (what `pat_engine_live` writes) lets
    /// `pat_policy_decide` estimate it from its length samples.
    pub est_remaining: f64,
}

/// Reached `max_new_tokens`.
pub const PAT_FINISH_LENGTH: u32 = 0;
/// Produced an EOS token.
pub const PAT_FINISH_STOP: u32 = 1;

/// A finished request (`pat::engine::Output`); its generated ids go to the caller's buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pat_output {
    pub index: u64,
    pub n_input_ids: u64,
    pub n_output_ids: u64,
    /// `PAT_FINISH_*`.
    pub finish_reason: u32,
    pub reserved: u32,
}

/// What one switch did and cost (`pat::engine::SwitchReport`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pat_switch_report {
    pub from_tp: u32,
    pub to_tp: u32,
    /// Live sequences at the switch, and their cached tokens.
    pub n_inflight: u64,
    pub kv_tokens: u64,
    pub n_migrated: u64,
    pub n_recomputed: u64,
    pub weight_reshard_ms: f64,
    pub kv_migrate_ms: f64,
    pub kv_recompute_ms: f64,
    pub kv_alloc_ms: f64,
    pub comm_group_ms: f64,
    pub total_ms: f64,
    /// KV and weight bytes moved between ranks, and kept on their rank.
    pub bytes_cross_rank: u64,
    pub bytes_in_place: u64,
    /// The weights' share of `bytes_cross_rank` (0 when tp grows by a factor: shards nest).
    pub weight_bytes_cross_rank: u64,
    /// Most extra memory one rank held during the switch.
    pub peak_extra_bytes: u64,
    pub kv_blocks_before: u64,
    pub kv_blocks_after: u64,
    pub predicted_migrate_ms: f64,
    pub predicted_recompute_ms: f64,
}

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
            PAT_BACKEND_CUDA => Backend::Cuda { devices: None },
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
        let engine = handle::with(model, "pat_model", |m: &mut ModelDir| {
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
    handle::with(e, "pat_engine", f)
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
/// (prompt + `max_new_tokens`) fits beside the running ones; until then it waits. Error
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
/// fails after the swap, the new tp is live and the next step prefills those requests again.
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
        });
        Ok(())
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
