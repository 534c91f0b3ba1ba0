//! `pat_policy_plan_start`: where a batch starts and the ladder foreseen, through the C ABI.

use pat::policy::decide::{placed_at, start_plan};
use pat::policy::{DecideInput, EstimatedSeq, Predictor, SwitchCost};
use pat_ffi::engine::pat_live_seq;
use pat_ffi::policy::*;
use pat_ffi::*;

use super::expect;
use super::policy::modeled;

/// A request about to start: `prompt` tokens in, an estimate of what it will generate.
fn request(prompt: u64, est: f64) -> pat_live_seq {
    pat_live_seq {
        context: prompt,
        kv_tokens: 0,
        est_remaining: est,
        ..Default::default()
    }
}

/// A long-tailed batch of 512: most responses short, a few near 16K.
fn tailed() -> Vec<pat_live_seq> {
    (0..512u64)
        .map(|i| {
            let u = ((i * 2654435761) % 1000) as f64 / 1000.0;
            request(200 + i % 300, (100.0 + 16000.0 * u.powi(6)).floor())
        })
        .collect()
}

fn call(
    json: &str,
    p: &pat_policy_params,
    batch: &[pat_live_seq],
    cap: usize,
) -> (pat_status, pat_start_plan, Vec<pat_plan_switch>, usize) {
    let mut out = pat_start_plan {
        start_tp: 99,
        ..Default::default()
    };
    let mut buf = vec![pat_plan_switch::default(); cap];
    let mut n = usize::MAX;
    // SAFETY: every pointer is a local that outlives the call; `buf` holds `cap` entries.
    let st = unsafe {
        pat_policy_plan_start(
            json.as_ptr().cast(),
            json.len(),
            p,
            batch.as_ptr(),
            batch.len(),
            &mut out,
            buf.as_mut_ptr(),
            cap,
            &mut n,
        )
    };
    (st, out, buf, n)
}

#[test]
fn a_tailed_batch_gets_the_librarys_ladder() {
    let profile = modeled();
    let json = profile.to_json();
    let mut p = pat_policy_default_params();
    p.lookahead_steps = 64;
    let batch = tailed();
    let (st, out, buf, n) = call(&json, &p, &batch, 8);
    expect(st, PAT_OK, "");
    assert!(n >= 1 && out.n_switches as usize == n, "{out:?} {n}");
    assert!(out.predicted_ms < out.predicted_stay_ms, "{out:?}");
    // Switch points are multiples of the re-check interval, in order, each to another tp.
    let mut tp = out.start_tp;
    let mut last = 0;
    for s in &buf[..n] {
        assert!(
            s.step % 64 == 0 && s.step > last && s.to_tp != tp,
            "{:?}",
            &buf[..n]
        );
        (tp, last) = (s.to_tp, s.step);
    }

    // The library's start plan on the same batch, placed balanced at every candidate tp.
    let predictor = Predictor::from_profile(&profile).unwrap();
    let switch = SwitchCost::from_profile(&profile);
    let seqs: Vec<EstimatedSeq> = batch
        .iter()
        .map(|s| EstimatedSeq {
            replica: 0,
            context: s.context as usize,
            kv: 0,
            generated: 0,
            est_remaining: s.est_remaining,
            cached: true,
        })
        .collect();
    let candidates = [1, 2, 4, 8];
    let starts: Vec<(usize, Vec<EstimatedSeq>)> = candidates
        .iter()
        .map(|&tp| (tp, placed_at(8, tp, &seqs)))
        .collect();
    let base = DecideInput {
        world: 8,
        current_tp: 1,
        candidates: &candidates,
        live: &seqs,
        predictor: &predictor,
        switch: &switch,
        margin: 0.0,
        min_gain_ms: 0.0,
        lookahead_steps: 64,
        follow_up_points: 0,
        came_from: None,
    };
    let want = start_plan(&base, &starts, 64, None).unwrap();
    assert_eq!(out.start_tp as usize, want.tp);
    assert_eq!(out.predicted_ms, want.predicted_ms);
    assert_eq!(
        (out.stay_tp as usize, out.predicted_stay_ms),
        (want.stay.0, want.stay.1)
    );
    let got: Vec<(usize, usize)> = buf[..n]
        .iter()
        .map(|s| (s.step as usize, s.to_tp as usize))
        .collect();
    assert_eq!(got, want.switches);
}

#[test]
fn one_request_starts_where_one_sequence_is_fastest_and_never_switches() {
    let profile = modeled();
    let json = profile.to_json();
    let p = pat_policy_default_params();
    let (st, out, _, n) = call(&json, &p, &[request(100, 500.0)], 4);
    expect(st, PAT_OK, "");
    assert_eq!((n, out.n_switches), (0, 0));
    assert_eq!((out.start_tp, out.stay_tp), (8, 8), "{out:?}");
    assert_eq!(out.predicted_ms, out.predicted_stay_ms);
    // 500 steps of one sequence at tp 8: the predictor's step times summed.
    let fit = Predictor::from_profile(&profile).unwrap();
    let fit = fit.fit(8).unwrap();
    let want: f64 = (0..500).map(|s| fit.step_ms(1, (100 + s) as f64)).sum();
    assert!(
        (out.predicted_ms - want).abs() < 1e-6 * want,
        "{out:?} vs {want}"
    );
}

#[test]
fn bad_batches_buffers_and_params_are_errors_that_write_nothing() {
    let json = modeled().to_json();
    let mut p = pat_policy_default_params();
    p.lookahead_steps = 64;
    let batch = tailed();
    let (st, out, _, _) = call(&json, &p, &[], 4);
    expect(st, PAT_ERR_INVALID_ARGUMENT, "`batch` is empty");
    assert_eq!(out.start_tp, 99);
    // Too small a buffer: the count needed, `out` unwritten.
    let (st, out, _, n) = call(&json, &p, &batch, 0);
    expect(st, PAT_BUFFER_TOO_SMALL, "switches");
    assert!(n >= 1 && out.start_tp == 99, "{out:?} {n}");
    let (st, _, _, m) = call(&json, &p, &batch, n);
    expect(st, PAT_OK, "");
    assert_eq!(m, n);
    // A candidate that does not divide the world.
    let bad = [1u32, 3];
    p.candidates = bad.as_ptr();
    p.n_candidates = bad.len();
    let (st, out, _, _) = call(&json, &p, &batch, 8);
    expect(
        st,
        PAT_ERR_INVALID_ARGUMENT,
        "candidate tp 3 does not divide world 8",
    );
    assert_eq!(out.start_tp, 99);
    // A world past what pat supports is refused before anything is sized by it (a placement
    // over 4e9 replicas was an abort).
    let huge = pat_policy_params {
        world: u32::MAX,
        ..pat_policy_default_params()
    };
    let (st, out, _, _) = call(&json, &huge, &batch, 8);
    expect(st, PAT_ERR_INVALID_ARGUMENT, "a world is 1 to 4096 ranks");
    assert_eq!(out.start_tp, 99);
    // NaN estimates need length samples.
    let p = pat_policy_default_params();
    let (st, _, _, _) = call(&json, &p, &[request(10, f64::NAN)], 4);
    expect(st, PAT_ERR_INVALID_ARGUMENT, "length_samples");
    let samples = [100u64, 200, 4000];
    let p = pat_policy_params {
        length_samples: samples.as_ptr(),
        n_length_samples: samples.len(),
        ..pat_policy_default_params()
    };
    let (st, _, _, _) = call(&json, &p, &[request(10, f64::NAN)], 4);
    expect(st, PAT_OK, "");
    // Numbers past any context window are refused by name, not overflowed.
    let huge = [100u64, 1 << 40];
    let q = pat_policy_params {
        length_samples: huge.as_ptr(),
        n_length_samples: huge.len(),
        ..pat_policy_default_params()
    };
    let (st, _, _, _) = call(&json, &q, &[request(10, f64::NAN)], 4);
    expect(
        st,
        PAT_ERR_INVALID_ARGUMENT,
        "length_samples[1] is 1099511627776",
    );
    let (st, _, _, _) = call(&json, &p, &[request(10, 1e300)], 4);
    expect(
        st,
        PAT_ERR_INVALID_ARGUMENT,
        "batch[0].est_remaining is 1e300",
    );
    let mut r = request(10, 5.0);
    r.generated = 11;
    let (st, _, _, _) = call(&json, &p, &[r], 4);
    expect(
        st,
        PAT_ERR_INVALID_ARGUMENT,
        "batch[0].generated is 11 but its context is 10",
    );
    let (st, _, _, _) = call(&json, &p, &[request(u64::MAX, 5.0)], 4);
    expect(
        st,
        PAT_ERR_INVALID_ARGUMENT,
        "batch[0].context is 18446744073709551615",
    );
    // NULL outputs and params.
    let mut out = pat_start_plan::default();
    let mut n = 0usize;
    let q = pat_policy_default_params();
    let one = [request(10, 5.0)];
    // SAFETY: NULL where named, locals elsewhere.
    unsafe {
        let j = json.as_ptr().cast();
        let st = pat_policy_plan_start(
            j,
            json.len(),
            &q,
            one.as_ptr(),
            1,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
            &mut n,
        );
        expect(st, PAT_ERR_NULL, "`out`");
        let st = pat_policy_plan_start(
            j,
            json.len(),
            &q,
            one.as_ptr(),
            1,
            &mut out,
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        );
        expect(st, PAT_ERR_NULL, "`n_switches`");
        let st = pat_policy_plan_start(
            j,
            json.len(),
            std::ptr::null(),
            one.as_ptr(),
            1,
            &mut out,
            std::ptr::null_mut(),
            0,
            &mut n,
        );
        expect(st, PAT_ERR_NULL, "`params`");
    }
}

/// Extreme numbers on a valid profile: every call ends in a status, never a caught panic or an
/// internal error, and a success's plan is consistent.
#[test]
fn extreme_batches_and_params_end_in_a_status() {
    let json = modeled().to_json();
    let samples = [1u64, 7, 16384];
    let ests = [0.0, 1e-300, 1.0, 1e300, f64::MAX, f64::NAN];
    let contexts = [0u64, 1, 1 << 40, u64::MAX];
    for (i, &est) in ests.iter().enumerate() {
        for (j, &context) in contexts.iter().enumerate() {
            for lookahead in [0u32, 1, 64, u32::MAX] {
                for world in [0u32, 8, 4096, 5000, u32::MAX] {
                    let batch: Vec<pat_live_seq> = (0..3)
                        .map(|k| pat_live_seq {
                            context: if k == 0 { context } else { 100 },
                            kv_tokens: 0,
                            generated: if (i + j) % 2 == 0 { u64::MAX } else { 0 },
                            est_remaining: if k == 1 { 50.0 } else { est },
                            ..Default::default()
                        })
                        .collect();
                    let p = pat_policy_params {
                        world,
                        lookahead_steps: lookahead,
                        length_samples: samples.as_ptr(),
                        n_length_samples: samples.len(),
                        length_cap: if j % 2 == 0 { 0 } else { 16384 },
                        ..pat_policy_default_params()
                    };
                    let (st, out, _, n) = call(&json, &p, &batch, 8);
                    let case = format!(
                        "est {est}, context {context}, lookahead {lookahead}, world {world}"
                    );
                    assert!(
                        st != PAT_ERR_PANIC && st != PAT_ERR_INTERNAL,
                        "{case}: status {st} ({})",
                        super::last_error()
                    );
                    if st == PAT_OK {
                        assert!(
                            out.start_tp >= 1 && out.n_switches as usize == n,
                            "{case}: {out:?}"
                        );
                        assert!(out.predicted_ms <= out.predicted_stay_ms, "{case}: {out:?}");
                    } else {
                        assert_eq!(out.start_tp, 99, "{case}: output written on failure");
                    }
                }
            }
        }
    }
}
