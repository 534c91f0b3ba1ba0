//! Cluster simulator: a rollout batch from a trace on an N-GPU node under every static layout,
//! PAT's rule, this project's adaptive rule, its oracle and the searched optimum, reusing
//! `crate::policy` unchanged (same predictor, same decision rule, same adaptive loop as the
//! engine). The clock is not the policy's predictor: see [`run`].
//!
//! - [`component`]: the component cost model of a modeled GPU node (every constant named).
//! - [`clock`]: the clock trait, a measured profile as a clock, a profile sampled from a model.
//! - [`node`]: independent replicas with KV capacity, barriers at switches.
//! - [`run`]: the policies and the set of runs (`simulate_all`).
//! - [`optimum`]: the search over switch schedules on the true clock.
//! - [`report`]: the table / JSON report, with which numbers are modeled.
//! - [`svg`]: a hand-written SVG chart of live sequences and tp over time.

pub mod calibration;
pub mod clock;
pub mod component;
pub mod compose;
pub mod node;
pub mod optimum;
pub mod report;
pub mod run;
pub mod svg;

pub use clock::{sampled_profile, ProfileTable, StepClock};
pub use component::{ComponentModel, ComponentParams, GpuKind};
pub use report::SimReport;
pub use run::{
    empirical, runs_in_all, simulate, simulate_all, simulate_all_reporting, Placement, PolicyKind,
    SimConfig, SimModel, SimResult, SwitchEvent, TimelinePoint,
};
