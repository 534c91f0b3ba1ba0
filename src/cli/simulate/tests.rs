use super::*;

fn args(trace: PathBuf) -> SimulateArgs {
    SimulateArgs {
        trace: Some(trace),
        profile: None,
        world: 8,
        link: None,
        model_shape: None,
        gpu: None,
        cap: None,
        per_seq_us: None,
        mem_fraction: None,
        cost_model: None,
        placement: PlacementArg::Chunks,
        check_every: 64,
        margin: 0.05,
        min_gain_ms: 0.0,
        switch_fixed_ms: None,
        start_tp: None,
        no_optimum: false,
        optimum_on_estimates: false,
        lengths_from: None,
        svg: None,
        json: false,
        calibration: false,
    }
}

fn straggler_trace(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("t.jsonl");
    let t = pat::policy::trace::one_straggler(16, 100, 2000).unwrap();
    std::fs::write(&p, t.to_jsonl()).unwrap();
    p
}

#[test]
fn modeled_run_says_so_and_writes_svg() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(straggler_trace(dir.path()));
    let rep = report(&a).unwrap();
    // tp 1, 2, 4, 8, PAT at 5.52 s and at ours, adaptive, oracle rule, optimum
    assert_eq!(rep.rows.len(), 9);
    let table = rep.table();
    assert!(
        table.contains("MODELED") && table.contains("static tp8") && table.contains("optimum"),
        "{table}"
    );
    assert!(rep.to_json().contains("\"vs_best_static_pct\""));
    assert!(!table.contains("optimum @est"), "{table}");
    assert!(
        table.contains("the optimum is the best schedule found"),
        "{table}"
    );
    a.svg = Some(dir.path().join("c.svg"));
    run(a).unwrap();
    let svg = std::fs::read_to_string(dir.path().join("c.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
}

/// `--optimum-on-estimates` adds a row that replays the schedules of the rules that placed on
/// the same estimates: never behind adaptive or PAT at this node's cost, and the optimum never
/// behind it; the legend says what it is; it makes no sense without the optimum.
#[test]
fn the_optimum_placed_on_estimates_is_a_row_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(straggler_trace(dir.path()));
    a.optimum_on_estimates = true;
    let rep = report(&a).unwrap();
    assert_eq!(rep.rows.len(), 10);
    let total = |p: &str| {
        rep.rows
            .iter()
            .find(|r| r.result.policy == p)
            .unwrap_or_else(|| panic!("no {p}"))
            .result
            .total_ms
    };
    for p in ["adaptive", "PAT @ours"] {
        assert!(total("optimum @est") <= total(p), "{p}");
    }
    // The optimum meets the @est row's schedule too: never behind it.
    assert!(total("optimum") <= total("optimum @est"));
    assert!(rep.table().contains("optimum @est is the same search"));
    // The table splits adaptive's distance to the optimum into schedule and placement, each in
    // % of the optimum's total (so the parts add up to the whole).
    let (ad, est, opt) = (total("adaptive"), total("optimum @est"), total("optimum"));
    let part = |x: f64, y: f64| format!("{:+.2} s ({:+.2}%)", (x - y) / 1e3, 100.0 * (x - y) / opt);
    let want = format!(
        "adaptive against the optimum: {}, of which {} is its schedule",
        part(ad, opt),
        part(ad, est)
    );
    assert!(rep.table().contains(&want), "{want}\n{}", rep.table());
    assert!(rep
        .table()
        .contains(&format!("and {} the optimum's placement", part(est, opt))));
    let e = crate::cli::command()
        .try_get_matches_from(["pat", "simulate", "--optimum-on-estimates", "--no-optimum"])
        .unwrap_err();
    assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
}

/// `--lengths-from`: the rules that estimate learn from another rollout's lengths. From the
/// batch's own file they estimate exactly as by default (the same distribution and cap); from
/// a rollout whose responses all ran 2000 tokens the adaptive rule decides otherwise, while the
/// static layouts and the oracle rule (which never estimate) stay as they were.
#[test]
fn the_estimator_learns_from_the_lengths_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("grpo.jsonl");
    let spec = pat::policy::grpo::GrpoSpec {
        prompts: 16,
        group_size: 8,
        cap: 24576,
        rho: 0.5,
        at_cap: pat::policy::trace::DEEPSCALER_AT_CAP,
        seed: 0,
    };
    std::fs::write(&trace, pat::policy::grpo::grpo(&spec).unwrap().to_jsonl()).unwrap();
    let mut a = args(trace.clone());
    a.no_optimum = true;
    a.per_seq_us = Some(80.0);
    let base = report(&a).unwrap();
    let totals = |r: &SimReport| -> Vec<(String, f64)> {
        r.rows
            .iter()
            .map(|w| (w.result.policy.clone(), w.result.total_ms))
            .collect()
    };
    a.lengths_from = Some(trace);
    let same = report(&a).unwrap();
    assert_eq!(totals(&same), totals(&base));
    assert!(same.table().contains("(out of sample)"));
    assert!(base.table().contains("(in-sample)"));
    // No optimum row, so no word of one in the notes.
    assert!(!base.table().contains("optimum"), "{}", base.table());
    let long = dir.path().join("long.jsonl");
    let flat = pat::policy::trace::one_straggler(64, 2000, 2000).unwrap();
    std::fs::write(&long, flat.to_jsonl()).unwrap();
    a.lengths_from = Some(long.clone());
    let other = report(&a).unwrap();
    assert!(other
        .table()
        .contains(&format!("the 64 response lengths of {}", long.display())));
    for ((p, t), (q, u)) in totals(&base).iter().zip(totals(&other)) {
        assert_eq!(p, &q);
        if !(p == "adaptive" || p.starts_with("PAT")) {
            assert_eq!(*t, u, "{p}");
        }
    }
    let adaptive = |r: &SimReport| totals(r).into_iter().find(|x| x.0 == "adaptive").unwrap().1;
    assert_ne!(adaptive(&other), adaptive(&base));
    // A response of that rollout over --cap is refused, naming the file and line.
    a.cap = Some(24576);
    std::fs::write(&long, "{\"prompt_len\":9,\"response_len\":30000}\n").unwrap();
    let e = report(&a).unwrap_err().to_string();
    assert!(
        e.contains("long.jsonl:1: request 0: `response_len` 30000 is longer than --cap 24576"),
        "{e}"
    );
    a.trace = Some("-".into());
    a.lengths_from = Some("-".into());
    let e = checks::check_flags(&a).unwrap_err();
    assert!(matches!(e, Error::Usage(_)), "{e}");
    assert!(
        e.to_string().contains("cannot both read standard input"),
        "{e}"
    );
}

/// A profile without a prefill rate at some candidate tp: the rate is interpolated, and the
/// report says so, naming the tps.
#[test]
fn a_prefill_rate_the_profile_lacks_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let trace = straggler_trace(dir.path());
    let m = component_model(&args(trace.clone())).unwrap();
    let mut prof = sampled_profile(&m, 8).unwrap();
    prof.prefill.retain(|p| p.tp == 1 || p.tp == 8);
    let path = dir.path().join("p.json");
    prof.save(&path).unwrap();
    let mut a = args(trace);
    a.profile = Some(path);
    a.no_optimum = true;
    let table = report(&a).unwrap().table();
    assert!(
        table.contains("INTERPOLATED: the profile has no prefill rate at tp 2, 4;"),
        "{table}"
    );
}

#[test]
fn profile_file_is_checked_against_shape_and_world() {
    let dir = tempfile::tempdir().unwrap();
    let trace = straggler_trace(dir.path());
    let prof = dir.path().join("p.json");
    let m = component_model(&args(trace.clone())).unwrap();
    sampled_profile(&m, 8).unwrap().save(&prof).unwrap();
    let mut a = args(trace);
    a.profile = Some(prof);
    a.no_optimum = true;
    assert!(report(&a).unwrap().table().contains("p.json"));
    a.model_shape = Some(ModelShape::Qwen3_14b);
    let e = report(&a).unwrap_err().to_string();
    assert!(e.contains("model.arch"), "{e}");
    a.model_shape = None;
    a.world = 4;
    assert!(report(&a).unwrap_err().to_string().contains("world"));
    a.world = 8;
    a.link = Some(Link::Pcie);
    assert!(report(&a).unwrap_err().to_string().contains("--link"));
    a.link = None;
    // The margin is checked as the flag is read.
    let e = crate::cli::command()
        .try_get_matches_from(["pat", "simulate", "--margin", "1.5"])
        .unwrap_err();
    assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
    assert!(e.to_string().contains("--margin"), "{e}");
}

#[test]
fn absurd_worlds_and_lengths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(straggler_trace(dir.path()));
    a.world = 1 << 40;
    let e = report(&a).unwrap_err().to_string();
    assert!(e.contains("--world"), "{e}");
    let long = dir.path().join("long.jsonl");
    std::fs::write(&long, "{\"prompt_len\":100,\"response_len\":40900}\n").unwrap();
    let mut a = args(long);
    a.model_shape = Some(ModelShape::Qwen3_14b);
    let e = report(&a).unwrap_err().to_string();
    // The one request is request 0, on line 1 of the file.
    assert!(
        e.contains("40960") && e.contains("long.jsonl:1: request 0: `prompt_len` 100"),
        "{e}"
    );
}

#[test]
fn the_node_named_is_the_node_modeled() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(straggler_trace(dir.path()));
    // A40 nodes are PCIe (the NVLink bridge joins two cards), unless --link says otherwise.
    a.gpu = Some(Gpu::A40);
    let m = component_model(&a).unwrap();
    assert_eq!(m.p.link_bytes_per_s, 0.8 * Link::Pcie.bytes_per_s());
    assert!(m.describe().contains("A40, PCIe"), "{}", m.describe());
    a.link = Some(Link::NvLink);
    assert!(component_model(&a)
        .unwrap()
        .describe()
        .contains("A40, NVLink"));
    // Overridden constants are named wherever the node is.
    a.gpu = None;
    a.link = None;
    let cm = dir.path().join("cm.json");
    std::fs::write(
        &cm,
        r#"{"link_bytes_per_s": 1e9, "allreduce": [{"tp": 2, "latency_us": 9, "algbw_gbps": 1}]}"#,
    )
    .unwrap();
    a.cost_model = Some(cm);
    let d = component_model(&a).unwrap().describe();
    assert!(
        d.contains("overridden by --cost-model")
            && d.contains("link_bytes_per_s 1")
            && d.contains("allreduce (a table)"),
        "{d}"
    );
}

#[test]
fn calibration_table_lists_every_public_point() {
    let t = calibration_table();
    assert_eq!(t.matches("%  ").count(), CALIBRATION.len(), "{t}");
}
