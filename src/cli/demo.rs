//! `pat demo`: the main job on a built-in default, no arguments needed, in two parts.
//!
//! 1. **The mechanism, for real** (CPU, a random `small` model, `--world` ranks as threads): one
//!    long-tail rollout batch run static at the lowest tp, static at tp = world, and with a live
//!    switch from the first to the second once most requests have finished. The tokens of all
//!    three are compared (the switch must not change a single one), the switch record shows the
//!    weight bytes that crossed ranks (zero: shards nest when tp grows) and the KV moved, and each
//!    run is timed twice so its run-to-run spread is measured and stated: a difference inside it
//!    is called noise.
//! 2. **What it buys, MODELED** ([`modeled`]): the simulator on an 8 x H100 node with the
//!    LLaMA-3.1-8B shape and a GRPO batch (128 prompts x 8 responses, 24K cap), for a modern
//!    engine's host cost (20 us per sequence per step) and a PAT-era one (80 us): every static
//!    layout, PAT's rule, the adaptive rule, its oracle and the searched optimum, and an SVG
//!    timeline.

mod modeled;

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::common::{open_model, plural, progress};
use super::{ArchArg, PresetArg};
use pat::engine::{Backend, Engine, EngineOptions, Output, Request, SwitchReport};
use pat::error::{Error, Result};
use pat::model::init::{init_model, InitOptions};
use pat::model::ModelDir;
use pat::parallel::layout::check_tp_for_model;
use pat::policy::{Trace, TraceRequest};
use pat::reshard::cost::{CostModel, KvPolicy};
use pat::Dtype;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Use this model directory instead of making a random one.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Architecture of the random model (not with --model).
    #[arg(long, value_enum, default_value = "llama", conflicts_with = "model")]
    pub arch: ArchArg,
    /// Size of the random model (not with --model).
    #[arg(long, value_enum, default_value = "small", conflicts_with = "model")]
    pub preset: PresetArg,
    /// Ranks (threads) of the real run; it switches from the lowest tp to tp = world.
    #[arg(long, default_value_t = 2, value_parser = super::common::ranks)]
    pub world: usize,
    /// Requests in the real batch.
    #[arg(long, default_value_t = 16, value_parser = super::common::count)]
    pub batch: usize,
    /// Longest response of the real batch (the stragglers run to it).
    #[arg(long, default_value_t = 192)]
    pub max_response: usize,
    /// Seed of the random model's weights and of the batch's lengths and prompt ids.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the modeled part's SVG timeline (not with --no-sim).
    #[arg(
        long,
        default_value = "pat-demo-timeline.svg",
        conflicts_with = "no_sim"
    )]
    pub svg: PathBuf,
    /// Skip the modeled 8-GPU part.
    #[arg(long)]
    pub no_sim: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Skewed response lengths: most short, ~12% long, one at the cap (a DeepScaleR-like tail).
/// The longest prompt of [`long_tail_trace`].
const LONGEST_PROMPT: usize = 48;

pub fn long_tail_trace(n: usize, cap: usize, vocab: usize, seed: u64) -> Trace {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let requests = (0..n)
        .map(|i| {
            let prompt_len = rng.random_range(8..=LONGEST_PROMPT);
            let response_len = if i == 0 {
                cap
            } else if rng.random_bool(0.12) {
                rng.random_range(cap / 2..=cap)
            } else {
                rng.random_range((cap / 16).max(1)..=(cap / 5).max(2))
            };
            let ids = pat::model::sampling::random_ids(&mut rng, prompt_len, vocab);
            TraceRequest {
                prompt_len,
                response_len,
                input_ids: Some(ids),
                group: None,
            }
        })
        .collect();
    Trace { requests }
}

/// Refuses a `--max-response` the model cannot hold after the longest prompt.
fn check_max_response(max_response: usize, max_pos: usize, what: &str) -> Result<()> {
    if max_response.saturating_add(LONGEST_PROMPT) > max_pos {
        return Err(Error::Invalid(format!(
            "--max-response {max_response}: {what} holds {max_pos} positions, and prompts run up to \
             {LONGEST_PROMPT} tokens: at most {}",
            max_pos.saturating_sub(LONGEST_PROMPT)
        )));
    }
    Ok(())
}

pub fn run(a: DemoArgs) -> Result<()> {
    if a.batch == 0 {
        return Err(Error::Invalid("--batch must be at least 1, got 0".into()));
    }
    if a.world < 2 {
        return Err(Error::Invalid(format!(
            "--world must be at least 2 (a switch needs two layouts), got {}",
            a.world
        )));
    }
    if a.max_response < 2 {
        return Err(Error::Usage(format!(
            "--max-response must be at least 2, got {}",
            a.max_response
        )));
    }
    if a.model.is_none() {
        check_preset(&a)?;
    }
    // The timeline is written at the end of a run of a minute or more: a bad path fails now.
    let mut svg = (!a.no_sim)
        .then(|| super::common::OutFile::claim(&a.svg, "--svg"))
        .transpose()?;
    let tmp = std::env::temp_dir().join(format!("pat-demo-{}", std::process::id()));
    // The scratch model (~100 MB for the default preset) goes on every way out, Ctrl-C included.
    let _scratch = a
        .model
        .is_none()
        .then(|| super::interrupt::RemoveOnInterrupt::new(&tmp));
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => {
            let opts = InitOptions {
                arch: a.arch.into(),
                preset: a.preset.into(),
                seed: a.seed,
                dtype: Dtype::F32,
                force: true,
                shard: 1,
            };
            errln!("making a {} in {}", random_label(&a), tmp.display());
            init_model(&tmp, &opts)?;
            tmp.clone()
        }
    };
    // Once written, the timeline stays, even if what follows it failed (a closed stdout).
    let result = run_on(&a, &dir, svg.as_mut());
    if a.model.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// What can be known of the random model before it is written (minutes and tens of GiB for the
/// larger presets): its positions hold the batch, --world splits it, and its f32 weights fit
/// this machine's available memory and the temporary directory's free space.
fn check_preset(a: &DemoArgs) -> Result<()> {
    let p = pat::model::init::preset_dims(a.arch.into(), a.preset.into());
    check_max_response(a.max_response, p.max_position_embeddings, "the preset")?;
    let d = &p.dims;
    pat::parallel::layout::check_tp_for_dims(
        a.world,
        d.num_heads,
        d.num_kv_heads,
        d.intermediate_size,
    )
    .map_err(|e| e.context("--world"))?;
    let f32_dims = pat::policy::ModelDims {
        dtype_bytes: 4,
        ..d.clone()
    };
    let bytes = f32_dims.sharded_weight_bytes() as u64;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let name = pat::model::init::Preset::from(a.preset).name();
    let room = [
        (
            pat::backend::host_available_bytes(),
            "this machine's available memory",
        ),
        (
            free_disk_bytes(&std::env::temp_dir()),
            "the free space of the temporary directory",
        ),
    ];
    for (have, what) in room {
        if let Some(have) = have.filter(|&h| bytes > h) {
            return Err(Error::Invalid(format!(
                "--preset {name}: the demo runs on the CPU in f32, and this model's weights take \
                 {:.1} GiB, more than {what} ({:.1} GiB); use --preset small (the default) or \
                 tiny, or --model with a model of your own",
                gib(bytes),
                gib(have)
            )));
        }
    }
    Ok(())
}

/// Bytes free for an unprivileged writer on the filesystem holding `dir` (`None` where it
/// cannot be read).
#[cfg(not(unix))]
fn free_disk_bytes(_dir: &Path) -> Option<u64> {
    None
}

/// Bytes free for an unprivileged writer on the filesystem holding `dir` (`None` where it
/// cannot be read).
#[cfg(unix)]
fn free_disk_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `st` a valid out-pointer for one statvfs.
    let r = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // Both fields are 32-bit on some targets.
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The random model's name in the demo's text, e.g. "random llama model (preset small)".
fn random_label(a: &DemoArgs) -> String {
    let arch = match pat::model::config::Arch::from(a.arch) {
        pat::model::config::Arch::Llama => "llama",
        pat::model::config::Arch::Qwen3 => "qwen3",
    };
    let preset: pat::model::init::Preset = a.preset.into();
    format!("random {arch} model (preset {})", preset.name())
}

/// A forced switch: (decode step, to tp), or none.
type Switch = Option<(usize, usize)>;

/// One timed run of the batch: static at `tp`, or switching to `switch.1` after `switch.0` steps.
struct Run {
    secs: f64,
    outputs: Vec<Output>,
    report: Option<SwitchReport>,
}

fn one_run(
    m: &ModelDir,
    world: usize,
    tp: usize,
    reqs: &[Request],
    switch: Switch,
    cost: &CostModel,
) -> Result<Run> {
    let backend = Backend::Cpu;
    let mut opts =
        EngineOptions::for_memory_budget(&m.cfg, &backend, world, tp, Dtype::F32, 64 << 20)?;
    opts.kv_blocks = opts
        .kv_blocks
        .max(Engine::blocks_needed(reqs, opts.block_size)?);
    let mut engine = Engine::new(m.cfg.clone(), &m.ck, opts)?;
    engine.add_requests(reqs)?;
    let t0 = Instant::now();
    let mut report = None;
    let mut step = 0usize;
    while engine.live() > 0 {
        if let Some((_, to)) = switch.filter(|s| s.0 == step) {
            report = Some(engine.reconfigure(to, KvPolicy::Auto, cost)?);
        }
        engine.step()?;
        step += 1;
    }
    Ok(Run {
        secs: t0.elapsed().as_secs_f64(),
        outputs: engine.outputs(),
        report,
    })
}

/// The demo on the model in `dir`; the modeled part (unless `--no-sim`) writes its timeline
/// to `svg`.
fn run_on(a: &DemoArgs, dir: &Path, svg: Option<&mut super::common::OutFile>) -> Result<()> {
    let m = open_model(dir)?;
    check_max_response(a.max_response, m.cfg.max_position_embeddings, "the model")?;
    let trace = long_tail_trace(a.batch, a.max_response, m.cfg.vocab_size, a.seed);
    let low = (1..=a.world)
        .find(|t| a.world.is_multiple_of(*t) && check_tp_for_model(*t, &m.cfg).is_ok())
        .unwrap_or(1);
    check_tp_for_model(a.world, &m.cfg).map_err(|e| e.context("--world"))?;
    let reqs: Vec<Request> = trace
        .requests
        .iter()
        .map(|r| Request {
            input_ids: r.input_ids.clone().unwrap_or_default(),
            max_new_tokens: r.response_len,
            ignore_eos: true,
        })
        .collect();
    // Switch once every request shorter than a quarter of the cap has finished: the long tail.
    let at = (a.max_response / 4).max(1);
    let configs: [(String, usize, Switch); 3] = [
        (format!("static tp{low} x dp{}", a.world / low), low, None),
        (format!("static tp{} x dp1", a.world), a.world, None),
        (
            format!("tp{low} -> tp{} at step {at}", a.world),
            low,
            Some((at, a.world)),
        ),
    ];
    errln!(
        "part 1: {} on {}, each layout run twice (interleaved) to measure the spread...",
        plural(a.batch, "request"),
        plural(a.world, "CPU rank")
    );
    // KV moves or is recomputed by the engine's cost model on this machine's copy bandwidth
    // (recompute priced at 1e5 prefill tokens/s: migrating wins here), measured once here,
    // outside the timed runs.
    let cost = CostModel::measured_cpu(1e5);
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(), Vec::new(), Vec::new()];
    let pb = progress(6, "real runs");
    for _ in 0..2 {
        for (k, (_, tp, sw)) in configs.iter().enumerate() {
            runs[k].push(one_run(&m, a.world, *tp, &reqs, *sw, &cost)?);
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let same_tokens = runs
        .iter()
        .flatten()
        .all(|r| r.outputs == runs[0][0].outputs);
    let report = runs[2][0].report.clone();
    let sim = match svg {
        None => None,
        Some(svg) => {
            errln!("part 2: simulating an 8 x H100 node on a GRPO batch (MODELED)...");
            Some(modeled::run(svg)?)
        }
    };
    let lens = trace.response_lens();
    let summary: Vec<(String, f64, f64)> = configs
        .iter()
        .zip(&runs)
        .map(|((name, _, _), r)| {
            let (x, y) = (r[0].secs, r[1].secs);
            (name.clone(), x.min(y), (x - y).abs() / x.min(y))
        })
        .collect();
    let spread = summary.iter().map(|s| s.2).fold(0.0, f64::max);
    if a.json {
        let rows: Vec<_> = summary
            .iter()
            .map(|(n, s, sp)| serde_json::json!({"run": n, "best_of_2_s": s, "spread": sp}))
            .collect();
        outln!(
            "{}",
            serde_json::json!({
                "real": {"world": a.world, "batch": a.batch, "max_response": a.max_response,
                         "tokens_identical": same_tokens, "switch": report, "runs": rows},
                "modeled": sim.as_ref().map(|s| &s.json),
            })
        )?;
        return Ok(());
    }
    outln!(
        "1. The mechanism, for real: {} (responses {}..{} tokens), {}, {}\n",
        plural(a.batch, "request"),
        lens.iter().min().unwrap_or(&0),
        lens.iter().max().unwrap_or(&0),
        plural(a.world, "CPU rank"),
        match &a.model {
            Some(d) => format!(
                "model {} ({:?}, {}, hidden {})",
                d.display(),
                m.cfg.arch,
                plural(m.cfg.num_layers, "layer"),
                m.cfg.hidden_size
            ),
            None => random_label(a),
        }
    )?;
    outln!(
        "{:<24} {:>12} {:>12} {:>16}",
        "run",
        "best of 2 ms",
        "spread",
        "vs static tp-low"
    )?;
    let base = summary[0].1;
    for (name, s, sp) in &summary {
        let d = 100.0 * (s / base - 1.0);
        let tag = if *s != base && d.abs() / 100.0 <= spread {
            " (noise)"
        } else {
            ""
        };
        outln!(
            "{name:<24} {:>12.1} {:>11.1}% {:>+15.1}%{tag}",
            s * 1e3,
            100.0 * sp,
            d
        )?;
    }
    outln!(
        "\ntokens identical in all six runs (static, switched): {}",
        if same_tokens { "yes" } else { "NO" }
    )?;
    if let Some(r) = &report {
        outln!(
            "the switch: tp{} -> tp{} with {} ({}): {} migrated, {} recomputed; \
             weight bytes across ranks {} (shards nest when tp grows), KV bytes across ranks {}, {:.1} ms",
            r.from_tp,
            r.to_tp,
            plural(r.n_inflight, "live sequence"),
            plural(r.kv_tokens, "cached token"),
            r.n_migrated,
            r.n_recomputed,
            r.weight_bytes_cross_rank,
            r.bytes_moved_cross_rank - r.weight_bytes_cross_rank,
            r.total_ms
        )?;
    }
    outln!(
        "timing on a shared CPU: a difference within the measured spread ({:.1}%) is noise, not a gain or a loss; \
         CPU ranks share memory bandwidth, so this part shows that the switch is exact and cheap, not what it buys.",
        100.0 * spread
    )?;
    if let Some(s) = &sim {
        outln!("\n{}", s.table)?;
    }
    if !same_tokens {
        return Err(Error::Internal(
            "a live switch changed the generated tokens".into(),
        ));
    }
    Ok(())
}
