//! Trace JSONL -> `Trace::parse`: a clean error, or a trace whose stats compute, whose every
//! length is positive, and which round-trips through `to_jsonl`. The same text through
//! `policy::import` (as a VeRL dump, on the built-in byte-level tokenizer, and as a Mooncake
//! trace, with a cap and a step or group size from its first byte): a clean error, or a trace
//! that `Trace::parse` reads back as it is, no response above the cap.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pat::model::tokenizer::Tokenizer;
use pat::policy::import::{import, ImportOptions, Source};
use pat::policy::trace::Trace;

fn check(t: &Trace) {
    assert!(!t.requests.is_empty());
    for r in &t.requests {
        assert!(r.prompt_len >= 1 && r.response_len >= 1);
        if let Some(ids) = &r.input_ids {
            assert_eq!(ids.len(), r.prompt_len);
        }
    }
    let s = t.stats(None);
    assert_eq!(s.count, t.requests.len());
    assert!(s.response_p50 <= s.response_p90 && s.response_p90 <= s.response_max);
    let _ = s.table();
    let back = Trace::parse(Path::new("t.jsonl"), &t.to_jsonl()).expect("round trip");
    assert_eq!(&back, t);
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = Trace::parse(Path::new("t.jsonl"), text) {
        check(&t);
    }
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    let tok = TOK.get_or_init(|| Tokenizer::byte_level(300).expect("byte-level tokenizer"));
    let b = data.first().copied().unwrap_or(0) as usize;
    for source in [Source::Verl, Source::Mooncake] {
        let opts = ImportOptions {
            source,
            step: (source == Source::Verl && b % 3 == 0).then_some((b / 3 % 4) as u64),
            cap: (b % 2 == 0).then_some(1 + b % 50),
            group_size: (source == Source::Verl && b % 5 == 0).then_some(1 + b % 4),
        };
        if let Ok(r) = import(Path::new("d.jsonl"), text, &opts, Some(tok), &|_| {}) {
            check(&r.trace);
            assert_eq!(r.lines.len(), r.trace.requests.len());
            if let Some(c) = opts.cap {
                assert!(r.trace.requests.iter().all(|q| q.response_len <= c));
            }
        }
    }
});
