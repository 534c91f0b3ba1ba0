//! The one adaptive loop: the real engine and the simulator, driven by the same controller over
//! the same batch, make the same switch decisions at the same steps; the engine's tokens through
//! those switches equal a static run's (exact, f32).

mod common;

use std::collections::BTreeMap;

use pat::engine::{EngineSource, Output, Request, SwitchFault, SwitchPhase};
use pat::policy::controller::{drive, Controller, ControllerConfig, Event};
use pat::policy::decide::SwitchCost;
use pat::policy::predictor::{Fit, FitForm, Predictor};
use pat::policy::remaining::{LengthDist, Remaining};
use pat::policy::trace::{Trace, TraceRequest};
use pat::reshard::cost::{CostModel, KvPolicy};
use pat::sim::{simulate, Placement, PolicyKind, SimConfig, SimModel};
use pat::Dtype;

const WORLD: usize = 4;

/// Step times where the big batch wants tp 1 and the tail wants tp 4 (ms = a + b * batch).
fn predictor() -> Predictor {
    let fit = |a, b| Fit {
        a,
        b,
        c: 0.0,
        d: 0.0,
        ..Fit::default()
    };
    Predictor {
        form: FitForm::Abc,
        fits: BTreeMap::from([(1, fit(10.0, 1.0)), (2, fit(6.0, 1.5)), (4, fit(3.0, 2.0))]),
        noise: 0.0,
        kv_capacity_tokens: BTreeMap::new(),
    }
}

fn switch_cost() -> SwitchCost {
    SwitchCost {
        fixed_ms: 5.0,
        weight_bytes_per_s: 1e9,
        sharded_weight_bytes: 1e6,
        kv_bytes_per_token: 0.0,
        kv: CostModel {
            transfer_bytes_per_s: 1e9,
            fixed_transfer_s: 0.0,
            prefill_tokens_per_s: vec![],
            fixed_prefill_s: 0.0,
        },
    }
}

/// Six short responses and two stragglers, prompts from the golden fixture's vocabulary.
fn trace() -> Trace {
    let lens = [4, 6, 5, 40, 4, 7, 33, 5];
    Trace {
        requests: lens
            .iter()
            .enumerate()
            .map(|(i, &r)| TraceRequest {
                prompt_len: 3 + i,
                response_len: r,
                input_ids: Some((0..3 + i as u32).map(|t| 5 + 7 * t + i as u32).collect()),
                group: None,
            })
            .collect(),
    }
}

fn requests(t: &Trace) -> Vec<Request> {
    t.requests
        .iter()
        .map(|r| Request {
            input_ids: r.input_ids.clone().unwrap(),
            max_new_tokens: r.response_len,
            ignore_eos: true,
        })
        .collect()
}

fn controller<'a>(p: &'a Predictor, sc: &'a SwitchCost, est: Remaining) -> Controller<'a> {
    Controller::new(
        ControllerConfig {
            candidates: vec![1, 2, 4],
            check_every: 2,
            margin: 0.1,
            min_gain_ms: 0.0,
            max_switches: None,
        },
        p,
        sc,
        est,
    )
    .unwrap()
}

/// (step, from tp, to tp, live sequences) of one switch.
type Switch = (usize, usize, usize, usize);

/// Every switch the engine makes under `est`, and its outputs.
fn engine_run(est: Remaining) -> (Vec<Switch>, Vec<Output>) {
    let (p, sc) = (predictor(), switch_cost());
    let ctrl = controller(&p, &sc, est);
    let mut e = common::engine(&common::golden_dir("llama"), WORLD, 1, Dtype::F32, 64);
    e.add_requests(&requests(&trace())).unwrap();
    let mut failed = 0;
    let run = {
        let mut src = EngineSource::new(&mut e, KvPolicy::Migrate, sc.kv.clone());
        drive(&mut src, Some(&ctrl), |ev| {
            if let Event::SwitchFailed { .. } = ev {
                failed += 1;
            }
        })
        .unwrap()
    };
    assert_eq!(failed, 0);
    let sw = run
        .switches
        .iter()
        .map(|s| (s.step, s.from, s.to, s.live))
        .collect();
    (sw, e.outputs())
}

fn sim_run(kind: PolicyKind) -> Vec<Switch> {
    let (p, sc) = (predictor(), switch_cost());
    let model = SimModel {
        clock: &p,
        predictor: &p,
        switch: &sc,
    };
    let cfg = SimConfig {
        world: WORLD,
        candidates: vec![1, 2, 4],
        check_every: 2,
        margin: 0.1,
        min_gain_ms: 0.0,
        start_tp: Some(1),
        placement: Placement::Lpt,
        optimum: false,
        optimum_on_estimates: false,
        lockstep: true,
        lengths_from: None,
    };
    let r = simulate(&trace(), &model, &cfg, kind, 1).unwrap();
    r.switches
        .iter()
        .map(|s| (s.step, s.from, s.to, s.live))
        .collect()
}

#[test]
fn engine_and_simulator_switch_at_the_same_steps() {
    let lens = trace().response_lens();
    for (kind, est) in [
        (PolicyKind::Oracle, Remaining::Oracle),
        (
            PolicyKind::Adaptive,
            Remaining::Empirical(LengthDist::new(&lens, lens.iter().copied().max()).unwrap()),
        ),
    ] {
        let sim = sim_run(kind);
        let (eng, _) = engine_run(est);
        assert!(
            !sim.is_empty(),
            "{kind:?}: the fixture must make the simulator switch"
        );
        assert_eq!(eng, sim, "{kind:?}: engine vs simulator switches");
        // Switches happen only at checked steps (multiples of check_every, never step 0).
        assert!(sim.iter().all(|s| s.0 > 0 && s.0 % 2 == 0), "{sim:?}");
    }
}

#[test]
fn tokens_through_controller_switches_equal_a_static_run() {
    let (sw, adaptive) = engine_run(Remaining::Oracle);
    assert!(!sw.is_empty());
    let mut e = common::engine(&common::golden_dir("llama"), WORLD, 1, Dtype::F32, 64);
    e.add_requests(&requests(&trace())).unwrap();
    e.run(|_| {}).unwrap();
    assert_eq!(adaptive, e.outputs());
}

#[test]
fn a_failed_switch_reports_the_layout_that_goes_on_and_loses_nothing() {
    // A switch refused before its swap leaves the source at `from`; one whose KV recompute
    // fails after the swap leaves it at `to` (the sequences left are prefilled again). Either
    // way the run goes on and ends with a static run's tokens.
    let mut e = common::engine(&common::golden_dir("llama"), WORLD, 1, Dtype::F32, 64);
    e.add_requests(&requests(&trace())).unwrap();
    e.run(|_| {}).unwrap();
    let want = e.outputs();
    let (p, sc) = (predictor(), switch_cost());
    for phase in [SwitchPhase::Begin, SwitchPhase::Recompute] {
        let ctrl = controller(&p, &sc, Remaining::Oracle);
        let mut e = common::engine(&common::golden_dir("llama"), WORLD, 1, Dtype::F32, 64);
        e.add_requests(&requests(&trace())).unwrap();
        e.inject_switch_fault(Some(SwitchFault { phase, rank: 0 }));
        let mut failed = Vec::new();
        let run = {
            let mut src = EngineSource::new(&mut e, KvPolicy::Recompute, sc.kv.clone());
            drive(&mut src, Some(&ctrl), |ev| {
                if let Event::SwitchFailed { from, to, now, .. } = ev {
                    failed.push((from, to, now));
                }
            })
            .unwrap()
        };
        // The run's switches are the layout changes: they lead from start_tp to final_tp, and
        // those applied before their failure carry it.
        assert_eq!(run.failed_switches, failed.len(), "{phase:?}");
        let mut tp = run.start_tp;
        for s in &run.switches {
            assert_eq!(s.from, tp, "{phase:?}: {:?}", run.switches);
            tp = s.to;
        }
        assert_eq!(tp, run.final_tp, "{phase:?}: {:?}", run.switches);
        let applied: Vec<_> = failed.iter().filter(|f| f.2 == f.1).collect();
        assert_eq!(
            applied.is_empty(),
            phase == SwitchPhase::Begin,
            "{failed:?}"
        );
        assert_eq!(
            run.switches.iter().filter(|s| s.error.is_some()).count(),
            applied.len(),
            "{phase:?}: {failed:?}"
        );
        let &(from, to, now) = failed
            .first()
            .unwrap_or_else(|| panic!("{phase:?}: no switch failed"));
        let goes_on = if phase == SwitchPhase::Begin {
            from
        } else {
            to
        };
        assert_eq!(now, goes_on, "{phase:?}: {failed:?}");
        assert_eq!(e.outputs(), want, "{phase:?}");
    }
}
