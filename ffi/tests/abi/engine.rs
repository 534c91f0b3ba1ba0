//! The engine through the C ABI: greedy tokens on 2 ranks with a live switch equal transformers'
//! (the fixture's golden.json), outputs taken once each, the live list, KV exhaustion.

use std::ptr::null_mut;

use pat_ffi::engine::*;
use pat_ffi::*;

use super::{expect, golden, open_llama};

fn engine(
    world: u32,
    tp: u32,
    kv_blocks: u32,
) -> (*mut pat_ffi::model::pat_model, *mut pat_engine) {
    let m = open_llama();
    let mut p = pat_engine_default_params();
    (p.world, p.tp, p.kv_blocks) = (world, tp, kv_blocks);
    let mut e = null_mut();
    // SAFETY: a live model, local params and out pointer.
    expect(unsafe { pat_engine_new(m, &p, &mut e) }, PAT_OK, "");
    (m, e)
}

#[test]
fn greedy_tokens_through_a_live_switch_match_transformers() {
    let (prompts, max_new) = golden();
    let (m, e) = engine(2, 1, 0);
    pat_ffi::model::pat_model_free(m); // the engine does not need the model any more
                                       // SAFETY: a live engine; every buffer is a local of the stated size.
    unsafe {
        for (i, (ids, _)) in prompts.iter().enumerate() {
            let mut index = u64::MAX;
            let st = pat_engine_add_request(e, ids.as_ptr(), ids.len(), max_new, 1, &mut index);
            expect(st, PAT_OK, "");
            assert_eq!(index, i as u64);
        }
        let (mut out, mut n) = (pat_output::default(), 0usize);
        expect(
            pat_engine_take_output(e, &mut out, null_mut(), 0, &mut n),
            PAT_NO_OUTPUT,
            "no finished request",
        );
        // Step 0 feeds every prompt whole (no cap) and samples each once; then decodes.
        let fed: usize = prompts.iter().map(|(ids, _)| ids.len()).sum();
        let n_req = prompts.len() as u64;
        for step in 0..3 {
            let mut r = pat_step_report::default();
            expect(pat_engine_step(e, &mut r), PAT_OK, "");
            let want = if step == 0 { fed as u64 } else { 0 };
            assert_eq!(
                (
                    r.step,
                    r.prefill_tokens,
                    r.tokens_in - r.prefill_tokens,
                    r.tokens_out
                ),
                (step, want, if step == 0 { 0 } else { n_req }, n_req),
                "step {step}"
            );
        }
        let mut live = vec![pat_live_seq::default(); 8];
        expect(
            pat_engine_live(e, live.as_mut_ptr(), live.len(), &mut n),
            PAT_OK,
            "",
        );
        assert_eq!(n, prompts.len());
        assert!(live[..n]
            .iter()
            .all(|s| s.generated == 3 && s.est_remaining.is_nan()));
        // Each holds the KV of its prompt and of all but its last sampled token.
        for (s, (ids, _)) in live[..n].iter().zip(&prompts) {
            assert_eq!(
                (s.context, s.kv_tokens),
                ((ids.len() + 3) as u64, (ids.len() + 2) as u64)
            );
        }

        let mut sp = pat_switch_default_params();
        sp.new_tp = 2;
        let mut rep = pat_switch_report::default();
        expect(pat_engine_reconfigure(e, &sp, &mut rep), PAT_OK, "");
        assert_eq!(
            (rep.from_tp, rep.to_tp, rep.n_inflight),
            (1, 2, prompts.len() as u64)
        );
        assert_eq!(rep.weight_bytes_cross_rank, 0, "growing tp: shards nest");
        assert_eq!(rep.n_migrated, prompts.len() as u64);
        let mut info = pat_engine_info::default();
        expect(pat_engine_get_info(e, &mut info), PAT_OK, "");
        assert_eq!((info.world, info.tp, info.dp, info.n_steps), (2, 2, 1, 3));
        assert_eq!(info.kv_blocks, rep.kv_blocks_after);
        // Host pools get the whole goal at the switch: nothing is left to grow.
        assert_eq!(rep.kv_blocks_goal, rep.kv_blocks_after);
        let mut g = pat_pool_growth {
            tried: 7,
            ..Default::default()
        };
        expect(pat_engine_grow_kv_pools(e, &mut g), PAT_OK, "");
        assert_eq!((g.tried, g.reached_goal), (0, 1), "{g:?}");
        assert_eq!(
            (g.from_blocks, g.to_blocks, g.goal_blocks),
            (info.kv_blocks, info.kv_blocks, info.kv_blocks)
        );
        expect(pat_engine_grow_kv_pools(e, null_mut()), PAT_ERR_NULL, "out");

        let mut report = pat_step_report::default();
        while info.n_live > 0 {
            expect(pat_engine_step(e, &mut report), PAT_OK, "");
            expect(pat_engine_get_info(e, &mut info), PAT_OK, "");
        }
        assert_eq!(report.step + 1, max_new as u64);
        for (i, (_, want)) in prompts.iter().enumerate() {
            let mut need = 0usize;
            expect(
                pat_engine_take_output(e, &mut out, null_mut(), 0, &mut need),
                PAT_BUFFER_TOO_SMALL,
                "needed",
            );
            assert_eq!(need, want.len());
            let mut ids = vec![0u32; need];
            expect(
                pat_engine_take_output(e, &mut out, ids.as_mut_ptr(), ids.len(), &mut n),
                PAT_OK,
                "",
            );
            assert_eq!(
                (out.index, out.finish_reason),
                (i as u64, PAT_FINISH_LENGTH)
            );
            assert_eq!(&ids, want, "request {i}");
        }
        expect(
            pat_engine_take_output(e, &mut out, null_mut(), 0, &mut n),
            PAT_NO_OUTPUT,
            "",
        );
    }
    pat_engine_free(e);
}

#[test]
fn exhausted_kv_is_a_retry_code_and_requests_that_fit_alone_queue() {
    // 2 blocks of 16 tokens per rank: a 40-token request cannot be admitted at all; two requests
    // of 17 + 8 tokens (2 blocks each) fit one at a time, so the scheduler runs them in turn.
    let (m, e) = engine(1, 1, 2);
    // SAFETY: a live engine; buffers are locals.
    unsafe {
        let long: Vec<u32> = (3..43).collect();
        expect(
            pat_engine_add_request(e, long.as_ptr(), long.len(), 4, 1, null_mut()),
            PAT_RESOURCE_EXHAUSTED,
            "raise `kv_blocks`",
        );
        let bad = [3u32, 301];
        expect(
            pat_engine_add_request(e, bad.as_ptr(), bad.len(), 4, 1, null_mut()),
            PAT_ERR_INVALID_ARGUMENT,
            "out of range",
        );
        let ids: Vec<u32> = (3..20).collect();
        for want in [0u64, 1] {
            let mut index = u64::MAX;
            let st = pat_engine_add_request(e, ids.as_ptr(), ids.len(), 8, 1, &mut index);
            expect(st, PAT_OK, "");
            assert_eq!(index, want, "refused requests take no index");
        }
        let mut info = pat_engine_info::default();
        for _ in 0..100 {
            expect(pat_engine_step(e, null_mut()), PAT_OK, "");
            expect(pat_engine_get_info(e, &mut info), PAT_OK, "");
            if info.n_live == 0 {
                break;
            }
        }
        // 8 steps each (the prefill gives the first token), one after the other: 16, not 8.
        assert_eq!((info.n_live, info.n_steps), (0, 16), "both ran, in turn");
    }
    pat_engine_free(e);
    pat_ffi::model::pat_model_free(m);
}

#[test]
fn shrinking_with_recompute_keeps_the_golden_tokens() {
    let (prompts, max_new) = golden();
    let (m, e) = engine(2, 2, 0);
    pat_ffi::model::pat_model_free(m);
    // SAFETY: a live engine; every buffer is a local of the stated size.
    unsafe {
        for (ids, _) in &prompts {
            let st = pat_engine_add_request(e, ids.as_ptr(), ids.len(), max_new, 1, null_mut());
            expect(st, PAT_OK, "");
        }
        for _ in 0..5 {
            expect(pat_engine_step(e, null_mut()), PAT_OK, "");
        }
        let (tps, rates) = ([1u32, 2], [1e4f64, 2e4]);
        let mut sp = pat_switch_default_params();
        (sp.new_tp, sp.kv_policy) = (1, PAT_KV_RECOMPUTE);
        (sp.prefill_tp, sp.prefill_tokens_per_s, sp.n_prefill) = (tps.as_ptr(), rates.as_ptr(), 2);
        let mut rep = pat_switch_report::default();
        expect(pat_engine_reconfigure(e, &sp, &mut rep), PAT_OK, "");
        assert_eq!((rep.from_tp, rep.to_tp), (2, 1));
        assert_eq!(
            (rep.n_recomputed, rep.n_migrated),
            (prompts.len() as u64, 0)
        );
        assert!(rep.predicted_recompute_ms.is_finite() && rep.weight_bytes_cross_rank > 0);
        // The fixture's few short prompts fit one pass of any host's cap.
        assert_eq!(rep.kv_recompute_passes, 1);
        sp.prefill_tokens_per_s = std::ptr::null();
        expect(
            pat_engine_reconfigure(e, &sp, &mut rep),
            PAT_ERR_NULL,
            "prefill_tokens_per_s",
        );
        let mut info = pat_engine_info::default();
        expect(pat_engine_get_info(e, &mut info), PAT_OK, "");
        while info.n_live > 0 {
            expect(pat_engine_step(e, null_mut()), PAT_OK, "");
            expect(pat_engine_get_info(e, &mut info), PAT_OK, "");
        }
        for (_, want) in &prompts {
            let (mut out, mut n) = (pat_output::default(), 0usize);
            let mut ids = vec![0u32; want.len()];
            expect(
                pat_engine_take_output(e, &mut out, ids.as_mut_ptr(), ids.len(), &mut n),
                PAT_OK,
                "",
            );
            assert_eq!(&ids, want, "request {}", out.index);
        }
    }
    pat_engine_free(e);
}
