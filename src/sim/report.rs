//! The simulation report: what was simulated (and which numbers are modeled), one row per policy
//! with its change against the best static layout, as a readable table or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::run::{SimConfig, SimResult};
use crate::policy::profile::{Profile, MEASURED_GROUPS};
use crate::policy::trace::TraceStats;

/// Where the profile came from and which of its groups were measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProfileInfo {
    pub source: String,
    pub backend: String,
    pub device: String,
    pub measured: BTreeMap<String, bool>,
}

impl ProfileInfo {
    pub fn of(p: &Profile) -> ProfileInfo {
        ProfileInfo {
            source: p.source.display().to_string(),
            backend: p.backend.clone(),
            device: p.device.clone(),
            measured: p.measured.clone(),
        }
    }

    /// "all modeled", "all measured", or "measured: a, b; modeled: c".
    pub fn provenance(&self) -> String {
        let (m, n): (Vec<&str>, Vec<&str>) = MEASURED_GROUPS
            .iter()
            .partition(|g| self.measured.get(**g).copied().unwrap_or(false));
        match (m.is_empty(), n.is_empty()) {
            (true, _) => "every number is MODELED, none measured".into(),
            (false, true) => "every number is measured".into(),
            _ => format!("measured: {}; MODELED: {}", m.join(", "), n.join(", ")),
        }
    }
}

/// One policy's row: its result and its change against the best static total, in %.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub result: SimResult,
    pub vs_best_static_pct: f64,
}

/// Everything `pat simulate` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimReport {
    pub profile: ProfileInfo,
    pub model: String,
    pub world: usize,
    pub trace_path: String,
    pub trace: TraceStats,
    pub check_every: usize,
    pub margin: f64,
    pub min_gain_ms: f64,
    pub switch_fixed_ms: f64,
    pub best_static_tp: usize,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl SimReport {
    /// PAT's rule at its flat 5.52 s finished before the optimum, which pays this node's switch.
    fn pat_flat_beats_optimum(&self) -> bool {
        let pat = crate::sim::run::PolicyKind::Pat {
            flat_ms: Some(crate::sim::run::PAT_SWITCH_MS),
        };
        matches!(
            (self.total_ms(&pat.name()), self.total_ms("optimum")),
            (Some(p), Some(o)) if p < o
        )
    }

    /// With both optimum rows: adaptive's distance to the optimum, split into its schedule (to
    /// the optimum placed on estimates) and the optimum's placement on the true lengths, both in
    /// seconds and in % of the optimum (so the parts add up).
    fn split_of_the_gap(&self) -> Option<String> {
        let (a, e, o) = (
            self.total_ms("adaptive")?,
            self.total_ms("optimum @est")?,
            self.total_ms("optimum")?,
        );
        let part =
            |x: f64, y: f64| format!("{:+.2} s ({:+.2}%)", (x - y) / 1e3, 100.0 * (x - y) / o);
        Some(format!(
            "\nadaptive against the optimum: {}, of which {} is its schedule (against the \
             optimum @est, the best schedule found that places as adaptive does, on estimates) \
             and {} the optimum's placement on the true lengths, which no engine knows (% of \
             the optimum's total; the parts add up).",
            part(a, o),
            part(a, e),
            part(e, o),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        profile: &Profile,
        trace_path: &str,
        trace: TraceStats,
        cfg: &SimConfig,
        runs: Vec<SimResult>,
        best_static_tp: usize,
        notes: Vec<String>,
    ) -> SimReport {
        let best = runs
            .iter()
            .find(|r| r.policy == format!("static tp{best_static_tp}"))
            .map(|r| r.total_ms)
            .unwrap_or(f64::NAN);
        let rows = runs
            .into_iter()
            .map(|r| Row {
                vs_best_static_pct: 100.0 * (r.total_ms - best) / best,
                result: r,
            })
            .collect();
        let m = &profile.model;
        SimReport {
            profile: ProfileInfo::of(profile),
            model: format!(
                "{} ({} layers, hidden {}, {}/{} heads, ffn {}, vocab {})",
                m.arch,
                m.num_layers,
                m.hidden_size,
                m.num_heads,
                m.num_kv_heads,
                m.intermediate_size,
                m.vocab_size
            ),
            world: cfg.world,
            trace_path: trace_path.into(),
            trace,
            check_every: cfg.check_every,
            margin: cfg.margin,
            min_gain_ms: cfg.min_gain_ms,
            switch_fixed_ms: profile.switch.fixed_ms,
            best_static_tp,
            rows,
            notes,
        }
    }

    pub fn row(&self, policy: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.result.policy == policy)
    }

    /// The total of a policy's run, ms.
    fn total_ms(&self, policy: &str) -> Option<f64> {
        self.row(policy).map(|r| r.result.total_ms)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let p = &self.profile;
        let _ = writeln!(s, "profile  {} [{}]: {}", p.source, p.backend, p.device);
        let beyond = self.notes.iter().any(|n| n.starts_with("EXTRAPOLATED"));
        let _ = writeln!(
            s,
            "         {}{}",
            p.provenance(),
            if beyond {
                " at the profiled points; beyond them EXTRAPOLATED (see the note below)"
            } else {
                ""
            }
        );
        let _ = writeln!(s, "model    {}, world {}", self.model, self.world);
        let t = &self.trace;
        let _ = writeln!(
            s,
            "trace    {}: {} requests, response mean {:.0} / p50 {} / p90 {} / max {}, {:.1}% over {} (cap/3), {:.1}% at cap",
            self.trace_path,
            t.count,
            t.response_mean,
            t.response_p50,
            t.response_p90,
            t.response_max,
            100.0 * t.frac_over_third,
            t.cap / 3,
            100.0 * t.frac_at_cap
        );
        let _ = writeln!(
            s,
            "rule     check every {} steps, margin {:.0}%, min gain {} ms, switch fixed cost {:.0} ms",
            self.check_every,
            100.0 * self.margin,
            self.min_gain_ms,
            self.switch_fixed_ms
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<12} {:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9}",
            "policy",
            "layouts",
            "total s",
            "prefill s",
            "decode s",
            "switch s",
            "recomp s",
            "preempt",
            "pred err",
            "vs best"
        );
        for row in &self.rows {
            let r = &row.result;
            let mut layouts = format!("tp{}", r.start_tp);
            for e in &r.switches {
                let _ = write!(layouts, ">{}", e.to);
            }
            let tag = if r.policy == format!("static tp{}", self.best_static_tp) {
                "best".to_string()
            } else {
                format!("{:+.1}%", row.vs_best_static_pct)
            };
            let err = r
                .predictor_error_pct
                .map_or("-".to_string(), |e| format!("{e:.1}%"));
            let _ = writeln!(
                s,
                "{:<12} {:<14} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7} {:>9} {:>9}",
                r.policy,
                layouts,
                r.total_ms / 1e3,
                r.prefill_ms / 1e3,
                r.decode_ms / 1e3,
                r.switch_ms / 1e3,
                r.recompute_ms / 1e3,
                r.preemptions,
                err,
                tag
            );
        }
        let _ = writeln!(
            s,
            "\nvs best: total time against the best static layout (negative = faster). pred err: the policy's \
             predictor against the clock where the run went. recomp: prefill of sequences admitted after \
             waiting for KV room or preempted (KV capacity), part of decode s (as are barrier waits). \
             PAT @5.52s pays PAT's measured 5.52 s per switch; every other row{} \
             pays this node's switch cost (its profile's switch model){}.",
            if self.rows.iter().any(|r| r.result.policy == "optimum") {
                ", the optimum included,"
            } else {
                ""
            },
            if self.pat_flat_beats_optimum() {
                " (here dearer than PAT's 5.52 s, so PAT @5.52s beats the optimum)"
            } else {
                ""
            }
        );
        if let Some(line) = self.split_of_the_gap() {
            let _ = writeln!(s, "{line}");
        }
        for row in &self.rows {
            let r = &row.result;
            if r.switches.is_empty() {
                continue;
            }
            let _ = writeln!(s, "\n{} switches:", r.policy);
            for e in &r.switches {
                let predicted = if e.predicted_stay_ms > 0.0 {
                    format!(
                        "  (predicted drain: stay {:.2} s, switch {:.2} s incl. cost)",
                        e.predicted_stay_ms / 1e3,
                        e.predicted_best_ms / 1e3
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    s,
                    "  step {:>6}  t {:>8.2} s  tp{} -> tp{}  live {:>4}  cost {:.2} s{predicted}",
                    e.step,
                    e.t_ms / 1e3,
                    e.from,
                    e.to,
                    e.live,
                    e.cost_ms / 1e3,
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "\nnote: {n}");
        }
        s
    }
}
