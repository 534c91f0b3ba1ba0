//! `pat bench reshard`: the switch kernels (cuda/reshard.cu) alone on one GPU, GB/s against the
//! measured device copy bandwidth, at several sizes.

use clap::Args;

use pat::error::{Error, Result};

#[derive(Args, Debug)]
pub struct ReshardArgs {
    /// MiB each kernel reads (and writes) per call (sweepable, comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "16,128,1024")]
    pub sizes_mib: Vec<usize>,
    /// KV dtype (the compaction moves bytes whatever the dtype).
    #[arg(long, value_enum, default_value = "bf16", value_name = "f32|bf16|f16")]
    pub dtype: pat::Dtype,
    /// Timed launches per setting (the median is reported).
    #[arg(long, default_value_t = 20, value_parser = super::common::count)]
    pub iters: usize,
    /// CUDA ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

#[cfg(not(feature = "cuda"))]
pub fn reshard(_a: ReshardArgs) -> Result<()> {
    Err(Error::Invalid(
        "bench reshard times the CUDA switch kernels: this pat was built without the `cuda` \
         feature (rebuild with `cargo build --release --features cuda`)"
            .into(),
    ))
}

#[cfg(feature = "cuda")]
pub fn reshard(a: ReshardArgs) -> Result<()> {
    use pat::backend::cuda::{bench_reshard, workers::device_dtype};
    if a.iters == 0 || a.sizes_mib.contains(&0) {
        return Err(Error::Invalid(
            "--iters and --sizes-mib must be >= 1".into(),
        ));
    }
    let (dev, bw) = super::bench::device_and_copy_bandwidth(a.device)?;
    let dtype = device_dtype(a.dtype);
    for &mib in &a.sizes_mib {
        for r in bench_reshard::reshard_bench(&dev, dtype, mib, a.iters)? {
            let frac = r.gbps * 1e9 / bw;
            outln!(
                "{}",
                serde_json::json!({
                    "kernel": r.kernel, "device": dev.name(), "dtype": dtype.name(),
                    "size_mib": mib, "shape": r.shape, "bytes": r.bytes,
                    "median_ms": r.median_ms, "gbps": r.gbps,
                    "copy_bandwidth_gbps": bw / 1e9, "fraction_of_copy_bandwidth": frac,
                })
            )?;
            errln!(
                "{:<12} {mib:>5} MiB: {:.3} ms, {:.0} GB/s = {:.0}% of copy bandwidth ({})",
                r.kernel,
                r.median_ms,
                r.gbps,
                100.0 * frac,
                r.shape
            );
        }
    }
    Ok(())
}
