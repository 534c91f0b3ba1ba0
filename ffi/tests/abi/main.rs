//! The C ABI called as C calls it (through the exported functions of the rlib): conventions and
//! bad calls, the engine against the golden fixture, plans executed on plain buffers, the policy.

mod conventions;
mod engine;
mod fuzz_regressions;
mod plan_start;
mod plans;
mod policy;

use std::ffi::{c_char, CString};

use pat_ffi::*;

/// The golden llama fixture (tests/data/golden/llama).
pub const LLAMA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/golden/llama");

/// This thread's last error message.
pub fn last_error() -> String {
    let mut buf = vec![0u8; 1024];
    // SAFETY: `buf` holds `buf.len()` writable bytes.
    let n = unsafe { pat_last_error_message(buf.as_mut_ptr().cast::<c_char>(), buf.len()) };
    buf.truncate(n.min(buf.len() - 1));
    String::from_utf8(buf).unwrap()
}

/// Asserts a status and that a message names `needle` (empty: any non-empty message).
#[track_caller]
pub fn expect(status: pat_status, want: pat_status, needle: &str) {
    let msg = last_error();
    assert_eq!(status, want, "status {status}, message {msg:?}");
    if want == PAT_OK {
        assert!(msg.is_empty(), "a success clears the message: {msg:?}");
    } else {
        assert!(
            !msg.is_empty() && msg.contains(needle),
            "{msg:?} should name {needle:?}"
        );
    }
}

pub fn cstring(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// Opens the llama fixture.
pub fn open_llama() -> *mut pat_ffi::model::pat_model {
    let dir = cstring(LLAMA);
    let mut m = std::ptr::null_mut();
    // SAFETY: a NUL-terminated path and a local out pointer.
    let st = unsafe { pat_ffi::model::pat_model_open(dir.as_ptr(), &mut m) };
    expect(st, PAT_OK, "");
    m
}

/// (prompt ids, transformers' greedy output ids) of one golden prompt.
pub type Golden = (Vec<u32>, Vec<u32>);

/// The fixture's golden.json: every prompt, and max_new_tokens.
pub fn golden() -> (Vec<Golden>, u32) {
    let text = std::fs::read_to_string(format!("{LLAMA}/golden.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    };
    let prompts = v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (ids(&p["input_ids"]), ids(&p["output_ids"])))
        .collect();
    (prompts, v["max_new_tokens"].as_u64().unwrap() as u32)
}
