//! Modeled nodes: the model shapes with built-in dims, the links between GPUs, and PAT's switch
//! constant. The cost model of a modeled node is `crate::sim::component` (a roofline alone made
//! TP8 win every phase, so adaptive TP bought nothing by construction).

use std::fmt;
use std::str::FromStr;

use super::profile::ModelDims;
use crate::error::{Error, Result};
use crate::model::config::Arch;
use crate::model::init::{preset_dims, Preset};

/// A switch's fixed cost, ms: PAT's measured CUDA-graph recapture (0.73 s) plus "rest" (~1.4 s);
/// the KV and weight parts of PAT's 5.52 s are modeled from bytes instead
/// (`policy::decide::SwitchCost`).
pub const SWITCH_FIXED_MS: f64 = 2130.0;

/// The model shapes with built-in dims.
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

    /// The real model's context length (131072 for LLaMA-3.1-8B, 40960 for Qwen3-14B).
    pub fn max_position_embeddings(self) -> usize {
        let arch = match self {
            ModelShape::Llama3_8b => Arch::Llama,
            ModelShape::Qwen3_14b => Arch::Qwen3,
        };
        preset_dims(arch, Preset::Llama3_8bShape).max_position_embeddings
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
}

impl FromStr for Link {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nvlink" => Ok(Link::NvLink),
            "pcie" => Ok(Link::Pcie),
            n => match n.parse::<f64>() {
                // 0.1 GB/s is below gigabit Ethernet; 10 TB/s above any GPU link.
                Ok(g) if (0.1..=1e4).contains(&g) => Ok(Link::GBps(g)),
                _ => Err(Error::Invalid(format!(
                    "bad link `{s}` (expected nvlink, pcie or a one-way bandwidth in GB/s, 0.1 \
                     to 10000)"
                ))),
            },
        }
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The all-reduce latencies of the component model's tables (`crate::sim::component`).
            Link::NvLink => write!(f, "NVLink 450 GB/s one-way, all-reduce latency 5-8 us"),
            Link::Pcie => write!(f, "PCIe 25 GB/s one-way, all-reduce latency 20 us"),
            Link::GBps(g) if *g > 100.0 => {
                write!(f, "{g} GB/s one-way, all-reduce latency 5-8 us")
            }
            Link::GBps(g) => write!(f, "{g} GB/s one-way, all-reduce latency 20 us"),
        }
    }
}
