//! The ranks behind an engine, whatever runs them: one interface ([`RankSet`]), two backends.
//!
//! - [`CpuRanks`]: the reference. Each rank's shard and KV pool are host memory; a step runs one
//!   scoped thread per busy rank over `model::decoder::forward`, with `CpuComm` groups from the
//!   engine's `GroupCache`.
//! - `GpuRanks` (feature `cuda`, `backend::cuda::workers`): each rank is a long-lived worker
//!   thread owning its device, shard and KV pool; a step sends each busy rank its packed batch.
//!
//! The engine owns everything above the ranks (requests, block tables, allocators, sampling), so
//! the scheduling, the paged-KV bookkeeping and the sampler are the same code on both backends.

use crate::error::{Error, Result};
use crate::kv::KvPool;
use crate::model::config::ModelConfig;
use crate::model::decoder::{forward, RankWeights, SeqInput};
use crate::parallel::{Comm, GroupCache, Layout};

/// Which backend runs the ranks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// Host threads, f32 compute (the reference).
    #[default]
    Cpu,
    /// GPU ranks (needs a build with `--features cuda`). `devices[r]` is rank r's CUDA ordinal;
    /// `None` picks one GPU per rank when there are at least `world` GPUs, else GPU 0 for all.
    Cuda { devices: Option<Vec<usize>> },
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda { .. } => "cuda",
        }
    }
}

/// What a step needs from the engine besides the batch.
pub(crate) struct StepCtx<'a> {
    pub cfg: &'a ModelConfig,
    pub layout: &'a Layout,
    pub inv_freq: &'a [f32],
    pub groups: &'a mut GroupCache,
}

/// A set of `world` ranks arranged as `layout`: runs one step and reports memory.
pub(crate) trait RankSet {
    /// Runs replica d's packed batch `inputs[d]` through its tp ranks (idle replicas have an empty
    /// batch). Returns each replica's logits [n_seqs, vocab] (empty for idle replicas). On error
    /// no sequence's cached-token count may be assumed to have advanced.
    fn forward(&mut self, ctx: StepCtx<'_>, inputs: &[Vec<SeqInput<'_>>]) -> Result<Vec<Vec<f32>>>;
    /// (weight bytes, KV pool bytes) held by physical rank `rank`.
    fn rank_bytes(&self, rank: usize) -> (usize, usize);
    /// Weight bytes physical rank `rank` reads per decode step (an untied embedding is not read
    /// whole): what the bandwidth roofline counts.
    fn decode_read_bytes(&self, rank: usize) -> usize;
    /// Which memory each physical rank reads its weights from: ranks with the same id share one
    /// memory's bandwidth (every CPU rank shares host memory; GPU ranks their GPU's).
    fn memory_ids(&self) -> Vec<usize>;
    /// Measured copy bandwidth (bytes/s, read + write) of each distinct memory id, ascending;
    /// `threads` host threads copy at once on the CPU.
    fn memory_bandwidths(&self, threads: usize) -> Result<Vec<(usize, f64)>>;
    /// Where the ranks run, for reports, e.g. "2 ranks on NVIDIA H100 80GB HBM3 (GPU 0)".
    fn describe(&self) -> String;
}

/// Host ranks: shards and pools in host memory.
pub(crate) struct CpuRanks {
    pub weights: Vec<RankWeights>,
    pub pools: Vec<KvPool>,
}

impl RankSet for CpuRanks {
    fn forward(&mut self, ctx: StepCtx<'_>, inputs: &[Vec<SeqInput<'_>>]) -> Result<Vec<Vec<f32>>> {
        let StepCtx {
            cfg,
            layout,
            inv_freq,
            groups,
        } = ctx;
        let dp = layout.dp();
        let comms: Vec<_> = (0..dp)
            .map(|d| {
                if inputs[d].is_empty() {
                    Vec::new()
                } else {
                    groups.get(layout.replica_ranks(d))
                }
            })
            .collect();
        let results: Vec<(usize, usize, Result<Vec<f32>>)> = std::thread::scope(|sc| {
            let hs: Vec<_> = self
                .weights
                .iter()
                .zip(self.pools.iter_mut())
                .enumerate()
                .filter_map(|(rank, (w, kv))| {
                    let (d, t) = layout.position(rank);
                    if inputs[d].is_empty() {
                        return None;
                    }
                    let comm = comms[d][t].clone();
                    let inp = &inputs[d];
                    Some((
                        rank,
                        t,
                        sc.spawn(move || {
                            let r = forward(cfg, w, kv, inv_freq, &comm, inp);
                            if r.is_err() {
                                comm.poison();
                            }
                            r
                        }),
                    ))
                })
                .collect();
            // Join every rank, so a failure anywhere is reported rather than left behind.
            hs.into_iter()
                .map(|(rank, t, h)| {
                    let r = h.join().unwrap_or_else(|_| {
                        Err(Error::Rank {
                            rank,
                            msg: "worker panicked".into(),
                        })
                    });
                    (rank, t, r)
                })
                .collect()
        });
        let mut logits = vec![Vec::new(); dp];
        for (rank, t, r) in results {
            let l = r?;
            if t == 0 {
                logits[layout.position(rank).0] = l;
            }
        }
        Ok(logits)
    }

    fn rank_bytes(&self, rank: usize) -> (usize, usize) {
        (self.weights[rank].bytes(), self.pools[rank].bytes())
    }
    fn decode_read_bytes(&self, rank: usize) -> usize {
        self.weights[rank].decode_read_bytes()
    }
    fn memory_ids(&self) -> Vec<usize> {
        vec![0; self.weights.len()]
    }
    fn memory_bandwidths(&self, threads: usize) -> Result<Vec<(usize, f64)>> {
        Ok(vec![(0, crate::backend::cpu::copy_bandwidth(threads))])
    }
    fn describe(&self) -> String {
        format!("{} CPU rank thread(s)", self.weights.len())
    }
}

/// The ranks of an engine on one of the backends.
pub(crate) enum Ranks {
    Cpu(CpuRanks),
    #[cfg(feature = "cuda")]
    Gpu(crate::backend::cuda::workers::GpuRanks),
}

impl Ranks {
    pub fn set(&mut self) -> &mut dyn RankSet {
        match self {
            Ranks::Cpu(c) => c,
            #[cfg(feature = "cuda")]
            Ranks::Gpu(g) => g,
        }
    }
    pub fn set_ref(&self) -> &dyn RankSet {
        match self {
            Ranks::Cpu(c) => c,
            #[cfg(feature = "cuda")]
            Ranks::Gpu(g) => g,
        }
    }
    pub fn backend(&self) -> &'static str {
        match self {
            Ranks::Cpu(_) => "cpu",
            #[cfg(feature = "cuda")]
            Ranks::Gpu(_) => "cuda",
        }
    }
    /// The host ranks, or a clear error naming `what` for GPU ranks.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn cpu_mut(&mut self, what: &str) -> Result<&mut CpuRanks> {
        match self {
            Ranks::Cpu(c) => Ok(c),
            #[cfg(feature = "cuda")]
            Ranks::Gpu(_) => Err(Error::Invalid(format!(
                "{what} is implemented on the CPU backend only; GPU ranks cannot do it yet"
            ))),
        }
    }
}

#[cfg(feature = "cuda")]
impl RankSet for crate::backend::cuda::workers::GpuRanks {
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
        let mut ids = self.devices().to_vec();
        ids.sort_unstable();
        ids.dedup();
        ids.iter()
            .map(|&o| {
                let dev = crate::backend::cuda::CudaDev::new(o)?;
                Ok((o, crate::backend::cuda::bench::copy_bandwidth(&dev)?))
            })
            .collect()
    }
    fn describe(&self) -> String {
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
}
