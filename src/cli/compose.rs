//! `pat compose-profile`: a node profile from shard profiles measured on one GPU
//! (`pat::sim::compose`), written as a profile `pat simulate --profile` and `pat rollout` read.

use std::path::PathBuf;
use std::str::FromStr;

use clap::Args;

use pat::error::Result;
use pat::policy::modeled::{Link, ModelShape};
use pat::policy::predictor::validate;
use pat::policy::Profile;
use pat::sim::compose::compose_node;
use pat::sim::ComponentParams;

/// `K=FILE`: the profile of the TP-K shard model.
#[derive(Clone, Debug)]
pub struct ShardArg {
    pub k: usize,
    pub file: PathBuf,
}

impl FromStr for ShardArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (k, f) = s
            .split_once('=')
            .ok_or_else(|| format!("expected K=FILE (e.g. 8=shard8.json), got `{s}`"))?;
        let k: usize = k
            .parse()
            .ok()
            .filter(|&k| k > 0)
            .ok_or_else(|| format!("K in K=FILE must be a positive integer, got `{k}`"))?;
        if f.is_empty() {
            return Err(format!("FILE in K=FILE is empty in `{s}`"));
        }
        Ok(ShardArg {
            k,
            file: PathBuf::from(f),
        })
    }
}

#[derive(Args, Debug)]
pub struct ComposeArgs {
    /// K=FILE: `pat profile --world 1` of the model `pat init-model --shard K` wrote (repeatable;
    /// one per tp degree of the node).
    #[arg(long = "shard", required = true, value_name = "K=FILE")]
    pub shards: Vec<ShardArg>,
    /// The full model the shards were cut from (a built-in shape; see also --model)
    /// [default: llama3-8b].
    #[arg(long, conflicts_with = "model")]
    pub model_shape: Option<ModelShape>,
    /// ... or the full model's directory (its config.json), e.g. a small preset for a rehearsal.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// GPUs of the node the profile describes.
    #[arg(long, default_value_t = 8, value_parser = super::common::ranks)]
    pub world: usize,
    /// Link between the node's GPUs: picks the all-reduce table (nvlink, pcie, or GB/s;
    /// default nvlink for h100 and h200, pcie for a40).
    #[arg(long)]
    pub link: Option<Link>,
    /// The node's GPUs (h100, h200 or a40): their memory sets each replica's KV capacity.
    #[arg(long, value_enum, default_value = "h100")]
    pub gpu: super::simulate::Gpu,
    /// Fraction of GPU memory for weights + KV (colocated RL runs 0.4-0.6): a TP-k replica
    /// holds `k * fraction * GPU memory - weights` of KV; `pat simulate` queues and preempts
    /// past it.
    #[arg(long, default_value_t = 0.5, value_parser = super::common::share)]
    pub mem_fraction: f64,
    /// Output profile JSON.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: ComposeArgs) -> Result<()> {
    let gpu: pat::sim::GpuKind = a.gpu.into();
    let mut params = ComponentParams::defaults(gpu, a.link.unwrap_or(gpu.default_link()));
    params.mem_fraction = a.mem_fraction;
    let shards = a
        .shards
        .iter()
        .map(|s| Profile::load(&s.file).map(|p| (s.k, p)))
        .collect::<Result<Vec<_>>>()?;
    let full = match &a.model {
        Some(dir) => {
            let cfg =
                pat::model::config::ModelConfig::load(dir).map_err(|e| e.context("--model"))?;
            pat::model::dims::ModelDims::from_config(&cfg)
        }
        None => a.model_shape.unwrap_or(ModelShape::Llama3_8b).dims(),
    };
    // The full model named as the user set it (or did not: the default shape).
    let full_from = match &a.model {
        Some(dir) => format!("--model {}", dir.display()),
        None => match a.model_shape {
            Some(s) => format!("full model: --model-shape {s}"),
            None => {
                "full model: --model-shape llama3-8b, the default; give --model DIR for your own"
                    .into()
            }
        },
    };
    let mut p = compose_node(&shards, &full, a.world, &params)
        .map_err(|e| e.context(format!("--shard ({full_from})")))?;
    p.source = a.out.clone();
    let missing: Vec<usize> = full
        .candidate_tps(a.world)
        .into_iter()
        .filter(|t| !p.decode_tps().contains(t))
        .collect();
    if !missing.is_empty() {
        errln!(
            "note: no --shard for tp {missing:?}: the profile covers only tp {:?} (`pat simulate` \
             and the policy consider only the tps it covers)",
            p.decode_tps()
        );
    }
    let no_room: Vec<usize> = (p.kv_capacity_tokens.iter())
        .filter(|&(_, &cap)| cap == 0)
        .map(|(&k, _)| k)
        .collect();
    if !no_room.is_empty() {
        errln!(
            "note: at tp {no_room:?} a replica's weights alone fill --mem-fraction of the GPU memory: \
             no room for KV (`pat simulate` leaves out a layout that cannot hold its longest request)"
        );
    }
    p.validate()?;
    super::common::OutFile::claim(&a.out, "--out")?.write((p.to_json() + "\n").as_bytes())?;
    let fit = validate(&p, 0.2, 0)
        .map(|r| format!("{:.2}%", r.overall_mape))
        .unwrap_or_else(|e| format!("not computed ({e})"));
    errln!(
        "wrote {}: {} at tp {:?}; predictor held-out error {fit}",
        a.out.display(),
        super::common::plural(p.decode.len(), "decode sample"),
        p.decode_tps()
    );
    Ok(())
}
