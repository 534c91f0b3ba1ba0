//! `pat bench one-batch`: SGLang `bench_one_batch` semantics on the engine. For each
//! (batch, input_len, output_len): warm up, prefill, decode; one JSON line per setting with
//! SGLang's keys plus the weights-over-measured-bandwidth roofline for a decode step.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::generate::{progress, Model};
use super::DtypeArg;
use crate::engine::{Engine, EngineOptions, Request};
use crate::error::{Error, Result};
use crate::model::sampling::SamplingParams;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Prefill + decode latency sweep over batch x input-len x output-len (SGLang bench_one_batch keys).
    OneBatch(OneBatchArgs),
    /// One live TP switch (or a ladder) on a running generation: one JSON record per switch with
    /// the cost of each component, bytes moved, peak extra memory and step latency after.
    Switch(super::switch::BenchSwitchArgs),
}

#[derive(Args, Debug)]
pub struct OneBatchArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub world: usize,
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Batch sizes to sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub batch_size: Vec<usize>,
    /// Prompt lengths to sweep.
    #[arg(long, value_delimiter = ',', default_value = "128")]
    pub input_len: Vec<usize>,
    /// Generated lengths to sweep.
    #[arg(long, value_delimiter = ',', default_value = "32")]
    pub output_len: Vec<usize>,
    #[arg(long, default_value = "pat")]
    pub run_name: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::OneBatch(a) => one_batch(a),
        BenchCommand::Switch(a) => super::switch::bench_switch(a),
    }
}

/// Measured copy bandwidth in bytes/s (read + written), with `threads` threads copying at once.
pub fn copy_bandwidth(threads: usize) -> f64 {
    let n = 16 << 20; // 64 MiB of f32 per thread: far beyond any cache
    let t = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(move || {
                    let src = vec![1f32; n];
                    let mut dst = vec![0f32; n];
                    dst.copy_from_slice(&src); // first touch
                    let t0 = Instant::now();
                    for _ in 0..3 {
                        dst.copy_from_slice(&src);
                        std::hint::black_box(&mut dst);
                    }
                    t0.elapsed().as_secs_f64() / 3.0
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(f64::INFINITY))
            .fold(0.0, f64::max)
    });
    (threads.max(1) * n * 4 * 2) as f64 / t
}

/// Median of timings (mean of the middle two for an even count); NaN when empty.
pub(super) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn one_batch(a: OneBatchArgs) -> Result<()> {
    let m = Model::open(&a.model)?;
    if a.batch_size.contains(&0) || a.input_len.contains(&0) || a.output_len.iter().any(|&o| o < 2)
    {
        return Err(Error::Usage(
            "batch sizes and input lengths must be >= 1, output lengths >= 2".into(),
        ));
    }
    let bw = copy_bandwidth(a.world);
    eprintln!(
        "measured copy bandwidth with {} threads: {:.1} GB/s (read + write)",
        a.world,
        bw / 1e9
    );
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let mut settings = Vec::new();
    for &b in &a.batch_size {
        for &i in &a.input_len {
            for &o in &a.output_len {
                settings.push((b, i, o));
            }
        }
    }
    let pb = progress(settings.len() as u64, "bench one-batch");
    for &(batch, input_len, output_len) in &settings {
        let vocab = m.cfg.vocab_size as u32;
        let mut reqs = |n: usize, il: usize, ol: usize| -> Vec<Request> {
            (0..n)
                .map(|_| Request {
                    input_ids: (0..il).map(|_| rng.random_range(3..vocab)).collect(),
                    max_new_tokens: ol,
                    ignore_eos: true,
                })
                .collect()
        };
        let real = reqs(batch, input_len, output_len);
        let warm = reqs(batch, input_len.min(16), 2);
        let opts = EngineOptions {
            world: a.world,
            tp: a.tp,
            block_size: 16,
            kv_blocks: Engine::blocks_needed(&real, 16),
            dtype: a.dtype.into(),
            sampling: SamplingParams::default(),
        };
        let mut engine = Engine::new(m.cfg.clone(), &m.ck, opts)?;
        engine.add_requests(&warm)?;
        engine.run(|_| {})?;
        engine.add_requests(&real)?;
        let t0 = Instant::now();
        let mut steps = Vec::new();
        engine.run(|r| steps.push(r.elapsed_ms / 1e3))?;
        let total = t0.elapsed().as_secs_f64();
        let prefill = steps[0];
        let mut decode: Vec<f64> = steps[1..].to_vec();
        let med = median(&mut decode);
        // Every rank reads its whole weight shard once per decode step, all ranks at once.
        let weight_bytes: usize = (0..a.world).map(|r| engine.rank_bytes(r).0).sum();
        let roofline = weight_bytes as f64 / (bw / 2.0); // reads only: half the copy traffic
        let rec = serde_json::json!({
            "run_name": a.run_name, "batch_size": batch, "input_len": input_len, "output_len": output_len,
            "prefill_latency": prefill, "prefill_throughput": (batch * input_len) as f64 / prefill,
            "median_decode_latency": med, "median_decode_throughput": batch as f64 / med,
            "total_latency": total, "overall_throughput": (batch * (input_len + output_len)) as f64 / total,
            "world": a.world, "tp": a.tp, "backend": "cpu",
            "decode_roofline_latency": roofline, "decode_vs_roofline": roofline / med,
            "copy_bandwidth_gbps": bw / 1e9,
        });
        pb.inc(1);
        pb.suspend(|| {
            println!("{rec}");
            eprintln!(
                "batch {batch:>3} in {input_len:>5} out {output_len:>4}: prefill {:.1} ms ({:.0} tok/s), decode {:.2} ms/step = {:.1} tok/s, {:.0}% of the bandwidth roofline ({:.2} ms)",
                prefill * 1e3, (batch * input_len) as f64 / prefill, med * 1e3, batch as f64 / med, 100.0 * roofline / med, roofline * 1e3
            );
        });
    }
    pb.finish_and_clear();
    Ok(())
}
