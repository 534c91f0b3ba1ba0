//! Engine settings, and sizing the paged KV pool from a memory budget with the one
//! bytes-per-block formula ([`kv_block_bytes`]).

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::sampling::SamplingParams;

use super::ranks::Backend;
use crate::kv::kv_block_bytes;

/// Tokens per KV block unless told otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub world: usize,
    pub tp: usize,
    pub block_size: usize,
    /// KV blocks per rank.
    pub kv_blocks: usize,
    pub dtype: Dtype,
    pub sampling: SamplingParams,
}

impl Backend {
    /// Bytes per KV-cache element on this backend: the CPU reference keeps f32 whatever the
    /// weight dtype; GPU ranks store KV in the dtype.
    pub fn kv_elem_bytes(&self, dtype: Dtype) -> usize {
        match self {
            Backend::Cpu => 4,
            Backend::Cuda { .. } => dtype.size_bytes(),
        }
    }
}

impl EngineOptions {
    /// `world` ranks at `tp`, greedy sampling, default block size, and a KV pool of
    /// `kv_bytes_per_rank` per rank on `backend` (at least one block).
    pub fn for_memory_budget(
        cfg: &ModelConfig,
        backend: &Backend,
        world: usize,
        tp: usize,
        dtype: Dtype,
        kv_bytes_per_rank: u64,
    ) -> Result<EngineOptions> {
        let mut o = EngineOptions {
            world,
            tp,
            block_size: DEFAULT_BLOCK_SIZE,
            kv_blocks: 0,
            dtype,
            sampling: SamplingParams::default(),
        };
        o.kv_blocks = o.blocks_in(cfg, backend, kv_bytes_per_rank)?.max(1);
        Ok(o)
    }

    /// Bytes of one KV block on one rank under these options.
    pub fn block_bytes(&self, cfg: &ModelConfig, backend: &Backend) -> u64 {
        kv_block_bytes(
            cfg,
            self.tp,
            self.block_size,
            backend.kv_elem_bytes(self.dtype),
        )
    }

    /// Whole KV blocks per rank that fit in `bytes`.
    pub fn blocks_in(&self, cfg: &ModelConfig, backend: &Backend, bytes: u64) -> Result<usize> {
        if self.tp == 0 || self.block_size == 0 {
            return Err(Error::Invalid(format!(
                "`tp` ({}) and `block_size` ({}) must be at least 1",
                self.tp, self.block_size
            )));
        }
        let per = self.block_bytes(cfg, backend).max(1);
        usize::try_from(bytes / per)
            .map_err(|_| Error::Invalid(format!("a KV budget of {bytes} bytes is too large")))
    }
}
