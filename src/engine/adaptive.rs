//! The engine as a [`StepSource`]: the one adaptive loop (`policy::drive`) runs a real rollout
//! with it exactly as the simulator runs a modeled node.

use std::time::Instant;

use super::{Engine, SwitchReport};
use crate::error::Result;
use crate::policy::controller::{LiveSeq, StepDone, StepSource};
use crate::reshard::cost::{CostModel, KvPolicy};

/// An engine driven by the adaptive loop: steps are timed by the wall clock, switches go through
/// [`Engine::reconfigure_placed`] with the placement the controller's forecast assumed.
pub struct EngineSource<'e> {
    pub engine: &'e mut Engine,
    /// How each live sequence's KV reaches a new layout.
    pub kv: KvPolicy,
    /// The migrate-or-recompute cost model used at a switch.
    pub cost: CostModel,
    t0: Instant,
}

impl<'e> EngineSource<'e> {
    /// Starts the clock now.
    pub fn new(engine: &'e mut Engine, kv: KvPolicy, cost: CostModel) -> Self {
        EngineSource {
            engine,
            kv,
            cost,
            t0: Instant::now(),
        }
    }
}

impl StepSource for EngineSource<'_> {
    type SwitchRecord = SwitchReport;
    fn world(&self) -> usize {
        self.engine.layout().world
    }
    fn tp(&self) -> usize {
        self.engine.layout().tp
    }
    fn live(&self) -> Vec<LiveSeq> {
        self.engine.live_seqs()
    }
    fn step(&mut self) -> Result<StepDone> {
        let r = self.engine.step()?;
        Ok(StepDone {
            ms: r.elapsed_ms,
            running: r.live_per_replica.iter().sum(),
            tokens_in: r.tokens_in,
            prefill_tokens: r.prefill_tokens,
            tokens_out: r.tokens_out,
        })
    }
    fn switch(&mut self, to_tp: usize, placement: &[usize]) -> Result<(f64, SwitchReport)> {
        let r = self
            .engine
            .reconfigure_placed(to_tp, self.kv, &self.cost, Some(placement))?;
        Ok((r.total_ms, r))
    }
    fn now_ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1e3
    }
}
