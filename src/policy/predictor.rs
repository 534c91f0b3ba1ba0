//! Decode step latency for any (tp, batch, context), fitted per tp from a profile's samples.
//!
//! The form is physical rather than a lookup table:
//!
//! ```text
//! step_ms(tp, batch, ctx) = a + b * batch + c * batch * ctx  (+ d * ctx)
//! ```
//!
//! - `a`: the weights are read once per step whatever the batch (plus launch overhead and the
//!   latency part of the all-reduces): a constant.
//! - `b`: per-sequence work (matmul rows, activations, the bandwidth part of the all-reduces,
//!   sampling) grows linearly with the batch.
//! - `c`: attention reads every cached K/V once per step: `batch * ctx` tokens of KV.
//! - `d` (optional): per-context cost independent of the batch (attention split/launch effects).
//!
//! Coefficients come from least squares on the profile's samples (normal equations, columns
//! scaled to unit max before solving with partial pivoting). Unlike interpolating a grid, the fit
//! extrapolates sanely outside the profiled batches and contexts (a long tail reaches contexts the
//! profile may not hold) and stays monotone where the physics is. `ctx` may be fractional: it is
//! the live set's mean context, and `c * batch * mean_ctx = c * sum(ctx)` is exact for this form.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::profile::{DecodeSample, Profile};
use crate::error::{Error, Result};

/// Which terms the fit uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FitForm {
    /// `a + b*batch + c*batch*ctx`.
    #[default]
    Abc,
    /// `a + b*batch + c*batch*ctx + d*ctx`.
    Abcd,
}

impl FitForm {
    fn terms(self) -> usize {
        match self {
            FitForm::Abc => 3,
            FitForm::Abcd => 4,
        }
    }
}

/// Fitted coefficients for one tp degree (ms, ms/seq, ms/(seq*token), ms/token).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Fit {
    pub a: f64,
    pub b: f64,
    pub c: f64,
    pub d: f64,
}

impl Fit {
    /// Predicted step time; 0 for an empty batch, never negative.
    pub fn step_ms(&self, batch: usize, ctx: f64) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        let b = batch as f64;
        (self.a + self.b * b + self.c * b * ctx + self.d * ctx).max(0.0)
    }
}

fn features(form: FitForm, batch: usize, ctx: f64) -> [f64; 4] {
    let b = batch as f64;
    let d = if form == FitForm::Abcd { ctx } else { 0.0 };
    [1.0, b, b * ctx, d]
}

/// Least-squares fit of `samples` (all of one tp); `what` names them in errors.
pub fn fit_samples(samples: &[DecodeSample], form: FitForm, what: &str) -> Result<Fit> {
    let k = form.terms();
    let underdetermined = |why: &str| {
        Error::Invalid(format!(
            "{what}: cannot fit {k} coefficients ({why}); profile more (batch, context) points"
        ))
    };
    if samples.len() < k {
        return Err(underdetermined(&format!("only {} samples", samples.len())));
    }
    let rows: Vec<[f64; 4]> = samples
        .iter()
        .map(|s| features(form, s.batch, s.context as f64))
        .collect();
    let mut scale = [0f64; 4];
    for r in &rows {
        for j in 0..k {
            scale[j] = scale[j].max(r[j].abs());
        }
    }
    if scale[..k].contains(&0.0) {
        return Err(underdetermined("a term is zero in every sample"));
    }
    // Normal equations A x = y over the scaled columns, augmented as [A | y].
    let mut m = [[0f64; 5]; 4];
    for (r, s) in rows.iter().zip(samples) {
        for i in 0..k {
            for j in 0..k {
                m[i][j] += r[i] / scale[i] * r[j] / scale[j];
            }
            m[i][4] += r[i] / scale[i] * s.step_ms;
        }
    }
    let trace: f64 = (0..k).map(|i| m[i][i]).sum();
    for col in 0..k {
        let piv = (col..k)
            .max_by(|&x, &y| m[x][col].abs().total_cmp(&m[y][col].abs()))
            .unwrap_or(col);
        m.swap(col, piv);
        if m[col][col].abs() <= 1e-12 * trace {
            return Err(underdetermined(
                "the samples do not vary batch and context independently",
            ));
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
    let x: Vec<f64> = (0..k).map(|i| m[i][4] / m[i][i] / scale[i]).collect();
    Ok(Fit {
        a: x[0],
        b: x[1],
        c: x[2],
        d: if k == 4 { x[3] } else { 0.0 },
    })
}

/// Per-tp fits of a profile's decode samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Predictor {
    pub form: FitForm,
    pub fits: BTreeMap<usize, Fit>,
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
    /// Fits every tp in the profile with the default form (`a + b*batch + c*batch*ctx`).
    pub fn from_profile(p: &Profile) -> Result<Predictor> {
        Self::from_samples(&p.decode, FitForm::Abc)
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
        Ok(Predictor { form, fits })
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
    validate_form(p, holdout_fraction, seed, FitForm::Abc)
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
                "tp {tp}: {n} samples are too few to hold out {test} and fit {} terms",
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
