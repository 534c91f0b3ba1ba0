//! What the engine holds per request: the request, its live sequence state, and its output.

use rand_chacha::ChaCha8Rng;

/// One generation request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub input_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub ignore_eos: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// Reached max_new_tokens.
    Length,
    /// Produced an EOS token.
    Stop,
}

/// A finished request, in input order.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Output {
    pub index: usize,
    pub input_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    pub finish_reason: FinishReason,
}

/// What one step did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StepReport {
    pub step: usize,
    /// Live sequences per replica at the start of the step.
    pub live_per_replica: Vec<usize>,
    /// Tokens fed through the model (prefill + decode).
    pub tokens_in: usize,
    /// Of `tokens_in`, those fed by prefills: prompts, the chunks of prompts that did not fit
    /// one step's cap whole, sequences prefilled again after a failed step or recompute.
    pub prefill_tokens: usize,
    /// Tokens sampled: one per sequence that ran, less the prefill chunks that did not reach
    /// the end of their prompt (they sample nothing yet).
    pub tokens_out: usize,
    pub finished: usize,
    pub elapsed_ms: f64,
    /// Set when the KV pools grew since the previous step's report: in this step (part of
    /// `elapsed_ms`), or in `add_requests` or a failed step before it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_growth: Option<PoolGrowth>,
}

/// A KV pool growth into the weight bytes a switch freed (the devices could not hold them next
/// to the old layout during the switch): made by the first step that had to leave a request
/// waiting for blocks, by `add_requests` for a request larger than the pools, or by
/// `Engine::grow_kv_pools`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PoolGrowth {
    /// Blocks per rank before and after, and the goal: the old pool plus the shard bytes the
    /// switch freed.
    pub from_blocks: usize,
    pub to_blocks: usize,
    pub goal_blocks: usize,
    pub ms: f64,
    /// Bytes read plus written copying the blocks in use into the larger pools (GPU ranks; 0
    /// on the CPU, whose allocator's moves are not counted).
    pub copied_bytes: u64,
    /// Why the pools grew less than to the goal, or not at all, if so: the engine goes on with
    /// what they hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One request as the engine runs it.
pub(crate) struct Sequence {
    pub prompt_len: usize,
    /// Prompt followed by every generated token.
    pub tokens: Vec<u32>,
    pub max_new: usize,
    pub ignore_eos: bool,
    pub replica: usize,
    pub table: Vec<u32>,
    /// Tokens whose K/V are in the cache.
    pub cached: usize,
    pub finished: Option<FinishReason>,
    pub rng: ChaCha8Rng,
}

impl Sequence {
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
    /// Whether its next step is a decode: everything but the last sampled token is in the KV
    /// cache. Otherwise it is prefilling (a prompt, all of it or what is left of a chunked one,
    /// or a sequence whose KV is to be computed again).
    pub fn decoding(&self) -> bool {
        self.cached >= self.prompt_len && self.tokens.len() - self.cached == 1
    }
    /// Tokens this sequence still brings to its replica's KV: what it holds plus what it may
    /// still generate (the weight the scheduler balances).
    pub fn footprint(&self) -> usize {
        self.tokens.len() + self.max_new - self.generated()
    }
}

/// Prefill tokens/s over the steps seen so far (steps that prefilled, every token they fed over
/// their time); `None` before any prefill.
pub fn prefill_rate(steps: &[StepReport]) -> Option<f64> {
    let pre: Vec<&StepReport> = steps.iter().filter(|s| s.prefill_tokens > 0).collect();
    let toks: usize = pre.iter().map(|s| s.tokens_in).sum();
    let ms: f64 = pre.iter().map(|s| s.elapsed_ms).sum();
    (toks > 0 && ms > 0.0).then(|| toks as f64 / (ms / 1e3))
}
