//! Remaining-length estimates for live sequences: the empirical mean residual life, or the oracle.
//!
//! A live sequence that has generated `g` tokens will run to some total `R > g`. From a sample of
//! response lengths (a trace, or the lengths of earlier rollouts) the estimate is the conditional
//! mean residual life `E[R - g | R > g]`: the mean of `(R_i - g)` over the observed lengths longer
//! than `g`. Long-tailed distributions make it *grow* with `g` — a sequence that is already long
//! is expected to run longer still — which is exactly what tells the decision rule that the few
//! survivors are stragglers.
//!
//! When no observed length exceeds `g` the sample says nothing; the fallback is `cap - g` when a
//! cap is known and above `g` (the sequence cannot outrun the cap), else `g` (as long again as it
//! has run), never less than 1 token.
//!
//! A *set* of live sequences needs more than one number each: if all k survivors at `g` were
//! given the mean, the forecast would see them finish together and miss the tail (the mean of the
//! max is far above the max of the means). [`LengthDist::residual_strata`] splits the conditional
//! distribution into k equal-probability strata and returns each stratum's mean: for k = 1 that is
//! the mean residual life, and for any k the expected number still live after s more steps and
//! the expected remaining tokens are preserved. [`Remaining::estimate_set`] deals those strata to
//! the sequences that share a `g` (in a synchronous rollout, all of them), longest first and
//! round-robin over replicas, since nothing tells one survivor from another.

use crate::error::{Error, Result};

/// An empirical response-length distribution with O(log n) residual-life queries.
#[derive(Clone, Debug, PartialEq)]
pub struct LengthDist {
    /// Lengths, ascending.
    sorted: Vec<usize>,
    /// `suffix[i]` = sum of `sorted[i..]`.
    suffix: Vec<u128>,
    cap: Option<usize>,
}

impl LengthDist {
    /// From observed response lengths (at least one) and the generation cap, if known.
    pub fn new(lengths: &[usize], cap: Option<usize>) -> Result<LengthDist> {
        if lengths.is_empty() {
            return Err(Error::Invalid(
                "a length distribution needs at least one observed length".into(),
            ));
        }
        let mut sorted = lengths.to_vec();
        sorted.sort_unstable();
        let mut suffix = vec![0u128; sorted.len() + 1];
        for i in (0..sorted.len()).rev() {
            suffix[i] = suffix[i + 1] + sorted[i] as u128;
        }
        Ok(LengthDist {
            sorted,
            suffix,
            cap,
        })
    }

    pub fn cap(&self) -> Option<usize> {
        self.cap
    }

    /// How many lengths it was made from.
    pub fn observed(&self) -> usize {
        self.sorted.len()
    }

    /// `E[R - g | R > g]` over the observed lengths, or the fallback (module docs).
    pub fn mean_residual(&self, g: usize) -> f64 {
        let i = self.sorted.partition_point(|&r| r <= g);
        let n = self.sorted.len() - i;
        if n == 0 {
            return match self.cap {
                Some(c) if c > g => (c - g) as f64,
                _ => g.max(1) as f64,
            };
        }
        (self.suffix[i] as f64 / n as f64 - g as f64).max(1.0)
    }

    /// Means of `k` equal-probability strata of `{R - g | R > g}`, longest first (module docs).
    ///
    /// With the m residuals `x_0 <= .. <= x_{m-1}` each of mass 1/m, and
    /// `F(u) = integral_0^u Q(v) dv = (sum_{j < floor(um)} x_j + frac(um) x_{floor(um)}) / m`,
    /// stratum i (of mass 1/k) has mean `k (F((i+1)/k) - F(i/k))`.
    pub fn residual_strata(&self, g: usize, k: usize) -> Vec<f64> {
        let i0 = self.sorted.partition_point(|&r| r <= g);
        let m = self.sorted.len() - i0;
        if m == 0 || k == 0 {
            return vec![self.mean_residual(g); k];
        }
        // Sum of the first j residuals.
        let head = |j: usize| (self.suffix[i0] - self.suffix[i0 + j]) as f64 - (j * g) as f64;
        let big_f = |u: f64| {
            let pos = u * m as f64;
            let j = (pos.floor() as usize).min(m);
            let frac = if j < m { pos - j as f64 } else { 0.0 };
            let next = if j < m {
                (self.sorted[i0 + j] - g) as f64
            } else {
                0.0
            };
            (head(j) + frac * next) / m as f64
        };
        let mut out: Vec<f64> = (0..k)
            .map(|i| {
                let (a, b) = (i as f64 / k as f64, (i + 1) as f64 / k as f64);
                (k as f64 * (big_f(b) - big_f(a))).max(1.0)
            })
            .collect();
        out.reverse();
        out
    }
}

/// What the estimator may know of one live sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqView {
    pub generated: usize,
    /// Its replica (strata are dealt round-robin over replicas).
    pub replica: usize,
    /// The real response length: only the oracle reads it.
    pub true_len: Option<usize>,
    /// Live sequences of its prompt group (GRPO siblings), itself included; 0 when unknown. At
    /// equal `generated`, a sequence whose siblings are still running is dealt a longer stratum:
    /// sibling lengths are correlated, so a group still running is likely a long group.
    pub live_siblings: usize,
}

/// How the decision rule learns how long each live sequence will still run.
#[derive(Clone, Debug, PartialEq)]
pub enum Remaining {
    /// Conditional mean residual life from a length distribution.
    Empirical(LengthDist),
    /// The true remaining length (simulation only: the engine cannot know it).
    Oracle,
}

impl Remaining {
    /// Estimated tokens still to generate for a live sequence that has generated `generated`;
    /// `true_len` is its real response length, required by (and only used by) the oracle.
    pub fn estimate(&self, generated: usize, true_len: Option<usize>) -> Result<f64> {
        match self {
            Remaining::Empirical(d) => Ok(d.mean_residual(generated)),
            Remaining::Oracle => match true_len {
                Some(r) if r > generated => Ok((r - generated) as f64),
                Some(r) => Err(Error::Invalid(format!(
                    "oracle: a live sequence has generated {generated} of {r} tokens"
                ))),
                None => Err(Error::Invalid(
                    "the oracle estimator needs each sequence's true length".into(),
                )),
            },
        }
    }

    /// Estimates for a whole live set (module docs): strata of the conditional distribution per
    /// group of equal `generated`, or the true remaining lengths for the oracle.
    pub fn estimate_set(&self, seqs: &[SeqView]) -> Result<Vec<f64>> {
        let Remaining::Empirical(d) = self else {
            return seqs
                .iter()
                .map(|s| self.estimate(s.generated, s.true_len))
                .collect();
        };
        let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (i, s) in seqs.iter().enumerate() {
            groups.entry(s.generated).or_default().push(i);
        }
        let mut out = vec![0.0; seqs.len()];
        for (g, idx) in groups {
            // Deal order: most live siblings first, then the n-th sequence of each replica,
            // replicas ascending, n ascending.
            let mut seen: std::collections::BTreeMap<usize, usize> = Default::default();
            let mut order: Vec<(std::cmp::Reverse<usize>, usize, usize, usize)> = idx
                .iter()
                .map(|&i| {
                    let n = seen.entry(seqs[i].replica).or_insert(0);
                    *n += 1;
                    (
                        std::cmp::Reverse(seqs[i].live_siblings),
                        *n,
                        seqs[i].replica,
                        i,
                    )
                })
                .collect();
            order.sort_unstable();
            for ((_, _, _, i), est) in order.into_iter().zip(d.residual_strata(g, idx.len())) {
                out[i] = est;
            }
        }
        Ok(out)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Remaining::Empirical(_) => "empirical mean residual life",
            Remaining::Oracle => "oracle",
        }
    }
}
