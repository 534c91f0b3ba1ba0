//! A KV pool held short at a switch grows into the weight bytes the switch freed: on a GPU too
//! full to hold the whole new pools next to the old layout, the switch gives them what fits and
//! the first step that needs more blocks grows them, keeping every live block.

use super::engine::four_ranks_at_tp1;
use super::*;
use pat::backend::cuda::{CudaDev, DBuf, DType};
use pat::kv::kv_block_bytes;
use pat::parallel::shard::weight_bytes_per_rank;

/// What a rank's device keeps for activations when a pool is sized (`engine::ranks::gpu`).
const ACTIVATIONS: usize = 512 << 20;

/// Four ranks on GPU 0 at tp 1 decode the golden prompts; then a ballast leaves the GPU room for
/// only about half of what the tp 2 pools may take (the old pool plus the shard bytes the
/// switch frees), and the switch to tp 2 gives them that half. With the ballast still held, a
/// batch of new requests that the short pools cannot admit makes the next step grow them, to the
/// goal the switch reported, which must equal (old pool + old shard - new shard) / block, each
/// measured on rank 0. The grown pools hold every live block (the prompts decoded before the
/// growth continue with transformers' tokens), the step that grew them runs more sequences'
/// blocks than the short pools held, and every request, old and new, ends with transformers'
/// tokens.
#[test]
fn pools_held_short_at_a_switch_grow_into_the_freed_weight_bytes() {
    grow_after_a_switch("pools_held_short_at_a_switch_grow", false);
}

/// As above, but after the switch more memory is taken, leaving room for about half of what the
/// pools may grow by: they grow that far, the growth's note says so, and every request still
/// ends with transformers' tokens (those the pools cannot admit at once queue).
#[test]
fn pools_grow_as_far_as_the_device_has_room() {
    grow_after_a_switch("pools_grow_as_far_as_room", true);
}

fn grow_after_a_switch(test: &str, crowded: bool) {
    // The test measures the GPU's free memory and takes nearly all of it: no other test runs.
    let Some(m) = Model::open_alone("llama", test) else {
        return;
    };
    let reqs = golden_requests(&m.gold, m.max_new);
    let mut e = four_ranks_at_tp1(&m, 64, Dtype::F32, GpuSwitch::Device);
    e.add_requests(&reqs).unwrap();
    e.step().unwrap();
    e.step().unwrap();

    let (w1, pool1) = e.rank_bytes(0);
    let w2 = weight_bytes_per_rank(&m.cfg, 2, 4) as usize;
    let block = kv_block_bytes(&m.cfg, 2, BS, 4) as usize;
    let goal = (pool1 + w1 - w2) / block;
    // Room for half the goal's bytes per rank, after the new shard and the activations' share.
    let dev = CudaDev::new(0).unwrap();
    let free = dev.allocatable_bytes().unwrap();
    let room = goal * block / 2;
    let ballast = free - 4 * (w2 + ACTIVATIONS + room);
    let held = DBuf::zeros(&dev, DType::U8, ballast).unwrap();
    dev.synchronize().unwrap();

    let cost = CostModel {
        transfer_bytes_per_s: 1e9,
        fixed_transfer_s: 0.0,
        prefill_tokens_per_s: vec![(1, 1e4)],
        fixed_prefill_s: 0.0,
    };
    let r = e.reconfigure(2, KvPolicy::Migrate, &cost).unwrap();
    assert_eq!(e.rank_bytes(0).0, w2, "rank 0's tp 2 shard");
    let short = r.kv_blocks_per_rank_after;
    eprintln!(
        "tp 1 -> 2 with {ballast} bytes of ballast: {short} blocks per rank now, goal {} \
         (measured: ({pool1} + {w1} - {w2}) / {block} = {goal})",
        r.kv_blocks_per_rank_goal
    );
    assert_eq!(
        r.kv_blocks_per_rank_goal, goal,
        "the goal the switch reports"
    );
    assert!(
        short < goal && short + 2 >= goal / 2,
        "the switch had room for about {} of {goal} blocks, it gave {short}",
        goal / 2
    );

    // Crowded: what the pools may take after the swap, less half their growth.
    let half = (goal - short) / 2;
    let _crowd = crowded.then(|| {
        let layer = goal * block / (2 * m.cfg.num_layers);
        let free = dev.allocatable_bytes().unwrap();
        let crowd = DBuf::zeros(
            &dev,
            DType::U8,
            free - 4 * (layer + ACTIVATIONS + half * block),
        );
        dev.synchronize().unwrap();
        crowd.unwrap()
    });
    let want = if crowded { short + half } else { goal };

    // New requests (the golden prompts again) whose blocks the short pools cannot all admit.
    let per_set: usize = reqs
        .iter()
        .map(|q| blocks_for(q.input_ids.len() + q.max_new_tokens, BS))
        .sum();
    let sets = 2 * short / per_set + 1;
    let more: Vec<_> = (0..sets).flat_map(|_| reqs.iter().cloned()).collect();
    e.add_requests(&more).unwrap();
    let mut growths = Vec::new();
    e.run(|s| {
        if let Some(g) = &s.pool_growth {
            growths.push((g.clone(), s.live_per_replica.clone()));
        }
    })
    .unwrap();
    assert_eq!(growths.len(), 1, "one growth: {growths:?}");
    let (g, live) = &growths[0];
    eprintln!("growth {g:?}; sequences per replica at that step {live:?}");
    assert_eq!(
        (g.from_blocks, g.goal_blocks, g.note.is_some()),
        (short, goal, crowded),
        "the growth"
    );
    // Crowded, the room is counted from the same free memory the engine reads, to the byte but
    // for the driver's rounding of the allocation: at most one block less.
    assert!(
        g.to_blocks <= want && g.to_blocks + 1 >= want && g.to_blocks > short,
        "grew to {} blocks, expected {want}",
        g.to_blocks
    );
    assert!(g.copied_bytes > 0, "the live blocks were copied");
    assert_eq!(e.options().kv_blocks, g.to_blocks);
    // Uncrowded, every request ran in the step that grew the pools, each holding its whole
    // footprint (`sets` makes that more than the short pools held on the two replicas).
    let total = reqs.len() * (sets + 1);
    assert!(per_set * (sets + 1) > 2 * short);
    if !crowded {
        assert_eq!(
            live.iter().sum::<usize>(),
            total,
            "sequences per replica in the step that grew the pools: {live:?}"
        );
    }
    drop(held);

    let outs = e.outputs();
    assert_eq!(outs.len(), total, "finished requests");
    for o in &outs {
        let g = &m.gold[o.index % m.gold.len()];
        assert_eq!(
            o.output_ids, g.output_ids,
            "request {}: greedy tokens differ from transformers",
            o.index
        );
    }
}
