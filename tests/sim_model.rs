//! The simulator's truth and what the policy sees: the predictor fitted to a profile sampled from
//! the component model, held out against the model itself; the node's accounting by hand.

use pat::policy::modeled::{Link, ModelShape};
use pat::policy::predictor::{validate_form, FitForm};
use pat::sim::{
    sampled_profile, ComponentModel, ComponentParams, GpuKind, ProfileTable, StepClock,
};

fn model(shape: ModelShape, per_seq_us: f64, link: Link) -> ComponentModel {
    let mut p = ComponentParams::defaults(GpuKind::H100, link);
    p.host_per_seq_us = per_seq_us;
    ComponentModel::new(shape.dims(), p).unwrap()
}

#[test]
fn host_max_predictor_holds_out_within_3_percent_on_modeled_profiles() {
    for shape in [ModelShape::Llama3_8b, ModelShape::Qwen3_14b] {
        for per_seq in [0.0, 20.0, 80.0] {
            for link in [Link::NvLink, Link::Pcie] {
                let prof = sampled_profile(&model(shape, per_seq, link), 8).unwrap();
                for seed in 0..3 {
                    let hm = validate_form(&prof, 0.2, seed, FitForm::HostMax).unwrap();
                    let lin = validate_form(&prof, 0.2, seed, FitForm::Abc).unwrap();
                    eprintln!(
                        "{shape} {per_seq} us {link:?} seed {seed}: host-max {:.2}% (worst tp {:.2}%), linear {:.2}%",
                        hm.overall_mape,
                        hm.mape_per_tp.values().fold(0.0f64, |a, &b| a.max(b)),
                        lin.overall_mape
                    );
                    assert!(hm.overall_mape <= 3.0, "{shape} {per_seq} {link:?}: {hm:?}");
                }
            }
        }
    }
}

#[test]
fn a_node_profile_composes_shard_steps_with_the_links_collectives() {
    use pat::policy::profile::DecodeSample;
    use pat::sim::compose::{compose_node, shard_of};
    let full = ModelShape::Llama3_8b.dims();
    let p = ComponentParams::defaults(GpuKind::H100, Link::NvLink);
    let shard = |k: usize, ms: f64| {
        let m = ComponentModel::new(shard_of(&full, k), p.clone()).unwrap();
        let mut prof = sampled_profile(&m, 1).unwrap();
        prof.decode = vec![DecodeSample {
            tp: 1,
            batch: 4,
            context: 1000,
            step_ms: ms,
            spread_ms: 0.1,
        }];
        prof
    };
    let node = compose_node(&[(1, shard(1, 7.0)), (8, shard(8, 3.0))], &full, 8, &p).unwrap();
    let at = |tp| node.decode.iter().find(|s| s.tp == tp).unwrap();
    // tp1: no collective. tp8: 2 x 32 all-reduces of 4 x 4096 x 2 B at 8 us + 80 GB/s, and a
    // logits all-gather of 4 x 128256 x 2 B at 150 GB/s: 0.538214 + 0.006840 ms.
    assert_eq!(at(1).step_ms, 7.0);
    let comm = 64.0 * (8e-3 + 4.0 * 4096.0 * 2.0 / 80e9 * 1e3) + 4.0 * 128256.0 * 2.0 / 150e9 * 1e3;
    assert!(
        (at(8).step_ms - 3.0 - comm).abs() < 1e-9,
        "{}",
        at(8).step_ms
    );
    assert_eq!(
        (at(8).batch, at(8).context, at(8).spread_ms),
        (4, 1000, 0.1)
    );
    assert_eq!(node.model, full);
    assert!(node.measured["decode"] && !node.measured["switch"]);
    // KV capacity per replica at memory fraction 0.5 of an H100's 80 GB: the bf16 weights are
    // 7,504,658,432 x 2 + 128256 x 4096 x 2 (untied embedding) = 16,059,990,016 B; a token's KV
    // is 2 x 32 layers x 8 kv heads x 128 x 2 B = 131,072 B at any tp. tp1: (40e9 - W) / 131072
    // = 182,647; tp8: (320e9 - W) / 131072 = 2,318,878.
    let cap: Vec<(usize, usize)> = node.kv_capacity_tokens.clone().into_iter().collect();
    assert_eq!(cap, vec![(1, 182_647), (8, 2_318_878)]);
    // The simulator's clock for this profile holds exactly that; a profile without capacities
    // (the engine profiler's) is unbounded.
    let table = ProfileTable::new(&node).unwrap();
    assert_eq!(table.kv_capacity_tokens(8), Some(2_318_878));
    assert_eq!(table.kv_capacity_tokens(2), None);
    let mut bare = node.clone();
    bare.kv_capacity_tokens.clear();
    assert_eq!(
        ProfileTable::new(&bare).unwrap().kv_capacity_tokens(1),
        None
    );
    // The capacities survive the profile file; a tp that does not divide the world is refused.
    let back = pat::policy::Profile::from_json(&node.to_json(), "node.json".as_ref()).unwrap();
    assert_eq!(back.kv_capacity_tokens, node.kv_capacity_tokens);
    let mut bad = node.clone();
    bad.kv_capacity_tokens.insert(3, 10);
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("kv_capacity_tokens names tp 3"), "{e}");
    // A shard of the wrong model, a tp that does not split the model, or one given twice: errors.
    let e = compose_node(&[(2, shard(4, 1.0))], &full, 8, &p).unwrap_err();
    assert!(e.to_string().contains("not the tp-2 shard"), "{e}");
    let e = compose_node(&[(3, shard(1, 1.0))], &full, 8, &p).unwrap_err();
    assert!(
        e.to_string().contains("tp 3 does not divide world (8)"),
        "{e}"
    );
    // Which of what tp must divide it misses: here the kv heads, not the world.
    let kv = full.num_kv_heads;
    let e = compose_node(&[(2 * kv, shard(1, 1.0))], &full, 2 * kv, &p).unwrap_err();
    let want = format!("tp {} does not divide the model's kv heads ({kv})", 2 * kv);
    assert!(e.to_string().contains(&want), "{e}");
    let e = compose_node(&[(1, shard(1, 1.0)), (1, shard(1, 1.0))], &full, 8, &p).unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
}

/// A profile whose numbers cannot be a measurement (a step longer than ten minutes, which sums
/// past f64 over a rollout; a negative spread; two samples of one point) is refused, naming
/// the sample, before a clock or a predictor is made of it.
#[test]
fn a_profile_with_impossible_samples_is_refused_naming_the_sample() {
    let good = sampled_profile(&model(ModelShape::Llama3_8b, 20.0, Link::NvLink), 8).unwrap();
    good.validate().unwrap();
    let edit = |f: &dyn Fn(&mut pat::policy::Profile)| {
        let mut p = good.clone();
        f(&mut p);
        p.validate().unwrap_err().to_string()
    };
    let e = edit(&|p| p.decode[3].step_ms = 1e308);
    assert!(
        e.contains("decode[3]") && e.contains("step_ms 1e308"),
        "{e}"
    );
    let e = edit(&|p| p.decode[0].step_ms = 600_001.0);
    assert!(e.contains("decode[0]") && e.contains("ten minutes"), "{e}");
    let e = edit(&|p| p.decode[2].spread_ms = -1.0);
    assert!(e.contains("decode[2]: `spread_ms`"), "{e}");
    let e = edit(&|p| p.decode[5].spread_ms = f64::NAN);
    assert!(e.contains("decode[5]: `spread_ms`"), "{e}");
    let e = edit(&|p| {
        let mut twin = p.decode[1];
        twin.step_ms *= 2.0;
        p.decode.push(twin);
    });
    let last = good.decode.len();
    assert!(
        e.contains(&format!("decode[1] and decode[{last}] are both")),
        "{e}"
    );
    let e = edit(&|p| p.switch.fixed_ms = 1e12);
    assert!(e.contains("`switch.fixed_ms`") && e.contains("1e12"), "{e}");
    // A tp's KV capacity given twice in the file: which one the node holds is not a guess.
    let text = serde_json::to_string_pretty(&good).unwrap();
    let path = std::path::Path::new("p.json");
    assert!(pat::policy::Profile::from_json(&text, path).is_ok());
    let twice = text.replacen(
        "\"kv_capacity_tokens\": {",
        "\"kv_capacity_tokens\": {\n    \"1\": 5,",
        1,
    );
    assert_ne!(twice, text);
    let e = pat::policy::Profile::from_json(&twice, path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("key `1` is given twice"), "{e}");
}

/// Cost-model constants in range one by one can still make an absurd node; both are refused
/// with the constant or the step named, before any run (a misc_us of 1e308 had surfaced as
/// "cannot fit 4 coefficients; profile more points").
#[test]
fn a_cost_model_past_any_real_node_is_refused_naming_why() {
    let dims = ModelShape::Llama3_8b.dims();
    let with = |f: &dyn Fn(&mut ComponentParams)| {
        let mut p = ComponentParams::defaults(GpuKind::H100, Link::NvLink);
        f(&mut p);
        ComponentModel::new(dims.clone(), p)
    };
    assert!(with(&|_| {}).is_ok());
    let e = with(&|p| p.misc_us = 1e308).unwrap_err().to_string();
    assert!(
        e.contains("`misc_us` must be a number from 0 to 1000000, got 1e308"),
        "{e}"
    );
    let e = with(&|p| p.host_step_ms = 1e7).unwrap_err().to_string();
    assert!(e.contains("`host_step_ms`"), "{e}");
    let e = with(&|p| p.sampling_kernels = 1e9).unwrap_err().to_string();
    assert!(e.contains("`sampling_kernels`"), "{e}");
    let e = with(&|p| p.hbm_bytes_per_s = 1e-3).unwrap_err().to_string();
    assert!(e.contains("more than ten minutes"), "{e}");
}

/// A node of `world` H100s for LLaMA-3.1-8B at 80 us host cost per sequence, its sampled
/// predictor and switch cost, and the simulation knobs of the wide-node tests.
fn wide_node(
    world: usize,
) -> (
    ComponentModel,
    pat::policy::predictor::Predictor,
    pat::policy::decide::SwitchCost,
    pat::sim::SimConfig,
) {
    let m = model(ModelShape::Llama3_8b, 80.0, Link::NvLink);
    let prof = sampled_profile(&m, world).unwrap();
    let predictor = pat::policy::predictor::Predictor::from_profile(&prof).unwrap();
    let switch = pat::policy::decide::SwitchCost::from_profile(&prof);
    let cfg = pat::sim::SimConfig {
        world,
        candidates: vec![1, 2, 4, 8],
        check_every: 64,
        margin: 0.05,
        min_gain_ms: 0.0,
        start_tp: None,
        placement: pat::sim::Placement::Chunks,
        optimum: false,
        optimum_on_estimates: false,
        lockstep: false,
        lengths_from: None,
    };
    (m, predictor, switch, cfg)
}

/// A GRPO batch of `prompts` x 8 responses (rho 0.5, cap 24576, PAT's at-cap fraction).
fn grpo_batch(prompts: usize, seed: u64) -> pat::policy::trace::Trace {
    pat::policy::grpo::grpo(&pat::policy::grpo::GrpoSpec {
        prompts,
        group_size: 8,
        cap: 24576,
        rho: 0.5,
        at_cap: pat::policy::trace::DEEPSCALER_AT_CAP,
        seed,
    })
    .unwrap()
}

/// On a wide node (64 GPUs, 512 GRPO responses, host 80 us per sequence) every switch re-places
/// the live sequences balanced on their estimates, so each forecast sees the layout it would
/// leave as unbalanced and the one it would enter as balanced: the rule went TP4 -> 8 -> 4 -> 8,
/// paying a switch each time. Going back to the layout the last switch left must clear twice
/// the margin (`Controller::decide`).
#[test]
fn the_adaptive_rule_does_not_oscillate_on_a_wide_node() {
    use pat::sim::{simulate, PolicyKind, SimModel};
    let (m, predictor, switch, cfg) = wide_node(64);
    let sim = SimModel {
        clock: &m,
        predictor: &predictor,
        switch: &switch,
    };
    let trace = grpo_batch(64, 1);
    let r = simulate(&trace, &sim, &cfg, PolicyKind::Adaptive, 8).unwrap();
    let path: Vec<(usize, usize)> = r.switches.iter().map(|s| (s.from, s.to)).collect();
    for w in path.windows(2) {
        assert_ne!(w[1].1, w[0].0, "switched back and forth: {path:?}");
    }
    let tp8 = simulate(&trace, &sim, &cfg, PolicyKind::Static(8), 8).unwrap();
    assert!(
        r.total_ms < tp8.total_ms,
        "{} vs tp8 {}",
        r.total_ms,
        tp8.total_ms
    );
}

/// The optimum @est row searches schedules with every switch placing the live sequences where
/// the adaptive rule would: replaying the adaptive run's own schedule that way must repeat it to
/// the bit (the two place alike: same estimates, same GRPO siblings), while the optimum's
/// placement on the true lengths, which no engine knows, finishes sooner on a node of many
/// replicas (32 GPUs, 256 responses: TP8 leaves 4 replicas to balance).
#[test]
fn a_replay_placed_on_estimates_repeats_the_adaptive_run() {
    use pat::sim::{empirical, optimum, simulate, PolicyKind, SimModel};
    let (m, predictor, switch, cfg) = wide_node(32);
    let sim = SimModel {
        clock: &m,
        predictor: &predictor,
        switch: &switch,
    };
    let trace = grpo_batch(32, 0);
    let r = simulate(&trace, &sim, &cfg, PolicyKind::Adaptive, 8).unwrap();
    assert!(!r.switches.is_empty(), "no switch to replay");
    let est = empirical(&trace).unwrap();
    let again = optimum::replay_ms(&trace, &sim, &cfg, &r, Some(&est)).unwrap();
    assert_eq!(again, r.total_ms, "switches {:?}", r.switches);
    let on_truth = optimum::replay_ms(&trace, &sim, &cfg, &r, None).unwrap();
    assert!(
        on_truth < r.total_ms,
        "placed on the true lengths {on_truth} ms, on estimates {} ms",
        r.total_ms
    );
}
