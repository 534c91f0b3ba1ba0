//! A node profile from one GPU: per-rank decode steps measured on TP-k shard models (`pat
//! init-model --shard k`, profiled at world 1) plus the collectives one GPU cannot measure, taken
//! from the component model's all-reduce table for the link (public measurements).
//!
//! ```text
//! step(tp = k, B, ctx) = shard_k(B, ctx) + 2 L (latency(k) + B h e / algbw(k)) + B V e / gather   (k > 1)
//! ```
//!
//! The shard's step already holds the engine's host cost (this engine is synchronous: host and
//! device do not overlap), its kernels and their gaps. Prefill of a TP-k replica runs at the
//! shard's rate (each rank does its 1/k of the work at once). The switch stays modeled. A TP-k
//! replica holds `k * mem_fraction * gpu_memory - weights` bytes of KV (the component model's
//! capacity, from the node's GPU memory and memory fraction).

use super::component::ComponentParams;
use crate::error::{Error, Result};
use crate::model::dims::ModelDims;
use crate::policy::modeled::SWITCH_FIXED_MS;
use crate::policy::profile::{
    DecodeSample, PrefillSample, Profile, SwitchProfile, MEASURED_GROUPS, PROFILE_VERSION,
};

/// `full` cut to one rank's shard of TP-`k` (the dims `pat init-model --shard k` writes).
pub fn shard_of(full: &ModelDims, k: usize) -> ModelDims {
    let mut d = full.clone();
    d.num_heads /= k;
    d.num_kv_heads /= k;
    d.intermediate_size /= k;
    d.vocab_size /= k;
    d
}

/// The node profile (module docs) from `(k, profile of the TP-k shard)` pairs.
pub fn compose_node(
    shards: &[(usize, Profile)],
    full: &ModelDims,
    world: usize,
    p: &ComponentParams,
) -> Result<Profile> {
    if shards.is_empty() {
        return Err(Error::Invalid("no shard profiles to compose".into()));
    }
    let tps = full.candidate_tps(world);
    let (mut decode, mut prefill) = (Vec::new(), Vec::new());
    let (h, v, layers, e) = (
        full.hidden_size as f64,
        full.vocab_size as f64,
        full.num_layers as f64,
        full.dtype_bytes as f64,
    );
    let mut seen = Vec::new();
    for (k, prof) in shards {
        let what = format!("the shard profile for tp {k} ({})", prof.source.display());
        if !tps.contains(k) {
            // Say which of the things tp must divide it does not.
            let (n, why) = [
                (world, "world"),
                (full.num_heads, "the model's attention heads"),
                (full.num_kv_heads, "the model's kv heads"),
                (full.intermediate_size, "the model's intermediate size"),
            ]
            .into_iter()
            .find(|(n, _)| *k == 0 || !n.is_multiple_of(*k))
            .unwrap_or((world, "world"));
            return Err(Error::Invalid(format!(
                "{what}: tp {k} does not divide {why} ({n}); the tps world {world} and this \
                 model take: {tps:?}"
            )));
        }
        if seen.contains(k) {
            return Err(Error::Invalid(format!("{what}: tp {k} given twice")));
        }
        seen.push(*k);
        let want = shard_of(full, *k);
        let got = &prof.model;
        if (
            got.num_layers,
            got.hidden_size,
            got.num_heads,
            got.num_kv_heads,
        ) != (
            want.num_layers,
            want.hidden_size,
            want.num_heads,
            want.num_kv_heads,
        ) || (got.intermediate_size, got.vocab_size, got.head_dim)
            != (want.intermediate_size, want.vocab_size, want.head_dim)
        {
            let dims = |d: &ModelDims| {
                format!(
                    "{} layers, hidden {}, heads {}/{}, ffn {}, vocab {}",
                    d.num_layers,
                    d.hidden_size,
                    d.num_heads,
                    d.num_kv_heads,
                    d.intermediate_size,
                    d.vocab_size
                )
            };
            return Err(Error::Invalid(format!(
                "{what}: its model ({}) is not the tp-{k} shard of the full model, which is ({}) \
                 (made by `pat init-model --shard {k}`?)",
                dims(got),
                dims(&want)
            )));
        }
        if prof.decode.iter().any(|s| s.tp != 1) {
            return Err(Error::Invalid(format!(
                "{what}: profile the shard at --world 1 (found samples at tp > 1)"
            )));
        }
        let (lat, algbw) = p.allreduce_at(*k);
        for s in &prof.decode {
            let b = s.batch as f64;
            let comm_ms = if *k > 1 {
                1e3 * (2.0 * layers * (lat + b * h * e / algbw)
                    + b * v * e / (p.logits_gather_gbps * 1e9))
            } else {
                0.0
            };
            decode.push(DecodeSample {
                tp: *k,
                step_ms: s.step_ms + comm_ms,
                ..*s
            });
        }
        if let Some(rate) = prof.prefill_rate(1) {
            prefill.push(PrefillSample {
                tp: *k,
                tokens_per_s: rate,
            });
        }
    }
    let first = &shards[0].1;
    Ok(Profile {
        version: PROFILE_VERSION,
        // What every shard's model holds (unstated if a shard does not say).
        max_position_embeddings: shards
            .iter()
            .map(|s| s.1.max_position_embeddings)
            .min()
            .flatten(),
        world,
        backend: first.backend.clone(),
        device: format!(
            "{world} ranks composed from one device's shard profiles ({}) + the all-reduce table of {}",
            first.device, p.name
        ),
        decode,
        prefill,
        transfer_bytes_per_s: p.link_bytes_per_s,
        switch: SwitchProfile {
            fixed_ms: SWITCH_FIXED_MS,
            weight_bytes_per_s: p.link_bytes_per_s,
            kv_bytes_per_s: p.link_bytes_per_s,
        },
        measured: MEASURED_GROUPS
            .iter()
            .map(|g| (g.to_string(), matches!(*g, "decode" | "prefill")))
            .collect(),
        kv_capacity_tokens: {
            let node = super::component::ComponentModel::new(
                ModelDims {
                    dtype_bytes: first.model.dtype_bytes,
                    ..full.clone()
                },
                p.clone(),
            )?;
            seen.iter().map(|&k| (k, node.kv_capacity_tokens(k))).collect()
        },
        model: ModelDims {
            dtype_bytes: first.model.dtype_bytes,
            ..full.clone()
        },
        source: "<composed>".into(),
    })
}
