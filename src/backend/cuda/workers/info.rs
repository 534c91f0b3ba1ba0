//! What GPU ranks report about themselves: bytes held and read, devices, free memory, group
//! kinds, a one-line description and the devices' copy bandwidth.

use super::*;
use crate::backend::cuda::ops;

/// Device bytes a GPU rank's step may take beyond what `engine::device_step_bytes` and the
/// decode attention's split scratch count: each of its twenty-odd buffers rounded up to the
/// memory pool's pieces (up to 2 MiB each), and what cuBLAS or NCCL may allocate on first use.
pub const STEP_SLACK_BYTES: u64 = 96 << 20;

/// The most a decode step's attention split scratch takes on one rank of a replica of `tp` on a
/// GPU of `num_sms` SMs, KV blocks of `block_size` tokens (`ops::split_scratch_bound` for the
/// rank's heads and the model's longest context).
pub fn step_split_bytes(cfg: &ModelConfig, tp: usize, num_sms: u32, block_size: usize) -> u64 {
    let (q, kv) = (cfg.num_heads / tp.max(1), cfg.num_kv_heads / tp.max(1));
    let max = cfg.max_position_embeddings;
    ops::split_scratch_bound(num_sms, q, kv, cfg.head_dim, max, block_size)
}

impl GpuRanks {
    /// Bytes per element of every rank's weight and KV buffers (the device dtype's size).
    pub fn elem_bytes(&self) -> u64 {
        self.dtype.size() as u64
    }

    /// (weight bytes, KV pool bytes) on physical rank `rank`'s device.
    pub fn bytes(&self, rank: usize) -> (usize, usize) {
        let u = &self.uploaded[rank];
        (u.weight_bytes, u.kv_bytes)
    }
    /// Weight bytes physical rank `rank` reads per decode step.
    pub fn read_bytes(&self, rank: usize) -> usize {
        self.uploaded[rank].read_bytes
    }
    /// Bytes an allocation can get now on each physical rank's GPU (free memory plus what the
    /// memory pool keeps idle), as each rank reports it once every rank's stream has drained (so
    /// the buffers any of them freed in stream order count as free).
    pub fn free_bytes(&self) -> Result<Vec<usize>> {
        self.all(|_, reply| Job::Sync { reply })?;
        self.all(|_, reply| Job::FreeBytes { reply })
    }

    /// Device bytes each physical rank's step holds besides what it feeds
    /// (`engine::device_step_bytes`), on ranks of a replica of `tp` with KV blocks of
    /// `block_size` tokens: the decode attention's split scratch at its largest
    /// (`ops::split_scratch_bound`), and [`STEP_SLACK_BYTES`].
    pub fn step_fixed_bytes(&self, cfg: &ModelConfig, tp: usize, block_size: usize) -> Vec<u64> {
        self.uploaded
            .iter()
            .map(|u| step_split_bytes(cfg, tp, u.num_sms, block_size) + STEP_SLACK_BYTES)
            .collect()
    }

    /// CUDA ordinal of each physical rank.
    pub fn devices(&self) -> &[usize] {
        &self.devices
    }
    /// Device name of physical rank `rank`, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self, rank: usize) -> &str {
        &self.uploaded[rank].device_name
    }
    /// What each replica's collectives run on.
    pub fn group_kinds(&self) -> &[GroupKind] {
        &self.group_kinds
    }

    /// Where the ranks run, e.g. "2 rank(s) on GPU 0 (NVIDIA H100 80GB HBM3); collectives: ...".
    pub fn describe(&self) -> String {
        let mut per: Vec<(usize, &str, usize)> = Vec::new();
        for (rank, &o) in self.devices().iter().enumerate() {
            let name = self.device_name(rank);
            match per.iter_mut().find(|p| p.0 == o) {
                Some(p) => p.2 += 1,
                None => per.push((o, name, 1)),
            }
        }
        let gpus: Vec<String> = per
            .iter()
            .map(|(o, name, n)| format!("{n} rank(s) on GPU {o} ({name})"))
            .collect();
        let kinds: Vec<&str> = self.group_kinds().iter().map(|k| k.name()).collect();
        format!("{}; collectives: {}", gpus.join(", "), kinds.join(", "))
    }

    /// Measured device copy bandwidth (bytes/s, read + write) of each GPU the ranks use,
    /// ascending by ordinal.
    pub fn copy_bandwidths(&self) -> Result<Vec<(usize, f64)>> {
        let mut ids = self.devices().to_vec();
        ids.sort_unstable();
        ids.dedup();
        ids.iter()
            .map(|&o| {
                let dev = CudaDev::new(o)?;
                Ok((o, crate::backend::cuda::bench::copy_bandwidth(&dev)?))
            })
            .collect()
    }
}
