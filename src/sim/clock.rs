//! The simulator's clock: what a decode step, a prefill and a replica's KV capacity really cost.
//! The policy never reads it; it sees only its predictor, fitted to a profile (measured, or
//! sampled from this clock by [`sampled_profile`]), so predictor error shows in the outcome.
//!
//! - [`super::component::ComponentModel`]: a modeled GPU node, term by term.
//! - [`ProfileTable`]: a measured profile's own samples, interpolated (linear in context within
//!   each profiled batch, then linear in batch between the two nearest batches; beyond the
//!   profiled range, extended along the last segment and never below zero), with the profile's
//!   KV capacity per replica where it states one.

use std::collections::BTreeMap;

use super::component::{BatchTerms, ComponentModel};
use crate::error::{Error, Result};
use crate::policy::profile::{
    DecodeSample, PrefillSample, Profile, SwitchProfile, MEASURED_GROUPS, PROFILE_VERSION,
};

/// The true cost of running a replica (shared by the simulator's runs on their threads).
pub trait StepClock: Sync {
    /// One decode step of a replica at `tp` with `batch` sequences of mean context `ctx`, ms.
    fn step_ms(&self, tp: usize, batch: usize, ctx: f64) -> f64;
    /// What a replica stepping `batch` sequences at `tp` many times can compute once; then
    /// [`StepClock::step_ms_at`] per step. The default keeps nothing: `step_ms` each step.
    fn at(&self, tp: usize, batch: usize) -> StepAt {
        StepAt::Call { tp, batch }
    }
    /// [`StepClock::step_ms`] at `at`'s (tp, batch) and mean context `ctx`, the same value.
    fn step_ms_at(&self, at: &StepAt, ctx: f64) -> f64 {
        let (tp, batch) = at.key();
        self.step_ms(tp, batch, ctx)
    }
    /// Prompt tokens/s a replica at `tp` prefills; `None`: prefill is not modeled (free).
    fn prefill_tokens_per_s(&self, tp: usize) -> Option<f64>;
    /// KV tokens a replica at `tp` can hold; `None`: unbounded.
    fn kv_capacity_tokens(&self, tp: usize) -> Option<usize>;
    /// One line saying what this clock is.
    fn describe(&self) -> String;
}

/// A clock's view of one (tp, batch), from [`StepClock::at`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepAt {
    /// The component model's terms that do not depend on the context.
    Terms(BatchTerms),
    /// Nothing kept: the clock's `step_ms`.
    Call { tp: usize, batch: usize },
}

impl StepAt {
    /// The (tp, batch) it is for.
    pub fn key(&self) -> (usize, usize) {
        match *self {
            StepAt::Terms(t) => (t.tp, t.batch),
            StepAt::Call { tp, batch } => (tp, batch),
        }
    }
}

impl StepClock for ComponentModel {
    fn step_ms(&self, tp: usize, batch: usize, ctx: f64) -> f64 {
        ComponentModel::step_ms(self, tp, batch, ctx)
    }
    fn at(&self, tp: usize, batch: usize) -> StepAt {
        StepAt::Terms(self.batch_terms(tp, batch))
    }
    fn step_ms_at(&self, at: &StepAt, ctx: f64) -> f64 {
        match at {
            StepAt::Terms(t) => self.breakdown_at(t, ctx).step_ms,
            StepAt::Call { tp, batch } => ComponentModel::step_ms(self, *tp, *batch, ctx),
        }
    }
    fn prefill_tokens_per_s(&self, tp: usize) -> Option<f64> {
        Some(ComponentModel::prefill_tokens_per_s(self, tp))
    }
    fn kv_capacity_tokens(&self, tp: usize) -> Option<usize> {
        Some(ComponentModel::kv_capacity_tokens(self, tp))
    }
    fn describe(&self) -> String {
        format!(
            "component model (MODELED): {}, host {} ms + {} us/seq per step{}, memory fraction {}",
            self.p.name,
            self.p.host_step_ms,
            self.p.host_per_seq_us,
            if self.p.overlap_host {
                " overlapped"
            } else {
                " not overlapped"
            },
            self.p.mem_fraction
        )
    }
}

/// A predictor as the clock: the policy's own view taken as the truth (for hand-checked tests, and
/// to measure what predictor error costs by comparison).
impl StepClock for crate::policy::predictor::Predictor {
    fn step_ms(&self, tp: usize, batch: usize, ctx: f64) -> f64 {
        crate::policy::predictor::Predictor::step_ms(self, tp, batch, ctx).unwrap_or(f64::INFINITY)
    }
    fn prefill_tokens_per_s(&self, _tp: usize) -> Option<f64> {
        None
    }
    fn kv_capacity_tokens(&self, tp: usize) -> Option<usize> {
        self.kv_capacity_tokens.get(&tp).copied()
    }
    fn describe(&self) -> String {
        "the policy's own predictor (no predictor error)".into()
    }
}

/// Linear interpolation through sorted `(x, y)` points, extended along the end segments.
fn interp(points: &[(f64, f64)], x: f64) -> f64 {
    match points.len() {
        0 => 0.0,
        1 => points[0].1,
        n => {
            let i = points.partition_point(|p| p.0 < x).clamp(1, n - 1);
            let ((x0, y0), (x1, y1)) = (points[i - 1], points[i]);
            y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        }
    }
}

/// A measured profile as a clock: its samples interpolated (module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileTable {
    /// tp -> batch -> (context, ms) sorted by context (repeated points averaged).
    decode: BTreeMap<usize, BTreeMap<usize, Vec<(f64, f64)>>>,
    prefill: Vec<(usize, f64)>,
    /// tp -> KV tokens a replica holds (the profile's; absent: unbounded).
    capacity: BTreeMap<usize, usize>,
    what: String,
}

impl ProfileTable {
    pub fn new(p: &Profile) -> Result<ProfileTable> {
        // (tp, batch, context) -> (sum of step ms, count).
        let mut acc: BTreeMap<(usize, usize, usize), (f64, usize)> = BTreeMap::new();
        for s in &p.decode {
            let e = acc.entry((s.tp, s.batch, s.context)).or_insert((0.0, 0));
            e.0 += s.step_ms;
            e.1 += 1;
        }
        if acc.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no decode samples to simulate with",
                p.source.display()
            )));
        }
        let mut decode: BTreeMap<usize, BTreeMap<usize, Vec<(f64, f64)>>> = BTreeMap::new();
        for ((tp, b, c), (sum, n)) in acc {
            decode
                .entry(tp)
                .or_default()
                .entry(b)
                .or_default()
                .push((c as f64, sum / n as f64));
        }
        Ok(ProfileTable {
            decode,
            prefill: p.prefill_points(),
            capacity: p.kv_capacity_tokens.clone(),
            what: format!(
                "measured profile {} ({}, {}), interpolated; {}",
                p.source.display(),
                p.backend,
                p.device,
                p.capacity_summary()
            ),
        })
    }

    /// The tp degrees the table covers.
    pub fn tps(&self) -> Vec<usize> {
        self.decode.keys().copied().collect()
    }

    /// Where a run reaching contexts up to `context`, with up to `batch_at(tp)` sequences on a
    /// replica at each of `tps`, leaves what was measured (the table then extends the last
    /// segments of its curves), said in words; `None` when it stays within. Per tp: a context
    /// past the shortest reach of that tp's batch curves, a batch past its largest batch.
    pub fn beyond(
        &self,
        context: usize,
        batch_at: impl Fn(usize) -> usize,
        tps: &[usize],
    ) -> Option<String> {
        let mut parts = Vec::new();
        for (&tp, per_batch) in self.decode.iter().filter(|(tp, _)| tps.contains(tp)) {
            let most_batch = per_batch.keys().copied().max().unwrap_or(0);
            let reach = per_batch
                .values()
                .map(|pts| pts.iter().map(|p| p.0).fold(0.0, f64::max))
                .fold(f64::INFINITY, f64::min);
            let mut here = Vec::new();
            if context as f64 > reach {
                here.push(format!(
                    "contexts up to {context} tokens (measured up to {reach:.0} at every batch size)"
                ));
            }
            let batch = batch_at(tp);
            if batch > most_batch {
                here.push(format!(
                    "up to {batch} sequences on a replica (measured up to {most_batch})"
                ));
            }
            if !here.is_empty() {
                parts.push(format!("at tp {tp} {}", here.join(" and ")));
            }
        }
        (!parts.is_empty()).then(|| {
            format!(
                "the run reaches {}: step times there extend the last measured segments, an \
                 extrapolation, not a measurement",
                parts.join("; ")
            )
        })
    }
}

impl StepClock for ProfileTable {
    fn step_ms(&self, tp: usize, batch: usize, ctx: f64) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        let Some(by_b) = self.decode.get(&tp) else {
            return f64::INFINITY;
        };
        // `interp` over (batch, its value at ctx) for every profiled batch, evaluating only the
        // two batches of the segment it uses (this runs for every modeled step).
        let n = by_b.len();
        let ms = if n < 2 {
            by_b.values().next().map_or(0.0, |pts| interp(pts, ctx))
        } else {
            let x = batch as f64;
            let i = by_b
                .keys()
                .take_while(|&&b| (b as f64) < x)
                .count()
                .clamp(1, n - 1);
            let mut two = by_b.iter().skip(i - 1);
            let (Some((&b0, p0)), Some((&b1, p1))) = (two.next(), two.next()) else {
                return f64::INFINITY; // unreachable: 1 <= i <= n - 1
            };
            let (x0, y0, x1, y1) = (b0 as f64, interp(p0, ctx), b1 as f64, interp(p1, ctx));
            y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        };
        ms.max(0.0)
    }
    fn prefill_tokens_per_s(&self, tp: usize) -> Option<f64> {
        crate::stats::rate_at(&self.prefill, tp)
    }
    fn kv_capacity_tokens(&self, tp: usize) -> Option<usize> {
        self.capacity.get(&tp).copied()
    }
    fn describe(&self) -> String {
        self.what.clone()
    }
}

/// Batches and contexts a modeled profile samples (the policy's predictor is fitted to them).
pub const SAMPLE_BATCHES: [usize; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];
pub const SAMPLE_CONTEXTS: [usize; 7] = [256, 1024, 4096, 8192, 16384, 24576, 32768];

/// A profile of `model` on a `world`-GPU node sampled on the grid above: what a `pat profile` run
/// on that node would give the policy (every group marked modeled).
pub fn sampled_profile(model: &ComponentModel, world: usize) -> Result<Profile> {
    let dims = &model.dims;
    let tps = dims.candidate_tps(world);
    if world == 0 || tps.is_empty() {
        return Err(Error::Invalid(format!(
            "`world` {world}: no tp degree divides it and the model's heads"
        )));
    }
    let mut decode = Vec::new();
    for &tp in &tps {
        for &batch in &SAMPLE_BATCHES {
            for &context in &SAMPLE_CONTEXTS {
                decode.push(DecodeSample {
                    tp,
                    batch,
                    context,
                    step_ms: model.step_ms(tp, batch, context as f64),
                    spread_ms: 0.0,
                });
            }
        }
    }
    let link = model.p.link_bytes_per_s;
    Ok(Profile {
        version: PROFILE_VERSION,
        // The modeled shape's context is checked where the trace is read.
        max_position_embeddings: None,
        world,
        backend: "modeled".into(),
        device: format!("MODELED component model: {world} x {}", model.p.name),
        decode,
        prefill: tps
            .iter()
            .map(|&tp| PrefillSample {
                tp,
                tokens_per_s: model.prefill_tokens_per_s(tp),
            })
            .collect(),
        transfer_bytes_per_s: link,
        switch: SwitchProfile {
            fixed_ms: crate::policy::modeled::SWITCH_FIXED_MS,
            weight_bytes_per_s: link,
            kv_bytes_per_s: link,
        },
        measured: MEASURED_GROUPS
            .iter()
            .map(|g| (g.to_string(), false))
            .collect(),
        kv_capacity_tokens: tps
            .iter()
            .map(|&tp| (tp, model.kv_capacity_tokens(tp)))
            .collect(),
        model: dims.clone(),
        source: "<modeled>".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_by_hand() {
        let pts = [(0.0, 1.0), (10.0, 3.0), (20.0, 4.0)];
        assert_eq!(interp(&pts, 5.0), 2.0);
        assert_eq!(interp(&pts, 15.0), 3.5);
        assert_eq!(interp(&pts, 30.0), 5.0); // extended along the last segment
        assert_eq!(interp(&pts, -10.0), -1.0);
        assert_eq!(interp(&pts[..1], 7.0), 1.0);
    }

    #[test]
    fn what_lies_beyond_the_measured_points_is_named() {
        let sample = |tp, batch, context| DecodeSample {
            tp,
            batch,
            context,
            step_ms: 1.0,
            spread_ms: 0.0,
        };
        use crate::policy::modeled::{Link, ModelShape};
        use crate::sim::component::{ComponentParams, GpuKind};
        let m = ComponentModel::new(
            ModelShape::Llama3_8b.dims(),
            ComponentParams::defaults(GpuKind::H100, Link::NvLink),
        )
        .unwrap();
        let mut p = sampled_profile(&m, 2).unwrap();
        p.decode = vec![sample(1, 1, 32), sample(1, 4, 256), sample(2, 8, 64)];
        let t = ProfileTable::new(&p).unwrap();
        // tp 1's curves reach context 32 (batch 1) and 256 (batch 4): 32 at every batch size.
        assert_eq!(t.beyond(32, |_| 4, &[1]), None);
        let at = |tp: usize| if tp == 1 { 4 } else { 8 };
        let one = t.beyond(64, at, &[1, 2]).unwrap();
        assert!(
            one.contains(
                "at tp 1 contexts up to 64 tokens (measured up to 32 at every batch size)"
            ),
            "{one}"
        );
        assert!(!one.contains("tp 2") && !one.contains("sequences"), "{one}");
        // A tp not asked about is not checked.
        assert_eq!(t.beyond(64, at, &[2]), None);
        let both = t.beyond(24576, |tp| 16 * tp, &[1, 2]).unwrap();
        assert!(
            both.contains("; at tp 2 contexts up to 24576 tokens (measured up to 64 at every batch size) and up to 32 sequences on a replica (measured up to 8)"),
            "{both}"
        );
    }
}
