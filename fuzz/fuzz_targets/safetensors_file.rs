//! Bytes written as DIR/model.safetensors, opened with `Checkpoint::open`: a clean error, or a
//! checkpoint every tensor of which reads whole (and row by row) with the right element count.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("model.safetensors"), data).expect("write");
    pat_fuzz::open_and_read_all(dir.path());
});
