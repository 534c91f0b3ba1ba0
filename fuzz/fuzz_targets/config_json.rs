//! config.json text -> `ModelConfig::from_json`: a clean error, or a config whose invariants hold
//! and whose derived values (RoPE frequencies, KV bytes) can be computed without a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pat::model::config::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = ModelConfig::from_json(text, Path::new("config.json")) {
        pat_fuzz::check_config(&c);
    }
});
