//! The component cost model: the simulator's clock for a modeled GPU node (the policy never sees
//! it; it sees a predictor fitted to a profile sampled from it).
//!
//! One decode step of one tp-replica with `B` sequences of mean context `ctx` (per rank, bf16):
//!
//! ```text
//! gemm(K, N)   = gemm_launch + max(gemm_floor, K*N*e / BW, 2*B*K*N / matmul_flops)
//! layer        = gemm(h, (q + 2 kv_r)/..) + gemm(q/tp, h) + gemm(h, 2 f/tp) + gemm(f/tp, h)
//!              + small_kernels * small_kernel + B*(4h + 3f/tp)*e / BW
//!              + attn_launch + max(attn_floor, B*ctx*2*kv_r*d*e / BW_attn(B*kv_r))
//!              + 2 * allreduce(tp, B*h*e)                                   (tp > 1)
//! gpu          = L*layer + gemm(h, V/tp) + logits_gather + sampling + misc
//! host         = host_step + B*host_per_seq
//! step         = max(gpu + fixed_step, host)      (overlapped host: the default)
//!              = gpu + fixed_step + host          (no overlap)
//! ```
//!
//! `BW = hbm_bytes_per_s * hbm_efficiency`; `BW_attn(u)` rises log-linearly from
//! `attn_bw_one_unit` (one (sequence, kv head) unit per rank) to `attn_bw_saturated` at
//! `attn_units_saturate` units (fractions of HBM peak); `allreduce(tp, bytes) = latency(tp) +
//! bytes / algbw(tp)` from a per-link table; `kv_r = max(1, kv_heads / tp)`.
//!
//! Every constant is a field of [`ComponentParams`], overridable from a JSON file. The defaults
//! are public H100 SXM measurements (sources in the field docs), and [`super::calibration::CALIBRATION`] lists the public step times the model is
//! checked against (the test `component_model_matches_public_measurements` fails when it drifts
//! more than 25%).
//!
//! Also here: prefill tokens/s (`tp * prefill_flops / 2P`) and the KV capacity of a replica at a
//! memory fraction (`tp * mem_fraction * gpu_memory - weights`, over the KV bytes per token of
//! the replica, kv heads replicated when tp > kv heads).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::dims::ModelDims;
use crate::policy::modeled::Link;

mod step;
pub use step::{BatchTerms, StepBreakdown};

/// One row of an all-reduce table: latency and algorithm bandwidth at a tp degree.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllReducePoint {
    pub tp: usize,
    pub latency_us: f64,
    /// Message bytes / (time - latency), GB/s.
    pub algbw_gbps: f64,
}

/// Every constant of the component model (module docs). Units in the field names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentParams {
    /// What these numbers describe (printed in reports).
    pub name: String,
    /// HBM peak, bytes/s (H100 SXM 3.35e12, H200 4.8e12, A40 0.696e12).
    pub hbm_bytes_per_s: f64,
    /// Fraction of peak a weight-streaming GEMM reaches (2.6 of 3.35 TB/s: the wide-N GEMV in
    /// onnxruntime#32382 reaches 95% of achievable, achievable ~80% of peak).
    pub hbm_efficiency: f64,
    /// Achieved dense matmul FLOP/s (600e12: ~60% of H100 bf16 peak).
    pub matmul_flops: f64,
    /// GPU memory, bytes (80e9 for H100).
    pub gpu_memory_bytes: f64,
    /// Launch gap per GEMM inside a graph, us (~1.3 us measured per kernel; anchors-perf §2a).
    pub gemm_launch_us: f64,
    /// Shortest GEMM, us (skinny GEMV N=1024,K=3072: 6.27 us, onnxruntime#32382).
    pub gemm_floor_us: f64,
    /// Non-GEMM kernels per layer (norms, rope, residual adds, activation) and their time each.
    pub small_kernels_per_layer: f64,
    pub small_kernel_us: f64,
    /// Decode attention: launch, floor (FlashInfer batch 1: 12.3 us at 1K ctx, vllm-fa#63).
    pub attn_launch_us: f64,
    pub attn_floor_us: f64,
    /// Attention bandwidth as a fraction of HBM peak at one (sequence, kv head) unit per rank and
    /// at saturation (1.3 and 2.6 TB/s on H100: FlashInfer 16K batch-1 reaches 1.34 TB/s).
    pub attn_bw_one_unit: f64,
    pub attn_bw_saturated: f64,
    pub attn_units_saturate: f64,
    /// All-reduce latency and algorithm bandwidth per tp (custom all-reduce, 8xH100:
    /// sglang#2904: 3.9-7.8 us small, 7.9-16.7 us at 512 KiB). A tp beyond the table uses its
    /// last row.
    pub allreduce: Vec<AllReducePoint>,
    /// Logits all-gather bandwidth, GB/s.
    pub logits_gather_gbps: f64,
    /// Sampling: kernels and fp32 passes over batch x vocab.
    pub sampling_kernels: f64,
    pub sampling_passes: f64,
    /// Other per-step device work, us.
    pub misc_us: f64,
    /// Per-step device cost that no layout divides (graph launch, metadata copy, token D2H), ms.
    pub fixed_step_ms: f64,
    /// Host cost per step and per sequence per step (scheduler, stop checks, detokenization):
    /// ~1.1 us/seq for one modern vLLM V1 loop (vllm#46112), ~100 us/seq for vLLM 0.5
    /// (vllm#6801). 20 us is the central value, 80 us PAT-era engines.
    pub host_step_ms: f64,
    pub host_per_seq_us: f64,
    /// Host work overlaps the device (SGLang >= 0.4 overlap scheduler): step = max(host, device).
    pub overlap_host: bool,
    /// Prefill FLOP/s per GPU (compute-bound; half of dense peak).
    pub prefill_flops: f64,
    /// Fraction of GPU memory the engine may use (colocated RL: 0.4-0.6).
    pub mem_fraction: f64,
    /// Point-to-point bytes/s between ranks for a switch's transfers (0.8 of the one-way link).
    pub link_bytes_per_s: f64,
}

/// The GPUs with built-in defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuKind {
    H100,
    H200,
    A40,
}

impl GpuKind {
    /// The link its 8-GPU nodes have: NVLink/NVSwitch for H100 and H200 (SXM); PCIe for A40
    /// (its NVLink bridge joins two cards, not a node).
    pub fn default_link(self) -> Link {
        match self {
            GpuKind::H100 | GpuKind::H200 => Link::NvLink,
            GpuKind::A40 => Link::Pcie,
        }
    }
}

fn nvlink_allreduce() -> Vec<AllReducePoint> {
    [(2, 5.0, 150.0), (4, 6.0, 100.0), (8, 8.0, 80.0)]
        .iter()
        .map(|&(tp, latency_us, algbw_gbps)| AllReducePoint {
            tp,
            latency_us,
            algbw_gbps,
        })
        .collect()
}

/// A ring all-reduce over a one-way link of `gbps` at 0.8 efficiency: each rank moves
/// `2 (tp-1)/tp` of the message, so algbw = 0.8 link * tp / (2 (tp - 1)).
fn ring_allreduce(gbps: f64, latency_us: f64) -> Vec<AllReducePoint> {
    [2usize, 4, 8]
        .iter()
        .map(|&tp| AllReducePoint {
            tp,
            latency_us,
            algbw_gbps: 0.8 * gbps * tp as f64 / (2.0 * (tp as f64 - 1.0)),
        })
        .collect()
}

impl ComponentParams {
    /// The defaults for `gpu` on `link` with the central host cost (20 us per sequence).
    pub fn defaults(gpu: GpuKind, link: Link) -> ComponentParams {
        let (name, hbm, flops, mem) = match gpu {
            GpuKind::H100 => ("H100 SXM", 3.35e12, 990e12, 80e9),
            GpuKind::H200 => ("H200", 4.8e12, 990e12, 141e9),
            GpuKind::A40 => ("A40", 0.696e12, 150e12, 48e9),
        };
        let allreduce = match link {
            Link::NvLink => nvlink_allreduce(),
            Link::Pcie => ring_allreduce(25.0, 20.0),
            Link::GBps(g) if g > 100.0 => nvlink_allreduce()
                .into_iter()
                .map(|p| AllReducePoint {
                    algbw_gbps: p.algbw_gbps * g / 450.0,
                    ..p
                })
                .collect(),
            Link::GBps(g) => ring_allreduce(g, 20.0),
        };
        ComponentParams {
            name: format!("{name}, {link}"),
            hbm_bytes_per_s: hbm,
            hbm_efficiency: 0.78,
            matmul_flops: 0.6 * flops,
            gpu_memory_bytes: mem,
            gemm_launch_us: 1.5,
            gemm_floor_us: 4.0,
            small_kernels_per_layer: 6.0,
            small_kernel_us: 2.5,
            attn_launch_us: 1.5,
            attn_floor_us: 8.0,
            attn_bw_one_unit: 1.3 / 3.35,
            attn_bw_saturated: 2.6 / 3.35,
            attn_units_saturate: 64.0,
            allreduce,
            logits_gather_gbps: 150.0,
            sampling_kernels: 3.0,
            sampling_passes: 3.0,
            misc_us: 15.0,
            fixed_step_ms: 0.5,
            host_step_ms: 1.5,
            host_per_seq_us: 20.0,
            overlap_host: true,
            prefill_flops: 0.5 * flops,
            mem_fraction: 0.5,
            link_bytes_per_s: 0.8 * link.bytes_per_s(),
        }
    }

    /// `self` with the keys of a JSON object replaced (unknown keys and bad values are errors
    /// naming `what`, the file).
    pub fn overridden(&self, json: &str, what: &str) -> Result<ComponentParams> {
        let bad = |m: String| Error::Invalid(format!("{what}: {m}"));
        let over = crate::json::object(json, "must be a JSON object of component-model constants")
            .map_err(bad)?;
        let defaults = serde_json::to_value(self).map_err(|e| Error::Internal(e.to_string()))?;
        let mut base = defaults.clone();
        let obj = base
            .as_object_mut()
            .ok_or_else(|| Error::Internal("params are not an object".into()))?;
        for (k, v) in &over {
            if !obj.contains_key(k) {
                let known: Vec<&str> = obj.keys().map(|s| s.as_str()).collect();
                return Err(bad(format!(
                    "unknown key `{k}` (known: {})",
                    known.join(", ")
                )));
            }
            // Each key read alone first, so a value of the wrong kind is named by its key.
            let mut one = defaults.clone();
            one[k] = v.clone();
            if let Err(e) = serde_json::from_value::<ComponentParams>(one) {
                let kind = match &defaults[k] {
                    Value::Array(_) => "a list",
                    Value::Number(_) => "a number",
                    Value::String(_) => "a string",
                    Value::Bool(_) => "true or false",
                    _ => "a value",
                };
                return Err(bad(format!(
                    "`{k}` must be {kind} like its default, got {v} ({e})"
                )));
            }
            obj.insert(k.clone(), v.clone());
        }
        let mut p: ComponentParams =
            serde_json::from_value(base).map_err(|e| bad(format!("bad value: {e}")))?;
        p.validate().map_err(|e| bad(e.to_string()))?;
        // The name heads every report: a node with overridden constants must not read as the
        // default one (unless the file names it itself).
        if !over.iter().any(|(k, _)| k == "name") && !over.is_empty() {
            let shown: Vec<String> = over
                .iter()
                .map(|(k, v)| match v {
                    Value::Array(_) | Value::Object(_) => format!("{k} (a table)"),
                    v => format!("{k} {v}"),
                })
                .collect();
            p.name = format!("{}; overridden by {what}: {}", p.name, shown.join(", "));
        }
        Ok(p)
    }

    /// Every rate positive and finite, fractions in (0, 1], times non-negative.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hbm_bytes_per_s", self.hbm_bytes_per_s),
            ("matmul_flops", self.matmul_flops),
            ("gpu_memory_bytes", self.gpu_memory_bytes),
            ("attn_units_saturate", self.attn_units_saturate),
            ("logits_gather_gbps", self.logits_gather_gbps),
            ("prefill_flops", self.prefill_flops),
            ("link_bytes_per_s", self.link_bytes_per_s),
        ];
        let fractions = [
            ("hbm_efficiency", self.hbm_efficiency),
            ("attn_bw_one_unit", self.attn_bw_one_unit),
            ("attn_bw_saturated", self.attn_bw_saturated),
            ("mem_fraction", self.mem_fraction),
        ];
        let non_negative = [
            ("gemm_launch_us", self.gemm_launch_us),
            ("gemm_floor_us", self.gemm_floor_us),
            ("small_kernels_per_layer", self.small_kernels_per_layer),
            ("small_kernel_us", self.small_kernel_us),
            ("attn_launch_us", self.attn_launch_us),
            ("attn_floor_us", self.attn_floor_us),
            ("sampling_kernels", self.sampling_kernels),
            ("sampling_passes", self.sampling_passes),
            ("misc_us", self.misc_us),
            ("fixed_step_ms", self.fixed_step_ms),
            ("host_step_ms", self.host_step_ms),
            ("host_per_seq_us", self.host_per_seq_us),
        ];
        for (k, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::Invalid(format!("`{k}` must be positive, got {v}")));
            }
        }
        for (k, v) in fractions {
            if !(v.is_finite() && v > 0.0 && v <= 1.0) {
                return Err(Error::Invalid(format!("`{k}` must be in (0, 1], got {v}")));
            }
        }
        for (k, v) in non_negative {
            // Microseconds up to a second, milliseconds up to ten minutes, counts up to 1e4:
            // far past any real value, and sums over a whole rollout stay finite.
            let most = match k {
                _ if k.ends_with("_us") => 1e6,
                _ if k.ends_with("_ms") => crate::policy::profile::MAX_STEP_MS,
                _ => 1e4,
            };
            if !(v.is_finite() && (0.0..=most).contains(&v)) {
                return Err(Error::Invalid(format!(
                    "`{k}` must be a number from 0 to {most}, got {v:e}"
                )));
            }
        }
        for p in &self.allreduce {
            if p.tp < 2 || !(p.latency_us >= 0.0 && p.algbw_gbps > 0.0 && p.algbw_gbps.is_finite())
            {
                return Err(Error::Invalid(format!(
                    "`allreduce` row for tp {}: need tp >= 2, latency >= 0 and a positive bandwidth",
                    p.tp
                )));
            }
        }
        if self.allreduce.is_empty() {
            return Err(Error::Invalid("`allreduce` needs at least one row".into()));
        }
        Ok(())
    }

    /// (latency s, algbw bytes/s) of one all-reduce at `tp` (the row for the smallest tabled tp
    /// >= `tp`, else the last).
    pub fn allreduce_at(&self, tp: usize) -> (f64, f64) {
        // (What sorting the rows by tp and taking the first with tp >= `tp`, else the last, picks;
        // without copying the table: this runs for every modeled step.)
        let p = self
            .allreduce
            .iter()
            .filter(|p| p.tp >= tp)
            .min_by_key(|p| p.tp)
            .or_else(|| self.allreduce.iter().max_by_key(|p| p.tp))
            .copied()
            .unwrap_or(AllReducePoint {
                tp,
                latency_us: 0.0,
                algbw_gbps: f64::INFINITY,
            });
        (p.latency_us * 1e-6, p.algbw_gbps * 1e9)
    }
}

/// A model shape on a node of one kind of GPU: the simulator's clock for modeled runs.
#[derive(Clone, Debug, PartialEq)]
pub struct ComponentModel {
    pub dims: ModelDims,
    pub p: ComponentParams,
}

impl ComponentModel {
    pub fn new(dims: ModelDims, p: ComponentParams) -> Result<ComponentModel> {
        p.validate()?;
        // Each constant may be in range and the step still absurd (a bandwidth of a few bytes
        // per second): the slowest step the node can run, one sequence at tp 1 at the longest
        // context, must be a decode step (under ten minutes), or every total is inf.
        let m = ComponentModel {
            dims: dims.clone(),
            p: p.clone(),
        };
        let worst = m.step_ms(1, 1, 131_072.0);
        let most = crate::policy::profile::MAX_STEP_MS;
        if !(worst.is_finite() && worst <= most) {
            return Err(Error::Invalid(format!(
                "the cost model's constants make one decode step (tp 1, one sequence of 128K \
                 context) take {worst:.3e} ms, more than ten minutes: check its rates \
                 (`hbm_bytes_per_s`, `matmul_flops`, `link_bytes_per_s`, ...)"
            )));
        }
        Ok(ComponentModel { dims, p })
    }

    fn bw(&self) -> f64 {
        self.p.hbm_bytes_per_s * self.p.hbm_efficiency
    }

    fn gemm_s(&self, batch: f64, k: f64, n: f64) -> f64 {
        let e = self.dims.dtype_bytes as f64;
        let p = &self.p;
        p.gemm_launch_us * 1e-6
            + (p.gemm_floor_us * 1e-6)
                .max(k * n * e / self.bw())
                .max(2.0 * batch * k * n / p.matmul_flops)
    }

    /// KV heads one rank holds at `tp` (replicated when tp > kv heads).
    fn kv_heads_per_rank(&self, tp: usize) -> f64 {
        (self.dims.num_kv_heads as f64 / tp as f64).max(1.0)
    }

    /// Prefill tokens/s of a replica at `tp` (compute-bound).
    pub fn prefill_tokens_per_s(&self, tp: usize) -> f64 {
        tp as f64 * self.p.prefill_flops / (2.0 * self.dims.step_read_params())
    }

    /// Tokens of KV a replica at `tp` holds at the memory fraction (0 when the weights alone do
    /// not fit).
    pub fn kv_capacity_tokens(&self, tp: usize) -> usize {
        let d = &self.dims;
        let t = tp as f64;
        let embed = if d.tie_word_embeddings {
            0.0
        } else {
            (d.vocab_size * d.hidden_size) as f64 * d.dtype_bytes as f64
        };
        // Every weight once over the replica (the embedding is sharded or replicated: count it
        // once) plus nothing else: activations and graphs are in the (1 - mem_fraction) part.
        let weights = d.step_read_params() * d.dtype_bytes as f64 + embed;
        let free = t * self.p.mem_fraction * self.p.gpu_memory_bytes - weights;
        let per_token = 2.0
            * d.num_layers as f64
            * self.kv_heads_per_rank(tp)
            * t
            * d.head_dim as f64
            * d.dtype_bytes as f64;
        if free <= 0.0 {
            0
        } else {
            (free / per_token) as usize
        }
    }
}

#[cfg(test)]
mod tests;
