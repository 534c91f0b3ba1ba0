//! Admission and per-step bookkeeping: checking requests against the model and the pool, placing
//! them on replicas (the one placement rule, `parallel::placement`), and granting each step's
//! KV blocks all or nothing.

use std::time::Instant;

use super::ranks::PoolGrow;
use super::sequence::{PoolGrowth, Request, Sequence};
use super::step_cap::StepRoom;
use super::{kv_block_bytes, Engine};
use crate::error::{Error, Result};
use crate::kv::blocks_for;
use crate::model::config::ModelConfig;
use crate::model::sampling::request_rng;
use crate::parallel::placement::balance_onto;
use crate::text::plural;

/// Checks a request against the model alone (what can be checked when a request file is read,
/// before any pool or prompt is built): a prompt, at least one new token, ids inside the
/// vocabulary, and prompt + `max_new_tokens` within `max_position_embeddings` (checked
/// arithmetic: a huge `max_new_tokens` cannot wrap past it).
pub fn check_request(cfg: &ModelConfig, index: usize, r: &Request) -> Result<()> {
    let bad = |m: String| Err(Error::Request(format!("request {index}: {m}")));
    if r.input_ids.is_empty() {
        return bad("empty prompt".into());
    }
    if r.max_new_tokens == 0 {
        return bad("`max_new_tokens` must be at least 1".into());
    }
    if let Some((pos, &id)) = r
        .input_ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= cfg.vocab_size)
    {
        return bad(format!(
            "token id {id} at position {pos} is out of range (vocab_size {})",
            cfg.vocab_size
        ));
    }
    check_lengths(cfg, r.input_ids.len(), r.max_new_tokens)
        .map_err(|m| Error::Request(format!("request {index}: {m}")))
}

/// Whether a prompt of `prompt_len` tokens followed by `max_new` new tokens fits the model's
/// positions (checked arithmetic); the message says what does not. For callers that know the
/// lengths before any prompt exists (traces, `--context`): check first, then build.
pub fn check_lengths(
    cfg: &ModelConfig,
    prompt_len: usize,
    max_new: usize,
) -> std::result::Result<(), String> {
    let max = cfg.max_position_embeddings;
    match prompt_len.checked_add(max_new) {
        Some(total) if total <= max => Ok(()),
        _ => Err(format!(
            "prompt ({prompt_len}) + max_new_tokens ({max_new}) exceeds max_position_embeddings {max}"
        )),
    }
}

impl Engine {
    /// Checks a request against the model and the pool without admitting it.
    pub fn validate_request(&self, index: usize, r: &Request) -> Result<()> {
        check_request(&self.cfg, index, r)?;
        let total = r.input_ids.len() + r.max_new_tokens;
        let need = blocks_for(total, self.opts.block_size);
        // A pool a switch left short may grow to its goal (`add_requests` grows it first).
        let most = match self.may_grow() {
            true => self.pool_goal,
            false => self.opts.kv_blocks,
        };
        if need > most {
            return Err(Error::KvExhausted(format!(
                "request {index} needs {need} blocks of {} but a rank's pool has {most} (raise `kv_blocks`)",
                plural(self.opts.block_size, "token")
            )));
        }
        Ok(())
    }

    /// Admits requests (all or none). They are placed longest first, each on the replica with
    /// the least work (live sequences' remaining footprint plus what this call placed).
    pub fn add_requests(&mut self, reqs: &[Request]) -> Result<()> {
        let base = self.seqs.len();
        for (i, r) in reqs.iter().enumerate() {
            check_request(&self.cfg, base + i, r)?;
        }
        let bs = self.opts.block_size;
        let most = reqs
            .iter()
            .map(|r| blocks_for(r.input_ids.len().saturating_add(r.max_new_tokens), bs))
            .max()
            .unwrap_or(0);
        if most > self.opts.kv_blocks && self.may_grow() {
            // A request the pool cannot hold alone may fit the pool grown into the bytes the
            // last switch freed; the next step reports the growth.
            let g = self.grow_pools();
            self.growth = Some(g);
        }
        for (i, r) in reqs.iter().enumerate() {
            self.validate_request(base + i, r)?;
        }
        let mut load = vec![0f64; self.layout.dp()];
        for s in self.seqs.iter().filter(|s| s.finished.is_none()) {
            load[s.replica] += s.footprint() as f64;
        }
        // Validated above: each sum fits (it is at most max_position_embeddings).
        let weights: Vec<f64> = reqs
            .iter()
            .map(|r| (r.input_ids.len() + r.max_new_tokens) as f64)
            .collect();
        let at = balance_onto(&weights, &load, None);
        for (i, (r, replica)) in reqs.iter().zip(at).enumerate() {
            self.seqs.push(Sequence {
                prompt_len: r.input_ids.len(),
                tokens: r.input_ids.clone(),
                max_new: r.max_new_tokens,
                ignore_eos: r.ignore_eos,
                replica,
                table: Vec::new(),
                cached: 0,
                finished: None,
                rng: request_rng(self.opts.sampling.seed, base + i),
            });
        }
        Ok(())
    }

    /// The unfinished sequences that run this step, in request order, each with how far its
    /// tokens are fed (`upto`: all of them, or the end of a prompt's chunk). A sequence that has
    /// started (it holds blocks or cached KV) keeps running; a waiting one is admitted when its
    /// whole footprint (prompt + `max_new_tokens`) fits the blocks its replica has free after
    /// what the running ones may still claim. Requests that each fit the pool but not together
    /// therefore queue and run as blocks free up, and a running sequence never runs out of
    /// blocks. Every request fits a whole pool (`validate_request`; a switch refuses to leave
    /// one that cannot fit its pools' goal, and a step grows short pools first), so a replica
    /// with waiting sequences and none running admits its first one; where a short pool could
    /// not grow enough, the step says so (an error) rather than run nothing.
    ///
    /// What a step prefills is also bounded by its cap (`StepRoom`): decodes count first and
    /// always run; then the prefills already under way (a chunked prompt, a sequence to prefill
    /// again after a failed step or recompute), then waiting prompts, each feeding what fits
    /// what is left. A prompt too long for that is fed in chunks over several steps and samples
    /// once its last chunk is in; the first prefill of a step takes at least one token whatever
    /// is left, so every step makes progress.
    ///
    /// Also says whether a waiting prompt was left out for want of blocks (not of room in the
    /// step's cap): what a pool growth after a switch could change.
    pub(super) fn admitted(&self) -> (Vec<(usize, usize)>, bool) {
        let bs = self.opts.block_size;
        let mut spare: Vec<usize> = self.allocs.iter().map(|a| a.free_blocks()).collect();
        let started = |s: &Sequence| s.cached > 0 || !s.table.is_empty();
        let mut room = self.step_room();
        let mut run = Vec::new();
        let live = || {
            self.seqs
                .iter()
                .enumerate()
                .filter(|(_, s)| s.finished.is_none())
        };
        for (i, s) in live().filter(|(_, s)| started(s)) {
            let owed = blocks_for(s.footprint(), bs).saturating_sub(s.table.len());
            spare[s.replica] = spare[s.replica].saturating_sub(owed);
            if s.decoding() {
                room.charge(s.replica, 1);
                run.push((i, s.tokens.len()));
            }
        }
        for (i, s) in live().filter(|(_, s)| started(s) && !s.decoding()) {
            let n = room.take(s.replica, s.tokens.len() - s.cached);
            if n > 0 {
                run.push((i, s.cached + n));
            }
        }
        let mut short = false;
        for (i, s) in live().filter(|(_, s)| !started(s)) {
            let need = blocks_for(s.footprint(), bs);
            if need > spare[s.replica] {
                short = true;
                continue;
            }
            let n = room.take(s.replica, s.tokens.len());
            if n > 0 {
                spare[s.replica] -= need;
                run.push((i, n));
            }
        }
        run.sort_unstable();
        (run, short)
    }

    /// A fresh room for one step's (or one recompute pass's) prefills under the current layout.
    pub(super) fn step_room(&self) -> StepRoom {
        let (tp, dp) = (self.layout.tp, self.layout.dp());
        let (cap, tokens) = (self.step_cap, self.prefill_tokens);
        StepRoom::new(cap, tokens, &self.cfg, tp, dp, self.opts.block_size)
    }

    /// Whether the pools are short of their goal and no growth was tried since the last switch.
    pub(super) fn may_grow(&self) -> bool {
        !self.grow_tried && self.pool_goal > self.opts.kv_blocks
    }

    /// Grows the KV pools toward `pool_goal` blocks per rank (the bytes the last switch freed
    /// that the devices could not give the new pools next to the old layout), keeping every
    /// block a table holds; tried once per switch. The engine goes on with what the pools hold
    /// whatever happens: a failure is the growth's note, not an error.
    pub(super) fn grow_pools(&mut self) -> PoolGrowth {
        let t = Instant::now();
        let from = self.opts.kv_blocks;
        let goal = self.pool_goal;
        self.grow_tried = true;
        let used = self
            .seqs
            .iter()
            .filter(|s| s.finished.is_none())
            .flat_map(|s| s.table.iter())
            .map(|&b| b as usize + 1)
            .max()
            .unwrap_or(0);
        let elem = self.ranks.set_ref().elem_bytes() as usize;
        // A test's cap on the pools (`cap_switch_pools`) holds here too.
        let reach = goal.min(self.switch_pool_cap.unwrap_or(usize::MAX));
        let grow = PoolGrow {
            blocks: from,
            goal: reach,
            used,
            block_bytes: kv_block_bytes(&self.cfg, self.layout.tp, self.opts.block_size, elem),
            layers: self.cfg.num_layers,
        };
        let grown = match reach > from {
            true => self.ranks.set().grow_pools(&grow),
            false => Ok((from, 0)),
        };
        let (to, copied, note) = match grown {
            Ok((to, copied)) => {
                let note = (to < goal).then(|| {
                    format!("the devices had room for {to} of the {goal} blocks per rank")
                });
                (to.max(from), copied, note)
            }
            Err(e) => (
                from,
                0,
                Some(format!("the pools stay at {from} blocks: {e}")),
            ),
        };
        for a in &mut self.allocs {
            a.grow_to(to);
        }
        self.opts.kv_blocks = to;
        if reach > from {
            // The pools took memory the steps had (a growth that failed part-way keeps what
            // some ranks grew): their cap is read again.
            self.refresh_step_cap_or_least();
        }
        PoolGrowth {
            from_blocks: from,
            to_blocks: to,
            goal_blocks: goal,
            ms: t.elapsed().as_secs_f64() * 1e3,
            copied_bytes: copied,
            note,
        }
    }

    /// Blocks for the tokens this step feeds (sequence `i` up to token `upto`, for each in
    /// `run`), all or nothing: on error no table has grown.
    pub(super) fn grant_blocks(&mut self, run: &[(usize, usize)]) -> Result<()> {
        let mut granted: Vec<(usize, Vec<u32>)> = Vec::new();
        for &(i, upto) in run {
            let s = &self.seqs[i];
            let need = blocks_for(upto, self.opts.block_size).saturating_sub(s.table.len());
            match self.allocs[s.replica].alloc(need) {
                Ok(b) => granted.push((i, b)),
                Err(e) => {
                    for (j, b) in granted {
                        self.allocs[self.seqs[j].replica].release(&b);
                    }
                    return Err(e);
                }
            }
        }
        for (i, b) in granted {
            self.seqs[i].table.extend(b);
        }
        Ok(())
    }

    /// Blocks per rank that hold every request in `reqs` at once; an error when the count does
    /// not fit a `usize` (lengths from an untrusted file).
    pub fn blocks_needed(reqs: &[Request], block_size: usize) -> Result<usize> {
        Self::blocks_for_lengths(
            reqs.iter().map(|r| (r.input_ids.len(), r.max_new_tokens)),
            block_size,
        )
    }

    /// [`Engine::blocks_needed`] from (prompt length, max new tokens) pairs, before any prompt
    /// is built.
    pub fn blocks_for_lengths(
        lens: impl IntoIterator<Item = (usize, usize)>,
        block_size: usize,
    ) -> Result<usize> {
        let mut total = 0usize;
        for (prompt, max_new) in lens {
            let n = prompt
                .checked_add(max_new)
                .map(|t| blocks_for(t, block_size.max(1)))
                .and_then(|b| total.checked_add(b));
            total = n.ok_or_else(|| {
                Error::Invalid(format!(
                    "the requests' lengths add up past {} tokens",
                    usize::MAX
                ))
            })?;
        }
        Ok(total)
    }
}
