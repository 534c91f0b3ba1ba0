//! Live TP switches: greedy tokens and logits still match the transformers goldens after any
//! ladder of switches (migrate, recompute, auto); bad switches are errors that lose nothing.

mod common;

use common::*;
use pat::engine::{SwitchFault, SwitchPhase, SwitchReport};
use pat::model::config::ModelConfig;
use pat::model::decoder::RankWeights;
use pat::model::weights::Checkpoint;
use pat::parallel::shard::weight_bytes_per_rank;
use pat::reshard::cost::{CostModel, KvPolicy};
use pat::Dtype;

fn cost(transfer: f64, prefill: f64) -> CostModel {
    CostModel {
        transfer_bytes_per_s: transfer,
        fixed_transfer_s: 0.0,
        prefill_tokens_per_s: vec![(1, prefill), (4, prefill)],
        fixed_prefill_s: 0.0,
    }
}

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

#[test]
fn a_recompute_larger_than_a_step_runs_in_passes_with_the_same_tokens() {
    // A host that cannot hold every recomputed sequence's activations at once (on the CPU a
    // step's cap is what half the available memory holds): the switch recomputes in passes that
    // each fit the cap, a sequence longer than what is left in chunks, so with a cap of one
    // token one token a pass. A recompute that fails part way keeps the passes done; the
    // sequences left are prefilled again by the next steps under the same cap, one token a
    // step. The tokens stay transformers' own.
    let model = "llama";
    let (max_new, gold) = golden(model);
    let reqs = golden_requests(&gold, max_new);
    let n = reqs.len();
    assert!(n >= 3, "the fixture has {n} prompts");
    // No fault; then a fault on rank 0 (the first pass's replica: nothing recomputed) and on
    // rank 3 (the other replica at tp 2: the passes before its first sequence's are kept).
    for fault in [None, Some(0), Some(3)] {
        let mut e = engine(&golden_dir(model), 4, 1, Dtype::F32, 1024);
        e.add_requests(&reqs).unwrap();
        e.step().unwrap();
        e.step().unwrap();
        e.cap_step_tokens(Some(1));
        e.inject_switch_fault(fault.map(|rank| SwitchFault {
            phase: SwitchPhase::Recompute,
            rank,
        }));
        // After two steps each sequence's KV holds its prompt and one sampled token.
        let kv_tokens: usize = reqs.iter().map(|r| r.input_ids.len() + 1).sum();
        match e.reconfigure(2, KvPolicy::Recompute, &cost(1e9, 1e3)) {
            Ok(r) => {
                assert!(fault.is_none());
                assert_eq!(r.kv_tokens, kv_tokens, "{r:?}");
                assert_eq!(
                    (r.n_recomputed, r.kv_recompute_passes),
                    (n, kv_tokens),
                    "{r:?}"
                );
            }
            Err(err) => {
                let err = err.to_string();
                let left: usize = err
                    .split("recomputing the KV of ")
                    .nth(1)
                    .and_then(|t| t.split(' ').next())
                    .and_then(|t| t.parse().ok())
                    .unwrap_or_else(|| panic!("{fault:?}: {err}"));
                assert!(
                    fault.is_some() && left >= 1 && left <= n,
                    "{fault:?}: {err}"
                );
                if fault == Some(3) {
                    assert!(left < n, "rank 3 failed the first pass: {err}");
                }
                e.inject_switch_fault(None);
                // The passes before the failure keep their KV; the rest is to prefill.
                assert_eq!(e.unprefilled(), left, "{fault:?}: {err}");
            }
        };
        assert_eq!(e.layout().tp, 2);
        while e.live() > 0 {
            let before = e.unprefilled();
            let r = e.step().unwrap();
            assert_eq!(
                r.prefill_tokens,
                usize::from(before > 0),
                "{fault:?}: step {}",
                r.step
            );
        }
        for (o, g) in e.outputs().iter().zip(&gold) {
            assert_eq!(o.output_ids, g.output_ids, "{fault:?}: prompt {}", o.index);
        }
    }
}

#[test]
fn a_recompute_fills_each_pass_taking_long_sequences_in_chunks() {
    // Under a cap of `c` tokens a pass takes, in request order, what fits of each sequence (the
    // rest of a long one waits for the next pass): every pass but the last is full, so the
    // passes are the recomputed tokens over the cap, rounded up, whatever the lengths' order.
    // Two replicas share a token cap; the tokens stay transformers' own.
    let model = "llama";
    let (max_new, gold) = golden(model);
    // The longest prompt second (the fixture's grow in length).
    let mut order: Vec<usize> = (0..gold.len()).collect();
    order.sort_by_key(|&i| gold[i].input_ids.len());
    let last = order.pop().unwrap();
    order.insert(1, last);
    let gold: Vec<_> = order.iter().map(|&i| gold[i].clone()).collect();
    let reqs = golden_requests(&gold, max_new);
    // After two steps each sequence holds its prompt and two tokens; the recompute feeds all
    // but the last.
    let total: usize = reqs.iter().map(|r| r.input_ids.len() + 1).sum();
    let longest = reqs.iter().map(|r| r.input_ids.len() + 1).max().unwrap();
    for (world, cap) in [(2, 5), (2, longest - 1), (4, 8), (4, total - 1), (2, total)] {
        let mut e = engine(&golden_dir(model), world, 1, Dtype::F32, 1024);
        e.add_requests(&reqs).unwrap();
        e.step().unwrap();
        e.step().unwrap();
        e.cap_step_tokens(Some(cap));
        let r = e
            .reconfigure(2, KvPolicy::Recompute, &cost(1e9, 1e3))
            .unwrap();
        assert_eq!(r.kv_tokens, total);
        assert_eq!(
            r.kv_recompute_passes,
            total.div_ceil(cap),
            "world {world}: {total} tokens, cap {cap}"
        );
        assert_eq!(e.unprefilled(), 0, "world {world} cap {cap}");
        e.run(|_| {}).unwrap();
        for (o, g) in e.outputs().iter().zip(&gold) {
            assert_eq!(
                o.output_ids, g.output_ids,
                "world {world} cap {cap}: prompt {}",
                o.index
            );
        }
    }
}

#[test]
fn switches_while_prompts_are_part_way_in_chunks_keep_the_tokens() {
    // A step cap of a few tokens leaves prompts part way in when the switches come: what their
    // KV holds moves (migrate) or is computed again up to where it was (recompute), and the rest
    // of each prompt follows in chunks under the new layout. A ladder of switches, and a failed
    // switch in every phase on every rank, lose nothing: the tokens stay transformers' own.
    for model in ["llama", "qwen3"] {
        let (max_new, gold) = golden(model);
        let reqs = golden_requests(&gold, max_new);
        let ends: Vec<usize> = reqs
            .iter()
            .scan(0, |t, r| {
                *t += r.input_ids.len();
                Some(*t)
            })
            .collect();
        // Two steps of `cap` tokens end inside a prompt.
        let cap = (3..8)
            .find(|c| !ends.contains(&(2 * c)) && ends[ends.len() - 1] > 4 * c)
            .unwrap_or_else(|| panic!("{model}: no cap ends inside a prompt: {ends:?}"));
        for policy in [KvPolicy::Migrate, KvPolicy::Recompute] {
            let at = format!("{model} {policy} cap {cap}");
            let mut e = engine(&golden_dir(model), 4, 1, Dtype::F32, 1024);
            e.cap_step_tokens(Some(cap));
            e.add_requests(&reqs).unwrap();
            e.step().unwrap();
            e.step().unwrap();
            let done = ends.iter().filter(|&&end| end <= 2 * cap).count();
            assert_eq!(e.unprefilled(), reqs.len() - done, "{at}");
            // The KV holds every prompt token fed so far, and the token each prompt fed whole
            // in the first step sampled (the second step decoded it; the token the second
            // step sampled is not in the KV yet).
            let first = ends.iter().filter(|&&end| end <= cap).count();
            let r = e.reconfigure(2, policy, &cost(1e9, 1e3)).unwrap();
            assert_eq!(r.kv_tokens, 2 * cap + first, "{at}: {r:?}");
            e.step().unwrap();
            e.reconfigure(4, policy, &cost(1e9, 1e3)).unwrap();
            e.step().unwrap();
            e.reconfigure(1, policy, &cost(1e9, 1e3)).unwrap();
            e.run(|_| {}).unwrap();
            for (o, g) in e.outputs().iter().zip(&gold) {
                assert_eq!(o.output_ids, g.output_ids, "{at}: prompt {}", o.index);
            }
        }
        failed_switch_loses_nothing(
            || {
                let mut e = engine(&golden_dir(model), 4, 1, Dtype::F32, 256);
                e.cap_step_tokens(Some(cap));
                e
            },
            &reqs,
            &gold,
            &cost(1e9, 1e3),
        );
    }
}

#[test]
fn prompts_waiting_for_the_step_cap_do_not_grow_short_pools() {
    // A switch left the pools short of their goal (as a full GPU would); prompts that wait only
    // for room in a step's cap on prompt tokens, with blocks to spare, leave the pools as they
    // are: a growth takes memory (on a GPU, from a trainer sharing it) only for want of blocks.
    let model = "llama";
    let (max_new, gold) = golden(model);
    let reqs = golden_requests(&gold, max_new);
    let mut e = engine(&golden_dir(model), 4, 1, Dtype::F32, 1024);
    e.add_requests(&reqs).unwrap();
    e.step().unwrap();
    e.cap_switch_pools(Some(64));
    let r = e
        .reconfigure(2, KvPolicy::Migrate, &cost(1e9, 1e3))
        .unwrap();
    assert!(r.kv_blocks_per_rank_goal > 64, "{r:?}");
    e.cap_switch_pools(None);
    e.cap_step_tokens(Some(1));
    e.add_requests(&reqs).unwrap();
    while e.live() > 0 {
        let s = e.step().unwrap();
        assert!(s.pool_growth.is_none(), "step {}: {s:?}", s.step);
    }
    for (o, g) in e.outputs().iter().zip(gold.iter().chain(&gold)) {
        assert_eq!(o.output_ids, g.output_ids, "prompt {}", o.index);
    }
}
