//! Driver probe and kernel symbols: every `cuda/*.cu` entry point resolves.

use super::*;

#[test]
fn probe_returns_a_value_never_panics() {
    match probe() {
        Ok(n) => assert!(n >= 1),
        Err(e) => {
            let msg = e.to_string();
            let known = ["no CUDA driver found", "no CUDA device", "cuBLAS", "cuInit"];
            assert!(known.iter().any(|k| msg.contains(k)), "{msg}");
            assert!(!gpu_required(), "PAT_REQUIRE_GPU=1 but {msg}");
            skip_notice("probe", &msg);
        }
    }
}

#[test]
fn every_kernel_symbol_resolves() {
    let d = gpu!("every_kernel_symbol_resolves");
    eprintln!(
        "device: {} ({} SMs), kernels: {:?}",
        d.name(),
        d.num_sms(),
        kernel_files()
    );
    for s in ["f32", "bf16", "f16"] {
        for f in [
            "embedding",
            "rmsnorm",
            "fused_add_rmsnorm",
            "qk_norm",
            "rope",
            "silu_and_mul",
            "kv_append",
            "paged_attention_reduce",
            "argmax",
            "sample",
            "all_reduce_sum",
        ] {
            d.check_kernel(&format!("{f}_{s}")).unwrap();
        }
        for hd in [64, 128, 256] {
            d.check_kernel(&format!("paged_attention_{s}_hd{hd}"))
                .unwrap();
            d.check_kernel(&format!("prefill_attention_{s}_hd{hd}"))
                .unwrap();
        }
    }
    for f in ["strided_copy", "kv_gather", "kv_scatter", "kv_copy"] {
        d.check_kernel(f).unwrap();
    }
    assert!(d.check_kernel("no_such_kernel").is_err());
}

#[test]
fn reshard_bench_times_every_switch_kernel() {
    let d = gpu!("reshard_bench_times_every_switch_kernel");
    let rs = pat::backend::cuda::bench_reshard::reshard_bench(&d, DType::Bf16, 4, 3).unwrap();
    let names: Vec<&str> = rs.iter().map(|r| r.kernel).collect();
    assert_eq!(
        names,
        ["strided_copy", "kv_gather", "kv_scatter", "kv_copy"]
    );
    for r in &rs {
        // 4 MiB read and as much written per call.
        assert_eq!(r.bytes, 8 << 20, "{r:?}");
        assert!(
            r.median_ms.is_finite() && r.median_ms > 0.0 && r.gbps > 0.0,
            "{r:?}"
        );
    }
    assert!(pat::backend::cuda::bench_reshard::reshard_bench(&d, DType::I32, 4, 3).is_err());
}
