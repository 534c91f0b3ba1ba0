//! The whole engine on GPU ranks: goldens through switch ladders side by side with the CPU
//! engine (switching on the devices and through the host), failed GPU switches that lose
//! nothing (both ways), and bf16 switches on the devices bitwise equal to the host path's.

use super::*;

/// The whole engine on GPU ranks (`Backend::Cuda`, what `--backend cuda` runs): the golden prompts
/// in one batch, greedy, at (world, tp) = (1,1), (2,1), (2,2), (4,2), (4,4), every rank on GPU 0.
/// Tokens identical to transformers; every step's logits within 1e-4 of the CPU engine's (the
/// oracle) run side by side, through a ladder of live switches made on both engines (every other
/// step; migrate, recompute and auto in turn), each way a GPU switch runs: on the devices (the
/// per-rank programs on each rank's own buffers with the reshard kernels, bytes across ranks by
/// same-device copies) and through the host (the CPU's programs on host copies). Both must land
/// on the same layout and keep the same logits as the CPU. A switch back to a replica seen
/// before (the same ranks in the same tp order) reuses its device group; a switch on the devices
/// makes the world group once and reuses it.
///
/// `spread` puts rank r on GPU r (one rank per GPU: the replicas' groups are NCCL
/// communicators, and a switch on the devices exchanges through NCCL) instead of every rank on
/// GPU 0 (same-device groups and copies); a world larger than the GPUs present is skipped,
/// visibly, with "needs N GPUs".
/// The golden prompts on GPU ranks through a ladder of live switches (migrate, recompute, auto),
/// every step's logits against the CPU engine's and the tokens against transformers'. With
/// `chunk`, each step prefills at most that many prompt tokens (on both engines), so the
/// switches come while prompts are part way in, in chunks (two layouts, one each way of
/// switching).
fn check_engine(name: &'static str, spread: bool, chunk: Option<usize>) {
    let test = format!("{name}_engine_on_gpu{}", if spread { "s" } else { "" });
    let Some(m) = Model::open_or_skip(name, &test) else {
        return;
    };
    let gpus = pat::backend::cuda::probe().unwrap_or(0);
    let reqs = golden_requests(&m.gold, m.max_new);
    let runs = [(1, 1), (2, 1), (2, 2), (4, 2), (4, 4)]
        .into_iter()
        .flat_map(|wt| [(wt, GpuSwitch::Device), (wt, GpuSwitch::Host)])
        .filter(|&(wt, how)| {
            chunk.is_none()
                || (wt, how) == ((4, 2), GpuSwitch::Device)
                || (wt, how) == ((2, 1), GpuSwitch::Host)
        });
    for ((world, tp), how) in runs {
        let at = format!(
            "{name} engine world {world} tp {tp} switching {}, chunks {chunk:?}",
            how.name()
        );
        let opts = EngineOptions {
            world,
            tp,
            block_size: BS,
            // Room for the weight shards to grow when tp shrinks during the ladder.
            kv_blocks: 1024,
            dtype: Dtype::F32,
            sampling: SamplingParams::default(),
        };
        if spread && world > gpus {
            pat::backend::cuda::testing::skip_notice(
                &test,
                &format!("world {world}: needs {world} GPUs, found {gpus}"),
            );
            continue;
        }
        let devices = if spread {
            (0..world).collect()
        } else {
            vec![0; world]
        };
        let backend = Backend::Cuda {
            devices: Some(devices),
            switch: how,
        };
        let mut gpu = Engine::with_backend(m.cfg.clone(), &m.ck, opts.clone(), &backend)
            .unwrap_or_else(|e| panic!("{at}: {e}"));
        assert_eq!(gpu.backend(), "cuda");
        let mut cpu = Engine::new(m.cfg.clone(), &m.ck, opts).unwrap();
        for e in [&mut gpu, &mut cpu] {
            e.record_logits(true);
            e.cap_step_tokens(chunk);
            e.add_requests(&reqs).unwrap();
        }
        let mut step = 0;
        // The replicas (physical ranks in tp order: a switch's nested placement permutes them)
        // the GPU ranks have run as: their device groups exist from then on.
        let replicas = |e: &Engine| -> Vec<Vec<usize>> {
            let l = e.layout();
            (0..l.dp()).map(|d| l.replica_ranks(d).to_vec()).collect()
        };
        let mut seen = replicas(&gpu);
        let mut switches = 0;
        while gpu.live() > 0 {
            let r = gpu
                .step()
                .unwrap_or_else(|e| panic!("{at} step {step}: {e}"));
            let c = cpu.step().unwrap();
            assert_eq!(
                (r.prefill_tokens, r.tokens_out),
                (c.prefill_tokens, c.tokens_out),
                "{at} step {step}: prompt tokens fed, tokens sampled"
            );
            if let Some(n) = chunk {
                assert!(r.prefill_tokens <= n, "{at} step {step}: {r:?}");
            }
            let (g, c) = (gpu.recorded_logits(), cpu.recorded_logits());
            assert_eq!(g.len(), c.len(), "{at} step {step}: sequences sampled");
            for ((gi, gl), (ci, cl)) in g.iter().zip(c) {
                assert_eq!(gi, ci, "{at} step {step}: sequence order");
                let err = rel_err(gl, cl);
                assert!(
                    err < 1e-4,
                    "{at} step {step} seq {gi}: logits off by {err:e}"
                );
            }
            // The ladder: from tp, every other step to the next degree dividing world.
            let ladder: Vec<usize> = [1, 2, 4, 1, 2, 4]
                .into_iter()
                .filter(|&t| world % t == 0)
                .collect();
            if world > 1 && step % 2 == 1 && step / 2 < ladder.len() {
                let to = ladder[step / 2];
                let policy = [KvPolicy::Migrate, KvPolicy::Recompute, KvPolicy::Auto][step / 2 % 3];
                let cost = test_cost();
                if to != gpu.layout().tp && gpu.live() > 0 {
                    let g = gpu
                        .reconfigure(to, policy, &cost)
                        .unwrap_or_else(|e| panic!("{at} step {step}: GPU switch to tp {to}: {e}"));
                    let c = cpu.reconfigure(to, policy, &cost).unwrap();
                    assert_eq!(
                        (g.to_tp, g.n_migrated, g.n_recomputed),
                        (c.to_tp, c.n_migrated, c.n_recomputed)
                    );
                    assert_eq!(gpu.layout().tp, to, "{at} step {step}");
                    // One device group per replica: made at the first visit to that replica,
                    // reused by every later one; on the devices, plus the world group (made by
                    // the first switch, reused by the others).
                    let mut want = (0, 0);
                    for r in replicas(&gpu) {
                        if seen.contains(&r) {
                            want.1 += 1;
                        } else {
                            want.0 += 1;
                            seen.push(r);
                        }
                    }
                    if how == GpuSwitch::Device {
                        if switches == 0 {
                            want.0 += 1;
                        } else {
                            want.1 += 1;
                        }
                    }
                    switches += 1;
                    assert_eq!(
                        (g.groups_created, g.groups_reused),
                        want,
                        "{at} step {step}: device groups made, reused at tp {to}"
                    );
                    eprintln!(
                        "{at} step {step}: switched to tp {to} ({policy:?}) in {:.1} ms",
                        g.total_ms
                    );
                }
            }
            step += 1;
        }
        let outs = gpu.outputs();
        assert_eq!(outs.len(), m.gold.len(), "{at}: finished requests");
        for (o, g) in outs.iter().zip(&m.gold) {
            assert_eq!(
                o.output_ids, g.output_ids,
                "{at} prompt {}: greedy tokens differ from transformers",
                o.index
            );
        }
        let (w, kv) = gpu.rank_bytes(0);
        eprintln!(
            "{at}: ok; rank 0 holds {w} weight bytes and {kv} KV bytes; {}",
            gpu.describe_ranks()
        );
    }
}

#[test]
fn llama_engine_on_gpu_ranks_matches_transformers_and_the_cpu_engine() {
    check_engine("llama", false, None);
}

#[test]
fn qwen3_engine_on_gpu_ranks_matches_transformers_and_the_cpu_engine() {
    check_engine("qwen3", false, None);
}

/// As above with prompts fed in chunks of 5 tokens: the switches come while prompts are part
/// way in (their KV migrated or computed again up to where it was).
#[test]
fn qwen3_engine_on_gpu_ranks_prefilling_in_chunks_matches_transformers_through_switches() {
    check_engine("qwen3", false, Some(5));
}

/// As above with one rank per GPU: NCCL groups, and switches on the devices through NCCL.
#[test]
fn llama_engine_with_one_rank_per_gpu_matches_transformers_and_the_cpu_engine() {
    check_engine("llama", true, None);
}

/// A GPU switch that fails in any phase on any rank loses nothing: before the swap the old
/// layout keeps decoding; a recompute failure comes after it (the new layout decodes, the
/// failed sequences are re-prefilled on the next step). Then the engine still switches and every
/// token equals transformers'.
#[test]
fn a_failed_gpu_switch_in_any_phase_on_any_rank_loses_nothing() {
    let Some(m) = Model::open_or_skip("qwen3", "a_failed_gpu_switch") else {
        return;
    };
    failed_switches(&m, vec![0; 4]);
}

/// As above with one rank per GPU (4 GPUs): the groups are NCCL communicators, and no rank may
/// be left waiting in an NCCL call a failed peer never joins.
#[test]
fn a_failed_switch_with_one_rank_per_gpu_loses_nothing() {
    let test = "a_failed_switch_with_one_rank_per_gpu";
    let Some(m) = Model::open_or_skip("qwen3", test) else {
        return;
    };
    let gpus = pat::backend::cuda::probe().unwrap_or(0);
    if gpus < 4 {
        pat::backend::cuda::testing::skip_notice(test, &format!("needs 4 GPUs, found {gpus}"));
        return;
    }
    failed_switches(&m, vec![0, 1, 2, 3]);
}

/// The failed-switch matrix (`failed_switch_loses_nothing`) on 4 ranks on GPUs `devices`, each
/// way a GPU switch runs.
fn failed_switches(m: &Model, devices: Vec<usize>) {
    let reqs = golden_requests(&m.gold, m.max_new);
    let cost = CostModel {
        transfer_bytes_per_s: 1e9,
        fixed_transfer_s: 0.0,
        prefill_tokens_per_s: vec![(1, 1e3), (4, 1e3)],
        fixed_prefill_s: 0.0,
    };
    for how in [GpuSwitch::Device, GpuSwitch::Host] {
        eprintln!(
            "failed switches on GPUs {devices:?}, switching {}",
            how.name()
        );
        let make = || ranks_at_tp1(m, 256, Dtype::F32, how, devices.clone());
        failed_switch_loses_nothing(make, &reqs, &m.gold, &cost);
    }
}

/// An engine of 4 ranks on GPU 0 at tp 1 with `kv_blocks` blocks per rank.
pub(super) fn four_ranks_at_tp1(
    m: &Model,
    kv_blocks: usize,
    dtype: Dtype,
    how: GpuSwitch,
) -> Engine {
    ranks_at_tp1(m, kv_blocks, dtype, how, vec![0; 4])
}

/// An engine of 4 ranks on GPUs `devices` at tp 1 with `kv_blocks` blocks per rank.
fn ranks_at_tp1(
    m: &Model,
    kv_blocks: usize,
    dtype: Dtype,
    how: GpuSwitch,
    devices: Vec<usize>,
) -> Engine {
    let opts = EngineOptions {
        world: 4,
        tp: 1,
        block_size: BS,
        kv_blocks,
        dtype,
        sampling: SamplingParams::default(),
    };
    let backend = Backend::Cuda {
        devices: Some(devices),
        switch: how,
    };
    Engine::with_backend(m.cfg.clone(), &m.ck, opts, &backend).unwrap()
}

/// Four ranks on one GPU whose pools each fit its free memory but not together are refused
/// before anything is uploaded, naming the GPU and the sizes (the concurrent uploads could
/// each pass their own check and then fail with a bare out-of-memory error).
#[test]
fn ranks_that_fit_a_gpu_alone_but_not_together_are_refused_before_upload() {
    let Some(m) = Model::open_alone("llama", "ranks_fit_alone_not_together") else {
        return;
    };
    let (free, _) = CudaDev::new(0).unwrap().mem_info().unwrap();
    let block = pat::kv::kv_block_bytes(&m.cfg, 1, BS, 4) as usize;
    // Each rank's pool plus its 0.5 GiB for activations: 30% of the free memory.
    let kv_blocks = (free / 10 * 3).saturating_sub(512 << 20) / block;
    let opts = EngineOptions {
        world: 4,
        tp: 1,
        block_size: BS,
        kv_blocks,
        dtype: Dtype::F32,
        sampling: SamplingParams::default(),
    };
    let backend = Backend::Cuda {
        devices: Some(vec![0; 4]),
        switch: GpuSwitch::Device,
    };
    let e = Engine::with_backend(m.cfg.clone(), &m.ck, opts, &backend)
        .err()
        .expect("four ranks of 30% each do not fit one GPU");
    assert!(e.to_string().contains("GPU 0: its 4 ranks need"), "{e}");
}

/// bf16, the primary GPU dtype: world 4 on one GPU through a ladder 1 -> 2 -> 4 -> 1 -> 2
/// (migrate), one engine switching on the devices and one through the host. The device path
/// moves the very bf16 bytes the host path rounds back exactly (bf16 -> f32 -> bf16 is the
/// identity), and the same-device all-reduce sums in rank order, so every step's logits and every
/// token are bitwise the host path's (whose f32 twin equals the CPU oracle: `check_engine`). No
/// weight byte crosses ranks when tp grows.
#[test]
fn bf16_switches_on_the_devices_equal_switches_through_the_host() {
    let Some(m) = Model::open_or_skip("llama", "bf16_switches_on_the_devices") else {
        return;
    };
    let reqs = golden_requests(&m.gold, m.max_new);
    let make = |how: GpuSwitch| {
        let mut e = four_ranks_at_tp1(&m, 1024, Dtype::Bf16, how);
        e.record_logits(true);
        e.add_requests(&reqs).unwrap();
        e
    };
    let (mut dev, mut host) = (make(GpuSwitch::Device), make(GpuSwitch::Host));
    let cost = test_cost();
    let ladder = [2, 4, 1, 2];
    let mut step = 0;
    while dev.live() > 0 {
        dev.step().unwrap_or_else(|e| panic!("step {step}: {e}"));
        host.step().unwrap();
        assert_eq!(
            dev.recorded_logits(),
            host.recorded_logits(),
            "step {step}: logits after switching on the devices vs through the host"
        );
        if step % 2 == 1 && step / 2 < ladder.len() && dev.live() > 0 {
            let to = ladder[step / 2];
            let d = dev
                .reconfigure(to, KvPolicy::Migrate, &cost)
                .unwrap_or_else(|e| panic!("step {step}: switch to tp {to} on the devices: {e}"));
            let h = host.reconfigure(to, KvPolicy::Migrate, &cost).unwrap();
            assert_eq!((d.n_migrated, d.kv_tokens), (h.n_migrated, h.kv_tokens));
            if to > d.from_tp {
                assert_eq!(d.weight_bytes_cross_rank, 0, "tp {} -> {to}", d.from_tp);
                // The copies the devices counted: every byte moved (KV in place or across
                // ranks, weight rows kept) read once and written once, and the vocab padding
                // of each new replica's embedding and head written once.
                let c = &m.cfg;
                let pad = pat::parallel::shard::padded_vocab(c.vocab_size, to) - c.vocab_size;
                let roles = if c.tie_word_embeddings { 1 } else { 2 };
                let zeroed = (4 / to * pad * roles * c.hidden_size * 2) as u64;
                let moved = d.bytes_moved_cross_rank + d.bytes_moved_in_place;
                assert_eq!(
                    d.memory_bytes,
                    Some(2 * moved + zeroed),
                    "tp {} -> {to}",
                    d.from_tp
                );
            }
            assert_eq!(h.memory_bytes, None, "through the host nothing is counted");
            eprintln!(
                "bf16 tp {} -> {to}: on the devices {:.1} ms, through the host {:.1} ms",
                d.from_tp, d.total_ms, h.total_ms
            );
        }
        step += 1;
    }
    let ids = |e: &Engine| {
        e.outputs()
            .iter()
            .map(|o| o.output_ids.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&dev), ids(&host));
}
