//! The predicted time to drain a live set over dp replicas (placement: `crate::parallel::placement`).
//!
//! Replicas decode in lockstep: every global step each replica with live sequences runs one
//! decode step, and the step takes as long as the slowest replica (`max` over replicas of the
//! predictor's step time). Global step boundaries are where a layout switch can happen, so this is
//! the clock the decision rule forecasts with (the simulator keeps its own clock: `crate::sim`). A sequence with `remaining` steps left
//! takes part in the next `remaining` steps, its context growing by one token per step.
//!
//! [`drain_ms`] sums that clock in closed form: between two finish events every replica's batch is
//! fixed and its step time is linear in the step index, so the segment's sum is the sum of the
//! upper envelope of a few lines — found exactly by bisecting the segment until one line dominates
//! at both ends (then it dominates throughout, since lines differ linearly).

use super::predictor::Fit;

/// One sequence in a forecast: cached tokens now and decode steps still to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub context: usize,
    pub remaining: usize,
}

/// A replica's step time on one segment as a line `alpha + beta * s` in the global step index s.
#[derive(Clone, Copy, Debug)]
struct Line {
    alpha: f64,
    beta: f64,
}

impl Line {
    fn at(&self, s: u64) -> f64 {
        self.alpha + self.beta * s as f64
    }
    /// Sum over integer s in [lo, hi).
    fn sum(&self, lo: u64, hi: u64) -> f64 {
        let n = (hi - lo) as f64;
        n * self.alpha + self.beta * n * (lo + hi - 1) as f64 / 2.0
    }
}

/// Sum over s in [lo, hi) of the max of `lines` (which include the zero line).
fn envelope_sum(lines: &[Line], lo: u64, hi: u64) -> f64 {
    if hi <= lo {
        return 0.0;
    }
    let last = hi - 1;
    let eps = 1e-12;
    for l in lines {
        let dominates = lines
            .iter()
            .all(|m| l.at(lo) + eps >= m.at(lo) && l.at(last) + eps >= m.at(last));
        if dominates {
            return l.sum(lo, hi);
        }
    }
    if hi - lo <= 2 {
        return (lo..hi)
            .map(|s| lines.iter().map(|l| l.at(s)).fold(0.0, f64::max))
            .sum();
    }
    let mid = lo + (hi - lo) / 2;
    envelope_sum(lines, lo, mid) + envelope_sum(lines, mid, hi)
}

/// Predicted ms until every sequence of every replica has run its remaining steps, with replicas
/// in lockstep (module docs) and each replica's step time `fit.step_ms(batch, mean context)`.
pub fn drain_ms(fit: &Fit, replicas: &[Vec<Pending>]) -> f64 {
    // Per replica: sequences by remaining (ascending), the index of the first still-live one, and
    // the sum of the live ones' contexts as of step 0.
    let mut reps: Vec<(Vec<Pending>, usize, f64)> = replicas
        .iter()
        .map(|r| {
            let mut v: Vec<Pending> = r.iter().copied().filter(|p| p.remaining > 0).collect();
            v.sort_by_key(|p| p.remaining);
            let ctx: f64 = v.iter().map(|p| p.context as f64).sum();
            (v, 0usize, ctx)
        })
        .collect();
    // Event times: every distinct `remaining`.
    let mut events: Vec<u64> = reps
        .iter()
        .flat_map(|r| r.0.iter().map(|p| p.remaining as u64))
        .collect();
    events.sort_unstable();
    events.dedup();
    let (mut total, mut lo) = (0.0, 0u64);
    let mut lines = Vec::with_capacity(1 + 3 * reps.len());
    for &hi in &events {
        lines.clear();
        lines.push(Line {
            alpha: 0.0,
            beta: 0.0,
        });
        for (v, first, ctx0) in &reps {
            let b = v.len() - first;
            if b == 0 {
                continue;
            }
            // Step s: sum of contexts = ctx0 + b * s; mean = ctx0 / b + s.
            let bf = b as f64;
            lines.push(Line {
                alpha: fit.a + fit.b * bf + fit.c * ctx0 + fit.d * ctx0 / bf,
                beta: fit.c * bf + fit.d,
            });
            // The host branch of a HostMax fit: constant while the batch is.
            lines.push(Line {
                alpha: fit.host_ms(b),
                beta: 0.0,
            });
            if let Some([a, bb, c, d]) = fit.compute {
                lines.push(Line {
                    alpha: a + bb * bf + c * ctx0 + d * ctx0 / bf,
                    beta: c * bf + d,
                });
            }
        }
        total += envelope_sum(&lines, lo, hi);
        // Sequences whose remaining == hi finish after step hi - 1.
        for (v, first, ctx0) in &mut reps {
            while *first < v.len() && v[*first].remaining as u64 == hi {
                *ctx0 -= v[*first].context as f64;
                *first += 1;
            }
        }
        lo = hi;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Step-by-step reference for `drain_ms`.
    fn brute(fit: &Fit, replicas: &[Vec<Pending>]) -> f64 {
        let steps = replicas
            .iter()
            .flatten()
            .map(|p| p.remaining)
            .max()
            .unwrap_or(0);
        (0..steps)
            .map(|s| {
                replicas
                    .iter()
                    .map(|r| {
                        let live: Vec<&Pending> = r.iter().filter(|p| p.remaining > s).collect();
                        let ctx: f64 = live.iter().map(|p| (p.context + s) as f64).sum();
                        let n = live.len();
                        fit.step_ms(n, if n > 0 { ctx / n as f64 } else { 0.0 })
                    })
                    .fold(0.0, f64::max)
            })
            .sum()
    }

    #[test]
    fn drain_matches_step_by_step_sum() {
        let fit = Fit {
            a: 2.0,
            b: 0.3,
            c: 1e-3,
            d: 2e-4,
            h0: 3.0,
            h1: 0.9,
            compute: Some([-40.0, 2.5, 1e-3, 2e-4]),
        };
        let p = |context, remaining| Pending { context, remaining };
        let reps = vec![
            vec![p(100, 7), p(50, 30), p(10, 3)],
            vec![p(400, 12)],
            vec![p(1, 1), p(2, 2), p(3, 25), p(900, 25)],
            vec![],
        ];
        let (d, b) = (drain_ms(&fit, &reps), brute(&fit, &reps));
        assert!((d - b).abs() < 1e-9 * b, "{d} vs {b}");
    }
}
