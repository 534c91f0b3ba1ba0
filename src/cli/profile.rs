//! `pat profile`: offline profile of the real engine on synthetic batches (the measurement is
//! `pat::engine::profiler`), written as the profile JSON the predictor and the decision rule read.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use super::common::{open_model, plural, progress, OutFile};
use pat::engine::profiler::{measure_profile, ProfileGrid};
use pat::engine::Backend;
use pat::error::{Error, Result};
use pat::model::ModelDir;
use pat::policy::predictor::{validate, FitForm};
use pat::policy::Profile;
use pat::Dtype;

#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// Model directory (HF layout: config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Ranks of the node the profile describes; tp degrees are its divisors that split the model.
    #[arg(long, value_parser = super::common::ranks)]
    pub world: usize,
    /// Output profile JSON.
    #[arg(long)]
    pub out: PathBuf,
    /// Live batch sizes of the decode grid.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8", value_parser = super::common::count)]
    pub batches: Vec<usize>,
    /// Context lengths (cached tokens per sequence) of the decode grid [default: 32,128,512,
    /// where a model holds fewer positions the longest it holds instead of what is over].
    #[arg(long, value_delimiter = ',', value_parser = super::common::count)]
    pub contexts: Option<Vec<usize>>,
    /// Decode steps timed per grid point (the median is kept).
    #[arg(long, default_value_t = 5, value_parser = super::common::count)]
    pub steps: usize,
    /// After profiling, report the predictor's mean absolute % error on held-out grid points.
    #[arg(long)]
    pub validate: bool,
    /// Seed of the prompts' token ids and of the held-out split of --validate.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the ranks run. On cuda every tp degree's ranks use --devices (default: one GPU per
    /// rank when there are enough, else all on GPU 0 — ranks sharing a GPU share its bandwidth,
    /// so such a profile describes one GPU, not a node). The switch is measured on the CPU only;
    /// on cuda it is modeled from the measured device copy bandwidth.
    #[command(flatten)]
    pub backend: super::BackendArgs,
    /// Weight dtype (cuda: also activations and KV).
    #[arg(long, default_value = "f32", value_name = "f32|bf16|f16")]
    pub dtype: pat::Dtype,
}

/// `--contexts` when not given.
const DEFAULT_CONTEXTS: [usize; 3] = [32, 128, 512];

/// The default contexts for a model whose grid points hold at most `most` cached tokens: those
/// over it lowered to it (kept distinct, at least one token).
fn default_contexts(most: usize) -> Vec<usize> {
    let mut c: Vec<usize> = DEFAULT_CONTEXTS
        .iter()
        .map(|&c| c.min(most).max(1))
        .collect();
    c.dedup();
    c
}

/// The held-out fraction of `--validate`.
const HOLDOUT: f64 = 0.25;

/// [`measure_profile`] on a checked grid (`tps` from [`ProfileGrid::tps`]) with the expected run
/// time and a progress bar on stderr.
fn measure_on(
    m: &ModelDir,
    grid: &ProfileGrid,
    tps: &[usize],
    backend: &Backend,
    dtype: Dtype,
) -> Result<Profile> {
    let prefill_tokens = grid.prefill_tokens(tps);
    // No time is promised up front: it depends on the model and the machine; the bar's eta is
    // measured from the points done.
    errln!(
        "profiling tp {:?} x batch {:?} x context {:?} on {}: {}, {} each ({} in all)",
        tps,
        grid.batches,
        grid.contexts,
        backend.name(),
        plural(grid.points(tps), "point"),
        plural(grid.steps, "decode step"),
        plural(prefill_tokens, "prefill token")
    );
    let pb = progress(grid.points(tps) as u64, "profile");
    let r = measure_profile(m, grid, backend, dtype, |done, _| {
        pb.set_position(done as u64)
    });
    pb.finish_and_clear();
    r
}

/// Refuses a grid too small for `--validate` (see [`validate`]: each tp holds out
/// `max(1, round(n * HOLDOUT))` of its `n` points and fits the rest, at least one point per
/// term; the fit needs two batch sizes and two contexts to tell their terms apart).
fn check_validate_grid(grid: &ProfileGrid) -> Result<()> {
    let distinct = |v: &[usize]| v.iter().collect::<BTreeSet<_>>().len();
    let (nb, nc) = (distinct(&grid.batches), distinct(&grid.contexts));
    if nb < 2 || nc < 2 {
        return Err(Error::Usage(format!(
            "--validate fits step time over batch and context: it needs at least 2 different \
             --batches and 2 different --contexts, got {nb} and {nc}"
        )));
    }
    let terms = FitForm::default().terms();
    let held_out = |n: usize| ((n as f64 * HOLDOUT).round() as usize).max(1);
    let need = (1..)
        .find(|&n| n >= held_out(n) + terms)
        .unwrap_or(usize::MAX);
    let (b, c) = (grid.batches.len(), grid.contexts.len());
    if b.saturating_mul(c) < need {
        return Err(Error::Usage(format!(
            "--validate needs at least {} per tp (it holds out {}% and fits {}), but --batches x \
             --contexts gives {b} x {c} = {}; add batches or contexts",
            plural(need, "grid point"),
            HOLDOUT * 100.0,
            plural(terms, "term"),
            b * c
        )));
    }
    Ok(())
}

pub fn run(a: ProfileArgs) -> Result<()> {
    let backend = a.backend.backend()?;
    super::common::check_backend_built(&backend)?;
    let m = open_model(&a.model)?;
    let mut grid = ProfileGrid {
        world: a.world,
        batches: a.batches.clone(),
        contexts: a.contexts.clone().unwrap_or_default(),
        steps: a.steps,
        seed: a.seed,
    };
    let lowered = a.contexts.is_none() && {
        grid.contexts = default_contexts(grid.longest_context(&m.cfg));
        grid.contexts != DEFAULT_CONTEXTS
    };
    // A value given twice would be measured twice (and weigh twice in the fit).
    for (flag, v) in [
        ("--batches", &mut grid.batches),
        ("--contexts", &mut grid.contexts),
    ] {
        let given = v.len();
        v.sort_unstable();
        v.dedup();
        if v.len() < given {
            errln!(
                "note: {flag} {} (each value once; {} given)",
                v.iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                given
            );
        }
    }
    let tps = grid.tps(&m)?;
    // Noted once the grid is known to be valid (a bad --world or --steps is the message).
    if lowered {
        errln!(
            "note: --contexts {} (the default's longest lowered to what the model holds: \
             max_position_embeddings {}, less the {} each point decodes)",
            grid.contexts
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(","),
            m.cfg.max_position_embeddings,
            plural(grid.steps + 1, "token")
        );
    }
    if a.validate {
        check_validate_grid(&grid)?;
    }
    let mut out = OutFile::claim(&a.out, "--out")?;
    let t0 = Instant::now();
    let mut profile = measure_on(&m, &grid, &tps, &backend, a.dtype)?;
    profile.source = a.out.clone();
    profile.validate()?;
    out.write((profile.to_json() + "\n").as_bytes())?;
    errln!(
        "wrote {} in {:.1} s",
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    // The engine times `--steps` decode steps per point; a sample's context is the cached
    // tokens at the middle one, which the fits use.
    errln!(
        "mid ctx: tokens cached at the middle of the {} (each --contexts value + {})",
        plural(grid.steps, "timed decode step"),
        grid.steps / 2
    );
    errln!(
        "{:>4} {:>6} {:>8} {:>10}",
        "tp",
        "batch",
        "mid ctx",
        "step ms"
    );
    for s in &profile.decode {
        errln!(
            "{:>4} {:>6} {:>8} {:>10.2}",
            s.tp,
            s.batch,
            s.context,
            s.step_ms
        );
    }
    for p in &profile.prefill {
        errln!("prefill tp {}: {:.0} tokens/s", p.tp, p.tokens_per_s);
    }
    if a.validate {
        let r = validate(&profile, HOLDOUT, a.seed)?;
        outln!("{}", serde_json::to_string(&r).unwrap_or_default())?;
        errln!(
            "predictor: mean absolute error {:.1}% on {} ({} fitted)",
            r.overall_mape,
            plural(r.n_test, "held-out point"),
            r.n_train
        );
    }
    Ok(())
}
