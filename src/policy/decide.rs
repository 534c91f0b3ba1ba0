//! The switch cost model and the stay-or-switch rule, re-checked every K decode steps.
//!
//! For the current layout and every candidate tp, the rule predicts the time to drain the live set
//! ([`drain_ms`]: remaining estimates, lockstep replicas, predictor step times, the KV
//! room per replica the profile states). Staying keeps the current placement; a candidate
//! re-places the live sequences over its `world / tp` replicas balanced by estimated remaining
//! length and pays [`SwitchCost::cost`]. The best candidate is taken when its total beats staying
//! by the margin:
//!
//! ```text
//! best_total <= stay * (1 - margin)   and   stay - best_total >= min_gain_ms
//! ```
//!
//! so a switch never happens when the predicted gain (stay - drain at the candidate) does not
//! exceed its cost. Re-checking every K steps lets a ladder (TP2 -> 4 -> 8) emerge on its own.
//!
//! *When* matters as much as *to what*: beating "stay forever" is not enough if switching a little
//! later is better still (the big batch is about to finish, and until then the current layout is
//! the faster one). With `lookahead_steps = K > 0` the best candidate is also forecast as "stay K
//! more steps, then switch to it" (the live set advanced by K steps, its KV grown by K tokens);
//! the switch happens now only if now is no worse than then. Since the rule runs again K steps
//! later, the switch lands at the first check where waiting stops paying.
//!
//! *Where to next* depends on what comes after: valued as if it stayed for good, TP4 can beat TP2
//! from TP1 when the best plan is TP2 now and TP4 once the big batch has drained. With
//! `follow_up_points = P > 0` each candidate is valued by its best plan with one more switch
//! ([`plan_ms`]: stay, or switch to another candidate at one of P evenly spaced later steps), and
//! a switch also has to beat the current layout's own best plan whose switch waits at least K
//! steps (so a ladder is not walked back the check after it was climbed). The controller sets
//! P only when the run may still switch twice (PAT's rule switches once: no follow-up).
//!
//! Switch cost, from `from` to `to` tp (all per switch, ms):
//!
//! - fixed: the profile's `switch.fixed_ms` (groups, graph recapture, barriers).
//! - weights: tp grows by a multiple -> 0 bytes (nested shards: each new shard lies inside the
//!   rank's old one, compaction in place). tp shrinks by a divisor -> each rank receives its
//!   missing pieces, `W (1/to - 1/from)` bytes, at `weight_bytes_per_s` (ranks receive in
//!   parallel). Neither divides the other -> the whole new shard `W / to` (conservative). `W` is
//!   every tp-split weight's bytes.
//! - KV, per live sequence with `n` cached tokens: the engine's own migrate-or-recompute cost
//!   model ([`CostModel`], the one switch cost model) on `n * KV_tok * (1 - min(from,to)/max(from,to))`
//!   bytes (the slices the sequence's old ranks already hold for their new heads stay) and `n`
//!   tokens to re-prefill at `to`. Sequences are summed (handled one after another: conservative).

use rayon::prelude::*;

use super::forecast::{drain_ms, Pending, Room};
use super::predictor::Predictor;
use super::profile::Profile;
use crate::error::{Error, Result};
use crate::parallel::layout::MAX_WORLD;
use crate::parallel::placement::balance;
use crate::reshard::cost::{CostModel, KvMode};

/// Costs of changing the tp degree (formulas in the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct SwitchCost {
    pub fixed_ms: f64,
    pub weight_bytes_per_s: f64,
    /// Bytes of every tp-split weight of the model (tp = 1).
    pub sharded_weight_bytes: f64,
    /// K+V bytes per cached token, all layers and kv heads.
    pub kv_bytes_per_token: f64,
    /// The migrate-or-recompute model the engine uses for each sequence (no prefill rates: never
    /// recompute).
    pub kv: CostModel,
}

/// One switch's cost, split by part.
#[derive(Clone, Copy, Debug, PartialEq, Default, serde::Serialize)]
pub struct SwitchBreakdown {
    pub fixed_ms: f64,
    pub weight_ms: f64,
    pub kv_ms: f64,
    pub total_ms: f64,
    pub migrated: usize,
    pub recomputed: usize,
}

impl SwitchCost {
    /// A switch that costs `fixed_ms` whatever it moves (no weight or KV terms; never recompute).
    pub fn flat(fixed_ms: f64) -> SwitchCost {
        SwitchCost {
            fixed_ms,
            weight_bytes_per_s: 1.0,
            sharded_weight_bytes: 0.0,
            kv_bytes_per_token: 0.0,
            kv: CostModel {
                transfer_bytes_per_s: 1.0,
                fixed_transfer_s: 0.0,
                prefill_tokens_per_s: vec![],
                fixed_prefill_s: 0.0,
            },
        }
    }

    pub fn from_profile(p: &Profile) -> SwitchCost {
        SwitchCost {
            fixed_ms: p.switch.fixed_ms,
            weight_bytes_per_s: p.switch.weight_bytes_per_s,
            sharded_weight_bytes: p.model.sharded_weight_bytes(),
            kv_bytes_per_token: p.model.kv_bytes_per_token(),
            kv: p.cost_model(),
        }
    }

    /// Weight bytes each rank receives going from `from` to `to`.
    pub fn weight_bytes(&self, from: usize, to: usize) -> f64 {
        let w = self.sharded_weight_bytes;
        if to == from || to.is_multiple_of(from) {
            0.0
        } else if from.is_multiple_of(to) {
            w * (1.0 / to as f64 - 1.0 / from as f64)
        } else {
            w / to as f64
        }
    }

    /// (ms, recomputed?) for one sequence with `tokens` cached tokens.
    pub fn kv_seq_ms(&self, from: usize, to: usize, tokens: usize) -> (f64, bool) {
        if from == to {
            return (0.0, false);
        }
        let moved = 1.0 - from.min(to) as f64 / from.max(to) as f64;
        let bytes = tokens as f64 * self.kv_bytes_per_token * moved;
        match self.kv.choose(to, tokens, bytes) {
            KvMode::Migrate => (1e3 * self.kv.migrate_s(bytes), false),
            KvMode::Recompute => (1e3 * self.kv.recompute_s(to, tokens), true),
        }
    }

    /// Cost of switching `from` -> `to` with live sequences of the given cached-token counts.
    pub fn cost(&self, from: usize, to: usize, contexts: &[usize]) -> SwitchBreakdown {
        if from == to {
            return SwitchBreakdown::default();
        }
        let mut b = SwitchBreakdown {
            fixed_ms: self.fixed_ms,
            weight_ms: 1e3 * self.weight_bytes(from, to) / self.weight_bytes_per_s,
            ..Default::default()
        };
        for &n in contexts {
            let (ms, rec) = self.kv_seq_ms(from, to, n);
            b.kv_ms += ms;
            if rec {
                b.recomputed += 1;
            } else {
                b.migrated += 1;
            }
        }
        b.total_ms = b.fixed_ms + b.weight_ms + b.kv_ms;
        b
    }
}

/// A live sequence as the decision rule sees it: where it is, what it holds, and an estimate of
/// what it still has to generate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EstimatedSeq {
    /// Its replica in the current layout (0 .. world / current_tp).
    pub replica: usize,
    /// Tokens so far (prompt + generated): the context its decode steps attend over.
    pub context: usize,
    /// Tokens whose KV it holds now (at most `context`): what a switch now moves or recomputes.
    /// Below `context` for a prompt part way in, 0 for one that never ran.
    pub kv: usize,
    pub generated: usize,
    /// Estimated tokens still to generate (rounded up to whole steps, at least 1).
    pub est_remaining: f64,
    /// The forecast takes it as holding its KV; `false`: it lost it (preempted, or waiting for
    /// room) and prefills its context when it runs again (and a switch moves none of it).
    pub cached: bool,
}

impl EstimatedSeq {
    pub fn steps(&self) -> usize {
        (self.est_remaining.ceil().max(1.0)) as usize
    }
}

/// The KV tokens a switch moves or recomputes: each sequence's `kv`, of those the forecast
/// takes as holding it.
fn switched_kv(live: &[EstimatedSeq]) -> Vec<usize> {
    live.iter()
        .filter(|s| s.cached && s.kv > 0)
        .map(|s| s.kv.min(s.context))
        .collect()
}

/// Everything the rule needs; nothing about the engine.
#[derive(Clone, Copy, Debug)]
pub struct DecideInput<'a> {
    pub world: usize,
    pub current_tp: usize,
    /// Tp degrees that may be chosen (each dividing world and the model dims); the current one may
    /// be among them.
    pub candidates: &'a [usize],
    pub live: &'a [EstimatedSeq],
    pub predictor: &'a Predictor,
    pub switch: &'a SwitchCost,
    /// Required relative gain over staying, e.g. 0.1.
    pub margin: f64,
    /// Required absolute gain over staying, ms.
    pub min_gain_ms: f64,
    /// Compare switching now with switching this many steps later (0: do not); use the
    /// re-check interval.
    pub lookahead_steps: usize,
    /// Value a candidate by its best plan with at most one further switch, tried at up to this
    /// many evenly spaced later points ([`plan_ms`]); 0: as if it stayed there for good.
    pub follow_up_points: usize,
    /// The tp the last switch of this run left (`None`: no switch yet). Going back to it must
    /// clear twice the margin: a switch re-places the live sequences balanced on their
    /// estimated lengths, so each forecast sees the layout it would leave as unbalanced
    /// (sequences finished unevenly since the last placement) and the one it would enter as
    /// balanced; on a wide node (8-16 replicas) that bias alone made the rule oscillate (TP4 ->
    /// 8 -> 4 -> 8 within a few hundred steps, a switch cost each time).
    pub came_from: Option<usize>,
}

/// One candidate's prediction.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct CandidateForecast {
    pub tp: usize,
    pub drain_ms: f64,
    pub switch_ms: f64,
    /// Total if the switch waits `lookahead_steps` (only for the best candidate, with lookahead).
    pub later_ms: Option<f64>,
}

/// The rule's answer. `predicted_best_ms` includes `switch_cost_ms`; when staying is best both
/// equal the stay prediction and zero.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Decision {
    pub stay: bool,
    pub to_tp: usize,
    pub predicted_stay_ms: f64,
    pub predicted_best_ms: f64,
    pub switch_cost_ms: f64,
    pub candidates: Vec<CandidateForecast>,
}

/// Where each live sequence goes under a layout of `tp` (balanced by estimated remaining).
pub fn placement(world: usize, tp: usize, live: &[EstimatedSeq]) -> Vec<usize> {
    let w: Vec<f64> = live.iter().map(|s| s.steps() as f64).collect();
    balance(&w, world / tp)
}

fn group(dp: usize, live: &[EstimatedSeq], replica_of: &[usize]) -> Vec<Vec<Pending>> {
    let mut reps = vec![Vec::new(); dp];
    for (s, &r) in live.iter().zip(replica_of) {
        reps[r].push(Pending {
            context: s.context,
            remaining: s.steps(),
            cached: s.cached,
        });
    }
    reps
}

/// Applies the rule (module docs).
pub fn decide(inp: &DecideInput) -> Result<Decision> {
    let (world, cur) = (inp.world, inp.current_tp);
    if world == 0 || world > MAX_WORLD {
        return Err(Error::Invalid(format!(
            "world {world}: a world is 1 to {MAX_WORLD} ranks"
        )));
    }
    if cur == 0 || world % cur != 0 {
        return Err(Error::Invalid(format!(
            "current tp {cur} does not divide world {world}"
        )));
    }
    if !(0.0..1.0).contains(&inp.margin) || inp.min_gain_ms.is_nan() || inp.min_gain_ms < 0.0 {
        return Err(Error::Invalid(format!(
            "margin must be in [0, 1) and min gain >= 0, got {} and {}",
            inp.margin, inp.min_gain_ms
        )));
    }
    let dp = world / cur;
    if let Some(s) = inp.live.iter().find(|s| s.replica >= dp) {
        return Err(Error::Invalid(format!(
            "a live sequence is on replica {} but tp {cur} has {dp} replicas",
            s.replica
        )));
    }
    let here = replicas(inp.live);
    let stay_ms = drain_ms(
        inp.predictor.fit(cur)?,
        &group(dp, inp.live, &here),
        room(inp, cur),
    );
    // A switch moves the KV of the sequences that hold it; the others prefill when they run.
    let contexts = switched_kv(inp.live);
    let mut out = Decision {
        stay: true,
        to_tp: cur,
        predicted_stay_ms: stay_ms,
        predicted_best_ms: stay_ms,
        switch_cost_ms: 0.0,
        candidates: Vec::new(),
    };
    let mut best: Option<CandidateForecast> = None;
    if let Some(tp) = inp
        .candidates
        .iter()
        .find(|&&tp| tp == 0 || world % tp != 0)
    {
        return Err(Error::Invalid(format!(
            "candidate tp {tp} does not divide world {world}"
        )));
    }
    let others: Vec<usize> = match inp.live.is_empty() {
        true => Vec::new(),
        false => inp
            .candidates
            .iter()
            .copied()
            .filter(|&tp| tp != cur)
            .collect(),
    };
    // Each candidate's forecast on its own thread (rayon); taken in candidate order, so the
    // answer (and the first error, in candidate order) does not depend on the threads.
    let drains = others
        .par_iter()
        .map(|&tp| value_at(inp, tp, inp.live))
        .collect::<Vec<Result<f64>>>()
        .into_iter()
        .collect::<Result<Vec<f64>>>()?;
    for (&tp, drain_ms) in others.iter().zip(drains) {
        let c = CandidateForecast {
            tp,
            drain_ms,
            switch_ms: inp.switch.cost(cur, tp, &contexts).total_ms,
            later_ms: None,
        };
        out.candidates.push(c);
        if best.is_none_or(|b| c.drain_ms + c.switch_ms < b.drain_ms + b.switch_ms) {
            best = Some(c);
        }
    }
    if let Some(b) = best {
        let total = b.drain_ms + b.switch_ms;
        // Whether switching now beats staying by the margins; the plans below can only veto it,
        // so they are not worked out when it does not (the follow-up plan is most of a
        // decision's work).
        let margin = if Some(b.tp) == inp.came_from {
            2.0 * inp.margin
        } else {
            inp.margin
        };
        let pays = total <= stay_ms * (1.0 - margin)
            && stay_ms - total >= inp.min_gain_ms
            && total < stay_ms;
        let mut now_is_best = true;
        if inp.lookahead_steps > 0 {
            let later_ms = Later::new(inp, inp.lookahead_steps)?.switch_to(inp, b.tp)?;
            if let Some(c) = out.candidates.iter_mut().find(|c| c.tp == b.tp) {
                c.later_ms = Some(later_ms);
            }
            now_is_best = total <= later_ms;
        }
        if now_is_best && pays && inp.follow_up_points > 0 {
            // Valued with a follow-up, a candidate must also beat staying with one: the current
            // layout's own best plan whose switch (if any) waits at least a re-check.
            let wait = plan_from(
                inp,
                inp.lookahead_steps.max(1),
                inp.lookahead_steps,
                inp.follow_up_points,
            )?;
            now_is_best = total < wait.total_ms;
        }
        if now_is_best && pays {
            out.stay = false;
            out.to_tp = b.tp;
            out.predicted_best_ms = total;
            out.switch_cost_ms = b.switch_ms;
        }
    }
    Ok(out)
}

/// A replica's KV room at `tp`, as the profile states it (`None`: unbounded), priced at the
/// profile's prefill rate there.
fn room(inp: &DecideInput, tp: usize) -> Option<Room> {
    inp.predictor
        .kv_capacity_tokens
        .get(&tp)
        .map(|&tokens| Room {
            tokens,
            prefill_tokens_per_s: inp.switch.kv.prefill_rate(tp),
        })
}

/// Each live sequence's current replica.
fn replicas(live: &[EstimatedSeq]) -> Vec<usize> {
    live.iter().map(|s| s.replica).collect()
}

/// Predicted ms to drain `live` after it is re-placed at `tp`: staying there for good, or, with
/// `follow_up_points`, the best plan from there with at most one more switch.
fn value_at(inp: &DecideInput, tp: usize, live: &[EstimatedSeq]) -> Result<f64> {
    let at = placement(inp.world, tp, live);
    if inp.follow_up_points == 0 {
        return Ok(drain_ms(
            inp.predictor.fit(tp)?,
            &group(inp.world / tp, live, &at),
            room(inp, tp),
        ));
    }
    let placed: Vec<EstimatedSeq> = live
        .iter()
        .zip(&at)
        .map(|(s, &replica)| EstimatedSeq { replica, ..*s })
        .collect();
    let there = DecideInput {
        current_tp: tp,
        live: &placed,
        follow_up_points: 0,
        ..*inp
    };
    Ok(plan_ms(&there, inp.lookahead_steps, inp.follow_up_points)?.total_ms)
}

/// A predicted plan for a live set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    /// Predicted total of the best plan, ms.
    pub total_ms: f64,
    /// Its switch, as (steps from now, tp); `None`: staying is best.
    pub switch: Option<(usize, usize)>,
    /// Predicted total of staying, ms.
    pub stay_ms: f64,
}

/// The best plan the estimates allow from a live set at `from`: stay, or run on and switch once to
/// another candidate at one of up to `points` evenly spaced steps (multiples of `every`).
/// Returns the best plan and the stay prediction. It values a candidate with a follow-up switch;
/// where a batch starts is chosen on the best ladder of any length ([`best_ladder`]).
pub fn plan_ms(inp: &DecideInput, every: usize, points: usize) -> Result<Plan> {
    plan_from(inp, 0, every, points)
}

/// [`plan_ms`] with the switch no earlier than `first` steps from now.
fn plan_from(inp: &DecideInput, first: usize, every: usize, points: usize) -> Result<Plan> {
    let cur = inp.current_tp;
    let stay_ms = drain_ms(
        inp.predictor.fit(cur)?,
        &group(inp.world / cur.max(1), inp.live, &replicas(inp.live)),
        room(inp, cur),
    );
    let mut best = (stay_ms, None);
    let longest = inp.live.iter().map(|s| s.steps()).max().unwrap_or(0);
    let every = every.max(1);
    let stride = (longest / every / points.max(1)).max(1) * every;
    // Each switch point on its own thread (rayon), taken in order: the same plan on any threads.
    let points: Vec<usize> = (first..longest).step_by(stride).collect();
    let totals = points
        .par_iter()
        .map(|&k| {
            let later = Later::new(inp, k)?;
            inp.candidates
                .iter()
                .filter(|&&t| t != cur)
                .map(|&tp| Ok((tp, later.switch_to(inp, tp)?)))
                .collect::<Result<Vec<(usize, f64)>>>()
        })
        .collect::<Vec<Result<_>>>()
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    for (&k, row) in points.iter().zip(totals) {
        for (tp, total) in row {
            if total < best.0 {
                best = (total, Some((k, tp)));
            }
        }
    }
    Ok(Plan {
        total_ms: best.0,
        switch: best.1,
        stay_ms,
    })
}

mod ladder;
mod later;
pub use ladder::{best_ladder, placed_at, start_plan, Ladder, StartPlan, START_POINTS};
use later::Later;

#[cfg(test)]
mod tests;
