//! The optimum baseline: the best switch schedule on the true clock, knowing the true lengths.
//!
//! Search (every candidate run on the node itself, not on a forecast):
//!
//! 1. every start layout, static;
//! 2. every start, one switch to every other layout at each of `GRID` evenly spaced rounds of the
//!    longest response (snapshots of the static run, so each candidate only simulates its suffix);
//! 3. from the best single switch of every (start, target) pair and the `KEEP` best overall, a
//!    second switch to every other layout at every later grid round (ladders such as 1 -> 2 -> 8);
//! 4. from the best two-switch schedule of each of the `2 KEEP` best layout paths, a third switch
//!    the same way (`MAX_SWITCHES` = 3: ladders such as 1 -> 2 -> 4 -> 8);
//! 5. each switch of the best schedule moved in `REFINE` finer steps within one grid cell on
//!    either side (last switch first, two passes).
//!
//! After a switch the live sequences are placed by longest-processing-time on their true
//! remaining lengths, or with `on_estimates` where the adaptive rule would place them (row
//! "optimum @est", which tells the schedule from the placement). The search is exhaustive on
//! its grid, not over every round, so a rule that switches between grid points can beat it;
//! [`no_worse_than`] therefore also replays the schedules the rules followed (at this node's
//! switch cost) and refines any that is faster. The reported optimum is the best schedule found
//! that way: never behind a baseline it could have followed, and an upper bound on the true
//! optimum.

use super::node::{Node, TrueSwitch};
use super::run::{
    initial_placement, requests, result, SimConfig, SimModel, SimResult, SwitchEvent,
};
use crate::error::Result;
use crate::parallel::placement::balance;
use crate::policy::controller::{estimated, StepSource};
use crate::policy::decide::placement;
use crate::policy::remaining::Remaining;
use crate::policy::trace::Trace;

pub const GRID: usize = 32;
pub const KEEP: usize = 3;
pub const REFINE: usize = 8;
/// Switches in the longest schedule searched.
pub const MAX_SWITCHES: usize = 3;

/// A schedule: start layout, then (round, tp) switches in round order.
#[derive(Clone, Debug, PartialEq)]
struct Schedule {
    start: usize,
    switches: Vec<(usize, usize)>,
}

impl Schedule {
    /// The schedule a run followed: its start, and its switches' rounds and targets.
    fn of(run: &SimResult) -> Schedule {
        Schedule {
            start: run.start_tp,
            switches: run.switches.iter().map(|s| (s.step, s.to)).collect(),
        }
    }
}

/// A node at the start of a batch at `start` tp, placed as `cfg` places it, knowing each
/// request's prompt group (a switch placed on estimates reads them).
fn fresh_node<'a>(
    model: &SimModel<'a>,
    cfg: &SimConfig,
    reqs: &[(usize, usize)],
    groups: &[Option<usize>],
    start: usize,
) -> Result<Node<'a>> {
    let mut node = Node::new(
        model.clock,
        TrueSwitch::Modeled(model.switch),
        cfg.world,
        start,
        reqs,
        &initial_placement(reqs, cfg.world / start, cfg.placement),
    )?
    .with_groups(groups);
    node.lockstep = cfg.lockstep;
    Ok(node)
}

fn step_to(node: &mut Node, round: usize) -> Result<()> {
    while node.rounds < round && node.live_count() > 0 {
        node.step()?;
    }
    Ok(())
}

/// Switches `node` to `tp`, placing the live sequences on their true remaining lengths, or with
/// `on_estimates`, where the adaptive rule would place them (balanced on that estimator's
/// point estimates, as [`crate::policy::controller::Controller::decide`] places them).
fn switch_true(
    node: &mut Node,
    tp: usize,
    on_estimates: Option<&Remaining>,
) -> Result<SwitchEvent> {
    let at = match on_estimates {
        None => {
            let remaining: Vec<f64> = node.true_remaining().iter().map(|&r| r as f64).collect();
            balance(&remaining, node.world() / tp)
        }
        Some(e) => placement(node.world(), tp, &estimated(e, &node.live())?),
    };
    let (t_ms, from, live) = (node.now_ms(), node.tp(), at.len());
    let (cost_ms, ()) = node.switch(tp, &at)?;
    Ok(SwitchEvent {
        step: node.rounds,
        t_ms,
        from,
        to: tp,
        cost_ms,
        live,
        predicted_stay_ms: 0.0,
        predicted_best_ms: 0.0,
    })
}

/// The best schedule (module docs) as a run. With `on_estimates` every switch places the live
/// sequences where the adaptive rule would (balanced on that estimator's point estimates): the
/// best schedule for a rule that, like any engine, does not know the lengths.
pub fn search(
    trace: &Trace,
    model: &SimModel,
    cfg: &SimConfig,
    on_estimates: Option<&Remaining>,
) -> Result<SimResult> {
    let reqs = requests(trace);
    let groups = groups(trace);
    let longest = reqs.iter().map(|r| r.1).max().unwrap_or(0);
    let grid: Vec<usize> = (1..GRID)
        .map(|j| j * longest / GRID)
        .filter(|&r| r > 0)
        .collect();
    let mut best: Option<(f64, Schedule)> = None;
    let consider = |best: &mut Option<(f64, Schedule)>, t: f64, s: &Schedule| {
        if best.as_ref().is_none_or(|b| t < b.0) {
            *best = Some((t, s.clone()));
        }
    };
    // Level by level: every start static and with one switch; a second switch after the best
    // first switch of every (start, target) pair and the overall best few; a third after the
    // best two-switch schedule of the best few layout paths.
    let mut seeds: Vec<Schedule> = cfg
        .candidates
        .iter()
        .map(|&start| Schedule {
            start,
            switches: vec![],
        })
        .collect();
    for level in 0..MAX_SWITCHES {
        let mut next: Vec<(f64, Schedule)> = Vec::new();
        for s in &seeds {
            let mut node = fresh_node(model, cfg, &reqs, &groups, s.start)?;
            for &(r, tp) in &s.switches {
                step_to(&mut node, r)?;
                switch_true(&mut node, tp, on_estimates)?;
            }
            if s.switches.is_empty() {
                consider(&mut best, node.clone().finish_ms()?, s);
            }
            let (r1, b) = s.switches.last().copied().unwrap_or((0, s.start));
            for &r in grid.iter().filter(|&&r| r > r1) {
                step_to(&mut node, r)?;
                if node.live_count() == 0 {
                    break;
                }
                for &c in cfg.candidates.iter().filter(|&&c| c != b) {
                    let mut n = node.clone();
                    switch_true(&mut n, c, on_estimates)?;
                    let mut l = s.clone();
                    l.switches.push((r, c));
                    let t = n.finish_ms()?;
                    consider(&mut best, t, &l);
                    next.push((t, l));
                }
            }
        }
        seeds = if level == 0 {
            pick(&next, KEEP, usize::MAX)
        } else {
            pick(&next, 0, 2 * KEEP)
        };
    }
    let (best_t, sched) = best
        .ok_or_else(|| crate::error::Error::Invalid("no candidate layout to search over".into()))?;
    let (_, sched) = refine(model, cfg, &reqs, &groups, best_t, sched, on_estimates)?;
    let (node, events) = replay(model, cfg, &reqs, &groups, &sched, on_estimates)?;
    Ok(result("optimum".into(), &node, sched.start, events, None))
}

/// `found` (the search's run), or better where one of `others` is faster: each other run's
/// schedule (its start and its switches' rounds and targets) is replayed with the search's
/// placement and, where it beats `found`, refined as the search's best is. A run placed its
/// sequences on its own estimates after a switch, which a replay cannot repeat; where such a run
/// still finished sooner than everything found, that run itself is the optimum (renamed). Either
/// way the result is never behind any of `others`, which must have paid this node's true switch
/// cost (not PAT's flat 5.52 s), and with `on_estimates` must have placed on that estimator (a
/// replay then repeats them exactly: [`replay_ms`]).
pub fn no_worse_than(
    trace: &Trace,
    model: &SimModel,
    cfg: &SimConfig,
    found: SimResult,
    others: &[&SimResult],
    on_estimates: Option<&Remaining>,
) -> Result<SimResult> {
    let reqs = requests(trace);
    let groups = groups(trace);
    let mut best: Option<(f64, Schedule)> = None;
    for r in others {
        let sched = Schedule::of(r);
        let t = replay(model, cfg, &reqs, &groups, &sched, on_estimates)?
            .0
            .now_ms();
        if t < best.as_ref().map_or(found.total_ms, |b| b.0) {
            best = Some((t, sched));
        }
    }
    let mut out = match best {
        None => found,
        Some((t, sched)) => {
            let (_, sched) = refine(model, cfg, &reqs, &groups, t, sched, on_estimates)?;
            let (node, events) = replay(model, cfg, &reqs, &groups, &sched, on_estimates)?;
            result(found.policy, &node, sched.start, events, None)
        }
    };
    if let Some(r) = others
        .iter()
        .filter(|r| r.total_ms < out.total_ms)
        .min_by(|a, b| a.total_ms.total_cmp(&b.total_ms))
    {
        out = SimResult {
            policy: out.policy,
            predicted_ms: None,
            predictor_error_pct: None,
            switches: r
                .switches
                .iter()
                .map(|s| SwitchEvent {
                    predicted_stay_ms: 0.0,
                    predicted_best_ms: 0.0,
                    ..s.clone()
                })
                .collect(),
            ..(*r).clone()
        };
    }
    Ok(out)
}

/// `sched` (taking `best_t`) with each switch moved within one grid cell on either side where
/// that is faster, the last first, twice over.
fn refine(
    model: &SimModel,
    cfg: &SimConfig,
    reqs: &[(usize, usize)],
    groups: &[Option<usize>],
    mut best_t: f64,
    mut sched: Schedule,
    on_estimates: Option<&Remaining>,
) -> Result<(f64, Schedule)> {
    let longest = reqs.iter().map(|r| r.1).max().unwrap_or(0);
    let cell = (longest / GRID).max(1);
    for _ in 0..2 {
        for i in (0..sched.switches.len()).rev() {
            let lo = if i == 0 { 0 } else { sched.switches[i - 1].0 };
            let hi = sched.switches.get(i + 1).map_or(usize::MAX, |s| s.0);
            let r0 = sched.switches[i].0;
            for k in 0..=2 * REFINE {
                let Some(r) = (r0 + k * cell / REFINE).checked_sub(cell) else {
                    continue;
                };
                if r <= lo || r >= hi || r == sched.switches[i].0 {
                    continue;
                }
                let mut cand = sched.clone();
                cand.switches[i].0 = r;
                let t = replay(model, cfg, reqs, groups, &cand, on_estimates)?
                    .0
                    .now_ms();
                if t < best_t {
                    best_t = t;
                    sched = cand;
                }
            }
        }
    }
    Ok((best_t, sched))
}

/// Seeds for the next level of the search: the best schedule of each layout path (start and
/// targets), best first, at most `paths` of them, plus the `keep` best schedules overall.
fn pick(done: &[(f64, Schedule)], keep: usize, paths: usize) -> Vec<Schedule> {
    let mut sorted: Vec<&(f64, Schedule)> = done.iter().collect();
    sorted.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut out: Vec<Schedule> = Vec::new();
    let mut n_paths = 0;
    for (_, s) in sorted {
        let new_path = !out.iter().any(|f| {
            f.start == s.start
                && f.switches
                    .iter()
                    .map(|x| x.1)
                    .eq(s.switches.iter().map(|x| x.1))
        });
        if new_path && n_paths < paths {
            n_paths += 1;
            out.push(s.clone());
        } else if out.len() < keep {
            n_paths += usize::from(new_path);
            out.push(s.clone());
        }
    }
    out
}

/// The requests' prompt groups (a switch placed on estimates reads them).
fn groups(trace: &Trace) -> Vec<Option<usize>> {
    trace.requests.iter().map(|r| r.group).collect()
}

/// When a run's schedule (its start, and its switches' rounds and targets) ends if replayed on
/// the true clock at this node's switch cost, placing as [`search`] does: with the estimator a
/// rule placed on, the rule's own run again (a check that the two place alike).
pub fn replay_ms(
    trace: &Trace,
    model: &SimModel,
    cfg: &SimConfig,
    run: &SimResult,
    on_estimates: Option<&Remaining>,
) -> Result<f64> {
    let reqs = requests(trace);
    Ok(replay(
        model,
        cfg,
        &reqs,
        &groups(trace),
        &Schedule::of(run),
        on_estimates,
    )?
    .0
    .now_ms())
}

/// Runs `sched` from the start; the finished node and its switches.
fn replay<'a>(
    model: &SimModel<'a>,
    cfg: &SimConfig,
    reqs: &[(usize, usize)],
    groups: &[Option<usize>],
    sched: &Schedule,
    on_estimates: Option<&Remaining>,
) -> Result<(Node<'a>, Vec<SwitchEvent>)> {
    let mut node = fresh_node(model, cfg, reqs, groups, sched.start)?;
    let mut events = Vec::new();
    for &(r, tp) in &sched.switches {
        step_to(&mut node, r)?;
        if node.live_count() > 0 {
            events.push(switch_true(&mut node, tp, on_estimates)?);
        }
    }
    node.run_to_end()?;
    Ok((node, events))
}
