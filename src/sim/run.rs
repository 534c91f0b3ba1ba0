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
//! - Adaptive / oracle: every K steps (not at step 0) the decision rule runs on the live set with
//!   remaining estimates from the trace's own length distribution (adaptive, strata of the
//!   conditional distribution: `Remaining::estimate_set`) or the true remaining lengths (oracle).
//!   A switch adds its modeled cost to the clock, then the live sequences are re-placed over the
//!   new replicas by estimated remaining length. They start from the best static layout unless
//!   told otherwise, so until their first switch they are that layout.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::policy::decide::{decide, placement, DecideInput, LiveSeq, SwitchCost};
use crate::policy::forecast::balance;
use crate::policy::predictor::Predictor;
use crate::policy::profile::rate_at;
use crate::policy::remaining::{LengthDist, Remaining, SeqView};
use crate::policy::trace::Trace;

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

struct Seq {
    prompt: usize,
    target: usize,
    generated: usize,
    replica: usize,
}

/// Checks the config against the trace and the model before any run.
pub fn check(cfg: &SimConfig, model: &SimModel) -> Result<()> {
    if cfg.world == 0 || cfg.candidates.is_empty() {
        return Err(Error::Usage(
            "need world >= 1 and at least one candidate tp".into(),
        ));
    }
    if cfg.check_every == 0 {
        return Err(Error::Usage("--check-every must be at least 1".into()));
    }
    for &tp in cfg.candidates.iter().chain(cfg.start_tp.iter()) {
        if tp == 0 || cfg.world % tp != 0 {
            return Err(Error::Usage(format!(
                "tp {tp} does not divide world {}",
                cfg.world
            )));
        }
        model.predictor.fit(tp)?;
    }
    Ok(())
}

/// Runs `policy` over `trace` (adaptive and oracle start at `start_tp`).
pub fn simulate(
    trace: &Trace,
    model: &SimModel,
    cfg: &SimConfig,
    policy: PolicyKind,
    start_tp: usize,
) -> Result<SimResult> {
    check(cfg, model)?;
    let mut tp = match policy {
        PolicyKind::Static(t) => t,
        _ => start_tp,
    };
    model.predictor.fit(tp)?;
    if cfg.world % tp != 0 {
        return Err(Error::Usage(format!(
            "tp {tp} does not divide world {}",
            cfg.world
        )));
    }
    let estimator = match policy {
        PolicyKind::Static(_) => None,
        PolicyKind::Adaptive => {
            let lens = trace.response_lens();
            let cap = lens.iter().copied().max();
            Some(Remaining::Empirical(LengthDist::new(&lens, cap)?))
        }
        PolicyKind::Oracle => Some(Remaining::Oracle),
    };
    let weights: Vec<f64> = trace
        .requests
        .iter()
        .map(|r| (r.prompt_len + r.response_len) as f64)
        .collect();
    let at = balance(&weights, cfg.world / tp);
    let mut seqs: Vec<Seq> = trace
        .requests
        .iter()
        .zip(at)
        .map(|(r, replica)| Seq {
            prompt: r.prompt_len,
            target: r.response_len,
            generated: 0,
            replica,
        })
        .collect();
    let prefill_ms = prefill_ms(&seqs, cfg.world / tp, rate_at(model.prefill, tp));
    let mut res = SimResult {
        policy: policy.name(),
        start_tp: tp,
        final_tp: tp,
        total_ms: 0.0,
        prefill_ms,
        decode_ms: 0.0,
        switch_ms: 0.0,
        steps: 0,
        switches: Vec::new(),
        timeline: vec![TimelinePoint {
            t_ms: 0.0,
            step: 0,
            live: seqs.len(),
            tp,
        }],
    };
    let mut t = prefill_ms;
    let mut step = 0usize;
    let mut fit = *model.predictor.fit(tp)?;
    while !seqs.is_empty() {
        if let Some(est) = &estimator {
            if step > 0 && step % cfg.check_every == 0 {
                let views: Vec<SeqView> = seqs
                    .iter()
                    .map(|s| SeqView {
                        generated: s.generated,
                        replica: s.replica,
                        true_len: Some(s.target),
                    })
                    .collect();
                let live: Vec<LiveSeq> = seqs
                    .iter()
                    .zip(est.estimate_set(&views)?)
                    .map(|(s, est_remaining)| LiveSeq {
                        replica: s.replica,
                        context: s.prompt + s.generated,
                        generated: s.generated,
                        est_remaining,
                    })
                    .collect();
                let d = decide(&DecideInput {
                    world: cfg.world,
                    current_tp: tp,
                    candidates: &cfg.candidates,
                    live: &live,
                    predictor: model.predictor,
                    switch: model.switch,
                    margin: cfg.margin,
                    min_gain_ms: cfg.min_gain_ms,
                    lookahead_steps: cfg.check_every,
                })?;
                if !d.stay {
                    let contexts: Vec<usize> = live.iter().map(|s| s.context).collect();
                    let cost = model.switch.cost(tp, d.to_tp, &contexts).total_ms;
                    res.switches.push(SwitchEvent {
                        step,
                        t_ms: t,
                        from: tp,
                        to: d.to_tp,
                        cost_ms: cost,
                        live: seqs.len(),
                        predicted_stay_ms: d.predicted_stay_ms,
                        predicted_best_ms: d.predicted_best_ms,
                    });
                    t += cost;
                    res.switch_ms += cost;
                    for (s, r) in seqs.iter_mut().zip(placement(cfg.world, d.to_tp, &live)) {
                        s.replica = r;
                    }
                    tp = d.to_tp;
                    fit = *model.predictor.fit(tp)?;
                    res.timeline.push(TimelinePoint {
                        t_ms: t,
                        step,
                        live: seqs.len(),
                        tp,
                    });
                }
            }
        }
        // One lockstep decode step.
        let dp = cfg.world / tp;
        let (mut batch, mut ctx) = (vec![0usize; dp], vec![0f64; dp]);
        for s in &seqs {
            batch[s.replica] += 1;
            ctx[s.replica] += (s.prompt + s.generated) as f64;
        }
        let dt = (0..dp)
            .filter(|&r| batch[r] > 0)
            .map(|r| fit.step_ms(batch[r], ctx[r] / batch[r] as f64))
            .fold(0.0, f64::max);
        t += dt;
        res.decode_ms += dt;
        step += 1;
        let before = seqs.len();
        for s in &mut seqs {
            s.generated += 1;
        }
        seqs.retain(|s| s.generated < s.target);
        if seqs.len() != before {
            res.timeline.push(TimelinePoint {
                t_ms: t,
                step,
                live: seqs.len(),
                tp,
            });
        }
    }
    res.steps = step;
    res.final_tp = tp;
    res.total_ms = res.prefill_ms + res.decode_ms + res.switch_ms;
    Ok(res)
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

/// Every static layout, then adaptive and oracle (starting at `cfg.start_tp` or the best static).
/// Returns the runs and the best static tp.
pub fn simulate_all(
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
    let best_tp = best.map(|b| b.0).unwrap_or(cfg.candidates[0]);
    let start = cfg.start_tp.unwrap_or(best_tp);
    runs.push(simulate(trace, model, cfg, PolicyKind::Adaptive, start)?);
    runs.push(simulate(trace, model, cfg, PolicyKind::Oracle, start)?);
    Ok((runs, best_tp))
}
