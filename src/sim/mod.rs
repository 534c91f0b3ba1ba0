//! Cluster simulator: a rollout batch from a trace on an N-GPU node under static, adaptive and
//! oracle TP policies, reusing `crate::policy` unchanged (same predictor, same decision rule, same
//! switch cost model as the engine would use).
//!
//! - [`run`]: the discrete-event loop and the set of runs (`simulate_all`).
//! - [`report`]: the table / JSON report, with which numbers are modeled.
//! - [`svg`]: a hand-written SVG chart of live sequences and tp over time.

pub mod report;
pub mod run;
pub mod svg;

pub use report::SimReport;
pub use run::{
    simulate, simulate_all, PolicyKind, SimConfig, SimModel, SimResult, SwitchEvent, TimelinePoint,
};
