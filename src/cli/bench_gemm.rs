//! `pat bench gemm`: the CPU backend's decode GEMMs alone, on a model shape's weights (one
//! distinct buffer per layer, so a step reads them from memory as decode does), against the
//! measured copy bandwidth and against `matrixmultiply`'s packed GEMM in the same run. One JSON
//! record per setting on stdout, a table on stderr.

use std::time::Instant;

use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::common::{plural, progress, GIB, MIB};
use super::{ArchArg, PresetArg};
use pat::backend::cpu::{copy_bandwidth, cpu_threads, Gemm};
use pat::error::{Error, Result};
use pat::model::init::{preset_dims, shard_dims};
use pat::stats::median;

#[derive(Args, Debug)]
pub struct GemmArgs {
    /// Model shape whose per-layer GEMMs are timed (qkv, o, gate_up, down; lm_head once).
    #[arg(long, value_enum, default_value = "smollm-135m-shape")]
    pub preset: PresetArg,
    /// Architecture of the shape (qwen3: the preset's Qwen3 counterpart).
    #[arg(long, value_enum, default_value = "llama")]
    pub arch: ArchArg,
    /// One TP-K rank's shard of the shape (heads, intermediate and vocab divided by K).
    #[arg(long, default_value_t = 1, value_parser = super::common::count)]
    pub shard: usize,
    /// Layers with their own weights (default: the shape's; fewer keeps large shapes in memory).
    #[arg(long, value_parser = super::common::count)]
    pub layers: Option<usize>,
    /// Activation rows (decode batch sizes) to sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32,64", value_parser = super::common::count)]
    pub rows: Vec<usize>,
    /// Threads per GEMM to sweep, each at most the cores the CPU backend may use (default: 1 and
    /// all of them).
    #[arg(long, value_delimiter = ',', value_parser = super::common::count)]
    pub threads: Vec<usize>,
    /// Timed steps per setting (the median is reported).
    #[arg(long, default_value_t = 7, value_parser = super::common::count)]
    pub iters: usize,
}

/// Bytes of f32 weights this bench will hold at most.
const MAX_BYTES: usize = 8 << 30;
/// Activation rows at most (decode batches; the packed path takes over at 32).
const MAX_ROWS: usize = 4096;

struct Shape {
    name: &'static str,
    nt: bool,
    k: usize,
    m: usize,
    /// One buffer per layer (lm_head: one).
    w: Vec<Vec<f32>>,
}

pub fn gemm(a: GemmArgs) -> Result<()> {
    let d = shard_dims(preset_dims(a.arch.into(), a.preset.into()), a.shard)?.dims;
    let layers = a.layers.unwrap_or(d.num_layers);
    if layers > d.num_layers {
        return Err(Error::Invalid(format!(
            "--layers {layers} is more than the shape's {}",
            plural(d.num_layers, "layer")
        )));
    }
    if layers == 0 || a.iters == 0 || a.rows.contains(&0) || a.threads.contains(&0) {
        return Err(Error::Invalid(
            "--layers, --iters, --rows and --threads must be >= 1".into(),
        ));
    }
    if let Some(v) = a.rows.iter().find(|&&v| v > MAX_ROWS) {
        return Err(Error::Invalid(format!(
            "--rows {v} is more than {MAX_ROWS}"
        )));
    }
    // The pool has `cpu_threads() - 1` helpers whatever is asked: more would be measured as
    // fewer and labeled as more.
    if let Some(v) = a.threads.iter().find(|&&v| v > cpu_threads()) {
        return Err(Error::Invalid(format!(
            "--threads {v} is more than the {} the CPU backend may use (this machine's cores, \
             or fewer with PAT_THREADS)",
            plural(cpu_threads(), "thread")
        )));
    }
    if a.iters > 1000 {
        return Err(Error::Invalid(format!(
            "--iters {} is more than 1000",
            a.iters
        )));
    }
    let threads = if a.threads.is_empty() {
        let mut t = vec![1, cpu_threads()];
        t.dedup();
        t
    } else {
        a.threads.clone()
    };
    let (h, hd) = (d.hidden_size, d.head_dim);
    let q = d.num_heads * hd;
    let dims = [
        ("qkv", true, h, q + 2 * d.num_kv_heads * hd, layers),
        ("o", false, q, h, layers),
        ("gate_up", true, h, 2 * d.intermediate_size, layers),
        ("down", false, d.intermediate_size, h, layers),
        ("lm_head", true, h, d.vocab_size, 1),
    ];
    let bytes = dims.iter().fold(0usize, |acc, &(_, _, k, m, l)| {
        acc.saturating_add(k.saturating_mul(m).saturating_mul(l).saturating_mul(4))
    });
    if bytes > MAX_BYTES {
        return Err(Error::Invalid(format!(
            "the weights of {} of this shape are {:.1} GiB (more than {} GiB): pass \
             --shard or --layers",
            plural(layers, "layer"),
            bytes as f64 / GIB,
            MAX_BYTES >> 30
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let shapes: Vec<Shape> = dims
        .iter()
        .map(|&(name, nt, k, m, l)| Shape {
            name,
            nt,
            k,
            m,
            w: (0..l)
                .map(|_| (0..k * m).map(|_| rng.random_range(-0.05..0.05)).collect())
                .collect(),
        })
        .collect();
    let rows_max = *a.rows.iter().max().unwrap_or(&1);
    let kmax = shapes.iter().map(|s| s.k).max().unwrap_or(1);
    let mmax = shapes.iter().map(|s| s.m).max().unwrap_or(1);
    let x: Vec<f32> = (0..rows_max * kmax)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let mut out = vec![0f32; rows_max * mmax];
    errln!(
        "bench gemm: {} per step over {:.1} MiB of f32 weights ({}, shard {}); \
         measuring copy bandwidth",
        plural(4 * layers + 1, "GEMM"),
        bytes as f64 / MIB,
        plural(layers, "layer"),
        a.shard
    );
    let bws: Vec<f64> = threads.iter().map(|&t| copy_bandwidth(t)).collect();

    // One step: every GEMM of every layer, then lm_head; per shape, its seconds.
    let step = |g: Gemm, n: usize, out: &mut [f32]| -> Vec<f64> {
        shapes
            .iter()
            .map(|s| {
                let t0 = Instant::now();
                for w in &s.w {
                    let (o, xs) = (&mut out[..n * s.m], &x[..n * s.k]);
                    if s.nt {
                        g.nt(o, xs, w, n, s.k, s.m);
                    } else {
                        g.nn(o, xs, w, n, s.k, s.m);
                    }
                }
                t0.elapsed().as_secs_f64()
            })
            .collect()
    };
    let timed = |g: Gemm, n: usize, out: &mut [f32]| -> (f64, Vec<f64>) {
        step(g, n, out); // warm-up
        let runs: Vec<Vec<f64>> = (0..a.iters).map(|_| step(g, n, out)).collect();
        let per: Vec<f64> = (0..shapes.len())
            .map(|i| median(&mut runs.iter().map(|r| r[i]).collect::<Vec<_>>()))
            .collect();
        (
            median(&mut runs.iter().map(|r| r.iter().sum()).collect::<Vec<_>>()),
            per,
        )
    };

    let pb = progress((a.rows.len() * threads.len()) as u64, "gemm");
    let mut table = Vec::new();
    for &n in &a.rows {
        for (ti, &t) in threads.iter().enumerate() {
            let ours = Gemm {
                threads: t,
                ..Gemm::default()
            };
            let packed = Gemm {
                stream_max_rows: 0,
                ..ours
            };
            let (ms, per) = timed(ours, n, &mut out);
            let (ms_packed, _) = timed(packed, n, &mut out);
            let gbps = bytes as f64 / ms / 1e9;
            let flops = 2.0 * n as f64 * bytes as f64 / 4.0;
            let frac = gbps * 1e9 / bws[ti];
            let rec = serde_json::json!({
                "rows": n, "threads": t, "stream_max_rows": ours.stream_max_rows,
                "step_ms": ms * 1e3, "packed_step_ms": ms_packed * 1e3,
                "speedup_vs_packed": ms_packed / ms,
                "weight_gbps": gbps, "copy_bandwidth_gbps": bws[ti] / 1e9,
                "fraction_of_copy_bandwidth": frac, "gflops": flops / ms / 1e9,
                "per_gemm_ms": shapes.iter().zip(&per)
                    .map(|(s, p)| (s.name.to_string(), serde_json::json!(p * 1e3)))
                    .collect::<serde_json::Map<_, _>>(),
            });
            pb.suspend(|| outln!("{rec}"))?;
            table.push((n, t, ms, ms_packed, gbps, frac, flops / ms / 1e9));
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    errln!(
        "{:>5} {:>7} {:>10} {:>11} {:>9} {:>10} {:>9} {:>8}",
        "rows",
        "threads",
        "ms/step",
        "packed ms",
        "x packed",
        "weight GB/s",
        "% copy bw",
        "GFLOP/s"
    );
    for (n, t, ms, mp, gbps, frac, gf) in table {
        errln!(
            "{n:>5} {t:>7} {:>10.2} {:>11.2} {:>8.2}x {gbps:>10.1} {:>8.0}% {gf:>8.1}",
            ms * 1e3,
            mp * 1e3,
            mp / ms,
            frac * 100.0
        );
    }
    errln!(
        "ms/step: every GEMM of one decode step (all layers + lm_head) at that many rows; \
         packed: matrixmultiply on the same threads; % copy bw: weight bytes/s over the \
         measured host copy bandwidth (read + write) at that many threads."
    );
    Ok(())
}
