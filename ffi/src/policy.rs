//! The switch policy as pure calls (`pat::policy::{Profile, Predictor, SwitchCost, decide}`):
//! a profile and the live batch in, stay or (target tp, predicted gain, predicted cost) out; and
//! where a new batch should start, with the ladder foreseen from there. The caller decides
//! whether and when to act on them.

use std::ffi::c_char;
use std::path::Path;

use pat::parallel::layout::MAX_WORLD;
use pat::policy::decide::{placed_at, start_plan};
use pat::policy::remaining::SeqView;
use pat::policy::{
    decide, DecideInput, EstimatedSeq, LengthDist, Predictor, Profile, Remaining, SwitchCost,
};

use crate::engine::pat_live_seq;
use crate::status::{guard, pat_status, Fail, FfiResult};
use crate::util::{copy_out, read_params, slice, u32_of, Out, Params};

/// Settings of `pat_policy_decide` (`pat::policy::DecideInput` and the remaining-length
/// estimate).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pat_policy_params {
    /// sizeof(pat_policy_params), set by `pat_policy_default_params`.
    pub struct_size: u32,
    /// Ranks; 0 (the default): the profile's `world`.
    pub world: u32,
    /// The tp the live batch runs at now (required: the default 0 is refused).
    pub current_tp: u32,
    /// Also forecast "switch this many steps later" and switch now only if now is no worse
    /// (use the re-check interval); 0 (the default) = off.
    pub lookahead_steps: u32,
    /// Relative predicted gain over staying a switch must bring, in [0, 1) (default 0.1).
    pub margin: f64,
    /// Absolute predicted gain a switch must bring, ms (default 0).
    pub min_gain_ms: f64,
    /// Tp degrees that may be chosen, `n_candidates` entries (at least one); NULL (the
    /// default, whatever `n_candidates` says): every tp the profile has step times for that
    /// divides world and the model's heads and intermediate size. Borrowed for the call.
    pub candidates: *const u32,
    pub n_candidates: usize,
    /// Observed response lengths (earlier rollouts, a trace), `n_length_samples` entries: they
    /// estimate the remaining length of live sequences whose `est_remaining` is NaN (the
    /// empirical mean residual life, `pat::policy::remaining`). Borrowed for the call.
    pub length_samples: *const u64,
    pub n_length_samples: usize,
    /// The generation cap, if known (bounds the estimate); 0 (the default) = none.
    pub length_cap: u64,
    /// Value each candidate by its best plan with one more switch, tried at this many evenly
    /// spaced later steps (multiples of `lookahead_steps`), and switch only when that also beats
    /// the current layout's own best plan that waits; pass 16 where the engine may switch at
    /// least twice more (what `pat rollout` and `pat simulate` do); 0 (the default) = value a
    /// candidate as if it stayed for good. Added after ABI version 1's first release: a caller's
    /// shorter struct (`struct_size` without it) reads as 0.
    pub follow_up_points: u32,
    /// The tp the engine's last switch in this rollout left; 0 (the default) = none yet. Going
    /// back to it must clear twice `margin` (a fresh placement always looks balanced next to
    /// the one sequences finished unevenly on, and a wide node oscillated on that alone). Added
    /// after `follow_up_points`: a shorter struct reads as 0.
    pub came_from_tp: u32,
}

impl Params for pat_policy_params {
    const MIN_SIZE: usize = std::mem::offset_of!(pat_policy_params, follow_up_points);
    fn defaults() -> Self {
        pat_policy_params {
            struct_size: size_of::<Self>() as u32,
            world: 0,
            current_tp: 0,
            lookahead_steps: 0,
            margin: 0.1,
            min_gain_ms: 0.0,
            candidates: std::ptr::null(),
            n_candidates: 0,
            length_samples: std::ptr::null(),
            n_length_samples: 0,
            length_cap: 0,
            follow_up_points: 0,
            came_from_tp: 0,
        }
    }
}

/// The defaults of `pat_policy_params` (`current_tp` still to set). Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn pat_policy_default_params() -> pat_policy_params {
    pat_policy_params::defaults()
}

/// The rule's answer (`pat::policy::Decision`). Times are predicted ms to drain the live batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pat_decision {
    /// The tp to switch to; the current tp when staying.
    pub to_tp: u32,
    /// Candidates forecast (the current tp excluded).
    pub n_candidates: u32,
    /// Staying at the current tp.
    pub predicted_stay_ms: f64,
    /// Switching to `to_tp`, switch cost included (= `predicted_stay_ms` when staying).
    pub predicted_best_ms: f64,
    /// `predicted_stay_ms - predicted_best_ms` (0 when staying).
    pub predicted_gain_ms: f64,
    /// The switch's predicted cost: fixed + weights + KV (0 when staying).
    pub switch_cost_ms: f64,
    /// True: stay at the current tp.
    pub stay: bool,
}

/// Tokens a sequence's context or estimate may reach (far past any model's context window; the
/// forecast's sums stay exact below it).
const MAX_TOKENS: u64 = 1 << 32;

/// Each sequence's remaining-length estimate, NaN ones estimated from the params' samples;
/// `what` names the array in messages.
///
/// # Safety
/// The params' `length_samples` array holds `n_length_samples` entries (the policy calls'
/// contract).
unsafe fn estimates(
    p: &pat_policy_params,
    live: &[pat_live_seq],
    what: &str,
) -> FfiResult<Vec<f64>> {
    for (i, s) in live.iter().enumerate() {
        if s.context > MAX_TOKENS {
            return Err(Fail::Invalid(format!(
                "{what}[{i}].context is {}: at most {MAX_TOKENS} tokens",
                s.context
            )));
        }
        if s.kv_tokens > s.context {
            return Err(Fail::Invalid(format!(
                "{what}[{i}].kv_tokens is {} but its context is {}: a sequence holds the KV of at most its tokens",
                s.kv_tokens, s.context
            )));
        }
        if s.generated > s.context {
            return Err(Fail::Invalid(format!(
                "{what}[{i}].generated is {} but its context is {}: the context counts the prompt and the generated tokens",
                s.generated, s.context
            )));
        }
    }
    // NaN asks for an estimate; anything else must be finite, >= 0 and at most MAX_TOKENS.
    let bad = |x: f64| x < 0.0 || x > MAX_TOKENS as f64;
    if let Some((i, s)) = live.iter().enumerate().find(|(_, s)| bad(s.est_remaining)) {
        return Err(Fail::Invalid(format!(
            "{what}[{i}].est_remaining is {:?}: give an estimate from 0 to {MAX_TOKENS} tokens, or NaN to estimate it",
            s.est_remaining
        )));
    }
    let mut est: Vec<f64> = live.iter().map(|s| s.est_remaining).collect();
    if est.iter().any(|e| e.is_nan()) {
        // SAFETY: this function's contract.
        let samples = unsafe { slice(p.length_samples, p.n_length_samples, "length_samples") }?;
        if samples.is_empty() {
            return Err(Fail::Invalid(format!(
                "a {what} sequence's est_remaining is NaN and no length_samples were given to estimate it"
            )));
        }
        if let Some((i, x)) = samples.iter().enumerate().find(|(_, &x)| x > MAX_TOKENS) {
            return Err(Fail::Invalid(format!(
                "length_samples[{i}] is {x}: at most {MAX_TOKENS} tokens"
            )));
        }
        if p.length_cap > MAX_TOKENS {
            return Err(Fail::Invalid(format!(
                "length_cap is {}: at most {MAX_TOKENS} tokens (0: none)",
                p.length_cap
            )));
        }
        let lengths: Vec<usize> = samples.iter().map(|&x| x as usize).collect();
        let cap = (p.length_cap > 0).then_some(p.length_cap as usize);
        let remaining = Remaining::Empirical(LengthDist::new(&lengths, cap)?);
        let views: Vec<SeqView> = live
            .iter()
            .map(|s| SeqView {
                generated: s.generated as usize,
                replica: s.replica as usize,
                true_len: None,
                live_siblings: 0,
            })
            .collect();
        for (e, x) in est.iter_mut().zip(remaining.estimate_set(&views)?) {
            if e.is_nan() {
                *e = x;
            }
        }
    }
    Ok(est)
}

/// `live` as the rule sees it, each NaN estimate filled in ([`estimates`]).
///
/// # Safety
/// As [`estimates`].
unsafe fn estimated(
    p: &pat_policy_params,
    live: &[pat_live_seq],
    what: &str,
) -> FfiResult<Vec<EstimatedSeq>> {
    // SAFETY: this function's contract.
    let est = unsafe { estimates(p, live, what) }?;
    Ok(live
        .iter()
        .zip(est)
        .map(|(s, est_remaining)| EstimatedSeq {
            replica: s.replica as usize,
            context: s.context as usize,
            kv: s.kv_tokens as usize,
            generated: s.generated as usize,
            est_remaining,
            cached: true,
        })
        .collect())
}

/// The arguments both policy calls take: the params (required), the profile's bytes and the
/// sequences, `what` naming the latter.
///
/// # Safety
/// `profile_json` holds `len` bytes; `params` is NULL or a readable `pat_policy_params`; `seqs`
/// holds `n` entries; all valid for `'a`.
unsafe fn args<'a>(
    profile_json: *const c_char,
    len: usize,
    params: *const pat_policy_params,
    seqs: *const pat_live_seq,
    n: usize,
    what: &'static str,
) -> FfiResult<(pat_policy_params, &'a [u8], &'a [pat_live_seq])> {
    if params.is_null() {
        return Err(Fail::Null("params"));
    }
    // SAFETY: this function's contract.
    unsafe {
        Ok((
            read_params(params, "params")?,
            slice(profile_json.cast::<u8>(), len, "profile_json")?,
            slice(seqs, n, what)?,
        ))
    }
}

/// What both policy calls read from the profile and the params.
struct Inputs {
    predictor: Predictor,
    switch: SwitchCost,
    world: usize,
    candidates: Vec<usize>,
}

/// Parses `bytes` (profile JSON) and resolves the params' world and candidates.
///
/// # Safety
/// The params' `candidates` array holds `n_candidates` entries (the policy calls' contract).
unsafe fn inputs(p: &pat_policy_params, bytes: &[u8]) -> FfiResult<Inputs> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| Fail::Invalid("`profile_json` is not UTF-8".into()))?;
    let profile = Profile::from_json(text, Path::new("<profile json>"))?;
    let predictor = Predictor::from_profile(&profile)?;
    let switch = SwitchCost::from_profile(&profile);
    let world = if p.world == 0 {
        profile.world
    } else {
        p.world as usize
    };
    // Before anything sized by it (a placement over 4e9 replicas was an abort).
    if world == 0 || world > MAX_WORLD {
        return Err(Fail::Invalid(format!(
            "world {world}: a world is 1 to {MAX_WORLD} ranks"
        )));
    }
    let candidates: Vec<usize> = if p.candidates.is_null() {
        profile
            .model
            .candidate_tps(world)
            .into_iter()
            .filter(|&t| predictor.fit(t).is_ok())
            .collect()
    } else if p.n_candidates == 0 {
        return Err(Fail::Invalid(
            "`n_candidates` is 0 with `candidates` set: give at least one tp, or NULL \
         `candidates` for every tp the profile covers"
                .into(),
        ));
    } else {
        // SAFETY: this function's contract.
        unsafe { slice(p.candidates, p.n_candidates, "candidates") }?
            .iter()
            .map(|&t| t as usize)
            .collect()
    };
    Ok(Inputs {
        predictor,
        switch,
        world,
        candidates,
    })
}

/// Whether the live batch should switch tp now, and to what: the profile's step-time predictor
/// forecasts draining the live sequences at the current tp and at each candidate (re-placed over
/// the candidate's replicas), each candidate paying its switch cost (fixed, weights, KV); the
/// best one is taken when it beats staying by `margin` and `min_gain_ms` (`pat::policy::decide`).
/// Pure: nothing is kept between calls. `profile_json` is `len` bytes of profile JSON (what
/// `pat profile` writes; UTF-8, no NUL needed); `live` holds `n_live` sequences (only `replica`,
/// `context`, `kv_tokens`, `generated` and `est_remaining` are read: `pat_engine_live` fills
/// them; a switch is costed by the `kv_tokens` it moves). `params` is required (`current_tp`).
/// Errors: `PAT_ERR_BAD_FILE` (malformed profile), `PAT_ERR_INVALID_ARGUMENT` (a bad tp,
/// margin, replica, world or estimate, `kv_tokens` or `generated` above `context`, a context or
/// estimate above 2^32 tokens, where an estimate is NaN a length sample or `length_cap` above
/// 2^32, or a candidate without step times in the profile). Thread-safe.
///
/// # Safety
/// `profile_json` holds `len` bytes; `params` is a readable `pat_policy_params` whose arrays hold
/// their counts; `live` holds `n_live` entries; `out` is a writable `pat_decision`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_policy_decide(
    profile_json: *const c_char,
    len: usize,
    params: *const pat_policy_params,
    live: *const pat_live_seq,
    n_live: usize,
    out: *mut pat_decision,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is writable).
        let out = unsafe { Out::new(out, "out") }?;
        // SAFETY: forwarded contract.
        let (p, bytes, live) = unsafe { args(profile_json, len, params, live, n_live, "live") }?;
        let Inputs {
            predictor,
            switch,
            world,
            candidates,
            // SAFETY: forwarded contract (the params' arrays hold their counts).
        } = unsafe { inputs(&p, bytes) }?;
        // SAFETY: forwarded contract (the params' arrays hold their counts).
        let seqs = unsafe { estimated(&p, live, "live") }?;
        let d = decide(&DecideInput {
            world,
            current_tp: p.current_tp as usize,
            candidates: &candidates,
            live: &seqs,
            predictor: &predictor,
            switch: &switch,
            margin: p.margin,
            min_gain_ms: p.min_gain_ms,
            lookahead_steps: p.lookahead_steps as usize,
            follow_up_points: p.follow_up_points as usize,
            came_from: (p.came_from_tp > 0).then_some(p.came_from_tp as usize),
        })?;
        out.put(pat_decision {
            to_tp: u32_of(d.to_tp),
            n_candidates: u32_of(d.candidates.len()),
            predicted_stay_ms: d.predicted_stay_ms,
            predicted_best_ms: d.predicted_best_ms,
            predicted_gain_ms: d.predicted_stay_ms - d.predicted_best_ms,
            switch_cost_ms: d.switch_cost_ms,
            stay: d.stay,
        });
        Ok(())
    })
}

/// One switch of a start plan's ladder.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct pat_plan_switch {
    /// Decode steps after the batch starts.
    pub step: u64,
    /// The tp it switches to.
    pub to_tp: u32,
    pub reserved: u32,
}

/// Where a batch should start (`pat::policy::decide::StartPlan`). Times are predicted ms to
/// drain the whole batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct pat_start_plan {
    /// The tp to start at.
    pub start_tp: u32,
    /// Switches of the chosen plan (written to `switches`); 0 when the plan never switches.
    pub n_switches: u32,
    /// The chosen plan, switch costs included.
    pub predicted_ms: f64,
    /// The best plan that never switches: its tp and predicted ms (`start_tp` and
    /// `predicted_ms` when that plan is the one chosen).
    pub stay_tp: u32,
    pub reserved: u32,
    pub predicted_stay_ms: f64,
}

/// Where a new batch should start, and the ladder of switches the rule foresees from there: the
/// best predicted plan over every candidate start and any number of switches, at about 48 evenly
/// spaced switch points (up to 96: the spacing is rounded down to a multiple of
/// `params->lookahead_steps`, the engine's re-check interval; 0: any step), each switch paying
/// its cost (fixed, weights, KV) — unless it beats the best plan that never switches by less
/// than twice the profile's measured spread, then that plan (`pat::policy::decide::start_plan`,
/// what `pat rollout` and `pat simulate` start on). The foreseen switches are a forecast: decide
/// each one when it comes with `pat_policy_decide`. Pure: nothing is kept between calls.
/// `profile_json` and `params` as for `pat_policy_decide`, of whose params this reads `world`,
/// `candidates`, `lookahead_steps`, `length_samples` and `length_cap` (not `current_tp` or the
/// margins). `batch` holds `n_batch` requests (at least one), read as by `pat_policy_decide`
/// except `replica`: each start places the batch itself, balanced on the estimates over its
/// replicas. The plan's switches go to `switches` (buffer negotiation as `pat_kv_plan_steps`:
/// `*n_switches` is set to the count, and a `cap` too small fails with `PAT_BUFFER_TOO_SMALL`,
/// `out` unwritten; a plan has at most one switch per switch point, and rarely more than the
/// candidates). Errors as `pat_policy_decide`, and `PAT_ERR_INVALID_ARGUMENT` for an empty
/// batch. Thread-safe.
///
/// # Safety
/// `profile_json` holds `len` bytes; `params` is a readable `pat_policy_params` whose arrays hold
/// their counts; `batch` holds `n_batch` entries; `out` is a writable `pat_start_plan`;
/// `switches` is NULL or holds `cap` writable entries; `n_switches` is a writable `size_t`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn pat_policy_plan_start(
    profile_json: *const c_char,
    len: usize,
    params: *const pat_policy_params,
    batch: *const pat_live_seq,
    n_batch: usize,
    out: *mut pat_start_plan,
    switches: *mut pat_plan_switch,
    cap: usize,
    n_switches: *mut usize,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` and `n_switches` are writable).
        let (out, n) = unsafe { (Out::new(out, "out")?, Out::new(n_switches, "n_switches")?) };
        // SAFETY: forwarded contract.
        let (p, bytes, batch) =
            unsafe { args(profile_json, len, params, batch, n_batch, "batch") }?;
        if batch.is_empty() {
            return Err(Fail::Invalid(
                "`batch` is empty: give the requests the batch will start with".into(),
            ));
        }
        let Inputs {
            predictor,
            switch,
            world,
            candidates,
            // SAFETY: forwarded contract (the params' arrays hold their counts).
        } = unsafe { inputs(&p, bytes) }?;
        if candidates.is_empty() {
            return Err(Fail::Invalid(format!(
                "no candidate tp: the profile has step times for no tp that divides world {world} \
                 and the model"
            )));
        }
        // SAFETY: forwarded contract (the params' arrays hold their counts).
        let seqs = unsafe { estimated(&p, batch, "batch") }?;
        let base = DecideInput {
            world,
            current_tp: candidates[0],
            candidates: &candidates,
            live: &seqs,
            predictor: &predictor,
            switch: &switch,
            margin: 0.0,
            min_gain_ms: 0.0,
            lookahead_steps: p.lookahead_steps as usize,
            follow_up_points: 0,
            came_from: None,
        };
        // Each start places the batch over its replicas (a tp that does not divide the world is
        // refused by the plan below, before any placement is read).
        let starts: Vec<(usize, Vec<EstimatedSeq>)> = candidates
            .iter()
            .map(|&tp| match tp > 0 && world.is_multiple_of(tp) {
                true => (tp, placed_at(world, tp, &seqs)),
                false => (tp, seqs.clone()),
            })
            .collect();
        let plan = start_plan(&base, &starts, p.lookahead_steps as usize, None)?;
        let steps: Vec<pat_plan_switch> = plan
            .switches
            .iter()
            .map(|&(step, tp)| pat_plan_switch {
                step: step as u64,
                to_tp: u32_of(tp),
                reserved: 0,
            })
            .collect();
        // SAFETY: forwarded contract.
        unsafe { copy_out(&steps, switches, cap, &n, "switches") }?;
        out.put(pat_start_plan {
            start_tp: u32_of(plan.tp),
            n_switches: u32_of(steps.len()),
            predicted_ms: plan.predicted_ms,
            stay_tp: u32_of(plan.stay.0),
            reserved: 0,
            predicted_stay_ms: plan.stay.1,
        });
        Ok(())
    })
}
