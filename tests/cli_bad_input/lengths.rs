//! Arithmetic on untrusted lengths and allocation before validation: sizes from flags, request
//! files, traces and config.json that would overflow, wrap, hang or allocate without bound are
//! refused up front with a message naming them.

use super::{a, check, err, usage, Case, Fx};

fn gen(fx: &Fx, extra: &[&str]) -> Vec<String> {
    let mut v = a(&["generate", "--model", &fx.p("m")]);
    v.extend(a(extra));
    v
}

const CASES: &[Case] = &[
    err(
        "max_new_tokens_u64_max_flag",
        |f| gen(f, &["--prompt-ids", "1,2", "--max-new-tokens", "18446744073709551615"]),
        "--max-new-tokens: request 0: prompt (2) + max_new_tokens (18446744073709551615) exceeds max_position_embeddings 512",
    ),
    err(
        "max_new_tokens_near_u64_max_in_file",
        |f| gen(f, &["--requests", &f.p("huge_max_new.jsonl")]),
        "huge_max_new.jsonl:1: request 0: prompt (2) + max_new_tokens",
    ),
    err(
        "max_new_tokens_past_positions_with_text_prompt",
        |f| gen(f, &["--prompt", "hello", "--max-new-tokens", "600"]),
        "--prompt with --max-new-tokens",
    ),
    Case {
        name: "reconfigure_step_u64_max_never_switches_before_prefill",
        args: |f| {
            gen(f, &["--world", "2", "--prompt-ids", "1,2", "--max-new-tokens", "3",
                     "--reconfigure", "18446744073709551615:2"])
        },
        code: 0,
        needle: "--reconfigure 18446744073709551615:2 not applied: every request finished first",
        absent: Some("\"from_tp\""),
    },
    err(
        "trace_response_len_u64_max",
        |f| a(&["trace", "stats", &f.p("trace_u64max.jsonl")]),
        "`response_len` 18446744073709551615 is longer than any model's context",
    ),
    err(
        "trace_response_len_2p40",
        |f| a(&["rollout", "--model", &f.p("m"), "--world", "1", "--policy", "static:1",
                "--trace", &f.p("trace_2p40.jsonl")]),
        "trace_2p40.jsonl:1: `response_len` 1099511627776",
    ),
    err(
        "rollout_trace_past_positions_refused_before_prompts",
        |f| a(&["rollout", "--model", &f.p("m"), "--world", "1", "--policy", "static:1",
                "--trace", &f.p("trace_long.jsonl")]),
        "trace_long.jsonl:2: request 1: `prompt_len` 100 + `response_len` 1000 exceeds the model's max_position_embeddings 512",
    ),
    err(
        "bench_switch_context_1e9",
        |f| a(&["bench", "switch", "--model", &f.p("m"), "--world", "2", "--from", "1",
                "--to", "2", "--context", "1000000000"]),
        "--context 1000000000: the model holds 512 positions, and the bench decodes 7 tokens past the context (2, then 4 per --to switch, then 1): at most 505",
    ),
    err(
        "bench_switch_batch_times_context_overflows",
        |f| a(&["bench", "switch", "--model", &f.p("m"), "--world", "2", "--from", "1",
                "--to", "2", "--context", "100", "--batch", "18446744073709551615"]),
        "--batch x --context",
    ),
    err(
        "bench_switch_kv_mib_overflows",
        |f| a(&["bench", "switch", "--model", &f.p("m"), "--world", "2", "--from", "1",
                "--to", "2", "--kv-mib", "18446744073709551615"]),
        "--kv-mib 18446744073709551615 is too large",
    ),
    err(
        "bench_one_batch_input_len_past_positions",
        |f| a(&["bench", "one-batch", "--model", &f.p("m"), "--batch-size", "1",
                "--input-len", "100000", "--output-len", "2"]),
        "--input-len 100000 with --output-len 2",
    ),
    err(
        "bench_one_batch_batch_overflows",
        |f| a(&["bench", "one-batch", "--model", &f.p("m"), "--batch-size", "18446744073709551615",
                "--input-len", "8", "--output-len", "2"]),
        "--batch-size 18446744073709551615",
    ),
    usage(
        "bench_gemm_zero_rows",
        |_| a(&["bench", "gemm", "--rows", "0"]),
        "invalid value '0' for '--rows <ROWS>': must be at least 1",
    ),
    err(
        "bench_gemm_huge_rows",
        |_| a(&["bench", "gemm", "--rows", "1000000000"]),
        "--rows 1000000000 is more than 4096",
    ),
    err(
        "bench_gemm_huge_threads",
        |_| a(&["bench", "gemm", "--threads", "1,1000000"]),
        "--threads 1000000 is more than the",
    ),
    err(
        "bench_gemm_layers_overflow",
        |_| a(&["bench", "gemm", "--layers", "18446744073709551615"]),
        "--layers 18446744073709551615 is more than the shape's 30 layers",
    ),
    err(
        "bench_gemm_8b_shape_unsharded",
        |_| a(&["bench", "gemm", "--preset", "llama3-8b-shape"]),
        "(more than 8 GiB): pass --shard or --layers",
    ),
    err(
        "bench_gemm_shard_not_dividing",
        |_| a(&["bench", "gemm", "--shard", "5"]),
        "--shard 5 does not divide the attention heads (9)",
    ),
    err(
        "profile_contexts_past_positions",
        |f| a(&["profile", "--model", &f.p("m"), "--world", "1", "--contexts", "8,100000",
                "--out", &f.p("never.json")]),
        "--contexts value 100000 is too long",
    ),
    usage(
        "profile_world_huge",
        |f| a(&["profile", "--model", &f.p("m"), "--world", "1000000000000",
                "--out", &f.p("never.json")]),
        "'--world <WORLD>': 1000000000000 is more ranks than pat supports (4096)",
    ),
    usage(
        "generate_world_1e5",
        |f| gen(f, &["--world", "100000", "--prompt-ids", "1"]),
        "'--world <WORLD>': 100000 is more ranks than pat supports (4096)",
    ),
    usage(
        "generate_world_u64_max",
        |f| gen(f, &["--world", "18446744073709551615", "--prompt-ids", "1"]),
        "'--world <WORLD>': 18446744073709551615 is more ranks",
    ),
    usage(
        "rollout_world_huge",
        |f| a(&["rollout", "--model", &f.p("m"), "--world", "10000000", "--policy", "static:1",
                "--trace", &f.p("trace_small.jsonl")]),
        "'--world <WORLD>': 10000000 is more ranks",
    ),
    err(
        "generate_block_size_1e9",
        |f| gen(f, &["--block-size", "1000000000", "--prompt-ids", "1"]),
        "--block-size is 1000000000, expected 1 ..= max_position_embeddings (512)",
    ),
    err(
        "generate_kv_blocks_1e13",
        |f| gen(f, &["--kv-blocks", "10000000000000", "--prompt-ids", "1"]),
        "--kv-blocks is 10000000000000, more than block ids count",
    ),
    usage(
        "trace_gen_n_u64_max",
        |_| a(&["trace", "gen", "--n", "18446744073709551615"]),
        "--n 18446744073709551615 is more requests than a trace may have",
    ),
    usage(
        "trace_gen_n_1e10",
        |_| a(&["trace", "gen", "--kind", "uniform", "--n", "10000000000"]),
        "--n 10000000000",
    ),
    usage(
        "trace_gen_cap_2p40",
        |_| a(&["trace", "gen", "--cap", "1099511627776"]),
        "--cap 1099511627776 is longer than any model's context",
    ),
    err(
        "config_layers_1e9",
        |f| a(&["generate", "--model", &f.p("layers_1e9"), "--prompt-ids", "1"]),
        "`num_hidden_layers` 1000000000 is larger than pat supports",
    ),
    err(
        "config_vocab_1e12",
        |f| a(&["generate", "--model", &f.p("vocab_1e12"), "--prompt-ids", "1"]),
        "`vocab_size` 1000000000000 is larger than pat supports",
    ),
    err(
        "config_head_dim_2p62",
        |f| a(&["generate", "--model", &f.p("head_dim_2p62"), "--prompt-ids", "1"]),
        "`head_dim` 4611686018427387904 is larger than pat supports",
    ),
    err(
        "config_heads_2p40",
        |f| a(&["generate", "--model", &f.p("heads_2p40"), "--prompt-ids", "1"]),
        "`num_attention_heads` 1099511627776",
    ),
    err(
        "config_intermediate_checked_against_the_tensor_before_allocating",
        |f| a(&["generate", "--model", &f.p("inter_1e6"), "--prompt-ids", "1"]),
        "has shape [128, 64], expected [1000000, 64]",
    ),
    usage(
        "simulate_world_past_any_node",
        |f| a(&["simulate", "--trace", &f.p("trace_small.jsonl"), "--world", "1000000", "--no-optimum"]),
        "invalid value '1000000' for '--world <WORLD>': 1000000 GPUs: a simulated node has 1 to 1024",
    ),
    usage(
        "simulate_world_past_what_it_models",
        |f| a(&["simulate", "--trace", &f.p("trace_small.jsonl"), "--world", "2048", "--no-optimum"]),
        "invalid value '2048' for '--world <WORLD>': 2048 GPUs: a simulated node has 1 to 1024",
    ),
    // 8B weights (16 GB) in 1% of two 80 GB GPUs: no KV room at any tp, where the node used to
    // run each replica one sequence at a time and report the times.
    err(
        "simulate_weights_past_the_memory_fraction",
        |f| a(&["simulate", "--trace", &f.p("trace_small.jsonl"), "--world", "2", "--mem-fraction", "0.01", "--no-optimum"]),
        "no layout of --world 2 holds the longest request's 7 KV tokens (prompt + response) on a replica: at tp 1 a replica holds 0 KV tokens, at tp 2 a replica holds 0 KV tokens",
    ),
    // At 15% the weights fit two GPUs (tp 2), not one.
    err(
        "simulate_start_tp_without_room_for_the_longest_request",
        |f| a(&["simulate", "--trace", &f.p("trace_small.jsonl"), "--world", "2", "--mem-fraction", "0.15", "--start-tp", "1", "--no-optimum"]),
        "--start-tp 1: at tp 1 a replica holds 0 KV tokens",
    ),
    Case {
        name: "simulate_leaves_out_a_layout_without_room_and_says_so",
        args: |f| a(&["simulate", "--trace", &f.p("trace_small.jsonl"), "--world", "2", "--mem-fraction", "0.15", "--no-optimum"]),
        code: 0,
        needle: "note: left out: at tp 1 a replica holds 0 KV tokens",
        absent: Some("error"),
    },
    Case {
        name: "demo_max_response_past_the_presets_positions_before_the_model_is_made",
        args: |_| a(&["demo", "--no-sim", "--max-response", "100000"]),
        code: 1,
        needle: "--max-response 100000: the preset holds 4096 positions, and prompts run up to 48 tokens: at most 4048",
        absent: Some("making"),
    },
    Case {
        name: "demo_world_not_splitting_the_preset_before_the_model_is_made",
        args: |_| a(&["demo", "--no-sim", "--preset", "tiny", "--world", "3"]),
        code: 1,
        needle: "--world: tp 3 does not divide num_attention_heads 8",
        absent: Some("making"),
    },
    err(
        "simulate_response_over_the_stated_cap",
        |f| a(&["simulate", "--trace", &f.p("trace_small.jsonl"), "--cap", "4", "--no-optimum"]),
        "trace_small.jsonl:2: request 1: `response_len` 5 is over --cap 4",
    ),
    err(
        "simulate_response_past_the_shapes_context",
        |f| a(&["simulate", "--trace", &f.p("trace_200k.jsonl"), "--no-optimum"]),
        "trace_200k.jsonl:1: request 0: `prompt_len` 8 + `response_len` 200000 is beyond llama3-8b's context of 131072",
    ),
    usage(
        "trace_gen_uniform_hi_under_the_default_lo_says_it_is_the_default",
        |_| a(&["trace", "gen", "--kind", "uniform", "--hi", "5"]),
        "--lo 5376 (the default, cap/4 - cap/32) is above --hi 5",
    ),
    usage(
        "trace_gen_grpo_correlation_past_one",
        |_| a(&["trace", "gen", "--kind", "grpo", "--rho", "1.5"]),
        "invalid value '1.5' for '--rho <RHO>': must be in [0, 1]",
    ),
    usage(
        "trace_gen_grpo_at_cap_where_the_shape_collapses",
        |_| a(&["trace", "gen", "--kind", "grpo", "--at-cap", "0.08"]),
        "--at-cap must be above 0 and at most 0.0389, got 0.08",
    ),
    usage(
        "trace_gen_grpo_batch_past_the_bound",
        |_| a(&["trace", "gen", "--kind", "grpo", "--prompts", "4294967296", "--group-size", "4294967296"]),
        "--prompts x --group-size must be between 1 and 16777216 responses",
    ),
    err(
        "init_model_shard_not_dividing_the_heads",
        |f| a(&["init-model", "--preset", "small", "--shard", "3", "--out", &f.p("shard3")]),
        "--shard 3 does not divide the attention heads (8)",
    ),
    Case {
        name: "compose_profile_shard_without_a_file",
        args: |f| a(&["compose-profile", "--shard", "8", "--out", &f.p("node.json")]),
        code: 2,
        needle: "expected K=FILE",
        absent: None,
    },
];

#[test]
fn untrusted_lengths_and_sizes() {
    check(CASES);
}
