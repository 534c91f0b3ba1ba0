//! `pat_policy_decide`: the library's decision rule as one pure call on profile JSON.

use std::ptr::null;

use pat::policy::{decide, DecideInput, EstimatedSeq, Link, ModelShape, Predictor, SwitchCost};
use pat::sim::{sampled_profile, ComponentModel, ComponentParams, GpuKind};
use pat_ffi::engine::pat_live_seq;
use pat_ffi::policy::*;
use pat_ffi::*;

use super::expect;

/// The modeled 8 x H100 node's profile (component model, sampled).
pub fn modeled() -> pat::policy::Profile {
    let m = ComponentModel::new(
        ModelShape::Llama3_8b.dims(),
        ComponentParams::defaults(GpuKind::H100, Link::NvLink),
    )
    .unwrap();
    sampled_profile(&m, 8).unwrap()
}

fn seq(replica: u32, context: u64, generated: u64, est: f64) -> pat_live_seq {
    pat_live_seq {
        replica,
        context,
        kv_tokens: context,
        generated,
        est_remaining: est,
        ..Default::default()
    }
}

fn call(json: &str, p: &pat_policy_params, live: &[pat_live_seq]) -> (pat_status, pat_decision) {
    let mut d = pat_decision::default();
    // SAFETY: every pointer is a local that outlives the call.
    let st = unsafe {
        pat_policy_decide(
            json.as_ptr().cast(),
            json.len(),
            p,
            live.as_ptr(),
            live.len(),
            &mut d,
        )
    };
    (st, d)
}

#[test]
fn stragglers_switch_up_and_a_full_batch_stays() {
    let profile = modeled();
    let json = profile.to_json();
    let mut p = pat_policy_default_params();
    p.current_tp = 1;
    // Two stragglers on an 8-rank node at tp 1: a higher tp drains them much faster.
    let tail = [seq(0, 9000, 8000, 8000.0), seq(3, 8500, 8000, 6000.0)];
    let (st, d) = call(&json, &p, &tail);
    expect(st, PAT_OK, "");
    assert!(!d.stay && d.to_tp > 1, "{d:?}");
    assert!(d.switch_cost_ms > 0.0 && d.predicted_gain_ms > 0.0, "{d:?}");
    assert_eq!(
        d.predicted_gain_ms,
        d.predicted_stay_ms - d.predicted_best_ms
    );

    // The same answer as the library's rule.
    let predictor = Predictor::from_profile(&profile).unwrap();
    let switch = SwitchCost::from_profile(&profile);
    let est: Vec<EstimatedSeq> = tail
        .iter()
        .map(|s| EstimatedSeq {
            replica: s.replica as usize,
            context: s.context as usize,
            kv: s.kv_tokens as usize,
            generated: s.generated as usize,
            est_remaining: s.est_remaining,
            cached: true,
        })
        .collect();
    let cands = profile.model.candidate_tps(8);
    let lib = |follow_up_points: usize, lookahead_steps: usize| {
        decide(&DecideInput {
            world: 8,
            current_tp: 1,
            candidates: &cands,
            live: &est,
            predictor: &predictor,
            switch: &switch,
            margin: 0.1,
            min_gain_ms: 0.0,
            lookahead_steps,
            follow_up_points,
            came_from: None,
        })
        .unwrap()
    };
    let want = lib(0, 0);
    assert_eq!(
        (d.to_tp as usize, d.predicted_best_ms, d.switch_cost_ms),
        (want.to_tp, want.predicted_best_ms, want.switch_cost_ms)
    );

    // With follow-ups valued, still the library's answer; and a caller built before the field
    // existed (a struct_size that stops short of it) gets the default, 0.
    let mut q = p;
    (q.follow_up_points, q.lookahead_steps) = (16, 64);
    let (st, d) = call(&json, &q, &tail);
    expect(st, PAT_OK, "");
    let want = lib(16, 64);
    assert_eq!(
        (d.to_tp as usize, d.predicted_best_ms, d.predicted_stay_ms),
        (want.to_tp, want.predicted_best_ms, want.predicted_stay_ms)
    );
    q.struct_size = std::mem::offset_of!(pat_policy_params, follow_up_points) as u32;
    let (st, d) = call(&json, &q, &tail);
    expect(st, PAT_OK, "");
    assert_eq!(d.predicted_best_ms, lib(0, 64).predicted_best_ms);
    q.struct_size -= 1;
    expect(
        call(&json, &q, &tail).0,
        PAT_ERR_INVALID_ARGUMENT,
        "struct_size",
    );

    // Going back to the tp the last switch left takes twice the margin: with a margin of 3/4 of
    // the predicted gain the switch is taken, unless it returns to `came_from_tp`.
    let (st, first) = call(&json, &p, &tail);
    expect(st, PAT_OK, "");
    assert!(!first.stay, "{first:?}");
    let mut r = p;
    r.margin = 0.75 * first.predicted_gain_ms / first.predicted_stay_ms;
    let (st, d) = call(&json, &r, &tail);
    expect(st, PAT_OK, "");
    assert!(!d.stay && d.to_tp == first.to_tp, "{d:?}");
    r.came_from_tp = first.to_tp;
    let (st, d) = call(&json, &r, &tail);
    expect(st, PAT_OK, "");
    assert!(d.stay && d.to_tp == 1, "{d:?}");

    // Stragglers holding none of their KV (waiting for room): the switch moves none, so it
    // costs what a switch with no live KV costs, less than with it.
    let waiting = tail.map(|s| pat_live_seq { kv_tokens: 0, ..s });
    let (st, w) = call(&json, &p, &waiting);
    expect(st, PAT_OK, "");
    let bare = switch.cost(1, w.to_tp as usize, &[]).total_ms;
    assert!(!w.stay && w.switch_cost_ms == bare, "{w:?} vs {bare}");
    let held = switch.cost(1, w.to_tp as usize, &[9000, 8500]).total_ms;
    assert!(bare < held, "{bare} vs {held}");

    // A full batch about to finish stays: the switch would cost more than it saves.
    let full: Vec<pat_live_seq> = (0..256).map(|i| seq(i % 8, 600, 100, 5.0)).collect();
    let (st, d) = call(&json, &p, &full);
    expect(st, PAT_OK, "");
    assert!(
        d.stay && d.to_tp == 1 && d.predicted_gain_ms == 0.0 && d.switch_cost_ms == 0.0,
        "{d:?}"
    );

    // Candidates limit the choice.
    let only2 = [2u32];
    p.candidates = only2.as_ptr();
    p.n_candidates = 1;
    let (st, d) = call(&json, &p, &tail);
    expect(st, PAT_OK, "");
    assert_eq!((d.to_tp, d.n_candidates), (2, 1));
}

#[test]
fn remaining_lengths_are_estimated_from_samples_when_not_given() {
    let json = modeled().to_json();
    let mut p = pat_policy_default_params();
    p.current_tp = 2;
    let live = [seq(0, 3000, 2500, f64::NAN), seq(1, 3100, 2500, f64::NAN)];
    let (st, _) = call(&json, &p, &live);
    expect(st, PAT_ERR_INVALID_ARGUMENT, "length_samples");
    let samples: Vec<u64> = (1..=100).map(|i| i * 100).collect();
    p.length_samples = samples.as_ptr();
    p.n_length_samples = samples.len();
    p.length_cap = 10_000;
    let (st, d) = call(&json, &p, &live);
    expect(st, PAT_OK, "");
    assert!(d.predicted_stay_ms > 0.0, "{d:?}");
    let (st, _) = call(&json, &p, &[seq(0, 10, 5, -3.0)]);
    expect(st, PAT_ERR_INVALID_ARGUMENT, "est_remaining");
}

#[test]
fn bad_profiles_and_params_are_errors() {
    let json = modeled().to_json();
    let p = pat_policy_default_params();
    let live = [seq(0, 100, 10, 50.0)];
    let (st, _) = call(&json, &p, &live);
    expect(st, PAT_ERR_INVALID_ARGUMENT, "current tp 0");
    let mut p1 = p;
    p1.current_tp = 1;
    let (st, _) = call("{\"version\": 1}", &p1, &live);
    expect(st, PAT_ERR_BAD_FILE, "bad profile");
    let (st, _) = call(&json, &pat_policy_params { margin: 1.5, ..p1 }, &live);
    expect(st, PAT_ERR_INVALID_ARGUMENT, "margin");
    // A world past what pat supports, from the params or the profile, is refused (it was a
    // per-replica allocation of ~100 GB, an abort).
    let huge = pat_policy_params {
        world: u32::MAX,
        ..p1
    };
    let (st, _) = call(&json, &huge, &live);
    expect(st, PAT_ERR_INVALID_ARGUMENT, "a world is 1 to 4096 ranks");
    // Candidates set but none counted: an error, not "no candidate, stay".
    let one = [2u32];
    let none = pat_policy_params {
        candidates: one.as_ptr(),
        n_candidates: 0,
        ..p1
    };
    let (st, _) = call(&json, &none, &live);
    expect(st, PAT_ERR_INVALID_ARGUMENT, "`n_candidates` is 0");
    let mut big = modeled();
    big.world = u32::MAX as usize;
    let (st, _) = call(&big.to_json(), &p1, &live);
    expect(st, PAT_ERR_BAD_FILE, "more ranks than pat supports");
    let (st, _) = call(&json, &p1, &[seq(9, 100, 10, 50.0)]);
    expect(st, PAT_ERR_INVALID_ARGUMENT, "replica 9");
    let more_kv = pat_live_seq {
        kv_tokens: 101,
        ..seq(0, 100, 10, 50.0)
    };
    let (st, _) = call(&json, &p1, &[live[0], more_kv]);
    expect(st, PAT_ERR_INVALID_ARGUMENT, "live[1].kv_tokens is 101");
    // A generated count past the context, and numbers past any context window, are refused by
    // name (such a count overflowed the forecast of a later switch in pat_policy_plan_start: a
    // caught panic).
    let looking = pat_policy_params {
        lookahead_steps: 64,
        ..p1
    };
    let (st, _) = call(&json, &looking, &[seq(0, 100, u64::MAX, 50.0)]);
    expect(
        st,
        PAT_ERR_INVALID_ARGUMENT,
        "live[0].generated is 18446744073709551615",
    );
    let (st, _) = call(&json, &looking, &[seq(0, 1 << 33, 0, 50.0)]);
    expect(
        st,
        PAT_ERR_INVALID_ARGUMENT,
        "live[0].context is 8589934592",
    );
    let (st, _) = call(&json, &looking, &[seq(0, 100, 0, 1e12)]);
    expect(
        st,
        PAT_ERR_INVALID_ARGUMENT,
        "live[0].est_remaining is 1000000000000.0",
    );
    let mut d = pat_decision::default();
    // SAFETY: NULL params and NULL profile are what is tested; the rest are locals.
    unsafe {
        expect(
            pat_policy_decide(
                json.as_ptr().cast(),
                json.len(),
                null(),
                live.as_ptr(),
                1,
                &mut d,
            ),
            PAT_ERR_NULL,
            "params",
        );
        expect(
            pat_policy_decide(null(), 5, &p1, live.as_ptr(), 1, &mut d),
            PAT_ERR_NULL,
            "profile_json",
        );
        expect(
            pat_policy_decide(json.as_ptr().cast(), json.len(), &p1, null(), 1, &mut d),
            PAT_ERR_NULL,
            "live",
        );
    }
}
