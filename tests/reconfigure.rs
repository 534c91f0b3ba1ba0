//! Live TP switches: greedy tokens and logits still match the transformers goldens after any
//! ladder of switches (migrate, recompute, auto); bad switches are errors that lose nothing.

mod common;

use common::*;
use pat::engine::SwitchReport;
use pat::model::config::ModelConfig;
use pat::model::decoder::RankWeights;
use pat::model::weights::Checkpoint;
use pat::parallel::shard::weight_bytes_per_rank;
use pat::reshard::cost::{CostModel, KvPolicy};
use pat::Dtype;

/// Runs the golden prompts on `world` ranks starting at `tp0`, switching at each (step, tp).
fn run_with_switches(
    model: &str,
    world: usize,
    tp0: usize,
    switches: &[(usize, usize)],
    policy: KvPolicy,
    cm: &CostModel,
) -> Vec<SwitchReport> {
    let mut reports = Vec::new();
    let (max_new, gold) = golden(model);
    let reqs = golden_requests(&gold, max_new);
    // A pool sized like a memory budget, so shrinking tp (larger weight shards) still fits.
    let mut e = engine(&golden_dir(model), world, tp0, Dtype::F32, 1024);
    e.record_logits(true);
    e.add_requests(&reqs).unwrap();
    let mut step = 0;
    while e.live() > 0 {
        for &(at, tp) in switches {
            if at == step {
                let r = e
                    .reconfigure(tp, policy, cm)
                    .unwrap_or_else(|err| panic!("{model} switch to tp {tp} at step {at}: {err}"));
                assert_eq!((r.to_tp, e.layout().tp), (tp, tp));
                assert_eq!(r.n_migrated + r.n_recomputed, r.n_inflight);
                if tp > r.from_tp {
                    assert!(
                        r.kv_blocks_per_rank_after > r.kv_blocks_per_rank_before,
                        "growing tp frees memory for KV"
                    );
                }
                reports.push(r);
            }
        }
        e.step().unwrap();
        if step == max_new - 1 {
            for (i, logits) in e.recorded_logits() {
                let err = rel_err(logits, &gold[*i].last_step_logits);
                assert!(
                    err < 1e-4,
                    "{model} {switches:?} {policy}: prompt {i} last-step logits off by {err:e}"
                );
            }
        }
        step += 1;
    }
    for (o, g) in e.outputs().iter().zip(&gold) {
        assert_eq!(
            o.output_ids, g.output_ids,
            "{model} {switches:?} {policy}: prompt {}",
            o.index
        );
    }
    reports
}

#[test]
fn ladders_of_switches_keep_tokens_identical() {
    let ladder = [(2, 2), (6, 4), (11, 1), (15, 2), (20, 4)];
    for model in ["llama", "qwen3"] {
        for policy in [KvPolicy::Migrate, KvPolicy::Recompute] {
            run_with_switches(model, 4, 1, &ladder, policy, &cost(1e9, 1e3));
        }
        // Auto with a 10 ms fixed transfer cost and 1000 prefill tokens/s: the cost model's
        // crossover is ~10 tokens, so the short prompts recompute and the long ones migrate.
        let cm = CostModel {
            fixed_transfer_s: 0.01,
            ..cost(1e9, 1e3)
        };
        assert!((cm.crossover_tokens(2, 256.0) - 10.0).abs() < 0.01);
        let r = run_with_switches(model, 4, 4, &[(1, 2), (5, 1), (9, 4)], KvPolicy::Auto, &cm);
        assert!(
            r[0].n_migrated > 0 && r[0].n_recomputed > 0,
            "{model}: auto used one mode only: {r:?}"
        );
        let r = run_with_switches(
            model,
            2,
            2,
            &[(3, 1), (7, 2)],
            KvPolicy::Auto,
            &cost(1e12, 1.0),
        );
        assert!(r.iter().all(|r| r.n_recomputed == 0));
    }
}

#[test]
fn bad_switches_are_errors_and_decoding_goes_on() {
    let model = "llama";
    let (max_new, gold) = golden(model);
    let reqs = golden_requests(&gold, max_new);
    let cm = cost(1e9, 1e3);
    // 100 blocks of ~2 KB at tp 4: enough for tp 2 (weights grow by ~100 KB per rank), not for
    // tp 1 (~300 KB more weights per rank than the pool holds).
    let mut e = engine(&golden_dir(model), 4, 4, Dtype::F32, 100);
    assert!(e
        .reconfigure(1, KvPolicy::Migrate, &cm)
        .unwrap_err()
        .to_string()
        .contains("no live sequences"));
    e.add_requests(&reqs).unwrap();
    e.step().unwrap();
    for (tp, needle) in [
        (3, "does not divide"),
        (8, "does not divide"),
        (4, "already runs at tp 4"),
        (1, "KV cache exhausted"),
    ] {
        let err = e
            .reconfigure(tp, KvPolicy::Migrate, &cm)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "tp {tp}: {err}");
        assert_eq!(e.layout().tp, 4);
    }
    let bad = CostModel {
        transfer_bytes_per_s: 0.0,
        ..cm.clone()
    };
    assert!(e.reconfigure(2, KvPolicy::Auto, &bad).is_err());
    // A good switch still works after the refusals, and nothing was lost.
    e.reconfigure(2, KvPolicy::Migrate, &cm).unwrap();
    e.run(|_| {}).unwrap();
    for (o, g) in e.outputs().iter().zip(&gold) {
        assert_eq!(o.output_ids, g.output_ids);
    }
}

#[test]
fn a_shrink_whose_sequences_could_outgrow_the_new_pool_is_refused_up_front() {
    // A pool where, after tp 4 -> 2 at step 1, the live sequences' cached KV fits each new
    // replica but their whole footprints (prompt + max_new_tokens) do not: before the check, that
    // switch went through and a later step failed with KV exhausted.
    let model = "llama";
    let (max_new, gold) = golden(model);
    let reqs = golden_requests(&gold, max_new);
    let cm = cost(1e9, 1e3);
    let mut found = None;
    for kv in 40..400 {
        let mut e = engine(&golden_dir(model), 4, 4, Dtype::F32, kv);
        e.add_requests(&reqs).unwrap();
        e.step().unwrap();
        match e.reconfigure(2, KvPolicy::Migrate, &cm) {
            Err(err) if err.to_string().contains("may grow to") => {
                found = Some((kv, e));
                break;
            }
            _ => continue,
        }
    }
    let (kv, mut e) = found.expect("some pool size makes the shrink outgrow the new pool");
    assert_eq!(
        e.layout().tp,
        4,
        "kv {kv}: the refused switch left the old layout"
    );
    e.run(|_| {}).unwrap();
    for (o, g) in e.outputs().iter().zip(&gold) {
        assert_eq!(o.output_ids, g.output_ids, "kv {kv}");
    }
}

#[test]
fn groups_are_created_once_and_reused() {
    let (max_new, gold) = golden("qwen3");
    let reqs = golden_requests(&gold, max_new);
    let mut e = engine(&golden_dir("qwen3"), 4, 1, Dtype::F32, 64);
    e.add_requests(&reqs).unwrap();
    e.step().unwrap();
    let created_tp1 = e.groups().created;
    assert_eq!(created_tp1, 4);
    let a = e
        .reconfigure(2, KvPolicy::Migrate, &cost(1e9, 1e3))
        .unwrap();
    // The two tp-2 groups and the world group the switch programs exchange through.
    assert_eq!((a.groups_created, a.groups_reused), (3, 0));
    e.step().unwrap();
    let b = e
        .reconfigure(1, KvPolicy::Migrate, &cost(1e9, 1e3))
        .unwrap();
    assert_eq!(
        (b.groups_created, b.groups_reused),
        (0, 5),
        "tp1 groups and the world group come from the cache"
    );
}

#[test]
fn predicted_weight_bytes_match_the_loaded_shards() {
    for model in ["llama", "qwen3"] {
        let dir = golden_dir(model);
        let cfg = ModelConfig::load(&dir).unwrap();
        let ck = Checkpoint::open(&dir).unwrap();
        for tp in [1, 2, 4] {
            let w = RankWeights::load(&ck, &cfg, tp, tp - 1, Dtype::F32).unwrap();
            assert_eq!(
                weight_bytes_per_rank(&cfg, tp, 4),
                w.bytes() as u64,
                "{model} tp {tp}"
            );
        }
    }
}

#[test]
fn a_failed_switch_in_any_phase_on_any_rank_loses_nothing() {
    let model = "qwen3";
    let (max_new, gold) = golden(model);
    let reqs = golden_requests(&gold, max_new);
    failed_switch_loses_nothing(
        || engine(&golden_dir(model), 4, 1, Dtype::F32, 256),
        &reqs,
        &gold,
        &cost(1e9, 1e3),
    );
}

/// A switch that gives the new pools fewer blocks than the old pool plus the freed shard bytes
/// (capped, as a full GPU would) grows them to exactly that goal at the first step that has to
/// leave a request waiting; the goal is (old pool + old shard - new shard) / new block, from the
/// loaded sizes; every request then runs in that step and ends with transformers' tokens.
#[test]
fn pools_held_short_at_a_switch_grow_when_a_step_needs_blocks() {
    let model = "llama";
    let (max_new, gold) = golden(model);
    let reqs = golden_requests(&gold, max_new);
    let e = engine(&golden_dir(model), 4, 1, Dtype::F32, 64);
    let cfg = e.config().clone();
    let (w1, pool1) = e.rank_bytes(0);
    let block = pat::kv::kv_block_bytes(&cfg, 2, 16, 4) as usize;
    let goal = (pool1 + w1 - weight_bytes_per_rank(&cfg, 2, 4) as usize) / block;
    let (r, g, step, total) = short_pools_grow_when_a_step_needs_blocks(e, &reqs, &gold, 8, |_| ());
    assert_eq!(r.kv_blocks_per_rank_goal, goal);
    assert_eq!(g.to_blocks, goal);
    assert_eq!(g.note, None);
    assert_eq!(
        step.live_per_replica.iter().sum::<usize>(),
        total,
        "all ran in the growth step"
    );
}

/// A pool a switch left shorter than a waiting request, that could not grow (a cap, as a full
/// GPU would), makes the step an error naming the request rather than a step that runs nothing
/// forever; another switch gives the pools room again and every request ends with
/// transformers' tokens.
#[test]
fn a_short_pool_that_cannot_grow_is_an_error_and_a_switch_recovers() {
    let model = "llama";
    let (max_new, gold) = golden(model);
    let reqs = golden_requests(&gold, max_new);
    let mut e = engine(&golden_dir(model), 2, 1, Dtype::F32, 64);
    e.add_requests(&reqs).unwrap();
    // Before the first step every request waits: nothing running owes blocks.
    e.cap_switch_pools(Some(1));
    let r = e
        .reconfigure(2, KvPolicy::Migrate, &cost(1e9, 1e3))
        .unwrap();
    assert_eq!(r.kv_blocks_per_rank_after, 1);
    let err = e.step().unwrap_err().to_string();
    assert!(
        err.contains("request 0 needs 2 blocks") && err.contains("could not grow"),
        "{err}"
    );
    e.cap_switch_pools(None);
    e.reconfigure(1, KvPolicy::Migrate, &cost(1e9, 1e3))
        .unwrap();
    e.run(|_| {}).unwrap();
    for (o, g) in e.outputs().iter().zip(&gold) {
        assert_eq!(o.output_ids, g.output_ids, "prompt {}", o.index);
    }
}
