//! Live TP reconfiguration: pure planners (weights, KV) computed from dims and layouts, and their executors.
//!
//! A switch from layout A to layout B is described by data before anything moves:
//!
//! - [`nested_layout`] picks B's placement so new shards nest inside old ones (shards nest: growing tp moves no weight bytes between ranks).
//! - [`weights::plan`] lists, per role and destination rank, the row copies (in place or from another
//!   rank's old shard) and zero fills that build the new shard; [`weights::execute`] applies it layer
//!   by layer, compacting in place when the shard shrinks.
//! - [`kv::plan`] lists, per unfinished sequence and kv head, where its cached K/V live before and
//!   after; [`kv::execute`] gathers head slices, "transfers" them and scatters into new blocks.
//! - [`cost::CostModel`] decides per sequence whether migrating its KV beats recomputing it.
//!
//! Plans are plain values: they are property-tested (tests/reshard_props.rs: applying a plan to A's
//! shards gives B's shards bitwise), and their byte counts are checked against the minimum.

pub mod assign;
pub mod cost;
pub mod cpu;
pub mod kv;
pub mod weights;

pub use assign::nested_layout;

/// Every rank's programs of one switch, owned (a backend whose ranks are long-lived workers
/// shares one copy among them).
#[derive(Clone, Debug)]
pub struct SwitchPrograms {
    pub new_tp: usize,
    /// Each physical rank's tp-rank in the new layout.
    pub new_tp_ranks: Vec<usize>,
    pub weights: Vec<weights::WeightProgram>,
    pub kv_plan: KvPlan,
    pub kv: Vec<kv::KvProgram>,
    /// KV blocks of each rank's new pool, of `block_size` tokens.
    pub new_blocks: usize,
    pub block_size: usize,
}
pub use cost::{CostModel, KvMode, KvPolicy};
pub use kv::{KvPlan, KvStats, SeqKv};
pub use weights::{ReshardStats, WeightPlan};
