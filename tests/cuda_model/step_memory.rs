//! What a GPU step allocates, measured, and the cap that keeps it within the GPU's memory.
//!
//! Every `DBuf` is a stream-ordered allocation from its device's default memory pool, whose high
//! watermark (`CudaDev::pool_used`) measures a step's peak. It must stay within what the GPU
//! step cap counts (`engine::device_step_bytes` for what the step feeds, per rank), and on a
//! prefill not far below it (or the cap would be needlessly strict). The cap itself is each
//! rank's share of its GPU's free memory as the test reads it, read again after a switch; on a
//! GPU with little free memory a queue is prefilled over several steps, in chunks, each within
//! the cap, with the CPU engine's tokens. The tests measure the GPUs' memory, so they hold it alone.

use super::*;
use pat::backend::cuda::workers::{step_split_bytes, STEP_SLACK_BYTES};
use pat::engine::{device_step_bytes, Request};
use pat::model::config::Arch;
use pat::model::init::{init_model, InitOptions, Preset};
use pat::model::ModelDir;

/// Buffers a step allocates per rank (`decoder::forward` on `GpuOps`): the batch's 7, 7 per
/// token, 3 per sequence and the RoPE table, each of which the pool may round up.
const BUFFERS: u64 = 18;

/// What the pool may round one buffer up to: 4 KiB pages on the emulated driver, up to 2 MiB
/// pieces on a GPU.
fn granule(dev: &CudaDev) -> u64 {
    match emulated(dev) {
        true => 4 << 10,
        false => 2 << 20,
    }
}

/// A random model (the buffers' sizes matter here, not the weights): the tiny preset on the
/// emulated driver (its kernels run on the CPU), the small one on a GPU, where the pool's
/// rounding (up to 2 MiB a buffer) would hide what the tiny preset's steps allocate.
fn model(dtype: Dtype, emulated: bool) -> (tempfile::TempDir, ModelDir) {
    let dir = tempfile::tempdir().unwrap();
    let opts = InitOptions {
        arch: Arch::Llama,
        preset: if emulated {
            Preset::Tiny
        } else {
            Preset::Small
        },
        seed: 3,
        dtype,
        force: true,
        shard: 1,
    };
    init_model(dir.path(), &opts).unwrap();
    let m = ModelDir::open(dir.path()).unwrap();
    (dir, m)
}

/// Whether `dev` is the emulated driver's.
fn emulated(dev: &CudaDev) -> bool {
    dev.name().contains("emulated")
}

/// `n` prompts of `len` tokens, `max_new` new tokens each, greedy.
fn prompts(n: usize, len: usize, max_new: usize, vocab: usize) -> Vec<Request> {
    (0..n)
        .map(|i| Request {
            input_ids: (0..len)
                .map(|t| ((t * 7 + i * 13) % vocab) as u32)
                .collect(),
            max_new_tokens: max_new,
            ignore_eos: true,
        })
        .collect()
}

fn gpu_engine(m: &ModelDir, world: usize, tp: usize, devices: &[usize], dtype: Dtype) -> Engine {
    let opts = EngineOptions {
        world,
        tp,
        block_size: BS,
        kv_blocks: 1024,
        dtype,
        sampling: SamplingParams::default(),
    };
    let backend = Backend::Cuda {
        devices: Some(devices.to_vec()),
        switch: GpuSwitch::Device,
    };
    Engine::with_backend(m.cfg.clone(), &m.ck, opts, &backend).unwrap()
}

/// One handle per GPU the ranks use (made before anything is measured: a handle allocates).
fn handles(devices: &[usize]) -> Vec<(usize, CudaDev)> {
    let mut ords = devices.to_vec();
    ords.sort_unstable();
    ords.dedup();
    ords.into_iter()
        .map(|o| (o, CudaDev::new(o).unwrap()))
        .collect()
}

/// Runs one step and returns its report and, per GPU, the most its pool held above what it
/// held before the step.
fn measured_step(e: &mut Engine, devs: &[(usize, CudaDev)]) -> (pat::engine::StepReport, Vec<u64>) {
    let before: Vec<u64> = devs
        .iter()
        .map(|(_, d)| {
            d.reset_pool_peak().unwrap();
            d.pool_used().unwrap().0
        })
        .collect();
    let r = e.step().unwrap();
    let peaks = devs
        .iter()
        .zip(before)
        .map(|((_, d), b)| d.pool_used().unwrap().1.saturating_sub(b))
        .collect();
    (r, peaks)
}

/// Says what a step measured, and appends it as a JSON line to the file
/// `$PAT_STEP_MEMORY_LOG` names, if set (scripts/gpu-check.sh summarizes it).
fn record(at: &str, step: usize, gpu: usize, measured: u64, counted: u64) {
    eprintln!("{at} step {step} GPU {gpu}: measured {measured} bytes, counted {counted}");
    if let Some(path) = std::env::var_os("PAT_STEP_MEMORY_LOG") {
        use std::io::Write;
        let line = serde_json::json!({
            "at": at, "step": step, "gpu": gpu, "measured": measured, "counted": counted,
        });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("PAT_STEP_MEMORY_LOG {path:?}: {e}"));
        writeln!(f, "{line}").unwrap();
    }
}

#[test]
fn a_gpu_step_allocates_what_the_step_cap_counts() {
    let test = "a_gpu_step_allocates_what_the_step_cap_counts";
    let _alone = alone();
    let Some(dev) = device_or_skip(test).unwrap() else {
        return;
    };
    let emu = emulated(&dev);
    drop(dev);
    let gpus = pat::backend::cuda::probe().unwrap_or(0);
    // (world, tp, devices): one rank; a replica of two on one GPU; two replicas of two on one
    // GPU; and, with the GPUs for it, two over NCCL and two replicas of two over four GPUs.
    let mut layouts: Vec<(usize, usize, Vec<usize>)> =
        vec![(1, 1, vec![0]), (2, 2, vec![0, 0]), (4, 2, vec![0; 4])];
    if gpus >= 4 {
        layouts.push((2, 2, vec![0, 1]));
        layouts.push((4, 2, vec![0, 1, 2, 3]));
    }
    // (prompts per replica, prompt tokens): a long prefill (the per-token terms), then many
    // short ones whose decode step is mostly per-sequence terms.
    let batches = match emu {
        true => [(2, 200), (96, 8)],
        false => [(4, 1000), (96, 8)],
    };
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let (_dir, m) = model(dtype, emu);
        let cfg = &m.cfg;
        let elem = dtype.size_bytes() as u64;
        for (world, tp, devices) in &layouts {
            let (world, tp, dp) = (*world, *tp, world / tp);
            let devs = handles(devices);
            let mut e = gpu_engine(&m, world, tp, devices, dtype);
            // A first request warms up what libraries allocate on first use.
            e.add_requests(&prompts(1, 4, 1, cfg.vocab_size)).unwrap();
            e.run(|_| {}).unwrap();
            for (per_replica, len) in batches {
                let at = format!(
                    "{dtype:?} world {world} tp {tp} on GPUs {devices:?}, {per_replica} x {len} tokens per replica"
                );
                let n = per_replica * dp;
                e.add_requests(&prompts(n, len, 2, cfg.vocab_size)).unwrap();
                for (step, fed) in [(0, len), (1, 1)] {
                    let (r, peaks) = measured_step(&mut e, &devs);
                    assert_eq!(
                        r.tokens_in,
                        n * fed,
                        "{at} step {step}: one step of everything"
                    );
                    // Every rank of a replica allocates for all of its prompts.
                    let per_rank =
                        device_step_bytes(cfg, tp, elem, BS, per_replica * fed, per_replica);
                    for ((o, d), peak) in devs.iter().zip(peaks) {
                        let on = |r: usize| devices[r] == *o;
                        let ranks = (0..world).filter(|&r| on(r)).count() as u64;
                        // The replicas' steps need not overlap in time: the least a step must
                        // reach is one replica's ranks on this GPU.
                        let one = (0..dp)
                            .map(|d| (d * tp..(d + 1) * tp).filter(|&r| on(r)).count() as u64)
                            .max()
                            .unwrap_or(0);
                        let count = ranks * per_rank;
                        // A decode over long contexts may split its attention (its scratch is
                        // counted apart, with what every step holds).
                        let split = match step {
                            1 => step_split_bytes(cfg, tp, d.num_sms(), BS),
                            _ => 0,
                        };
                        let most = count + ranks * (BUFFERS * granule(d) + split);
                        record(&at, step, *o, peak, count);
                        assert!(
                            peak <= most,
                            "{at} step {step} GPU {o}: the step allocated {peak} bytes, more than the {count} the cap counts (+ rounding and split scratch, {most})"
                        );
                        let least = one * per_rank;
                        assert!(
                            peak as f64 >= 0.75 * least as f64,
                            "{at} step {step} GPU {o}: the step allocated {peak} bytes, far below the {least} the cap counts for one replica"
                        );
                    }
                }
                e.run(|_| {}).unwrap();
            }
        }
    }
}

/// The cap each rank gets: its share of its GPU's free memory less what every step holds,
/// nine tenths of it (`engine::ranks::gpu`), from the free memory this test reads.
fn expected_cap(m: &ModelDir, tp: usize, dev: &CudaDev, ranks: u64) -> u64 {
    let split = step_split_bytes(&m.cfg, tp, dev.num_sms(), BS);
    let fixed = STEP_SLACK_BYTES + split;
    let free = dev.allocatable_bytes().unwrap() as u64;
    (free - ranks * fixed) / ranks / 10 * 9
}

#[test]
fn a_gpu_with_little_free_memory_prefills_a_queue_over_several_steps() {
    let test = "a_gpu_with_little_free_memory_prefills_a_queue";
    let _alone = alone();
    let Some(dev) = device_or_skip(test).unwrap() else {
        return;
    };
    let emu = emulated(&dev);
    let (_dir, m) = model(Dtype::F32, emu);
    let cfg = &m.cfg;
    // Prompts long enough that two and a half of them make a cap well above a GPU's rounding.
    let len = if emu { 120 } else { 1000 };
    let devs = handles(&[0]);
    let near = |got: u64, want: u64| got.abs_diff(want) <= 8 * granule(&dev);

    // The cap is read at load and again after a switch, from what the GPU has free.
    let mut e = gpu_engine(&m, 2, 1, &[0, 0], Dtype::F32);
    let (got, want) = (e.step_cap_bytes().unwrap(), expected_cap(&m, 1, &dev, 2));
    assert!(
        near(got, want),
        "at load: cap {got}, from free memory {want}"
    );
    let reqs = prompts(8, len, 8, cfg.vocab_size);
    e.add_requests(&reqs[..2]).unwrap();
    e.step().unwrap();
    // Something else takes a quarter of what is free; the switch reads the GPU again.
    let quarter = dev.allocatable_bytes().unwrap() / 4;
    let taken = DBuf::zeros(&dev, DType::U8, quarter).unwrap();
    dev.synchronize().unwrap();
    let cost = test_cost();
    e.reconfigure(2, KvPolicy::Migrate, &cost).unwrap();
    let (got, want) = (e.step_cap_bytes().unwrap(), expected_cap(&m, 2, &dev, 2));
    assert!(
        near(got, want),
        "after the switch: cap {got}, from free memory {want}"
    );
    drop((e, taken));
    // The ballast's free runs in its stream's order: wait for it.
    dev.synchronize().unwrap();

    // A ballast taken after load (as a trainer sharing the GPU might) leaves each of the two
    // ranks a cap of about two and a half prompts, where the queue is eight; the engine reads
    // the GPU's memory again when told.
    let per_prompt = device_step_bytes(cfg, 1, 4, BS, len, 1);
    let cap = 2 * per_prompt + per_prompt / 2;
    let mut e = gpu_engine(&m, 2, 1, &[0, 0], Dtype::F32);
    let room = e.step_cap_bytes().unwrap();
    // Each rank's cap is nine tenths of its half of what is free past the fixed part.
    let ballast = (room - cap) / 9 * 10 * 2;
    let held = DBuf::zeros(&dev, DType::U8, ballast as usize).unwrap();
    dev.synchronize().unwrap();
    e.refresh_step_cap().unwrap();
    let got = e.step_cap_bytes().unwrap();
    assert!(
        near(got, cap),
        "with {ballast} bytes of ballast: cap {got}, wanted about {cap}"
    );
    e.add_requests(&reqs).unwrap();
    // Each replica's step prefills what its cap holds of the queue's tokens, a prompt that does
    // not fit whole in chunks (at least one token a replica).
    let token = device_step_bytes(cfg, 1, 4, BS, 1, 0);
    let fit = (got / token).max(1) as usize;
    let (mut fed, mut steps) = (0, 0);
    while e.unprefilled() > 0 {
        let (r, peaks) = measured_step(&mut e, &devs);
        steps += 1;
        assert!(
            (1..=2 * fit).contains(&r.prefill_tokens),
            "step {steps}: {} prompt tokens prefilled, at most {fit} a replica fit",
            r.prefill_tokens
        );
        let most = 2 * (got + BUFFERS * granule(&dev));
        assert!(
            peaks[0] <= most,
            "step {steps}: the two ranks allocated {} bytes, more than their caps allow ({most})",
            peaks[0]
        );
        fed += r.prefill_tokens;
    }
    assert_eq!(fed, reqs.len() * len, "every prompt token prefilled once");
    assert!(steps >= 2, "the queue of 8 took {steps} step(s)");
    e.run(|_| {}).unwrap();
    drop(held);

    // The CPU engine's tokens.
    let opts = EngineOptions {
        world: 1,
        tp: 1,
        block_size: BS,
        kv_blocks: 1024,
        dtype: Dtype::F32,
        sampling: SamplingParams::default(),
    };
    let mut cpu = Engine::new(cfg.clone(), &m.ck, opts).unwrap();
    cpu.add_requests(&reqs).unwrap();
    cpu.run(|_| {}).unwrap();
    let ids =
        |e: &Engine| -> Vec<Vec<u32>> { e.outputs().into_iter().map(|o| o.output_ids).collect() };
    assert_eq!(
        ids(&e),
        ids(&cpu),
        "GPU ranks prefilling over {steps} steps"
    );
}
