//! Migrate-or-recompute cost model for the KV cache of unfinished sequences at a TP switch.
//!
//! Two linear models, fitted from profiles (transfer bandwidth, prefill throughput per tp):
//!
//! - migrate:   `t_m(bytes)     = fixed_transfer_s + bytes / transfer_bytes_per_s`
//! - recompute: `t_r(tp, n)     = fixed_prefill_s + n / prefill_tokens_per_s(tp)`
//!
//! where `bytes` are the sequence's cross-rank KV bytes (`kv::seq_bytes`) and `n` its cached
//! tokens (prompt + generated) re-prefilled under the new layout. Per sequence the cheaper one is
//! chosen; ties go to migrate, which is exact and costs no compute. Prefill cost is taken linear in
//! n (attention's quadratic part is ignored, which favours recompute for very long sequences).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// How one sequence's KV reaches the new layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvMode {
    Migrate,
    Recompute,
}

/// The user's choice: always migrate, always recompute, or per sequence by the cost model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvPolicy {
    Migrate,
    Recompute,
    #[default]
    Auto,
}

impl FromStr for KvPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "migrate" => Ok(KvPolicy::Migrate),
            "recompute" => Ok(KvPolicy::Recompute),
            "auto" => Ok(KvPolicy::Auto),
            other => Err(Error::Invalid(format!(
                "unknown KV policy `{other}` (expected migrate, recompute or auto)"
            ))),
        }
    }
}

impl fmt::Display for KvPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvPolicy::Migrate => "migrate",
            KvPolicy::Recompute => "recompute",
            KvPolicy::Auto => "auto",
        })
    }
}

impl KvPolicy {
    /// The mode for one sequence: fixed, or `model.choose(..)` under `Auto`.
    pub fn mode(&self, model: &CostModel, tp: usize, tokens: usize, bytes: f64) -> KvMode {
        match self {
            KvPolicy::Migrate => KvMode::Migrate,
            KvPolicy::Recompute => KvMode::Recompute,
            KvPolicy::Auto => model.choose(tp, tokens, bytes),
        }
    }
}

/// Profiled costs of moving KV bytes and of prefilling tokens (see module docs for the formulas).
#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    /// Achieved bandwidth of the KV transfer (aggregate over the ranks moving in parallel).
    pub transfer_bytes_per_s: f64,
    /// Fixed cost of one sequence's transfer (launches, synchronisation).
    pub fixed_transfer_s: f64,
    /// Prefill throughput (tokens/s) by tp degree, any order.
    pub prefill_tokens_per_s: Vec<(usize, f64)>,
    /// Fixed cost of one recompute (a prefill launch).
    pub fixed_prefill_s: f64,
}

impl CostModel {
    /// Rates must be positive and finite, fixed costs finite and non-negative, tp degrees >= 1.
    pub fn validate(&self) -> Result<()> {
        let rate_ok = |x: f64| x.is_finite() && x > 0.0;
        let fixed_ok = |x: f64| x.is_finite() && x >= 0.0;
        if !rate_ok(self.transfer_bytes_per_s) {
            return Err(Error::Invalid(format!(
                "transfer bandwidth {} must be positive",
                self.transfer_bytes_per_s
            )));
        }
        if !fixed_ok(self.fixed_transfer_s) || !fixed_ok(self.fixed_prefill_s) {
            return Err(Error::Invalid(
                "fixed costs must be finite and non-negative".into(),
            ));
        }
        if let Some(&(tp, r)) = self
            .prefill_tokens_per_s
            .iter()
            .find(|&&(tp, r)| tp == 0 || !rate_ok(r))
        {
            return Err(Error::Invalid(format!(
                "prefill rate {r} at tp {tp}: need tp >= 1 and a positive rate"
            )));
        }
        Ok(())
    }

    /// The CPU engine's cost model from a measurement on this machine. KV migration copies each
    /// byte twice (out of the old pool, into the new one), so its rate is a quarter of the
    /// single-thread copy bandwidth (which counts read + write). Prefill runs at
    /// `prefill_tokens_per_s` (measured by the caller, e.g. from this run's prefill step); on the
    /// CPU it is bound by the cores, not by tp, so the one rate serves every tp.
    pub fn measured_cpu(prefill_tokens_per_s: f64) -> CostModel {
        CostModel {
            transfer_bytes_per_s: crate::backend::cpu::copy_bandwidth(1) / 4.0,
            fixed_transfer_s: 0.0,
            prefill_tokens_per_s: vec![(1, prefill_tokens_per_s.max(1.0))],
            fixed_prefill_s: 0.0,
        }
    }

    /// Seconds to migrate `bytes`: `fixed_transfer_s + bytes / transfer_bytes_per_s`.
    pub fn migrate_s(&self, bytes: f64) -> f64 {
        self.fixed_transfer_s + bytes / self.transfer_bytes_per_s
    }

    /// Prefill tokens/s at `tp`: the profiled value, else linear interpolation in tp between the
    /// nearest profiled degrees, clamped to the ends; `None` with no profile.
    pub fn prefill_rate(&self, tp: usize) -> Option<f64> {
        crate::stats::rate_at(&self.prefill_tokens_per_s, tp)
    }

    /// Seconds to recompute `tokens` at `tp`: `fixed_prefill_s + tokens / prefill_rate(tp)`
    /// (infinite without a profile, so the decision falls to migrate).
    pub fn recompute_s(&self, tp: usize, tokens: usize) -> f64 {
        match self.prefill_rate(tp) {
            Some(r) => self.fixed_prefill_s + tokens as f64 / r,
            None => f64::INFINITY,
        }
    }

    /// Migrate when `migrate_s(bytes) <= recompute_s(tp, tokens)`, else recompute.
    pub fn choose(&self, tp: usize, tokens: usize, bytes: f64) -> KvMode {
        if self.migrate_s(bytes) <= self.recompute_s(tp, tokens) {
            KvMode::Migrate
        } else {
            KvMode::Recompute
        }
    }

    /// The sequence length above which migrating beats recomputing at `tp`, when a sequence moves
    /// `bytes_per_token` per cached token.
    ///
    /// Migrate wins when `F_m + n b / B <= F_r + n / R`, i.e. `n (1/R - b/B) >= F_m - F_r`. With
    /// slope `s = 1/R - b/B > 0` the crossover is `max(0, (F_m - F_r) / s)`; with `s <= 0` migration
    /// costs at least as much per token, so it wins for no long sequence: `f64::INFINITY` (or 0 when
    /// `s == 0` and `F_m <= F_r`: it always wins). Without a prefill profile: 0.
    pub fn crossover_tokens(&self, tp: usize, bytes_per_token: f64) -> f64 {
        let Some(r) = self.prefill_rate(tp) else {
            return 0.0;
        };
        let slope = 1.0 / r - bytes_per_token / self.transfer_bytes_per_s;
        let gap = self.fixed_transfer_s - self.fixed_prefill_s;
        if slope > 0.0 {
            (gap / slope).max(0.0)
        } else if slope == 0.0 && gap <= 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> CostModel {
        CostModel {
            transfer_bytes_per_s: 1e9,
            fixed_transfer_s: 0.2,
            prefill_tokens_per_s: vec![(8, 6000.0), (1, 1000.0), (2, 1800.0)],
            fixed_prefill_s: 0.05,
        }
    }

    #[test]
    fn formulas_match_hand_computed_values() {
        let m = model();
        m.validate().unwrap();
        // 0.2 + 5e8 / 1e9
        assert!((m.migrate_s(5e8) - 0.7).abs() < 1e-12);
        // 0.05 + 900 / 1800
        assert!((m.recompute_s(2, 900) - 0.55).abs() < 1e-12);
        // tp 4 between (2, 1800) and (8, 6000): 1800 + 4200 * 2/6 = 3200 tokens/s.
        assert!((m.prefill_rate(4).unwrap() - 3200.0).abs() < 1e-9);
        assert!((m.recompute_s(4, 3200) - 1.05).abs() < 1e-12);
        assert_eq!(m.prefill_rate(16), Some(6000.0));
        assert_eq!(m.prefill_rate(1), Some(1000.0));
        let none = CostModel {
            prefill_tokens_per_s: vec![],
            ..m
        };
        assert_eq!(none.recompute_s(2, 10), f64::INFINITY);
        assert_eq!(none.choose(2, 10, f64::MAX), KvMode::Migrate);
    }

    #[test]
    fn crossover_separates_the_two_choices() {
        let m = model();
        // 128 KiB per token at tp 2: slope 1/1800 - 131072/1e9 = 4.24484e-4 s/token,
        // crossover 0.15 / 4.24484e-4 = 353.37 tokens.
        let b = 131072.0;
        let n = m.crossover_tokens(2, b);
        assert!((n - 353.37).abs() < 0.01, "{n}");
        assert_eq!(m.choose(2, 353, 353.0 * 131072.0), KvMode::Recompute);
        assert_eq!(m.choose(2, 354, 354.0 * 131072.0), KvMode::Migrate);
        // Migration dearer per token than prefill: it never wins for long sequences.
        assert_eq!(m.crossover_tokens(2, 1e7), f64::INFINITY);
        // Cheaper fixed cost and cheaper per token: always migrate.
        let cheap = CostModel {
            fixed_transfer_s: 0.0,
            ..model()
        };
        assert_eq!(cheap.crossover_tokens(2, b), 0.0);
    }

    #[test]
    fn policies_parse_and_apply() {
        assert_eq!("auto".parse::<KvPolicy>().unwrap(), KvPolicy::Auto);
        assert_eq!(
            "migrate".parse::<KvPolicy>().unwrap().to_string(),
            "migrate"
        );
        let e = "copy".parse::<KvPolicy>().unwrap_err();
        assert!(matches!(e, Error::Invalid(_)) && e.to_string().contains("copy"));
        let m = model();
        assert_eq!(
            KvPolicy::Recompute.mode(&m, 2, 10_000, 0.0),
            KvMode::Recompute
        );
        assert_eq!(KvPolicy::Migrate.mode(&m, 2, 1, f64::MAX), KvMode::Migrate);
        assert_eq!(
            KvPolicy::Auto.mode(&m, 2, 10, 10.0 * 131072.0),
            KvMode::Recompute
        );
        let bad = CostModel {
            transfer_bytes_per_s: 0.0,
            ..model()
        };
        assert!(bad.validate().is_err());
    }
}
