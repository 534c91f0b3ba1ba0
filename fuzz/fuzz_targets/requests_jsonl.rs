//! Request JSONL -> `parse_requests_jsonl`, then the model checks of `engine::check_request`
//! against a small config: a clean error, or requests that fit the model's positions.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pat::engine::{check_request, parse_requests_jsonl};
use pat::model::config::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = pat_fuzz::small_config();
    let Ok(reqs) = parse_requests_jsonl(Path::new("r.jsonl"), text, None, 8, false) else {
        return;
    };
    assert!(!reqs.is_empty());
    for (i, r) in reqs.iter().enumerate() {
        assert!(r.max_new_tokens >= 1);
        if check_request(&cfg, i, r).is_ok() {
            let total = r.input_ids.len() as u128 + r.max_new_tokens as u128;
            assert!(total <= cfg.max_position_embeddings as u128);
            assert!(r.input_ids.iter().all(|&t| (t as usize) < cfg.vocab_size));
            assert!(!r.input_ids.is_empty());
        }
    }
    let _: &ModelConfig = &cfg;
});
