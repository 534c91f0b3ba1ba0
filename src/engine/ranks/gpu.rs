//! GPU ranks behind the engine's [`RankSet`]: `backend::cuda::GpuRanks`, one long-lived worker
//! thread per rank owning its device, shard and KV pool (a stub that refuses to start in builds
//! without the `cuda` feature).

use super::{RankSet, StepCtx, SwitchDone, SwitchWork};
use crate::backend::cuda::GpuRanks;
use crate::error::{Error, Result};
use crate::parallel::GroupCache;

fn not_yet() -> Error {
    Error::Invalid(
        "live tp switches run on the CPU backend only for now (GPU ranks keep one layout)".into(),
    )
}
use crate::model::decoder::SeqInput;

impl RankSet for GpuRanks {
    fn forward(&mut self, ctx: StepCtx<'_>, inputs: &[Vec<SeqInput<'_>>]) -> Result<Vec<Vec<f32>>> {
        if ctx.fail_rank.is_some() {
            return Err(Error::Internal(
                "injected step failures are CPU-only".into(),
            ));
        }
        self.step(ctx.layout, inputs)
    }
    fn rank_bytes(&self, rank: usize) -> (usize, usize) {
        self.bytes(rank)
    }
    fn decode_read_bytes(&self, rank: usize) -> usize {
        self.read_bytes(rank)
    }
    fn memory_ids(&self) -> Vec<usize> {
        self.devices().to_vec()
    }
    fn memory_bandwidths(&self, _threads: usize) -> Result<Vec<(usize, f64)>> {
        self.copy_bandwidths()
    }
    fn describe(&self) -> String {
        GpuRanks::describe(self)
    }
    fn elem_bytes(&self) -> u64 {
        self.elem_bytes()
    }
    fn begin_switch(&mut self, _work: &SwitchWork<'_>, _fault: Option<usize>) -> Result<f64> {
        Err(not_yet())
    }
    fn apply_switch(
        &mut self,
        _work: &SwitchWork<'_>,
        _groups: &mut GroupCache,
        _fault: Option<usize>,
    ) -> Result<SwitchDone> {
        Err(not_yet())
    }
    fn commit_switch(&mut self, _work: &SwitchWork<'_>, _fault: Option<usize>) -> Result<f64> {
        Err(not_yet())
    }
    fn abort_switch(&mut self) {}
}
