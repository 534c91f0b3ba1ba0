//! A KV pool held short at a switch grows into the weight bytes the switch freed: on a GPU too
//! full to hold the whole new pools next to the old layout, the switch gives them what fits, and
//! they grow later (at the first step that has to leave a request waiting, or when a caller asks)
//! as far as the GPU has room, keeping every live block.
//!
//! Both tests measure the GPU's free memory and take nearly all of it, so they hold device memory
//! alone (`Model::open_alone`). Their pools are tens of MiB per rank, so a real GPU's allocation
//! granularity (2 MiB pages) moves their numbers by a few percent at most.

use super::engine::four_ranks_at_tp1;
use super::*;
use common::short_pools_grow_when_a_step_needs_blocks;
use pat::kv::kv_block_bytes;
use pat::parallel::shard::weight_bytes_per_rank;

/// What a rank's device keeps for activations when a pool is sized (`engine::ranks::gpu`).
const ACTIVATIONS: usize = 512 << 20;
/// KV blocks per rank at tp 1: 64 MiB of the fixture's 8 KiB blocks.
const POOL: usize = 8192;
/// How far a GPU's page granularity may move what a test computes from free memory.
const SLACK: usize = 2 << 20;

/// Four ranks on GPU 0 at tp 1 decode the golden prompts; then a ballast leaves the GPU room for
/// about half of what the tp 2 pools may take (the old pool plus the shard bytes the switch
/// frees), and the switch to tp 2 gives them about that half. The goal it reports must equal
/// (old pool + old shard - new shard) / new block, each measured on rank 0. With the ballast
/// still held, `grow_kv_pools` grows them to the goal (the old layout's bytes are free again),
/// keeping the live blocks (the prompts go on with transformers' tokens); new requests get the
/// grown blocks first and end with transformers' tokens too.
#[test]
fn pools_held_short_at_a_switch_grow_into_the_freed_weight_bytes() {
    let test = "pools_held_short_at_a_switch_grow";
    let Some(m) = Model::open_alone("llama", test) else {
        return;
    };
    let reqs = golden_requests(&m.gold, m.max_new);
    let mut e = four_ranks_at_tp1(&m, POOL, Dtype::F32, GpuSwitch::Device);
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

    let cost = test_cost();
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
        short < goal && (short + SLACK / block) * block >= room,
        "the switch had room for about {} of {goal} blocks, it gave {short}",
        room / block
    );

    let g = e
        .grow_kv_pools()
        .expect("the pools are short of their goal");
    eprintln!("growth {g:?}");
    assert_eq!(
        (g.from_blocks, g.to_blocks, g.goal_blocks, &g.note),
        (short, goal, goal, &None),
        "the growth"
    );
    assert!(g.copied_bytes > 0, "the live blocks were copied");
    assert_eq!(e.options().kv_blocks, goal);
    assert!(e.grow_kv_pools().is_none(), "grown once");

    e.add_requests(&reqs).unwrap();
    e.run(|_| {}).unwrap();
    drop(held);
    let outs = e.outputs();
    assert_eq!(outs.len(), 2 * reqs.len(), "finished requests");
    for o in &outs {
        let g = &m.gold[o.index % m.gold.len()];
        assert_eq!(
            o.output_ids, g.output_ids,
            "request {}: greedy tokens differ from transformers",
            o.index
        );
    }
}

/// The pools held short at a switch (capped at 8 blocks, `short_pools_grow_when_a_step_needs
/// _blocks`), then memory taken so that the GPU has room for about half of what they may grow
/// by: the step that needs more blocks grows them that far, and the growth's note says so.
#[test]
fn pools_grow_as_far_as_the_device_has_room() {
    let Some(m) = Model::open_alone("llama", "pools_grow_as_far_as_room") else {
        return;
    };
    let reqs = golden_requests(&m.gold, m.max_new);
    let e = four_ranks_at_tp1(&m, POOL, Dtype::F32, GpuSwitch::Device);
    let block = kv_block_bytes(&m.cfg, 2, BS, 4) as usize;
    let layers = m.cfg.num_layers;
    let dev = CudaDev::new(0).unwrap();
    let mut want = 0;
    let (_, g, _, _) = short_pools_grow_when_a_step_needs_blocks(e, &reqs, &m.gold, 8, |r| {
        // What the growth needs besides the pools (one layer's new buffer and the activations'
        // share per rank), and room for half the growth.
        let (short, goal) = (r.kv_blocks_per_rank_after, r.kv_blocks_per_rank_goal);
        let half = (goal - short) / 2;
        want = short + half;
        let layer = goal * block / (2 * layers);
        let free = dev.allocatable_bytes().unwrap();
        let crowd = DBuf::zeros(
            &dev,
            DType::U8,
            free - 4 * (layer + ACTIVATIONS + half * block),
        );
        dev.synchronize().unwrap();
        crowd.unwrap()
    });
    eprintln!("growth {g:?}, expected about {want} blocks");
    assert!(g.note.is_some(), "a growth short of its goal says so");
    assert!(
        g.to_blocks <= want + 1 && (g.to_blocks + SLACK / block) >= want,
        "grew to {} blocks, expected {want}",
        g.to_blocks
    );
}
