//! GRPO rollout batches as RL makes them: `prompts` prompts, `group_size` responses each, lengths
//! correlated within a group, an explicit fraction at the cap.
//!
//! - Marginal: the DeepScaleR-like log-logistic of [`super::trace`] (`over_third` of the
//!   responses above cap/3, `at_cap` at the cap), sampled stratified, so a batch holds the
//!   intended fractions up to one response.
//! - Correlation: a Gaussian copula. Each group draws `z_g ~ N(0, 1)`, each response
//!   `z = sqrt(rho) z_g + sqrt(1 - rho) e` with `e ~ N(0, 1)`, so two siblings' latent normals
//!   have correlation `rho`; the stratified quantiles are then dealt
//!   to the responses in the order of their `z` (rank transform), so `rho` sets how alike sibling
//!   lengths are (0: independent; 1: a group shares one quantile band) without changing the
//!   marginal. Normals by Box-Muller.
//! - Prompts: one length per group, uniform in `[cap/384, cap/48]`.
//! - Order: groups in order, their responses contiguous (`group` field = prompt index), which is
//!   how VeRL hands a batch to its replicas (contiguous chunks).

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::trace::{
    loglogistic_params, max_at_cap, Trace, TraceRequest, DEEPSCALER_OVER_THIRD, MAX_TRACE_REQUESTS,
};
use crate::error::{Error, Result};

/// Knobs of a GRPO batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GrpoSpec {
    pub prompts: usize,
    pub group_size: usize,
    pub cap: usize,
    /// Correlation of the latent normals of two responses of one prompt (siblings), in [0, 1].
    pub rho: f64,
    /// Fraction of responses that run to the cap, in (0, 0.5).
    pub at_cap: f64,
    pub seed: u64,
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A GRPO batch (module docs).
pub fn grpo(s: &GrpoSpec) -> Result<Trace> {
    let n = s.prompts.saturating_mul(s.group_size);
    if s.prompts == 0 || s.group_size == 0 || n > MAX_TRACE_REQUESTS {
        return Err(Error::Invalid(format!(
            "`prompts` x `group_size` must be between 1 and {MAX_TRACE_REQUESTS} responses (the most a trace may have), got {} x {}",
            s.prompts, s.group_size
        )));
    }
    if s.cap < 48 {
        return Err(Error::Invalid(format!(
            "`cap` {} is too small (need >= 48)",
            s.cap
        )));
    }
    if !(0.0..=1.0).contains(&s.rho) {
        return Err(Error::Invalid(format!(
            "`rho` must be in [0, 1], got {}",
            s.rho
        )));
    }
    let most = max_at_cap();
    if !(s.at_cap > 0.0 && s.at_cap <= most) {
        return Err(Error::Invalid(format!(
            "`at_cap` must be above 0 and at most {most:.4}, got {}: the lengths are a log-logistic fitted to {DEEPSCALER_OVER_THIRD} of them over cap/3 and `at_cap` at the cap, which needs some at the cap (try 0.001) and, above {most:.4}, has a shape under 1 (most responses collapse to a few tokens)",
            s.at_cap
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    let (alpha, beta) = loglogistic_params(s.cap, DEEPSCALER_OVER_THIRD, s.at_cap);
    let mut us: Vec<f64> = (0..n)
        .map(|i| (i as f64 + rng.random::<f64>()) / n as f64)
        .collect();
    us.sort_by(f64::total_cmp);
    let (shared, side) = (s.rho.sqrt(), (1.0 - s.rho).sqrt());
    let mut z: Vec<(f64, usize)> = Vec::with_capacity(n);
    for g in 0..s.prompts {
        let zg = normal(&mut rng);
        for k in 0..s.group_size {
            z.push((shared * zg + side * normal(&mut rng), g * s.group_size + k));
        }
    }
    // Ties (rho = 1) are broken at random so no group is favoured by its index.
    z.shuffle(&mut rng);
    z.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut quantile = vec![0.0; n];
    for (&(_, i), &u) in z.iter().zip(&us) {
        quantile[i] = u;
    }
    let (plo, phi) = ((s.cap / 384).max(1), (s.cap / 48).max(1));
    let prompt_len: Vec<usize> = (0..s.prompts)
        .map(|_| rng.random_range(plo..=phi))
        .collect();
    let requests = quantile
        .iter()
        .enumerate()
        .map(|(i, &u)| {
            let u = u.clamp(1e-12, 1.0 - 1e-12);
            let x = alpha * (u / (1.0 - u)).powf(1.0 / beta);
            TraceRequest {
                prompt_len: prompt_len[i / s.group_size],
                response_len: (x.round() as usize).clamp(1, s.cap),
                input_ids: None,
                group: Some(i / s.group_size),
            }
        })
        .collect();
    Ok(Trace { requests })
}

/// Pearson correlation of log-lengths between siblings (pairs within a group), for reports and
/// tests: 0 for independent lengths, near 1 when a group shares its length.
pub fn sibling_correlation(t: &Trace) -> Option<f64> {
    let mut groups: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
    for r in &t.requests {
        groups
            .entry(r.group?)
            .or_default()
            .push((r.response_len as f64).ln());
    }
    let all: Vec<f64> = groups.values().flatten().copied().collect();
    let mean = all.iter().sum::<f64>() / all.len().max(1) as f64;
    let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / all.len().max(1) as f64;
    let (mut cov, mut pairs) = (0.0, 0usize);
    for v in groups.values() {
        for i in 0..v.len() {
            for j in 0..v.len() {
                if i != j {
                    cov += (v[i] - mean) * (v[j] - mean);
                    pairs += 1;
                }
            }
        }
    }
    (pairs > 0 && var > 0.0).then(|| cov / pairs as f64 / var)
}
