//! Decision-rule tests against hand-computed forecasts: switch cost parts, gain just below and
//! just above the cost, uniform vs straggler live sets, bad input, the lookahead, and valuing a
//! candidate with a follow-up switch.

use std::collections::BTreeMap;

use super::*;
use crate::policy::predictor::{Fit, FitForm};
use crate::reshard::cost::CostModel;

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-300)
}

fn constant_predictor(steps: &[(usize, f64, f64)]) -> Predictor {
    let fits: BTreeMap<usize, Fit> = steps
        .iter()
        .map(|&(tp, a, b)| {
            (
                tp,
                Fit {
                    a,
                    b,
                    c: 0.0,
                    d: 0.0,
                    ..Fit::default()
                },
            )
        })
        .collect();
    Predictor {
        form: FitForm::Abc,
        fits,
        noise: 0.0,
        kv_capacity_tokens: BTreeMap::new(),
    }
}

fn switch_cost(fixed_ms: f64) -> SwitchCost {
    SwitchCost {
        fixed_ms,
        weight_bytes_per_s: 1e9,
        sharded_weight_bytes: 8e9,
        kv_bytes_per_token: 1000.0,
        kv: CostModel {
            transfer_bytes_per_s: 1e6,
            fixed_transfer_s: 0.0,
            prefill_tokens_per_s: vec![],
            fixed_prefill_s: 0.0,
        },
    }
}

#[test]
fn switch_cost_formulas() {
    let s = switch_cost(100.0);
    assert_eq!(s.weight_bytes(2, 8), 0.0); // nested: no bytes
    assert_eq!(s.weight_bytes(8, 2), 8e9 * (0.5 - 0.125));
    assert_eq!(s.weight_bytes(2, 3), 8e9 / 3.0);
    // 1 -> 2, contexts 100 and 300: KV (100 + 300) * 1000 * (1 - 1/2) / 1e6 s = 200 ms.
    let b = s.cost(1, 2, &[100, 300]);
    assert!(
        close(b.kv_ms, 200.0, 1e-12) && close(b.total_ms, 300.0, 1e-12),
        "{b:?}"
    );
    // 8 -> 4: weights 8e9 * (1/4 - 1/8) / 1e9 = 1 s. With prefill at 4e6 tokens/s, recomputing
    // 300 tokens (0.075 ms) beats migrating them (300 * 1000 * 0.5 / 1e6 = 150 ms).
    let mut r = switch_cost(0.0);
    r.kv.prefill_tokens_per_s = vec![(4, 4e6)];
    let b = r.cost(8, 4, &[300]);
    assert!(
        close(b.weight_ms, 1000.0, 1e-12) && close(b.kv_ms, 0.075, 1e-9),
        "{b:?}"
    );
    assert_eq!((b.recomputed, b.migrated), (1, 0));
}

/// The rule's input with the tests' usual knobs: candidates 1, 2, 4; margin 0.1; no minimum gain,
/// lookahead or follow-up (override with struct update syntax).
fn input<'a>(
    world: usize,
    current_tp: usize,
    live: &'a [EstimatedSeq],
    predictor: &'a Predictor,
    switch: &'a SwitchCost,
) -> DecideInput<'a> {
    DecideInput {
        world,
        current_tp,
        candidates: &[1, 2, 4],
        live,
        predictor,
        switch,
        margin: 0.1,
        min_gain_ms: 0.0,
        lookahead_steps: 0,
        follow_up_points: 0,
        came_from: None,
    }
}

fn live(n: usize, replicas: usize, est: f64, context: usize) -> Vec<EstimatedSeq> {
    (0..n)
        .map(|i| EstimatedSeq {
            replica: i % replicas,
            context,
            kv: context,
            generated: 0,
            est_remaining: est,
            cached: true,
        })
        .collect()
}

#[test]
fn never_switches_when_the_gain_does_not_cover_the_cost() {
    // World 2 at tp1: one sequence, 100 steps left, ctx 100. Stay: 100 * 10 = 1000 ms.
    // tp2: 100 * 6 = 600 ms; KV 100 * 1000 * 0.5 / 1e6 s = 50 ms, weights 0 (tp grows).
    // Fixed 349 -> cost 399, total 999 < 1000: switch. Fixed 351 -> 1001: stay.
    let pred = constant_predictor(&[(1, 10.0, 0.0), (2, 6.0, 0.0)]);
    let seqs = live(1, 2, 100.0, 100);
    let run = |fixed: f64, margin: f64| {
        let sw = switch_cost(fixed);
        decide(&DecideInput {
            candidates: &[1, 2],
            margin,
            ..input(2, 1, &seqs, &pred, &sw)
        })
        .unwrap()
    };
    let d = run(349.0, 0.0);
    assert!(!d.stay && d.to_tp == 2, "{d:?}");
    assert!(close(d.predicted_stay_ms, 1000.0, 1e-12) && close(d.switch_cost_ms, 399.0, 1e-12));
    assert!(close(d.predicted_best_ms, 999.0, 1e-12));
    let d = run(351.0, 0.0);
    assert!(d.stay && d.to_tp == 1 && d.switch_cost_ms == 0.0, "{d:?}");
    // The margin: 999 is not <= 0.9 * 1000.
    assert!(run(349.0, 0.1).stay);
}

#[test]
fn going_back_to_the_layout_just_left_takes_twice_the_margin() {
    // As above with no fixed cost: stay 1000 ms, tp2 600 + 50 = 650 ms (35% better).
    let pred = constant_predictor(&[(1, 10.0, 0.0), (2, 6.0, 0.0)]);
    let seqs = live(1, 2, 100.0, 100);
    let sw = switch_cost(0.0);
    let run = |margin: f64, came_from: Option<usize>| {
        decide(&DecideInput {
            candidates: &[1, 2],
            margin,
            came_from,
            ..input(2, 1, &seqs, &pred, &sw)
        })
        .unwrap()
    };
    assert!(!run(0.2, None).stay, "650 <= 0.8 * 1000");
    assert!(!run(0.2, Some(4)).stay, "the last switch left another tp");
    let back = run(0.2, Some(2));
    assert!(
        back.stay && back.to_tp == 1 && back.switch_cost_ms == 0.0,
        "650 > 0.6 * 1000"
    );
    assert!(!run(0.15, Some(2)).stay, "650 <= 0.7 * 1000");
}

/// World 4; tp1: 5 ms + 0.01/seq, tp2: 3.2 + 0.02/seq, tp4: 2.4 + 0.04/seq (comm grows with tp).
fn ladder_predictor() -> Predictor {
    constant_predictor(&[(1, 5.0, 0.01), (2, 3.2, 0.02), (4, 2.4, 0.04)])
}

#[test]
fn uniform_live_set_stays_at_the_best_static_layout() {
    // 64 sequences, 1000 steps each. tp1 (16 per replica): 1000 * 5.16 = 5160 ms; tp2 (32):
    // 1000 * 3.84 = 3840 ms; tp4 (64): 1000 * 4.96 = 4960 ms. At tp2 (the best): stay.
    let pred = ladder_predictor();
    let sw = switch_cost(0.0);
    let seqs = live(64, 2, 1000.0, 0);
    let d = decide(&input(4, 2, &seqs, &pred, &sw)).unwrap();
    assert!(d.stay, "{d:?}");
    assert!(close(d.predicted_stay_ms, 3840.0, 1e-12));
    let drain: BTreeMap<usize, f64> = d.candidates.iter().map(|c| (c.tp, c.drain_ms)).collect();
    assert!(
        close(drain[&1], 5160.0, 1e-12) && close(drain[&4], 4960.0, 1e-12),
        "{drain:?}"
    );
}

#[test]
fn one_straggler_switches_to_a_higher_tp() {
    // One live sequence with 5000 steps left at tp2: stay 5000 * 3.22 = 16100 ms; tp4:
    // 5000 * 2.44 = 12200 ms + 1000 ms fixed + 5000 tokens * 1000 B * (1 - 2/4) / 1e6 B/s = 2500 ms
    // -> 15700 ms. Beats 16100 but not by 10% (14490): stay. At context 500 the KV costs 250 ms:
    // 12200 + 1250 = 13450 <= 14490: switch.
    let pred = ladder_predictor();
    let sw = switch_cost(1000.0);
    let run = |context: usize| {
        let seqs = live(1, 2, 5000.0, context);
        decide(&input(4, 2, &seqs, &pred, &sw)).unwrap()
    };
    let d = run(5000);
    assert!(
        d.stay && close(d.predicted_stay_ms, 16100.0, 1e-12),
        "{d:?}"
    );
    let d = run(500);
    assert!(!d.stay && d.to_tp == 4, "{d:?}");
    assert!(close(d.predicted_best_ms, 13450.0, 1e-12) && close(d.switch_cost_ms, 1250.0, 1e-12));
}

#[test]
fn a_switch_costs_the_kv_a_sequence_holds_not_its_context() {
    // The straggler above at context 5000 (the forecast's input), but holding the KV of only
    // 500 tokens (a prompt part way in): the switch moves 500 tokens' KV, 1000 + 250 = 1250 ms,
    // and pays as at context 500. Holding none (a prompt waiting): 1000 ms fixed alone, 13200.
    let pred = ladder_predictor();
    let sw = switch_cost(1000.0);
    let run = |kv: usize| {
        let seqs = vec![EstimatedSeq {
            kv,
            ..live(1, 2, 5000.0, 5000)[0]
        }];
        decide(&input(4, 2, &seqs, &pred, &sw)).unwrap()
    };
    let d = run(500);
    assert!(!d.stay && d.to_tp == 4, "{d:?}");
    assert!(close(d.predicted_best_ms, 13450.0, 1e-12) && close(d.switch_cost_ms, 1250.0, 1e-12));
    let d = run(0);
    assert!(!d.stay && close(d.switch_cost_ms, 1000.0, 1e-12), "{d:?}");
    assert!(close(d.predicted_best_ms, 13200.0, 1e-12), "{d:?}");
}

#[test]
fn decide_rejects_bad_input() {
    let pred = ladder_predictor();
    let sw = switch_cost(0.0);
    let seqs = live(4, 4, 10.0, 0);
    let mut inp = input(4, 2, &seqs, &pred, &sw);
    // Replicas 2 and 3 do not exist at tp2 (2 replicas).
    assert!(decide(&inp).unwrap_err().to_string().contains("replica 2"));
    inp.current_tp = 3;
    assert!(decide(&inp).is_err());
    inp.current_tp = 1;
    inp.candidates = &[8];
    assert!(decide(&inp).unwrap_err().to_string().contains("tp 8"));
}

#[test]
fn lookahead_defers_a_switch_until_waiting_stops_paying() {
    // World 4 at tp2: 128 live, 62 short + 1 long on replica 0, 65 short on replica 1; shorts have
    // 1472 steps left, the long one 17472 (c = 0: contexts do not matter; KV is free).
    //   stay:        1472 * (3.2 + 0.02 * 65) + 16000 * 3.22           = 6624 + 51520 = 58144
    //   tp4 now:     1472 * (2.4 + 0.04 * 128) + 16000 * 2.44 + 2000    = 52109.44
    //   tp4 in 64:   64 * 4.5 + 2000 + 1408 * 7.52 + 16000 * 2.44       = 51916.16
    // Now beats staying by 10%, but waiting is better still: without lookahead it switches, with
    // it it stays.
    let pred = ladder_predictor();
    let mut sw = switch_cost(2000.0);
    sw.kv_bytes_per_token = 0.0;
    let mut seqs: Vec<EstimatedSeq> = (0..127)
        .map(|i| EstimatedSeq {
            replica: usize::from(i >= 62),
            context: 0,
            kv: 0,
            generated: 6528,
            est_remaining: 1472.0,
            cached: true,
        })
        .collect();
    seqs.push(EstimatedSeq {
        replica: 0,
        context: 0,
        kv: 0,
        generated: 6528,
        est_remaining: 17472.0,
        cached: true,
    });
    let run = |lookahead_steps: usize| {
        decide(&DecideInput {
            lookahead_steps,
            ..input(4, 2, &seqs, &pred, &sw)
        })
        .unwrap()
    };
    let d = run(0);
    assert!(!d.stay && d.to_tp == 4, "{d:?}");
    assert!(
        close(d.predicted_stay_ms, 58144.0, 1e-12) && close(d.predicted_best_ms, 52109.44, 1e-12)
    );
    let d = run(64);
    assert!(d.stay, "{d:?}");
    let c4 = d.candidates.iter().find(|c| c.tp == 4).unwrap();
    assert!(close(c4.later_ms.unwrap(), 51916.16, 1e-12), "{c4:?}");
}

/// World 4 at tp1: 7 short sequences (100 steps left) and 1 long one (1600), contexts 0, KV free,
/// 200 ms per switch. Step ms per replica: tp1 20 (any batch), tp2 4 + batch, tp4 1 + 2 batch.
/// At tp2 the long one runs alone on one replica, the shorts on the other.
///   stay at tp1:                 1600 * 20                                   = 32000
///   tp4 now, for good:           200 + 100 * (1 + 16) + 1500 * (1 + 2)       =  6400
///   tp2 now, for good:           200 + 100 * (4 + 7) + 1500 * (4 + 1)        =  8800
///   tp2 now, tp4 after 100:      200 + 1100 + 200 + 1500 * 3                  =  6000
fn ladder_case() -> (Predictor, SwitchCost, Vec<EstimatedSeq>) {
    let pred = constant_predictor(&[(1, 20.0, 0.0), (2, 4.0, 1.0), (4, 1.0, 2.0)]);
    let mut sw = switch_cost(200.0);
    sw.kv_bytes_per_token = 0.0;
    let seqs = (0..8)
        .map(|i| EstimatedSeq {
            replica: i % 4,
            context: 0,
            kv: 0,
            generated: 0,
            est_remaining: if i == 0 { 1600.0 } else { 100.0 },
            cached: true,
        })
        .collect();
    (pred, sw, seqs)
}

#[test]
fn a_follow_up_switch_makes_the_ladders_first_step_worth_taking() {
    let (pred, sw, seqs) = ladder_case();
    let run = |follow_up_points: usize| {
        decide(&DecideInput {
            lookahead_steps: 1,
            follow_up_points,
            ..input(4, 1, &seqs, &pred, &sw)
        })
        .unwrap()
    };
    // Valued as if it stayed there, tp4 wins: 6400 against 8800 (and against 6403 one step on).
    let d = run(0);
    assert!(!d.stay && d.to_tp == 4, "{d:?}");
    assert!(close(d.predicted_stay_ms, 32000.0, 1e-12));
    assert!(close(d.predicted_best_ms, 6400.0, 1e-12), "{d:?}");
    // Valued with a follow-up on a 16-point grid (every 100 steps from here), tp2 then tp4 wins.
    // One step later: 20 + 200 + 99 * 11 + 200 + 1500 * 3 = 6009, so now.
    let d = run(16);
    assert!(!d.stay && d.to_tp == 2, "{d:?}");
    assert!(close(d.predicted_best_ms, 6000.0, 1e-12), "{d:?}");
    let c2 = d.candidates.iter().find(|c| c.tp == 2).unwrap();
    assert!(close(c2.later_ms.unwrap(), 6009.0, 1e-12), "{c2:?}");
}

#[test]
fn a_follow_up_is_assumed_only_when_the_switch_budget_allows_it() {
    use crate::policy::controller::{Controller, ControllerConfig, LiveSeq};
    use crate::policy::remaining::Remaining;
    let (pred, sw, seqs) = ladder_case();
    let live: Vec<LiveSeq> = seqs
        .iter()
        .enumerate()
        .map(|(index, s)| LiveSeq {
            index,
            replica: s.replica,
            context: 0,
            kv: 0,
            generated: 0,
            max_new_tokens: s.est_remaining as usize,
            group: None,
        })
        .collect();
    let to = |max_switches: Option<usize>, done: usize| {
        let c = Controller::new(
            ControllerConfig {
                candidates: vec![1, 2, 4],
                check_every: 1,
                margin: 0.1,
                min_gain_ms: 0.0,
                max_switches,
            },
            &pred,
            &sw,
            Remaining::Oracle,
        )
        .unwrap();
        c.decide(4, 1, &live, done, None).unwrap().0.to_tp
    };
    assert_eq!(to(None, 0), 2);
    assert_eq!(to(Some(2), 0), 2);
    // One switch left (PAT's rule; or the second of two): the ladder cannot be finished.
    assert_eq!(to(Some(1), 0), 4);
    assert_eq!(to(Some(2), 1), 4);
}

#[test]
fn a_layout_that_cannot_hold_its_share_is_forecast_as_it_runs() {
    // World 2: tp1 steps take 5 ms, tp2 steps 8 ms, whatever the batch. Four sequences of 100
    // cached tokens, 10 steps each, two per tp1 replica. Unbounded, staying takes 10 * 5 = 50 ms
    // and tp2 10 * 8 = 80 ms plus a 10 ms switch: stay. If a tp1 replica holds 150 tokens, it
    // runs one sequence at a time (two hold 200): 20 steps, 100 ms, against tp2's 90: switch.
    let mut pred = constant_predictor(&[(1, 5.0, 0.0), (2, 8.0, 0.0)]);
    let mut sw = switch_cost(10.0);
    sw.kv_bytes_per_token = 0.0;
    let seqs = live(4, 2, 10.0, 100);
    let run = |pred: &Predictor, sw: &SwitchCost| {
        decide(&DecideInput {
            candidates: &[1, 2],
            margin: 0.0,
            ..input(2, 1, &seqs, pred, sw)
        })
        .unwrap()
    };
    let d = run(&pred, &sw);
    assert!(d.stay && close(d.predicted_stay_ms, 50.0, 1e-12), "{d:?}");
    pred.kv_capacity_tokens = BTreeMap::from([(1, 150)]);
    let d = run(&pred, &sw);
    assert!(!d.stay && d.to_tp == 2, "{d:?}");
    assert!(close(d.predicted_stay_ms, 100.0, 1e-12), "{d:?}");
    assert!(close(d.predicted_best_ms, 90.0, 1e-12), "{d:?}");
    // The re-admitted second sequence of each replica prefills its 100 tokens: at 10 tokens/ms
    // that is 10 ms per replica, in parallel, so staying takes 110 ms.
    sw.kv.prefill_tokens_per_s = vec![(1, 1e4)];
    let d = run(&pred, &sw);
    assert!(close(d.predicted_stay_ms, 110.0, 1e-12), "{d:?}");
}

/// The forecasts run on rayon threads: a decision and a plan are the same, to the bit, on one
/// thread as on four (each thread count in a pool of its own).
#[test]
fn decisions_do_not_depend_on_the_threads() {
    let (pred, sw, seqs) = ladder_case();
    // A messier live set than the ladder's: many estimates, so plans have many points.
    let many: Vec<EstimatedSeq> = (0..40)
        .map(|i| EstimatedSeq {
            replica: i % 4,
            context: 10 + 7 * i,
            kv: 10 + 7 * i,
            generated: 0,
            est_remaining: (37 * i % 101 + 5) as f64 * if i % 9 == 0 { 30.0 } else { 1.0 },
            cached: true,
        })
        .collect();
    let on = |threads: usize, live: &[EstimatedSeq]| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let inp = DecideInput {
                lookahead_steps: 8,
                follow_up_points: 16,
                ..input(4, 1, live, &pred, &sw)
            };
            (
                format!("{:?}", decide(&inp).unwrap()),
                plan_ms(&inp, 8, 48).unwrap(),
            )
        })
    };
    for live in [&seqs[..], &many[..]] {
        let (d1, p1) = on(1, live);
        let (d4, p4) = on(4, live);
        assert_eq!(d1, d4);
        assert_eq!(p1.total_ms.to_bits(), p4.total_ms.to_bits());
        assert_eq!(
            (p1.switch, p1.stay_ms.to_bits()),
            (p4.switch, p4.stay_ms.to_bits())
        );
    }
}
