//! Trace JSONL -> `Trace::parse`: a clean error, or a trace whose stats compute, whose every
//! length is positive, and which round-trips through `to_jsonl`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pat::policy::trace::Trace;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(t) = Trace::parse(Path::new("t.jsonl"), text) else {
        return;
    };
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
    assert_eq!(back, t);
});
