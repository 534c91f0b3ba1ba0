//! Messages that speak of what the user typed, not of a library parameter or a Rust type: a
//! count flag at 0, a budget flag whose limit the library words in its own terms, a file as a
//! whole (no line 0), a path that does not exist; a trace's bad ids at their file line; an output
//! path refused before a run of seconds; a flag that takes no other, or that another makes moot; and a default grid lowered
//! to what a small model holds instead of refused.

use super::{a, check, err, usage, Case, Fx};

/// `pat generate` on the tiny model with `extra`.
fn gen(fx: &Fx, extra: &[&str]) -> Vec<String> {
    let mut v = a(&["generate", "--model", &fx.p("m")]);
    v.extend(a(extra));
    v
}

fn table() -> Vec<Case> {
    vec![
        // Values no command takes, refused as the flag is read (usage errors, exit 2).
        usage(
            "kv_transfer_without_a_switch",
            |f| gen(f, &["--prompt-ids", "1", "--kv-transfer", "migrate"]),
            "--kv-transfer says how a live switch moves KV: give --reconfigure STEP:TP too",
        ),
        usage(
            "two_switches_at_one_step",
            |f| {
                gen(
                    f,
                    &[
                        "--world",
                        "4",
                        "--prompt-ids",
                        "1",
                        "--reconfigure",
                        "3:2",
                        "--reconfigure",
                        "5:4",
                        "--reconfigure",
                        "3:4",
                    ],
                )
            },
            "--reconfigure 3:2 and 3:4 switch at the same step: the first layout would run no step",
        ),
        usage(
            "one_switch_given_twice",
            |f| {
                gen(
                    f,
                    &[
                        "--world",
                        "4",
                        "--prompt-ids",
                        "1",
                        "--reconfigure",
                        "3:2",
                        "--reconfigure",
                        "3:2",
                    ],
                )
            },
            "--reconfigure 3:2 is given twice",
        ),
        usage(
            "tp_zero_names_the_flag",
            |f| gen(f, &["--prompt-ids", "1", "--tp", "0"]),
            "invalid value '0' for '--tp <TP>': must be at least 1",
        ),
        usage(
            "gemm_bench_threads_zero",
            |_| a(&["bench", "gemm", "--threads", "2,0"]),
            "invalid value '0' for '--threads <THREADS>': must be at least 1",
        ),
        usage(
            "simulate_host_cost_past_a_second",
            |f| {
                a(&[
                    "simulate",
                    "--trace",
                    &f.p("trace_small.jsonl"),
                    "--per-seq-us",
                    "1e300",
                ])
            },
            "invalid value '1e300' for '--per-seq-us <PER_SEQ_US>': must be from 0 to 1e6 us",
        ),
        usage(
            "simulate_link_slower_than_any_network",
            |f| {
                a(&[
                    "simulate",
                    "--trace",
                    &f.p("trace_small.jsonl"),
                    "--link",
                    "1e-9",
                ])
            },
            "bad link `1e-9` (expected nvlink, pcie or a one-way bandwidth in GB/s, 0.1 to 10000)",
        ),
        // --model gives the full model; a --model-shape beside it would be silently dropped.
        usage(
            "compose_profile_model_shape_with_model",
            |f| {
                a(&[
                    "compose-profile",
                    "--shard",
                    &format!("1={}", f.p("p.json")),
                    "--model",
                    &f.p("m"),
                    "--model-shape",
                    "qwen3-14b",
                    "--out",
                    &f.p("out.json"),
                ])
            },
            "'--model <MODEL>' cannot be used with '--model-shape <MODEL_SHAPE>'",
        ),
        usage(
            "prefill_tokens_zero_says_at_least_one",
            |f| {
                a(&[
                    "generate",
                    "--model",
                    &f.p("m"),
                    "--prompt-ids",
                    "1",
                    "--prefill-tokens",
                    "0",
                ])
            },
            "--prefill-tokens <N>': must be at least 1",
        ),
        Case {
            name: "an_empty_request_file_has_no_line_zero",
            args: |f| {
                a(&[
                    "generate",
                    "--model",
                    &f.p("m"),
                    "--requests",
                    &f.p("empty.jsonl"),
                ])
            },
            code: 1,
            needle: "empty.jsonl: no requests in file",
            absent: Some(":0:"),
        },
        err(
            "a_model_directory_without_a_config",
            |f| a(&["generate", "--model", &f.p("a_dir"), "--prompt-ids", "1"]),
            "a_dir: no config.json (a model in the Hugging Face layout",
        ),
        err(
            "a_model_path_that_does_not_exist",
            |f| a(&["generate", "--model", &f.p("nope"), "--prompt-ids", "1"]),
            "nope: does not exist",
        ),
        err(
            "rollout_names_the_trace_line_of_an_id_outside_the_vocabulary",
            |f| {
                a(&[
                    "rollout",
                    "--model",
                    &f.p("m"),
                    "--trace",
                    &f.p("trace_ids_oov.jsonl"),
                    "--world",
                    "1",
                    "--policy",
                    "static:1",
                ])
            },
            "trace_ids_oov.jsonl:3: request 1: `input_ids` holds token id 5000 at position 1",
        ),
        Case {
            name: "bench_switch_kv_mib_too_large_names_kv_mib",
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
                    "2",
                    "--kv-mib",
                    "999999999",
                ])
            },
            code: 1,
            needle: "--kv-mib 999999999:",
            absent: Some("--kv-blocks"),
        },
        Case {
            // Past what the host holds, short of the block-id limit (4.8 TB).
            name: "bench_switch_kv_mib_past_the_host_names_kv_mib",
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
                    "2",
                    "--kv-mib",
                    "5000000",
                ])
            },
            code: 1,
            needle: "(--kv-mib 5000000)",
            absent: Some("--kv-blocks"),
        },
        err(
            "demo_svg_a_directory_is_refused_before_the_run",
            |f| a(&["demo", "--preset", "tiny", "--svg", &f.p("a_dir")]),
            "--svg ",
        ),
        err(
            "simulate_svg_dash_is_not_stdout",
            |f| {
                a(&[
                    "simulate",
                    "--trace",
                    &f.p("trace_small.jsonl"),
                    "--svg",
                    "-",
                ])
            },
            "--svg -: `-` is not a file here (stdout carries the command's report)",
        ),
        Case {
            name: "trace_gen_out_dash_is_stdout",
            args: |_| a(&["trace", "gen", "--n", "2", "--out", "-"]),
            code: 0,
            needle: "\"response_len\"",
            absent: Some("error"),
        },
        err(
            "trace_gen_out_a_link_to_nothing_is_refused",
            |f| a(&["trace", "gen", "--n", "2", "--out", &f.p("dangling.svg")]),
            "dangling.svg: a symbolic link to a file that does not exist",
        ),
        err(
            "simulate_svg_in_a_missing_directory",
            |f| {
                a(&[
                    "simulate",
                    "--trace",
                    &f.p("trace_small.jsonl"),
                    "--svg",
                    &f.p("no_dir/x.svg"),
                ])
            },
            "does not exist",
        ),
        usage(
            "simulate_calibration_takes_no_other_flag",
            |_| a(&["simulate", "--calibration", "--json"]),
            "cannot be used with",
        ),
        Case {
            // The default --contexts (32,128,512) is longer than the tiny preset's 512 positions
            // allow with the decode steps: lowered, with a note, instead of refused.
            name: "profile_defaults_fit_a_small_model",
            args: |f| {
                a(&[
                    "profile",
                    "--model",
                    &f.p("m"),
                    "--world",
                    "1",
                    "--batches",
                    "1,2",
                    "--steps",
                    "1",
                    "--out",
                    &f.p("prof_defaults.json"),
                ])
            },
            code: 0,
            needle: "note: --contexts 32,128,510",
            absent: Some("error"),
        },
        err(
            "profile_contexts_too_long_names_the_model_limit",
            |f| {
                a(&[
                    "profile",
                    "--model",
                    &f.p("m"),
                    "--world",
                    "1",
                    "--contexts",
                    "600",
                    "--out",
                    &f.p("prof_long.json"),
                ])
            },
            "--contexts value 600 is too long for this model",
        ),
        // Flags the chosen mode makes moot, and values the command line alone gets wrong.
        usage(
            "trace_gen_flag_of_another_kind",
            |_| a(&["trace", "gen", "--kind", "deepscaler", "--lo", "5"]),
            "--lo is not used by --kind deepscaler (only by uniform)",
        ),
        usage(
            "simulate_profile_with_a_modeled_node_flag",
            |f| {
                a(&[
                    "simulate",
                    "--trace",
                    &f.p("trace_small.jsonl"),
                    "--profile",
                    &f.p("prof_w2.json"),
                    "--world",
                    "2",
                    "--gpu",
                    "a40",
                ])
            },
            "--gpu shapes the modeled node only",
        ),
        usage(
            "simulate_start_tp_not_dividing_the_world",
            |f| {
                a(&[
                    "simulate",
                    "--trace",
                    &f.p("trace_small.jsonl"),
                    "--start-tp",
                    "3",
                ])
            },
            "--start-tp 3 does not divide --world 8",
        ),
        err(
            "simulate_start_tp_the_model_cannot_split",
            |f| {
                a(&[
                    "simulate",
                    "--trace",
                    &f.p("trace_small.jsonl"),
                    "--world",
                    "6",
                    "--start-tp",
                    "3",
                    "--no-optimum",
                ])
            },
            "--start-tp 3: invalid layout: tp 3 does not divide num_attention_heads 32",
        ),
        err(
            "simulate_profile_refuses_requests_past_the_profiled_context",
            |f| {
                a(&[
                    "simulate",
                    "--trace",
                    &f.p("trace_long.jsonl"),
                    "--profile",
                    &f.p("prof_w2.json"),
                    "--world",
                    "2",
                ])
            },
            "request 1: `prompt_len` 100 + `response_len` 1000 is beyond the profiled model's",
        ),
        err(
            "a_trace_key_given_twice",
            |f| a(&["trace", "stats", &f.p("trace_dup_key.jsonl")]),
            "trace_dup_key.jsonl:1: key `prompt_len` is given twice",
        ),
        Case {
            // The pools are sized by the grid: the message names it, not a --kv-blocks.
            name: "profile_grid_past_the_host_names_the_grid",
            args: |f| {
                a(&[
                    "profile",
                    "--model",
                    &f.p("m"),
                    "--world",
                    "1",
                    "--batches",
                    "100000000",
                    "--contexts",
                    "16",
                    "--steps",
                    "1",
                    "--out",
                    &f.p("prof_huge.json"),
                ])
            },
            code: 1,
            needle: "profile grid: its largest point (--batches 100000000 x --contexts 16",
            absent: Some("--kv-blocks"),
        },
        usage(
            "profile_steps_zero_names_steps",
            |f| {
                a(&[
                    "profile",
                    "--model",
                    &f.p("m"),
                    "--world",
                    "1",
                    "--steps",
                    "0",
                    "--out",
                    &f.p("prof_zero.json"),
                ])
            },
            "invalid value '0' for '--steps <STEPS>': must be at least 1",
        ),
    ]
}

#[test]
fn flags_files_and_outputs_are_named_as_the_user_gave_them() {
    check(&table());
}
