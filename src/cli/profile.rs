//! `pat profile`: offline profile of the real engine on synthetic batches (the measurement is
//! `pat::engine::profiler`), written as the profile JSON the predictor and the decision rule read.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use super::common::{open_model, progress};
use pat::engine::profiler::{measure_profile, ProfileGrid};
use pat::engine::Backend;
use pat::error::Result;
use pat::model::ModelDir;
use pat::policy::predictor::validate;
use pat::policy::Profile;
use pat::Dtype;

#[derive(Args, Debug)]
pub struct ProfileArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Ranks of the node the profile describes; tp degrees are its divisors that split the model.
    #[arg(long)]
    pub world: usize,
    /// Output profile JSON.
    #[arg(long)]
    pub out: PathBuf,
    /// Live batch sizes of the decode grid.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub batches: Vec<usize>,
    /// Context lengths (cached tokens per sequence) of the decode grid.
    #[arg(long, value_delimiter = ',', default_value = "32,128,512")]
    pub contexts: Vec<usize>,
    /// Decode steps timed per grid point (the median is kept).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// After profiling, report the predictor's mean absolute % error on held-out grid points.
    #[arg(long)]
    pub validate: bool,
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

/// [`measure_profile`] with the expected run time and a progress bar on stderr.
fn measure_on(
    m: &ModelDir,
    grid: &ProfileGrid,
    backend: &Backend,
    dtype: Dtype,
) -> Result<Profile> {
    let tps = grid.tps(m)?;
    let prefill_tokens = grid.prefill_tokens(&tps);
    if *backend == Backend::Cpu {
        eprintln!(
            "profiling tp {:?} x batch {:?} x context {:?}, {} decode steps each ({} prefill tokens in all; on this CPU backend at ~500 tok/s that is ~{:.0} s)",
            tps, grid.batches, grid.contexts, grid.steps, prefill_tokens, prefill_tokens as f64 / 500.0
        );
    } else {
        eprintln!(
            "profiling tp {:?} x batch {:?} x context {:?} on {}, {} decode steps each ({} prefill tokens in all)",
            tps, grid.batches, grid.contexts, backend.name(), grid.steps, prefill_tokens
        );
    }
    let pb = progress(grid.points(&tps) as u64, "profile");
    let r = measure_profile(m, grid, backend, dtype, |done, _| {
        pb.set_position(done as u64)
    });
    pb.finish_and_clear();
    r.map_err(|e| match e {
        e @ pat::Error::Invalid(_) => e.context("--batches/--contexts/--steps/--world"),
        e => e,
    })
}

pub fn run(a: ProfileArgs) -> Result<()> {
    let backend = a.backend.backend()?;
    let m = open_model(&a.model)?;
    let t0 = Instant::now();
    let grid = ProfileGrid {
        world: a.world,
        batches: a.batches.clone(),
        contexts: a.contexts.clone(),
        steps: a.steps,
        seed: a.seed,
    };
    let mut profile = measure_on(&m, &grid, &backend, a.dtype)?;
    profile.source = a.out.clone();
    profile.validate()?;
    profile.save(&a.out)?;
    eprintln!(
        "wrote {} in {:.1} s",
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    eprintln!(
        "{:>4} {:>6} {:>8} {:>10}",
        "tp", "batch", "context", "step ms"
    );
    for s in &profile.decode {
        eprintln!(
            "{:>4} {:>6} {:>8} {:>10.2}",
            s.tp, s.batch, s.context, s.step_ms
        );
    }
    for p in &profile.prefill {
        eprintln!("prefill tp {}: {:.0} tokens/s", p.tp, p.tokens_per_s);
    }
    if a.validate {
        let r = validate(&profile, 0.25, a.seed)?;
        outln!("{}", serde_json::to_string(&r).unwrap_or_default())?;
        eprintln!(
            "predictor: mean absolute error {:.1}% on {} held-out points ({} fitted)",
            r.overall_mape, r.n_test, r.n_train
        );
    }
    Ok(())
}
