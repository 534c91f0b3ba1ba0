//! The `cuda` backend in a build without the `cuda` feature: the same names the engine uses, a
//! [`GpuRanks`] that cannot exist (its constructor says how to build the real one), so code above
//! the backend needs no `cfg` arms.

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::kv::KvPool;
use crate::model::config::ModelConfig;
use crate::model::decoder::{RankWeights, SeqInput};
use crate::model::weights::Checkpoint;
use crate::parallel::Layout;

/// The error every GPU entry point returns in this build.
pub fn not_built() -> Error {
    Error::Invalid(
        "`backend cuda`: this pat was built without the `cuda` feature; rebuild with \
         `cargo build --release --features cuda` (needs nvcc, see scripts/install-cuda-toolchain.sh)"
            .into(),
    )
}

/// Kernel launches so far: none in a build without the `cuda` feature.
pub fn launches() -> u64 {
    0
}

/// How an engine's ranks go onto GPUs (see the real backend).
#[derive(Clone, Debug)]
pub struct GpuOptions {
    pub devices: Option<Vec<usize>>,
    pub dtype: Dtype,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub inv_freq: Vec<f32>,
}

/// GPU ranks: uninhabited here, so every method below is unreachable.
pub enum GpuRanks {}

impl GpuRanks {
    pub fn new(
        _cfg: &ModelConfig,
        _ck: &Checkpoint,
        _layout: &Layout,
        _opts: &GpuOptions,
    ) -> Result<GpuRanks> {
        Err(not_built())
    }
    pub fn step(
        &mut self,
        _layout: &Layout,
        _inputs: &[Vec<SeqInput<'_>>],
    ) -> Result<Vec<Vec<f32>>> {
        match *self {}
    }
    pub fn bytes(&self, _rank: usize) -> (usize, usize) {
        match *self {}
    }
    pub fn read_bytes(&self, _rank: usize) -> usize {
        match *self {}
    }
    pub fn devices(&self) -> &[usize] {
        match *self {}
    }
    pub fn describe(&self) -> String {
        match *self {}
    }
    pub fn elem_bytes(&self) -> u64 {
        match *self {}
    }
    pub fn broken(&self) -> Option<&str> {
        match *self {}
    }
    pub fn check_groups(&self, _layout: &Layout) -> Result<()> {
        match *self {}
    }
    pub fn step_fixed_bytes(&self, _cfg: &ModelConfig, _tp: usize, _bs: usize) -> Vec<u64> {
        Vec::new()
    }
    pub fn free_bytes(&self) -> Result<Vec<usize>> {
        match *self {}
    }
    pub fn world_kind(&self) -> Option<()> {
        match *self {}
    }
    pub fn world_shares_memory(&self) -> bool {
        match *self {}
    }
    pub fn grow_kv(&mut self, _blocks: usize, _used: usize) -> Result<usize> {
        match *self {}
    }
    pub fn switch_begin(
        &mut self,
        _plan: std::sync::Arc<crate::reshard::SwitchPrograms>,
        _new: &Layout,
        _fault: Option<usize>,
    ) -> Result<()> {
        match *self {}
    }
    pub fn switch_apply(&mut self, _fault: Option<usize>) -> Result<crate::backend::DeviceApplied> {
        match *self {}
    }
    pub fn switch_commit(
        &mut self,
        _plan: &crate::reshard::SwitchPrograms,
        _new: &Layout,
        _fault: Option<usize>,
    ) -> Result<()> {
        match *self {}
    }
    pub fn switch_abort(&mut self) {
        match *self {}
    }
    pub fn download(&self) -> Result<Vec<(RankWeights, KvPool)>> {
        match *self {}
    }
    pub fn layout(&self) -> &Layout {
        match *self {}
    }
    pub fn replace(&mut self, _layout: &Layout, _ranks: Vec<(RankWeights, KvPool)>) -> Result<()> {
        match *self {}
    }
    pub fn set_broken(&mut self, _why: String) {
        match *self {}
    }
    pub fn copy_bandwidths(&self) -> Result<Vec<(usize, f64)>> {
        match *self {}
    }
    pub fn group_counts(&self) -> crate::backend::GroupCounts {
        match *self {}
    }
}
