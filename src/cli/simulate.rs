//! `pat simulate`: a rollout batch from a trace on an N-GPU node, every static TP layout against
//! the adaptive rule and its oracle, from a profile (or a roofline-modeled one, said so loudly).

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use pat::error::{Error, Result};
use pat::policy::decide::SwitchCost;
use pat::policy::modeled::{modeled_profile, Hardware, Link, ModelShape};
use pat::policy::predictor::{validate, Predictor};
use pat::policy::profile::Profile;
use pat::policy::trace::Trace;
use pat::sim::report::SimReport;
use pat::sim::run::{simulate_all, SimConfig, SimModel};
use pat::sim::svg::chart;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Gpu {
    H100,
    H200,
    A40,
}

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Profile JSON (from `pat profile`). Omitted: a roofline-modeled profile of --model-shape on
    /// an H100-like node (every number modeled; the output says so).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Rollout length trace, JSONL (`pat trace gen`).
    #[arg(long)]
    pub trace: PathBuf,
    /// GPUs in the node.
    #[arg(long, default_value_t = 8)]
    pub world: usize,
    /// Link of the modeled profile: nvlink, pcie or a one-way bandwidth in GB/s (default nvlink).
    #[arg(long)]
    pub link: Option<Link>,
    /// llama3-8b or qwen3-14b: the modeled profile's shape (default llama3-8b); with --profile it
    /// is checked against the profile's model.
    #[arg(long)]
    pub model_shape: Option<ModelShape>,
    /// GPU of the modeled profile: h100 (default), h200 or a40.
    #[arg(long, value_enum)]
    pub gpu: Option<Gpu>,
    /// Modeled profile only: engine cost per sequence per decode step, in us, that no layout
    /// divides (scheduler, stop checks, host sampling). Default 0: pure roofline.
    #[arg(long)]
    pub per_seq_us: Option<f64>,
    /// Decode steps between two decisions of the adaptive rule.
    #[arg(long, default_value_t = 64)]
    pub check_every: usize,
    /// Switch only when the predicted total beats staying by this fraction.
    #[arg(long, default_value_t = 0.1)]
    pub margin: f64,
    /// ... and by at least this many ms.
    #[arg(long, default_value_t = 0.0)]
    pub min_gain_ms: f64,
    /// Replace the profile's fixed cost per switch (ms); e.g. 5520 charges PAT's whole measured
    /// switch as fixed cost on top of the modeled KV and weight parts.
    #[arg(long)]
    pub switch_fixed_ms: Option<f64>,
    /// Tp the adaptive and oracle runs start at (default: the best static layout).
    #[arg(long)]
    pub start_tp: Option<usize>,
    /// Write an SVG chart of live sequences and tp over time, one panel per policy.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The profile to simulate with, and a note saying where it came from.
pub fn load_profile(a: &SimulateArgs) -> Result<(Profile, String)> {
    match &a.profile {
        Some(path) => {
            if a.link.is_some() || a.gpu.is_some() || a.per_seq_us.is_some() {
                return Err(Error::Invalid(
                    "--link, --gpu and --per-seq-us shape only the modeled profile; a profile file already fixes them"
                        .into(),
                ));
            }
            let p = Profile::load(path)?;
            let dims = match a.model_shape {
                Some(s) => s.dims(),
                None => p.model.clone(),
            };
            p.check_matches(&dims, a.world)?;
            let note = format!("profile read from {}", path.display());
            Ok((p, note))
        }
        None => {
            let shape = a.model_shape.unwrap_or(ModelShape::Llama3_8b);
            let link = a.link.unwrap_or(Link::NvLink);
            let gpu = a.gpu.unwrap_or(Gpu::H100);
            let mut hw = match gpu {
                Gpu::H100 => Hardware::h100(link),
                Gpu::H200 => Hardware::h200(link),
                Gpu::A40 => Hardware::a40(link),
            };
            if let Some(us) = a.per_seq_us {
                if !(us >= 0.0 && us.is_finite()) {
                    return Err(Error::Invalid(format!(
                        "--per-seq-us must be a non-negative number, got {us}"
                    )));
                }
                hw.per_seq_overhead_s = us * 1e-6;
            }
            let p = modeled_profile(shape, hw, a.world)?;
            let note = format!(
                "no --profile: using a roofline-MODELED profile of {shape} on {} {gpu:?}-like GPUs ({link}, \
                 {} us per sequence per step); all times are modeled, not measured (constants: src/policy/modeled.rs)",
                a.world,
                hw.per_seq_overhead_s * 1e6
            );
            Ok((p, note))
        }
    }
}

/// Runs the simulation and builds the report (what `run` prints).
pub fn report(a: &SimulateArgs) -> Result<SimReport> {
    if !(a.margin >= 0.0 && a.margin < 1.0) {
        return Err(Error::Invalid(format!(
            "--margin must be in [0, 1), got {}",
            a.margin
        )));
    }
    if !(a.min_gain_ms >= 0.0 && a.min_gain_ms.is_finite()) {
        return Err(Error::Invalid(format!(
            "--min-gain-ms must be a non-negative number, got {}",
            a.min_gain_ms
        )));
    }
    let trace = Trace::load(&a.trace)?;
    let (mut profile, source_note) = load_profile(a)?;
    if let Some(ms) = a.switch_fixed_ms {
        if !(ms >= 0.0 && ms.is_finite()) {
            return Err(Error::Invalid(format!(
                "--switch-fixed-ms must be a non-negative number, got {ms}"
            )));
        }
        profile.switch.fixed_ms = ms;
    }
    let predictor = Predictor::from_profile(&profile)?;
    let switch = SwitchCost::from_profile(&profile);
    let prefill = profile.prefill_points();
    let fitted = predictor.tps();
    let candidates: Vec<usize> = profile
        .model
        .candidate_tps(a.world)
        .into_iter()
        .filter(|t| fitted.contains(t))
        .collect();
    if candidates.is_empty() {
        return Err(Error::Invalid(format!(
            "no tp degree is both valid for world {} and profiled (profiled: {fitted:?})",
            a.world
        )));
    }
    let cfg = SimConfig {
        world: a.world,
        candidates,
        check_every: a.check_every,
        margin: a.margin,
        min_gain_ms: a.min_gain_ms,
        start_tp: a.start_tp,
    };
    let model = SimModel {
        predictor: &predictor,
        switch: &switch,
        prefill: &prefill,
    };
    let (runs, best) = simulate_all(&trace, &model, &cfg)?;
    let mut notes = vec![source_note];
    if let Ok(v) = validate(&profile, 0.2, 0) {
        let why = if profile.backend == "modeled" {
            " (the modeled profile is itself of this form; measured profiles show real error)"
        } else {
            ""
        };
        notes.push(format!(
            "predictor (a + b*batch + c*batch*ctx per tp) on 20% held-out profile samples: MAPE {:.2}%{why}",
            v.overall_mape
        ));
    }
    let start = a.start_tp.unwrap_or(best);
    notes.push(format!(
        "adaptive and oracle start at tp{start}{}, re-deciding every {} steps",
        if a.start_tp.is_some() {
            " (--start-tp)"
        } else {
            " (the best static layout)"
        },
        a.check_every
    ));
    notes.push(
        "replicas decode in lockstep; static layouts are placed knowing true lengths (best case for static); \
         adaptive estimates remaining length from the trace's own length distribution, oracle knows it"
            .into(),
    );
    Ok(SimReport::new(
        &profile,
        &a.trace.display().to_string(),
        trace.stats(None),
        &cfg,
        runs,
        best,
        notes,
    ))
}

pub fn run(a: SimulateArgs) -> Result<()> {
    let rep = report(&a)?;
    if let Some(path) = &a.svg {
        let runs: Vec<_> = rep.rows.iter().map(|r| r.result.clone()).collect();
        let title = format!(
            "{} on {} GPUs, {} requests ({})",
            rep.model.split(' ').next().unwrap_or("model"),
            rep.world,
            rep.trace.count,
            rep.trace_path
        );
        std::fs::write(path, chart(&runs, rep.world, rep.trace.count, &title))
            .map_err(|e| Error::io(path, e))?;
    }
    if a.json {
        outln!("{}", rep.to_json())?;
    } else {
        print!("{}", rep.table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(trace: PathBuf) -> SimulateArgs {
        SimulateArgs {
            profile: None,
            trace,
            world: 8,
            link: None,
            model_shape: None,
            gpu: None,
            per_seq_us: None,
            check_every: 64,
            margin: 0.1,
            min_gain_ms: 0.0,
            switch_fixed_ms: None,
            start_tp: None,
            svg: None,
            json: false,
        }
    }

    fn straggler_trace(dir: &std::path::Path) -> PathBuf {
        let p = dir.join("t.jsonl");
        let t = pat::policy::trace::one_straggler(16, 100, 2000).unwrap();
        std::fs::write(&p, t.to_jsonl()).unwrap();
        p
    }

    #[test]
    fn modeled_run_says_so_and_writes_svg() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(straggler_trace(dir.path()));
        let rep = report(&a).unwrap();
        assert_eq!(rep.rows.len(), 6); // tp 1, 2, 4, 8, adaptive, oracle
        let table = rep.table();
        assert!(
            table.contains("MODELED") && table.contains("static tp8"),
            "{table}"
        );
        assert!(rep.to_json().contains("\"vs_best_static_pct\""));
        a.svg = Some(dir.path().join("c.svg"));
        run(a).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("c.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn profile_file_is_checked_against_shape_and_world() {
        let dir = tempfile::tempdir().unwrap();
        let trace = straggler_trace(dir.path());
        let prof = dir.path().join("p.json");
        modeled_profile(ModelShape::Llama3_8b, Hardware::h100(Link::NvLink), 8)
            .unwrap()
            .save(&prof)
            .unwrap();
        let mut a = args(trace);
        a.profile = Some(prof);
        assert!(report(&a).unwrap().table().contains("p.json"));
        a.model_shape = Some(ModelShape::Qwen3_14b);
        let e = report(&a).unwrap_err().to_string();
        assert!(e.contains("model.arch"), "{e}");
        a.model_shape = None;
        a.world = 4;
        assert!(report(&a).unwrap_err().to_string().contains("world"));
        a.world = 8;
        a.link = Some(Link::Pcie);
        assert!(report(&a).unwrap_err().to_string().contains("--link"));
        a.link = None;
        a.margin = 1.5;
        assert!(report(&a).unwrap_err().to_string().contains("--margin"));
    }
}
