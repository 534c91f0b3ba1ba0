//! The C-visible types and constants of the engine calls (`pat.h`'s engine section).

use crate::util::Params;

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
    /// Tokens sampled: one per decoding request, and one per prompt whose last chunk went in
    /// (a prompt fed in chunks samples nothing before that).
    pub tokens_out: u64,
    /// Of `tokens_in`, the prompt tokens (and those of requests prefilled again): at most
    /// the cap of `pat_engine_cap_step_tokens`, when one is set.
    pub prefill_tokens: u64,
    /// Requests that finished in this step.
    pub finished: u64,
    pub elapsed_ms: f64,
}

/// A live sequence: what `pat_engine_live` reports, and what `pat_policy_decide` reads
/// (`replica`, `context`, `kv_tokens`, `generated`, `est_remaining`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pat_live_seq {
    /// Request index.
    pub index: u64,
    /// Its replica in the current layout (0 .. world / tp - 1).
    pub replica: u32,
    pub reserved: u32,
    /// Tokens so far (prompt + generated): what its decode steps attend over.
    pub context: u64,
    /// Of `context`, the tokens whose KV it holds now: what a switch moves or recomputes.
    /// `context - 1` for a request decoding (its last sampled token is not in yet), fewer for a
    /// prompt part way in, 0 for one waiting for room. `pat_policy_decide` refuses a value above
    /// `context`; fill it with `context` for a request that holds all of its KV (new in ABI 3:
    /// a zero-filled struct says it holds none, and its switch then moves none).
    pub kv_tokens: u64,
    /// Of `context`, the tokens it generated so far (the policy calls refuse more than
    /// `context`, and a `context` or `est_remaining` above 2^32 tokens).
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
    /// Blocks per rank the pools may grow to later: the old pool plus the weight bytes the
    /// reshard freed. Above `kv_blocks_after` where the devices could not hold them next to the
    /// old layout; a step that has to leave a request waiting grows the pools into them, or
    /// `pat_engine_grow_kv_pools` does now.
    pub kv_blocks_goal: u64,
    /// Forward passes the recompute took: one, or more where the recomputed tokens' activations
    /// outgrow what one step may prefill (`pat_engine_refresh_step_cap`) or the cap on a step's
    /// prompt tokens (`pat_engine_cap_step_tokens`); a long sequence is recomputed in chunks.
    pub kv_recompute_passes: u64,
}

/// What `pat_engine_grow_kv_pools` did (`pat::engine::PoolGrowth`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pat_pool_growth {
    /// 1 where a growth was tried; 0 where there was nothing to grow (no switch left the pools
    /// short of their goal, or a growth was tried since), and the blocks below are the pools'
    /// as they stand.
    pub tried: u32,
    /// 1 where the pools reached their goal.
    pub reached_goal: u32,
    /// KV blocks per rank before and after, and the goal.
    pub from_blocks: u64,
    pub to_blocks: u64,
    pub goal_blocks: u64,
    /// Bytes read plus written copying the blocks in use into the larger pools (GPU ranks; 0
    /// on the CPU).
    pub copied_bytes: u64,
    pub elapsed_ms: f64,
}
