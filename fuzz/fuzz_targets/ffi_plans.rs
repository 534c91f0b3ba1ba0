//! The C ABI's planners on arbitrary dims, layouts (any world and tp, placements NULL or
//! arbitrary) and sequences: `pat_layout_nested`, `pat_weight_plan_new`, `pat_kv_plan_new`, and
//! every query on the plans they return (with buffers too small, exact and NULL). Every call
//! returns a status (never a caught panic or an internal error).
#![no_main]

use std::ptr::{null, null_mut};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pat_ffi::kv_plan::*;
use pat_ffi::layout::*;
use pat_ffi::model::*;
use pat_ffi::weight_plan::*;
use pat_ffi::*;

#[derive(Arbitrary, Debug)]
struct L {
    world: u32,
    tp: u32,
    placement: Option<Vec<u32>>,
    small: bool,
}

#[derive(Arbitrary, Debug)]
struct Seq {
    old_replica: u32,
    new_replica: u32,
    len: u64,
    old_table: Vec<u32>,
    new_table: Vec<u32>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    dims: [u32; 9],
    small_dims: bool,
    old: L,
    new: L,
    nested: bool,
    elem_bytes: u32,
    block_size: u32,
    seqs: Vec<Seq>,
    query_rank: u32,
}

/// A C layout over `placement` (kept alive by the caller): NULL unless it holds `world` entries.
fn c_layout(l: &L, placement: &mut Vec<u32>) -> pat_layout {
    let (world, tp) = if l.small {
        (l.world % 17, l.tp % 17)
    } else {
        (l.world, l.tp)
    };
    let ptr = match &l.placement {
        Some(p) if world <= 64 => {
            *placement = (0..world as usize)
                .map(|i| p.get(i).copied().unwrap_or(i as u32))
                .collect();
            placement.as_ptr()
        }
        _ => null(),
    };
    pat_layout {
        world,
        tp,
        placement: ptr,
    }
}

fn ok(st: pat_status) {
    assert!(st != PAT_ERR_PANIC && st != PAT_ERR_INTERNAL, "status {st}");
}

fn dims(inp: &Input) -> pat_model_dims {
    let d = inp.dims;
    let f = |i: usize, m: u32| if inp.small_dims { 1 + d[i] % m } else { d[i] };
    let kv = f(4, 8);
    pat_model_dims {
        struct_size: size_of::<pat_model_dims>() as u32,
        arch: d[0] % 3,
        num_layers: f(1, 4),
        hidden_size: f(2, 16),
        intermediate_size: f(3, 64),
        num_kv_heads: kv,
        num_heads: if inp.small_dims {
            kv * (1 + d[5] % 4)
        } else {
            d[5]
        },
        head_dim: if inp.small_dims {
            2 * (1 + d[6] % 8)
        } else {
            d[6]
        },
        vocab_size: f(7, 300),
        tie_word_embeddings: d[8] & 1,
    }
}

fuzz_target!(|inp: Input| {
    let d = dims(&inp);
    let (mut po, mut pn) = (Vec::new(), Vec::new());
    let old = c_layout(&inp.old, &mut po);
    let mut new = c_layout(&inp.new, &mut pn);
    if inp.nested && old.world <= 64 {
        pn = vec![0; old.world as usize];
        let mut n = 0usize;
        // SAFETY: `old` is readable with a placement of `world` entries or NULL; `pn` holds
        // `world` writable entries.
        let st = unsafe { pat_layout_nested(&old, new.tp, pn.as_mut_ptr(), pn.len(), &mut n) };
        ok(st);
        new = pat_layout {
            world: old.world,
            tp: new.tp,
            placement: if st == PAT_OK { pn.as_ptr() } else { null() },
        };
    }
    let eb = inp.elem_bytes;

    let mut wp: *mut pat_weight_plan = null_mut();
    // SAFETY: all arguments are readable locals; `wp` is writable.
    let st = unsafe { pat_weight_plan_new(&d, &old, &new, eb, &mut wp) };
    ok(st);
    if st == PAT_OK {
        let mut info = pat_weight_plan_info::default();
        // SAFETY: a live plan; writable outputs.
        ok(unsafe { pat_weight_plan_get_info(wp, &mut info) });
        assert!(info.bytes_cross_rank >= info.min_cross_rank_bytes);
        let rank = inp.query_rank % (info.world + 1);
        let mut n = 0usize;
        // SAFETY: NULL buffer with cap 0 asks for the count.
        let st = unsafe { pat_weight_plan_steps(wp, rank, null_mut(), 0, &mut n) };
        ok(st);
        if st == PAT_BUFFER_TOO_SMALL || st == PAT_OK {
            let mut buf = vec![pat_weight_step::default(); n];
            // SAFETY: `buf` holds `n` entries.
            ok(unsafe { pat_weight_plan_steps(wp, rank, buf.as_mut_ptr(), buf.len(), &mut n) });
            let mut roles = vec![pat_weight_role::default(); 8];
            // SAFETY: `roles` holds 8 entries.
            ok(unsafe { pat_weight_plan_roles(wp, rank, roles.as_mut_ptr(), roles.len(), &mut n) });
            let mut rb = pat_rank_bytes::default();
            // SAFETY: writable output.
            ok(unsafe { pat_weight_plan_rank_bytes(wp, rank, &mut rb) });
        }
        pat_weight_plan_free(wp);
    }

    let bs = inp.block_size % 40;
    let tables: Vec<(Vec<u32>, Vec<u32>)> = inp
        .seqs
        .iter()
        .take(8)
        .map(|s| (s.old_table.clone(), s.new_table.clone()))
        .collect();
    let seqs: Vec<pat_seq_kv> = inp
        .seqs
        .iter()
        .zip(&tables)
        .map(|(s, (ot, nt))| pat_seq_kv {
            old_replica: s.old_replica % 5,
            new_replica: s.new_replica % 5,
            len: if s.len % 4 == 0 { s.len } else { s.len % 300 },
            old_table: ot.as_ptr(),
            old_table_len: ot.len(),
            new_table: nt.as_ptr(),
            new_table_len: nt.len(),
        })
        .collect();
    let mut kp: *mut pat_kv_plan = null_mut();
    // SAFETY: all arguments are readable locals whose arrays hold their counts.
    let st = unsafe { pat_kv_plan_new(&d, &old, &new, bs, seqs.as_ptr(), seqs.len(), eb, &mut kp) };
    ok(st);
    if st == PAT_OK {
        let mut info = pat_kv_plan_info::default();
        // SAFETY: a live plan; writable output.
        ok(unsafe { pat_kv_plan_get_info(kp, &mut info) });
        let mut n = 0usize;
        // SAFETY: NULL with cap 0 asks for the count.
        let st = unsafe { pat_kv_plan_pieces(kp, null_mut(), 0, &mut n) };
        ok(st);
        assert_eq!(n as u64, info.n_pieces);
        let mut pieces = vec![pat_kv_piece::default(); n];
        // SAFETY: `pieces` holds `n` entries.
        ok(unsafe { pat_kv_plan_pieces(kp, pieces.as_mut_ptr(), n, &mut n) });
        let rank = inp.query_rank % (info.world + 1);
        let mut buf = vec![pat_kv_step::default(); 4];
        // SAFETY: `buf` holds 4 entries.
        ok(unsafe { pat_kv_plan_steps(kp, rank, buf.as_mut_ptr(), buf.len(), &mut n) });
        let mut rb = pat_rank_bytes::default();
        // SAFETY: writable output.
        ok(unsafe { pat_kv_plan_rank_bytes(kp, rank, &mut rb) });
        pat_kv_plan_free(kp);
    }
});
