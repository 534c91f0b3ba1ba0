//! A sharded checkpoint: an index JSON (`model.safetensors.index.json`) and up to four shard files,
//! written to a temp dir and opened with `Checkpoint::open`: a clean error or readable tensors.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    index: String,
    shards: Vec<(u8, Vec<u8>)>,
}

/// The shard names the index may refer to (fuzzed indexes pick among these or invent others).
const NAMES: [&str; 4] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "a.safetensors",
    "sub",
];

fuzz_target!(|inp: Input| {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("model.safetensors.index.json"), &inp.index).expect("write");
    for (which, bytes) in inp.shards.iter().take(4) {
        let name = NAMES[*which as usize % NAMES.len()];
        if name == "sub" {
            // A directory where a shard file is expected.
            let _ = std::fs::create_dir(dir.path().join(name));
        } else {
            std::fs::write(dir.path().join(name), bytes).expect("write");
        }
    }
    pat_fuzz::open_and_read_all(dir.path());
});
