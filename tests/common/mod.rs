//! Shared helpers for the integration tests: fixture paths and an engine runner.
#![allow(dead_code)]

use std::path::PathBuf;

use pat::engine::{Engine, EngineOptions, Request};
use pat::model::config::ModelConfig;
use pat::model::sampling::SamplingParams;
use pat::model::weights::Checkpoint;
use pat::Dtype;

pub fn golden_dir(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/golden")
        .join(model)
}

pub struct Golden {
    pub input_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    pub first_step_logits: Vec<f32>,
    pub last_step_logits: Vec<f32>,
}

pub fn golden(model: &str) -> (usize, Vec<Golden>) {
    let text = std::fs::read_to_string(golden_dir(model).join("golden.json")).unwrap();
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
