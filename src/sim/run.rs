//! The runs of a simulation: one rollout batch on an N-GPU node under every baseline.
//!
//! Two things are kept apart (the point of this simulator):
//!
//! - **truth**: the node's clock ([`StepClock`]: the component model, or a measured profile's
//!   table) and the true switch cost. Replicas decode independently and meet at switches and at
//!   the end ([`Node`]).
//! - **what the policy sees**: its fitted [`Predictor`], the switch cost model and a
//!   remaining-length estimate. It forecasts with them; the node charges the truth. Predictor
//!   error therefore shows up in the outcome, and is reported.
//!
//! Baselines ([`PolicyKind`]):
//!
//! - every static layout, requests placed as VeRL places them (contiguous chunks per replica) or,
//!   with [`Placement::Lpt`], balanced on their true lengths (an ideal no engine has);
//! - **PAT's rule**: start at the best static layout, one switch to tp = world (or the largest tp the model shards to, where world is more) at the point its
//!   predictor picks, at PAT's measured 5.52 s switch cost and at this project's modeled cost;
//! - **adaptive**: this project's rule (ladders allowed), starting where its best predicted
//!   ladder starts (`Controller::plan_start`; or at `start_tp`), estimating remaining lengths from the batch's length
//!   distribution; the **oracle rule** is the same rule told the true remaining lengths;
//! - **optimum**: the best switch schedule found on the true clock with the true lengths: a grid
//!   search, and the schedules the rules followed at this node's switch cost
//!   ([`super::optimum`]).

use serde::Serialize;

use super::clock::StepClock;
use super::node::{Node, TrueSwitch};
use super::optimum;
use crate::error::{Error, Result};
use crate::parallel::placement::balance;
use crate::policy::controller::{drive, Controller, ControllerConfig, LiveSeq};
use crate::policy::decide::SwitchCost;
use crate::policy::predictor::Predictor;
use crate::policy::remaining::{LengthDist, Remaining};
use crate::policy::trace::Trace;

mod all;
pub use all::{runs_in_all, simulate_all, simulate_all_reporting};

/// PAT's measured switch, ms (paper: 5.52 s from TP2xDP4 to TP8).
pub const PAT_SWITCH_MS: f64 = 5520.0;

/// How a batch is spread over replicas before any switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Placement {
    /// Contiguous chunks of the request list (VeRL): GRPO siblings share a replica.
    Chunks,
    /// Longest-processing-time on the true lengths (an ideal: needs the lengths in advance).
    Lpt,
}

/// Knobs of a simulation.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    pub world: usize,
    /// Tp degrees the static runs cover and the adaptive rule may pick, ascending.
    pub candidates: Vec<usize>,
    /// Decode steps between two decisions.
    pub check_every: usize,
    pub margin: f64,
    pub min_gain_ms: f64,
    /// Layout the adaptive and oracle runs start from; `None`: where their best predicted ladder
    /// starts (`Controller::plan_start`).
    pub start_tp: Option<usize>,
    pub placement: Placement,
    /// Search for the optimum schedule (the slowest part of a simulation).
    pub optimum: bool,
    /// Search again with every switch placing the live sequences on estimated lengths, as the
    /// adaptive rule must (row "optimum @est"): what a better schedule alone could buy.
    pub optimum_on_estimates: bool,
    /// Replicas wait for the slowest after every step (one engine process, as `pat rollout`
    /// runs) instead of decoding independently (separate engines, as RL frameworks run them).
    pub lockstep: bool,
    /// The length distribution the rules' remaining-length estimator learns from (adaptive,
    /// PAT's, optimum @est): a previous rollout's. `None`: the simulated batch's own (in-sample:
    /// it knows the distribution, though not which request runs how long).
    pub lengths_from: Option<LengthDist>,
}

/// Which policy a run follows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PolicyKind {
    Static(usize),
    Adaptive,
    Oracle,
    /// PAT's rule; `flat_ms`: its switch costs this much (PAT's 5.52 s), else the modeled cost.
    Pat {
        flat_ms: Option<f64>,
    },
    /// The optimum's search; `on_estimates`: its switches place the live sequences where the
    /// adaptive rule would (on estimated lengths), not on the true lengths.
    Optimum {
        on_estimates: bool,
    },
}

impl PolicyKind {
    pub fn name(&self) -> String {
        match self {
            PolicyKind::Static(tp) => format!("static tp{tp}"),
            PolicyKind::Adaptive => "adaptive".into(),
            PolicyKind::Oracle => "oracle rule".into(),
            PolicyKind::Pat { flat_ms: Some(ms) } => format!("PAT @{:.2}s", ms / 1e3),
            PolicyKind::Pat { flat_ms: None } => "PAT @ours".into(),
            PolicyKind::Optimum {
                on_estimates: false,
            } => "optimum".into(),
            PolicyKind::Optimum { on_estimates: true } => "optimum @est".into(),
        }
    }
}

/// One layout switch during a run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SwitchEvent {
    pub step: usize,
    pub t_ms: f64,
    pub from: usize,
    pub to: usize,
    pub cost_ms: f64,
    pub live: usize,
    pub predicted_stay_ms: f64,
    pub predicted_best_ms: f64,
}

/// A point of the timeline: from `t_ms` on, `live` sequences at `tp`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TimelinePoint {
    pub t_ms: f64,
    pub step: usize,
    pub live: usize,
    pub tp: usize,
}

/// The outcome of one run. `total_ms` is when the last replica finished;
/// `decode_ms = total_ms - prefill_ms - switch_ms` (it includes recompute and barrier waits).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimResult {
    pub policy: String,
    pub start_tp: usize,
    pub final_tp: usize,
    pub total_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub switch_ms: f64,
    /// Prefill of preempted or queued sequences when admitted (KV capacity).
    pub recompute_ms: f64,
    pub preemptions: usize,
    pub steps: usize,
    /// What the policy predicted its run would take at its start (adaptive rules only).
    pub predicted_ms: Option<f64>,
    /// Mean |predictor - clock| / clock over the (tp, batch, context) points the run visited, %.
    pub predictor_error_pct: Option<f64>,
    pub switches: Vec<SwitchEvent>,
    pub timeline: Vec<TimelinePoint>,
}

/// What a run is timed by, and what its policy sees.
#[derive(Clone, Copy)]
pub struct SimModel<'a> {
    /// The truth: step times, prefill rate, KV capacity.
    pub clock: &'a dyn StepClock,
    /// What the policy forecasts with.
    pub predictor: &'a Predictor,
    /// The switch cost model (the policy's forecast and the true cost of this project's switch).
    pub switch: &'a SwitchCost,
}

/// Checks the config against the model before any run.
pub fn check(cfg: &SimConfig, model: &SimModel) -> Result<()> {
    if cfg.world == 0 || cfg.candidates.is_empty() {
        return Err(Error::Invalid(
            "need `world` >= 1 and at least one candidate tp".into(),
        ));
    }
    if cfg.check_every == 0 {
        return Err(Error::Invalid("`check_every` must be at least 1".into()));
    }
    for &tp in cfg.candidates.iter().chain(cfg.start_tp.iter()) {
        if tp == 0 || !cfg.world.is_multiple_of(tp) {
            return Err(Error::Invalid(format!(
                "tp {tp} does not divide `world` {}",
                cfg.world
            )));
        }
        model.predictor.fit(tp)?;
    }
    Ok(())
}

/// The tps of `tps` at which a replica cannot hold the longest request of `trace` (prompt plus
/// response), each with the KV tokens it holds, in the order given. An engine refuses such a
/// layout at start-up (vLLM checks its longest sequence against the KV cache): the request
/// could never finish there, and a node that ran it anyway would report a time no engine has.
pub fn unfit_tps(trace: &Trace, clock: &dyn StepClock, tps: &[usize]) -> Vec<(usize, usize)> {
    let longest = longest_context(trace);
    tps.iter()
        .filter_map(|&tp| {
            clock
                .kv_capacity_tokens(tp)
                .filter(|&cap| cap < longest)
                .map(|cap| (tp, cap))
        })
        .collect()
}

/// The longest request's context when it finishes: prompt plus response, tokens.
pub fn longest_context(trace: &Trace) -> usize {
    trace
        .requests
        .iter()
        .map(|r| r.prompt_len.saturating_add(r.response_len))
        .max()
        .unwrap_or(0)
}

/// (prompt, response) of every request.
pub fn requests(trace: &Trace) -> Vec<(usize, usize)> {
    trace
        .requests
        .iter()
        .map(|r| (r.prompt_len, r.response_len))
        .collect()
}

/// A batch before its first step as live sequences: request `i` (prompt, response) on replica
/// `at[i]`, in prompt group `groups[i]` (missing: none).
pub fn fresh_batch(
    reqs: &[(usize, usize)],
    groups: &[Option<usize>],
    at: &[usize],
) -> Vec<LiveSeq> {
    reqs.iter()
        .zip(at)
        .enumerate()
        .map(|(index, (&(p, r), &replica))| LiveSeq {
            index,
            replica,
            context: p,
            // Placed before the prefill; taken as in by the first step a switch may come.
            kv: p,
            generated: 0,
            max_new_tokens: r,
            group: groups.get(index).copied().flatten(),
        })
        .collect()
}

/// Replica of each request at `tp` before any switch.
pub fn initial_placement(reqs: &[(usize, usize)], dp: usize, how: Placement) -> Vec<usize> {
    match how {
        Placement::Chunks => {
            let n = reqs.len().max(1);
            (0..reqs.len()).map(|i| i * dp / n).collect()
        }
        Placement::Lpt => {
            let w: Vec<f64> = reqs.iter().map(|&(p, r)| (p + r) as f64).collect();
            balance(&w, dp)
        }
    }
}

/// A run's result from its finished node and its switches.
pub(crate) fn result(
    policy: String,
    node: &Node,
    start_tp: usize,
    switches: Vec<SwitchEvent>,
    predicted_ms: Option<f64>,
) -> SimResult {
    use crate::policy::controller::StepSource;
    let total_ms = node.now_ms();
    SimResult {
        policy,
        start_tp,
        final_tp: node.tp(),
        total_ms,
        prefill_ms: node.prefill_ms,
        decode_ms: total_ms - node.prefill_ms - node.switch_ms,
        switch_ms: node.switch_ms,
        recompute_ms: node.recompute_ms,
        preemptions: node.preemptions,
        steps: node.rounds,
        predicted_ms,
        predictor_error_pct: None,
        switches,
        timeline: node.timeline.clone(),
    }
}

/// Runs `policy` over `trace`. `best_static` is where PAT's rule starts (the caller's best
/// static layout on the true clock).
pub fn simulate(
    trace: &Trace,
    model: &SimModel,
    cfg: &SimConfig,
    policy: PolicyKind,
    best_static: usize,
) -> Result<SimResult> {
    check(cfg, model)?;
    let start = match policy {
        PolicyKind::Static(tp) => Some(tp),
        _ => cfg.start_tp,
    };
    let tps: Vec<usize> = cfg.candidates.iter().chain(start.iter()).copied().collect();
    if let Some(&(tp, cap)) = unfit_tps(trace, model.clock, &tps).first() {
        return Err(Error::Invalid(format!(
            "at tp {tp} a replica holds {cap} KV tokens, fewer than the longest request's {} \
             (prompt + response): it could never finish there; leave tp {tp} out of the candidates",
            longest_context(trace)
        )));
    }
    let reqs = requests(trace);
    let groups: Vec<Option<usize>> = trace.requests.iter().map(|r| r.group).collect();
    let place = |tp: usize| initial_placement(&reqs, cfg.world / tp, cfg.placement);
    let modeled = TrueSwitch::Modeled(model.switch);
    match policy {
        PolicyKind::Static(tp) => {
            let mut node = Node::new(model.clock, modeled, cfg.world, tp, &reqs, &place(tp))?;
            node.lockstep = cfg.lockstep;
            node.run_to_end()?;
            Ok(result(policy.name(), &node, tp, Vec::new(), None))
        }
        PolicyKind::Optimum { on_estimates } => {
            let est = estimator(trace, cfg)?;
            optimum::search(trace, model, cfg, on_estimates.then_some(&est)).map(|mut r| {
                r.policy = policy.name();
                r
            })
        }
        PolicyKind::Adaptive | PolicyKind::Oracle | PolicyKind::Pat { .. } => {
            let estimator = match policy {
                PolicyKind::Oracle => Remaining::Oracle,
                _ => estimator(trace, cfg)?,
            };
            let pat_flat = match policy {
                PolicyKind::Pat { flat_ms } => Some(flat_ms),
                _ => None,
            };
            let flat = pat_flat.flatten().map(SwitchCost::flat);
            let seen_switch = flat.as_ref().unwrap_or(model.switch);
            let true_switch = match pat_flat.flatten() {
                Some(ms) => TrueSwitch::Flat(ms),
                None => modeled,
            };
            let (candidates, max_switches) = match pat_flat {
                Some(_) => {
                    let start = cfg.start_tp.unwrap_or(best_static);
                    // tp = world, or the largest tp the model shards to where world is more.
                    let top = cfg.candidates.iter().copied().max().unwrap_or(cfg.world);
                    let mut c = vec![start, top];
                    c.dedup();
                    (c, Some(1))
                }
                None => (cfg.candidates.clone(), None),
            };
            let ctrl = Controller::new(
                ControllerConfig {
                    candidates,
                    check_every: cfg.check_every,
                    margin: cfg.margin,
                    min_gain_ms: cfg.min_gain_ms,
                    max_switches,
                },
                model.predictor,
                seen_switch,
                estimator,
            )?;
            let placed = |tp: usize| fresh_batch(&reqs, &groups, &place(tp));
            let (start, predicted) = match (pat_flat, cfg.start_tp) {
                (Some(_), s) => (s.unwrap_or(best_static), None),
                (None, Some(s)) => (s, None),
                (None, None) => {
                    let (tp, ms) = ctrl.plan_start(cfg.world, placed)?;
                    (tp, Some(ms))
                }
            };
            let mut node = Node::new(
                model.clock,
                true_switch,
                cfg.world,
                start,
                &reqs,
                &place(start),
            )?
            .with_groups(&groups);
            node.lockstep = cfg.lockstep;
            let run = drive(&mut node, Some(&ctrl), |_| {})?;
            let switches = run
                .switches
                .iter()
                .map(|s| SwitchEvent {
                    step: s.step,
                    t_ms: s.t_ms,
                    from: s.from,
                    to: s.to,
                    cost_ms: s.ms,
                    live: s.live,
                    predicted_stay_ms: s.predicted_stay_ms,
                    predicted_best_ms: s.predicted_best_ms,
                })
                .collect();
            let mut r = result(
                policy.name(),
                &node,
                start,
                switches,
                predicted.map(|p| p + node.prefill_ms),
            );
            r.predictor_error_pct = visited_error(model, &node.visited);
            Ok(r)
        }
    }
}

/// The estimator the adaptive rule uses in a simulation: the batch's own length distribution,
/// capped at its longest.
pub fn empirical(trace: &Trace) -> Result<Remaining> {
    let lens = trace.response_lens();
    Ok(Remaining::Empirical(LengthDist::new(
        &lens,
        lens.iter().copied().max(),
    )?))
}

/// The estimator of the rules that estimate ([`SimConfig::lengths_from`], or [`empirical`]).
pub fn estimator(trace: &Trace, cfg: &SimConfig) -> Result<Remaining> {
    match &cfg.lengths_from {
        Some(d) => Ok(Remaining::Empirical(d.clone())),
        None => empirical(trace),
    }
}

/// Mean relative error of the predictor against the clock at `points`, %.
pub fn visited_error(model: &SimModel, points: &[(usize, usize, f64)]) -> Option<f64> {
    let errs: Vec<f64> = points
        .iter()
        .filter_map(|&(tp, b, ctx)| {
            let truth = model.clock.step_ms(tp, b, ctx);
            let pred = model.predictor.step_ms(tp, b, ctx).ok()?;
            (truth > 0.0).then(|| 100.0 * (pred - truth).abs() / truth)
        })
        .collect();
    (!errs.is_empty()).then(|| errs.iter().sum::<f64>() / errs.len() as f64)
}
