//! The C ABI's text-taking entry points: `pat_model_dims_from_config_json` on arbitrary bytes,
//! and `pat_policy_decide` and `pat_policy_plan_start` on arbitrary profile JSON, params and live
//! sequences. Every call returns a status (never a caught panic or an internal error), and writes
//! its output only on success.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pat_ffi::engine::pat_live_seq;
use pat_ffi::model::*;
use pat_ffi::policy::*;
use pat_ffi::*;

#[derive(Arbitrary, Debug)]
struct Live {
    replica: u32,
    context: u64,
    kv_tokens: u64,
    generated: u64,
    est_remaining: f64,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// 0: config text; otherwise profile text for the policy.
    which: bool,
    text: Vec<u8>,
    world: u32,
    current_tp: u32,
    lookahead_steps: u8,
    margin: f64,
    min_gain_ms: f64,
    candidates: Option<Vec<u32>>,
    length_samples: Vec<u64>,
    length_cap: u64,
    live: Vec<Live>,
    /// Entries of the start plan's switch buffer.
    cap: u8,
}

fn ok(st: pat_status) {
    assert!(st != PAT_ERR_PANIC && st != PAT_ERR_INTERNAL, "status {st}");
}

fuzz_target!(|inp: Input| {
    if !inp.which {
        let mut d = pat_model_dims::default();
        // SAFETY: `text` holds `len` bytes; `d` is writable.
        let st = unsafe {
            pat_model_dims_from_config_json(inp.text.as_ptr().cast(), inp.text.len(), &mut d)
        };
        ok(st);
        if st == PAT_OK {
            assert!(d.num_heads >= 1 && d.num_kv_heads >= 1 && d.num_heads % d.num_kv_heads == 0);
        } else {
            assert_eq!(d, pat_model_dims::default(), "output written on failure");
        }
        return;
    }
    let mut p = pat_policy_default_params();
    p.world = inp.world;
    p.current_tp = inp.current_tp % 65;
    p.lookahead_steps = inp.lookahead_steps as u32;
    p.margin = inp.margin;
    p.min_gain_ms = inp.min_gain_ms;
    if let Some(c) = &inp.candidates {
        p.candidates = c.as_ptr();
        p.n_candidates = c.len();
    }
    p.length_samples = inp.length_samples.as_ptr();
    p.n_length_samples = inp.length_samples.len();
    p.length_cap = inp.length_cap;
    let live: Vec<pat_live_seq> = inp
        .live
        .iter()
        .take(64)
        .enumerate()
        .map(|(i, l)| pat_live_seq {
            index: i as u64,
            replica: l.replica % 9,
            reserved: 0,
            context: l.context,
            // Mostly a valid count (at most the context), sometimes any value (refused).
            kv_tokens: if l.kv_tokens & 1 == 0 {
                l.kv_tokens % l.context.saturating_add(1)
            } else {
                l.kv_tokens
            },
            generated: l.generated,
            max_new_tokens: 0,
            est_remaining: l.est_remaining,
        })
        .collect();
    let mut out = pat_decision::default();
    // SAFETY: every array holds its count; `out` is writable.
    let st = unsafe {
        pat_policy_decide(
            inp.text.as_ptr().cast(),
            inp.text.len(),
            &p,
            live.as_ptr(),
            live.len(),
            &mut out,
        )
    };
    ok(st);
    let cap = inp.cap as usize % 8;
    let mut plan = pat_start_plan {
        start_tp: u32::MAX,
        ..Default::default()
    };
    let mut steps = vec![pat_plan_switch::default(); cap];
    let mut n = usize::MAX;
    // SAFETY: every array holds its count; `steps` holds `cap`; `plan` and `n` are writable.
    let st = unsafe {
        pat_policy_plan_start(
            inp.text.as_ptr().cast(),
            inp.text.len(),
            &p,
            live.as_ptr(),
            live.len(),
            &mut plan,
            steps.as_mut_ptr(),
            cap,
            &mut n,
        )
    };
    ok(st);
    if st == PAT_OK {
        assert!(plan.start_tp >= 1 && plan.n_switches as usize == n && n <= cap);
        assert!(plan.predicted_ms <= plan.predicted_stay_ms);
    } else {
        assert_eq!(plan.start_tp, u32::MAX, "output written on failure");
    }
});
