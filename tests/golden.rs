//! Golden tests: greedy tokens and logits against HF transformers fixtures (tests/data/golden),
//! for every (world, tp) layout; f32 exact tokens, logits within 1e-4 relative.

mod common;

use common::*;
use pat::engine::{Engine, FinishReason, Request};
use pat::Dtype;

const LAYOUTS: [(usize, usize); 6] = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)];

fn check_model(model: &str) {
    let dir = golden_dir(model);
    let (max_new, gold) = golden(model);
    let reqs = golden_requests(&gold, max_new);
    for (world, tp) in LAYOUTS {
        let mut e = engine(
            &dir,
            world,
            tp,
            Dtype::F32,
            Engine::blocks_needed(&reqs, 16).unwrap(),
        );
        e.record_logits(true);
        e.add_requests(&reqs).unwrap();
        let mut step = 0;
        while e.live() > 0 {
            e.step().unwrap();
            for (i, logits) in e.recorded_logits() {
                let g = &gold[*i];
                if step == 0 {
                    let err = rel_err(logits, &g.first_step_logits);
                    assert!(err < 1e-4, "{model} world {world} tp {tp} prompt {i}: first-step logits off by {err:e}");
                }
                if step == max_new - 1 {
                    let err = rel_err(logits, &g.last_step_logits);
                    assert!(
                        err < 1e-4,
                        "{model} world {world} tp {tp} prompt {i}: last-step logits off by {err:e}"
                    );
                }
            }
            step += 1;
        }
        assert_eq!(step, max_new);
        for (o, g) in e.outputs().iter().zip(&gold) {
            assert_eq!(
                o.output_ids, g.output_ids,
                "{model} world {world} tp {tp} prompt {}",
                o.index
            );
            assert_eq!(o.finish_reason, FinishReason::Length);
        }
    }
}

#[test]
fn llama_matches_transformers_on_every_layout() {
    check_model("llama");
}

#[test]
fn qwen3_matches_transformers_on_every_layout() {
    check_model("qwen3");
}

#[test]
fn bf16_weights_stay_close_to_the_f32_reference() {
    for model in ["llama", "qwen3"] {
        let (_, gold) = golden(model);
        let g = &gold[3];
        let reqs = [Request {
            input_ids: g.input_ids.clone(),
            max_new_tokens: 1,
            ignore_eos: true,
        }];
        let mut e = engine(&golden_dir(model), 2, 2, Dtype::Bf16, 8);
        e.record_logits(true);
        e.add_requests(&reqs).unwrap();
        e.step().unwrap();
        let err = rel_err(&e.recorded_logits()[0].1, &g.first_step_logits);
        // bf16 keeps 8 mantissa bits: relative weight error 2^-9, a few such through the network.
        assert!(
            err < 3e-2 && err > 1e-6,
            "{model}: bf16 logits relative error {err:e}"
        );
    }
}

#[test]
fn a_pool_that_holds_one_request_at_a_time_queues_the_rest_with_the_same_tokens() {
    // Admission control: every request fits the pool alone, none fits beside another, so the
    // scheduler runs them one after another (per replica) instead of failing mid-run; the tokens
    // are still transformers' own.
    let (max_new, gold) = golden("llama");
    let reqs = golden_requests(&gold, max_new);
    let one = reqs
        .iter()
        .map(|r| pat::kv::blocks_for(r.input_ids.len() + r.max_new_tokens, 16))
        .max()
        .unwrap();
    let smallest = reqs
        .iter()
        .map(|r| pat::kv::blocks_for(r.input_ids.len() + r.max_new_tokens, 16))
        .min()
        .unwrap();
    assert!(
        2 * smallest > one,
        "the fixture's requests must not fit two at a time"
    );
    for (world, tp) in [(1, 1), (2, 1)] {
        let mut e = engine(&golden_dir("llama"), world, tp, Dtype::F32, one);
        e.add_requests(&reqs).unwrap();
        let mut most_running = 0;
        while e.live() > 0 {
            let r = e.step().unwrap();
            most_running = most_running.max(r.tokens_out);
        }
        // At most one sequence per replica ran at once.
        assert!(
            most_running <= world,
            "world {world}: {most_running} ran at once"
        );
        let outs = e.outputs();
        assert_eq!(outs.len(), gold.len());
        for (o, g) in outs.iter().zip(&gold) {
            assert_eq!(
                o.output_ids, g.output_ids,
                "world {world} prompt {}",
                o.index
            );
        }
    }
}
