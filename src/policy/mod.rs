//! Engine-independent policy for adaptive TP: traces, profiles, the step-latency predictor, the
//! remaining-length estimator and the switch decision rule.
//!
//! Nothing here touches a backend or an engine: every function takes plain numbers (profiles, live
//! sequence states) and returns plain numbers, and the adaptive loop drives a [`StepSource`]
//! trait, so the simulator (`crate::sim`) and the real engine run the same code.
//!
//! - [`trace`]: rollout length traces (JSONL) and seeded generators; [`import`]: traces from VeRL
//!   generation dumps and Mooncake traces.
//! - [`profile`]: the profile JSON (decode step samples, prefill rate, switch costs), validated.
//! - [`modeled`]: model shapes and links of modeled nodes (their cost model: `crate::sim::component`).
//! - [`predictor`]: per-tp least-squares fit `a + b*batch + c*batch*context (+ d*context)`.
//! - [`remaining`]: remaining-length estimate from the length distribution (or the oracle).
//! - [`forecast`]: balanced placement over replicas and the predicted time to drain a live set.
//! - [`mod@decide`]: the switch cost model and the stay-or-switch rule.
//! - [`controller`]: the one adaptive loop ([`drive`]) over any [`StepSource`]: the engine or the
//!   simulator.

pub mod controller;
pub mod decide;
pub mod forecast;
pub mod grpo;
pub mod import;
pub mod modeled;
pub mod predictor;
pub mod profile;
pub mod remaining;
pub mod trace;

pub use controller::{
    drive, Controller, ControllerConfig, Event, LiveSeq, RunSummary, StepDone, StepSource,
    SwitchSummary,
};
pub use decide::{decide, DecideInput, Decision, EstimatedSeq, SwitchCost};
pub use modeled::{Link, ModelShape};
pub use predictor::{Predictor, ValidationReport};
pub use profile::{ModelDims, Profile};
pub use remaining::{LengthDist, Remaining};
pub use trace::{Trace, TraceRequest};
