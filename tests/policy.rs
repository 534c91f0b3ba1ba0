//! Policy pieces against hand-computed references: traces, profiles, the modeled profile, the
//! least-squares predictor, remaining-length estimates and the drain forecast. (The decision
//! rule's hand-computed cases are unit tests in src/policy/decide/tests.rs.)

use std::path::Path;

use pat::policy::forecast::{drain_ms, Pending};
use pat::policy::modeled::{Link, ModelShape};
use pat::policy::predictor::{validate, Fit, FitForm, Predictor};
use pat::policy::profile::{DecodeSample, Profile};
use pat::policy::remaining::{LengthDist, Remaining, SeqView};
use pat::policy::trace::{deepscaler_like, loglogistic_params, one_straggler, uniform, Trace};
use pat::sim::{sampled_profile, ComponentModel, ComponentParams, GpuKind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-300)
}

#[test]
fn trace_file_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.jsonl");
    std::fs::write(
        &p,
        "{\"prompt_len\":3,\"response_len\":5}\n{\"prompt_len\":3,\"response_len\":2.5}\n",
    )
    .unwrap();
    let e = Trace::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("t.jsonl:2:") && e.contains("response_len"),
        "{e}"
    );
    std::fs::write(&p, "{\"prompt_len\":3,\"response_len\":5,\"x\":1}\n").unwrap();
    let e = Trace::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("t.jsonl:1:") && e.contains("unknown key `x`"),
        "{e}"
    );
    std::fs::write(&p, "").unwrap();
    assert!(Trace::load(&p)
        .unwrap_err()
        .to_string()
        .contains("empty trace"));
    let e = Trace::load(&dir.path().join("missing.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.jsonl"), "{e}");
}

#[test]
fn loglogistic_parameters_match_hand_solution() {
    // o(cap) = 128/2.8 - 1 = 44.7142857, o(cap/3) = 1/0.1085 - 1 = 8.2165899;
    // beta = ln(44.7142857 / 8.2165899) / ln 3 = 1.5420707; alpha = 24576 / 44.7142857^(1/beta).
    let (alpha, beta) = loglogistic_params(24576, 0.1085, 2.8 / 128.0);
    assert!(close(beta, 1.5420707, 1e-6), "{beta}");
    assert!(close(alpha, 2090.41207, 1e-6), "{alpha}");
}

#[test]
fn deepscaler_like_has_the_intended_tail() {
    for seed in 0..5 {
        let t = deepscaler_like(128, 24576, seed).unwrap();
        assert_eq!(t, deepscaler_like(128, 24576, seed).unwrap());
        let s = t.stats(Some(24576));
        // Stratified: 128 * 0.1085 = 13.9 over 8192 and 128 * 2.8/128 = 2.8 at the cap, +-1.
        let over = (s.frac_over_third * 128.0).round() as usize;
        let at_cap = (s.frac_at_cap * 128.0).round() as usize;
        assert!((13..=15).contains(&over), "seed {seed}: {over} over cap/3");
        assert!((2..=3).contains(&at_cap), "seed {seed}: {at_cap} at cap");
        assert!(t
            .requests
            .iter()
            .all(|r| (1..=24576).contains(&r.response_len) && (64..=512).contains(&r.prompt_len)));
    }
    assert_ne!(
        deepscaler_like(128, 24576, 0).unwrap(),
        deepscaler_like(128, 24576, 1).unwrap()
    );
    assert!(deepscaler_like(0, 24576, 0).is_err());
}

#[test]
fn uniform_and_straggler_traces() {
    let t = one_straggler(4, 10, 99).unwrap();
    assert_eq!(t.response_lens(), vec![10, 10, 10, 99]);
    let u = uniform(200, 30, 40, 7).unwrap();
    assert!(u
        .requests
        .iter()
        .all(|r| (30..=40).contains(&r.response_len)));
    assert!(uniform(3, 5, 4, 0).is_err() && uniform(3, 0, 4, 0).is_err());
}

#[test]
fn trace_stats_by_hand() {
    let text: String = (1..=10)
        .map(|r| format!("{{\"prompt_len\":{},\"response_len\":{r}}}\n", 2 * r))
        .collect();
    let s = Trace::parse(Path::new("x"), &text).unwrap().stats(Some(9));
    // Lengths 1..10: mean 5.5; nearest rank p50 = 5th = 5, p90 = 9th = 9, p99 = 10th = 10.
    assert_eq!(
        (s.count, s.response_p50, s.response_p90, s.response_p99),
        (10, 5, 9, 10)
    );
    assert_eq!(s.response_mean, 5.5);
    assert_eq!(s.prompt_mean, 11.0);
    // Over 9/3 = 3: lengths 4..10 (7 of 10); at cap 9: 9 and 10.
    assert_eq!((s.frac_over_third, s.frac_at_cap), (0.7, 0.2));
    assert_eq!(s.response_tokens, 55);
}

fn llama_profile() -> Profile {
    let m = ComponentModel::new(
        ModelShape::Llama3_8b.dims(),
        ComponentParams::defaults(GpuKind::H100, Link::NvLink),
    )
    .unwrap();
    sampled_profile(&m, 8).unwrap()
}

#[test]
fn modeled_profile_samples_the_component_model() {
    // LLaMA-3.1-8B: per layer 4096*(4096+2048) + 4096^2 + 3*4096*14336 = 218,103,808 params;
    // x32 + lm_head 128256*4096 = 7,504,658,432 params.
    let p = llama_profile();
    let d = &p.model;
    assert_eq!(d.step_read_params(), 7_504_658_432.0);
    assert_eq!(d.kv_bytes_per_token(), 131072.0);
    assert_eq!(d.candidate_tps(8), vec![1, 2, 4, 8]);
    let m = ComponentModel::new(
        d.clone(),
        ComponentParams::defaults(GpuKind::H100, Link::NvLink),
    )
    .unwrap();
    let s = p
        .decode
        .iter()
        .find(|s| (s.tp, s.batch, s.context) == (8, 1, 1024))
        .unwrap();
    assert_eq!(s.step_ms, m.step_ms(8, 1, 1024.0));
    // Prefill at tp1: 990e12 * 0.5 / (2 * 7,504,658,432) = 32,979.5 tokens/s.
    assert!(close(p.prefill_rate(1).unwrap(), 32979.5156, 1e-8));
    assert_eq!(p.provenance("decode"), "modeled");
    // Each replica's KV capacity at memory fraction 0.5 of 80 GB (by hand in tests/sim_model.rs:
    // (4 x 80e9 x 0.5 - 16,059,990,016 B of weights) / 131,072 B per token at tp 4).
    assert_eq!(
        p.kv_capacity_tokens[&4],
        ((160e9 - 16_059_990_016.0) / 131_072.0) as usize
    );
    assert_eq!("pcie".parse::<Link>().unwrap(), Link::Pcie);
    assert_eq!("100".parse::<Link>().unwrap(), Link::GBps(100.0));
    assert!("fast".parse::<Link>().is_err() && "-3".parse::<Link>().is_err());
    assert!("llama3-70b".parse::<ModelShape>().is_err());
}

#[test]
fn profile_round_trips_and_validates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.json");
    let p = llama_profile();
    p.save(&path).unwrap();
    let q = Profile::load(&path).unwrap();
    // serde_json (without float_roundtrip) may read the last ulp back differently.
    assert_eq!(q.decode.len(), p.decode.len());
    for (a, b) in q.decode.iter().zip(&p.decode) {
        assert_eq!((a.tp, a.batch, a.context), (b.tp, b.batch, b.context));
        assert!(close(a.step_ms, b.step_ms, 1e-14));
    }
    assert_eq!(q.model, p.model);
    q.check_matches(&ModelShape::Llama3_8b.dims(), 8).unwrap();
    let e = q
        .check_matches(&ModelShape::Qwen3_14b.dims(), 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("p.json") && e.contains("model.arch"), "{e}");
    let mut dims = ModelShape::Llama3_8b.dims();
    dims.num_layers = 40;
    let e = q.check_matches(&dims, 8).unwrap_err().to_string();
    assert!(
        e.contains("model.num_layers = 32") && e.contains("= 40"),
        "{e}"
    );
    let e = q
        .check_matches(&ModelShape::Llama3_8b.dims(), 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("world = 8") && e.contains("world = 4"), "{e}");

    let mut v: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
    v["backend"] = "tpu".into();
    let e = Profile::from_json(&v.to_string(), &path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("backend"), "{e}");
    let mut v: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
    v["measured"].as_object_mut().unwrap().remove("switch");
    let e = Profile::from_json(&v.to_string(), &path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`switch`"), "{e}");
    let mut v: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
    v["decode"][0]["tp"] = 3.into();
    let e = Profile::from_json(&v.to_string(), &path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("decode[0]") && e.contains("tp 3"), "{e}");
    // No prefill rate: every prefill and recompute would be free. Refused, as no decode is.
    for key in ["prefill", "decode"] {
        let mut v: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
        v[key] = serde_json::json!([]);
        let e = Profile::from_json(&v.to_string(), &path)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("`{key}` has no samples")), "{e}");
    }
    let text = p.to_json().replacen("\"world\"", "\"wrld\"", 1);
    let e = Profile::from_json(&text, &path).unwrap_err().to_string();
    assert!(e.contains("p.json:") && e.contains("wrld"), "{e}");
}

/// Samples of a + b*batch + c*batch*ctx (+ d*ctx) on a grid, times (1 + noise) with noise
/// deterministic, uniform in [-noise, noise].
fn synthetic(tp: usize, f: Fit, noise: f64, seed: u64) -> Vec<DecodeSample> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for batch in [1, 2, 4, 8, 16, 32, 64, 128] {
        for context in [128, 512, 2048, 8192, 24576] {
            let y =
                f.a + f.b * batch as f64 + f.c * (batch * context) as f64 + f.d * context as f64;
            let e = if noise > 0.0 {
                rng.random_range(-noise..=noise)
            } else {
                0.0
            };
            out.push(DecodeSample {
                tp,
                batch,
                context,
                step_ms: y * (1.0 + e),
                spread_ms: 0.0,
            });
        }
    }
    out
}

fn profile_with(decode: Vec<DecodeSample>) -> Profile {
    let mut p = llama_profile();
    p.decode = decode;
    p
}

#[test]
fn predictor_recovers_exact_coefficients_without_noise() {
    let f = Fit {
        a: 3.0,
        b: 0.05,
        c: 2e-5,
        d: 0.0,
        ..Fit::default()
    };
    let g = Fit {
        a: 1.5,
        b: 0.08,
        c: 4e-6,
        d: 3e-5,
        ..Fit::default()
    };
    let mut s = synthetic(2, f, 0.0, 0);
    s.extend(synthetic(8, g, 0.0, 0));
    let p = Predictor::from_samples(&s, FitForm::Abcd).unwrap();
    for (tp, want) in [(2, f), (8, g)] {
        let got = p.fit(tp).unwrap();
        for (x, y) in [(got.a, want.a), (got.b, want.b), (got.c, want.c)] {
            assert!(close(x, y, 1e-9), "tp {tp}: {got:?} vs {want:?}");
        }
        assert!((got.d - want.d).abs() < 1e-12, "tp {tp}: {got:?}");
    }
    // Extrapolates along the physical form: batch 300 at 40K context.
    let want = g.a + g.b * 300.0 + g.c * 300.0 * 40000.0 + g.d * 40000.0;
    assert!(close(p.step_ms(8, 300, 40000.0).unwrap(), want, 1e-9));
    let e = p.step_ms(4, 1, 1.0).unwrap_err().to_string();
    assert!(e.contains("tp 4") && e.contains("2, 8"), "{e}");
}

#[test]
fn predictor_holdout_error_is_bounded_by_the_noise() {
    // +-1% multiplicative noise: a good fit's held-out error is about the noise's mean absolute
    // value (0.5%); 2% is the bound.
    let f = Fit {
        a: 3.0,
        b: 0.05,
        c: 2e-5,
        d: 0.0,
        ..Fit::default()
    };
    let mut s = synthetic(1, f, 0.01, 1);
    s.extend(synthetic(
        4,
        Fit {
            a: 1.2,
            b: 0.07,
            c: 5e-6,
            d: 0.0,
            ..Fit::default()
        },
        0.01,
        2,
    ));
    let r = validate(&profile_with(s), 0.25, 9).unwrap();
    assert_eq!((r.n_train, r.n_test), (60, 20));
    assert!(r.overall_mape < 2.0, "{r:?}");
    assert!(r.mape_per_tp.values().all(|&m| m < 2.0), "{r:?}");
    // Zero noise: zero error.
    let exact = validate(&profile_with(synthetic(1, f, 0.0, 0)), 0.25, 9).unwrap();
    assert!(exact.overall_mape < 1e-9, "{exact:?}");
}

#[test]
fn predictor_refuses_underdetermined_fits() {
    let f = Fit {
        a: 1.0,
        b: 1.0,
        c: 1.0,
        d: 0.0,
        ..Fit::default()
    };
    let two = synthetic(2, f, 0.0, 0)[..2].to_vec();
    let e = Predictor::from_samples(&two, FitForm::Abc)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tp 2") && e.contains("only 2 samples"), "{e}");
    // Batch fixed at 4: the `batch` column is 4x the constant column, so a and b are not separable.
    let same_batch: Vec<DecodeSample> = synthetic(2, f, 0.0, 0)
        .into_iter()
        .filter(|s| s.batch == 4)
        .collect();
    let e = Predictor::from_samples(&same_batch, FitForm::Abc)
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not vary"), "{e}");
}

#[test]
fn mean_residual_life_by_hand() {
    let d = LengthDist::new(&[2, 4, 10, 20], Some(30)).unwrap();
    assert_eq!(d.mean_residual(0), 9.0); // (2+4+10+20)/4
    assert!(close(d.mean_residual(3), 34.0 / 3.0 - 3.0, 1e-12)); // (4+10+20)/3 - 3
    assert_eq!(d.mean_residual(10), 10.0); // only 20 > 10
    assert_eq!(d.mean_residual(20), 10.0); // none longer: cap - g
    assert_eq!(d.mean_residual(30), 30.0); // none, cap reached: g
    let nocap = LengthDist::new(&[2, 4], None).unwrap();
    assert_eq!(nocap.mean_residual(25), 25.0);
    assert!(LengthDist::new(&[], None).is_err());
    // Strata at g = 3: residuals 1, 7, 17. k = 3: each its own; k = 1: the mean 25/3;
    // k = 2: F(1/2) = (1 + 0.5 * 7) / 3 = 1.5, F(1) = 25/3: means 2 * 1.5 = 3 and 2 * (25/3 - 1.5).
    let three = d.residual_strata(3, 3);
    assert!(
        three
            .iter()
            .zip([17.0, 7.0, 1.0])
            .all(|(&x, y)| close(x, y, 1e-12)),
        "{three:?}"
    );
    assert!(close(d.residual_strata(3, 1)[0], 25.0 / 3.0, 1e-12));
    let two = d.residual_strata(3, 2);
    assert!(close(two[0], 2.0 * (25.0 / 3.0 - 1.5), 1e-12) && close(two[1], 3.0, 1e-12));
}

#[test]
fn estimates_for_a_live_set_and_the_oracle() {
    let d = LengthDist::new(&[2, 4, 10, 20], None).unwrap();
    let v = |replica, true_len| SeqView {
        generated: 0,
        replica,
        true_len: Some(true_len),
        live_siblings: 0,
    };
    let set = [v(0, 5), v(0, 6), v(1, 7), v(1, 8)];
    // Strata at g = 0, k = 4: 20, 10, 4, 2 dealt to (1st of r0), (1st of r1), (2nd of r0), (2nd of r1).
    assert_eq!(
        Remaining::Empirical(d).estimate_set(&set).unwrap(),
        vec![20.0, 4.0, 10.0, 2.0]
    );
    assert_eq!(
        Remaining::Oracle.estimate_set(&set).unwrap(),
        vec![5.0, 6.0, 7.0, 8.0]
    );
    assert_eq!(Remaining::Oracle.estimate(3, Some(10)).unwrap(), 7.0);
    assert!(Remaining::Oracle.estimate(10, Some(10)).is_err());
    assert!(Remaining::Oracle.estimate(1, None).is_err());
}

#[test]
fn drain_forecast_by_hand() {
    // step_ms = 1 + 0.5 batch + 0.1 sum(ctx). Replica 0: one seq (ctx 10, 2 steps);
    // replica 1: (ctx 0, 1 step), (ctx 4, 3 steps).
    // step 0: max(1 + .5 + 1.0, 1 + 1 + .4) = 2.5; step 1: max(1 + .5 + 1.1, 1 + .5 + .5) = 2.6;
    // step 2: replica 1 alone, ctx 6: 2.1. Total 7.2.
    let fit = Fit {
        a: 1.0,
        b: 0.5,
        c: 0.1,
        d: 0.0,
        ..Fit::default()
    };
    let p = |context, remaining| Pending {
        context,
        remaining,
        cached: true,
    };
    let t = drain_ms(&fit, &[vec![p(10, 2)], vec![p(0, 1), p(4, 3)]], None);
    assert!(close(t, 7.2, 1e-12), "{t}");
}
