use super::*;
use crate::policy::modeled::ModelShape;
use crate::sim::calibration::{range_error, CALIBRATION};

fn model(shape: &str) -> ComponentModel {
    let s: ModelShape = shape.parse().unwrap();
    ComponentModel::new(
        s.dims(),
        ComponentParams::defaults(GpuKind::H100, Link::NvLink),
    )
    .unwrap()
}

#[test]
fn component_model_matches_public_measurements() {
    let mut worst: f64 = 0.0;
    for c in CALIBRATION {
        let ms = model(c.shape).step_ms(c.tp, c.batch, c.context as f64);
        let err = range_error(ms, c.lo_ms, c.hi_ms);
        eprintln!(
            "{} tp{} b{} ctx{}: model {ms:.2} ms, public {}-{} ms, error {:+.1}%",
            c.shape,
            c.tp,
            c.batch,
            c.context,
            c.lo_ms,
            c.hi_ms,
            100.0 * err
        );
        worst = worst.max(err.abs());
    }
    assert!(worst <= 0.25, "worst calibration error {worst}");
}

#[test]
fn terms_by_hand_at_batch_one() {
    // LLaMA-3.1-8B TP8, batch 1, ctx 512: every GEMM sits on its floor but gate_up
    // (4096 x 3584 x 2 B = 29.4 MB over 2.613 TB/s = 11.24 us) and down (14.7 MB: 5.62 us).
    let m = model("llama3-8b");
    let b = m.breakdown(8, 1, 512.0);
    let bw = 3.35e12 * 0.78;
    let gate_up = 1.5 + 4096.0 * 3584.0 * 2.0 / bw * 1e6;
    let down = 1.5 + 1792.0 * 4096.0 * 2.0 / bw * 1e6;
    let lm = 1.5 + 4096.0 * 16032.0 * 2.0 / bw * 1e6;
    let want_gemm = 32.0 * (5.5 + 5.5 + gate_up + down) + lm;
    assert!((b.gemm_ms * 1e3 - want_gemm).abs() < 1e-6, "{b:?}");
    // Two all-reduces per layer of 1 x 4096 x 2 bytes at 8 us + 8192 B / 80 GB/s.
    let ar = 64.0 * (8.0 + 8192.0 / 80e9 * 1e6);
    assert!((b.allreduce_ms * 1e3 - ar).abs() < 1e-6);
    // Host (1.52 ms) hides under the device.
    assert!(b.step_ms > b.host_ms && (b.step_ms - b.device_ms).abs() < 1e-12);
}

#[test]
fn host_bound_when_the_batch_is_large_and_tp_high() {
    let m = model("llama3-8b");
    let b = m.breakdown(8, 512, 256.0);
    assert!(b.host_ms > b.device_ms, "{b:?}");
    assert_eq!(b.step_ms, b.host_ms);
    let mut p = m.p.clone();
    p.overlap_host = false;
    let serial = ComponentModel::new(m.dims.clone(), p).unwrap();
    let s = serial.breakdown(8, 512, 256.0);
    assert!((s.step_ms - (s.device_ms + s.host_ms)).abs() < 1e-9);
}

#[test]
fn kv_capacity_by_hand() {
    // 8B at mem fraction 0.5 on 80 GB: TP1 has 40 GB - 16.06 GB of weights for 128 KiB
    // per token.
    let m = model("llama3-8b");
    let d = &m.dims;
    let weights = (d.step_read_params() + (d.vocab_size * d.hidden_size) as f64) * 2.0;
    let want = ((40e9 - weights) / 131072.0) as usize;
    assert_eq!(m.kv_capacity_tokens(1), want);
    assert!(m.kv_capacity_tokens(8) > 8 * want);
}

#[test]
fn overrides_replace_named_keys_and_refuse_unknown_ones() {
    let p = ComponentParams::defaults(GpuKind::H100, Link::NvLink);
    let q = p
        .overridden(r#"{"host_per_seq_us": 80, "mem_fraction": 0.4}"#, "f.json")
        .unwrap();
    assert_eq!(q.host_per_seq_us, 80.0);
    assert_eq!(q.mem_fraction, 0.4);
    assert_eq!(q.gemm_floor_us, p.gemm_floor_us);
    let e = p.overridden(r#"{"host_us": 1}"#, "f.json").unwrap_err();
    assert!(e.to_string().contains("`host_us`"), "{e}");
    let e = p
        .overridden(r#"{"mem_fraction": 1.5}"#, "f.json")
        .unwrap_err();
    assert!(e.to_string().contains("mem_fraction"), "{e}");
    let e = p.overridden("[1]", "f.json").unwrap_err();
    assert!(e.to_string().contains("f.json"), "{e}");
    assert!(e.to_string().contains("JSON object"), "{e}");
    // A key given twice: neither value is taken silently.
    let e = p
        .overridden(r#"{"mem_fraction": 0.4, "mem_fraction": 0.6}"#, "f.json")
        .unwrap_err();
    assert!(
        e.to_string().contains("`mem_fraction` is given twice"),
        "{e}"
    );
    let e = p
        .overridden(r#"{"mem_fraction": 0.4"#, "f.json")
        .unwrap_err();
    assert!(e.to_string().contains("not valid JSON"), "{e}");
}

#[test]
fn allreduce_row_is_the_smallest_tabled_tp_at_or_above_else_the_largest() {
    let mut p = ComponentParams::defaults(GpuKind::H100, Link::NvLink);
    // Out of order on purpose: the lookup must not depend on the table's order.
    p.allreduce = [(8, 8.0, 80.0), (2, 5.0, 150.0), (4, 6.0, 100.0)]
        .iter()
        .map(|&(tp, latency_us, algbw_gbps)| AllReducePoint {
            tp,
            latency_us,
            algbw_gbps,
        })
        .collect();
    for (tp, lat_us, gbps) in [
        (1, 5.0, 150.0),
        (2, 5.0, 150.0),
        (3, 6.0, 100.0),
        (4, 6.0, 100.0),
        (8, 8.0, 80.0),
        (16, 8.0, 80.0),
    ] {
        assert_eq!(p.allreduce_at(tp), (lat_us * 1e-6, gbps * 1e9), "tp {tp}");
    }
}

#[test]
fn a_replica_stepping_one_batch_gets_the_step_time_of_a_fresh_call_bitwise() {
    use crate::sim::clock::StepClock;
    for shape in ["llama3-8b", "qwen3-14b"] {
        let m = model(shape);
        for tp in [1, 2, 4, 8] {
            for batch in [0, 1, 3, 64, 1000] {
                let at = m.at(tp, batch);
                for ctx in [0.0, 1.5, 700.0, 24576.0] {
                    let fresh = m.step_ms(tp, batch, ctx);
                    assert_eq!(m.step_ms_at(&at, ctx).to_bits(), fresh.to_bits());
                    assert_eq!(
                        m.breakdown(tp, batch, ctx).step_ms.to_bits(),
                        fresh.to_bits()
                    );
                }
            }
        }
    }
}
