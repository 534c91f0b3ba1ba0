//! The discrete-event loop: one rollout batch on an N-GPU node under a static, adaptive or oracle
//! policy, timed by the predictor.
//!
//! Model of a run (the same clock as `policy::forecast`):
//!
//! - Prefill: each replica prefills its prompts at the profile's prefill tokens/s for its tp;
//!   replicas run in parallel, so prefill takes the slowest replica's time (0 without prefill
//!   samples).
//! - Decode: global steps. In each, every replica with live sequences decodes one token for each
//!   of them, taking `predictor(tp, batch, mean context)`; the step lasts as long as the slowest
//!   replica. A request with `response_len = R` is live for exactly R steps; its context during a
//!   step is prompt + tokens generated before it.
//! - Placement: requests start spread over the replicas by longest-processing-time on
//!   prompt + response length (the true length: a best case for static layouts).
//! - Adaptive / oracle: the engine's adaptive loop (`policy::drive` with a `Controller`) over the
//!   modeled node as its step source: every K steps (not at step 0) the decision rule runs on the
//!   live set with remaining estimates from the trace's own length distribution (adaptive, strata
//!   of the conditional distribution: `Remaining::estimate_set`) or the true remaining lengths
//!   (oracle).
//!   A switch adds its modeled cost to the clock, then the live sequences are re-placed over the
//!   new replicas by estimated remaining length. They start from the best static layout unless
//!   told otherwise, so until their first switch they are that layout.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::parallel::placement::balance;
use crate::policy::controller::{
    drive, Controller, ControllerConfig, LiveSeq, StepDone, StepSource,
};
use crate::policy::decide::SwitchCost;
use crate::policy::predictor::{Fit, Predictor};
use crate::policy::remaining::{LengthDist, Remaining};
use crate::policy::trace::Trace;
use crate::stats::rate_at;

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
    /// Layout the adaptive and oracle runs start from; `None`: the best static layout.
    pub start_tp: Option<usize>,
}

/// Which policy a run follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    Static(usize),
    Adaptive,
    Oracle,
}

impl PolicyKind {
    pub fn name(&self) -> String {
        match self {
            PolicyKind::Static(tp) => format!("static tp{tp}"),
            PolicyKind::Adaptive => "adaptive".into(),
            PolicyKind::Oracle => "oracle".into(),
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

/// The outcome of one run. `total_ms = prefill_ms + decode_ms + switch_ms`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimResult {
    pub policy: String,
    pub start_tp: usize,
    pub final_tp: usize,
    pub total_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub switch_ms: f64,
    pub steps: usize,
    pub switches: Vec<SwitchEvent>,
    pub timeline: Vec<TimelinePoint>,
}

/// What a run is timed by: the predictor, the switch cost model and the prefill rates.
#[derive(Clone, Copy, Debug)]
pub struct SimModel<'a> {
    pub predictor: &'a Predictor,
    pub switch: &'a SwitchCost,
    /// (tp, prefill tokens/s); empty: prefill is free.
    pub prefill: &'a [(usize, f64)],
}

/// Checks the config against the trace and the model before any run.
pub fn check(cfg: &SimConfig, model: &SimModel) -> Result<()> {
    if cfg.world == 0 || cfg.candidates.is_empty() {
        return Err(Error::Invalid(
            "need world >= 1 and at least one candidate tp".into(),
        ));
    }
    if cfg.check_every == 0 {
        return Err(Error::Invalid("`check_every` must be at least 1".into()));
    }
    for &tp in cfg.candidates.iter().chain(cfg.start_tp.iter()) {
        if tp == 0 || cfg.world % tp != 0 {
            return Err(Error::Invalid(format!(
                "tp {tp} does not divide world {}",
                cfg.world
            )));
        }
        model.predictor.fit(tp)?;
    }
    Ok(())
}

struct Seq {
    index: usize,
    prompt: usize,
    target: usize,
    generated: usize,
    replica: usize,
}

/// The modeled node as a [`StepSource`]: lockstep replicas timed by the predictor, switches by
/// the switch cost model.
struct Node<'a> {
    model: &'a SimModel<'a>,
    world: usize,
    tp: usize,
    fit: Fit,
    seqs: Vec<Seq>,
    t_ms: f64,
    decode_ms: f64,
    switch_ms: f64,
    timeline: Vec<TimelinePoint>,
    steps: usize,
}

impl StepSource for Node<'_> {
    type SwitchRecord = ();
    fn world(&self) -> usize {
        self.world
    }
    fn tp(&self) -> usize {
        self.tp
    }
    fn live(&self) -> Vec<LiveSeq> {
        self.seqs
            .iter()
            .map(|s| LiveSeq {
                index: s.index,
                replica: s.replica,
                context: s.prompt + s.generated,
                generated: s.generated,
                max_new_tokens: s.target,
            })
            .collect()
    }
    fn step(&mut self) -> Result<StepDone> {
        let dp = self.world / self.tp;
        let (mut batch, mut ctx) = (vec![0usize; dp], vec![0f64; dp]);
        for s in &self.seqs {
            batch[s.replica] += 1;
            ctx[s.replica] += (s.prompt + s.generated) as f64;
        }
        let dt = (0..dp)
            .filter(|&r| batch[r] > 0)
            .map(|r| self.fit.step_ms(batch[r], ctx[r] / batch[r] as f64))
            .fold(0.0, f64::max);
        self.t_ms += dt;
        self.decode_ms += dt;
        self.steps += 1;
        let before = self.seqs.len();
        for s in &mut self.seqs {
            s.generated += 1;
        }
        self.seqs.retain(|s| s.generated < s.target);
        if self.seqs.len() != before {
            self.timeline.push(TimelinePoint {
                t_ms: self.t_ms,
                step: self.steps,
                live: self.seqs.len(),
                tp: self.tp,
            });
        }
        Ok(StepDone {
            ms: dt,
            running: before,
            tokens_in: before,
            tokens_out: before,
        })
    }
    fn switch(&mut self, to_tp: usize, placement: &[usize]) -> Result<(f64, ())> {
        let fit = *self.model.predictor.fit(to_tp)?;
        let contexts: Vec<usize> = self.seqs.iter().map(|s| s.prompt + s.generated).collect();
        let cost = self.model.switch.cost(self.tp, to_tp, &contexts).total_ms;
        self.t_ms += cost;
        self.switch_ms += cost;
        for (s, &r) in self.seqs.iter_mut().zip(placement) {
            s.replica = r;
        }
        self.tp = to_tp;
        self.fit = fit;
        self.timeline.push(TimelinePoint {
            t_ms: self.t_ms,
            step: self.steps,
            live: self.seqs.len(),
            tp: to_tp,
        });
        Ok((cost, ()))
    }
    fn now_ms(&self) -> f64 {
        self.t_ms
    }
}

/// Runs `policy` over `trace` (adaptive and oracle start at `start_tp`) with the same adaptive
/// loop as the engine (`policy::drive`).
pub fn simulate(
    trace: &Trace,
    model: &SimModel,
    cfg: &SimConfig,
    policy: PolicyKind,
    start_tp: usize,
) -> Result<SimResult> {
    check(cfg, model)?;
    let tp = match policy {
        PolicyKind::Static(t) => t,
        _ => start_tp,
    };
    if tp == 0 || cfg.world % tp != 0 {
        return Err(Error::Invalid(format!(
            "tp {tp} does not divide world {}",
            cfg.world
        )));
    }
    let fit = *model.predictor.fit(tp)?;
    let estimator = match policy {
        PolicyKind::Static(_) => None,
        PolicyKind::Adaptive => {
            let lens = trace.response_lens();
            let cap = lens.iter().copied().max();
            Some(Remaining::Empirical(LengthDist::new(&lens, cap)?))
        }
        PolicyKind::Oracle => Some(Remaining::Oracle),
    };
    let ctrl = estimator
        .map(|est| {
            Controller::new(
                ControllerConfig {
                    candidates: cfg.candidates.clone(),
                    check_every: cfg.check_every,
                    margin: cfg.margin,
                    min_gain_ms: cfg.min_gain_ms,
                },
                model.predictor,
                model.switch,
                est,
            )
        })
        .transpose()?;
    let weights: Vec<f64> = trace
        .requests
        .iter()
        .map(|r| (r.prompt_len + r.response_len) as f64)
        .collect();
    let at = balance(&weights, cfg.world / tp);
    let seqs: Vec<Seq> = trace
        .requests
        .iter()
        .zip(at)
        .enumerate()
        .map(|(index, (r, replica))| Seq {
            index,
            prompt: r.prompt_len,
            target: r.response_len,
            generated: 0,
            replica,
        })
        .collect();
    let prefill_ms = prefill_ms(&seqs, cfg.world / tp, rate_at(model.prefill, tp));
    let mut node = Node {
        model,
        world: cfg.world,
        tp,
        fit,
        timeline: vec![TimelinePoint {
            t_ms: 0.0,
            step: 0,
            live: seqs.len(),
            tp,
        }],
        seqs,
        t_ms: prefill_ms,
        decode_ms: 0.0,
        switch_ms: 0.0,
        steps: 0,
    };
    let run = drive(&mut node, ctrl.as_ref(), |_| {})?;
    Ok(SimResult {
        policy: policy.name(),
        start_tp: tp,
        final_tp: run.final_tp,
        total_ms: prefill_ms + node.decode_ms + node.switch_ms,
        prefill_ms,
        decode_ms: node.decode_ms,
        switch_ms: node.switch_ms,
        steps: run.steps,
        switches: run
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
            .collect(),
        timeline: node.timeline,
    })
}

/// Slowest replica's prompt tokens over the prefill rate, in ms.
fn prefill_ms(seqs: &[Seq], dp: usize, rate: Option<f64>) -> f64 {
    let Some(rate) = rate else { return 0.0 };
    let mut tokens = vec![0usize; dp];
    for s in seqs {
        tokens[s.replica] += s.prompt;
    }
    tokens
        .iter()
        .map(|&n| 1e3 * n as f64 / rate)
        .fold(0.0, f64::max)
}

/// Every candidate's static run, and the tp of the fastest (the first on ties).
fn static_runs(
    trace: &Trace,
    model: &SimModel,
    cfg: &SimConfig,
) -> Result<(Vec<SimResult>, usize)> {
    check(cfg, model)?;
    let mut runs = Vec::new();
    let mut best: Option<(usize, f64)> = None;
    for &tp in &cfg.candidates {
        let r = simulate(trace, model, cfg, PolicyKind::Static(tp), tp)?;
        if best.is_none_or(|(_, t)| r.total_ms < t) {
            best = Some((tp, r.total_ms));
        }
        runs.push(r);
    }
    Ok((runs, best.map(|b| b.0).unwrap_or(cfg.candidates[0])))
}

/// The static layout the model predicts finishes the whole batch first: where an adaptive run
/// starts unless told otherwise.
pub fn best_static(trace: &Trace, model: &SimModel, cfg: &SimConfig) -> Result<usize> {
    static_runs(trace, model, cfg).map(|r| r.1)
}

/// Every static layout, then adaptive and oracle (starting at `cfg.start_tp` or the best static).
/// Returns the runs and the best static tp.
pub fn simulate_all(
    trace: &Trace,
    model: &SimModel,
    cfg: &SimConfig,
) -> Result<(Vec<SimResult>, usize)> {
    let (runs_static, best_tp) = static_runs(trace, model, cfg)?;
    let mut runs = runs_static;
    let start = cfg.start_tp.unwrap_or(best_tp);
    runs.push(simulate(trace, model, cfg, PolicyKind::Adaptive, start)?);
    runs.push(simulate(trace, model, cfg, PolicyKind::Oracle, start)?);
    Ok((runs, best_tp))
}
