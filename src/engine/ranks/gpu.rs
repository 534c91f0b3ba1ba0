//! GPU ranks behind the engine's [`RankSet`]: `backend::cuda::GpuRanks`, one long-lived worker
//! thread per rank owning its device, shard and KV pool (a stub that refuses to start in builds
//! without the `cuda` feature).

use super::{RankSet, StepCtx};
use crate::backend::cuda::GpuRanks;
use crate::error::Result;
use crate::model::decoder::SeqInput;

impl RankSet for GpuRanks {
    fn forward(&mut self, ctx: StepCtx<'_>, inputs: &[Vec<SeqInput<'_>>]) -> Result<Vec<Vec<f32>>> {
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
}
