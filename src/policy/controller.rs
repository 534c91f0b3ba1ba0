//! The one adaptive loop: a [`Controller`] (predictor, switch cost, remaining-length estimator,
//! stay-or-switch rule) driving any [`StepSource`] — the real engine on any backend
//! (`crate::engine::EngineSource`) or the simulator's modeled node (`crate::sim`).
//!
//! [`drive`] steps the source until no sequence is live. Before step `s` it asks the controller
//! when [`Controller::checks_at`]`(s)`: every `check_every` steps, never before the first step
//! (step 0 is the prefill: nothing to estimate yet). The controller sees only what the source
//! reports of its live sequences; it never reads the source's clock, so a source whose clock is not
//! the predictor (the engine; a simulator with its own cost model) makes predictor error part of
//! the outcome. A static layout is the same loop with no controller.
//!
//! A switch the source refuses (an engine error) is reported as [`Event::SwitchFailed`] and the
//! run goes on in the layout the source still runs: a failed switch loses nothing.

use rayon::prelude::*;
use serde::Serialize;

use super::decide::{
    decide, placement, start_plan, DecideInput, Decision, EstimatedSeq, SwitchCost,
};
use super::predictor::Predictor;
use super::remaining::{Remaining, SeqView};
use crate::error::{Error, Result};

/// A live (unfinished) sequence as a step source reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LiveSeq {
    /// Request index.
    pub index: usize,
    /// Its replica in the current layout (0 .. world / tp).
    pub replica: usize,
    /// Tokens so far (prompt + generated).
    pub context: usize,
    /// Of those, the tokens whose KV it holds now: what a switch moves or recomputes. Below
    /// `context` for a prompt part way in (chunked prefill) and 0 for one waiting for room.
    pub kv: usize,
    pub generated: usize,
    /// Its cap: the true response length when lengths are forced (a trace replay, ignore_eos),
    /// which only the oracle estimator reads.
    pub max_new_tokens: usize,
    /// Its prompt group (GRPO: the responses to one prompt), when the source knows it.
    pub group: Option<usize>,
}

/// What one step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StepDone {
    /// Duration on the source's clock.
    pub ms: f64,
    /// Live sequences at the start of the step.
    pub running: usize,
    /// Tokens fed through the model (prefill + decode).
    pub tokens_in: usize,
    /// Of `tokens_in`, those fed by prefills (prompts and their chunks).
    pub prefill_tokens: usize,
    /// Tokens produced.
    pub tokens_out: usize,
}

/// Something that runs a rollout batch one step at a time and can change its tp degree.
pub trait StepSource {
    /// What a switch reports besides its duration (the engine's switch record, say).
    type SwitchRecord: Serialize;
    fn world(&self) -> usize;
    fn tp(&self) -> usize;
    /// The live sequences, in request order.
    fn live(&self) -> Vec<LiveSeq>;
    /// Runs one step of every replica with live sequences.
    fn step(&mut self) -> Result<StepDone>;
    /// Switches to `to_tp`, live sequence `i` (in [`StepSource::live`] order) going to replica
    /// `placement[i]`. Returns the switch's duration in ms on the source's clock. On error the
    /// source must still run its old layout.
    fn switch(&mut self, to_tp: usize, placement: &[usize]) -> Result<(f64, Self::SwitchRecord)>;
    /// Time since the run started on the source's clock, ms.
    fn now_ms(&self) -> f64;
    /// How many sequences are live (the length of [`StepSource::live`], cheaper where a source
    /// can count without listing).
    fn live_count(&self) -> usize {
        self.live().len()
    }
}

/// Later points at which the rule tries a follow-up switch when it values a candidate
/// ([`DecideInput::follow_up_points`]).
pub const FOLLOW_UP_POINTS: usize = 16;

/// Knobs of the adaptive rule.
#[derive(Clone, Debug, PartialEq)]
pub struct ControllerConfig {
    /// Tp degrees the rule may pick (each dividing world and the model).
    pub candidates: Vec<usize>,
    /// Steps between two decisions (at least 1).
    pub check_every: usize,
    /// Relative predicted gain a switch must bring, in [0, 1).
    pub margin: f64,
    /// Absolute predicted gain a switch must bring, ms.
    pub min_gain_ms: f64,
    /// At most this many switches per run (`None`: no limit), counting every switch that
    /// changed the layout (one whose recompute failed after its swap too). PAT's rule is one
    /// switch.
    pub max_switches: Option<usize>,
}

/// The adaptive policy: when and to what tp a live batch should switch.
#[derive(Clone, Debug)]
pub struct Controller<'a> {
    pub cfg: ControllerConfig,
    pub predictor: &'a Predictor,
    pub switch: &'a SwitchCost,
    pub estimator: Remaining,
}

impl<'a> Controller<'a> {
    /// Checks the knobs; every candidate must have a fitted step time.
    pub fn new(
        cfg: ControllerConfig,
        predictor: &'a Predictor,
        switch: &'a SwitchCost,
        estimator: Remaining,
    ) -> Result<Self> {
        if cfg.check_every == 0 {
            return Err(Error::Invalid("`check_every` must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&cfg.margin) || cfg.min_gain_ms.is_nan() || cfg.min_gain_ms < 0.0 {
            return Err(Error::Invalid(format!(
                "`margin` must be in [0, 1) and `min_gain_ms` >= 0, got {} and {}",
                cfg.margin, cfg.min_gain_ms
            )));
        }
        if cfg.candidates.is_empty() {
            return Err(Error::Invalid("the controller needs a candidate tp".into()));
        }
        for &tp in &cfg.candidates {
            predictor.fit(tp)?;
        }
        Ok(Controller {
            cfg,
            predictor,
            switch,
            estimator,
        })
    }

    /// Whether the rule runs before step `step` (0-based; step 0 is the prefill).
    pub fn checks_at(&self, step: usize) -> bool {
        step > 0 && step.is_multiple_of(self.cfg.check_every)
    }

    /// The rule's input; `switches_left`: how many more switches the run may make (`None`: no
    /// limit). A candidate is valued with a follow-up switch only when two more are allowed.
    fn input<'b>(
        &'b self,
        world: usize,
        tp: usize,
        est: &'b [EstimatedSeq],
        switches_left: Option<usize>,
    ) -> DecideInput<'b> {
        DecideInput {
            world,
            current_tp: tp,
            candidates: &self.cfg.candidates,
            live: est,
            predictor: self.predictor,
            switch: self.switch,
            // A predicted gain inside the profile's measured spread is noise: never act on it.
            margin: self.cfg.margin.max((2.0 * self.predictor.noise).min(0.5)),
            min_gain_ms: self.cfg.min_gain_ms,
            lookahead_steps: self.cfg.check_every,
            follow_up_points: if switches_left.is_none_or(|n| n >= 2) {
                FOLLOW_UP_POINTS
            } else {
                0
            },
            came_from: None,
        }
    }

    /// Where a batch should start ([`start_plan`]: the first tp of the best predicted ladder of
    /// any length within the run's switch budget, unless it is inside the profile's noise of
    /// the best plan that never switches). `placed(tp)` is the batch as it would be placed at
    /// `tp`. Returns the tp and its predicted total, ms.
    pub fn plan_start(
        &self,
        world: usize,
        placed: impl Fn(usize) -> Vec<LiveSeq> + Sync,
    ) -> Result<(usize, f64)> {
        // Each candidate's batch estimated on its own thread (rayon), taken in candidate order.
        let starts = self
            .cfg
            .candidates
            .par_iter()
            .map(|&tp| Ok((tp, estimated(&self.estimator, &placed(tp))?)))
            .collect::<Vec<Result<_>>>()
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let (first, batch) = starts
            .first()
            .ok_or_else(|| Error::Invalid("the controller needs a candidate tp".into()))?;
        let base = self.input(world, *first, batch, self.cfg.max_switches);
        let plan = start_plan(&base, &starts, self.cfg.check_every, self.cfg.max_switches)?;
        Ok((plan.tp, plan.predicted_ms))
    }

    /// The rule's answer for `live` at (`world`, `tp`) after `switches_done` switches in this
    /// run, the last of which left tp `came_from` (if any: going back to it must clear twice the
    /// margin, [`DecideInput::came_from`]), and, when it switches, where each live sequence goes
    /// under the new layout (the placement its forecast assumed).
    pub fn decide(
        &self,
        world: usize,
        tp: usize,
        live: &[LiveSeq],
        switches_done: usize,
        came_from: Option<usize>,
    ) -> Result<(Decision, Vec<usize>)> {
        let est = estimated(&self.estimator, live)?;
        let left = self
            .cfg
            .max_switches
            .map(|m| m.saturating_sub(switches_done));
        let d = decide(&DecideInput {
            came_from,
            ..self.input(world, tp, &est, left)
        })?;
        let at = if d.stay {
            Vec::new()
        } else {
            placement(world, d.to_tp, &est)
        };
        Ok((d, at))
    }
}

/// `live` as the rule sees it, its remaining lengths estimated by `estimator` (a sequence's
/// live GRPO siblings inform the deal: [`SeqView::live_siblings`]).
pub fn estimated(estimator: &Remaining, live: &[LiveSeq]) -> Result<Vec<EstimatedSeq>> {
    let mut per_group: std::collections::HashMap<usize, usize> = Default::default();
    for g in live.iter().filter_map(|s| s.group) {
        *per_group.entry(g).or_default() += 1;
    }
    let views: Vec<SeqView> = live
        .iter()
        .map(|s| SeqView {
            generated: s.generated,
            replica: s.replica,
            true_len: Some(s.max_new_tokens),
            live_siblings: s.group.map_or(0, |g| per_group[&g]),
        })
        .collect();
    Ok(live
        .iter()
        .zip(estimator.estimate_set(&views)?)
        .map(|(s, est_remaining)| EstimatedSeq {
            replica: s.replica,
            context: s.context,
            kv: s.kv.min(s.context),
            generated: s.generated,
            est_remaining,
            // The forecast takes every live sequence as holding its KV (telling it which
            // wait without, tried with the simulator's node, did not decide better:
            // benches/RESULTS.md, 2026-12-02); a switch's cost counts only `kv`.
            cached: true,
        })
        .collect())
}

/// What [`drive`] reports as it goes.
pub enum Event<'e, R> {
    /// Step `step` ran at `tp`, ending at `t_ms`.
    Step {
        step: usize,
        tp: usize,
        t_ms: f64,
        done: &'e StepDone,
    },
    /// Before step `step`, a switch.
    Switch {
        summary: &'e SwitchSummary,
        decision: &'e Decision,
        record: &'e R,
    },
    /// Before step `step`, a switch the rule asked for failed; the source goes on at `now`:
    /// `from` where it refused the switch, `to` where the switch failed after its swap (an
    /// engine's KV recompute: the sequences it left are prefilled again by the next steps).
    SwitchFailed {
        step: usize,
        from: usize,
        to: usize,
        now: usize,
        error: &'e Error,
    },
}

/// One switch of a run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SwitchSummary {
    /// The step it ran before.
    pub step: usize,
    /// When it started, on the source's clock.
    pub t_ms: f64,
    pub from: usize,
    pub to: usize,
    pub ms: f64,
    /// Live sequences at the switch.
    pub live: usize,
    pub predicted_stay_ms: f64,
    pub predicted_best_ms: f64,
    /// Set where the switch was applied but what followed its swap failed (an engine's KV
    /// recompute; the sequences it left are prefilled again by the next steps): the layout
    /// changed, and the run also counts it in `failed_switches`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a whole run did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RunSummary {
    pub steps: usize,
    /// The source's clock at the end.
    pub total_ms: f64,
    pub tokens: u64,
    /// Every switch that changed the layout, in order: each one's `from` is the `to` before
    /// it (or `start_tp`), and the last one's `to` is `final_tp`.
    pub switches: Vec<SwitchSummary>,
    /// Switches that failed: refused (the source went on in the old layout) or applied and
    /// then failed (also in `switches`, with their error).
    pub failed_switches: usize,
    pub start_tp: usize,
    pub final_tp: usize,
}

/// Steps `src` until nothing is live; with a controller, asks it before every checked step and
/// switches when it says so. `on_event` sees every step and switch as it happens.
pub fn drive<S: StepSource>(
    src: &mut S,
    ctrl: Option<&Controller>,
    mut on_event: impl FnMut(Event<'_, S::SwitchRecord>),
) -> Result<RunSummary> {
    let mut run = RunSummary {
        start_tp: src.tp(),
        ..RunSummary::default()
    };
    let mut step = 0usize;
    loop {
        if src.live_count() == 0 {
            break;
        }
        let may_switch =
            |c: &&Controller| c.cfg.max_switches.is_none_or(|m| run.switches.len() < m);
        if let Some(c) = ctrl.filter(|c| c.checks_at(step)).filter(may_switch) {
            let live = src.live();
            let from = src.tp();
            let came_from = run.switches.last().map(|s| s.from);
            let (d, at) = c.decide(src.world(), from, &live, run.switches.len(), came_from)?;
            if !d.stay {
                let t_ms = src.now_ms();
                let summary = |to, ms, error| SwitchSummary {
                    step,
                    t_ms,
                    from,
                    to,
                    ms,
                    live: live.len(),
                    predicted_stay_ms: d.predicted_stay_ms,
                    predicted_best_ms: d.predicted_best_ms,
                    error,
                };
                match src.switch(d.to_tp, &at) {
                    Ok((ms, record)) => {
                        let summary = summary(d.to_tp, ms, None);
                        on_event(Event::Switch {
                            summary: &summary,
                            decision: &d,
                            record: &record,
                        });
                        run.switches.push(summary);
                    }
                    Err(error) => {
                        run.failed_switches += 1;
                        let now = src.tp();
                        if now != from {
                            // Applied: the layout changed though what followed the swap failed.
                            let ms = src.now_ms() - t_ms;
                            run.switches.push(summary(now, ms, Some(error.to_string())));
                        }
                        on_event(Event::SwitchFailed {
                            step,
                            from,
                            to: d.to_tp,
                            now,
                            error: &error,
                        });
                    }
                }
            }
        }
        let tp = src.tp();
        let done = src.step()?;
        run.tokens += done.tokens_out as u64;
        on_event(Event::Step {
            step,
            tp,
            t_ms: src.now_ms(),
            done: &done,
        });
        step += 1;
    }
    run.steps = step;
    run.total_ms = src.now_ms();
    run.final_tp = src.tp();
    Ok(run)
}
