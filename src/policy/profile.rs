//! The profile JSON: decode step latencies, prefill rates and switch costs of one model on one node.
//!
//! Written by `pat profile` (measured) or `crate::sim::sampled_profile` (modeled),
//! read by the predictor and the decision rule. Schema, version 1 (unknown keys and keys given
//! twice are errors):
//!
//! ```text
//! {
//!   "version": 1,
//!   "model": { "arch": "llama" | "qwen3", "num_layers", "hidden_size", "num_heads",
//!              "num_kv_heads", "head_dim", "intermediate_size", "vocab_size",
//!              "tie_word_embeddings": false (optional), "dtype_bytes": 2 (optional, bf16) },
//!   "world": 8,                      // ranks of the node the profile was taken on
//!   "backend": "cpu" | "cuda" | "modeled",
//!   "device": "free text, e.g. NVIDIA H100 80GB HBM3",
//!   "decode": [ { "tp", "batch", "context", "step_ms", "spread_ms" (optional) }, ... ],
//!                                    // one decode step of `batch` sequences whose mean cached
//!                                    // length is `context` tokens, on one tp-replica
//!   "prefill": [ { "tp", "tokens_per_s" }, ... ],
//!   "transfer_bytes_per_s": 3.6e11,  // rank-to-rank copy bandwidth (one way)
//!   "switch": { "fixed_ms",          // per switch: group setup, graph recapture, barriers
//!               "weight_bytes_per_s",// per-rank receive rate of missing weight pieces
//!               "kv_bytes_per_s" },  // rate of migrating one sequence's KV
//!   "measured": { "decode": bool, "prefill": bool, "transfer": bool, "switch": bool },
//!   "kv_capacity_tokens": { "1": 182647, ... },  // optional: KV tokens a replica holds per tp
//!   "max_position_embeddings": 131072           // optional: the profiled model's context
//! }
//! ```
//!
//! `measured` says which groups were timed on hardware and which were filled in by a model; tables
//! that print profile-derived numbers say so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const PROFILE_VERSION: u32 = 1;
/// The groups a profile's `measured` map must name.
pub const MEASURED_GROUPS: [&str; 4] = ["decode", "prefill", "transfer", "switch"];
/// The longest decode step (and fixed switch cost) a profile may state, ms: ten minutes, far
/// past any real step, so that sums over a whole rollout stay finite.
pub const MAX_STEP_MS: f64 = 600_000.0;

pub use crate::model::dims::ModelDims;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeSample {
    pub tp: usize,
    pub batch: usize,
    /// Mean cached tokens per sequence during the step.
    pub context: usize,
    pub step_ms: f64,
    /// Half the interquartile range of the repeated step times at this point, ms (0: not
    /// measured, as for modeled profiles). The policy does not act on predicted differences
    /// inside the profile's relative spread.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub spread_ms: f64,
}

/// `x` as an error message shows it: in exponent form where plain digits would run long.
fn num(x: f64) -> String {
    match x.is_finite() && (x.abs() >= 1e9 || (x != 0.0 && x.abs() < 1e-6)) {
        true => format!("{x:e}"),
        false => x.to_string(),
    }
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefillSample {
    pub tp: usize,
    pub tokens_per_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchProfile {
    pub fixed_ms: f64,
    pub weight_bytes_per_s: f64,
    pub kv_bytes_per_s: f64,
}

/// A decode/prefill/switch profile (schema in the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub version: u32,
    pub model: ModelDims,
    pub world: usize,
    pub backend: String,
    pub device: String,
    pub decode: Vec<DecodeSample>,
    pub prefill: Vec<PrefillSample>,
    pub transfer_bytes_per_s: f64,
    pub switch: SwitchProfile,
    pub measured: BTreeMap<String, bool>,
    /// KV tokens one replica holds at each tp (the node's memory at its memory fraction, less
    /// the weights); a tp not listed is unbounded. `pat simulate --profile` queues and preempts
    /// past it, and so does the policy's forecast (a low tp that cannot hold its share is
    /// forecast as what it is: small batches and recompute). Modeled and composed node profiles
    /// state it; the engine profiler measures speed only and leaves it empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kv_capacity_tokens: BTreeMap<usize, usize>,
    /// The longest context (prompt + response) the profiled model holds: its
    /// `max_position_embeddings`. The engine profiler and `compose-profile` state it;
    /// `pat simulate --profile` refuses a trace with a request past it (the engine would).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    /// Where the profile was read from (for messages); not part of the file.
    #[serde(skip)]
    pub source: PathBuf,
}

impl Profile {
    /// Parses and validates profile JSON; `path` names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Profile> {
        // A key given twice (a tp of `kv_capacity_tokens`, say) would keep its last value.
        crate::json::check_unique(text).map_err(|e| Error::Input {
            path: path.to_path_buf(),
            line: e.line(),
            msg: format!("bad profile: {e}"),
        })?;
        let mut p: Profile = serde_json::from_str(text).map_err(|e| Error::Input {
            path: path.to_path_buf(),
            line: e.line(),
            msg: format!("bad profile: {e}"),
        })?;
        p.source = path.to_path_buf();
        p.validate()?;
        Ok(p)
    }

    pub fn load(path: &Path) -> Result<Profile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    pub fn to_json(&self) -> String {
        // A struct of numbers, strings and maps with string keys always serializes.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json() + "\n").map_err(|e| Error::io(path, e))
    }

    fn err(&self, msg: String) -> Error {
        let path = if self.source.as_os_str().is_empty() {
            PathBuf::from("<profile>")
        } else {
            self.source.clone()
        };
        Error::config(path, msg)
    }

    /// The KV capacity the profile states, for reports: "KV tokens per replica: tp1 N, tp2 M",
    /// or that it states none (unbounded).
    pub fn capacity_summary(&self) -> String {
        if self.kv_capacity_tokens.is_empty() {
            return "KV capacity not stated, so unbounded".into();
        }
        let per: Vec<String> = self
            .kv_capacity_tokens
            .iter()
            .map(|(tp, n)| format!("tp{tp} {n}"))
            .collect();
        format!("KV tokens per replica: {}", per.join(", "))
    }

    /// Checks version, backend, dims, every sample and rate, and the `measured` map.
    pub fn validate(&self) -> Result<()> {
        if self.version != PROFILE_VERSION {
            return Err(self.err(format!(
                "profile version {} is not supported (expected {PROFILE_VERSION})",
                self.version
            )));
        }
        if !["cpu", "cuda", "modeled"].contains(&self.backend.as_str()) {
            return Err(self.err(format!(
                "`backend` must be cpu, cuda or modeled, got {:?}",
                self.backend
            )));
        }
        if !["llama", "qwen3"].contains(&self.model.arch.as_str()) {
            return Err(self.err(format!(
                "`model.arch` must be llama or qwen3, got {:?}",
                self.model.arch
            )));
        }
        let m = &self.model;
        for (k, v) in [
            ("num_layers", m.num_layers),
            ("hidden_size", m.hidden_size),
            ("num_heads", m.num_heads),
            ("num_kv_heads", m.num_kv_heads),
            ("head_dim", m.head_dim),
            ("intermediate_size", m.intermediate_size),
            ("vocab_size", m.vocab_size),
            ("dtype_bytes", m.dtype_bytes),
            ("world", self.world),
        ] {
            if v == 0 {
                return Err(self.err(format!("`{k}` must be positive")));
            }
        }
        let most = crate::parallel::layout::MAX_WORLD;
        if self.world > most {
            return Err(self.err(format!(
                "`world` {} is more ranks than pat supports ({most})",
                self.world
            )));
        }
        if self.decode.is_empty() {
            return Err(self.err("`decode` has no samples".into()));
        }
        if self.prefill.is_empty() {
            // Without a rate every prefill and every recompute would cost nothing.
            return Err(self.err(
                "`prefill` has no samples: give the prefill rate at one tp at least (prefills \
                 and a switch's recomputes are priced by it)"
                    .into(),
            ));
        }
        let rate_ok = |x: f64| x.is_finite() && x > 0.0;
        let tp_ok = |tp: usize| tp >= 1 && self.world.is_multiple_of(tp);
        let mut seen = std::collections::HashMap::new();
        for (i, s) in self.decode.iter().enumerate() {
            if !tp_ok(s.tp) || s.batch == 0 || !rate_ok(s.step_ms) || s.step_ms > MAX_STEP_MS {
                return Err(self.err(format!(
                    "decode[{i}] = (tp {}, batch {}, context {}, step_ms {}): need tp dividing world {}, batch >= 1, 0 < step_ms <= {MAX_STEP_MS} (ten minutes)",
                    s.tp, s.batch, s.context, num(s.step_ms), self.world
                )));
            }
            if !(s.spread_ms.is_finite() && s.spread_ms >= 0.0) {
                return Err(self.err(format!(
                    "decode[{i}]: `spread_ms` must be a non-negative number, got {}",
                    num(s.spread_ms)
                )));
            }
            if let Some(j) = seen.insert((s.tp, s.batch, s.context), i) {
                return Err(self.err(format!(
                    "decode[{j}] and decode[{i}] are both (tp {}, batch {}, context {}): one sample per point (a profile records each point's median)",
                    s.tp, s.batch, s.context
                )));
            }
        }
        if self.max_position_embeddings == Some(0) {
            return Err(self.err("`max_position_embeddings` must be at least 1".into()));
        }
        if let Some(tp) = self.kv_capacity_tokens.keys().find(|&&tp| !tp_ok(tp)) {
            return Err(self.err(format!(
                "kv_capacity_tokens names tp {tp}, which does not divide world {}",
                self.world
            )));
        }
        for (i, s) in self.prefill.iter().enumerate() {
            if !tp_ok(s.tp) || !rate_ok(s.tokens_per_s) {
                return Err(self.err(format!(
                    "prefill[{i}] = (tp {}, tokens_per_s {}): need tp dividing world {} and a positive rate",
                    s.tp, s.tokens_per_s, self.world
                )));
            }
        }
        let sw = &self.switch;
        for (k, v) in [
            ("transfer_bytes_per_s", self.transfer_bytes_per_s),
            ("switch.weight_bytes_per_s", sw.weight_bytes_per_s),
            ("switch.kv_bytes_per_s", sw.kv_bytes_per_s),
        ] {
            if !rate_ok(v) {
                return Err(self.err(format!("`{k}` must be a positive number, got {v}")));
            }
        }
        if !(sw.fixed_ms.is_finite() && (0.0..=MAX_STEP_MS).contains(&sw.fixed_ms)) {
            return Err(self.err(format!(
                "`switch.fixed_ms` must be a number from 0 to {MAX_STEP_MS} (ten minutes), got {}",
                num(sw.fixed_ms)
            )));
        }
        if let Some(k) = self
            .measured
            .keys()
            .find(|k| !MEASURED_GROUPS.contains(&k.as_str()))
        {
            return Err(self.err(format!(
                "`measured` has unknown group `{k}` (expected {})",
                MEASURED_GROUPS.join(", ")
            )));
        }
        if let Some(g) = MEASURED_GROUPS
            .iter()
            .find(|g| !self.measured.contains_key(**g))
        {
            return Err(self.err(format!(
                "`measured` does not say whether `{g}` was measured"
            )));
        }
        Ok(())
    }

    /// Errors naming the first field where this profile's model or world differs from the given.
    pub fn check_matches(&self, dims: &ModelDims, world: usize) -> Result<()> {
        let (a, b) = (&self.model, dims);
        let fields: [(&str, String, String); 10] = [
            ("model.arch", a.arch.clone(), b.arch.clone()),
            (
                "model.num_layers",
                a.num_layers.to_string(),
                b.num_layers.to_string(),
            ),
            (
                "model.hidden_size",
                a.hidden_size.to_string(),
                b.hidden_size.to_string(),
            ),
            (
                "model.num_heads",
                a.num_heads.to_string(),
                b.num_heads.to_string(),
            ),
            (
                "model.num_kv_heads",
                a.num_kv_heads.to_string(),
                b.num_kv_heads.to_string(),
            ),
            (
                "model.head_dim",
                a.head_dim.to_string(),
                b.head_dim.to_string(),
            ),
            (
                "model.intermediate_size",
                a.intermediate_size.to_string(),
                b.intermediate_size.to_string(),
            ),
            (
                "model.vocab_size",
                a.vocab_size.to_string(),
                b.vocab_size.to_string(),
            ),
            (
                "model.dtype_bytes",
                a.dtype_bytes.to_string(),
                b.dtype_bytes.to_string(),
            ),
            ("world", self.world.to_string(), world.to_string()),
        ];
        for (k, mine, want) in fields {
            if mine != want {
                return Err(self.err(format!(
                    "profile was taken for {k} = {mine}, but this run has {k} = {want}"
                )));
            }
        }
        Ok(())
    }

    /// Tp degrees with decode samples, ascending.
    pub fn decode_tps(&self) -> Vec<usize> {
        let mut t: Vec<usize> = self.decode.iter().map(|s| s.tp).collect();
        t.sort_unstable();
        t.dedup();
        t
    }

    /// Prefill tokens/s at `tp` (see [`crate::stats::rate_at`]); `None` without prefill samples.
    pub fn prefill_rate(&self, tp: usize) -> Option<f64> {
        crate::stats::rate_at(&self.prefill_points(), tp)
    }

    /// The prefill samples as (tp, tokens/s) pairs.
    pub fn prefill_points(&self) -> Vec<(usize, f64)> {
        self.prefill
            .iter()
            .map(|s| (s.tp, s.tokens_per_s))
            .collect()
    }

    /// The KV migrate-or-recompute cost model this profile implies: KV moves at
    /// `switch.kv_bytes_per_s`, recompute at the profiled prefill rates, no fixed costs.
    pub fn cost_model(&self) -> crate::reshard::cost::CostModel {
        crate::reshard::cost::CostModel {
            transfer_bytes_per_s: self.switch.kv_bytes_per_s,
            fixed_transfer_s: 0.0,
            prefill_tokens_per_s: self.prefill_points(),
            fixed_prefill_s: 0.0,
        }
    }

    /// "measured" or "modeled" for one group (missing counts as modeled).
    pub fn provenance(&self, group: &str) -> &'static str {
        if self.measured.get(group).copied().unwrap_or(false) {
            "measured"
        } else {
            "modeled"
        }
    }
}
