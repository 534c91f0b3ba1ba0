//! A roofline-modeled profile: decode, prefill and switch numbers for a model shape on an H100-like
//! node, for when no measured profile exists. Every constant is stated here.
//!
//! Decode step of one tp-replica with `batch` sequences of mean context `ctx` (bf16):
//!
//! ```text
//! t_mem     = (W_step / tp + batch * ctx * KV_tok / tp) / (HBM * 0.80)
//! t_compute = 2 * P_step * batch / tp / (FLOPS * 0.60)
//! t_ar      = 2 * layers * (lat + 2 (tp-1)/tp * batch * hidden * 2 / (LINK * 0.80))   (tp > 1)
//! step_ms   = max(t_mem, t_compute) + 1.0 ms + batch * per_seq + t_ar
//! ```
//!
//! - `W_step`: bytes of every layer matrix plus the lm_head (read once per step, split by tp);
//!   `P_step` the same in parameters. `KV_tok`: K+V bytes per cached token (128 KiB for 8B).
//! - 0.80 of HBM peak: the best paged-attention kernels reach 78-80% of peak (public measurements of paged-attention kernels).
//! - 0.60 of dense bf16 peak for the matmuls; decode at batch <= 128 stays memory-bound anyway.
//! - 1.0 ms per step: kernel launches (graph replay), sampling and scheduling. Calibrated so that
//!   batch-1 TP1 LLaMA-3.1-8B is 6.6 ms (engines: 7.2-7.7 ms; roofline 4.48 ms) and the batch-1
//!   TP8/TP1 speed-up is ~3x (gpt-fast: 3.13x).
//! - `per_seq`: engine work per sequence per step that no layout divides (scheduler, stop checks,
//!   detokenization, host-side sampling). 0 by default: it is not physics, and no public number
//!   pins it. It is the knob that decides whether a low TP degree beats TP8 on the full batch:
//!   on the NVLink H100 model TP8 wins every phase at 128 sequences unless per_seq is above
//!   ~20 us (PAT measured TP2 x DP4 as the best static layout, so its engine sits above that).
//! - Two all-reduces per layer (after attention-out and MLP-down), ring algorithm: each rank sends
//!   and receives `2 (tp-1)/tp` of the message. NVLink: 900 GB/s bidirectional -> 450 GB/s one
//!   way, 8 us per small all-reduce (public measurements: NCCL 6-20 us, custom all-reduce 3.7-11.8 us). PCIe Gen4:
//!   ~25 GB/s one way, 20 us. A link given in GB/s is one-way; its latency is 8 us above 100 GB/s
//!   and 20 us otherwise. 0.80 of the link is achievable.
//!
//! Prefill tokens/s at tp = `tp * FLOPS * 0.50 / (2 * P_step)` (compute-bound, attention's
//! quadratic part and comm ignored). Transfers (`transfer_bytes_per_s`, switch weight and KV
//! rates) run at 0.80 of the one-way link. Switch `fixed_ms` = 2130: PAT's measured CUDA-graph
//! recapture (0.73 s) plus "rest" (~1.4 s); the KV and weight parts of PAT's 5.52 s are modeled
//! from bytes instead (see `decide::SwitchCost`).
//!
//! Not modeled: KV capacity limits and preemption, GEMM efficiency loss on small shards, jitter
//! between ranks at each all-reduce, CPU scheduling cost growing with batch.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use super::profile::{
    DecodeSample, ModelDims, PrefillSample, Profile, SwitchProfile, MEASURED_GROUPS,
    PROFILE_VERSION,
};
use crate::error::{Error, Result};
use crate::model::config::Arch;
use crate::model::init::{preset_dims, Preset};

pub const HBM_EFFICIENCY: f64 = 0.80;
pub const MATMUL_EFFICIENCY: f64 = 0.60;
pub const PREFILL_EFFICIENCY: f64 = 0.50;
pub const LINK_EFFICIENCY: f64 = 0.80;
pub const STEP_OVERHEAD_MS: f64 = 1.0;
pub const SWITCH_FIXED_MS: f64 = 2130.0;

/// Batches and contexts the modeled profile samples (the predictor fits through them).
pub const BATCHES: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];
pub const CONTEXTS: [usize; 7] = [256, 1024, 4096, 8192, 16384, 24576, 32768];

/// The model shapes with built-in dims (public measurements of paged-attention kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelShape {
    /// LLaMA-3.1-8B: 32 layers, hidden 4096, 32/8 heads, head_dim 128, ffn 14336, vocab 128256.
    Llama3_8b,
    /// Qwen3-14B: 40 layers, hidden 5120, 40/8 heads, head_dim 128, ffn 17408, vocab 151936.
    Qwen3_14b,
}

impl ModelShape {
    /// The real model's dimensions (the same table `pat init-model --preset llama3-8b-shape`
    /// writes), bf16.
    pub fn dims(self) -> ModelDims {
        let arch = match self {
            ModelShape::Llama3_8b => Arch::Llama,
            ModelShape::Qwen3_14b => Arch::Qwen3,
        };
        preset_dims(arch, Preset::Llama3_8bShape).dims
    }
}

impl FromStr for ModelShape {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "llama3-8b" => Ok(ModelShape::Llama3_8b),
            "qwen3-14b" => Ok(ModelShape::Qwen3_14b),
            o => Err(Error::Invalid(format!(
                "unknown model shape `{o}` (expected llama3-8b or qwen3-14b)"
            ))),
        }
    }
}

impl fmt::Display for ModelShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelShape::Llama3_8b => "llama3-8b",
            ModelShape::Qwen3_14b => "qwen3-14b",
        })
    }
}

/// The rank-to-rank link inside the node.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Link {
    /// 450 GB/s one way, 8 us per small all-reduce.
    NvLink,
    /// 25 GB/s one way, 20 us per small all-reduce.
    Pcie,
    /// A one-way bandwidth in GB/s.
    GBps(f64),
}

impl Link {
    /// One-way peak bandwidth in bytes/s.
    pub fn bytes_per_s(self) -> f64 {
        match self {
            Link::NvLink => 450e9,
            Link::Pcie => 25e9,
            Link::GBps(g) => g * 1e9,
        }
    }
    /// Latency of one small all-reduce, seconds.
    pub fn latency_s(self) -> f64 {
        if self.bytes_per_s() > 100e9 {
            8e-6
        } else {
            20e-6
        }
    }
}

impl FromStr for Link {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nvlink" => Ok(Link::NvLink),
            "pcie" => Ok(Link::Pcie),
            n => match n.parse::<f64>() {
                Ok(g) if g.is_finite() && g > 0.0 => Ok(Link::GBps(g)),
                _ => Err(Error::Invalid(format!(
                    "bad link `{s}` (expected nvlink, pcie or a positive bandwidth in GB/s)"
                ))),
            },
        }
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::NvLink => write!(f, "NVLink 450 GB/s one-way, 8 us"),
            Link::Pcie => write!(f, "PCIe 25 GB/s one-way, 20 us"),
            Link::GBps(g) => write!(f, "{g} GB/s one-way, {:.0} us", self.latency_s() * 1e6),
        }
    }
}

/// Per-GPU physical limits, and the engine overheads of a decode step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hardware {
    pub hbm_bytes_per_s: f64,
    /// Dense bf16 FLOP/s.
    pub flops: f64,
    pub link: Link,
    /// Fixed cost per decode step (launches, sampling, scheduling), seconds. Default 1.0 ms.
    pub step_overhead_s: f64,
    /// Engine cost per sequence per step that tp does not divide, seconds. Default 0.
    pub per_seq_overhead_s: f64,
}

impl Hardware {
    fn new(hbm_bytes_per_s: f64, flops: f64, link: Link) -> Hardware {
        Hardware {
            hbm_bytes_per_s,
            flops,
            link,
            step_overhead_s: STEP_OVERHEAD_MS / 1e3,
            per_seq_overhead_s: 0.0,
        }
    }
    /// H100 SXM: 3.35 TB/s HBM, ~990 TFLOP/s dense bf16.
    pub fn h100(link: Link) -> Hardware {
        Hardware::new(3.35e12, 990e12, link)
    }
    /// H200: 4.8 TB/s HBM, same compute as H100.
    pub fn h200(link: Link) -> Hardware {
        Hardware::new(4.8e12, 990e12, link)
    }
    /// A40: 696 GB/s GDDR6, ~150 TFLOP/s dense bf16.
    pub fn a40(link: Link) -> Hardware {
        Hardware::new(696e9, 150e12, link)
    }
}

/// Modeled decode step (ms) of one replica: the formula in the module docs.
pub fn modeled_step_ms(d: &ModelDims, hw: &Hardware, tp: usize, batch: usize, ctx: f64) -> f64 {
    let (tpf, b) = (tp as f64, batch as f64);
    let bytes =
        d.step_read_params() * d.dtype_bytes as f64 / tpf + b * ctx * d.kv_bytes_per_token() / tpf;
    let t_mem = bytes / (hw.hbm_bytes_per_s * HBM_EFFICIENCY);
    let t_compute = 2.0 * d.step_read_params() * b / tpf / (hw.flops * MATMUL_EFFICIENCY);
    let t_ar = if tp > 1 {
        let msg = b * d.hidden_size as f64 * d.dtype_bytes as f64;
        let one = hw.link.latency_s()
            + 2.0 * (tpf - 1.0) / tpf * msg / (hw.link.bytes_per_s() * LINK_EFFICIENCY);
        2.0 * d.num_layers as f64 * one
    } else {
        0.0
    };
    1e3 * (t_mem.max(t_compute) + t_ar + hw.step_overhead_s + b * hw.per_seq_overhead_s)
}

/// A profile for `shape` on a `world`-GPU node of `hw`, every number from the roofline model.
pub fn modeled_profile(shape: ModelShape, hw: Hardware, world: usize) -> Result<Profile> {
    let dims = shape.dims();
    let tps = dims.candidate_tps(world);
    if world == 0 || tps.is_empty() {
        return Err(Error::Invalid(format!(
            "world {world}: no tp degree divides it and the {shape} dims"
        )));
    }
    let mut decode = Vec::new();
    for &tp in &tps {
        for &batch in &BATCHES {
            for &context in &CONTEXTS {
                decode.push(DecodeSample {
                    tp,
                    batch,
                    context,
                    step_ms: modeled_step_ms(&dims, &hw, tp, batch, context as f64),
                });
            }
        }
    }
    let prefill = tps
        .iter()
        .map(|&tp| PrefillSample {
            tp,
            tokens_per_s: tp as f64 * hw.flops * PREFILL_EFFICIENCY
                / (2.0 * dims.step_read_params()),
        })
        .collect();
    let link = hw.link.bytes_per_s() * LINK_EFFICIENCY;
    Ok(Profile {
        version: PROFILE_VERSION,
        world,
        backend: "modeled".into(),
        device: format!(
            "modeled: {world} GPUs, {:.2} TB/s HBM x{HBM_EFFICIENCY}, {:.0} TFLOP/s, link {}, step overhead {} ms, per-sequence {} us",
            hw.hbm_bytes_per_s / 1e12,
            hw.flops / 1e12,
            hw.link,
            hw.step_overhead_s * 1e3,
            hw.per_seq_overhead_s * 1e6
        ),
        decode,
        prefill,
        transfer_bytes_per_s: link,
        switch: SwitchProfile {
            fixed_ms: SWITCH_FIXED_MS,
            weight_bytes_per_s: link,
            kv_bytes_per_s: link,
        },
        measured: MEASURED_GROUPS
            .iter()
            .map(|g| (g.to_string(), false))
            .collect::<BTreeMap<_, _>>(),
        model: dims,
        source: "<modeled>".into(),
    })
}
