//! Chunked prefill: a step prefills what fits its cap of each prompt (its memory, and the
//! caller's cap on prompt tokens), the rest in later steps, and samples a prompt only once its
//! last chunk is in; a switch's recompute runs in passes that fill the cap, chunking long
//! sequences; switches while prompts are part way in lose nothing. Tokens against the
//! transformers goldens, counts against independent sums of the prompts' lengths.

mod common;

use common::*;
use pat::engine::{SwitchFault, SwitchPhase};
use pat::reshard::cost::KvPolicy;
use pat::Dtype;

#[test]
fn a_step_token_cap_prefills_the_queue_in_chunks_with_the_same_tokens() {
    // A host that cannot hold every prompt's activations at once (on the CPU the cap is what half
    // the available memory holds): each step prefills at most the cap's tokens, a prompt longer
    // than what is left in chunks over several steps (at least one token a step), and a prompt
    // samples once its last chunk is in. With a token cap (the decodes are not counted) a step
    // prefills exactly the cap's tokens while prompts are left, and the prompts complete in
    // request order. The tokens stay transformers' own.
    let (max_new, gold) = golden("llama");
    let reqs = golden_requests(&gold, max_new);
    let n = reqs.len();
    assert!(n >= 3, "the fixture has {n} prompts");
    let lens: Vec<usize> = reqs.iter().map(|r| r.input_ids.len()).collect();
    let total: usize = lens.iter().sum();
    // Where each prompt's last token falls in the queue's tokens.
    let ends = prompt_ends(&reqs);
    assert!(
        lens.iter().any(|&l| l > 7),
        "a prompt longer than a cap of 7: {lens:?}"
    );
    for (world, tp, cap) in [
        (1, 1, None),
        (1, 1, Some(1)),
        (2, 1, Some(1)),
        (2, 2, Some(7)),
        (1, 1, Some(7)),
        (1, 1, Some(0)),
    ] {
        let at = format!("world {world} tp {tp} cap {cap:?}");
        let mut e = engine(&golden_dir("llama"), world, tp, Dtype::F32, 64);
        e.cap_step_tokens(cap);
        e.add_requests(&reqs).unwrap();
        assert_eq!(e.unprefilled(), n, "{at}");
        let mut fed = 0;
        while e.live() > 0 {
            let r = e.step().unwrap();
            let want = match cap {
                None => total - fed,
                Some(c) => (total - fed).min(c.max(1)),
            };
            assert_eq!(r.prefill_tokens, want, "{at} step {}", r.step);
            fed += r.prefill_tokens;
            let done = ends.iter().filter(|&&end| end <= fed).count();
            assert_eq!(e.unprefilled(), n - done, "{at} step {}", r.step);
            // What the policy is told: a prompt part way in holds the KV of the tokens fed so
            // far (none while it waits), one decoding all but its last sampled token.
            for s in e.live_seqs() {
                let (end, len) = (ends[s.index], lens[s.index]);
                let fed_here = fed.saturating_sub(end - len).min(len);
                let want = if fed_here < len {
                    (len, fed_here)
                } else {
                    (s.context, s.context - 1)
                };
                assert_eq!(
                    (s.context, s.kv),
                    want,
                    "{at} step {} seq {}",
                    r.step,
                    s.index
                );
            }
            assert!(r.tokens_out <= r.live_per_replica.iter().sum(), "{at}");
        }
        assert_eq!(fed, total, "{at}");
        assert_eq!(e.outputs().len(), gold.len(), "{at}");
        for (o, g) in e.outputs().iter().zip(&gold) {
            assert_eq!(o.output_ids, g.output_ids, "{at}: prompt {}", o.index);
        }
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
        let ends = prompt_ends(&reqs);
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
