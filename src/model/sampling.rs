//! Token sampling: greedy, temperature, top-k, top-p; seeded per request so results do not depend
//! on batching, replica or tp.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// How to pick the next token. `temperature == 0` is greedy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
    /// 1.0 = no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Invalid(format!(
                "`temperature` must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!(
                "`top_p` must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Index of the largest logit; ties go to the lowest index.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A request's private random stream: the same (seed, request) always draws the same numbers.
pub fn request_rng(seed: u64, request: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(request as u64);
    rng
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut ChaCha8Rng) -> u32 {
    if p.temperature == 0.0 {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    // Descending by logit, ties by index, so the candidate order is deterministic.
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if p.top_k > 0 {
        idx.truncate(p.top_k);
    }
    let max = logits[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - max) / p.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|&x| {
                acc += x;
                acc >= p.top_p as f64
            })
            .map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        let t: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= t);
    }
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (k, &x) in probs.iter().enumerate() {
        acc += x;
        if u < acc {
            return idx[k] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

/// `len` random token ids for synthetic prompts (benchmarks, profiles, traces without ids):
/// uniform in 3..vocab, skipping the usual special ids 0..2, or over the whole vocabulary when
/// it has no more than 3 tokens (a degenerate but valid model).
pub fn random_ids(rng: &mut impl rand::Rng, len: usize, vocab: usize) -> Vec<u32> {
    let hi = u32::try_from(vocab).unwrap_or(u32::MAX).max(1);
    let lo = if hi > 3 { 3 } else { 0 };
    (0..len).map(|_| rng.random_range(lo..hi)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0, 3.0]), 1);
        let p = SamplingParams::default();
        assert_eq!(sample(&[0.0, 0.0, 5.0], &p, &mut request_rng(1, 0)), 2);
    }

    #[test]
    fn seeded_sampling_is_deterministic_and_per_request() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.7).sin()).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 42,
        };
        let draw = |req| {
            let mut r = request_rng(42, req);
            (0..20)
                .map(|_| sample(&logits, &p, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0, 4.9, 0.0, -1.0, 4.8];
        let mut r = request_rng(7, 0);
        let k2 = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            seed: 7,
        };
        for _ in 0..200 {
            assert!(sample(&logits, &k2, &mut r) <= 1);
        }
        // The top token alone holds more than 1% of the mass: top_p 0.01 keeps only it.
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.01,
            seed: 7,
        };
        for _ in 0..50 {
            assert_eq!(sample(&logits, &p, &mut r), 0);
        }
        assert!(SamplingParams { top_p: 0.0, ..p }.validate().is_err());
        assert!(SamplingParams {
            temperature: -1.0,
            ..p
        }
        .validate()
        .is_err());
    }
}
