//! The ladder search against an exhaustive one: every schedule on the same grid of switch points
//! (any start, any number of switches), valued with the same forecast. Without a KV room the
//! live set at a step does not depend on the path, so keeping one arrival per state loses
//! nothing and the two must agree to rounding.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::{drain_ms, group, replicas, room, Later};
use super::*;
use crate::policy::predictor::{Fit, FitForm, Predictor};
use crate::policy::SwitchCost;
use crate::reshard::cost::CostModel;

/// World 8; per replica a step costs `a + 2 * batch` ms with `a` falling as tp grows, so the
/// best tp climbs 1 -> 2 -> 4 -> 8 as a long-tailed batch drains.
fn predictor() -> Predictor {
    let fits: BTreeMap<usize, Fit> = [(1, 40.0), (2, 22.0), (4, 13.0), (8, 8.5)]
        .into_iter()
        .map(|(tp, a)| {
            let fit = Fit {
                a,
                b: 2.0,
                c: 0.0,
                d: 1e-4,
                ..Fit::default()
            };
            (tp, fit)
        })
        .collect();
    Predictor {
        form: FitForm::Abc,
        fits,
        noise: 0.0,
        kv_capacity_tokens: BTreeMap::new(),
    }
}

fn switch(fixed_ms: f64) -> SwitchCost {
    SwitchCost {
        fixed_ms,
        weight_bytes_per_s: 1e9,
        sharded_weight_bytes: 1e9,
        kv_bytes_per_token: 1000.0,
        kv: CostModel {
            transfer_bytes_per_s: 1e9,
            fixed_transfer_s: 0.0,
            prefill_tokens_per_s: vec![],
            fixed_prefill_s: 0.0,
        },
    }
}

/// `n` sequences with long-tailed remaining lengths, two stragglers of `longest` steps (at least
/// 400), placed at `tp`.
fn batch(seed: u64, n: usize, tp: usize) -> Vec<EstimatedSeq> {
    batch_to(seed, n, tp, 400)
}

fn batch_to(seed: u64, n: usize, tp: usize, longest: usize) -> Vec<EstimatedSeq> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let live: Vec<EstimatedSeq> = (0..n)
        .map(|i| EstimatedSeq {
            replica: 0,
            context: 50 + (i * 7) % 90,
            kv: 50 + (i * 7) % 90,
            generated: 0,
            est_remaining: if i < 2 {
                longest as f64
            } else {
                (5.0 + 300.0 * rng.random::<f64>().powi(2)).floor()
            },
            cached: true,
        })
        .collect();
    placed_at(8, tp, &live)
}

fn base<'a>(
    live: &'a [EstimatedSeq],
    predictor: &'a Predictor,
    switch: &'a SwitchCost,
) -> DecideInput<'a> {
    DecideInput {
        world: 8,
        current_tp: 1,
        candidates: &[1, 2, 4, 8],
        live,
        predictor,
        switch,
        margin: 0.0,
        min_gain_ms: 0.0,
        lookahead_steps: 0,
        follow_up_points: 0,
        came_from: None,
    }
}

/// The best total of every schedule from (`tp`, step `at`, `live` placed at tp, `t` ms so far)
/// that switches only at the grid's later points, at most `left` more times. Returns the total
/// and its switches.
fn exhaustive(
    inp: &DecideInput,
    grid: &[usize],
    (tp, at, t): (usize, usize, f64),
    live: &[EstimatedSeq],
    left: usize,
) -> (f64, Vec<(usize, usize)>) {
    let here = DecideInput {
        current_tp: tp,
        live,
        ..*inp
    };
    let fit = inp.predictor.fit(tp).unwrap();
    let stay = drain_ms(fit, &group(8 / tp, live, &replicas(live)), room(&here, tp));
    let mut best = (t + stay, Vec::new());
    if left == 0 {
        return best;
    }
    for &k in grid.iter().filter(|&&k| k > at) {
        let later = Later::new(&here, k - at).unwrap();
        if later.live.is_empty() {
            continue;
        }
        for &to in inp.candidates.iter().filter(|&&to| to != tp) {
            let cost = inp.switch.cost(tp, to, &later.contexts).total_ms;
            let moved = placed_at(8, to, &later.live);
            let t2 = t + later.before_ms + cost;
            let (total, mut path) = exhaustive(inp, grid, (to, k, t2), &moved, left - 1);
            if total < best.0 {
                path.insert(0, (k, to));
                best = (total, path);
            }
        }
    }
    best
}

#[test]
fn the_ladder_search_finds_the_best_schedule_of_any_length() {
    let p = predictor();
    let mut longest_ladder = 0;
    // The last: 437 steps at multiples of 10, 5 points: the spacing rounds down to 80 and the
    // grid has 6 points.
    for (seed, fixed_ms, longest) in [
        (1, 5.0, 400),
        (2, 40.0, 400),
        (3, 0.0, 400),
        (4, 200.0, 400),
        (5, 5.0, 437),
    ] {
        let sw = switch(fixed_ms);
        let starts: Vec<(usize, Vec<EstimatedSeq>)> = [1, 2, 4, 8]
            .map(|tp| (tp, batch_to(seed, 200, tp, longest)))
            .into();
        let inp = base(&starts[0].1, &p, &sw);
        // Multiples of 10, 5 points: a switch every 80 steps.
        let grid: Vec<usize> = (0..longest).step_by(80).collect();
        for max in [None, Some(1), Some(2), Some(usize::MAX)] {
            let got = best_ladder(&inp, &starts, 10, 5, max).unwrap();
            let want = starts
                .iter()
                .map(|(tp, live)| {
                    let (t, path) =
                        exhaustive(&inp, &grid, (*tp, 0, 0.0), live, max.unwrap_or(usize::MAX));
                    (t, *tp, path)
                })
                .fold(None, |b: Option<(f64, usize, Vec<_>)>, c| match b {
                    Some(b) if b.0 <= c.0 => Some(b),
                    _ => Some(c),
                })
                .unwrap();
            assert!(
                (got.total_ms - want.0).abs() <= 1e-9 * want.0,
                "seed {seed}, fixed {fixed_ms} ms, max {max:?}: {got:?} vs the exhaustive {want:?}"
            );
            assert_eq!((got.start_tp, &got.switches), (want.1, &want.2));
            assert!(got.switches.len() <= max.unwrap_or(usize::MAX));
            if max.is_none() {
                longest_ladder = longest_ladder.max(got.switches.len());
            }
            // Each start's plan that never switches, in candidate order.
            assert_eq!(got.stay_ms.len(), starts.len());
            for ((tp, stay), (start, live)) in got.stay_ms.iter().zip(&starts) {
                let fit = p.fit(*tp).unwrap();
                let want = drain_ms(fit, &group(8 / tp, live, &replicas(live)), None);
                assert_eq!((*tp, *stay), (*start, want));
            }
        }
    }
    // The cases hold a three-step ladder (a start valued with one follow-up switch misses it).
    assert_eq!(longest_ladder, 3);
}

#[test]
fn the_ladder_refuses_a_start_outside_the_candidates() {
    let (p, sw) = (predictor(), switch(0.0));
    let starts = vec![(3, batch(1, 4, 1))];
    let inp = base(&starts[0].1, &p, &sw);
    let e = best_ladder(&inp, &starts, 10, 5, None).unwrap_err();
    assert!(e.to_string().contains("start tp 3"), "{e}");
    assert!(best_ladder(&inp, &[], 10, 5, None).is_err());
    // A start given twice, and one whose sequences sit on a replica its tp does not have.
    let twice = vec![(1, batch(1, 4, 1)), (1, batch(1, 4, 1))];
    let e = best_ladder(&inp, &twice, 10, 5, None).unwrap_err();
    assert!(e.to_string().contains("start tp 1 is given twice"), "{e}");
    let misplaced = vec![(4, batch(1, 4, 1))];
    let e = best_ladder(&inp, &misplaced, 10, 5, None).unwrap_err();
    assert!(e.to_string().contains("tp 4 has 2 replicas"), "{e}");
}

#[test]
fn the_ladder_refuses_a_candidate_that_does_not_divide_the_world() {
    let (p, sw) = (predictor(), switch(0.0));
    let starts = vec![(1, batch(1, 4, 1))];
    for bad in [[1, 3], [1, 0]] {
        let inp = DecideInput {
            candidates: &bad,
            ..base(&starts[0].1, &p, &sw)
        };
        let e = best_ladder(&inp, &starts, 10, 5, None).unwrap_err();
        assert!(e.to_string().contains("does not divide world 8"), "{e}");
    }
}
