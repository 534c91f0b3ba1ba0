//! The header's conventions: versions, the last-error message, NULL checks, handles (freed,
//! forged, wrong type), buffer negotiation, struct_size, and the panic guard.

use std::ffi::{c_char, CStr};
use std::ptr::{null, null_mut};

use pat_ffi::engine::*;
use pat_ffi::layout::pat_layout;
use pat_ffi::model::*;
use pat_ffi::weight_plan::*;
use pat_ffi::*;

use super::{cstring, expect, last_error, open_llama};

fn small_engine(model: *const pat_model, world: u32, tp: u32) -> (pat_status, *mut pat_engine) {
    let mut p = pat_engine_default_params();
    (p.world, p.tp, p.kv_blocks) = (world, tp, 16);
    let mut e = null_mut();
    // SAFETY: local params and out pointer.
    let st = unsafe { pat_engine_new(model, &p, &mut e) };
    (st, e)
}

#[test]
fn versions_and_status_names() {
    assert_eq!(pat_abi_version(), PAT_ABI_VERSION);
    let name = |s| {
        // SAFETY: pat_status_name returns a static NUL-terminated string.
        unsafe { CStr::from_ptr(pat_status_name(s)) }
            .to_str()
            .unwrap()
    };
    assert_eq!(name(PAT_ERR_NULL), "PAT_ERR_NULL");
    assert_eq!(name(PAT_BUFFER_TOO_SMALL), "PAT_BUFFER_TOO_SMALL");
    assert_eq!(name(12345), "PAT_UNKNOWN_STATUS");
    // SAFETY: a static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(pat_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn last_error_is_thread_local_and_negotiates_its_length() {
    let mut m = null_mut();
    // SAFETY: NULL dir is what is tested; `m` is a local out pointer.
    let st = unsafe { pat_model_open(null(), &mut m) };
    assert_eq!(st, PAT_ERR_NULL);
    assert!(m.is_null(), "outputs are written only on success");
    let full = last_error();
    assert_eq!(full, "`dir` is NULL");
    let mut small = [0x7fu8; 5];
    // SAFETY: (NULL, 0) asks for the length; `small` holds 5 writable bytes.
    let (need, got) = unsafe {
        (
            pat_last_error_message(null_mut(), 0),
            pat_last_error_message(small.as_mut_ptr().cast::<c_char>(), small.len()),
        )
    };
    assert_eq!((need, got), (full.len(), full.len()));
    assert_eq!(&small, b"`dir\0", "cut to len - 1 bytes and a NUL");
    std::thread::spawn(|| assert_eq!(last_error(), "", "another thread has its own"))
        .join()
        .unwrap();
    assert_eq!(pat_abi_version(), PAT_ABI_VERSION);
    let m = open_llama();
    assert_eq!(last_error(), "", "a success clears the message");
    // A void _free leaves the message: cleaning up first, then reading it, still finds it.
    // SAFETY: NULL dir is what is tested; the out pointer is a local.
    let st = unsafe { pat_model_open(null(), &mut null_mut()) };
    assert_eq!(st, PAT_ERR_NULL);
    pat_model_free(m);
    pat_weight_plan_free(null_mut());
    assert_eq!(
        last_error(),
        "`dir` is NULL",
        "a _free keeps the last error"
    );
}

#[test]
fn null_pointers_are_errors_and_change_nothing() {
    let m = open_llama();
    let dir = cstring(super::LLAMA);
    let mut dims = pat_model_dims::default();
    // SAFETY: every pointer is a live local, or NULL where the test says so.
    unsafe {
        expect(
            pat_model_open(dir.as_ptr(), null_mut()),
            PAT_ERR_NULL,
            "`out`",
        );
        expect(
            pat_model_get_dims(null(), &mut dims),
            PAT_ERR_NULL,
            "`model` is NULL",
        );
        expect(pat_model_get_dims(m, null_mut()), PAT_ERR_NULL, "`out`");
        assert_eq!(dims, pat_model_dims::default());
        expect(
            pat_engine_step(null_mut(), null_mut()),
            PAT_ERR_NULL,
            "`engine` is NULL",
        );
        let mut e = null_mut();
        expect(
            pat_engine_new(null(), null(), &mut e),
            PAT_ERR_NULL,
            "`model` is NULL",
        );
        assert!(e.is_null());
        let (st, e) = small_engine(m, 1, 1);
        expect(st, PAT_OK, "");
        expect(
            pat_engine_add_request(e, null(), 3, 4, 1, null_mut()),
            PAT_ERR_NULL,
            "`ids`",
        );
        expect(
            pat_engine_reconfigure(e, null(), null_mut()),
            PAT_ERR_NULL,
            "params",
        );
        let l = pat_layout {
            world: 2,
            tp: 1,
            placement: null(),
        };
        let mut plan = null_mut();
        expect(
            pat_weight_plan_new(null(), &l, &l, 4, &mut plan),
            PAT_ERR_NULL,
            "dims",
        );
        let mut n = 0usize;
        expect(
            pat_model_load_shard(m, PAT_ROLE_QKV, 0, 1, 0, null_mut(), 0, null_mut()),
            PAT_ERR_NULL,
            "`n`",
        );
        // A non-empty answer into a NULL buffer is refused, not written.
        expect(
            pat_model_load_shard(m, PAT_ROLE_QKV, 0, 1, 0, null_mut(), 1 << 20, &mut n),
            PAT_ERR_NULL,
            "buf",
        );
        pat_engine_free(e);
    }
    pat_model_free(m);
}

#[test]
fn bad_model_paths_name_the_problem() {
    let missing = cstring("/nonexistent/pat/model");
    let empty = tempfile::tempdir().unwrap();
    let empty_path = cstring(empty.path().to_str().unwrap());
    let mut m = null_mut();
    // SAFETY: NUL-terminated paths and a local out pointer.
    unsafe {
        expect(
            pat_model_open(missing.as_ptr(), &mut m),
            PAT_ERR_INVALID_ARGUMENT,
            "/nonexistent/pat/model: does not exist",
        );
        // A file where a directory belongs.
        let other = tempfile::tempdir().unwrap();
        let file = other.path().join("model");
        std::fs::write(&file, "{}").unwrap();
        let file = cstring(file.to_str().unwrap());
        expect(
            pat_model_open(file.as_ptr(), &mut m),
            PAT_ERR_INVALID_ARGUMENT,
            "not a directory",
        );
        let st = pat_model_open(empty_path.as_ptr(), &mut m);
        assert!(st < 0, "{st}");
        assert!(last_error().contains("config.json"), "{}", last_error());
        let bad_utf8 = [0xffu8, 0xfe, 0];
        expect(
            pat_model_open(bad_utf8.as_ptr().cast(), &mut m),
            PAT_ERR_INVALID_ARGUMENT,
            "UTF-8",
        );
    }
    assert!(m.is_null());
}

#[test]
fn impossible_tp_is_an_invalid_argument() {
    let m = open_llama();
    let (st, e) = small_engine(m, 2, 3);
    expect(st, PAT_ERR_INVALID_ARGUMENT, "does not divide world 2");
    assert!(e.is_null());
    // 8 q heads, 4 kv heads: tp 8 does not split the kv heads.
    let (st, _) = small_engine(m, 8, 8);
    expect(st, PAT_ERR_INVALID_ARGUMENT, "num_key_value_heads");
    let (st, e) = small_engine(m, 2, 1);
    expect(st, PAT_OK, "");
    let mut dims = pat_model_dims::default();
    // SAFETY: live handles and locals.
    unsafe {
        let ids = [5u32, 6, 7];
        expect(
            pat_engine_add_request(e, ids.as_ptr(), 3, 4, 1, null_mut()),
            PAT_OK,
            "",
        );
        expect(pat_engine_step(e, null_mut()), PAT_OK, "");
        let mut sp = pat_switch_default_params();
        // The default new_tp (0) is refused like any bad tp, the engine untouched (it was a
        // panic that poisoned the engine).
        expect(
            pat_engine_reconfigure(e, &sp, null_mut()),
            PAT_ERR_INVALID_ARGUMENT,
            "tp 0",
        );
        sp.new_tp = 3;
        expect(
            pat_engine_reconfigure(e, &sp, null_mut()),
            PAT_ERR_INVALID_ARGUMENT,
            "tp 3",
        );
        sp.new_tp = 1;
        expect(
            pat_engine_reconfigure(e, &sp, null_mut()),
            PAT_ERR_INVALID_ARGUMENT,
            "already runs",
        );
        let mut info = pat_engine_info::default();
        expect(pat_engine_get_info(e, &mut info), PAT_OK, "");
        assert_eq!(
            (info.world, info.tp, info.n_live),
            (2, 1, 1),
            "nothing changed"
        );
        expect(pat_model_get_dims(m, &mut dims), PAT_OK, "");
        let (a, b) = (
            pat_layout {
                world: 8,
                tp: 2,
                placement: null(),
            },
            pat_layout {
                world: 8,
                tp: 8,
                placement: null(),
            },
        );
        let mut plan = null_mut();
        expect(
            pat_weight_plan_new(&dims, &a, &b, 4, &mut plan),
            PAT_ERR_INVALID_ARGUMENT,
            "tp 8",
        );
        assert!(plan.is_null());
        let perm = [0u32, 1, 1, 3];
        let c = pat_layout {
            world: 4,
            tp: 2,
            placement: perm.as_ptr(),
        };
        expect(
            pat_weight_plan_new(&dims, &c, &c, 4, &mut plan),
            PAT_ERR_INVALID_ARGUMENT,
            "permutation",
        );
    }
    pat_engine_free(e);
    pat_model_free(m);
}

#[test]
fn freed_forged_and_mistyped_handles_are_caught() {
    let m = open_llama();
    let mut dims = pat_model_dims::default();
    // SAFETY: handles are tokens pat looks up, never dereferences; `dims` is a local.
    unsafe {
        expect(pat_model_get_dims(m, &mut dims), PAT_OK, "");
        let l1 = pat_layout {
            world: 2,
            tp: 1,
            placement: null(),
        };
        let l2 = pat_layout {
            world: 2,
            tp: 2,
            placement: null(),
        };
        let mut plan = null_mut();
        expect(
            pat_weight_plan_new(&dims, &l1, &l2, 4, &mut plan),
            PAT_OK,
            "",
        );
        expect(
            pat_model_get_dims(plan.cast::<pat_model>(), &mut dims),
            PAT_ERR_BAD_HANDLE,
            "is a pat_weight_plan, not a pat_model",
        );
        pat_model_free(plan.cast()); // the wrong type: left alone
        let mut info = pat_weight_plan_info::default();
        expect(pat_weight_plan_get_info(plan, &mut info), PAT_OK, "");
        pat_weight_plan_free(plan);
        pat_weight_plan_free(plan); // a second free is a no-op
        pat_weight_plan_free(null_mut());
        expect(
            pat_weight_plan_get_info(plan, &mut info),
            PAT_ERR_BAD_HANDLE,
            "`plan`: pat_weight_plan handle",
        );
        pat_model_free(m);
        expect(
            pat_model_get_dims(m, &mut dims),
            PAT_ERR_BAD_HANDLE,
            "not live",
        );
        // A fresh model never gets the freed token back.
        let m2 = open_llama();
        assert_ne!(m2, m);
        expect(
            pat_model_get_dims(m, &mut dims),
            PAT_ERR_BAD_HANDLE,
            "not live",
        );
        let forged = std::ptr::without_provenance::<pat_model>(0x1234);
        expect(
            pat_model_get_dims(forged, &mut dims),
            PAT_ERR_BAD_HANDLE,
            "not live",
        );
        pat_model_free(m2);
    }
}

#[test]
fn short_buffers_negotiate_and_write_nothing() {
    let m = open_llama();
    // SAFETY: live handle; buffers of the stated capacity.
    unsafe {
        let mut n = 0usize;
        let st = pat_model_load_shard(m, PAT_ROLE_QKV, 1, 2, 1, null_mut(), 0, &mut n);
        expect(st, PAT_BUFFER_TOO_SMALL, "needed");
        // tp 2: 4 q heads + 2 k + 2 v heads of head_dim 8 = 64 rows of hidden 64.
        assert_eq!(n, 64 * 64);
        let mut buf = vec![-7.0f32; n];
        let mut n2 = 0usize;
        expect(
            pat_model_load_shard(m, PAT_ROLE_QKV, 1, 2, 1, buf.as_mut_ptr(), n - 1, &mut n2),
            PAT_BUFFER_TOO_SMALL,
            "needed",
        );
        assert_eq!(n2, n);
        assert!(buf.iter().all(|&x| x == -7.0), "nothing written");
        expect(
            pat_model_load_shard(m, PAT_ROLE_QKV, 1, 2, 1, buf.as_mut_ptr(), n, &mut n2),
            PAT_OK,
            "",
        );
        assert!(buf.iter().any(|&x| x != -7.0));
        expect(
            pat_model_load_shard(m, 99, 0, 1, 0, buf.as_mut_ptr(), n, &mut n2),
            PAT_ERR_INVALID_ARGUMENT,
            "PAT_ROLE",
        );
        expect(
            pat_model_load_shard(m, PAT_ROLE_O, 2, 1, 0, buf.as_mut_ptr(), n, &mut n2),
            PAT_ERR_INVALID_ARGUMENT,
            "layer 2",
        );
    }
    pat_model_free(m);
}

#[test]
fn params_struct_size_is_checked() {
    let m = open_llama();
    let mut p = pat_engine_default_params();
    assert_eq!(p.struct_size as usize, size_of::<pat_engine_params>());
    p.struct_size = 4;
    let mut e = null_mut();
    // SAFETY: local params and out pointer.
    expect(
        unsafe { pat_engine_new(m, &p, &mut e) },
        PAT_ERR_INVALID_ARGUMENT,
        "struct_size",
    );
    p = pat_engine_default_params();
    p.dtype = 7;
    // SAFETY: as above.
    expect(
        unsafe { pat_engine_new(m, &p, &mut e) },
        PAT_ERR_INVALID_ARGUMENT,
        "PAT_DTYPE",
    );
    assert!(e.is_null());
    pat_model_free(m);
}

#[test]
fn a_panic_becomes_a_status_and_poisons_the_handle() {
    let m = open_llama();
    let (st, e) = small_engine(m, 1, 1);
    expect(st, PAT_OK, "");
    expect(
        pat_test_panic(e),
        PAT_ERR_PANIC,
        "panic: pat_test_panic was called",
    );
    let mut info = pat_engine_info::default();
    // SAFETY: live (poisoned) handle and a local.
    unsafe {
        expect(pat_engine_step(e, null_mut()), PAT_ERR_POISONED, "poisoned");
        expect(
            pat_engine_get_info(e, &mut info),
            PAT_ERR_POISONED,
            "only its _free",
        );
        pat_engine_free(e);
        expect(
            pat_engine_get_info(e, &mut info),
            PAT_ERR_BAD_HANDLE,
            "not live",
        );
    }
    // Other handles are unaffected.
    let mut dims = pat_model_dims::default();
    // SAFETY: live handle and a local.
    expect(unsafe { pat_model_get_dims(m, &mut dims) }, PAT_OK, "");
    pat_model_free(m);
}

#[test]
fn dims_from_config_text_equal_the_opened_model() {
    let m = open_llama();
    let text = std::fs::read_to_string(format!("{}/config.json", super::LLAMA)).unwrap();
    let (mut a, mut b) = (pat_model_dims::default(), pat_model_dims::default());
    // SAFETY: a live model; the text's pointer and length; locals.
    unsafe {
        expect(pat_model_get_dims(m, &mut a), PAT_OK, "");
        expect(
            pat_model_dims_from_config_json(text.as_ptr().cast(), text.len(), &mut b),
            PAT_OK,
            "",
        );
        assert_eq!(a, b);
        assert_eq!(
            (
                a.num_layers,
                a.num_kv_heads,
                a.vocab_size,
                a.tie_word_embeddings
            ),
            (2, 4, 301, 0)
        );
        let bad = "{\"hidden_size\": 64}";
        let mut c = pat_model_dims::default();
        expect(
            pat_model_dims_from_config_json(bad.as_ptr().cast(), bad.len(), &mut c),
            PAT_ERR_BAD_FILE,
            "config.json text",
        );
        assert_eq!(c, pat_model_dims::default());
    }
    pat_model_free(m);
}
