use super::*;
use safetensors::SafeTensors;

fn opts(arch: Arch, dtype: Dtype, seed: u64) -> InitOptions {
    let preset = Preset::Tiny;
    InitOptions {
        arch,
        preset,
        seed,
        dtype,
        force: false,
        shard: 1,
    }
}

fn all_tiny() -> impl Iterator<Item = InitOptions> {
    [Arch::Llama, Arch::Qwen3]
        .into_iter()
        .flat_map(|a| Dtype::ALL.map(|d| opts(a, d, 7)))
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).expect("read")).expect("json")
}

#[test]
fn tiny_dirs_have_expected_files_tensors_and_config() {
    for o in all_tiny() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("new/model");
        let written = init_model(&out, &o).expect("init");
        let ls = std::fs::read_dir(&out).expect("ls");
        let mut files: Vec<_> = ls.map(|e| e.expect("entry").file_name()).collect();
        files.sort();
        let want = "config.json generation_config.json model.safetensors tokenizer.json";
        assert_eq!(files, want.split(' ').collect::<Vec<_>>());

        let d = preset_dims(o.arch, o.preset);
        let bytes = std::fs::read(out.join("model.safetensors")).expect("read");
        let st = SafeTensors::deserialize(&bytes).expect("parse");
        let expected = tensors(&o, &d);
        assert_eq!(st.len(), expected.len());
        let mut total = 0;
        for (name, t) in &expected {
            let v = st.tensor(name).expect("tensor present");
            assert_eq!((v.shape(), v.dtype()), (&t.shape[..], info(o.dtype).1));
            total += v.data().len() as u64;
        }
        assert_eq!(total, written);
        let has = |s: &str| st.names().iter().any(|n| n.contains(s));
        assert_eq!(
            has("lm_head.weight"),
            o.arch == Arch::Llama,
            "tied qwen3 has no lm_head"
        );
        assert_eq!(has("layers.1.self_attn.k_norm"), o.arch == Arch::Qwen3);
        let q = st
            .tensor("model.layers.1.self_attn.q_proj.weight")
            .expect("q");
        assert_eq!(q.shape(), [8 * d.dims.head_dim, 64]);

        let tok = Tokenizer::load(&out.join("tokenizer.json")).expect("tokenizer");
        assert_eq!(tok.vocab_size(), d.dims.vocab_size);
        let cfg = crate::model::config::ModelConfig::load(&out).expect("config parses");
        assert_eq!(
            (cfg.vocab_size, cfg.head_dim),
            (d.dims.vocab_size, d.dims.head_dim)
        );

        let c = read_json(&out.join("config.json"));
        let keys = "architectures model_type vocab_size hidden_size intermediate_size \
            num_hidden_layers num_attention_heads num_key_value_heads head_dim hidden_act \
            rms_norm_eps rope_theta rope_scaling max_position_embeddings tie_word_embeddings \
            attention_bias bos_token_id eos_token_id torch_dtype initializer_range";
        for key in keys.split_whitespace() {
            assert!(c.get(key).is_some(), "{key} missing for {o:?}");
        }
        assert_eq!(c["torch_dtype"], info(o.dtype).2);
        assert_eq!(c["tie_word_embeddings"], o.arch == Arch::Qwen3);
        if o.arch == Arch::Llama {
            assert_eq!(c["architectures"], json!(["LlamaForCausalLM"]));
            assert_eq!(c["rope_scaling"]["rope_type"], "llama3");
            assert_eq!(c["rope_scaling"]["original_max_position_embeddings"], 64);
            assert_eq!(
                (&c["mlp_bias"], &c["rms_norm_eps"]),
                (&json!(false), &json!(1e-5))
            );
        } else {
            assert_eq!(c["architectures"], json!(["Qwen3ForCausalLM"]));
            assert!(c["rope_scaling"].is_null() && c["sliding_window"].is_null());
            assert_eq!(c["use_sliding_window"], false);
        }
        let g = read_json(&out.join("generation_config.json"));
        assert_eq!(
            g,
            json!({"bos_token_id": 1, "eos_token_id": 2, "do_sample": false})
        );
    }
}

#[test]
fn same_seed_same_bytes_different_seed_differs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |name: &str, seed| {
        let out = dir.path().join(name);
        init_model(&out, &opts(Arch::Qwen3, Dtype::Bf16, seed)).expect("init");
        std::fs::read(out.join("model.safetensors")).expect("read")
    };
    let (a, b, c) = (run("a", 1), run("b", 1), run("c", 2));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.len(), c.len());
}

#[test]
fn generation_is_independent_of_thread_count() {
    let o = opts(Arch::Llama, Dtype::F32, 3);
    let shape = vec![5, CHUNK / 2 + 3];
    let (_, t) = LazyTensor::new("x", shape.clone(), Init::Embedding, o.seed, o.dtype);
    let one = t.generate(1);
    assert_eq!(one.len(), t.data_len());
    assert_eq!(one, t.generate(2));
    assert_eq!(one, t.generate(7));
    let (_, other) = LazyTensor::new("y", shape, Init::Embedding, o.seed, o.dtype);
    assert_ne!(one, other.generate(1));
}

#[test]
fn value_statistics_match_the_init_rule() {
    let o = opts(Arch::Llama, Dtype::F32, 11);
    let lin = Init::Linear { fan_in: 256 };
    for (init, mean, std) in [
        (Init::Embedding, 0.0, 1.0),
        (lin, 0.0, 0.0625),
        (Init::Norm, 1.0, 0.1),
    ] {
        let (_, t) = LazyTensor::new("w", vec![256, 256], init, o.seed, o.dtype);
        let bytes = t.generate(2);
        let v: Vec<f64> = bytes
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect();
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let s = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!((m - mean).abs() < 0.02 * std, "{init:?} mean {m}");
        assert!((s / std - 1.0).abs() < 0.02, "{init:?} std {s}");
    }
}

#[test]
fn non_empty_dir_needs_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keep = dir.path().join("keep.txt");
    std::fs::write(&keep, "x").expect("write");
    let mut o = opts(Arch::Llama, Dtype::F32, 0);
    let e = init_model(dir.path(), &o)
        .expect_err("must refuse")
        .to_string();
    assert!(e.contains(&dir.path().display().to_string()), "{e}");
    assert!(!dir.path().join("config.json").exists());
    o.force = true;
    init_model(dir.path(), &o).expect("forced");
    init_model(dir.path(), &o).expect("forced again");
    assert!(keep.exists());
    let mut ls = std::fs::read_dir(dir.path()).expect("ls");
    assert!(!ls.any(|e| e
        .expect("entry")
        .path()
        .extension()
        .is_some_and(|x| x == "tmp")));
    assert!(init_model(&keep, &o).is_err(), "a file is not a directory");
}

#[test]
fn preset_dims_are_the_real_models() {
    let l = preset_dims(Arch::Llama, Preset::Llama3_8bShape);
    let o = opts(Arch::Llama, Dtype::Bf16, 0);
    let n: usize = tensors(&o, &l).iter().map(|(_, t)| t.numel()).sum();
    assert_eq!(n, 8_030_261_248, "LLaMA-3.1-8B parameter count");
    let q = preset_dims(Arch::Qwen3, Preset::Llama3_8bShape);
    let o = opts(Arch::Qwen3, Dtype::Bf16, 0);
    let n: usize = tensors(&o, &q).iter().map(|(_, t)| t.numel()).sum();
    assert_eq!(n, 14_768_307_200, "Qwen3-14B parameter count");
    assert!(
        !q.dims.tie_word_embeddings && q.rope_theta == 1e6 && q.max_position_embeddings == 40_960
    );
}

#[test]
fn a_shard_is_the_tp_slice_of_every_split_dimension() {
    let full = preset_dims(Arch::Llama, Preset::Llama3_8bShape);
    let s = shard_dims(full.clone(), 8).unwrap();
    assert_eq!(
        (
            s.dims.num_heads,
            s.dims.num_kv_heads,
            s.dims.intermediate_size,
            s.dims.vocab_size
        ),
        (4, 1, 1792, 16032)
    );
    assert_eq!(
        (s.dims.hidden_size, s.dims.head_dim, s.dims.num_layers),
        (4096, 128, 32)
    );
    let e = shard_dims(full.clone(), 3).unwrap_err().to_string();
    assert!(
        e.contains("`shard` 3") && e.contains("attention heads"),
        "{e}"
    );
    assert!(shard_dims(full, 0).is_err());
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(Arch::Llama, Dtype::F32, 0);
    o.preset = Preset::Small;
    o.shard = 2;
    init_model(dir.path(), &o).unwrap();
    let cfg = crate::model::config::ModelConfig::load(dir.path()).unwrap();
    assert_eq!(
        (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size),
        (4, 2, 1024)
    );
}

#[test]
fn a_shard_too_small_for_the_tokenizer_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d");
    let mut o = opts(Arch::Llama, Dtype::F32, 0);
    o.shard = 2;
    let e = init_model(&out, &o).unwrap_err().to_string();
    assert_eq!(
        e,
        "`shard` 2 with preset tiny: the shard's vocab is 320/2 = 160, below the 259 tokens of \
         the byte-level tokenizer (3 specials + 256 bytes); use a smaller `shard` or a larger preset"
    );
    assert!(!out.exists());
}

#[test]
fn a_failed_run_takes_back_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(Arch::Llama, Dtype::F32, 0);
    let fail_at = |name: &'static str, out: &Path| {
        FAIL_WRITING.with(|f| f.set(Some(name)));
        let r = init_model(out, &o);
        FAIL_WRITING.with(|f| f.set(None));
        r.expect_err("injected failure").to_string()
    };
    // Directories this run created go, up to the first that existed.
    let out = dir.path().join("new/model");
    let e = fail_at("generation_config.json", &out);
    assert!(e.contains("generation_config.json.tmp"), "{e}");
    assert!(!dir.path().join("new").exists());
    // An existing empty directory stays, empty.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fail_at("config.json", &empty);
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    // --force into a directory: its other files stay.
    let keep = empty.join("keep.txt");
    std::fs::write(&keep, "x").unwrap();
    let forced = InitOptions { force: true, ..o };
    FAIL_WRITING.with(|f| f.set(Some("tokenizer.json")));
    let r = init_model(&empty, &forced);
    FAIL_WRITING.with(|f| f.set(None));
    assert!(r.is_err());
    let names: Vec<_> = std::fs::read_dir(&empty)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["keep.txt"]);
    init_model(&out, &o).expect("a rerun works");
}
