//! The KV planner and its per-rank programs over arbitrary small models, layouts and sequence
//! states (replicas, lengths, block tables, duplicate or short tables): a clean error, or a plan
//! whose programs, executed over labelled head slices, put every head where the new layout says.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pat::parallel::Layout;
use pat::reshard::kv::{self, SeqKv};
use pat::reshard::nested_layout;

#[derive(Arbitrary, Debug)]
struct Seq {
    old_replica: u8,
    new_replica: u8,
    len: u16,
    old_table: Vec<u16>,
    /// None: fresh consecutive blocks after the previous sequence's.
    new_table: Option<Vec<u16>>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    layers: u8,
    kv_heads: u8,
    group: u8,
    head_dim_half: u8,
    intermediate: u8,
    world: u8,
    old_tp: u8,
    new_tp: u8,
    nested: bool,
    block_size: u8,
    elem_bytes: u8,
    seqs: Vec<Seq>,
    huge_len: Option<u64>,
}

fuzz_target!(|inp: Input| {
    let kv = 1 + inp.kv_heads as usize % 8;
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 64, "hidden_size": 16,
        "intermediate_size": 1 + inp.intermediate as usize % 64,
        "num_hidden_layers": 1 + inp.layers as usize % 4,
        "num_attention_heads": kv * (1 + inp.group as usize % 4),
        "num_key_value_heads": kv,
        "head_dim": 2 * (1 + inp.head_dim_half as usize % 8),
    });
    let cfg = pat::model::config::ModelConfig::from_json(&json.to_string(), "c".as_ref())
        .expect("a valid config");
    let world = inp.world as usize % 17;
    let Ok(old) = Layout::new(world, inp.old_tp as usize % 17) else {
        return;
    };
    let new_tp = inp.new_tp as usize % 17;
    let new = if inp.nested {
        nested_layout(&old, new_tp)
    } else {
        Layout::new(world, new_tp)
    };
    let Ok(new) = new else {
        return;
    };
    let block_size = inp.block_size as usize % 33;
    let mut next = 0u32;
    let mut seqs: Vec<SeqKv> = inp
        .seqs
        .iter()
        .take(16)
        .map(|s| {
            let len = s.len as usize % 200;
            let nb = len.div_ceil(block_size.max(1));
            let new_table = match &s.new_table {
                Some(t) => t.iter().map(|&b| b as u32).collect(),
                None => {
                    next += nb as u32;
                    (next - nb as u32..next).collect()
                }
            };
            SeqKv {
                old_replica: s.old_replica as usize % 5,
                new_replica: s.new_replica as usize % 5,
                len,
                old_table: s.old_table.iter().map(|&b| b as u32).collect(),
                new_table,
            }
        })
        .collect();
    if let (Some(h), Some(s)) = (inp.huge_len, seqs.first_mut()) {
        // Lengths far past any pool: a clean error (tables too short, or bytes overflowing).
        s.len = h as usize;
    }
    let Ok(plan) = kv::plan(&cfg, &old, &new, block_size, &seqs, inp.elem_bytes as u64) else {
        return;
    };
    let progs = kv::program::programs(&plan);
    pat_fuzz::check_kv(&cfg, &plan, &progs);
});
