//! The engine through the ABI with test hooks the C API does not expose.

use super::*;
use std::ptr::null_mut;

/// An engine of `world` CPU ranks at tp 1 on the llama fixture, `kv_blocks` blocks per rank.
fn llama_engine(world: u32, kv_blocks: u32) -> *mut pat_engine {
    let dir = std::ffi::CString::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/golden/llama"
    ))
    .unwrap();
    let (mut m, mut e) = (null_mut(), null_mut());
    // SAFETY: a NUL-terminated path, local params and out pointers.
    unsafe {
        assert_eq!(crate::model::pat_model_open(dir.as_ptr(), &mut m), 0);
        let mut p = pat_engine_default_params();
        (p.world, p.tp, p.kv_blocks) = (world, 1, kv_blocks);
        assert_eq!(pat_engine_new(m, &p, &mut e), 0);
        crate::model::pat_model_free(m);
    }
    e
}

/// The step cap through the ABI is the engine's own: on CPU ranks the host's share read at
/// load, whatever cap on prompt tokens is set; a NULL out pointer is refused (`PAT_ERR_NULL`).
#[test]
fn the_step_cap_reads_through_the_abi() {
    let e = llama_engine(1, 16);
    let mut cap = 0u64;
    // SAFETY: a live engine and a local out pointer.
    unsafe {
        assert_eq!(pat_engine_refresh_step_cap(e, &mut cap), 0);
        let own = with_engine(e, |s| Ok(s.engine.step_cap_bytes())).unwrap();
        assert_eq!(Some(cap), own);
        assert!(cap > 0 && cap < u64::MAX, "cap {cap}");
        assert_eq!(pat_engine_cap_step_tokens(e, 3), 0);
        let mut again = 0u64;
        assert_eq!(pat_engine_refresh_step_cap(e, &mut again), 0);
        assert_eq!(again, cap);
        let st = pat_engine_refresh_step_cap(e, null_mut());
        assert_eq!(st, crate::status::PAT_ERR_NULL);
    }
    pat_engine_free(e);
}

/// A cap on a step's prompt tokens through the ABI: a prompt of 7 tokens under a cap of 3 is
/// fed 3 a step, sampling nothing until its last chunk (the report's `prefill_tokens`: 3, 3,
/// 1); 0 lifts the cap (the engine's own setting, read apart from the ABI); the tokens are
/// those of an uncapped run.
#[test]
fn a_step_token_cap_through_the_abi_feeds_a_prompt_in_chunks() {
    let ids: Vec<u32> = (1..=7).map(|i| i * 11).collect();
    let run = |cap: u64| -> (Vec<(u64, u64, u64)>, Vec<u32>) {
        let e = llama_engine(1, 16);
        let mut steps = Vec::new();
        let mut out = vec![0u32; 8];
        // SAFETY: a live engine until freed below; local buffers and out pointers.
        unsafe {
            assert_eq!(pat_engine_cap_step_tokens(e, cap), 0);
            let got = with_engine(e, |s| Ok(s.engine.step_prefill_tokens())).unwrap();
            assert_eq!(got, (cap > 0).then_some(cap as usize));
            let st = pat_engine_add_request(e, ids.as_ptr(), ids.len(), 3, 1, null_mut());
            assert_eq!(st, 0);
            let mut r = pat_step_report::default();
            let mut info = pat_engine_info::default();
            loop {
                assert_eq!(pat_engine_step(e, &mut r), 0);
                steps.push((r.tokens_in, r.prefill_tokens, r.tokens_out));
                assert_eq!(pat_engine_get_info(e, &mut info), 0);
                if info.n_live == 0 {
                    break;
                }
            }
            let mut rec = pat_output::default();
            let mut n = 0usize;
            let st = pat_engine_take_output(e, &mut rec, out.as_mut_ptr(), out.len(), &mut n);
            assert_eq!(st, 0);
            out.truncate(n);
        }
        pat_engine_free(e);
        (steps, out)
    };
    let (chunked, tokens) = run(3);
    assert_eq!(
        chunked,
        [(3, 3, 0), (3, 3, 0), (1, 1, 1), (1, 0, 1), (1, 0, 1)]
    );
    let (whole, uncapped) = run(0);
    assert_eq!(whole, [(7, 7, 1), (1, 0, 1), (1, 0, 1)]);
    assert_eq!(tokens, uncapped);
    assert_eq!(tokens.len(), 3);
}

/// A switch whose new pools are held short (a test's cap, as a full GPU would) reports the
/// goal above the blocks it gave; `pat_engine_grow_kv_pools` then grows them to that goal
/// (the engine's own count, independent of the ABI's copy), and a second call has nothing
/// to grow.
#[test]
fn pools_a_switch_left_short_grow_through_the_abi() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/golden/llama/golden.json"
    ))
    .unwrap();
    let gold: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<u32> = gold["prompts"][0]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let e = llama_engine(2, 64);
    // SAFETY: local params and out pointers; the engine is live until freed at the end.
    unsafe {
        let st = pat_engine_add_request(e, ids.as_ptr(), ids.len(), 4, 1, null_mut());
        assert_eq!(st, 0);
        assert_eq!(pat_engine_step(e, null_mut()), 0);
        with_engine(e, |s| {
            s.engine.cap_switch_pools(Some(8));
            Ok(())
        })
        .unwrap();
        let mut sp = pat_switch_default_params();
        sp.new_tp = 2;
        let mut rep = pat_switch_report::default();
        assert_eq!(pat_engine_reconfigure(e, &sp, &mut rep), 0);
        assert_eq!(rep.kv_blocks_after, 8);
        assert!(rep.kv_blocks_goal > 8, "{rep:?}");
        with_engine(e, |s| {
            s.engine.cap_switch_pools(None);
            Ok(())
        })
        .unwrap();
        let mut g = pat_pool_growth::default();
        assert_eq!(pat_engine_grow_kv_pools(e, &mut g), 0);
        assert_eq!((g.tried, g.reached_goal), (1, 1), "{g:?}");
        assert_eq!(
            (g.from_blocks, g.to_blocks, g.goal_blocks),
            (8, rep.kv_blocks_goal, rep.kv_blocks_goal)
        );
        let mut info = pat_engine_info::default();
        assert_eq!(pat_engine_get_info(e, &mut info), 0);
        assert_eq!(info.kv_blocks, rep.kv_blocks_goal);
        assert_eq!(pat_engine_grow_kv_pools(e, &mut g), 0);
        assert_eq!((g.tried, g.to_blocks), (0, rep.kv_blocks_goal), "{g:?}");
        // The request goes on in the grown pools.
        while pat_engine_step(e, null_mut()) == 0 {
            assert_eq!(pat_engine_get_info(e, &mut info), 0);
            if info.n_live == 0 {
                break;
            }
        }
        assert_eq!(info.n_live, 0);
    }
    pat_engine_free(e);
}
