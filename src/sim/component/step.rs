//! One decode step of the component model, term by term (the formula: the parent module's
//! docs), split into what depends on (tp, batch) alone ([`BatchTerms`], computed once for a
//! replica stepping one batch many times) and the context's part (attention).

use serde::Serialize;

use super::ComponentModel;

/// A step's time split into its terms, ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StepBreakdown {
    pub gemm_ms: f64,
    pub small_kernels_ms: f64,
    pub attention_ms: f64,
    pub allreduce_ms: f64,
    pub sampling_ms: f64,
    pub device_ms: f64,
    pub host_ms: f64,
    pub step_ms: f64,
}

/// The part of a decode step that does not depend on the context, at one (tp, batch): the
/// component model's answer to [`crate::sim::clock::StepClock::at`] (seconds unless named).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchTerms {
    pub tp: usize,
    pub batch: usize,
    pub gemm: f64,
    pub small: f64,
    /// KV heads one rank holds.
    pub kv_heads: f64,
    /// Bytes/s paged attention reads KV at (its efficiency depends on batch x KV heads per rank).
    pub attn_bw: f64,
    pub allreduce: f64,
    pub sampling: f64,
    pub host_ms: f64,
}

impl ComponentModel {
    /// The terms of one decode step (module docs).
    pub fn breakdown(&self, tp: usize, batch: usize, ctx: f64) -> StepBreakdown {
        if batch == 0 {
            return StepBreakdown::default();
        }
        self.breakdown_at(&self.batch_terms(tp, batch), ctx)
    }

    /// What a decode step at (`tp`, `batch`) costs apart from its context: computed once for a
    /// replica stepping the same batch many times ([`ComponentModel::breakdown_at`]).
    pub fn batch_terms(&self, tp: usize, batch: usize) -> BatchTerms {
        let (d, p) = (&self.dims, &self.p);
        let (t, b, e) = (tp as f64, batch as f64, d.dtype_bytes as f64);
        let (h, hd, layers) = (d.hidden_size as f64, d.head_dim as f64, d.num_layers as f64);
        let (q, f, v) = (
            d.num_heads as f64 * hd,
            d.intermediate_size as f64,
            d.vocab_size as f64,
        );
        let kv_r = self.kv_heads_per_rank(tp);
        let layer_gemm = self.gemm_s(b, h, q / t + 2.0 * kv_r * hd)
            + self.gemm_s(b, q / t, h)
            + self.gemm_s(b, h, 2.0 * f / t)
            + self.gemm_s(b, f / t, h);
        let gemm = layers * layer_gemm + self.gemm_s(b, h, v / t);
        let small = layers
            * (p.small_kernels_per_layer * p.small_kernel_us * 1e-6
                + b * (4.0 * h + 3.0 * f / t) * e / self.bw());
        let units = b * kv_r;
        let frac = (units.max(1.0).log2() / p.attn_units_saturate.max(2.0).log2()).min(1.0);
        let attn_bw = p.hbm_bytes_per_s
            * (p.attn_bw_one_unit + (p.attn_bw_saturated - p.attn_bw_one_unit) * frac);
        let (allreduce, gather) = if tp > 1 {
            let (lat, algbw) = p.allreduce_at(tp);
            (
                2.0 * layers * (lat + b * h * e / algbw),
                b * v * e / (p.logits_gather_gbps * 1e9),
            )
        } else {
            (0.0, 0.0)
        };
        let sampling = p.sampling_kernels * p.small_kernel_us * 1e-6
            + p.sampling_passes * b * v * 4.0 / self.bw()
            + gather;
        BatchTerms {
            tp,
            batch,
            gemm,
            small,
            kv_heads: kv_r,
            attn_bw,
            allreduce,
            sampling,
            host_ms: p.host_step_ms + b * p.host_per_seq_us * 1e-3,
        }
    }

    /// The terms of one decode step at `terms`' (tp, batch) and mean context `ctx`: the same
    /// arithmetic as [`ComponentModel::breakdown`], the context's part (attention) alone computed
    /// here.
    pub fn breakdown_at(&self, terms: &BatchTerms, ctx: f64) -> StepBreakdown {
        if terms.batch == 0 {
            return StepBreakdown::default();
        }
        let (d, p) = (&self.dims, &self.p);
        let (b, e) = (terms.batch as f64, d.dtype_bytes as f64);
        let (hd, layers) = (d.head_dim as f64, d.num_layers as f64);
        let kv_bytes = b * ctx * 2.0 * terms.kv_heads * hd * e;
        let attention = layers
            * (p.attn_launch_us * 1e-6 + (p.attn_floor_us * 1e-6).max(kv_bytes / terms.attn_bw));
        let BatchTerms {
            gemm,
            small,
            allreduce,
            sampling,
            host_ms,
            ..
        } = *terms;
        let device = gemm + small + attention + allreduce + sampling + p.misc_us * 1e-6;
        let device_ms = 1e3 * device + p.fixed_step_ms;
        let step_ms = if p.overlap_host {
            device_ms.max(host_ms)
        } else {
            device_ms + host_ms
        };
        StepBreakdown {
            gemm_ms: 1e3 * gemm,
            small_kernels_ms: 1e3 * small,
            attention_ms: 1e3 * attention,
            allreduce_ms: 1e3 * allreduce,
            sampling_ms: 1e3 * sampling,
            device_ms,
            host_ms,
            step_ms,
        }
    }

    /// One decode step of a replica at `tp` with `batch` sequences of mean context `ctx`, ms.
    pub fn step_ms(&self, tp: usize, batch: usize, ctx: f64) -> f64 {
        self.breakdown(tp, batch, ctx).step_ms
    }
}
