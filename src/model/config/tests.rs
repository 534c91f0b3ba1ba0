use super::*;

fn llama_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 301, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        "bos_token_id": 1, "eos_token_id": [2, 7], "tie_word_embeddings": false
    })
}

fn parse(v: &serde_json::Value) -> Result<ModelConfig> {
    ModelConfig::from_json(&v.to_string(), Path::new("config.json"))
}

#[test]
fn both_rope_styles_parse_to_the_same_config() {
    let a = parse(&llama_json()).unwrap();
    let mut v = llama_json();
    let o = v.as_object_mut().unwrap();
    let mut rp = o.remove("rope_scaling").unwrap();
    rp["rope_theta"] = o.remove("rope_theta").unwrap();
    o.insert("rope_parameters".into(), rp);
    let b = parse(&v).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.head_dim, 8);
    assert_eq!(a.eos_token_ids, vec![2, 7]);
    assert!(a.rope_scaling.is_some());
}

#[test]
fn llama3_scaling_matches_hand_computed_bands() {
    let c = parse(&llama_json()).unwrap();
    let plain = ModelConfig {
        rope_scaling: None,
        ..c.clone()
    };
    let (s, p) = (c.inv_freq(), plain.inv_freq());
    // head_dim 8: base freqs 1, theta^-0.25, theta^-0.5, theta^-0.75.
    // wavelengths 6.28 (< 8 = high band: unchanged), 168 and 4443 and 1.2e5 (> 32: divided by 8).
    assert_eq!(s[0], p[0]);
    for i in 1..4 {
        assert!((s[i] - p[i] / 8.0).abs() <= 1e-12 + p[i] * 1e-6, "dim {i}");
    }
}

#[test]
fn refusals_name_the_field() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "architectures",
            serde_json::json!(["MistralForCausalLM"]),
            "architectures",
        ),
        ("attention_bias", serde_json::json!(true), "attention_bias"),
        (
            "use_sliding_window",
            serde_json::json!(true),
            "use_sliding_window",
        ),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "rope_type",
        ),
        (
            "rope_scaling",
            serde_json::json!({"factor": 8.0, "low_freq_factor": 1.0}),
            "neither `rope_type` nor `type`",
        ),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": 3, "factor": 8.0}),
            "must be a string",
        ),
        (
            "rope_scaling",
            serde_json::json!({"type": "yarn", "factor": 4.0}),
            "yarn",
        ),
        ("hidden_size", serde_json::json!(-3), "hidden_size"),
        (
            "num_key_value_heads",
            serde_json::json!(3),
            "num_key_value_heads",
        ),
        (
            "eos_token_id",
            serde_json::json!(999),
            "outside the vocabulary",
        ),
    ];
    for (key, val, needle) in cases {
        let mut v = llama_json();
        v[key] = val;
        let msg = parse(&v).unwrap_err().to_string();
        assert!(msg.contains(needle), "{key}: {msg}");
    }
    let mut v = llama_json();
    v.as_object_mut().unwrap().remove("vocab_size");
    assert!(parse(&v).unwrap_err().to_string().contains("vocab_size"));
    assert!(ModelConfig::from_json("{not json", Path::new("x")).is_err());
}
