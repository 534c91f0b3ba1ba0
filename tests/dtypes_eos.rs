//! Half-precision checkpoints load and agree with the f32 reference within their precision, and
//! generation stops at EOS (from config.json or generation_config.json) unless told to ignore it.

mod common;

use std::path::Path;

use common::*;
use half::{bf16, f16};
use pat::engine::{Engine, FinishReason, Request};
use pat::Dtype;

/// Copies a golden model dir, re-encoding every tensor with `conv` (f32 -> 2-byte type).
fn convert(src: &Path, dst: &Path, dtype: safetensors::Dtype, conv: fn(f32) -> [u8; 2]) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let out: Vec<u8> = v
                .data()
                .chunks_exact(4)
                .flat_map(|b| conv(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect();
            (name, v.shape().to_vec(), out)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).unwrap();
}

#[test]
fn bf16_and_f16_checkpoints_match_the_reference_within_their_precision() {
    let tmp = tempfile::tempdir().unwrap();
    for model in ["llama", "qwen3"] {
        let (_, gold) = golden(model);
        let g = &gold[3];
        for (name, dtype, conv, tol) in [
            (
                "bf16",
                safetensors::Dtype::BF16,
                (|x| bf16::from_f32(x).to_le_bytes()) as fn(f32) -> [u8; 2],
                3e-2f32,
            ),
            (
                "f16",
                safetensors::Dtype::F16,
                |x| f16::from_f32(x).to_le_bytes(),
                4e-3,
            ),
        ] {
            let dir = tmp.path().join(format!("{model}-{name}"));
            convert(&golden_dir(model), &dir, dtype, conv);
            let mut e = engine(&dir, 2, 2, Dtype::F32, 8);
            e.record_logits(true);
            e.add_requests(&[Request {
                input_ids: g.input_ids.clone(),
                max_new_tokens: 1,
                ignore_eos: true,
            }])
            .unwrap();
            e.step().unwrap();
            let err = rel_err(&e.recorded_logits()[0].1, &g.first_step_logits);
            // The rounding must show (the file really is 2-byte) but stay within the type's precision.
            assert!(
                err > 1e-6 && err < tol,
                "{model} {name}: relative logits error {err:e}"
            );
        }
    }
}

#[test]
fn generation_stops_at_eos_unless_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, gold) = golden("llama");
    let g = &gold[2];
    // Make the 6th generated token an EOS token (first occurrence in the continuation).
    let eos = g.output_ids[5];
    let first = g.output_ids.iter().position(|&t| t == eos).unwrap();
    let dir = tmp.path().join("llama-eos");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        golden_dir("llama").join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        golden_dir("llama").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    // EOS ids from generation_config.json extend config.json's.
    std::fs::write(
        dir.join("generation_config.json"),
        format!("{{\"eos_token_id\": [2, {eos}]}}"),
    )
    .unwrap();
    for (ignore_eos, want_len, want_reason) in [
        (false, first + 1, FinishReason::Stop),
        (true, 24, FinishReason::Length),
    ] {
        let reqs = [Request {
            input_ids: g.input_ids.clone(),
            max_new_tokens: 24,
            ignore_eos,
        }];
        let mut e = engine(
            &dir,
            2,
            2,
            Dtype::F32,
            Engine::blocks_needed(&reqs, 16).unwrap(),
        );
        e.add_requests(&reqs).unwrap();
        e.run(|_| {}).unwrap();
        let o = &e.outputs()[0];
        assert_eq!(
            (o.output_ids.len(), o.finish_reason),
            (want_len, want_reason),
            "ignore_eos {ignore_eos}"
        );
        assert_eq!(
            &o.output_ids[..],
            &g.output_ids[..want_len],
            "tokens up to the stop are the golden ones"
        );
    }
}
