//! Plans as flat data, executed here as a foreign engine would (plain buffers, FIFO messages
//! between ranks, the header's execution order), checked bitwise: weights against the shards pat
//! loads for the new layout, KV against the values written before the migration.

// Index loops over ranks, layers and K/V read like the header's description.
#![allow(clippy::needless_range_loop, clippy::type_complexity)]

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::ptr::{null, null_mut};

use pat_ffi::kv_plan::*;
use pat_ffi::layout::*;
use pat_ffi::model::*;
use pat_ffi::weight_plan::*;
use pat_ffi::*;

use super::{expect, LLAMA};

/// A layout: world, tp and its placement (row-major [replica][tp_rank]).
#[derive(Clone, Debug)]
struct L {
    world: u32,
    tp: u32,
    placement: Vec<u32>,
}

impl L {
    fn contiguous(world: u32, tp: u32) -> L {
        L {
            world,
            tp,
            placement: (0..world).collect(),
        }
    }
    fn nested(&self, new_tp: u32) -> L {
        let mut p = vec![0u32; self.world as usize];
        let mut n = 0;
        // SAFETY: a local layout whose placement holds `world` entries; `p` holds `world`.
        let st = unsafe { pat_layout_nested(&self.c(), new_tp, p.as_mut_ptr(), p.len(), &mut n) };
        expect(st, PAT_OK, "");
        L {
            world: self.world,
            tp: new_tp,
            placement: p,
        }
    }
    fn c(&self) -> pat_layout {
        pat_layout {
            world: self.world,
            tp: self.tp,
            placement: self.placement.as_ptr(),
        }
    }
    /// (replica, tp_rank) of physical rank `p`.
    fn position(&self, p: u32) -> (u32, u32) {
        let i = self.placement.iter().position(|&r| r == p).unwrap() as u32;
        (i / self.tp, i % self.tp)
    }
}

fn get<T: Default + Clone>(f: impl Fn(*mut T, usize, *mut usize) -> pat_status) -> Vec<T> {
    let mut n = 0;
    let st = f(null_mut(), 0, &mut n);
    assert!(st == PAT_OK || st == PAT_BUFFER_TOO_SMALL, "{st}");
    let mut v = vec![T::default(); n];
    expect(f(v.as_mut_ptr(), n, &mut n), PAT_OK, "");
    v
}

fn shard(m: *const pat_model, role: u32, layer: u32, tp: u32, r: u32) -> Vec<f32> {
    get(|b, c, n| {
        // SAFETY: a live model; `get` passes a buffer of `c` entries (or NULL, 0).
        unsafe { pat_model_load_shard(m, role, layer, tp, r, b, c, n) }
    })
}

/// Executes a weight plan from `old` to `new` on shards of `dir`'s model and checks every
/// rebuilt buffer bitwise against a fresh load of the new layout. Returns (cross, min) bytes.
fn reshard_weights(dir: &str, old: &L, new: &L) -> (u64, u64) {
    let path = CString::new(dir).unwrap();
    let (mut m, mut plan) = (null_mut(), null_mut());
    let mut dims = pat_model_dims::default();
    let mut info = pat_weight_plan_info::default();
    // SAFETY: locals and live handles.
    unsafe {
        expect(pat_model_open(path.as_ptr(), &mut m), PAT_OK, "");
        expect(pat_model_get_dims(m, &mut dims), PAT_OK, "");
        expect(
            pat_weight_plan_new(&dims, &old.c(), &new.c(), 4, &mut plan),
            PAT_OK,
            "",
        );
        expect(pat_weight_plan_get_info(plan, &mut info), PAT_OK, "");
    }
    let (world, h) = (old.world, dims.hidden_size as usize);
    let roles: Vec<Vec<pat_weight_role>> = (0..world)
        .map(|p| {
            get(|b, c, n| {
                // SAFETY: a live plan; `get` passes a buffer of `c` entries (or NULL, 0).
                unsafe { pat_weight_plan_roles(plan, p, b, c, n) }
            })
        })
        .collect();
    let steps: Vec<Vec<pat_weight_step>> = (0..world)
        .map(|p| {
            get(|b, c, n| {
                // SAFETY: a live plan; `get` passes a buffer of `c` entries (or NULL, 0).
                unsafe { pat_weight_plan_steps(plan, p, b, c, n) }
            })
        })
        .collect();
    let mut received = 0u64;
    for ri in 0..info.n_roles as usize {
        let role = roles[0][ri].role;
        for layer in 0..roles[0][ri].repeats {
            let old_bufs: Vec<Vec<f32>> = (0..world)
                .map(|p| shard(m, role, layer, old.tp, old.position(p).1))
                .collect();
            // Phase 1: every rank's sends, then every rank's receives (FIFO per pair).
            let mut wire: HashMap<(u32, u32), VecDeque<Vec<f32>>> = HashMap::new();
            let mine = |p: usize| {
                let r = roles[p][ri];
                assert_eq!(r.role, role);
                &steps[p][r.first_step as usize..(r.first_step + r.n_steps) as usize]
            };
            for p in 0..world {
                for s in mine(p as usize).iter().filter(|s| s.kind == PAT_STEP_SEND) {
                    let (a, n) = (s.src_row as usize * h, s.rows as usize * h);
                    wire.entry((p, s.peer))
                        .or_default()
                        .push_back(old_bufs[p as usize][a..a + n].to_vec());
                }
            }
            for p in 0..world {
                let r = roles[p as usize][ri];
                let mut staged = Vec::new();
                for s in mine(p as usize).iter().filter(|s| s.kind == PAT_STEP_RECV) {
                    let msg = wire.get_mut(&(s.peer, p)).unwrap().pop_front().unwrap();
                    assert_eq!(msg.len(), s.rows as usize * h);
                    received += msg.len() as u64 * 4;
                    staged.push((s.dst_row as usize * h, msg));
                }
                // Phase 2, after every exchange: moves in order, then received rows and zeros.
                let (old_b, new_len) = (&old_bufs[p as usize], r.new_rows as usize * h);
                let mut buf = if r.in_place {
                    old_b.clone()
                } else {
                    vec![f32::NAN; new_len]
                };
                for s in mine(p as usize).iter().filter(|s| s.kind == PAT_STEP_MOVE) {
                    let (a, d, n) = (
                        s.src_row as usize * h,
                        s.dst_row as usize * h,
                        s.rows as usize * h,
                    );
                    if r.in_place {
                        assert!(d <= a, "in-place moves go down");
                        buf.copy_within(a..a + n, d);
                    } else {
                        buf[d..d + n].copy_from_slice(&old_b[a..a + n]);
                    }
                }
                for (d, msg) in staged {
                    buf[d..d + msg.len()].copy_from_slice(&msg);
                }
                for s in mine(p as usize).iter().filter(|s| s.kind == PAT_STEP_ZERO) {
                    let (d, n) = (s.dst_row as usize * h, s.rows as usize * h);
                    buf[d..d + n].fill(0.0);
                }
                buf.truncate(new_len);
                let want = shard(m, role, layer, new.tp, new.position(p).1);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(&buf) == bits(&want),
                    "role {role} layer {layer} rank {p}"
                );
            }
            assert!(
                wire.values().all(VecDeque::is_empty),
                "every message received"
            );
        }
    }
    let sum_recv: u64 = (0..world)
        .map(|p| {
            let mut b = pat_rank_bytes::default();
            // SAFETY: a live plan and a local.
            expect(
                unsafe { pat_weight_plan_rank_bytes(plan, p, &mut b) },
                PAT_OK,
                "",
            );
            b.bytes_received
        })
        .sum();
    assert_eq!(
        (received, sum_recv),
        (info.bytes_cross_rank, info.bytes_cross_rank)
    );
    pat_weight_plan_free(plan);
    pat_model_free(m);
    (info.bytes_cross_rank, info.min_cross_rank_bytes)
}

#[test]
fn weight_programs_rebuild_the_new_shards_bitwise() {
    let qwen3 = LLAMA.replace("llama", "qwen3"); // tied embeddings, q/k norms
    for dir in [LLAMA, qwen3.as_str()] {
        for (world, from, to) in [(2, 1, 2), (2, 2, 1), (4, 1, 4), (4, 4, 2), (4, 2, 1)] {
            let old = L::contiguous(world, from);
            let (cross, min) = reshard_weights(dir, &old, &old.nested(to));
            assert_eq!(cross, min, "{dir} {world}: {from} -> {to}");
            if to > from {
                assert_eq!(cross, 0, "nested shards: growing tp moves nothing");
            }
        }
        // A contiguous (not nested) new layout still rebuilds exactly, but moves rows between
        // ranks where the nested one moves none.
        let old = L::contiguous(4, 2);
        let (cross, min) = reshard_weights(dir, &old, &L::contiguous(4, 4));
        assert!(cross > 0 && cross == min, "{cross} {min}");
    }
}

/// A distinct finite value per (sequence, global head, layer, K/V, token, element).
fn kv_value(seq: usize, head: usize, layer: usize, kv: usize, t: usize, d: usize) -> u32 {
    let mut x =
        (((seq * 31 + head) * 31 + layer) * 2 + kv) as u64 * 1_000_003 + (t * 97 + d) as u64;
    x ^= x >> 17;
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 34) as u32 & 0x3fff_ffff
}

#[test]
fn kv_programs_move_every_head_slice_to_its_new_home() {
    let (layers, kv_heads, hd, bs, blocks) = (2usize, 4usize, 8usize, 4usize, 16usize);
    let dims = pat_model_dims {
        struct_size: size_of::<pat_model_dims>() as u32,
        arch: PAT_ARCH_LLAMA,
        num_layers: layers as u32,
        hidden_size: 64,
        intermediate_size: 96,
        num_heads: 8,
        num_kv_heads: kv_heads as u32,
        head_dim: hd as u32,
        vocab_size: 301,
        tie_word_embeddings: 0,
    };
    let old = L::contiguous(4, 2);
    let new = old.nested(4);
    // (old replica, new replica, len, old table, new table)
    let seqs_owned: Vec<(u32, u32, usize, Vec<u32>, Vec<u32>)> = vec![
        (0, 0, 9, vec![3, 0, 5], vec![1, 2, 7]),
        (1, 0, 4, vec![2], vec![4]),
        (1, 0, 6, vec![0, 1], vec![0, 9, 3]),
    ];
    let seqs: Vec<pat_seq_kv> = seqs_owned
        .iter()
        .map(|(o, n, len, ot, nt)| pat_seq_kv {
            old_replica: *o,
            new_replica: *n,
            len: *len as u64,
            old_table: ot.as_ptr(),
            old_table_len: ot.len(),
            new_table: nt.as_ptr(),
            new_table_len: nt.len(),
        })
        .collect();
    let mut plan = null_mut();
    let mut info = pat_kv_plan_info::default();
    // SAFETY: locals that outlive the call.
    unsafe {
        expect(
            pat_kv_plan_new(
                &dims,
                &old.c(),
                &new.c(),
                bs as u32,
                seqs.as_ptr(),
                seqs.len(),
                4,
                &mut plan,
            ),
            PAT_OK,
            "",
        );
        expect(pat_kv_plan_get_info(plan, &mut info), PAT_OK, "");
    }
    assert_eq!(info.n_pieces, (seqs.len() * kv_heads) as u64);
    // Pools: [rank][layer][K/V] of [blocks, heads_local, bs, hd].
    let pool = |tp: usize| vec![vec![vec![0u32; blocks * (kv_heads / tp) * bs * hd]; 2]; layers];
    let off =
        |tp: usize, b: u32, h: usize, t: usize| ((b as usize * (kv_heads / tp) + h) * bs + t) * hd;
    let mut olds: Vec<_> = (0..4).map(|_| pool(2)).collect();
    let mut news: Vec<_> = (0..4).map(|_| pool(4)).collect();
    for (s, (orep, _, len, ot, _)) in seqs_owned.iter().enumerate() {
        for h in 0..kv_heads {
            let (rank, lh) = (old.placement[(*orep * 2) as usize + h / 2] as usize, h % 2);
            for (l, kv, t, d) in (0..layers).flat_map(|l| {
                (0..2).flat_map(move |kv| {
                    (0..*len).flat_map(move |t| (0..hd).map(move |d| (l, kv, t, d)))
                })
            }) {
                olds[rank][l][kv][off(2, ot[t / bs], lh, t % bs) + d] = kv_value(s, h, l, kv, t, d);
            }
        }
    }
    let steps: Vec<Vec<pat_kv_step>> = (0..4)
        .map(|p| {
            get(|b, c, n| {
                // SAFETY: a live plan; `get` passes a buffer of `c` entries (or NULL, 0).
                unsafe { pat_kv_plan_steps(plan, p, b, c, n) }
            })
        })
        .collect();
    let gather = |pool: &Vec<Vec<Vec<u32>>>, s: usize, h: usize| -> Vec<u32> {
        let (len, table) = (seqs_owned[s].2, &seqs_owned[s].3);
        let mut out = Vec::new();
        for l in 0..layers {
            for kv in 0..2 {
                for t in 0..len {
                    let o = off(2, table[t / bs], h, t % bs);
                    out.extend_from_slice(&pool[l][kv][o..o + hd]);
                }
            }
        }
        out
    };
    let scatter = |pool: &mut Vec<Vec<Vec<u32>>>, s: usize, h: usize, data: &[u32]| {
        let (len, table) = (seqs_owned[s].2, &seqs_owned[s].4);
        let mut at = 0;
        for l in 0..layers {
            for kv in 0..2 {
                for t in 0..len {
                    let o = off(4, table[t / bs], h, t % bs);
                    pool[l][kv][o..o + hd].copy_from_slice(&data[at..at + hd]);
                    at += hd;
                }
            }
        }
    };
    let mut wire: HashMap<(u32, u32), VecDeque<Vec<u32>>> = HashMap::new();
    for p in 0..4u32 {
        for st in steps[p as usize].iter().filter(|s| s.kind == PAT_KV_SEND) {
            let data = gather(&olds[p as usize], st.seq as usize, st.src_head as usize);
            wire.entry((p, st.peer)).or_default().push_back(data);
        }
    }
    for p in 0..4u32 {
        for st in &steps[p as usize] {
            let data = match st.kind {
                PAT_KV_SEND => continue,
                PAT_KV_LOCAL => gather(&olds[p as usize], st.seq as usize, st.src_head as usize),
                _ => wire.get_mut(&(st.peer, p)).unwrap().pop_front().unwrap(),
            };
            scatter(
                &mut news[p as usize],
                st.seq as usize,
                st.dst_head as usize,
                &data,
            );
        }
    }
    olds.clear();
    for (s, (_, nrep, len, _, nt)) in seqs_owned.iter().enumerate() {
        for h in 0..kv_heads {
            let rank = new.placement[(*nrep * 4) as usize + h] as usize;
            for l in 0..layers {
                for kv in 0..2 {
                    for t in 0..*len {
                        for d in 0..hd {
                            let got = news[rank][l][kv][off(4, nt[t / bs], 0, t % bs) + d];
                            assert_eq!(got, kv_value(s, h, l, kv, t, d), "seq {s} head {h}");
                        }
                    }
                }
            }
        }
    }
    let pieces: Vec<pat_kv_piece> = get(|b, c, n| {
        // SAFETY: a live plan; `get` passes a buffer of `c` entries (or NULL, 0).
        unsafe { pat_kv_plan_pieces(plan, b, c, n) }
    });
    let cross: u64 = pieces
        .iter()
        .filter(|p| p.src_rank != p.dst_rank)
        .map(|p| p.bytes)
        .sum();
    assert_eq!(cross, info.bytes_cross_rank);
    pat_kv_plan_free(plan);

    // Two sequences given one new block, and a table too short, are refused.
    let mut twice = seqs.clone();
    twice[1].new_table = seqs_owned[0].4.as_ptr();
    let mut short = seqs.clone();
    short[0].old_table_len = 2;
    let mut p2 = null_mut();
    // SAFETY: locals that outlive the calls.
    unsafe {
        let n = seqs.len();
        expect(
            pat_kv_plan_new(
                &dims,
                &old.c(),
                &new.c(),
                bs as u32,
                twice.as_ptr(),
                n,
                4,
                &mut p2,
            ),
            PAT_ERR_INVALID_ARGUMENT,
            "two sequences",
        );
        expect(
            pat_kv_plan_new(
                &dims,
                &old.c(),
                &new.c(),
                bs as u32,
                short.as_ptr(),
                n,
                4,
                &mut p2,
            ),
            PAT_ERR_INVALID_ARGUMENT,
            "tables have 2",
        );
        expect(
            pat_kv_plan_new(&dims, &old.c(), &new.c(), bs as u32, null(), n, 4, &mut p2),
            PAT_ERR_NULL,
            "seqs",
        );
    }
    assert!(p2.is_null());
}
