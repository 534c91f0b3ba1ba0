//! Models: damaged directories and files (each message names the file, field or tensor),
//! non-finite weights and logits (a clear error, never garbage tokens), and degenerate but valid
//! models (vocabularies of 2 and 3, one layer, one head) in every command that runs a model.

use super::{a, check, err, Case, Fx};

fn gen(fx: &Fx, model: &str) -> Vec<String> {
    a(&[
        "generate",
        "--model",
        &fx.p(model),
        "--prompt-ids",
        "1,0",
        "--max-new-tokens",
        "4",
    ])
}

const fn works(name: &'static str, args: fn(&Fx) -> Vec<String>, needle: &'static str) -> Case {
    Case {
        name,
        args,
        code: 0,
        needle,
        absent: None,
    }
}

const CASES: &[Case] = &[
    err(
        "truncated_safetensors",
        |f| gen(f, "trunc"),
        "not a valid safetensors file",
    ),
    err(
        "not_safetensors",
        |f| gen(f, "garbage"),
        "not a valid safetensors file",
    ),
    err(
        "a_tensor_whose_shape_does_not_span_its_bytes",
        |f| gen(f, "reshaped"),
        "(tensor `model.norm.weight`: shape [1, 1] of F32 is 4 bytes, but data_offsets",
    ),
    err(
        "config_not_json",
        |f| gen(f, "badjson"),
        "config.json: not valid JSON",
    ),
    err(
        "unsupported_architecture",
        |f| gen(f, "arch_gpt2"),
        "architectures = GPT2LMHeadModel",
    ),
    err("attention_bias", |f| gen(f, "bias"), "attention_bias"),
    err(
        "config_disagrees_with_a_tensor",
        |f| gen(f, "shape"),
        "has shape [128, 64], expected [64, 64]",
    ),
    err(
        "config_with_fewer_layers_than_the_checkpoint",
        |f| gen(f, "layers_1_of_2"),
        "holds decoder layer 1 (tensor `model.layers.1.",
    ),
    err(
        "no_weights",
        |f| gen(f, "noweights"),
        "no model.safetensors",
    ),
    err(
        "text_prompt_without_tokenizer",
        |f| a(&["generate", "--model", &f.p("notok"), "--prompt", "hi"]),
        "tokenizer.json",
    ),
    err(
        "init_model_into_a_non_empty_dir",
        |f| a(&["init-model", "--out", &f.p("m")]),
        "not empty",
    ),
    err(
        "nan_weight_names_the_tensor",
        |f| gen(f, "nan_norm"),
        "tensor `model.norm.weight` holds a non-finite value (NaN) at row 0, column 0",
    ),
    err(
        "inf_weight_names_the_tensor",
        |f| gen(f, "inf_embed"),
        "tensor `model.embed_tokens.weight` holds a non-finite value (inf)",
    ),
    err(
        "finite_weights_overflowing_logits",
        |f| gen(f, "huge_head"),
        "the model produced a non-finite logit",
    ),
    err(
        "architectures_as_a_string",
        |f| gen(f, "arch_string"),
        "`architectures` must be a list such as [\"LlamaForCausalLM\"], got \"LlamaForCausalLM\"",
    ),
    err(
        "architectures_empty_list",
        |f| gen(f, "arch_empty"),
        "`architectures` must be a list holding a class name",
    ),
    err(
        "rope_scaling_without_a_type",
        |f| gen(f, "rope_untyped"),
        "`rope_scaling` has neither `rope_type` nor `type`",
    ),
    works(
        "config_with_a_utf8_bom_is_read",
        |f| gen(f, "bom"),
        "\"output_ids\"",
    ),
    err(
        "generation_config_eos_outside_vocab",
        |f| gen(f, "gen_eos"),
        "generation_config.json: `eos_token_id` 4000 is outside the vocabulary (vocab_size 320",
    ),
    err(
        "generation_config_not_an_object",
        |f| gen(f, "gen_list"),
        "generation_config.json: top level must be a JSON object",
    ),
    err(
        "model_safetensors_is_a_directory",
        |f| gen(f, "st_dir"),
        "model.safetensors: is a directory, expected a safetensors file",
    ),
    err(
        "tokenizer_json_is_a_directory",
        |f| gen(f, "tok_dir"),
        "tokenizer.json",
    ),
    err(
        "index_with_an_empty_weight_map",
        |f| gen(f, "empty_map"),
        "model.safetensors.index.json: `weight_map` is empty",
    ),
    err(
        "index_whose_weight_map_is_not_an_object",
        |f| gen(f, "map_number"),
        "model.safetensors.index.json: `weight_map` must be an object of tensor -> file, got 5",
    ),
    err(
        "index_names_a_directory_as_shard",
        |f| gen(f, "shard_dir"),
        "shard: is a directory",
    ),
    works("vocab_2_generate", |f| gen(f, "vocab2"), "\"output_ids\""),
    works("vocab_3_generate", |f| gen(f, "vocab3"), "\"output_ids\""),
    works(
        "one_layer_one_head_generate",
        |f| gen(f, "one_layer_one_head"),
        "\"output_ids\"",
    ),
    works(
        "vocab_2_bench_one_batch",
        |f| {
            a(&[
                "bench",
                "one-batch",
                "--model",
                &f.p("vocab2"),
                "--batch-size",
                "2",
                "--input-len",
                "5",
                "--output-len",
                "2",
            ])
        },
        "\"batch_size\":2",
    ),
    works(
        "vocab_3_bench_switch",
        |f| {
            a(&[
                "bench",
                "switch",
                "--model",
                &f.p("vocab3"),
                "--world",
                "2",
                "--from",
                "1",
                "--to",
                "2",
                "--batch",
                "2",
                "--context",
                "5",
                "--kv-mib",
                "1",
            ])
        },
        "\"to_tp\":2",
    ),
    Case {
        name: "vocab_2_bench_switch_one_head_cannot_split",
        args: |f| {
            a(&[
                "bench",
                "switch",
                "--model",
                &f.p("vocab2"),
                "--world",
                "2",
                "--from",
                "1",
                "--to",
                "2",
                "--batch",
                "2",
                "--context",
                "5",
            ])
        },
        code: 1,
        needle: "--to 2: invalid layout: tp 2 does not divide num_attention_heads 1",
        absent: Some("replication"),
    },
    works(
        "vocab_2_profile",
        |f| {
            a(&[
                "profile",
                "--model",
                &f.p("vocab2"),
                "--world",
                "1",
                "--batches",
                "1",
                "--contexts",
                "4",
                "--steps",
                "1",
                "--out",
                &f.p("vocab2_profile.json"),
            ])
        },
        "wrote",
    ),
    works(
        "vocab_3_rollout",
        |f| {
            a(&[
                "rollout",
                "--model",
                &f.p("vocab3"),
                "--world",
                "2",
                "--policy",
                "static:1",
                "--trace",
                &f.p("trace_small.jsonl"),
            ])
        },
        "\"summary\"",
    ),
    works(
        "one_layer_one_head_rollout",
        |f| {
            a(&[
                "rollout",
                "--model",
                &f.p("one_layer_one_head"),
                "--world",
                "1",
                "--policy",
                "static:1",
                "--trace",
                &f.p("trace_small.jsonl"),
            ])
        },
        "\"final_tp\":1",
    ),
];

#[test]
fn models_broken_non_finite_and_degenerate() {
    check(CASES);
}

#[cfg(not(feature = "cuda"))]
const NO_CUDA: &[Case] = &[
    err(
        "cuda_backend_in_a_build_without_cuda",
        |f| {
            a(&[
                "generate",
                "--model",
                &f.p("m"),
                "--backend",
                "cuda",
                "--prompt-ids",
                "1",
            ])
        },
        "built without the `cuda` feature",
    ),
    err(
        "bench_attention_without_cuda",
        |_| a(&["bench", "attention"]),
        "built without the `cuda` feature",
    ),
];

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_commands_in_a_build_without_cuda() {
    check(NO_CUDA);
}
