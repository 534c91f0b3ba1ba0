//! The weight planner and its per-rank programs over arbitrary small models and layouts (any
//! placement, nested or not, any tp pair): a clean error, or a plan whose ops tile every new
//! buffer and whose programs, executed over labelled rows, leave each rank exactly its new shard.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pat::parallel::Layout;
use pat::reshard::{nested_layout, weights};

#[derive(Arbitrary, Debug)]
pub struct Input {
    pub qwen: bool,
    pub layers: u8,
    pub hidden: u8,
    pub kv_heads: u8,
    pub group: u8,
    pub head_dim_half: u8,
    pub intermediate: u8,
    pub vocab: u16,
    pub tied: bool,
    pub world: u8,
    pub old_tp: u8,
    pub new_tp: u8,
    pub old_placement: Option<Vec<u8>>,
    pub new_placement: Placement,
    pub elem_bytes: u8,
}

#[derive(Arbitrary, Debug)]
pub enum Placement {
    Contiguous,
    Nested,
    Given(Vec<u8>),
}

/// `raw` as `world / tp` rows of `tp` ranks (kept as given: may be no permutation at all).
fn placement(raw: &[u8], world: usize, tp: usize) -> Vec<Vec<usize>> {
    let flat: Vec<usize> = (0..world)
        .map(|i| raw.get(i).map_or(i, |&x| x as usize % (world + 1)))
        .collect();
    flat.chunks(tp.max(1)).map(|c| c.to_vec()).collect()
}

fn layout(world: usize, tp: usize, raw: Option<&[u8]>) -> pat::Result<Layout> {
    match raw {
        Some(r) if tp > 0 => Layout::with_placement(world, tp, placement(r, world, tp)),
        _ => Layout::new(world, tp),
    }
}

fuzz_target!(|inp: Input| {
    let kv = 1 + inp.kv_heads as usize % 8;
    let heads = kv * (1 + inp.group as usize % 4);
    let json = serde_json::json!({
        "architectures": [if inp.qwen { "Qwen3ForCausalLM" } else { "LlamaForCausalLM" }],
        "vocab_size": 1 + inp.vocab as usize % 400,
        "hidden_size": 1 + inp.hidden as usize % 16,
        "intermediate_size": 1 + inp.intermediate as usize % 64,
        "num_hidden_layers": 1 + inp.layers as usize % 3,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 2 * (1 + inp.head_dim_half as usize % 8),
        "tie_word_embeddings": inp.tied,
    });
    let cfg = pat::model::config::ModelConfig::from_json(&json.to_string(), "c".as_ref())
        .expect("a valid config");
    let world = inp.world as usize % 17;
    let Ok(old) = layout(
        world,
        inp.old_tp as usize % 17,
        inp.old_placement.as_deref(),
    ) else {
        return;
    };
    let new_tp = inp.new_tp as usize % 17;
    let new = match &inp.new_placement {
        Placement::Contiguous => Layout::new(world, new_tp),
        Placement::Nested => nested_layout(&old, new_tp),
        Placement::Given(r) => layout(world, new_tp, Some(r)),
    };
    let Ok(new) = new else {
        return;
    };
    let elem_bytes = inp.elem_bytes as u64 % 5;
    let Ok(plan) = weights::plan(&cfg, &old, &new, elem_bytes) else {
        return;
    };
    pat_fuzz::check_weight_plan(&cfg, &plan);
    let progs = weights::program::programs(&plan);
    pat_fuzz::check_weight_programs(&cfg, &plan, &progs);
});
