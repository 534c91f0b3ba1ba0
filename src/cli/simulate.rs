//! `pat simulate`: a rollout batch from a trace on an N-GPU node under every baseline (static
//! layouts, PAT's rule, adaptive, the oracle rule, the optimum). The clock is a component cost
//! model (MODELED, said so) or a measured profile's interpolated table; the policy sees only its
//! predictor fitted to a profile.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use pat::error::{Error, Result};
use pat::policy::decide::SwitchCost;
use pat::policy::modeled::{Link, ModelShape};
use pat::policy::predictor::{validate, Predictor};
use pat::policy::profile::Profile;
use pat::sim::calibration::{range_error, CALIBRATION};
use pat::sim::report::SimReport;
use pat::sim::run::{runs_in_all, simulate_all_reporting, Placement, SimConfig, SimModel};
use pat::sim::svg::chart;
use pat::sim::{
    sampled_profile, ComponentModel, ComponentParams, GpuKind, ProfileTable, StepClock,
};

mod checks;
use checks::{check_bounds, check_flags, fit_candidates};

/// Largest node `pat simulate` models.
pub const MAX_WORLD: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Gpu {
    H100,
    H200,
    A40,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlacementArg {
    /// Contiguous chunks of the trace per replica, as VeRL places a GRPO batch.
    Chunks,
    /// Balanced on the true lengths (an ideal no engine has).
    Lpt,
}

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Rollout length trace, JSONL: {"prompt_len":P,"response_len":R} per line (`pat trace
    /// gen`), optionally "group" (GRPO's prompt index; "input_ids" is read and not used here);
    /// `-` reads it from stdin.
    #[arg(long, required_unless_present = "calibration")]
    pub trace: Option<PathBuf>,
    /// Measured profile JSON (from `pat profile`): the clock is its samples, interpolated, and
    /// the policy's predictor is fitted to them. Omitted: the component cost model of
    /// --model-shape on --gpu (every number MODELED; the output says so).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// GPUs in the node (1 to 1024).
    #[arg(long, default_value_t = 8, value_parser = checks::sim_world)]
    pub world: usize,
    /// Modeled node: link between GPUs (nvlink, pcie or a one-way bandwidth in GB/s; default
    /// nvlink for h100 and h200, pcie for a40). Picks the all-reduce table and the switch's
    /// transfer rate.
    #[arg(long)]
    pub link: Option<Link>,
    /// llama3-8b or qwen3-14b (default llama3-8b); with --profile it is checked against the
    /// profile's model.
    #[arg(long)]
    pub model_shape: Option<ModelShape>,
    /// Modeled node: h100 (default), h200 or a40.
    #[arg(long, value_enum)]
    pub gpu: Option<Gpu>,
    /// Modeled node: host cost per sequence per decode step, us (scheduler, stop checks,
    /// detokenization; overlapped with the device). Default 20 (modern engines ~1-20, PAT-era
    /// ~80-100). It decides whether TP2 or TP8 wins the full batch.
    #[arg(long, value_parser = super::common::micros)]
    pub per_seq_us: Option<f64>,
    /// The response cap the trace was generated under (`pat trace gen --cap`): a response
    /// longer is an error naming its line, and the report's "over cap/3" and "at cap" count
    /// against it. Default: the longest response (a trace file does not record its cap).
    #[arg(long, value_parser = super::common::count)]
    pub cap: Option<usize>,
    /// Modeled node: fraction of GPU memory for weights + KV (colocated RL runs 0.4-0.6;
    /// default 0.5). Replicas queue what does not fit and preempt when the KV overflows.
    #[arg(long, value_parser = super::common::share)]
    pub mem_fraction: Option<f64>,
    /// Modeled node: a JSON file holding an object that replaces any constants of the component
    /// model, e.g. {"hbm_efficiency": 0.8, "misc_us": 40} (the keys are the fields of
    /// `ComponentParams` in src/sim/component.rs; an unknown key is an error that lists them).
    #[arg(long, value_name = "FILE")]
    pub cost_model: Option<PathBuf>,
    /// How the batch is spread over replicas before any switch.
    #[arg(long, value_enum, default_value = "chunks")]
    pub placement: PlacementArg,
    /// Decode steps between two decisions of the adaptive rule.
    #[arg(long, default_value_t = 64, value_parser = super::common::count)]
    pub check_every: usize,
    /// Switch only when the predicted total beats staying by this fraction (raised to twice the
    /// profile's measured relative spread when that is larger: gains inside the noise are not
    /// acted on). 0.05 suits a modeled or quiet profile; the optimum is within 1% of it in the
    /// scenario grid of benches/RESULTS.md.
    #[arg(long, default_value_t = 0.05, value_parser = super::common::fraction_below_one)]
    pub margin: f64,
    /// ... and by at least this many ms.
    #[arg(long, default_value_t = 0.0, value_parser = super::common::millis)]
    pub min_gain_ms: f64,
    /// Replace the fixed cost per switch of this project's switch model (ms; default 2130:
    /// PAT's graph recapture + rest; KV and weights are modeled from bytes on top).
    #[arg(long, value_parser = super::common::millis)]
    pub switch_fixed_ms: Option<f64>,
    /// Tp the adaptive and oracle runs start at (default: where their best predicted ladder
    /// starts, any number of switches). PAT's rule starts here too (default: the best static layout).
    #[arg(long, value_parser = super::common::count)]
    pub start_tp: Option<usize>,
    /// Skip the optimum search (the slowest part: a few hundred runs of the node).
    #[arg(long)]
    pub no_optimum: bool,
    /// Also search the optimum with every switch placing the live sequences where the adaptive
    /// rule would, on estimated lengths (row "optimum @est"; twice the search's CPU time). The
    /// optimum places them on their true lengths, which no engine knows: adaptive's distance to
    /// the optimum @est is its schedule, the rest of its distance to the optimum is placement.
    /// The optimum also meets this row's schedule, so it is never behind it.
    #[arg(long, conflicts_with = "no_optimum")]
    pub optimum_on_estimates: bool,
    /// A trace of an earlier rollout (e.g. the previous training step, `pat trace import`) whose
    /// response lengths the rules' remaining-length estimator learns from, as an engine would
    /// (default: this batch's own lengths, in-sample: the estimator then knows their
    /// distribution, though not which request runs how long). Capped at --cap, or at the longer
    /// of its and this batch's longest response.
    #[arg(long, value_name = "TRACE")]
    pub lengths_from: Option<PathBuf>,
    /// Write an SVG chart of live sequences and tp over time, one panel per policy.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Print the component model against the public measurements it is calibrated to, and exit
    /// (the default H100 model, as a table: it takes no other flag).
    #[arg(long, conflicts_with_all = [
        "trace", "profile", "world", "link", "model_shape", "gpu", "per_seq_us", "cap", "mem_fraction",
        "cost_model", "placement", "check_every", "margin", "min_gain_ms", "switch_fixed_ms",
        "start_tp", "no_optimum", "optimum_on_estimates", "lengths_from", "svg", "json",
    ])]
    pub calibration: bool,
}

/// The modeled node's component model from the flags.
pub fn component_model(a: &SimulateArgs) -> Result<ComponentModel> {
    let shape = a.model_shape.unwrap_or(ModelShape::Llama3_8b);
    let gpu: GpuKind = a.gpu.unwrap_or(Gpu::H100).into();
    let mut p = ComponentParams::defaults(gpu, a.link.unwrap_or(gpu.default_link()));
    let mut from_file = Vec::new();
    if let Some(path) = &a.cost_model {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        p = p.overridden(&text, &format!("--cost-model {}", path.display()))?;
        from_file = cost_model_keys(&text);
    }
    // A flag wins over the file, and says so (the file's value would otherwise vanish).
    let overrides = [
        ("host_per_seq_us", "--per-seq-us", a.per_seq_us),
        ("mem_fraction", "--mem-fraction", a.mem_fraction),
    ];
    for (key, flag, v) in overrides {
        let Some(v) = v else { continue };
        if from_file.iter().any(|k| k == key) {
            errln!("note: {flag} {v} overrides `{key}` of the --cost-model file");
            // The node's name lists the file's values; say which one the run does not use.
            p.name = format!("{}; {flag} {v} in place of the file's {key}", p.name);
        }
        match key {
            "host_per_seq_us" => p.host_per_seq_us = v,
            _ => p.mem_fraction = v,
        }
    }
    ComponentModel::new(shape.dims(), p)
}

/// The top-level keys of a cost-model JSON object (none when it is not one: `overridden` has
/// refused it by then).
fn cost_model_keys(text: &str) -> Vec<String> {
    pat::json::object(text, "")
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

impl From<Gpu> for GpuKind {
    fn from(g: Gpu) -> GpuKind {
        match g {
            Gpu::H100 => GpuKind::H100,
            Gpu::H200 => GpuKind::H200,
            Gpu::A40 => GpuKind::A40,
        }
    }
}

/// The clock, the profile the policy's predictor is fitted to, and a note on where both came
/// from.
pub fn world_model(a: &SimulateArgs) -> Result<(Box<dyn StepClock>, Profile, String)> {
    match &a.profile {
        Some(path) => {
            let p = Profile::load(path)?;
            let dims = match a.model_shape {
                Some(s) => s.dims(),
                None => p.model.clone(),
            };
            p.check_matches(&dims, a.world)?;
            let table = ProfileTable::new(&p)?;
            let note = format!(
                "clock: the profile {} itself (interpolated; {}); the policy sees a predictor fitted to it, \
                 and the same KV capacity",
                path.display(),
                p.capacity_summary()
            );
            Ok((Box::new(table), p, note))
        }
        None => {
            let m = component_model(a)?;
            let prof = sampled_profile(&m, a.world)?;
            let note = format!(
                "clock: {} (constants: src/sim/component.rs; `pat simulate --calibration` compares it with public measurements); \
                 {}; the policy sees only a predictor fitted to a profile sampled from it, and the same KV capacity",
                m.describe(),
                prof.capacity_summary()
            );
            Ok((Box::new(m), prof, note))
        }
    }
}

/// Runs the simulation and builds the report (what `run` prints).
pub fn report(a: &SimulateArgs) -> Result<SimReport> {
    check_flags(a)?;
    let path = a
        .trace
        .as_ref()
        .ok_or_else(|| Error::Usage("--trace is required".into()))?;
    let loaded = super::common::load_trace(path)?;
    let (clock, mut profile, source_note) = world_model(a)?;
    check_bounds(a, &loaded, &profile)?;
    let trace = loaded.trace;
    if let Some(ms) = a.switch_fixed_ms {
        profile.switch.fixed_ms = ms;
    }
    let predictor = Predictor::from_profile(&profile)?;
    let switch = SwitchCost::from_profile(&profile);
    let fitted = predictor.tps();
    let mut candidates: Vec<usize> = profile
        .model
        .candidate_tps(a.world)
        .into_iter()
        .filter(|t| fitted.contains(t))
        .collect();
    if candidates.is_empty() {
        return Err(Error::Invalid(format!(
            "no tp degree is both valid for --world {} and profiled (profiled: {fitted:?})",
            a.world
        )));
    }
    if let Some(s) = a.start_tp {
        let d = &profile.model;
        pat::parallel::layout::check_tp_for_dims(
            s,
            d.num_heads,
            d.num_kv_heads,
            d.intermediate_size,
        )
        .map_err(|e| {
            Error::Invalid(format!(
                "--start-tp {s}: {e} (the layouts of --world {} this model takes: tp {})",
                a.world,
                candidates
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    }
    let left_out = fit_candidates(a, &trace, clock.as_ref(), &mut candidates)?;
    let lengths_from = match &a.lengths_from {
        Some(p) => {
            let longest = trace.response_lens().into_iter().max().unwrap_or(1);
            Some(super::common::lengths_from(p, a.cap, longest)?)
        }
        None => None,
    };
    let cfg = SimConfig {
        world: a.world,
        candidates,
        check_every: a.check_every,
        margin: a.margin,
        min_gain_ms: a.min_gain_ms,
        start_tp: a.start_tp,
        placement: match a.placement {
            PlacementArg::Chunks => Placement::Chunks,
            PlacementArg::Lpt => Placement::Lpt,
        },
        optimum: !a.no_optimum,
        optimum_on_estimates: a.optimum_on_estimates,
        lockstep: false,
        lengths_from,
    };
    let model = SimModel {
        clock: clock.as_ref(),
        predictor: &predictor,
        switch: &switch,
    };
    let pb = super::common::progress(runs_in_all(&cfg) as u64, "simulating");
    let all = simulate_all_reporting(&trace, &model, &cfg, &|r| {
        pb.set_message(format!("simulating (done: {})", r.policy));
        pb.inc(1);
    });
    pb.finish_and_clear();
    let (runs, best) = all?;
    let mut notes = vec![source_note];
    notes.extend(left_out);
    if a.profile.is_some() {
        // The most a replica at tp runs: its share of every request at once (KV room may
        // keep it smaller).
        let n = trace.requests.len();
        let batch_at = |tp: usize| n.div_ceil((a.world / tp.max(1)).max(1));
        let context = trace
            .requests
            .iter()
            .map(|r| r.prompt_len + r.response_len)
            .max()
            .unwrap_or(0);
        if let Some(over) = ProfileTable::new(&profile)?.beyond(context, batch_at, &cfg.candidates)
        {
            errln!("warning: {over}");
            notes.push(format!("EXTRAPOLATED: {over}"));
        }
        let measured: Vec<usize> = profile.prefill_points().iter().map(|p| p.0).collect();
        let missing: Vec<String> = cfg
            .candidates
            .iter()
            .filter(|tp| !measured.contains(tp))
            .map(|tp| tp.to_string())
            .collect();
        if !missing.is_empty() {
            notes.push(format!(
                "INTERPOLATED: the profile has no prefill rate at tp {}; it is taken from the \
                 nearest measured tp (linear between two)",
                missing.join(", ")
            ));
        }
    }
    if let Ok(v) = validate(&profile, 0.2, 0) {
        notes.push(format!(
            "predictor ({}) on 20% held-out profile samples: MAPE {:.2}%",
            predictor.form.name(),
            v.overall_mape
        ));
    }
    let searched = runs.iter().any(|r| r.policy == "optimum");
    notes.push(format!(
        "replicas decode independently and meet at each switch (a barrier) and at the end; the batch is placed as {}; \
         adaptive estimates remaining lengths from {}, the oracle rule knows them{}",
        match cfg.placement {
            Placement::Chunks => "contiguous chunks per replica (VeRL)",
            Placement::Lpt => "LPT on the true lengths (an ideal)",
        },
        match (&a.lengths_from, &cfg.lengths_from) {
            (Some(p), Some(d)) => format!(
                "the {} response lengths of {} (out of sample)",
                d.observed(),
                p.display()
            ),
            _ => "this batch's own length distribution (in-sample)".to_string(),
        },
        if !searched {
            String::new()
        } else {
            format!(
                "; the optimum is the best schedule found on the true clock with the true lengths: a search over up to {} switches at {} evenly spaced rounds, refined, \
                 and the schedules the rules followed (src/sim/optimum.rs); an upper bound on the true optimum{}",
                pat::sim::optimum::MAX_SWITCHES,
                pat::sim::optimum::GRID - 1,
                if cfg.optimum_on_estimates {
                    "; optimum @est is the same search with every switch placing the live sequences where adaptive would, \
                     on estimated lengths (adaptive's distance to it is its schedule; the rest of its distance to the optimum is placement; \
                     the optimum also replays its schedule, placing on true lengths, or takes its run where that is faster)"
                } else {
                    ""
                },
            )
        },
    ));
    let stats = trace.stats(a.cap);
    if a.cap.is_none() {
        notes.push(format!(
            "no --cap: the cap is taken as the longest response ({} tokens), so \"at cap\" counts the \
             responses that long and \"cap/3\" is a third of it",
            stats.cap
        ));
    }
    Ok(SimReport::new(
        &profile,
        &loaded.path.display().to_string(),
        stats,
        &cfg,
        runs,
        best,
        notes,
    ))
}

/// The calibration table: the default H100 component model against public step times.
pub fn calibration_table() -> String {
    let mut s = String::from(
        "MODELED step times (default H100 SXM NVLink component model, host 20 us/seq) vs public measurements\n\n",
    );
    s += &format!(
        "{:<10} {:>3} {:>6} {:>6} {:>9} {:>14} {:>7}  source\n",
        "model", "tp", "batch", "ctx", "model ms", "public ms", "error"
    );
    for c in CALIBRATION {
        let shape: ModelShape = c.shape.parse().unwrap_or(ModelShape::Llama3_8b);
        let m = ComponentModel::new(
            shape.dims(),
            ComponentParams::defaults(GpuKind::H100, Link::NvLink),
        );
        let Ok(m) = m else { continue };
        let ms = m.step_ms(c.tp, c.batch, c.context as f64);
        let public = if c.lo_ms == c.hi_ms {
            format!("{}", c.lo_ms)
        } else {
            format!("{}-{}", c.lo_ms, c.hi_ms)
        };
        s += &format!(
            "{:<10} {:>3} {:>6} {:>6} {:>9.2} {:>14} {:>+6.1}%  {}\n",
            c.shape,
            c.tp,
            c.batch,
            c.context,
            ms,
            public,
            100.0 * range_error(ms, c.lo_ms, c.hi_ms),
            c.source
        );
    }
    s
}

pub fn run(a: SimulateArgs) -> Result<()> {
    if a.calibration {
        return super::common::stdout_write(format_args!("{}", calibration_table()));
    }
    // The chart is written after the runs (the optimum's search takes a while): a bad path
    // fails now.
    let svg = a
        .svg
        .as_deref()
        .map(|p| super::common::OutFile::claim(p, "--svg"))
        .transpose()?;
    let rep = report(&a)?;
    if let Some(mut out) = svg {
        let runs: Vec<_> = rep.rows.iter().map(|r| r.result.clone()).collect();
        let clock = match &a.profile {
            Some(p) => format!(
                "clock: profile {} ({})",
                p.display(),
                rep.profile.provenance()
            ),
            None => "MODELED".into(),
        };
        let title = format!(
            "{} on {}, {} ({}) - {clock}",
            rep.model.split(' ').next().unwrap_or("model"),
            match &a.profile {
                Some(_) => super::common::plural(rep.world, "rank"),
                None => super::common::plural(rep.world, "GPU"),
            },
            super::common::plural(rep.trace.count, "request"),
            rep.trace_path
        );
        out.write(chart(&runs, rep.world, rep.trace.count, &title).as_bytes())?;
    }
    if a.json {
        outln!("{}", rep.to_json())?;
    } else {
        super::common::stdout_write(format_args!("{}", rep.table()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
