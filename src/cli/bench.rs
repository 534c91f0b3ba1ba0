//! `pat bench one-batch`: SGLang `bench_one_batch` semantics on the engine. For each
//! (batch, input_len, output_len): warm up, prefill, decode; one JSON line per setting with
//! SGLang's keys plus the weights-over-measured-bandwidth roofline for a decode step.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::common::{open_model, plural, progress};
use pat::engine::{check_lengths, Engine, EngineOptions, Request, STEP_CAP};
use pat::error::{Error, Result};
use pat::model::sampling::{random_ids, SamplingParams};
use pat::stats::median;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Prefill + decode latency sweep over batch x input-len x output-len (SGLang bench_one_batch keys).
    OneBatch(OneBatchArgs),
    /// One live TP switch (or a ladder) on a running generation: one JSON record per switch with
    /// the cost of each component, bytes moved, peak extra memory and step latency after.
    Switch(super::switch::BenchSwitchArgs),
    /// GPU paged decode attention alone (cuda builds): achieved GB/s of KV read against the
    /// measured device copy bandwidth, per (num-seqs, context).
    Attention(AttentionArgs),
    /// The CPU backend's decode GEMMs alone on a model shape (every layer's own weights): ms per
    /// step, weight GB/s against the measured copy bandwidth, and matrixmultiply in the same run.
    Gemm(super::bench_gemm::GemmArgs),
    /// The GPU switch kernels alone (cuda builds): strided_copy compaction, kv_gather,
    /// kv_scatter and kv_copy at LLaMA-8B shapes, GB/s against the measured device copy
    /// bandwidth.
    Reshard(super::bench_reshard::ReshardArgs),
}

#[derive(Args, Debug)]
pub struct AttentionArgs {
    /// Sequences in the decode batch (sweepable, comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64", value_parser = super::common::count)]
    pub num_seqs: Vec<usize>,
    /// Tokens of context per sequence (sweepable).
    #[arg(long, value_delimiter = ',', default_value = "2048", value_parser = super::common::count)]
    pub context: Vec<usize>,
    /// Query heads on the rank (LLaMA-3.1-8B at tp 1: 32).
    #[arg(long, default_value_t = 32, value_parser = super::common::count)]
    pub q_heads: usize,
    /// KV heads on the rank (LLaMA-3.1-8B at tp 1: 8).
    #[arg(long, default_value_t = 8, value_parser = super::common::count)]
    pub kv_heads: usize,
    /// Dimension of each head (LLaMA-3.1-8B: 128).
    #[arg(long, default_value_t = 128, value_parser = super::common::count)]
    pub head_dim: usize,
    /// Tokens per KV block of the paged cache.
    #[arg(long, default_value_t = 16, value_parser = super::common::count)]
    pub block_size: usize,
    /// KV and query dtype.
    #[arg(long, value_enum, default_value = "bf16", value_name = "f32|bf16|f16")]
    pub dtype: pat::Dtype,
    /// Timed launches per setting (the median is reported).
    #[arg(long, default_value_t = 20, value_parser = super::common::count)]
    pub iters: usize,
    /// CUDA ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

#[derive(Args, Debug)]
pub struct OneBatchArgs {
    /// Model directory (HF layout: config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Ranks (tp x dp).
    #[arg(long, default_value_t = 1, value_parser = super::common::ranks)]
    pub world: usize,
    /// Tensor-parallel degree; must divide --world.
    #[arg(long, default_value_t = 1, value_parser = super::common::count)]
    pub tp: usize,
    #[command(flatten)]
    pub backend: super::BackendArgs,
    /// Weight (and, on cuda, activation and KV) dtype.
    #[arg(long, default_value = "f32", value_name = "f32|bf16|f16")]
    pub dtype: pat::Dtype,
    /// Batch sizes to sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,16", value_parser = super::common::count)]
    pub batch_size: Vec<usize>,
    /// Prompt lengths to sweep.
    #[arg(long, value_delimiter = ',', default_value = "128", value_parser = super::common::count)]
    pub input_len: Vec<usize>,
    /// Generated lengths to sweep (at least 2: the first token comes from the prefill, decode is
    /// timed over the rest).
    #[arg(long, value_delimiter = ',', default_value = "32")]
    pub output_len: Vec<usize>,
    /// Label written in each JSON row's `run_name` (to tell runs apart when comparing).
    #[arg(long, default_value = "pat")]
    pub run_name: String,
    /// Seed of the random prompt ids.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::OneBatch(a) => one_batch(a),
        BenchCommand::Switch(a) => super::switch::bench_switch(a),
        BenchCommand::Attention(a) => attention(a),
        BenchCommand::Gemm(a) => super::bench_gemm::gemm(a),
        BenchCommand::Reshard(a) => super::bench_reshard::reshard(a),
    }
}

#[cfg(not(feature = "cuda"))]
fn attention(_a: AttentionArgs) -> Result<()> {
    Err(Error::Invalid(
        "bench attention times the CUDA kernel: this pat was built without the `cuda` feature \
         (rebuild with `cargo build --release --features cuda`)"
            .into(),
    ))
}

/// GPU `ordinal` and its measured copy bandwidth (read + write, bytes/s), said on stderr.
#[cfg(feature = "cuda")]
pub(super) fn device_and_copy_bandwidth(
    ordinal: usize,
) -> Result<(pat::backend::cuda::CudaDev, f64)> {
    let dev = pat::backend::cuda::CudaDev::new(ordinal)?;
    let bw = pat::backend::cuda::bench::copy_bandwidth(&dev)?;
    errln!(
        "{} (GPU {ordinal}): device copy bandwidth {:.0} GB/s (read + write)",
        dev.name(),
        bw / 1e9
    );
    Ok((dev, bw))
}

#[cfg(feature = "cuda")]
fn attention(a: AttentionArgs) -> Result<()> {
    use pat::backend::cuda::{bench, workers::device_dtype};
    if a.iters == 0 {
        return Err(Error::Invalid("--iters must be at least 1".into()));
    }
    let (dev, bw) = device_and_copy_bandwidth(a.device)?;
    let dtype = device_dtype(a.dtype);
    for &ns in &a.num_seqs {
        for &ctx in &a.context {
            let r = bench::paged_attention_bench(
                &dev,
                dtype,
                ns,
                ctx,
                a.q_heads,
                a.kv_heads,
                a.head_dim,
                a.block_size,
                a.iters,
            )?;
            let frac = r.gbps * 1e9 / bw;
            outln!(
                "{}",
                serde_json::json!({
                    "kernel": "paged_attention", "device": dev.name(), "dtype": dtype.name(),
                    "num_seqs": ns, "context": ctx, "q_heads": a.q_heads, "kv_heads": a.kv_heads,
                    "head_dim": a.head_dim, "block_size": a.block_size, "partition": r.partition,
                    "median_ms": r.median_ms, "bytes": r.bytes, "gbps": r.gbps,
                    "copy_bandwidth_gbps": bw / 1e9, "fraction_of_copy_bandwidth": frac,
                })
            )?;
            errln!(
                "paged attention {:>9} x {ctx:>6} ctx: {:.3} ms, {:.0} GB/s = {:.0}% of copy bandwidth (split {:?})",
                plural(ns, "seq"),
                r.median_ms,
                r.gbps,
                100.0 * frac,
                r.partition
            );
        }
    }
    Ok(())
}

fn one_batch(a: OneBatchArgs) -> Result<()> {
    for (flag, values, least) in [
        ("--batch-size", &a.batch_size, 1),
        ("--input-len", &a.input_len, 1),
        // The first token comes from the prefill; decode is timed over the rest.
        ("--output-len", &a.output_len, 2),
    ] {
        if let Some(v) = values.iter().find(|&&v| v < least) {
            return Err(Error::Usage(format!(
                "{flag} values must be at least {least}, got {v}"
            )));
        }
    }
    let m = open_model(&a.model)?;
    for &i in &a.input_len {
        for &o in &a.output_len {
            check_lengths(&m.cfg, i, o).map_err(|msg| {
                Error::Invalid(format!("--input-len {i} with --output-len {o}: {msg}"))
            })?;
        }
    }
    let backend = a.backend.backend()?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let mut settings = Vec::new();
    for &b in &a.batch_size {
        for &i in &a.input_len {
            for &o in &a.output_len {
                settings.push((b, i, o));
            }
        }
    }
    // One engine for the whole sweep (loading an 8B shard takes a while): its pool holds the
    // largest setting; every setting's sequences finish and free their blocks before the next.
    let mut kv_blocks = 1;
    let mut largest = settings.first().copied().unwrap_or_default();
    for &(b, i, o) in &settings {
        let n = pat::kv::blocks_for(i + o, 16)
            .checked_mul(b)
            .filter(|&n| n <= u32::MAX as usize)
            .ok_or_else(|| Error::Invalid(format!("--batch-size {b} is too large")))?;
        if n > kv_blocks {
            (kv_blocks, largest) = (n, (b, i, o));
        }
    }
    let opts = EngineOptions {
        world: a.world,
        tp: a.tp,
        block_size: 16,
        kv_blocks,
        dtype: a.dtype,
        sampling: SamplingParams::default(),
    };
    let t_load = Instant::now();
    // The pool is sized by the flags of the largest setting, not by a --kv-blocks of this command.
    let mut engine = Engine::with_backend(m.cfg.clone(), &m.ck, opts, &backend).map_err(|e| {
        let (b, i, o) = largest;
        let at = format!("--batch-size {b} with --input-len {i} + --output-len {o}");
        match e {
            Error::KvExhausted(m) => Error::KvExhausted(format!(
                "{at}: {}",
                m.replace("`kv_blocks` ", "KV blocks: ")
            )),
            e => e,
        }
    })?;
    errln!(
        "loaded in {:.1} s: {}",
        t_load.elapsed().as_secs_f64(),
        engine.describe_ranks()
    );
    // The CPU backend's busy ranks share every core it may use, so host memory is measured with
    // that many threads; and, as decode only reads weights, also as a read stream (its true limit).
    let cpu = engine.backend() == "cpu";
    let threads = if cpu {
        pat::backend::cpu::cpu_threads()
    } else {
        a.world
    };
    let bws = engine.memory_bandwidths(threads)?;
    let read_bw = cpu.then(|| pat::backend::cpu::read_bandwidth(threads));
    if let Some(r) = read_bw {
        errln!(
            "measured read bandwidth of host memory: {:.1} GB/s ({})",
            r / 1e9,
            plural(threads, "thread")
        );
    }
    for (id, bw) in &bws {
        errln!(
            "measured copy bandwidth of {} {id}: {:.1} GB/s (read + write)",
            if engine.backend() == "cpu" {
                "host memory"
            } else {
                "GPU"
            },
            bw / 1e9
        );
    }
    // Every rank of a replica with sequences reads its whole weight shard once per decode step,
    // all such ranks at once (a batch smaller than dp leaves replicas idle: they read nothing);
    // ranks on the same memory share its bandwidth, so the step is bound by the busiest memory.
    let ids = engine.rank_memory_ids();
    let layout = pat::parallel::Layout::new(a.world, a.tp)?;
    let read_bytes: Vec<usize> = (0..a.world).map(|r| engine.decode_read_bytes(r)).collect();
    let roofline_for = |batch: usize| {
        let busy: Vec<usize> = (0..layout.dp().min(batch))
            .flat_map(|rep| (0..a.tp).map(move |t| (rep, t)))
            .map(|(rep, t)| layout.rank_of(rep, t))
            .collect();
        bws.iter()
            .map(|&(id, bw)| {
                let bytes: usize = busy
                    .iter()
                    .filter(|&&r| ids[r] == id)
                    .map(|&r| read_bytes[r])
                    .sum();
                bytes as f64 / (bw / 2.0) // reads only: half the copy traffic
            })
            .fold(0.0, f64::max)
    };
    let min_bw = bws.iter().map(|b| b.1).fold(f64::INFINITY, f64::min);
    let weight_bytes: usize = (0..a.world).map(|r| engine.rank_bytes(r).0).sum();
    let pb = progress(settings.len() as u64, "bench one-batch");
    for &(batch, input_len, output_len) in &settings {
        let vocab = m.cfg.vocab_size;
        let mut reqs = |n: usize, il: usize, ol: usize| -> Vec<Request> {
            (0..n)
                .map(|_| Request {
                    input_ids: random_ids(&mut rng, il, vocab),
                    max_new_tokens: ol,
                    ignore_eos: true,
                })
                .collect()
        };
        let real = reqs(batch, input_len, output_len);
        let warm = reqs(batch, input_len.min(16), 2);
        engine.add_requests(&warm)?;
        engine.run(|_| {})?;
        engine.add_requests(&real)?;
        let t0 = Instant::now();
        // The prefill: one step, or several where the prompts outgrow a step's cap
        // (`engine::STEP_CAP`); the decode steps follow.
        let (mut prefill, mut prefill_steps) = (0.0, 0usize);
        while engine.unprefilled() > 0 {
            prefill += engine.step()?.elapsed_ms / 1e3;
            prefill_steps += 1;
        }
        let mut decode = Vec::new();
        let mut launched = vec![pat::backend::cuda::launches()];
        // A decode step is one of the whole batch, one token each: after a prefill of several
        // steps the prompts started first finish first.
        engine.run(|r| {
            if r.tokens_out == batch && r.tokens_in == batch {
                decode.push(r.elapsed_ms / 1e3);
            }
            launched.push(pat::backend::cuda::launches());
        })?;
        if decode.is_empty() {
            return Err(Error::Invalid(format!(
                "--batch-size {batch} --input-len {input_len}: the prefill took {} so no step decoded the whole batch by --output-len {output_len} (a step prefills only what {STEP_CAP} holds); raise --output-len or lower the batch",
                plural(prefill_steps, "step")
            )));
        }
        // GPU kernels + cuBLAS calls per decode step (none on the CPU backend: null).
        let launches_per_step = match (launched.first(), launched.last()) {
            _ if engine.backend() == "cpu" => None,
            (Some(a), Some(b)) if launched.len() > 1 => {
                Some((b - a) as f64 / (launched.len() - 1) as f64)
            }
            _ => None,
        };
        let total = t0.elapsed().as_secs_f64();
        let med = median(&mut decode);
        let roofline = roofline_for(batch);
        // On the CPU: the weights the busy ranks read over the measured read bandwidth.
        let read_roofline = read_bw.map(|bw| roofline * (min_bw / 2.0) / bw);
        let rec = serde_json::json!({
            "run_name": a.run_name, "batch_size": batch, "input_len": input_len, "output_len": output_len,
            "prefill_latency": prefill, "prefill_throughput": (batch * input_len) as f64 / prefill,
            "prefill_steps": prefill_steps,
            "median_decode_latency": med, "median_decode_throughput": batch as f64 / med,
            "total_latency": total, "overall_throughput": (batch * (input_len + output_len)) as f64 / total,
            "world": a.world, "tp": a.tp, "backend": engine.backend(), "dtype": a.dtype.name(),
            "ranks": engine.describe_ranks(), "weight_bytes": weight_bytes,
            "decode_roofline_latency": roofline, "decode_vs_roofline": roofline / med,
            "copy_bandwidth_gbps": min_bw / 1e9,
            "read_bandwidth_gbps": read_bw.map(|b| b / 1e9),
            "decode_read_roofline_latency": read_roofline,
            "decode_vs_read_roofline": read_roofline.map(|r| r / med),
            "launches_per_decode_step": launches_per_step,
            "ms_per_launch": launches_per_step.map(|l| med * 1e3 / l.max(1.0)),
        });
        pb.inc(1);
        pb.suspend(|| -> pat::Result<()> {
            outln!("{rec}")?;
            errln!(
                "batch {batch:>3} in {input_len:>5} out {output_len:>4}: prefill {:.1} ms ({:.0} tok/s), decode {:.2} ms/step = {:.1} tok/s, {:.0}% of the bandwidth roofline ({:.2} ms)",
                prefill * 1e3, (batch * input_len) as f64 / prefill, med * 1e3, batch as f64 / med, 100.0 * roofline / med, roofline * 1e3
            );
            if prefill_steps > 1 {
                errln!(
                    "  the prefill took {}: the prompts' activations outgrow what one step may hold ({STEP_CAP}); its latency includes the decodes of the prompts started first",
                    plural(prefill_steps, "step")
                );
            }
            if let Some(r) = read_roofline {
                errln!("  {:.0}% of the read-bandwidth roofline ({:.2} ms)", 100.0 * r / med, r * 1e3);
            }
            match read_roofline {
                Some(r) if roofline > med && r <= med => errln!(
                    "  (over 100% of the first: it counts reads at half the copy bandwidth; reads alone run faster, as the read-bandwidth roofline counts them)"
                ),
                _ if roofline.max(read_roofline.unwrap_or(0.0)) > med => errln!(
                    "  (over 100%: part of the weights came from caches faster than the measured memory bandwidth; a model this small fits in them)"
                ),
                _ => {}
            }
            Ok(())
        })?;
    }
    pb.finish_and_clear();
    Ok(())
}
