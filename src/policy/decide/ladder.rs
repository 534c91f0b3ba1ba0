//! The best ladder from a batch's start: where to start and when to climb, any number of
//! switches, by dynamic programming over a grid of switch points.
//!
//! [`plan_ms`](super::plan_ms) values a start with at most one further switch, so it cannot see a
//! three-step ladder (TP1 -> 2 -> 4 -> 8): it compares "TP1 and one or two switches" with "TP2 and
//! two", and where switches are cheap the longer ladder from the lower start is the best plan
//! (benches/RESULTS.md, nineteenth session). Here a state is (tp, switch point): the live set has
//! run `k` steps and was re-placed at `tp` (balanced on estimated remaining lengths, as a switch
//! places it). Switches only go forward in time, so visiting the points in order settles each
//! state before it is left. Each state keeps its best arrival only (earliest predicted time; the
//! live set it arrived with stands for every path into it: exact where the live set at a step does
//! not depend on the path, i.e. without KV room, and close otherwise). From a state the plan
//! either stays to the end or runs on to a later point and switches to another candidate.
//!
//! Cost: one forecast per (state, later point), about `tps * points^2 / 2` in all, fewer than the
//! one-follow-up search needs for a single start.

use std::sync::Arc;

use rayon::prelude::*;

use super::later::Later;
use super::{group, placement, replicas, room, DecideInput, EstimatedSeq};
use crate::error::{Error, Result};
use crate::parallel::layout::MAX_WORLD;
use crate::policy::forecast::drain_ms;

/// The best predicted ladder ([`best_ladder`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Ladder {
    /// Where it starts, and its predicted total, ms.
    pub start_tp: usize,
    pub total_ms: f64,
    /// Its switches as (steps from the start, tp).
    pub switches: Vec<(usize, usize)>,
    /// Each start's plan that never switches: (tp, predicted ms), in candidate order.
    pub stay_ms: Vec<(usize, f64)>,
}

/// Switch points of the ladder [`start_plan`] searches (about; [`best_ladder`]).
pub const START_POINTS: usize = 48;

/// Where a batch starts, and what the rule foresees from there ([`start_plan`]).
#[derive(Clone, Debug, PartialEq)]
pub struct StartPlan {
    pub tp: usize,
    /// Predicted total of the chosen plan, ms.
    pub predicted_ms: f64,
    /// The chosen plan's switches as (steps from the start, tp); empty when the best plan that
    /// never switches was chosen.
    pub switches: Vec<(usize, usize)>,
    /// The best plan that never switches: (tp, predicted ms).
    pub stay: (usize, f64),
}

/// Where a batch should start: the first tp of the best predicted ladder ([`best_ladder`], at
/// about [`START_POINTS`] switch points, multiples of `every`, within `max_switches`) — unless
/// it beats the best plan that never switches by less than twice the profile's noise
/// (`base.predictor.noise`), then the latter: a difference inside the spread is not acted on.
/// `starts` as for [`best_ladder`].
pub fn start_plan(
    base: &DecideInput,
    starts: &[(usize, Vec<EstimatedSeq>)],
    every: usize,
    max_switches: Option<usize>,
) -> Result<StartPlan> {
    let ladder = best_ladder(base, starts, every, START_POINTS, max_switches)?;
    let stay = ladder
        .stay_ms
        .iter()
        .copied()
        .fold(None, |b: Option<(usize, f64)>, s| match b {
            Some(b) if b.1 <= s.1 => Some(b),
            _ => Some(s),
        })
        .ok_or_else(|| Error::Invalid("the ladder needs a start tp".into()))?;
    let noise = (2.0 * base.predictor.noise).min(0.5);
    Ok(if ladder.total_ms >= stay.1 * (1.0 - noise) {
        StartPlan {
            tp: stay.0,
            predicted_ms: stay.1,
            switches: Vec::new(),
            stay,
        }
    } else {
        StartPlan {
            tp: ladder.start_tp,
            predicted_ms: ladder.total_ms,
            switches: ladder.switches,
            stay,
        }
    })
}

/// The best arrival at a state so far.
struct Arrival {
    t_ms: f64,
    /// The live set as it arrived, not yet placed at the state's tp (the start's is placed).
    live: Arc<Vec<EstimatedSeq>>,
    placed: bool,
    start: usize,
    path: Vec<(usize, usize)>,
}

/// The best ladder over `starts` (each candidate start tp, at most once, with the batch as placed
/// there), switching among `base.candidates` at evenly spaced multiples of `every` steps over the
/// longest estimated sequence: about `points` switch points, up to twice as many where the
/// spacing is rounded down to a multiple of `every` (as [`plan_ms`](super::plan_ms) spaces its
/// points); at most `max_switches` switches (`None`: any number). `base` gives the world, predictor, switch cost and candidates; its tp and live set
/// are not read.
pub fn best_ladder(
    base: &DecideInput,
    starts: &[(usize, Vec<EstimatedSeq>)],
    every: usize,
    points: usize,
    max_switches: Option<usize>,
) -> Result<Ladder> {
    if starts.is_empty() {
        return Err(Error::Invalid("the ladder needs a start tp".into()));
    }
    let world = base.world;
    if world == 0 || world > MAX_WORLD {
        return Err(Error::Invalid(format!(
            "world {world}: a world is 1 to {MAX_WORLD} ranks"
        )));
    }
    if let Some(tp) = base
        .candidates
        .iter()
        .find(|&&tp| tp == 0 || !world.is_multiple_of(tp))
    {
        return Err(Error::Invalid(format!(
            "candidate tp {tp} does not divide world {world}"
        )));
    }
    let longest = starts
        .iter()
        .flat_map(|(_, live)| live.iter().map(|s| s.steps()))
        .max()
        .unwrap_or(0);
    let every = every.max(1);
    let stride = (longest / every / points.max(1)).max(1) * every;
    let grid: Vec<usize> = (0..longest.max(1)).step_by(stride).collect();
    let tps = &base.candidates;
    let slot = |tp: usize| tps.iter().position(|&t| t == tp);
    // With a switch budget each switch count is its own layer of states; without, one layer.
    let layers = max_switches.map_or(1, |m| m.min(grid.len().saturating_sub(1)) + 1);
    let index = |layer: usize, point: usize, t: usize| (layer * grid.len() + point) * tps.len() + t;
    let mut states: Vec<Option<Arrival>> =
        (0..layers * grid.len() * tps.len()).map(|_| None).collect();
    for (k, (tp, live)) in starts.iter().enumerate() {
        let t = slot(*tp).ok_or_else(|| {
            Error::Invalid(format!("start tp {tp} is not among the candidates {tps:?}"))
        })?;
        if starts[..k].iter().any(|(u, _)| u == tp) {
            return Err(Error::Invalid(format!("start tp {tp} is given twice")));
        }
        if let Some(s) = live.iter().find(|s| s.replica >= world / tp) {
            return Err(Error::Invalid(format!(
                "a sequence of the start at tp {tp} is on replica {} but tp {tp} has {} replicas",
                s.replica,
                world / tp
            )));
        }
        states[index(0, 0, t)] = Some(Arrival {
            t_ms: 0.0,
            live: Arc::new(live.clone()),
            placed: true,
            start: *tp,
            path: Vec::new(),
        });
    }
    // The best ladder so far (its stay plans filled in at the end).
    let mut best: Option<Ladder> = None;
    let mut stay_ms = Vec::with_capacity(starts.len());
    for point in 0..grid.len() {
        for layer in 0..layers {
            for (t, &tp) in tps.iter().enumerate() {
                let Some(arr) = states[index(layer, point, t)].take() else {
                    continue;
                };
                let fresh;
                let live: &[EstimatedSeq] = match arr.placed {
                    true => &arr.live,
                    false => {
                        fresh = placed_at(base.world, tp, &arr.live);
                        &fresh
                    }
                };
                let here = DecideInput {
                    current_tp: tp,
                    live,
                    follow_up_points: 0,
                    ..*base
                };
                let stay = drain_ms(
                    base.predictor.fit(tp)?,
                    &group(base.world / tp, live, &replicas(live)),
                    room(&here, tp),
                );
                if point == 0 {
                    stay_ms.push((tp, stay));
                }
                let total = arr.t_ms + stay;
                if best.as_ref().is_none_or(|b| total < b.total_ms) {
                    best = Some(Ladder {
                        start_tp: arr.start,
                        total_ms: total,
                        switches: arr.path.clone(),
                        stay_ms: Vec::new(),
                    });
                }
                let next_layer = match max_switches {
                    None => 0,
                    Some(m) if layer < m => layer + 1,
                    Some(_) => continue,
                };
                // The forecast to each later point on its own thread (rayon), relaxed in order:
                // the same plan on any threads.
                let laters = (point + 1..grid.len())
                    .into_par_iter()
                    .map(|j| Later::new(&here, grid[j] - grid[point]).map(|l| (j, l)))
                    .collect::<Vec<Result<_>>>();
                for later in laters {
                    let (j, later) = later?;
                    if later.live.is_empty() {
                        continue;
                    }
                    let moved = Arc::new(later.live.clone());
                    for (u, &to) in tps.iter().enumerate() {
                        if to == tp {
                            continue;
                        }
                        let at = arr.t_ms
                            + later.before_ms
                            + base.switch.cost(tp, to, &later.contexts).total_ms;
                        let cell = &mut states[index(next_layer, j, u)];
                        if cell.as_ref().is_none_or(|c| at < c.t_ms) {
                            let mut path = arr.path.clone();
                            path.push((grid[j], to));
                            *cell = Some(Arrival {
                                t_ms: at,
                                live: Arc::clone(&moved),
                                placed: false,
                                start: arr.start,
                                path,
                            });
                        }
                    }
                }
            }
        }
    }
    let mut ladder = best.ok_or_else(|| Error::Invalid("the ladder needs a start tp".into()))?;
    ladder.stay_ms = stay_ms;
    Ok(ladder)
}

/// `live` re-placed over the replicas of `tp` (dividing `world`), as a switch places it
/// ([`placement`]).
pub fn placed_at(world: usize, tp: usize, live: &[EstimatedSeq]) -> Vec<EstimatedSeq> {
    let at = placement(world, tp, live);
    live.iter()
        .zip(at)
        .map(|(s, replica)| EstimatedSeq { replica, ..*s })
        .collect()
}

#[cfg(test)]
mod tests;
