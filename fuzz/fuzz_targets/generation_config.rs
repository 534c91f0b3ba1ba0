//! generation_config.json text applied over a valid config (`apply_generation_config`): a clean
//! error, or EOS ids that are all inside the vocabulary.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pat::model::config::ModelConfig;

const CONFIG: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":301,"hidden_size":64,
"intermediate_size":96,"num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":4,
"bos_token_id":1,"eos_token_id":2}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut c = ModelConfig::from_json(CONFIG, Path::new("config.json")).expect("seed config");
    if c.apply_generation_config(text, Path::new("generation_config.json"))
        .is_ok()
    {
        assert!(c.eos_token_ids.contains(&2));
        pat_fuzz::check_config(&c);
    }
});
