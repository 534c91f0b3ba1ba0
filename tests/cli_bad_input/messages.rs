//! Messages that must name what the user gave (the flag, the file and line, the field), for
//! layouts, flags, requests and traces; and KV admission (requests that each fit the pool but
//! not together queue instead of failing).

use super::{a, check, err, usage, Case, Fx};

fn gen(fx: &Fx, extra: &[&str]) -> Vec<String> {
    let mut v = a(&["generate", "--model", &fx.p("m")]);
    v.extend(a(extra));
    v
}

fn rollout_small(fx: &Fx, policy: &str, extra: &[&str]) -> Vec<String> {
    let mut v = a(&[
        "rollout",
        "--model",
        &fx.p("m"),
        "--trace",
        &fx.p("trace_small.jsonl"),
        "--world",
        "2",
        "--policy",
        policy,
    ]);
    v.extend(a(extra));
    v
}

const CASES: &[Case] = &[
    // Layouts.
    err(
        "tp_not_dividing_world",
        |f| gen(f, &["--world", "4", "--tp", "3", "--prompt-ids", "1"]),
        "tp 3 does not divide world 4",
    ),
    Case {
        name: "tp_not_dividing_query_heads_is_not_blamed_on_kv_replication",
        args: |f| gen(f, &["--world", "3", "--tp", "3", "--prompt-ids", "1"]),
        code: 1,
        needle: "tp 3 does not divide num_attention_heads 8",
        absent: Some("replication"),
    },
    err(
        "tp_not_dividing_kv_heads",
        |f| gen(f, &["--world", "8", "--tp", "8", "--prompt-ids", "1"]),
        "does not divide num_key_value_heads 4 (KV-head replication is not implemented)",
    ),
    usage(
        "world_zero",
        |f| gen(f, &["--world", "0", "--prompt-ids", "1"]),
        "invalid value '0' for '--world <WORLD>': 0 ranks: a world is 1 to 4096 ranks",
    ),
    err(
        "reconfigure_to_a_tp_not_dividing_world",
        |f| {
            gen(
                f,
                &["--world", "2", "--prompt-ids", "1", "--reconfigure", "1:3"],
            )
        },
        "--reconfigure 1:3: invalid layout: tp 3 does not divide world 2",
    ),
    Case {
        name: "bench_switch_to_zero_names_to",
        args: |f| {
            a(&[
                "bench",
                "switch",
                "--model",
                &f.p("m"),
                "--world",
                "2",
                "--from",
                "1",
                "--to",
                "0",
            ])
        },
        code: 2,
        needle: "invalid value '0' for '--to <TO>': must be at least 1",
        absent: Some("--reconfigure"),
    },
    Case {
        name: "bench_switch_to_past_world_names_to",
        args: |f| {
            a(&[
                "bench",
                "switch",
                "--model",
                &f.p("m"),
                "--world",
                "2",
                "--from",
                "1",
                "--to",
                "8",
            ])
        },
        code: 1,
        needle: "--to 8: invalid layout: tp 8 does not divide world 2",
        absent: Some("--reconfigure"),
    },
    usage(
        "bench_switch_world_zero_names_world",
        |f| {
            a(&[
                "bench",
                "switch",
                "--model",
                &f.p("m"),
                "--world",
                "0",
                "--from",
                "1",
                "--to",
                "2",
            ])
        },
        "invalid value '0' for '--world <WORLD>': 0 ranks",
    ),
    // A constant of the wrong kind is named by its key, not by a Rust type.
    err(
        "cost_model_string_for_a_number",
        |f| {
            a(&[
                "simulate",
                "--trace",
                &f.p("trace_small.jsonl"),
                "--cost-model",
                &f.p("cost_string.json"),
                "--no-optimum",
            ])
        },
        "cost_string.json: `hbm_efficiency` must be a number like its default, got \"x\"",
    ),
    err(
        "cost_model_number_for_a_table",
        |f| {
            a(&[
                "simulate",
                "--trace",
                &f.p("trace_small.jsonl"),
                "--cost-model",
                &f.p("cost_table.json"),
                "--no-optimum",
            ])
        },
        "cost_table.json: `allreduce` must be a list like its default, got 5",
    ),
    usage(
        "infinite_temperature_is_not_a_temperature",
        |f| gen(f, &["--prompt-ids", "1", "--temperature", "inf"]),
        "invalid value 'inf' for '--temperature <TEMPERATURE>': must be a finite number >= 0",
    ),
    // Flags.
    usage(
        "negative_temperature_reaches_pats_check",
        |f| gen(f, &["--prompt-ids", "1", "--temperature", "-1"]),
        "invalid value '-1' for '--temperature <TEMPERATURE>': must be a finite number >= 0",
    ),
    usage(
        "negative_world_names_the_flag",
        |f| gen(f, &["--prompt-ids", "1", "--world", "-1"]),
        "invalid value '-1' for '--world <WORLD>'",
    ),
    usage(
        "negative_top_k_names_the_flag",
        |f| gen(f, &["--prompt-ids", "1", "--top-k", "-1"]),
        "invalid value '-1' for '--top-k <TOP_K>'",
    ),
    usage(
        "top_p_zero",
        |f| {
            gen(
                f,
                &[
                    "--prompt-ids",
                    "1",
                    "invalid value '0' for '--top-p <TOP_P>': must be in (0, 1]",
                    "0",
                ],
            )
        },
        "--top-p",
    ),
    usage(
        "max_new_tokens_zero",
        |f| gen(f, &["--prompt-ids", "1", "--max-new-tokens", "0"]),
        "invalid value '0' for '--max-new-tokens <MAX_NEW_TOKENS>': must be at least 1",
    ),
    usage(
        "devices_without_cuda",
        |f| gen(f, &["--devices", "0", "--prompt-ids", "1"]),
        "--devices needs --backend cuda",
    ),
    usage(
        "gpu_switch_without_cuda",
        |f| gen(f, &["--gpu-switch", "host", "--prompt-ids", "1"]),
        "--gpu-switch host needs --backend cuda",
    ),
    usage(
        "gpu_switch_names_its_choices",
        |f| gen(f, &["--gpu-switch", "nvlink", "--prompt-ids", "1"]),
        "invalid value 'nvlink' for '--gpu-switch <GPU_SWITCH>'",
    ),
    // GPU ranks switch now; without the feature the backend itself is what is refused.
    err(
        "reconfigure_on_cuda_without_the_feature",
        |f| {
            gen(
                f,
                &[
                    "--backend",
                    "cuda",
                    "--reconfigure",
                    "2:1",
                    "--prompt-ids",
                    "1",
                ],
            )
        },
        "built without the `cuda` feature",
    ),
    usage(
        "no_input",
        |f| a(&["generate", "--model", &f.p("m")]),
        "required",
    ),
    usage(
        "trace_gen_cap_zero_names_cap",
        |_| a(&["trace", "gen", "--kind", "uniform", "--cap", "0"]),
        "invalid value '0' for '--cap <CAP>': must be at least 1",
    ),
    Case {
        name: "trace_gen_tiny_cap_names_cap_not_lo_hi",
        args: |_| a(&["trace", "gen", "--kind", "uniform", "--cap", "3"]),
        code: 2,
        needle: "--cap 3 is too small for the default uniform range",
        absent: Some("got lo"),
    },
    usage(
        "trace_gen_straggler_long_zero",
        |_| a(&["trace", "gen", "--kind", "straggler", "--long", "0"]),
        "--long 0",
    ),
    usage(
        "trace_summarize_is_not_a_subcommand",
        |_| a(&["trace", "summarize"]),
        "unrecognized subcommand",
    ),
    // Requests.
    err(
        "token_id_outside_vocab",
        |f| gen(f, &["--prompt-ids", "1,2,99999"]),
        "token id 99999 at position 2 is out of range",
    ),
    // Each --prompt-ids occurrence is its own request, named by its place.
    err(
        "second_prompt_ids_occurrence_outside_vocab",
        |f| gen(f, &["--prompt-ids", "1", "--prompt-ids", "2,99999"]),
        "request 1: token id 99999 at position 1 is out of range",
    ),
    err(
        "second_prompt_ids_occurrence_empty",
        |f| gen(f, &["--prompt-ids", "1", "--prompt-ids", ""]),
        "--prompt-ids: request 1: empty prompt",
    ),
    usage(
        "prompt_ids_stray_comma",
        |f| gen(f, &["--prompt-ids", "1,,2"]),
        "an empty token id (a stray comma?)",
    ),
    usage(
        "prompt_ids_not_a_number",
        |f| gen(f, &["--prompt-ids", "1, x"]),
        "'--prompt-ids <IDS>': token id \"x\"",
    ),
    err(
        "token_id_outside_vocab_in_file",
        |f| gen(f, &["--requests", &f.p("ids_oov.jsonl")]),
        "ids_oov.jsonl:1: request 0: token id 5000",
    ),
    // A file's requests are named by line (1-based, as files are) and by request (0-based, as
    // the library's errors and the outputs' `index` number them).
    err(
        "request_file_names_the_line_and_the_request",
        |f| gen(f, &["--requests", &f.p("gaps.jsonl")]),
        "gaps.jsonl:4: request 1: token id 5000 at position 1",
    ),
    err(
        "request_file_empty_input_ids",
        |f| gen(f, &["--requests", &f.p("empty_ids.jsonl")]),
        "empty_ids.jsonl:1: request 0: empty prompt: `input_ids` holds no token ids",
    ),
    // An empty text prompt is BOS alone where the tokenizer adds one: it runs ...
    Case {
        name: "empty_text_prompt_is_bos_alone",
        args: |f| gen(f, &["--prompt", "", "--max-new-tokens", "1"]),
        code: 0,
        needle: "\"input_ids\":[1]",
        absent: None,
    },
    Case {
        name: "empty_text_prompt_in_a_file_is_bos_alone",
        args: |f| {
            gen(
                f,
                &[
                    "--requests",
                    &f.p("empty_text.jsonl"),
                    "--max-new-tokens",
                    "1",
                ],
            )
        },
        code: 0,
        needle: "\"input_ids\":[1]",
        absent: None,
    },
    // ... and with no BOS it is no tokens at all: refused, naming the flag or the line.
    Case {
        name: "empty_text_prompt_without_bos",
        args: |f| a(&["generate", "--model", &f.p("nobos"), "--prompt", ""]),
        code: 1,
        needle: "--prompt \"\" tokenizes to no tokens (the model's tokenizer adds no BOS token)",
        absent: Some("--max-new-tokens"),
    },
    err(
        "empty_text_prompt_in_a_file_without_bos",
        |f| {
            a(&[
                "generate",
                "--model",
                &f.p("nobos"),
                "--requests",
                &f.p("empty_text.jsonl"),
            ])
        },
        "empty_text.jsonl:1: request 0: `prompt` \"\" tokenizes to no tokens",
    ),
    err(
        "request_larger_than_the_pool",
        |f| {
            gen(
                f,
                &[
                    "--prompt-ids",
                    "1,2,3",
                    "--max-new-tokens",
                    "40",
                    "--kv-blocks",
                    "2",
                ],
            )
        },
        "needs 3 blocks of 16 tokens but a rank's pool has 2 (raise --kv-blocks)",
    ),
    err(
        "request_file_larger_than_the_pool_names_the_line",
        |f| {
            gen(
                f,
                &["--requests", &f.p("long_second.jsonl"), "--kv-blocks", "2"],
            )
        },
        "long_second.jsonl:3: request 1 needs 3 blocks of 16 tokens but a rank's pool has 2",
    ),
    err(
        "request_file_bad_json_names_the_line",
        |f| gen(f, &["--requests", &f.p("bad.jsonl")]),
        "bad.jsonl:2: not valid JSON",
    ),
    err(
        "request_file_missing",
        |f| gen(f, &["--requests", &f.p("missing.jsonl")]),
        "missing.jsonl",
    ),
    Case {
        name: "request_file_with_a_bom_is_read",
        args: |f| gen(f, &["--requests", &f.p("bom.jsonl")]),
        code: 0,
        needle: "\"output_ids\"",
        absent: None,
    },
    err(
        "model_dir_missing",
        |f| a(&["generate", "--model", &f.p("nope"), "--prompt-ids", "1"]),
        "--model: model directory",
    ),
    // KV admission: 16 requests of 4 blocks each through a pool of 8 blocks run two at a time.
    Case {
        name: "requests_that_fit_alone_but_not_together_queue",
        args: |f| {
            gen(
                f,
                &[
                    "--requests",
                    &f.p("reqs16.jsonl"),
                    "--kv-blocks",
                    "8",
                    "--ignore-eos",
                ],
            )
        },
        code: 0,
        needle: "16 requests, 64 tokens",
        absent: Some("KV cache exhausted"),
    },
    Case {
        // A file's own keys, not the flags of the same name.
        name: "a_request_file_key_is_named_as_in_the_file",
        args: |f| gen(f, &["--requests", &f.p("max_new_zero.jsonl")]),
        code: 1,
        needle: "max_new_zero.jsonl:1: `max_new_tokens` must be a positive integer, got 0",
        absent: Some("--max-new-tokens"),
    },
    Case {
        // Checked before the rollout runs a step (it used to fail at its first decision).
        name: "rollout_negative_min_gain_before_any_step",
        args: |f| rollout_small(f, "adaptive", &["--min-gain-ms", "-5"]),
        code: 2,
        needle: "invalid value '-5' for '--min-gain-ms <MIN_GAIN_MS>': must be from 0 to 1e9 ms",
        absent: Some("step"),
    },
    usage(
        "rollout_nan_margin",
        |f| rollout_small(f, "adaptive", &["--margin", "NaN"]),
        "invalid value 'NaN' for '--margin <MARGIN>': must be in [0, 1)",
    ),
    usage(
        "demo_model_with_a_preset",
        |f| a(&["demo", "--model", &f.p("m"), "--preset", "tiny", "--no-sim"]),
        "cannot be used with",
    ),
    err(
        "demo_world_one_names_world_only",
        |_| a(&["demo", "--world", "1", "--no-sim"]),
        "--world must be at least 2 (a switch needs two layouts), got 1",
    ),
    Case {
        // tp = world does not shard this model: PAT's rule switches to the largest tp that does.
        name: "simulate_a_world_the_model_cannot_shard_whole",
        args: |f| {
            a(&[
                "simulate",
                "--trace",
                &f.p("trace_small.jsonl"),
                "--world",
                "3",
            ])
        },
        code: 0,
        needle: "PAT @5.52s",
        absent: Some("error"),
    },
    usage(
        "rollout_start_tp_with_a_static_policy",
        |f| rollout_small(f, "static:1", &["--start-tp", "2"]),
        "--start-tp 2 is for --policy adaptive; --policy static:1 runs at tp 1 throughout",
    ),
    // What only the adaptive rule reads is refused with a static policy, not ignored.
    usage(
        "rollout_margin_with_a_static_policy",
        |f| rollout_small(f, "static:1", &["--margin", "0.5"]),
        "--margin 0.5 is for --policy adaptive; --policy static:1 runs at tp 1 throughout",
    ),
    usage(
        "rollout_kv_transfer_with_a_static_policy",
        |f| rollout_small(f, "static:1", &["--kv-transfer", "recompute"]),
        "--kv-transfer recompute is for --policy adaptive",
    ),
];

#[test]
fn messages_name_what_the_user_gave() {
    check(CASES);
}
