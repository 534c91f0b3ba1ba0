//! `pat`: adaptive tensor parallelism for the long-tail generation stage of synchronous RLHF.
//!
//! A minimal LLaMA-3.x / Qwen3 decoder over a paged KV cache on `world` ranks, each holding only its
//! tensor-parallel shard, whose tp degree can be switched between two decode steps: weights are
//! resharded in place, the KV cache of unfinished sequences migrated or recomputed.
//!
//! The library is driven without the command line:
//! - [`model::ModelDir`] opens a model directory (config, mmapped checkpoint, tokenizer);
//! - [`engine::Engine`] runs requests on a backend, step by step, and switches tp live
//!   ([`engine::Engine::reconfigure`]); [`engine::EngineOptions::for_memory_budget`] sizes its KV
//!   pool;
//! - [`engine::profiler`] measures a profile; [`policy::Controller`] and [`policy::drive`] are the
//!   adaptive loop, over the engine ([`engine::EngineSource`]) or the simulator ([`sim`]);
//! - [`reshard`] holds the pure switch planners and the one migrate-or-recompute cost model.
//!
//! Every error is an [`Error`] whose [`Error::kind`] says what a caller can do about it.
//!
//! Greedy tokens on 2 ranks with a live switch from tp 1 to tp 2, checked against the outputs of
//! HF transformers stored with the test fixture:
//!
//! ```
//! use pat::engine::{Backend, Engine, EngineOptions, Request};
//! use pat::model::ModelDir;
//! use pat::reshard::cost::{CostModel, KvPolicy};
//!
//! # fn main() -> pat::Result<()> {
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/golden/llama");
//! let model = ModelDir::open(dir)?;
//! // The fixture: prompts and the greedy continuations transformers produced for them.
//! let golden: serde_json::Value =
//!     serde_json::from_str(&std::fs::read_to_string(format!("{dir}/golden.json")).unwrap()).unwrap();
//! let ids = |v: &serde_json::Value| -> Vec<u32> {
//!     v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
//! };
//! let max_new = golden["max_new_tokens"].as_u64().unwrap() as usize;
//! let prompts = golden["prompts"].as_array().unwrap();
//! let requests: Vec<Request> = prompts
//!     .iter()
//!     .map(|p| Request { input_ids: ids(&p["input_ids"]), max_new_tokens: max_new, ignore_eos: true })
//!     .collect();
//!
//! // 2 ranks as 2 replicas of tp 1, with 1 MiB of KV per rank.
//! let backend = Backend::Cpu;
//! let opts = EngineOptions::for_memory_budget(&model.cfg, &backend, 2, 1, pat::Dtype::F32, 1 << 20)?;
//! let mut engine = Engine::from_dir(&model, opts, &backend)?;
//! engine.add_requests(&requests)?;
//! for _ in 0..3 {
//!     engine.step()?;
//! }
//! // Switch to tp 2 (one replica of 2 ranks): growing tp moves no weight bytes between ranks.
//! let cost = CostModel { transfer_bytes_per_s: 1e9, fixed_transfer_s: 0.0,
//!                        prefill_tokens_per_s: vec![], fixed_prefill_s: 0.0 };
//! let switch = engine.reconfigure(2, KvPolicy::Migrate, &cost)?;
//! assert_eq!((switch.from_tp, switch.to_tp, switch.weight_bytes_cross_rank), (1, 2, 0));
//! engine.run(|_| {})?;
//! for (out, p) in engine.outputs().iter().zip(prompts) {
//!     assert_eq!(out.output_ids, ids(&p["output_ids"]));
//! }
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod json;
pub mod kv;
pub mod model;
pub mod parallel;
pub mod policy;
pub mod reshard;
pub mod sim;
pub mod stats;
pub mod text;

pub use dtype::Dtype;
pub use error::{Error, ErrorKind, Result};
