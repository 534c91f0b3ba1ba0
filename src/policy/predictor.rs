//! Decode step latency for any (tp, batch, context), fitted per tp from a profile's samples.
//!
//! The forms are physical rather than a lookup table:
//!
//! ```text
//! device(batch, ctx) = a + b * batch + c * batch * ctx  (+ d * ctx)
//! step_ms            = device                                   (Abc, Abcd)
//!                    = max(h0 + h1 * batch, device, compute)     (HostMax, the default)
//! ```
//!
//! - `a`: the weights are read once per step whatever the batch (plus launch overhead and the
//!   latency part of the all-reduces): a constant.
//! - `b`: per-sequence work (matmul rows, activations, the bandwidth part of the all-reduces,
//!   sampling) grows linearly with the batch.
//! - `c`: attention reads every cached K/V once per step: `batch * ctx` tokens of KV.
//! - `d`: per-context cost independent of the batch (attention split/launch effects).
//! - `h0 + h1 * batch`: the host's share (scheduler, stop checks, per-sequence bookkeeping) when
//!   it overlaps the device: a step lasts as long as the slower of the two. A linear form cannot
//!   represent that max, and charging the per-sequence slope everywhere mispredicts both the
//!   host-bound and the device-bound region.
//! - `compute`: a second device branch of the same form for large batches, where the GEMMs
//!   turn compute-bound and the step grows faster with the batch (optional).
//!
//! Coefficients minimise the *relative* squared error (rows weighted by 1/step), so small-batch
//! tail points are not swamped by large-batch ones. Linear forms: weighted normal equations,
//! columns scaled to unit max, partial pivoting. HostMax: alternating assignment — each sample
//! belongs to the branch that is largest at it; each branch is refitted on its samples; repeated
//! until the assignment is stable, from several starts (no extra branch; host on the flat bottom
//! of each batch's context curve or the smallest contexts of the larger batches; with or without
//! a compute branch on the two largest batches), keeping the best. Unlike
//! interpolating a grid, the fit extrapolates sanely outside the profiled batches and contexts (a
//! long tail reaches contexts the profile may not hold). `ctx` may be fractional: it is the live
//! set's mean context, and `c * batch * mean_ctx = c * sum(ctx)` is exact for these forms.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::profile::{DecodeSample, Profile};
use crate::error::{Error, Result};
use crate::text::plural;

/// Which terms the fit uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FitForm {
    /// `a + b*batch + c*batch*ctx`.
    Abc,
    /// `a + b*batch + c*batch*ctx + d*ctx`.
    Abcd,
    /// `max(h0 + h1*batch, a + b*batch + c*batch*ctx + d*ctx)`.
    #[default]
    HostMax,
}

impl FitForm {
    /// Coefficients of the device branch.
    fn device_terms(self) -> usize {
        match self {
            FitForm::Abc => 3,
            FitForm::Abcd | FitForm::HostMax => 4,
        }
    }
    /// Samples a fit needs at least.
    pub fn terms(self) -> usize {
        self.device_terms()
    }
    pub fn name(self) -> &'static str {
        match self {
            FitForm::Abc => "a + b*batch + c*batch*ctx",
            FitForm::Abcd => "a + b*batch + c*batch*ctx + d*ctx",
                    FitForm::HostMax => "max(host h0 + h1*batch, device a + b*batch + c*batch*ctx + d*ctx, compute-bound branch)",
        }
    }
}

/// Fitted coefficients for one tp degree (ms, ms/seq, ms/(seq*token), ms/token; the host line
/// `h0 + h1*batch` in ms and ms/seq, both 0 when the fit has no host branch).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Fit {
    pub a: f64,
    pub b: f64,
    pub c: f64,
    pub d: f64,
    pub h0: f64,
    pub h1: f64,
    /// A second device branch `[a, b, c, d]` where the step turns compute-bound (large batches:
    /// the GEMMs pass their memory/compute crossover); `None` when the fit has none.
    pub compute: Option<[f64; 4]>,
}

impl Fit {
    /// The device branch alone.
    pub fn device_ms(&self, batch: usize, ctx: f64) -> f64 {
        let b = batch as f64;
        self.a + self.b * b + self.c * b * ctx + self.d * ctx
    }
    /// The host branch alone (0 without one).
    pub fn host_ms(&self, batch: usize) -> f64 {
        self.h0 + self.h1 * batch as f64
    }
    /// The compute-bound branch alone (-inf without one).
    pub fn compute_ms(&self, batch: usize, ctx: f64) -> f64 {
        self.compute.map_or(f64::NEG_INFINITY, |[a, b, c, d]| {
            let n = batch as f64;
            a + b * n + c * n * ctx + d * ctx
        })
    }
    /// Predicted step time; 0 for an empty batch, never negative.
    pub fn step_ms(&self, batch: usize, ctx: f64) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        self.device_ms(batch, ctx)
            .max(self.host_ms(batch))
            .max(self.compute_ms(batch, ctx))
            .max(0.0)
    }
}

fn features(batch: usize, ctx: f64) -> [f64; 4] {
    let b = batch as f64;
    [1.0, b, b * ctx, ctx]
}

/// Weighted least squares of `ys` on the first `k` columns of `rows` (weights 1/y: relative
/// error). `Err(why)` when underdetermined.
fn solve(rows: &[[f64; 4]], ys: &[f64], k: usize) -> std::result::Result<[f64; 4], String> {
    if rows.len() < k {
        return Err(format!("only {}", plural(rows.len(), "sample")));
    }
    let mut scale = [0f64; 4];
    for r in rows {
        for j in 0..k {
            scale[j] = scale[j].max(r[j].abs());
        }
    }
    if scale[..k].contains(&0.0) {
        return Err("a term is zero in every sample".into());
    }
    // Normal equations A x = y over the scaled, weighted columns, augmented as [A | y].
    let mut m = [[0f64; 5]; 4];
    for (r, &y) in rows.iter().zip(ys) {
        let w = if y.abs() > 1e-12 { 1.0 / y.abs() } else { 1.0 };
        for i in 0..k {
            for j in 0..k {
                m[i][j] += w * r[i] / scale[i] * w * r[j] / scale[j];
            }
            m[i][4] += w * r[i] / scale[i] * w * y;
        }
    }
    let trace: f64 = (0..k).map(|i| m[i][i]).sum();
    for col in 0..k {
        let piv = (col..k)
            .max_by(|&x, &y| m[x][col].abs().total_cmp(&m[y][col].abs()))
            .unwrap_or(col);
        m.swap(col, piv);
        if m[col][col].abs() <= 1e-12 * trace {
            return Err("the samples do not vary batch and context independently".into());
        }
        let pivot_row = m[col];
        for (r, row) in m.iter_mut().enumerate().take(k) {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (x, p) in row.iter_mut().zip(pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    let mut x = [0f64; 4];
    for i in 0..k {
        x[i] = m[i][4] / m[i][i] / scale[i];
    }
    Ok(x)
}

fn device_fit(samples: &[&DecodeSample], k: usize) -> std::result::Result<Fit, String> {
    let rows: Vec<[f64; 4]> = samples
        .iter()
        .map(|s| features(s.batch, s.context as f64))
        .collect();
    let ys: Vec<f64> = samples.iter().map(|s| s.step_ms).collect();
    let x = solve(&rows, &ys, k)?;
    Ok(Fit {
        a: x[0],
        b: x[1],
        c: x[2],
        d: x[3],
        ..Fit::default()
    })
}

fn host_line(samples: &[&DecodeSample]) -> Option<(f64, f64)> {
    let rows: Vec<[f64; 4]> = samples
        .iter()
        .map(|s| [1.0, s.batch as f64, 0.0, 0.0])
        .collect();
    let ys: Vec<f64> = samples.iter().map(|s| s.step_ms).collect();
    solve(&rows, &ys, 2).ok().map(|x| (x[0], x[1]))
}

/// Sum of squared relative errors of `fit` on `samples`.
fn rel_sse(fit: &Fit, samples: &[DecodeSample]) -> f64 {
    samples
        .iter()
        .map(|s| {
            let e = (fit.step_ms(s.batch, s.context as f64) - s.step_ms) / s.step_ms;
            e * e
        })
        .sum()
}

/// Which branch of a HostMax fit a sample falls on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Branch {
    Host,
    Device,
    Compute,
}

/// The HostMax fit (module docs) from one starting assignment.
fn host_max_from(samples: &[DecodeSample], mut side: Vec<Branch>) -> Option<Fit> {
    for _ in 0..60 {
        let of = |b: Branch| -> Vec<&DecodeSample> {
            samples
                .iter()
                .zip(&side)
                .filter(|(_, &s)| s == b)
                .map(|(x, _)| x)
                .collect()
        };
        let mut fit = device_fit(&of(Branch::Device), 4)
            .or_else(|_| device_fit(&of(Branch::Device), 3))
            .ok()?;
        let host = of(Branch::Host);
        if !host.is_empty() {
            (fit.h0, fit.h1) = host_line(&host)?;
        }
        let comp = of(Branch::Compute);
        if !comp.is_empty() {
            let c = device_fit(&comp, 4)
                .or_else(|_| device_fit(&comp, 3))
                .ok()?;
            fit.compute = Some([c.a, c.b, c.c, c.d]);
        }
        let next: Vec<Branch> = samples
            .iter()
            .map(|s| {
                let (b, x) = (s.batch, s.context as f64);
                let (h, d, c) = (fit.host_ms(b), fit.device_ms(b, x), fit.compute_ms(b, x));
                if h > d && h >= c {
                    Branch::Host
                } else if c > d {
                    Branch::Compute
                } else {
                    Branch::Device
                }
            })
            .collect();
        if next == side {
            return Some(fit);
        }
        side = next;
    }
    None
}

fn fit_host_max(samples: &[DecodeSample], what: &str) -> Result<Fit> {
    let all: Vec<&DecodeSample> = samples.iter().collect();
    let mut best = device_fit(&all, 4)
        .or_else(|_| device_fit(&all, 3))
        .map_err(|why| underdetermined(what, 4, &why))?;
    let mut best_err = rel_sse(&best, samples);
    // Host starts: the flat bottom of each batch's context curve (within 1% of its smallest
    // step), or the smallest context of the larger half of the batches.
    let mut min_by_batch: BTreeMap<usize, f64> = BTreeMap::new();
    for s in samples {
        let m = min_by_batch.entry(s.batch).or_insert(f64::INFINITY);
        *m = m.min(s.step_ms);
    }
    let min_ctx = samples.iter().map(|s| s.context).min().unwrap_or(0);
    let batches: Vec<usize> = min_by_batch.keys().copied().collect();
    let median_b = batches.get(batches.len() / 2).copied().unwrap_or(0);
    let top_b = batches.iter().rev().nth(1).copied().unwrap_or(usize::MAX);
    let flat = |s: &DecodeSample| s.step_ms <= 1.01 * min_by_batch[&s.batch];
    let corner = |s: &DecodeSample| s.context == min_ctx && s.batch >= median_b;
    // Compute starts: none, or the two largest batches.
    for host_start in [&flat as &dyn Fn(&DecodeSample) -> bool, &corner] {
        for with_compute in [false, true] {
            let side: Vec<Branch> = samples
                .iter()
                .map(|s| {
                    if with_compute && s.batch >= top_b {
                        Branch::Compute
                    } else if host_start(s) {
                        Branch::Host
                    } else {
                        Branch::Device
                    }
                })
                .collect();
            if let Some(fit) = host_max_from(samples, side) {
                let err = rel_sse(&fit, samples);
                if err < best_err * (1.0 - 1e-9) {
                    best = fit;
                    best_err = err;
                }
            }
        }
    }
    Ok(best)
}

fn underdetermined(what: &str, k: usize, why: &str) -> Error {
    Error::Invalid(format!(
        "{what}: cannot fit {k} coefficients ({why}); profile more (batch, context) points"
    ))
}

/// Fit of `samples` (all of one tp) in `form`; `what` names them in errors.
pub fn fit_samples(samples: &[DecodeSample], form: FitForm, what: &str) -> Result<Fit> {
    match form {
        FitForm::HostMax => fit_host_max(samples, what),
        _ => {
            let all: Vec<&DecodeSample> = samples.iter().collect();
            let k = form.device_terms();
            device_fit(&all, k).map_err(|why| underdetermined(what, k, &why))
        }
    }
}

/// What the policy knows of the node: per-tp fits of a profile's decode samples, their noise,
/// and the KV room the profile states.
#[derive(Clone, Debug, PartialEq)]
pub struct Predictor {
    pub form: FitForm,
    pub fits: BTreeMap<usize, Fit>,
    /// Relative spread of the profile's repeated measurements (median of spread / step over the
    /// samples that report one; 0 when none do). Differences of two predictions inside about
    /// twice this are noise.
    pub noise: f64,
    /// KV tokens one replica holds, per tp (the profile's `kv_capacity_tokens`); a tp not listed
    /// is unbounded. The forecast queues and preempts what does not fit
    /// ([`super::forecast::drain_ms`]).
    pub kv_capacity_tokens: BTreeMap<usize, usize>,
}

/// Held-out accuracy of the predictor on a profile (mean absolute percentage error, in %).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ValidationReport {
    pub mape_per_tp: BTreeMap<usize, f64>,
    pub overall_mape: f64,
    pub n_train: usize,
    pub n_test: usize,
}

fn by_tp(samples: &[DecodeSample]) -> BTreeMap<usize, Vec<DecodeSample>> {
    let mut m: BTreeMap<usize, Vec<DecodeSample>> = BTreeMap::new();
    for s in samples {
        m.entry(s.tp).or_default().push(*s);
    }
    m
}

impl Predictor {
    /// Fits every tp in the profile with the default form ([`FitForm::HostMax`]).
    /// The profile's KV capacity comes along.
    pub fn from_profile(p: &Profile) -> Result<Predictor> {
        Ok(Predictor {
            kv_capacity_tokens: p.kv_capacity_tokens.clone(),
            ..Self::from_samples(&p.decode, FitForm::default())?
        })
    }

    pub fn from_samples(samples: &[DecodeSample], form: FitForm) -> Result<Predictor> {
        let mut fits = BTreeMap::new();
        for (tp, s) in by_tp(samples) {
            fits.insert(
                tp,
                fit_samples(&s, form, &format!("decode samples at tp {tp}"))?,
            );
        }
        if fits.is_empty() {
            return Err(Error::Invalid("no decode samples to fit".into()));
        }
        let mut rel: Vec<f64> = samples
            .iter()
            .filter(|s| s.spread_ms > 0.0 && s.step_ms > 0.0)
            .map(|s| s.spread_ms / s.step_ms)
            .collect();
        let noise = if rel.is_empty() {
            0.0
        } else {
            crate::stats::median(&mut rel)
        };
        Ok(Predictor {
            form,
            fits,
            noise,
            kv_capacity_tokens: BTreeMap::new(),
        })
    }

    /// The fit for `tp`, or an error naming the tp and the degrees that were profiled.
    pub fn fit(&self, tp: usize) -> Result<&Fit> {
        self.fits.get(&tp).ok_or_else(|| {
            let have: Vec<String> = self.fits.keys().map(|t| t.to_string()).collect();
            Error::Invalid(format!(
                "the profile has no decode samples at tp {tp} (profiled: {})",
                have.join(", ")
            ))
        })
    }

    /// Predicted step time of a replica at `tp` with `batch` sequences of mean context `ctx`.
    pub fn step_ms(&self, tp: usize, batch: usize, ctx: f64) -> Result<f64> {
        Ok(self.fit(tp)?.step_ms(batch, ctx))
    }

    pub fn tps(&self) -> Vec<usize> {
        self.fits.keys().copied().collect()
    }
}

/// Fits on a random `1 - holdout_fraction` of each tp's samples and reports the MAPE on the rest.
///
/// Each tp holds out `round(n * fraction)` samples, at least one, keeping at least as many for
/// training as the form has terms.
pub fn validate(p: &Profile, holdout_fraction: f64, seed: u64) -> Result<ValidationReport> {
    validate_form(p, holdout_fraction, seed, FitForm::default())
}

pub fn validate_form(
    p: &Profile,
    holdout_fraction: f64,
    seed: u64,
    form: FitForm,
) -> Result<ValidationReport> {
    if !(holdout_fraction > 0.0 && holdout_fraction < 1.0) {
        return Err(Error::Invalid(format!(
            "holdout fraction must be in (0, 1), got {holdout_fraction}"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut mape_per_tp, mut n_train, mut n_test, mut sum_ape) = (BTreeMap::new(), 0, 0, 0.0);
    for (tp, mut s) in by_tp(&p.decode) {
        s.shuffle(&mut rng);
        let n = s.len();
        let test = ((n as f64 * holdout_fraction).round() as usize).max(1);
        if n < test + form.terms() {
            return Err(Error::Invalid(format!(
                "tp {tp}: {} are too few to hold out {test} and fit {} terms",
                plural(n, "sample"),
                form.terms()
            )));
        }
        let fit = fit_samples(&s[test..], form, &format!("decode samples at tp {tp}"))?;
        let ape: f64 = s[..test]
            .iter()
            .map(|x| 100.0 * (fit.step_ms(x.batch, x.context as f64) - x.step_ms).abs() / x.step_ms)
            .sum();
        mape_per_tp.insert(tp, ape / test as f64);
        sum_ape += ape;
        n_train += n - test;
        n_test += test;
    }
    Ok(ValidationReport {
        mape_per_tp,
        overall_mape: sum_ape / n_test.max(1) as f64,
        n_train,
        n_test,
    })
}
