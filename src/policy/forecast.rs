//! The predicted time to drain a live set over dp replicas (placement: `crate::parallel::placement`).
//!
//! Replicas decode in lockstep: every global step each replica with live sequences runs one
//! decode step, and the step takes as long as the slowest replica (`max` over replicas of the
//! predictor's step time). Global step boundaries are where a layout switch can happen, so this is
//! the clock the decision rule forecasts with (the simulator keeps its own clock: `crate::sim`).
//! A sequence with `remaining` steps left runs that many steps, its context growing by one token
//! per step.
//!
//! **KV room.** Where the profile states how many KV tokens a replica holds at a tp, the forecast
//! runs only what fits, as the engine's scheduler and the simulator's node do: sequences are
//! admitted in order while they fit, the newest is preempted when growth overflows (it loses its
//! KV and is re-admitted, paying its prefill, once others finish). A layout whose replicas cannot
//! hold their share then forecasts smaller batches for longer, plus the recompute — which is what
//! makes a low tp with its many weight copies lose to a higher one on a tight memory budget.
//! Each replica's running set is worked out first (`replica_run`, event by event), as
//! segments on which its batch is fixed.
//!
//! [`drain_ms`] then sums the lockstep clock in closed form: on a segment between two events of
//! any replica, every replica's batch is fixed and its step time is linear in the step index, so
//! the segment's sum is the sum of the upper envelope of a few lines — found exactly by bisecting
//! the segment until one line dominates at both ends (then it dominates throughout, since lines
//! differ linearly).

use super::predictor::Fit;

/// One sequence in a forecast: cached tokens now and decode steps still to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub context: usize,
    pub remaining: usize,
    /// It holds its KV; `false`: it lost it (preempted, or left behind by a switch) and
    /// prefills its context when admitted (at the room's prefill rate).
    pub cached: bool,
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
    // A line dominates when it is within eps of the maximum at both ends (one pass for the
    // maxima, one for the search: linear in the lines, which number 2-3 per replica).
    let top = |s: u64| {
        lines
            .iter()
            .map(|m| m.at(s))
            .fold(f64::NEG_INFINITY, f64::max)
    };
    let (top_lo, top_last) = (top(lo), top(last));
    if let Some(l) = lines
        .iter()
        .find(|l| l.at(lo) + eps >= top_lo && l.at(last) + eps >= top_last)
    {
        return l.sum(lo, hi);
    }
    if hi - lo <= 2 {
        return (lo..hi)
            .map(|s| lines.iter().map(|l| l.at(s)).fold(0.0, f64::max))
            .sum();
    }
    let mid = lo + (hi - lo) / 2;
    envelope_sum(lines, lo, mid) + envelope_sum(lines, mid, hi)
}

/// The KV room of one replica, as the forecast sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Room {
    /// Cached tokens the replica holds.
    pub tokens: usize,
    /// Prefill tokens/s, the price of re-admitting a sequence that lost its KV (`None`: free).
    pub prefill_tokens_per_s: Option<f64>,
}

/// A replica's running set on `[previous end, end)`: `b` sequences whose cached tokens sum to
/// `ctx0 + b * s` at global step `s`.
#[derive(Clone, Copy, Debug)]
struct Segment {
    end: u64,
    b: usize,
    ctx0: f64,
}

/// One sequence of a replica's forecast.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// Its index among the replica's sequences.
    input: usize,
    /// Cached tokens at step `base`, and steps still to run from there.
    context: usize,
    remaining: usize,
    base: u64,
    /// Bumped when it is preempted, so its finish entry goes stale.
    version: u32,
    running: bool,
    cached: bool,
}

/// One replica's forecast state (see [`replica_run`]).
struct ReplicaSim {
    slots: Vec<Slot>,
    queue: std::collections::VecDeque<usize>,
    /// (finish step, slot, version) of running slots; stale entries skipped.
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize, u32)>>,
    /// Running slots in admission order (may hold stale entries).
    stack: Vec<usize>,
    /// Running count and the step-0 intercept of their token sum (may be negative).
    b: usize,
    ctx0: i64,
    cap: i64,
    room: Option<Room>,
    prefill_ms: f64,
}

impl ReplicaSim {
    fn tokens(&self, s: u64) -> i64 {
        self.ctx0 + self.b as i64 * s as i64
    }

    /// Admits queued slots at step `s` while they fit (at least one when none runs).
    fn admit(&mut self, s: u64) {
        while let Some(&i) = self.queue.front() {
            let need = self.slots[i].context as i64;
            if self.b > 0 && self.tokens(s).saturating_add(need) > self.cap {
                break;
            }
            self.queue.pop_front();
            let sl = &mut self.slots[i];
            if !sl.cached {
                if let Some(rate) = self.room.and_then(|r| r.prefill_tokens_per_s) {
                    self.prefill_ms += 1e3 * need as f64 / rate;
                }
            }
            sl.cached = true;
            sl.running = true;
            sl.base = s;
            self.heap
                .push(std::cmp::Reverse((s + sl.remaining as u64, i, sl.version)));
            self.stack.push(i);
            self.b += 1;
            self.ctx0 += need - s as i64;
        }
    }

    /// Takes slot `i` out of the running set at step `s`.
    fn stop(&mut self, i: usize, s: u64) {
        let sl = &mut self.slots[i];
        self.ctx0 -= sl.context as i64 - sl.base as i64;
        self.b -= 1;
        sl.running = false;
        let ran = (s - sl.base) as usize;
        sl.context += ran;
        sl.remaining -= ran.min(sl.remaining);
        sl.base = s;
    }
}

/// What the forecast of one replica did until a step.
struct ReplicaRun {
    segments: Vec<Segment>,
    /// Ms of the prefills of re-admitted sequences.
    prefill_ms: f64,
    /// Per input sequence: steps it ran, and whether it holds its KV (it runs, or waits with it).
    progress: Vec<(usize, bool)>,
}

/// One replica's running sets over time until step `until`, the ms its re-admissions prefill,
/// and where each sequence is then. Mirrors the simulator's node (`crate::sim::node`):
/// sequences are admitted in order while they fit (at least one), those holding KV first, and
/// what does not fit at the start lost its KV (what lost it prefills when admitted); a step grows every running sequence by a token; after a step the finished
/// leave and, while the cache overflows, the most recently admitted is preempted to the queue
/// front (it loses its KV); when some finished, the queue is admitted again. Without a room
/// everything runs from step 0.
fn replica_run(seqs: &[Pending], room: Option<Room>, until: u64) -> ReplicaRun {
    use std::cmp::Reverse;
    let slots: Vec<Slot> = seqs
        .iter()
        .enumerate()
        .filter(|(_, p)| p.remaining > 0)
        .map(|(input, p)| Slot {
            input,
            context: p.context,
            remaining: p.remaining,
            base: 0,
            version: 0,
            running: false,
            cached: p.cached,
        })
        .collect();
    // Those holding KV first (as a switch re-places them), each kind in input order.
    let mut queue: std::collections::VecDeque<usize> = (0..slots.len()).collect();
    queue.make_contiguous().sort_by_key(|&i| !slots[i].cached);
    let mut r = ReplicaSim {
        queue,
        slots,
        heap: Default::default(),
        stack: Vec::new(),
        b: 0,
        ctx0: 0,
        cap: room.map_or(i64::MAX, |r| r.tokens.min(i64::MAX as usize) as i64),
        room,
        prefill_ms: 0.0,
    };
    r.admit(0);
    for k in 0..r.queue.len() {
        let i = r.queue[k];
        r.slots[i].cached = false;
    }
    // A segment ends where a sequence finishes (or overflows the room): one per slot, mostly.
    let mut segments = Vec::with_capacity(r.slots.len() + 1);
    let mut s = 0u64;
    while s < until {
        while let Some(&Reverse((_, i, v))) = r.heap.peek() {
            if r.slots[i].running && r.slots[i].version == v {
                break;
            }
            r.heap.pop();
        }
        let Some(&Reverse((finish, _, _))) = r.heap.peek() else {
            break;
        };
        // The first step after which the running set overflows (a set of one never yields).
        let overflow = if r.b > 1 && r.cap < i64::MAX {
            ((r.cap - r.ctx0).div_euclid(r.b as i64) + 1).max(s as i64 + 1) as u64
        } else {
            u64::MAX
        };
        let t = finish.min(overflow).min(until);
        segments.push(Segment {
            end: t,
            b: r.b,
            ctx0: r.ctx0 as f64,
        });
        s = t;
        if s == until {
            break;
        }
        let mut finished = false;
        while let Some(&Reverse((at, i, v))) = r.heap.peek() {
            if at > s {
                break;
            }
            r.heap.pop();
            if r.slots[i].running && r.slots[i].version == v {
                r.stop(i, s);
                finished = true;
            }
        }
        while r.b > 1 && r.tokens(s) > r.cap {
            let Some(i) = r.stack.pop() else { break };
            if !r.slots[i].running {
                continue;
            }
            r.stop(i, s);
            r.slots[i].version += 1;
            r.slots[i].cached = false;
            r.queue.push_front(i);
        }
        if finished {
            r.admit(s);
        }
    }
    let mut progress = vec![(0, true); seqs.len()];
    for sl in &r.slots {
        let ran = sl.context - seqs[sl.input].context;
        progress[sl.input] = if sl.running {
            (ran + (s - sl.base) as usize, true)
        } else {
            (ran, sl.cached)
        };
    }
    ReplicaRun {
        segments,
        prefill_ms: r.prefill_ms,
        progress,
    }
}

/// A forecast run until a step ([`drain_until`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    /// Predicted ms of the steps before it.
    pub ms: f64,
    /// Per replica, per sequence (input order): steps it ran by then, and whether it holds its
    /// KV then (it runs or waits with it; `false`: it waits, preempted or never admitted).
    pub progress: Vec<Vec<(usize, bool)>>,
}

/// Predicted ms until every sequence of every replica has run its remaining steps, with replicas
/// in lockstep (module docs) and each replica's step time `fit.step_ms(batch, mean context)`.
/// With a `room`, each replica runs only what fits and queues the rest (`replica_run`); the
/// prefill of re-admitted sequences delays their replica, so the largest per-replica prefill adds
/// to the total.
pub fn drain_ms(fit: &Fit, replicas: &[Vec<Pending>], room: Option<Room>) -> f64 {
    drain_until(fit, replicas, room, u64::MAX).ms
}

/// [`drain_ms`] of the steps before step `until` only, and where each sequence is then: what a
/// plan that switches at `until` pays before it, and the live set it switches.
pub fn drain_until(
    fit: &Fit,
    replicas: &[Vec<Pending>],
    room: Option<Room>,
    until: u64,
) -> Partial {
    let per: Vec<ReplicaRun> = replicas
        .iter()
        .map(|r| replica_run(r, room, until))
        .collect();
    // A replica's re-admission prefills hold up that replica only (the others decode on): the
    // most any replica prefills is added once.
    let mut total: f64 = per.iter().map(|p| p.prefill_ms).fold(0.0, f64::max);
    // Event times: every segment end of every replica.
    let mut events: Vec<u64> = Vec::with_capacity(per.iter().map(|p| p.segments.len()).sum());
    events.extend(per.iter().flat_map(|p| p.segments.iter().map(|g| g.end)));
    events.sort_unstable();
    events.dedup();
    let mut at = vec![0usize; per.len()];
    let mut lo = 0u64;
    let mut lines = Vec::with_capacity(1 + 3 * per.len());
    for &hi in &events {
        lines.clear();
        lines.push(Line {
            alpha: 0.0,
            beta: 0.0,
        });
        for (run, k) in per.iter().zip(at.iter_mut()) {
            let segs = &run.segments;
            while *k < segs.len() && segs[*k].end < hi {
                *k += 1;
            }
            let Some(g) = segs.get(*k) else { continue };
            if g.b == 0 {
                continue;
            }
            // Step s: sum of contexts = ctx0 + b * s; mean = ctx0 / b + s.
            let (bf, ctx0) = (g.b as f64, g.ctx0);
            lines.push(Line {
                alpha: fit.a + fit.b * bf + fit.c * ctx0 + fit.d * ctx0 / bf,
                beta: fit.c * bf + fit.d,
            });
            // The host branch of a HostMax fit: constant while the batch is.
            lines.push(Line {
                alpha: fit.host_ms(g.b),
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
        lo = hi;
    }
    Partial {
        ms: total,
        progress: per.into_iter().map(|p| p.progress).collect(),
    }
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
        let p = |context, remaining| Pending {
            context,
            remaining,
            cached: true,
        };
        let reps = vec![
            vec![p(100, 7), p(50, 30), p(10, 3)],
            vec![p(400, 12)],
            vec![p(1, 1), p(2, 2), p(3, 25), p(900, 25)],
            vec![],
        ];
        let (d, b) = (drain_ms(&fit, &reps, None), brute(&fit, &reps));
        assert!((d - b).abs() < 1e-9 * b, "{d} vs {b}");
    }
}
