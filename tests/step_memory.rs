//! What a CPU step allocates, measured: every heap allocation of the process goes through a
//! counting allocator, and the peak a step adds above what the engine held before it must stay
//! within `host_step_bytes` (what the CPU step cap counts, so that a step the cap admits cannot
//! outgrow the memory it was given) and not far below it (so the cap is not needlessly strict).
//! One test in this binary: nothing else allocates while it measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use pat::backend::cpu::STREAM_MAX_ROWS;
use pat::engine::{
    host_step_bytes, host_step_fixed_bytes, Engine, EngineOptions, Request,
    STEP_FIXED_BYTES_PER_RANK,
};
use pat::model::config::Arch;
use pat::model::init::{init_model, InitOptions, Preset};
use pat::model::sampling::SamplingParams;
use pat::model::ModelDir;
use pat::Dtype;

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = NOW.fetch_add(by, Ordering::SeqCst) + by;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counts are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        NOW.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Counted as the new block taken before the old is given back (what a moving
            // realloc needs at its peak).
            grew(new_size);
            NOW.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

#[test]
fn a_cpu_step_allocates_what_the_step_cap_counts() {
    let dir = tempfile::tempdir().unwrap();
    let opts = InitOptions {
        arch: Arch::Llama,
        preset: Preset::Small,
        seed: 1,
        dtype: Dtype::F32,
        force: true,
        shard: 1,
    };
    init_model(dir.path(), &opts).unwrap();
    let m = ModelDir::open(dir.path()).unwrap();
    let cfg = m.cfg.clone();
    // (world, tp, prompts, prompt tokens): a long prefill, several prompts, decodes.
    for (world, tp, n, len) in [
        (1, 1, 1, 1024),
        (2, 2, 1, 1024),
        (4, 4, 1, 1024),
        (2, 1, 6, 200),
        (4, 2, 4, 300),
    ] {
        let at = format!("world {world} tp {tp}, {n} x {len} tokens");
        let opts = EngineOptions {
            world,
            tp,
            block_size: 16,
            kv_blocks: 512,
            dtype: Dtype::F32,
            sampling: SamplingParams::default(),
        };
        let mut e = Engine::new(cfg.clone(), &m.ck, opts).unwrap();
        let reqs: Vec<Request> = (0..n)
            .map(|i| Request {
                input_ids: (0..len).map(|t| ((t * 7 + i * 13) % 2000) as u32).collect(),
                max_new_tokens: 2,
                ignore_eos: true,
            })
            .collect();
        e.add_requests(&reqs).unwrap();
        // Two steps: the prefill of every prompt, then one decode each.
        for (step, tokens) in [(0, n * len), (1, n)] {
            let before = NOW.load(Ordering::SeqCst);
            PEAK.store(before, Ordering::SeqCst);
            let r = e.step().unwrap();
            let measured = PEAK.load(Ordering::SeqCst) - before;
            assert_eq!(r.tokens_in, tokens, "{at} step {step}");
            // Each replica counts its own sequences; they run at once.
            let dp = world / tp;
            let per_replica = n.div_ceil(dp);
            // What the replicas feed, plus what every step holds (bookkeeping per rank, and
            // the GEMMs' packing where a step has more rows than they stream).
            let fed: u64 = (0..dp)
                .map(|d| {
                    let seqs = per_replica.min(n.saturating_sub(d * per_replica));
                    host_step_bytes(&cfg, tp, tokens / n * seqs, seqs)
                })
                .sum();
            let packs = tokens / n * per_replica > STREAM_MAX_ROWS;
            let estimate = (fed + host_step_fixed_bytes(&cfg, world, packs)) as usize;
            eprintln!("{at} step {step}: measured {measured} estimate {estimate}");
            assert!(
                measured <= estimate,
                "{at} step {step}: the step allocated {measured} bytes, more than the {estimate} the cap counts"
            );
            // What the step keeps after it is the sequences' own (tokens, block tables) and
            // small buffers: a prefill's collective slots are freed, or a group, which lives as
            // long as the engine, would hold them uncounted.
            let kept = NOW.load(Ordering::SeqCst).saturating_sub(before);
            assert!(
                kept as u64 <= world as u64 * ((1 << 20) + STEP_FIXED_BYTES_PER_RANK),
                "{at} step {step}: the step kept {kept} bytes"
            );
            // The prefill, where the cap matters: the count is close as well as above.
            assert!(
                step == 1 || measured as f64 >= 0.75 * estimate as f64,
                "{at} step {step}: the step allocated {measured} bytes, far below the {estimate} the cap counts"
            );
        }
    }
}
