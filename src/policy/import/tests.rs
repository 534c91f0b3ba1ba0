//! The byte-level tokenizer makes one token per UTF-8 byte (and a BOS with special tokens), so
//! every expected length below is the text's byte length, counted here independently.

use super::*;

fn tok() -> Tokenizer {
    Tokenizer::byte_level(300).unwrap()
}

fn opts(source: Source) -> ImportOptions {
    ImportOptions {
        source,
        step: None,
        cap: None,
        group_size: None,
    }
}

fn verl_line(input: &str, output: &str, step: u64) -> String {
    serde_json::json!({"input": input, "output": output, "gts": "42", "score": 1.0, "step": step})
        .to_string()
}

fn run(text: &str, o: &ImportOptions) -> Result<Imported> {
    import(Path::new("dump.jsonl"), text, o, Some(&tok()), &|_| {})
}

#[test]
fn a_verl_dump_counts_tokens_and_finds_the_groups() {
    let (p1, p2) = (
        "What is 2+2? Answer in one word.",
        "Prove that √2 is irrational.",
    );
    let outs = [
        "four",
        "Four.",
        "",
        "Suppose √2 = a/b …",
        "Assume not.",
        "QED",
    ];
    let prompts = [p1, p1, p1, p2, p2, p2];
    let text: String = prompts
        .iter()
        .zip(outs)
        .map(|(p, o)| verl_line(p, o, 7) + "\n")
        .collect();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let got = import(
        Path::new("dump.jsonl"),
        &text,
        &opts(Source::Verl),
        Some(&tok()),
        &|total| {
            assert_eq!(total, 6);
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        },
    )
    .unwrap();
    assert_eq!(calls.into_inner(), 6);
    let r = &got.trace.requests;
    for (i, (p, o)) in prompts.iter().zip(outs).enumerate() {
        // The prompt with its BOS; the response with the EOS the dump dropped.
        assert_eq!(r[i].prompt_len, p.len() + 1, "request {i}");
        assert_eq!(r[i].response_len, o.len() + 1, "request {i}");
    }
    let groups: Vec<_> = r.iter().map(|q| q.group.unwrap()).collect();
    assert_eq!(groups, [0, 0, 0, 1, 1, 1]);
    assert_eq!(
        (got.groups, got.steps.clone(), got.skipped),
        (2, vec![7], 0)
    );
    assert_eq!(got.lines, [1, 2, 3, 4, 5, 6]);
}

/// VeRL's balance_batch scatters a prompt's responses over the dump: they are still one group,
/// listed together in the trace, groups in the order their prompts first appear.
#[test]
fn a_prompts_responses_are_one_group_wherever_they_stand() {
    let rows = [
        ("a", "1"),
        ("bb", "22"),
        ("a", "333"),
        ("c", "4444"),
        ("bb", "55555"),
    ];
    let text: String = rows
        .iter()
        .map(|(p, o)| verl_line(p, o, 1) + "\n")
        .collect();
    let got = run(&text, &opts(Source::Verl)).unwrap();
    // a: lines 1, 3; bb: lines 2, 5; c: line 4.
    assert_eq!(got.lines, [1, 3, 2, 5, 4]);
    let groups: Vec<_> = got
        .trace
        .requests
        .iter()
        .map(|q| q.group.unwrap())
        .collect();
    assert_eq!(groups, [0, 0, 1, 1, 2]);
    let want: Vec<usize> = [0, 2, 1, 4, 3]
        .iter()
        .map(|&i| rows[i].1.len() + 1)
        .collect();
    assert_eq!(got.trace.response_lens(), want);
    assert_eq!(got.groups, 3);
}

/// A prompt that stands in the batch twice (a dataset with a duplicate row): with the group
/// size its responses split into two groups; a count the size does not divide is refused.
#[test]
fn a_group_size_splits_a_prompt_that_stands_twice() {
    let text: String = ["a", "a", "bb", "bb", "a", "a"]
        .iter()
        .map(|p| verl_line(p, "x", 1) + "\n")
        .collect();
    let two = ImportOptions {
        group_size: Some(2),
        ..opts(Source::Verl)
    };
    let got = run(&text, &two).unwrap();
    assert_eq!(got.lines, [1, 2, 5, 6, 3, 4]);
    let groups: Vec<_> = got
        .trace
        .requests
        .iter()
        .map(|q| q.group.unwrap())
        .collect();
    assert_eq!(groups, [0, 0, 1, 1, 2, 2]);
    let whole = run(&text, &opts(Source::Verl)).unwrap();
    let groups: Vec<_> = whole
        .trace
        .requests
        .iter()
        .map(|q| q.group.unwrap())
        .collect();
    assert_eq!(groups, [0, 0, 0, 0, 1, 1]);
    let four = ImportOptions {
        group_size: Some(4),
        ..opts(Source::Verl)
    };
    let e = run(&text, &four).unwrap_err().to_string();
    assert!(
        e.contains("dump.jsonl:3: this prompt has 2 responses in the batch, not a multiple of the group size 4"),
        "{e}"
    );
}

#[test]
fn the_cap_cuts_longer_responses_and_counts_them() {
    // 12 bytes: cut to 10 (counted); 10 bytes: at the cap, no EOS (not counted); 9 bytes: 9 + EOS.
    let text: String = ["abcdefghijkl", "abcdefghij", "abcdefghi"]
        .iter()
        .map(|o| verl_line("p", o, 3) + "\n")
        .collect();
    let o = ImportOptions {
        cap: Some(10),
        ..opts(Source::Verl)
    };
    let got = run(&text, &o).unwrap();
    assert_eq!(got.trace.response_lens(), [10, 10, 10]);
    assert_eq!(got.cut, 1);
}

#[test]
fn a_dump_of_several_steps_needs_one_chosen() {
    let text = [
        verl_line("p", "aa", 10),
        verl_line("p", "bbb", 20),
        verl_line("p", "cccc", 20),
    ]
    .join("\n");
    let e = run(&text, &opts(Source::Verl)).unwrap_err().to_string();
    assert!(
        e.starts_with("dump.jsonl: the file holds steps 10, 20"),
        "{e}"
    );
    let twenty = ImportOptions {
        step: Some(20),
        ..opts(Source::Verl)
    };
    let got = run(&text, &twenty).unwrap();
    assert_eq!(got.trace.response_lens(), [4, 5]);
    assert_eq!((got.skipped, got.lines.clone()), (1, vec![2, 3]));
    let none = ImportOptions {
        step: Some(30),
        ..opts(Source::Verl)
    };
    let e = run(&text, &none).unwrap_err().to_string();
    assert!(
        e.contains("no line of step 30 (the file holds steps 10, 20)"),
        "{e}"
    );
}

#[test]
fn bad_verl_lines_name_their_line() {
    for (text, want) in [
        ("{\"input\":\"p\"}", "dump.jsonl:1: missing `output`"),
        (
            "\n{\"input\":3,\"output\":\"o\"}",
            "dump.jsonl:2: `input` must be the decoded text, got 3",
        ),
        (
            "{\"input\":\"p\",\"output\":\"o\",\"step\":-1}",
            "dump.jsonl:1: `step` must be a non-negative integer",
        ),
        ("[1,2]", "dump.jsonl:1: each line must be a JSON object"),
        ("  \n\n", "dump.jsonl: empty file"),
    ] {
        let e = run(text, &opts(Source::Verl)).unwrap_err().to_string();
        assert!(e.starts_with(want), "{text:?}: {e}");
    }
    let e = import(
        Path::new("d"),
        &verl_line("p", "o", 1),
        &opts(Source::Verl),
        None,
        &|_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("needs a tokenizer"), "{e}");
    let stepped = ImportOptions {
        step: Some(1),
        ..opts(Source::Mooncake)
    };
    let e = import(Path::new("m"), "{}", &stepped, None, &|_| {}).unwrap_err();
    assert!(e.to_string().contains("no steps or prompt groups"), "{e}");
}

#[test]
fn a_mooncake_trace_reads_its_counts() {
    let text = "{\"timestamp\":0,\"input_length\":512,\"output_length\":90,\"hash_ids\":[1,2]}\n\
                {\"timestamp\":5,\"input_tokens\":7,\"output_tokens\":30000}\n";
    let o = ImportOptions {
        cap: Some(24576),
        ..opts(Source::Mooncake)
    };
    let got = import(Path::new("m.jsonl"), text, &o, None, &|_| {}).unwrap();
    let r = &got.trace.requests;
    assert_eq!((r[0].prompt_len, r[0].response_len), (512, 90));
    assert_eq!((r[1].prompt_len, r[1].response_len), (7, 24576));
    assert_eq!((got.cut, got.groups), (1, 0));
    assert!(r.iter().all(|q| q.group.is_none()));
    for (text, want) in [
        (
            "{\"input_length\":5}",
            "m.jsonl:1: missing `output_length` (or `output_tokens`)",
        ),
        (
            "{\"input_length\":5,\"output_length\":0}",
            "m.jsonl:1: `output_length` must be a positive integer, got 0",
        ),
    ] {
        let e = import(Path::new("m.jsonl"), text, &o, None, &|_| {})
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(want), "{e}");
    }
}
