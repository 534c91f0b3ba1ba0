//! Shared helpers for the integration tests: fixture paths and an engine runner.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use pat::engine::{
    Engine, EngineOptions, PoolGrowth, Request, StepReport, SwitchFault, SwitchPhase, SwitchReport,
};
use pat::kv::blocks_for;
use pat::model::config::ModelConfig;
use pat::model::sampling::SamplingParams;
use pat::model::weights::Checkpoint;
use pat::reshard::cost::{CostModel, KvPolicy};
use pat::Dtype;

pub fn golden_dir(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/golden")
        .join(model)
}

#[derive(Clone)]
pub struct Golden {
    pub input_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    pub first_step_logits: Vec<f32>,
    pub last_step_logits: Vec<f32>,
}

pub fn golden(model: &str) -> (usize, Vec<Golden>) {
    golden_at(&golden_dir(model))
}

/// (max_new_tokens, prompts) of the fixture in `dir` (see tests/data/README.md).
pub fn golden_at(dir: &Path) -> (usize, Vec<Golden>) {
    let path = dir.join("golden.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (set PAT_GOLDEN_DIR)", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |x: &serde_json::Value| {
        x.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    };
    let fl = |x: &serde_json::Value| {
        x.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_f64().unwrap() as f32)
            .collect()
    };
    let prompts = v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Golden {
            input_ids: ids(&p["input_ids"]),
            output_ids: ids(&p["output_ids"]),
            first_step_logits: fl(&p["first_step_logits"]),
            last_step_logits: fl(&p["last_step_logits"]),
        })
        .collect();
    (v["max_new_tokens"].as_u64().unwrap() as usize, prompts)
}

pub fn engine(
    dir: &std::path::Path,
    world: usize,
    tp: usize,
    dtype: Dtype,
    kv_blocks: usize,
) -> Engine {
    let cfg = ModelConfig::load(dir).unwrap();
    let ck = Checkpoint::open(dir).unwrap();
    let opts = EngineOptions {
        world,
        tp,
        block_size: 16,
        kv_blocks,
        dtype,
        sampling: SamplingParams::default(),
    };
    Engine::new(cfg, &ck, opts).unwrap()
}

/// The golden prompts as requests for `max_new_tokens` tokens each, ignoring EOS.
pub fn golden_requests(gold: &[Golden], max_new: usize) -> Vec<Request> {
    gold.iter()
        .map(|g| Request {
            input_ids: g.input_ids.clone(),
            max_new_tokens: max_new,
            ignore_eos: true,
        })
        .collect()
}

/// max |a - b| / max(1, max |b|)
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

/// A switch from tp 1 to 2 on 4 ranks (engines from `make`, golden prompts `reqs`) that fails in
/// any phase on any rank loses nothing: before the swap the old layout keeps decoding; a recompute
/// failure comes after it (the new layout decodes, the failed sequences are re-prefilled on the
/// next step). Then the engine still switches and every token equals transformers' (`gold`).
pub fn failed_switch_loses_nothing(
    make: impl Fn() -> Engine,
    reqs: &[Request],
    gold: &[Golden],
    cost: &CostModel,
) {
    for phase in [
        SwitchPhase::Begin,
        SwitchPhase::Apply,
        SwitchPhase::Commit,
        SwitchPhase::Recompute,
    ] {
        for rank in 0..4 {
            let at = format!("{phase:?} rank {rank}");
            let mut e = make();
            e.add_requests(reqs).unwrap();
            e.step().unwrap();
            e.step().unwrap();
            e.inject_switch_fault(Some(SwitchFault { phase, rank }));
            // Recompute every sequence, so a recompute failure has work to fail in.
            let policy = if phase == SwitchPhase::Recompute {
                KvPolicy::Recompute
            } else {
                KvPolicy::Migrate
            };
            let err = e.reconfigure(2, policy, cost).unwrap_err().to_string();
            assert!(err.contains(&format!("rank {rank}")), "{at}: {err}");
            let tp = if phase == SwitchPhase::Recompute {
                2
            } else {
                1
            };
            assert_eq!(e.layout().tp, tp, "{at}: {err}");
            e.inject_switch_fault(None);
            e.step()
                .unwrap_or_else(|x| panic!("{at}: step after the failed switch: {x}"));
            let back = if tp == 1 { 4 } else { 1 };
            e.reconfigure(back, KvPolicy::Migrate, cost)
                .unwrap_or_else(|x| panic!("{at}: switch to tp {back}: {x}"));
            e.run(|_| {}).unwrap();
            for (o, g) in e.outputs().iter().zip(gold) {
                assert_eq!(o.output_ids, g.output_ids, "{at}");
            }
        }
    }
}

/// A tp 1 -> 2 switch of `e` (4 ranks at tp 1, after two steps of the golden prompts `reqs`)
/// whose new pools get `cap` blocks per rank (`cap_switch_pools`: what a GPU too full to hold
/// them next to the old layout would give) grows them at the first step that has to leave a
/// request waiting. New requests (the golden prompts again, enough that the short pools cannot
/// admit them) make that the next step; `crowd(report)` may take memory before it (held until
/// the end). One growth, in that step, from `cap` blocks, toward the goal the switch reported;
/// every request, old and new, ends with transformers' tokens (`gold`): the live blocks kept,
/// the grown ones (handed out first) written and read back. Returns the switch, the growth and
/// that step's report and the number of requests.
pub fn short_pools_grow_when_a_step_needs_blocks<G>(
    mut e: Engine,
    reqs: &[Request],
    gold: &[Golden],
    cap: usize,
    crowd: impl FnOnce(&SwitchReport) -> G,
) -> (SwitchReport, PoolGrowth, StepReport, usize) {
    e.add_requests(reqs).unwrap();
    e.step().unwrap();
    e.step().unwrap();
    e.cap_switch_pools(Some(cap));
    let cm = CostModel {
        transfer_bytes_per_s: 1e9,
        fixed_transfer_s: 0.0,
        prefill_tokens_per_s: vec![(1, 1e4)],
        fixed_prefill_s: 0.0,
    };
    let r = e.reconfigure(2, KvPolicy::Migrate, &cm).unwrap();
    e.cap_switch_pools(None);
    assert_eq!(r.kv_blocks_per_rank_after, cap, "the capped switch");
    assert!(
        r.kv_blocks_per_rank_goal > cap,
        "goal {}",
        r.kv_blocks_per_rank_goal
    );
    let _held = crowd(&r);
    let per_set: usize = reqs
        .iter()
        .map(|q| blocks_for(q.input_ids.len() + q.max_new_tokens, 16))
        .sum();
    let sets = 2 * cap / per_set + 1;
    let more: Vec<Request> = (0..sets).flat_map(|_| reqs.iter().cloned()).collect();
    e.add_requests(&more).unwrap();
    let mut steps = Vec::new();
    e.run(|s| steps.push(s.clone())).unwrap();
    let grew: Vec<&StepReport> = steps.iter().filter(|s| s.pool_growth.is_some()).collect();
    assert_eq!(grew.len(), 1, "one growth");
    assert_eq!(
        grew[0].step, steps[0].step,
        "the growth is the first step's"
    );
    let g = grew[0].pool_growth.clone().unwrap();
    assert_eq!(
        (g.from_blocks, g.goal_blocks),
        (cap, r.kv_blocks_per_rank_goal),
        "the growth"
    );
    assert!(
        cap < g.to_blocks && g.to_blocks <= g.goal_blocks,
        "grew to {}",
        g.to_blocks
    );
    assert_eq!(e.options().kv_blocks, g.to_blocks);
    let outs = e.outputs();
    assert_eq!(outs.len(), reqs.len() * (sets + 1), "finished requests");
    for o in &outs {
        assert_eq!(
            o.output_ids,
            gold[o.index % gold.len()].output_ids,
            "request {}: greedy tokens differ from transformers",
            o.index
        );
    }
    (r, g, grew[0].clone(), outs.len())
}

/// A switch cost model with a fixed copy rate and prefill rate (tokens/s at tp 1 and 4), no
/// fixed costs.
pub fn cost(transfer: f64, prefill: f64) -> CostModel {
    CostModel {
        transfer_bytes_per_s: transfer,
        fixed_transfer_s: 0.0,
        prefill_tokens_per_s: vec![(1, prefill), (4, prefill)],
        fixed_prefill_s: 0.0,
    }
}

/// Where each request's prompt ends in the queue of all their prompt tokens, in request order.
pub fn prompt_ends(reqs: &[Request]) -> Vec<usize> {
    reqs.iter()
        .scan(0, |t, r| {
            *t += r.input_ids.len();
            Some(*t)
        })
        .collect()
}
