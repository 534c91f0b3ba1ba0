//! Inputs the `ffi_plans` fuzz target found (fuzz/seeds/ffi_plans/), replayed as plain calls: each
//! used to abort the process (an allocation sized from the caller's dims before they were
//! checked) or overflow a byte count; each is now a clean `PAT_ERR_INVALID_ARGUMENT`.

use std::ptr::{null, null_mut};

use pat_ffi::kv_plan::*;
use pat_ffi::layout::*;
use pat_ffi::model::*;
use pat_ffi::weight_plan::*;
use pat_ffi::*;

use super::expect;

fn dims(kv: u32, heads: u32, head_dim: u32) -> pat_model_dims {
    pat_model_dims {
        struct_size: size_of::<pat_model_dims>() as u32,
        arch: PAT_ARCH_LLAMA,
        num_layers: 2,
        hidden_size: 16,
        intermediate_size: 32,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        vocab_size: 64,
        tie_word_embeddings: 0,
    }
}

fn layout(world: u32, tp: u32) -> pat_layout {
    pat_layout {
        world,
        tp,
        placement: null(),
    }
}

#[test]
fn kv_heads_near_2_pow_30_are_refused_before_any_allocation() {
    // The crash: 2^30 kv heads passed config_of's 1 ..= 2^30 check, and pat_kv_plan_new reserved
    // n_seqs * num_kv_heads pieces (31 GB) up front: "memory allocation failed", abort.
    let table = [0u32, 1, 2];
    let seqs = [pat_seq_kv {
        old_replica: 0,
        new_replica: 0,
        len: 3,
        old_table: table.as_ptr(),
        old_table_len: 3,
        new_table: table.as_ptr(),
        new_table_len: 3,
    }];
    let d = dims(1 << 30, 1 << 30, 2);
    let mut plan = null_mut();
    // SAFETY: local, readable arguments; `plan` is writable.
    let st = unsafe {
        pat_kv_plan_new(
            &d,
            &layout(1, 1),
            &layout(1, 1),
            1,
            seqs.as_ptr(),
            1,
            2,
            &mut plan,
        )
    };
    expect(st, PAT_ERR_INVALID_ARGUMENT, "larger than pat supports");
    assert!(plan.is_null());
    let mut wp = null_mut();
    // SAFETY: as above.
    let st = unsafe { pat_weight_plan_new(&d, &layout(2, 1), &layout(2, 2), 2, &mut wp) };
    expect(st, PAT_ERR_INVALID_ARGUMENT, "larger than pat supports");
}

#[test]
fn byte_counts_that_overflow_u64_are_errors() {
    // A sequence of 2^40 tokens in blocks of 2^32 - 1 tokens (257 blocks): one piece is 2 * 2^12
    // layers * 2^40 tokens * 2^12 head_dim * 8 bytes = 2^68, past u64.
    let table: Vec<u32> = (0..300).collect();
    let seqs = [pat_seq_kv {
        old_replica: 0,
        new_replica: 0,
        len: 1 << 40,
        old_table: table.as_ptr(),
        old_table_len: table.len(),
        new_table: table.as_ptr(),
        new_table_len: table.len(),
    }];
    let d = pat_model_dims {
        num_layers: 4096,
        ..dims(4, 8, 4096)
    };
    for (eb, needle) in [(u32::MAX, "elem_bytes"), (8, "more bytes than a u64")] {
        let mut plan = null_mut();
        // SAFETY: local, readable arguments; `plan` is writable.
        let st = unsafe {
            pat_kv_plan_new(
                &d,
                &layout(2, 1),
                &layout(2, 2),
                u32::MAX,
                seqs.as_ptr(),
                1,
                eb,
                &mut plan,
            )
        };
        expect(st, PAT_ERR_INVALID_ARGUMENT, needle);
    }
    let mut wp = null_mut();
    // SAFETY: as above.
    let st = unsafe { pat_weight_plan_new(&d, &layout(2, 1), &layout(2, 2), u32::MAX, &mut wp) };
    expect(st, PAT_ERR_INVALID_ARGUMENT, "elem_bytes");
}

#[test]
fn worlds_past_the_bound_are_refused() {
    let mut n = 0usize;
    // SAFETY: a local layout without placement; NULL buffer with cap 0; `n` is writable.
    let st = unsafe { pat_layout_nested(&layout(1 << 20, 1), 2, null_mut(), 0, &mut n) };
    expect(st, PAT_ERR_INVALID_ARGUMENT, "more ranks than pat supports");
}
