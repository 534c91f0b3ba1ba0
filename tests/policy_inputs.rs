//! The policy's inputs as RL makes them, against hand-computed references: GRPO batches
//! (fractions, groups, sibling correlation), the predictor's noise level and the rule's refusal to
//! act inside it, and the sibling signal in the remaining-length estimate.

use std::path::Path;

use pat::policy::grpo::{grpo, sibling_correlation, GrpoSpec};
use pat::policy::predictor::{Fit, FitForm, Predictor};
use pat::policy::profile::DecodeSample;
use pat::policy::remaining::{LengthDist, Remaining, SeqView};
use pat::policy::trace::Trace;

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-300)
}

#[test]
fn grpo_batches_hold_their_fractions_groups_and_correlation() {
    let spec = |rho, seed| GrpoSpec {
        prompts: 128,
        group_size: 8,
        cap: 24576,
        rho,
        at_cap: 0.03,
        seed,
    };
    let mut corr = Vec::new();
    for rho in [0.0, 0.5, 0.9] {
        let t = grpo(&spec(rho, 3)).unwrap();
        assert_eq!(t.requests.len(), 1024);
        // Stratified marginal: the fractions hold to one response whatever rho.
        let s = t.stats(Some(24576));
        assert!(
            (s.frac_at_cap - 0.03).abs() <= 1.0 / 1024.0,
            "{}",
            s.frac_at_cap
        );
        assert!((s.frac_over_third - 0.1085).abs() <= 1.0 / 1024.0);
        // Groups are contiguous and share a prompt length.
        for (i, r) in t.requests.iter().enumerate() {
            assert_eq!(r.group, Some(i / 8));
            assert_eq!(r.prompt_len, t.requests[i / 8 * 8].prompt_len);
        }
        corr.push(sibling_correlation(&t).unwrap());
    }
    // Siblings' latent normals correlate at rho; their rank correlation is 6/pi asin(rho/2)
    // (0, 0.48, 0.89), and the log-length correlation (a monotone transform, capped) tracks it.
    assert!(corr[0].abs() < 0.08, "{corr:?}");
    assert!(corr[1] > 0.35 && corr[1] < 0.6, "{corr:?}");
    assert!(corr[2] > 0.8, "{corr:?}");
    let t = grpo(&spec(0.5, 3)).unwrap();
    let round = Trace::parse(Path::new("g.jsonl"), &t.to_jsonl()).unwrap();
    assert_eq!(round, t);
    for bad in [
        GrpoSpec {
            prompts: 0,
            ..spec(0.5, 0)
        },
        GrpoSpec {
            rho: 1.5,
            ..spec(0.5, 0)
        },
        GrpoSpec {
            at_cap: 0.5,
            ..spec(0.5, 0)
        },
        // Under the fraction over cap/3, but the fitted shape would fall under 1.
        GrpoSpec {
            at_cap: 0.05,
            ..spec(0.5, 0)
        },
        GrpoSpec {
            at_cap: 0.0,
            ..spec(0.5, 0)
        },
        GrpoSpec {
            prompts: usize::MAX,
            ..spec(0.5, 0)
        },
    ] {
        assert!(grpo(&bad).is_err(), "{bad:?}");
    }
}

#[test]
fn the_policy_does_not_act_inside_the_profiles_spread() {
    use pat::policy::controller::{Controller, ControllerConfig, LiveSeq};
    use pat::policy::decide::SwitchCost;
    // tp1 steps take 10 ms, tp2 8.5 ms: switching one 1000-token sequence gains 15%, above the
    // 10% margin. With a profile spread of 10% (2 x 10% = 20% band) it is noise: stay.
    let flat = |a| Fit {
        a,
        ..Fit::default()
    };
    let samples = |tp: usize, a: f64, spread: f64| -> Vec<DecodeSample> {
        [(1, 100), (1, 200), (2, 100), (2, 300), (4, 100)]
            .iter()
            .map(|&(batch, context)| DecodeSample {
                tp,
                batch,
                context,
                step_ms: a,
                spread_ms: spread * a,
            })
            .collect()
    };
    let mut s = samples(1, 10.0, 0.1);
    s.extend(samples(2, 8.5, 0.1));
    let noisy = Predictor::from_samples(&s, FitForm::Abc).unwrap();
    assert!((noisy.noise - 0.1).abs() < 1e-12);
    assert!(close(
        noisy.step_ms(2, 3, 50.0).unwrap(),
        flat(8.5).step_ms(3, 50.0),
        1e-9
    ));
    let quiet = Predictor {
        noise: 0.0,
        ..noisy.clone()
    };
    let sw = SwitchCost::flat(0.0);
    let live = [LiveSeq {
        index: 0,
        replica: 0,
        context: 100,
        kv: 100,
        generated: 0,
        max_new_tokens: 1000,
        group: None,
    }];
    let ctrl = |p| {
        Controller::new(
            ControllerConfig {
                candidates: vec![1, 2],
                check_every: 8,
                margin: 0.1,
                min_gain_ms: 0.0,
                max_switches: None,
            },
            p,
            &sw,
            Remaining::Oracle,
        )
        .unwrap()
    };
    assert!(!ctrl(&quiet).decide(2, 1, &live, 0, None).unwrap().0.stay);
    assert!(ctrl(&noisy).decide(2, 1, &live, 0, None).unwrap().0.stay);
    // Where to start: tp2 is predicted 15% faster; inside the noise band the start is still the
    // best non-switching plan (tp2), and a switching plan is not preferred over it.
    assert_eq!(ctrl(&noisy).plan_start(2, |_| live.to_vec()).unwrap().0, 2);
}

#[test]
fn sequences_whose_siblings_still_run_are_dealt_the_longer_strata() {
    // Lengths 10..=100; at g = 0 four sequences get the strata of the whole distribution. The one
    // whose group has three live members gets the longest, the lone ones the shortest, whatever
    // their replicas.
    let d = LengthDist::new(&(1..=10).map(|i| 10 * i).collect::<Vec<_>>(), None).unwrap();
    let v = |replica, live_siblings| SeqView {
        generated: 0,
        replica,
        true_len: None,
        live_siblings,
    };
    let est = Remaining::Empirical(d.clone())
        .estimate_set(&[v(0, 1), v(1, 3), v(0, 2), v(1, 1)])
        .unwrap();
    let strata = d.residual_strata(0, 4); // descending
    assert_eq!(est[1], strata[0]);
    assert_eq!(est[2], strata[1]);
    assert!(est[0] < est[2] && est[3] < est[2]);
    // Without sibling information the deal is by replica round-robin, as before.
    let est = Remaining::Empirical(d)
        .estimate_set(&[v(0, 0), v(1, 0), v(0, 0), v(1, 0)])
        .unwrap();
    assert_eq!((est[0], est[1]), (strata[0], strata[1]));
}
