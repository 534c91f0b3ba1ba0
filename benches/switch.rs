//! Criterion benches of one live TP switch on the CPU backend: weight reshard (tp grows: zero
//! bytes cross ranks; tp shrinks: only the missing pieces move), KV migrate and KV recompute.
//! Each bench validates once (the switched engine still produces the unswitched tokens), then
//! times `Engine::reconfigure` on a freshly prefilled engine per iteration; throughput is the
//! bytes the switch moved.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pat::engine::{Backend, Engine, EngineOptions, Request};
use pat::model::config::{Arch, ModelConfig};
use pat::model::init::{init_model, InitOptions, Preset};
use pat::model::weights::Checkpoint;
use pat::reshard::cost::{CostModel, KvPolicy};
use pat::Dtype;

const WORLD: usize = 4;

struct Setup {
    cfg: ModelConfig,
    ck: Checkpoint,
    reqs: Vec<Request>,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let opts = InitOptions {
        arch: Arch::Llama,
        preset: Preset::Small,
        seed: 1,
        dtype: Dtype::F32,
        force: true,
        shard: 1,
    };
    init_model(dir.path(), &opts).expect("init model");
    let cfg = ModelConfig::load(dir.path()).expect("config");
    let ck = Checkpoint::open(dir.path()).expect("checkpoint");
    let reqs = (0..4)
        .map(|i| Request {
            input_ids: (0..128)
                .map(|t| 3 + ((t * 7 + i * 13) % 2000) as u32)
                .collect(),
            max_new_tokens: 8,
            ignore_eos: true,
        })
        .collect();
    Setup {
        cfg,
        ck,
        reqs,
        _dir: dir,
    }
}

fn engine(s: &Setup, tp: usize) -> Engine {
    // 256 MiB of KV per rank, as a memory budget: enough to absorb the larger weight shards of a
    // switch to a smaller tp.
    let opts =
        EngineOptions::for_memory_budget(&s.cfg, &Backend::Cpu, WORLD, tp, Dtype::F32, 256 << 20)
            .expect("options");
    let mut e = Engine::new(s.cfg.clone(), &s.ck, opts).expect("engine");
    e.add_requests(&s.reqs).expect("requests");
    e.step().expect("prefill");
    e
}

fn cost() -> CostModel {
    CostModel {
        transfer_bytes_per_s: 5e9,
        fixed_transfer_s: 0.0,
        prefill_tokens_per_s: vec![(1, 500.0)],
        fixed_prefill_s: 0.0,
    }
}

/// The switched engine must still produce the tokens of the unswitched one.
fn validate(s: &Setup, from: usize, to: usize, policy: KvPolicy) -> u64 {
    let mut a = engine(s, from);
    a.run(|_| {}).expect("run");
    let mut b = engine(s, from);
    let r = b.reconfigure(to, policy, &cost()).expect("switch");
    b.run(|_| {}).expect("run");
    assert_eq!(
        a.outputs(),
        b.outputs(),
        "tp {from} -> {to} {policy} changed the tokens"
    );
    r.bytes_moved_cross_rank + r.bytes_moved_in_place
}

fn bench(c: &mut Criterion) {
    let s = setup();
    let mut g = c.benchmark_group("switch");
    g.sample_size(10);
    for (from, to, policy, name) in [
        (1, 2, KvPolicy::Migrate, "tp1->2 migrate"),
        (2, 4, KvPolicy::Migrate, "tp2->4 migrate"),
        (4, 1, KvPolicy::Migrate, "tp4->1 migrate"),
        (1, 2, KvPolicy::Recompute, "tp1->2 recompute"),
        (4, 1, KvPolicy::Recompute, "tp4->1 recompute"),
    ] {
        let bytes = validate(&s, from, to, policy);
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(name, |b| {
            b.iter_batched(
                || engine(&s, from),
                |mut e| e.reconfigure(to, policy, &cost()).expect("switch"),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
