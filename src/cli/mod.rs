//! The `pat` command line: argument definitions and dispatch.

/// `println!` for the commands: returns the error (closed pipe, full disk) with `?` instead of
/// panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::common::stdout_write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// A line on stderr (progress, records, warnings, errors). Where stderr is closed or full the
/// line is lost but the command goes on: the results on stdout and in files are what matter.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::cli::common::stderr_write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod bench;
mod bench_gemm;
mod bench_reshard;
pub mod common;
mod compose;
mod demo;
mod generate;
pub mod interrupt;
mod profile;
mod rollout;
pub mod simulate;
mod switch;
pub mod trace;
mod trace_import;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use pat::error::Result;
use pat::model::config::Arch;
use pat::model::init::{init_model, InitOptions, Preset};

/// Adaptive tensor parallelism for the long-tail generation stage of synchronous RLHF.
///
/// Runs a LLaMA-3.x / Qwen3 decoder over a paged KV cache on N ranks (threads on the CPU
/// reference backend), each rank holding only its tensor-parallel shard.
#[derive(Parser, Debug)]
#[command(name = "pat", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write a random-weight model directory in HF format (config.json, model.safetensors,
    /// tokenizer.json), so everything runs with no downloads.
    InitModel(InitModelArgs),
    /// Generate continuations; one JSON object per request on stdout, in input order.
    Generate(generate::GenerateArgs),
    /// The main job on a built-in default: a real live switch on CPU ranks (tokens identical, zero
    /// weight bytes moved), then what adaptive TP buys on a modeled 8-GPU node (MODELED).
    Demo(demo::DemoArgs),
    /// Offline profile of this engine (decode latency grid, prefill rate, transfer and switch
    /// costs) as the profile JSON the predictor and `pat simulate` read.
    Profile(profile::ProfileArgs),
    /// A node profile from per-rank shard profiles measured on one GPU (scripts/gpu-calibrate.sh)
    /// plus public all-reduce numbers for the link: what `pat simulate --profile` reads.
    ComposeProfile(compose::ComposeArgs),
    /// Real generation of a rollout batch with response lengths forced from a trace, under a
    /// static layout or the adaptive policy; JSONL timeline, switch records and a summary.
    Rollout(rollout::RolloutArgs),
    /// Rollout length traces: `gen` writes one (DeepScaleR-like, GRPO groups, uniform,
    /// straggler), `stats` summarizes one.
    Trace(trace::TraceArgs),
    /// Simulation of an N-GPU node on a component cost model or a measured profile: every static
    /// layout, PAT's rule, the adaptive rule, its oracle and the optimum; table, JSON, SVG.
    Simulate(simulate::SimulateArgs),
    /// Benchmarks; each prints one JSON record per setting on stdout and a readable line on stderr.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ArchArg {
    Llama,
    Qwen3,
}

impl From<ArchArg> for Arch {
    fn from(a: ArchArg) -> Arch {
        match a {
            ArchArg::Llama => Arch::Llama,
            ArchArg::Qwen3 => Arch::Qwen3,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PresetArg {
    /// 2 layers, hidden 64: for tests.
    Tiny,
    /// 8 layers, hidden 512, ~29M parameters: for CPU benchmarks.
    Small,
    /// LLaMA-3.1-8B dimensions (Qwen3-14B with --arch qwen3): for GPU benchmarks.
    #[value(name = "llama3-8b-shape")]
    Llama3_8bShape,
    /// SmolLM2-135M dimensions (30 layers, hidden 576, tied): a real shape for CPU benchmarks.
    #[value(name = "smollm-135m-shape")]
    Smollm135mShape,
}

impl From<PresetArg> for Preset {
    fn from(p: PresetArg) -> Preset {
        match p {
            PresetArg::Tiny => Preset::Tiny,
            PresetArg::Small => Preset::Small,
            PresetArg::Llama3_8bShape => Preset::Llama3_8bShape,
            PresetArg::Smollm135mShape => Preset::Smollm135mShape,
        }
    }
}

/// Where the ranks run (shared by the commands that run the engine).
#[derive(Args, Debug, Clone)]
pub struct BackendArgs {
    /// cpu: the f32 reference (a thread per rank; the busy ranks share the cores, each rank's
    /// GEMMs and attention split over its share; PAT_THREADS caps the cores used). cuda: GPU
    /// ranks with the hand-written kernels (needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendArg,
    /// With --backend cuda: the CUDA ordinal of each rank, comma-separated (e.g. 0,0,1,1).
    /// Default: one GPU per rank when there are at least --world GPUs, else every rank on GPU 0
    /// (ranks sharing a GPU reduce with device copies; one rank per GPU uses NCCL).
    #[arg(long, value_delimiter = ',', value_name = "ORDINALS")]
    pub devices: Option<Vec<usize>>,
    /// With --backend cuda: how a live TP switch moves weights and KV. device: each rank runs
    /// its per-rank programs on its own GPU buffers with the reshard kernels, bytes crossing
    /// ranks by device copies (ranks sharing a GPU, at most 16) or NCCL send/recv (one rank per
    /// GPU); other placements go through the host. host: every rank downloaded, resharded by the
    /// CPU programs and uploaded again (exact, slow; the cross-check).
    #[arg(long, value_enum, default_value = "device")]
    pub gpu_switch: GpuSwitchArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuSwitchArg {
    Device,
    Host,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendArg {
    Cpu,
    Cuda,
}

impl BackendArgs {
    /// `--gpu-switch` as written.
    pub fn gpu_switch_name(&self) -> &'static str {
        match self.gpu_switch {
            GpuSwitchArg::Device => "device",
            GpuSwitchArg::Host => "host",
        }
    }

    /// The engine backend, or a usage error for --devices without --backend cuda.
    pub fn backend(&self) -> Result<pat::engine::Backend> {
        match self.backend {
            BackendArg::Cpu if self.devices.is_some() => Err(pat::error::Error::Invalid(
                "--devices needs --backend cuda".into(),
            )),
            BackendArg::Cpu if self.gpu_switch != GpuSwitchArg::Device => Err(
                pat::error::Error::Invalid("--gpu-switch needs --backend cuda".into()),
            ),
            BackendArg::Cpu => Ok(pat::engine::Backend::Cpu),
            BackendArg::Cuda => Ok(pat::engine::Backend::Cuda {
                devices: self.devices.clone(),
                switch: match self.gpu_switch {
                    GpuSwitchArg::Device => pat::engine::GpuSwitch::Device,
                    GpuSwitchArg::Host => pat::engine::GpuSwitch::Host,
                },
            }),
        }
    }
}

#[derive(Args, Debug)]
pub struct InitModelArgs {
    /// Architecture: llama (LLaMA-3.x: GQA, llama3 RoPE scaling) or qwen3 (q/k norms, explicit
    /// head_dim).
    #[arg(long, value_enum, default_value = "llama")]
    pub arch: ArchArg,
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: PresetArg,
    /// Output directory (created; must be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage dtype of the weights.
    #[arg(long, default_value = "f32", value_name = "f32|bf16|f16")]
    pub dtype: pat::Dtype,
    /// Overwrite a non-empty output directory.
    #[arg(long)]
    pub force: bool,
    /// Write one rank's shard of TP-K instead (heads, kv heads, intermediate and vocab divided by
    /// K): `pat profile` on it measures a TP-K rank's compute on one GPU
    /// (scripts/gpu-calibrate.sh; `pat compose-profile` adds the collectives).
    #[arg(long, default_value_t = 1, value_name = "K", value_parser = common::count)]
    pub shard: usize,
}

/// Library parameter names, as library errors write them (in backticks), and the flag that sets
/// each one. The library never names a flag; this table is the one place they meet.
const FLAGS: &[(&str, &str)] = &[
    ("`block_size`", "--block-size"),
    ("`kv_blocks`", "--kv-blocks"),
    ("`temperature`", "--temperature"),
    ("`top_p`", "--top-p"),
    ("`top_k`", "--top-k"),
    ("`check_every`", "--check-every"),
    ("`devices`", "--devices"),
    ("`world`", "--world"),
    ("`tp`", "--tp"),
    ("`force`", "--force"),
    ("`shard`", "--shard"),
    ("`max_new_tokens`", "--max-new-tokens"),
    ("`backend cuda`", "--backend cuda"),
    ("`contexts`", "--contexts"),
    ("`dtype`", "--dtype"),
    ("`batches`", "--batches"),
    ("`steps`", "--steps"),
];

/// The environment variables pat reads, checked before any command runs (the library takes a
/// bad value as unset).
pub fn check_env() -> Result<()> {
    if let Some(v) = std::env::var_os("PAT_THREADS") {
        let v = v.to_string_lossy();
        if !v.trim().parse::<usize>().is_ok_and(|t| t > 0) {
            return Err(pat::Error::Invalid(format!(
                "PAT_THREADS must be a positive number of threads, got {v:?}"
            )));
        }
    }
    if let Some(v) = std::env::var_os("PAT_CPU_ISA") {
        let v = v.to_string_lossy();
        if !["portable", "avx2", "avx512"].contains(&v.as_ref()) {
            return Err(pat::Error::Invalid(format!(
                "PAT_CPU_ISA must be portable, avx2 or avx512, got {v:?}"
            )));
        }
    }
    Ok(())
}

/// Options a command reads only in a mode the command line did not pick, given anyway: the
/// message refusing them (accepted and ignored, they would suggest an effect they cannot have),
/// a usage error like clap's own conflicts (exit 2). `--devices` and `--gpu-switch host` need
/// `--backend cuda`; `pat generate --kv-transfer` needs a `--reconfigure`, and two
/// `--reconfigure` at one step would leave a layout that runs no step; `pat rollout --policy
/// static:K` never decides and never switches, so the adaptive rule's flags, the profile it
/// reads and how a switch moves KV are moot there.
pub fn moot_flags(m: &clap::ArgMatches) -> Option<String> {
    let mut leaf = m;
    while let Some((_, sub)) = leaf.subcommand() {
        leaf = sub;
    }
    let given = |id: &str| leaf.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    if let Ok(Some(BackendArg::Cpu)) = leaf.try_get_one::<BackendArg>("backend") {
        if given("devices") {
            return Some("--devices needs --backend cuda".into());
        }
        if let Ok(Some(GpuSwitchArg::Host)) = leaf.try_get_one::<GpuSwitchArg>("gpu_switch") {
            return Some("--gpu-switch host needs --backend cuda".into());
        }
    }
    if let Some(g) = m.subcommand_matches("generate") {
        let given = |id| g.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        if given("kv_transfer") && !given("reconfigure") {
            return Some(
                "--kv-transfer says how a live switch moves KV: give --reconfigure STEP:TP too"
                    .into(),
            );
        }
        // Two switches at one step: the first layout would run no step (a ladder is timed by
        // `pat bench switch --to A,B`).
        let mut at: std::collections::BTreeMap<usize, usize> = Default::default();
        for s in g
            .get_many::<switch::SwitchAt>("reconfigure")
            .into_iter()
            .flatten()
        {
            if let Some(tp) = at.insert(s.step, s.tp) {
                if tp == s.tp {
                    return Some(format!("--reconfigure {}:{tp} is given twice", s.step));
                }
                return Some(format!(
                    "--reconfigure {step}:{tp} and {step}:{} switch at the same step: the first \
                     layout would run no step (give each switch its own step; `pat bench switch \
                     --to A,B` times a ladder)",
                    s.tp,
                    step = s.step
                ));
            }
        }
    }
    let r = m.subcommand_matches("rollout")?;
    let Some(rollout::PolicyArg::Static(k)) = r.get_one::<rollout::PolicyArg>("policy") else {
        return None;
    };
    let adaptive_only = [
        "start_tp",
        "profile",
        "check_every",
        "margin",
        "min_gain_ms",
        "estimator",
        "lengths_from",
        "kv_transfer",
    ];
    adaptive_only
        .iter()
        .find(|&&id| r.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
        .map(|&id| {
            let value = r
                .get_raw(id)
                .and_then(|mut v| v.next())
                .map(|v| v.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!(
                "--{} {value} is for --policy adaptive; --policy static:{k} runs at tp {k} \
                 throughout",
                id.replace('_', "-")
            )
        })
}

/// A library error message with its parameter names turned into the flags that set them.
pub fn flag_names(msg: &str) -> String {
    FLAGS
        .iter()
        .fold(msg.to_string(), |m, (param, flag)| m.replace(param, flag))
}

/// The command line with every option of every subcommand accepting a negative number as its
/// value, so `--temperature -1` reaches pat's own check ("must be >= 0") and `--world -1`
/// clap's "invalid value '-1' for '--world'", instead of "unexpected argument '-1'".
pub fn command() -> clap::Command {
    fn negatives(cmd: clap::Command) -> clap::Command {
        let cmd = cmd.mut_args(|a| {
            if a.get_action().takes_values() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        });
        let subs: Vec<String> = cmd
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        subs.iter().fold(cmd, |c, n| c.mut_subcommand(n, negatives))
    }
    negatives(<Cli as clap::CommandFactory>::command())
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Command::InitModel(a) => {
            let opts = InitOptions {
                arch: a.arch.into(),
                preset: a.preset.into(),
                seed: a.seed,
                dtype: a.dtype,
                force: a.force,
                shard: a.shard,
            };
            let bytes = init_model(&a.out, &opts)?;
            errln!(
                "wrote {} ({:.1} MiB of weights)",
                a.out.display(),
                bytes as f64 / common::MIB
            );
            Ok(())
        }
        Command::Generate(a) => generate::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Bench(c) => bench::run(c),
        Command::Profile(a) => profile::run(a),
        Command::ComposeProfile(a) => compose::run(a),
        Command::Rollout(a) => rollout::run(a),
        Command::Trace(a) => trace::run(a),
        Command::Simulate(a) => simulate::run(a),
    }
}
