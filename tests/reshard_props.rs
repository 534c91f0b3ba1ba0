//! Property tests of the reshard planners and their per-rank programs: the programs of every rank,
//! run concurrently (one thread per rank, each touching only its own buffers, bytes crossing ranks
//! only through `Comm`), turn layout A's shards into exactly the shards a fresh load gives for
//! layout B, moving the minimum bytes (none when tp grows); KV survives any tp ladder bitwise.

use std::ops::Range;
use std::path::Path;

use pat::kv::{blocks_for, BlockAllocator, KvPool};
use pat::model::config::{Arch, ModelConfig};
use pat::model::decoder::RankWeights;
use pat::model::weights::Checkpoint;
use pat::parallel::layout::check_tp_for_model;
use pat::parallel::shard::{self, Role, Source};
use pat::parallel::Layout;
use pat::reshard::{kv, nested_layout, weights};
use pat::Dtype;
use proptest::collection::vec as vec_of;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype as StDtype;

/// A Qwen3 model with head_dim 4, 2 layers, hidden 8; the strategy below varies everything.
fn model(kv: usize, group: usize, inter: usize, vocab: usize, tied: bool) -> ModelConfig {
    ModelConfig {
        arch: Arch::Qwen3,
        vocab_size: vocab,
        hidden_size: 8,
        intermediate_size: inter,
        num_layers: 2,
        num_heads: kv * group,
        num_kv_heads: kv,
        head_dim: 4,
        rms_norm_eps: 1e-6,
        rope_theta: 1e4,
        rope_scaling: None,
        max_position_embeddings: 256,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_ids: vec![],
        dtype: None,
    }
}

/// kv heads {1,2,4,8} x group 1..=4, head_dim {2..16}, 1..=3 layers, intermediate 8 * (1..=3),
/// hidden {8,16,32}, vocab 5..200 (padding varies with tp), Llama or Qwen3, tied or not.
fn configs() -> impl Strategy<Value = ModelConfig> {
    let a = (select(vec![1, 2, 4, 8]), 1usize..=4);
    let b = (select(vec![2, 4, 8, 16]), 1usize..=3, 1usize..=3);
    let c = (select(vec![8, 16, 32]), 5usize..200);
    let d = (any::<bool>(), any::<bool>());
    (a, b, c, d).prop_map(
        |((kv, group), (hd, layers, m), (hidden, vocab), (qwen, tied))| {
            let mut c = model(kv, group, 8 * m, vocab, tied);
            (c.head_dim, c.num_layers, c.hidden_size) = (hd, layers, hidden);
            c.arch = if qwen { Arch::Qwen3 } else { Arch::Llama };
            c
        },
    )
}

/// Writes a checkpoint with HF tensor names and distinct non-zero values (a running counter).
fn write_checkpoint(cfg: &ModelConfig, dir: &Path) {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    for l in 0..cfg.num_layers {
        let mut t = vec![
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
            ("self_attn.q_proj", vec![q, h]),
            ("self_attn.k_proj", vec![kvd, h]),
            ("self_attn.v_proj", vec![kvd, h]),
            ("self_attn.o_proj", vec![h, q]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
        ];
        if cfg.has_qk_norm() {
            t.push(("self_attn.q_norm", vec![cfg.head_dim]));
            t.push(("self_attn.k_norm", vec![cfg.head_dim]));
        }
        shapes.extend(
            t.into_iter()
                .map(|(n, s)| (format!("model.layers.{l}.{n}.weight"), s)),
        );
    }
    let mut counter = 0u32;
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .map(|(_, s)| {
            let n: usize = s.iter().product();
            let mut next = || {
                counter += 1;
                counter as f32 * if counter.is_multiple_of(2) { 1.0 } else { -0.5 }
            };
            (0..n).flat_map(|_| next().to_le_bytes()).collect()
        })
        .collect();
    let view = |s: &Vec<usize>, d| TensorView::new(StDtype::F32, s.clone(), d).unwrap();
    let views = shapes
        .iter()
        .zip(&data)
        .map(|((n, s), d)| (n.clone(), view(s, d)));
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// Every buffer of a rank as f32 bits (None for absent optional ones), after its (tp, tp_rank).
fn contents(w: &RankWeights) -> Vec<Option<Vec<u32>>> {
    let bits = |v: &[f32]| Some(v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    let mut out = vec![Some(vec![w.tp as u32, w.tp_rank as u32]), bits(&w.embed)];
    out.extend([w.lm_head.as_deref().and_then(bits), bits(&w.final_norm)]);
    for x in &w.layers {
        for b in [
            &x.qkv,
            &x.o,
            &x.gate_up,
            &x.down,
            &x.input_norm,
            &x.post_norm,
        ] {
            out.push(bits(b));
        }
        out.push(x.q_norm.as_deref().and_then(bits));
        out.push(x.k_norm.as_deref().and_then(bits));
    }
    out
}

fn load_all(ck: &Checkpoint, cfg: &ModelConfig, l: &Layout) -> Vec<RankWeights> {
    (0..l.world)
        .map(|p| RankWeights::load(ck, cfg, l.tp, l.position(p).1, Dtype::F32).unwrap())
        .collect()
}

/// The initial tp followed by the switches, each a tp the model and world allow.
fn ladder(cfg: &ModelConfig, world: usize, picks: &[Index]) -> Vec<usize> {
    let ok: Vec<usize> = (1..=world)
        .filter(|&t| world.is_multiple_of(t) && check_tp_for_model(t, cfg).is_ok())
        .collect();
    let mut tps = vec![ok[picks[0].index(ok.len())]];
    for i in &picks[1..] {
        // A different tp whenever the model and world allow one.
        let last = tps[tps.len() - 1];
        let next: Vec<usize> = ok
            .iter()
            .copied()
            .filter(|&t| t != last || ok.len() == 1)
            .collect();
        tps.push(next[i.index(next.len())]);
    }
    tps
}

/// Applies nested_layout + weight plan for each tp in turn, checking bytes and the result bitwise.
fn weight_ladder(cfg: &ModelConfig, world: usize, tps: &[usize]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(cfg, dir.path());
    let ck = Checkpoint::open(dir.path()).unwrap();
    let mut cur = Layout::new(world, tps[0]).unwrap();
    let mut ranks = load_all(&ck, cfg, &cur);
    let row = cfg.hidden_size as u64 * 4;
    for &tp in &tps[1..] {
        let new = nested_layout(&cur, tp).unwrap();
        let plan = weights::plan(cfg, &cur, &new, 4).unwrap();
        let min = weights::min_cross_rank_bytes(cfg, &cur, &new, 4);
        prop_assert_eq!(plan.bytes_cross_rank, min, "{} -> {}", cur.tp, tp);
        let has_head = plan.ops.iter().any(|r| r.role == Role::LmHead);
        prop_assert_eq!(has_head, !cfg.tie_word_embeddings);
        let mut total = 0;
        for ro in &plan.ops {
            if tp % cur.tp == 0 && Role::LAYER.contains(&ro.role) {
                prop_assert_eq!(ro.bytes_cross_rank, 0, "{:?} {} -> {}", ro.role, cur.tp, tp);
            }
            for rk in &ro.ranks {
                prop_assert_eq!(rk.ops.iter().map(|o| o.rows()).sum::<usize>(), rk.new_rows);
                total += (rk.new_rows * ro.repeats) as u64 * row;
            }
        }
        let accounted = plan.bytes_cross_rank + plan.bytes_in_place + plan.bytes_zeroed;
        prop_assert_eq!(accounted, total);
        // Per-rank programs: every send has its receive; growing tp sends nothing.
        let progs = weights::program::programs(&plan);
        // A fresh build reads + writes each kept or received row once, writes each padding row.
        let rebuild: u64 = progs.iter().map(|p| p.rebuild_bytes()).sum();
        prop_assert_eq!(rebuild, 2 * total - plan.bytes_zeroed);
        let sent: u64 = progs.iter().map(|p| p.bytes_sent).sum();
        let got: u64 = progs.iter().map(|p| p.bytes_received).sum();
        prop_assert_eq!((sent, got), (plan.bytes_cross_rank, plan.bytes_cross_rank));
        if tp % cur.tp == 0 {
            prop_assert!(progs
                .iter()
                .all(|p| p.bytes_sent == 0 && p.roles.iter().all(|r| r.in_place)));
        }

        let stats = weights::execute(&plan, cfg, &mut ranks).unwrap();
        let moved = (stats.bytes_cross_rank, stats.bytes_in_place);
        prop_assert_eq!(moved, (plan.bytes_cross_rank, plan.bytes_in_place));
        // Growing tp compacts in place: no extra byte at all. Otherwise a rank holds at most its
        // received rows (less than its new shard) plus one fresh buffer.
        let rk = plan.ops.iter().flat_map(|r| &r.ranks);
        let largest = rk.map(|r| r.new_rows.max(r.old_rows)).max().unwrap_or(0) as u64;
        if tp % cur.tp == 0 {
            prop_assert_eq!(stats.peak_extra_bytes, 0, "{} -> {}", cur.tp, tp);
        } else {
            let shard = shard::weight_bytes_per_rank(cfg, tp, 4);
            prop_assert!(stats.peak_extra_bytes <= shard + largest * row, "{stats:?}");
        }
        let freed = &stats.freed_bytes_per_rank;
        prop_assert!(tp <= cur.tp || freed.iter().all(|&b| b > 0), "{stats:?}");
        for (p, (a, b)) in ranks.iter().zip(load_all(&ck, cfg, &new)).enumerate() {
            let (x, y) = (contents(a), contents(&b));
            let bad = x.iter().zip(&y).position(|(u, v)| u != v);
            prop_assert!(bad.is_none(), "rank {p} buffer {bad:?}: {} -> {tp}", cur.tp);
        }
        cur = new;
    }
    Ok(())
}

type Held = (String, Range<usize>);

/// Rows of each tensor (padding excluded) a rank holds for `role`.
fn held(cfg: &ModelConfig, role: Role, l: &Layout, rank: usize) -> Vec<Held> {
    let segs = shard::segments(cfg, role, 0, l.tp, l.position(rank).1);
    segs.into_iter()
        .filter_map(|s| match s.source {
            Source::Tensor { name, .. } => Some((name, s.rows)),
            Source::Zeros => None,
        })
        .collect()
}

fn inside(a: &[Held], b: &[Held]) -> bool {
    a.iter().all(|(n, r)| {
        b.iter()
            .any(|(m, s)| m == n && s.start <= r.start && r.end <= s.end)
    })
}

/// One allocator per replica, its free list shuffled so tables are scattered.
fn allocators(dp: usize, blocks: usize, rng: &mut ChaCha8Rng) -> Vec<BlockAllocator> {
    (0..dp)
        .map(|_| {
            let mut a = BlockAllocator::new(blocks);
            let mut all = a.alloc(blocks).unwrap();
            all.shuffle(rng);
            a.release(&all);
            a
        })
        .collect()
}

/// A sequence's KV home: (replica, block table, cached tokens).
type Seq = (usize, Vec<u32>, usize);

/// (layer, rank, element offset) of every (sequence, layer, position, global head), in that order.
fn slots(cfg: &ModelConfig, l: &Layout, bs: usize, seqs: &[Seq]) -> Vec<(usize, usize, usize)> {
    let (kvh, hd) = (cfg.num_kv_heads, cfg.head_dim);
    let mut out = Vec::new();
    for (replica, table, len) in seqs {
        for layer in 0..cfg.num_layers {
            for pos in 0..*len {
                for h in 0..kvh {
                    let (rank, local) = kv::head_home(l, kvh, *replica, h);
                    let block = table[pos / bs] as usize;
                    let off = ((block * (kvh / l.tp) + local) * bs + pos % bs) * hd;
                    out.push((layer, rank, off));
                }
            }
        }
    }
    out
}

fn read_all(pools: &[KvPool], slots: &[(usize, usize, usize)], hd: usize) -> Vec<(u32, u32)> {
    let mut out = Vec::with_capacity(slots.len() * hd);
    for &(l, r, o) in slots {
        let (k, v) = (&pools[r].k[l][o..o + hd], &pools[r].v[l][o..o + hd]);
        out.extend(k.iter().zip(v).map(|(a, b)| (a.to_bits(), b.to_bits())));
    }
    out
}

/// Fills every sequence's KV with distinct values, migrates through each tp in turn (random new
/// replicas, scattered tables) and reads everything back bitwise.
fn kv_ladder(
    cfg: &ModelConfig,
    world: usize,
    tps: &[usize],
    bs: usize,
    lens: &[(usize, usize)],
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (kvh, hd, layers) = (cfg.num_kv_heads, cfg.head_dim, cfg.num_layers);
    let blocks = lens.iter().map(|(n, _)| blocks_for(*n, bs)).sum::<usize>() + 3;
    let pools_for = |tp: usize| -> Vec<KvPool> {
        (0..world)
            .map(|_| KvPool::new(layers, blocks, bs, kvh / tp, hd).unwrap())
            .collect()
    };
    let mut cur = Layout::new(world, tps[0]).unwrap();
    let mut pools = pools_for(cur.tp);
    let mut allocs = allocators(cur.dp(), blocks, &mut rng);
    let mut seqs: Vec<Seq> = lens
        .iter()
        .map(|&(len, pick)| {
            let r = pick % cur.dp();
            (r, allocs[r].alloc(blocks_for(len, bs)).unwrap(), len)
        })
        .collect();
    for (i, (l, r, o)) in slots(cfg, &cur, bs, &seqs).into_iter().enumerate() {
        for d in 0..hd {
            let x = (i * hd + d + 1) as f32;
            (pools[r].k[l][o + d], pools[r].v[l][o + d]) = (x, -x);
        }
    }
    let expect = read_all(&pools, &slots(cfg, &cur, bs, &seqs), hd);
    for &tp in &tps[1..] {
        let new = nested_layout(&cur, tp).unwrap();
        let mut new_allocs = allocators(new.dp(), blocks, &mut rng);
        let spec: Vec<kv::SeqKv> = seqs
            .iter()
            .map(|(replica, table, len)| {
                let r = rng.random_range(0..new.dp());
                let new_table = new_allocs[r].alloc(blocks_for(*len, bs)).unwrap();
                let (old_table, len) = (table.clone(), *len);
                kv::SeqKv {
                    old_replica: *replica,
                    new_replica: r,
                    len,
                    old_table,
                    new_table,
                }
            })
            .collect();
        let plan = kv::plan(cfg, &cur, &new, bs, &spec, 4).unwrap();
        // Per-rank programs: every message sent is received, and the bytes are the plan's.
        let progs = kv::program::programs(&plan);
        let sent: u64 = progs.iter().map(|p| p.bytes_sent).sum();
        let got: u64 = progs.iter().map(|p| p.bytes_received).sum();
        prop_assert_eq!((sent, got), (plan.bytes_cross_rank, plan.bytes_cross_rank));
        let local: u64 = progs.iter().map(|p| p.bytes_in_place).sum();
        prop_assert_eq!(local, plan.bytes_in_place);
        let mut new_pools = pools_for(tp);
        let stats = kv::execute(&plan, &pools, &mut new_pools).unwrap();
        let tokens: usize = spec.iter().map(|s| s.len).sum();
        let total = (tokens * cfg.kv_bytes_per_token(4)) as u64;
        prop_assert_eq!(stats.bytes_cross_rank + stats.bytes_in_place, total);
        prop_assert_eq!(stats.bytes_cross_rank, plan.bytes_cross_rank);
        let by_seq: u64 = spec
            .iter()
            .map(|s| kv::seq_bytes(cfg, &cur, &new, s.old_replica, s.new_replica, s.len, 4))
            .map(|b| b.unwrap().0)
            .sum();
        prop_assert_eq!(by_seq, plan.bytes_cross_rank);
        // Each rank's message bytes, counted per sequence before any block exists, are what its
        // program sends plus receives.
        let mut messages = vec![0u64; cur.world];
        for s in &spec {
            let pair = (s.old_replica, s.new_replica);
            kv::seq_messages(cfg, &cur, &new, pair, s.len, 4, &mut messages).unwrap();
        }
        let by_program: Vec<u64> = progs
            .iter()
            .map(|p| p.bytes_sent + p.bytes_received)
            .collect();
        prop_assert_eq!(messages, by_program);
        seqs = spec
            .into_iter()
            .map(|s| (s.new_replica, s.new_table, s.len))
            .collect();
        let got = read_all(&new_pools, &slots(cfg, &new, bs, &seqs), hd);
        prop_assert!(got == expect, "KV changed in {} -> {}", cur.tp, tp);
        (cur, pools) = (new, new_pools);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn weight_plans_reproduce_fresh_loads(
        cfg in configs(),
        world in select(vec![1, 2, 4, 8]),
        picks in vec_of(any::<Index>(), 2..=5),
    ) {
        weight_ladder(&cfg, world, &ladder(&cfg, world, &picks))?;
    }

    #[test]
    fn kv_survives_tp_switches(
        cfg in configs(),
        world in select(vec![1, 2, 4, 8]),
        picks in vec_of(any::<Index>(), 2..=5),
        bs in select(vec![1, 2, 4, 16]),
        lens in vec_of((1usize..100, any::<usize>()), 1..6),
        seed in any::<u64>(),
    ) {
        kv_ladder(&cfg, world, &ladder(&cfg, world, &picks), bs, &lens, seed)?;
    }

    #[test]
    fn nested_layout_nests(
        cfg in configs(),
        world in select(vec![1, 2, 4, 6, 8]),
        picks in vec_of(any::<Index>(), 2..=5),
    ) {
        let tps = ladder(&cfg, world, &picks);
        let mut cur = Layout::new(world, tps[0]).unwrap();
        for &tp in &tps[1..] {
            let new = nested_layout(&cur, tp).unwrap();
            let mut seen: Vec<usize> = (0..new.dp()).flat_map(|e| new.replica_ranks(e).to_vec()).collect();
            seen.sort();
            prop_assert_eq!(seen, (0..world).collect::<Vec<_>>());
            for r in 0..world {
                for role in Role::LAYER {
                    let (a, b) = (held(&cfg, role, &cur, r), held(&cfg, role, &new, r));
                    if tp % cur.tp == 0 {
                        prop_assert!(inside(&b, &a), "rank {} {:?}: {} -> {}", r, role, cur.tp, tp);
                    } else if cur.tp.is_multiple_of(tp) {
                        prop_assert!(inside(&a, &b), "rank {} {:?}: {} -> {}", r, role, cur.tp, tp);
                    }
                }
            }
            cur = new;
        }
    }
}

#[test]
fn vocab_301_pads_to_a_shared_size_for_power_of_two_tp() {
    for tied in [false, true] {
        let cfg = model(4, 2, 16, 301, tied);
        weight_ladder(&cfg, 4, &[1, 4, 2, 4, 1, 2]).unwrap();
        let a = Layout::new(4, 2).unwrap();
        let b = nested_layout(&a, 4).unwrap();
        // 301 pads to 320 at tp 2 and 4 alike: growing tp moves nothing, embedding and head included.
        let plan = weights::plan(&cfg, &a, &b, 4).unwrap();
        assert_eq!(plan.bytes_cross_rank, 0);
        assert_eq!(shard::padded_vocab(301, 2), shard::padded_vocab(301, 4));
        assert_eq!(shard::padded_vocab(301, 3), 384);
    }
}

#[test]
fn tied_models_keep_no_head_buffer() {
    let cfg = model(2, 2, 8, 64, true);
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(&cfg, dir.path());
    let ck = Checkpoint::open(dir.path()).unwrap();
    let a = Layout::new(2, 1).unwrap();
    let mut ranks = load_all(&ck, &cfg, &a);
    let b = nested_layout(&a, 2).unwrap();
    let plan = weights::plan(&cfg, &a, &b, 4).unwrap();
    assert!(plan.ops.iter().all(|r| r.role != Role::LmHead));
    assert_eq!(plan.bytes_cross_rank, 0);
    weights::execute(&plan, &cfg, &mut ranks).unwrap();
    assert!(ranks.iter().all(|w| w.lm_head.is_none() && w.tp == 2));
    // A plan for the untied model fits neither the tied config nor these ranks.
    let untied = ModelConfig {
        tie_word_embeddings: false,
        ..cfg.clone()
    };
    let bad = weights::plan(&untied, &b, &a, 4).unwrap();
    assert!(weights::execute(&bad, &cfg, &mut ranks).is_err());
    assert!(weights::execute(&bad, &untied, &mut ranks).is_err());
    assert!(
        ranks.iter().all(|w| w.tp == 2),
        "a failed execute leaves the ranks untouched"
    );
}

#[test]
fn world_6_switches_between_tp_2_and_3() {
    let cfg = model(6, 2, 12, 97, false);
    let a = Layout::new(6, 2).unwrap();
    let b = nested_layout(&a, 3).unwrap();
    let min = weights::min_cross_rank_bytes(&cfg, &a, &b, 4);
    assert!(min > 0, "tp 2 -> 3 cannot nest");
    assert_eq!(
        weights::plan(&cfg, &a, &b, 4).unwrap().bytes_cross_rank,
        min
    );
    weight_ladder(&cfg, 6, &[2, 3, 6, 2, 1, 3, 2]).unwrap();
    let lens: Vec<(usize, usize)> = (0..5).map(|i| (7 * i + 3, i)).collect();
    kv_ladder(&cfg, 6, &[2, 3, 6, 2, 3, 1], 4, &lens, 7).unwrap();
}
