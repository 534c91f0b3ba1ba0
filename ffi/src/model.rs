//! Model directories (`pat::model::ModelDir`) and model dimensions: what the planners need of a
//! model, filled from an opened directory, from config.json text, or by hand.

use std::ffi::c_char;
use std::path::Path;

use pat::model::config::{Arch, ModelConfig};
use pat::model::rank_weights::load_role;
use pat::model::ModelDir;
use pat::parallel::layout::check_tp_for_model;
use pat::parallel::shard::{self, Role};

use crate::handle;
use crate::status::{guard, guard_void, pat_status, Fail, FfiResult};
use crate::util::{c_str, copy_out, slice, Out};

/// An opened model directory: config.json, the memory-mapped checkpoint and, when present,
/// tokenizer.json. Opaque; free with `pat_model_free`.
pub struct pat_model {
    _opaque: [u8; 0],
}

/// `LlamaForCausalLM`.
pub const PAT_ARCH_LLAMA: u32 = 0;
/// `Qwen3ForCausalLM` (per-head q/k RMSNorm).
pub const PAT_ARCH_QWEN3: u32 = 1;

/// The tensor-parallel weight roles (`pat::parallel::shard::Role`). Every one is a matrix of rows
/// of `hidden_size` elements, rows along the split axis:
/// - `PAT_ROLE_QKV`: fused [q; k; v] (rows = this rank's q heads * head_dim, then its k heads,
///   then its v heads; column-parallel, stored [out, in] as HF does);
/// - `PAT_ROLE_O`: o_proj transposed ([in, out]: rows = this rank's q heads * head_dim);
/// - `PAT_ROLE_GATE_UP`: fused [gate; up] (this rank's intermediate rows of gate, then of up);
/// - `PAT_ROLE_DOWN`: down_proj transposed (this rank's intermediate rows);
/// - `PAT_ROLE_EMBED`, `PAT_ROLE_LM_HEAD`: vocab-parallel rows of the embedding and the head,
///   the vocabulary padded with zero rows to a multiple of lcm(tp, 64). With tied embeddings
///   there is no separate head: plans have no `PAT_ROLE_LM_HEAD` and
///   `pat_model_load_shard(PAT_ROLE_LM_HEAD)` gives the embedding's rows.
pub const PAT_ROLE_QKV: u32 = 0;
pub const PAT_ROLE_O: u32 = 1;
pub const PAT_ROLE_GATE_UP: u32 = 2;
pub const PAT_ROLE_DOWN: u32 = 3;
pub const PAT_ROLE_EMBED: u32 = 4;
pub const PAT_ROLE_LM_HEAD: u32 = 5;

/// Model dimensions: what the planners read of a model. Fill it with `pat_model_get_dims` or
/// `pat_model_dims_from_config_json`, or by hand with `struct_size = sizeof(pat_model_dims)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pat_model_dims {
    pub struct_size: u32,
    /// `PAT_ARCH_*`.
    pub arch: u32,
    pub num_layers: u32,
    pub hidden_size: u32,
    pub intermediate_size: u32,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub vocab_size: u32,
    /// Nonzero: the head shares the embedding's weights.
    pub tie_word_embeddings: u32,
}

pub(crate) fn role_of(r: u32) -> FfiResult<Role> {
    Ok(match r {
        PAT_ROLE_QKV => Role::Qkv,
        PAT_ROLE_O => Role::O,
        PAT_ROLE_GATE_UP => Role::GateUp,
        PAT_ROLE_DOWN => Role::Down,
        PAT_ROLE_EMBED => Role::Embed,
        PAT_ROLE_LM_HEAD => Role::LmHead,
        other => return Err(Fail::Invalid(format!("role {other} is not a PAT_ROLE_*"))),
    })
}

pub(crate) fn role_code(r: Role) -> u32 {
    match r {
        Role::Qkv => PAT_ROLE_QKV,
        Role::O => PAT_ROLE_O,
        Role::GateUp => PAT_ROLE_GATE_UP,
        Role::Down => PAT_ROLE_DOWN,
        Role::Embed => PAT_ROLE_EMBED,
        Role::LmHead => PAT_ROLE_LM_HEAD,
    }
}

pub(crate) fn dims_of(c: &ModelConfig) -> pat_model_dims {
    let u = crate::util::u32_of;
    pat_model_dims {
        struct_size: size_of::<pat_model_dims>() as u32,
        arch: match c.arch {
            Arch::Llama => PAT_ARCH_LLAMA,
            Arch::Qwen3 => PAT_ARCH_QWEN3,
        },
        num_layers: u(c.num_layers),
        hidden_size: u(c.hidden_size),
        intermediate_size: u(c.intermediate_size),
        num_heads: u(c.num_heads),
        num_kv_heads: u(c.num_kv_heads),
        head_dim: u(c.head_dim),
        vocab_size: u(c.vocab_size),
        tie_word_embeddings: c.tie_word_embeddings as u32,
    }
}

/// The planners' view of hand-given dims: a `ModelConfig` whose non-shape fields are neutral.
///
/// # Safety
/// `d` is NULL or points to a readable `pat_model_dims`.
pub(crate) unsafe fn config_of(d: *const pat_model_dims) -> FfiResult<ModelConfig> {
    if d.is_null() {
        return Err(Fail::Null("dims"));
    }
    // SAFETY: non-NULL and readable by the contract.
    let d = unsafe { d.read_unaligned() };
    if (d.struct_size as usize) < size_of::<pat_model_dims>() {
        return Err(Fail::Invalid(format!(
            "`dims.struct_size` is {}, expected {}",
            d.struct_size,
            size_of::<pat_model_dims>()
        )));
    }
    let arch = match d.arch {
        PAT_ARCH_LLAMA => Arch::Llama,
        PAT_ARCH_QWEN3 => Arch::Qwen3,
        a => {
            return Err(Fail::Invalid(format!(
                "`dims.arch` {a} is not a PAT_ARCH_*"
            )))
        }
    };
    for (what, v) in [
        ("num_layers", d.num_layers),
        ("hidden_size", d.hidden_size),
        ("intermediate_size", d.intermediate_size),
        ("num_heads", d.num_heads),
        ("num_kv_heads", d.num_kv_heads),
        ("head_dim", d.head_dim),
        ("vocab_size", d.vocab_size),
    ] {
        if v == 0 || v > 1 << 30 {
            return Err(Fail::Invalid(format!(
                "`dims.{what}` is {v}, expected 1 ..= 2^30"
            )));
        }
    }
    if d.num_heads % d.num_kv_heads != 0 {
        return Err(Fail::Invalid(format!(
            "`dims.num_kv_heads` {} does not divide `num_heads` {}",
            d.num_kv_heads, d.num_heads
        )));
    }
    let cfg = ModelConfig {
        arch,
        vocab_size: d.vocab_size as usize,
        hidden_size: d.hidden_size as usize,
        intermediate_size: d.intermediate_size as usize,
        num_layers: d.num_layers as usize,
        num_heads: d.num_heads as usize,
        num_kv_heads: d.num_kv_heads as usize,
        head_dim: d.head_dim as usize,
        rms_norm_eps: 1e-6,
        rope_theta: 1e4,
        rope_scaling: None,
        max_position_embeddings: 1,
        tie_word_embeddings: d.tie_word_embeddings != 0,
        bos_token_id: None,
        eos_token_ids: Vec::new(),
        dtype: None,
    };
    // The bounds config.json gets (products of sizes stay inside u64; plans stay small).
    cfg.check_sizes()
        .map_err(|m| Fail::Invalid(format!("`dims`: {m}")))?;
    Ok(cfg)
}

/// Opens the HF model directory `dir` (UTF-8 path): config.json, model.safetensors or its
/// sharded index, and tokenizer.json if present. The checkpoint is memory-mapped, so opening is
/// cheap; ranks read only their rows later. On success `*out` is a new handle.
/// Errors: `PAT_ERR_INVALID_ARGUMENT` (not a directory), `PAT_ERR_BAD_FILE`, `PAT_ERR_IO`,
/// `PAT_ERR_UNSUPPORTED`. Thread-safe.
///
/// # Safety
/// `dir` is a NUL-terminated string; `out` is a writable `pat_model *`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_model_open(
    dir: *const c_char,
    out: *mut *mut pat_model,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is writable).
        let out = unsafe { Out::new(out, "out") }?;
        // SAFETY: forwarded contract.
        let dir = unsafe { c_str(dir, "dir") }?;
        let m = ModelDir::open(Path::new(dir))?;
        out.put(handle::register("pat_model", m));
        Ok(())
    })
}

/// Frees a model. NULL, or a handle already freed, is a no-op. Engines made from the model do
/// not need it any more. Thread-safe (the model is dropped when no other call is using it).
#[unsafe(no_mangle)]
pub extern "C" fn pat_model_free(model: *mut pat_model) {
    guard_void(|| handle::release::<ModelDir, _>(model));
}

/// The dimensions of an opened model. Thread-safe.
///
/// # Safety
/// `out` is a writable `pat_model_dims`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_model_get_dims(
    model: *const pat_model,
    out: *mut pat_model_dims,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is writable).
        let out = unsafe { Out::new(out, "out") }?;
        let d = handle::with(model, "model", "pat_model", |m: &mut ModelDir| {
            Ok(dims_of(&m.cfg))
        })?;
        out.put(d);
        Ok(())
    })
}

/// The dimensions in HF config.json text (`len` bytes, UTF-8, no NUL needed), for engines that
/// already hold the config. Validated as `pat_model_open` validates config.json. Thread-safe.
///
/// # Safety
/// `json` points to `len` readable bytes; `out` is a writable `pat_model_dims`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_model_dims_from_config_json(
    json: *const c_char,
    len: usize,
    out: *mut pat_model_dims,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`out` is writable).
        let out = unsafe { Out::new(out, "out") }?;
        // SAFETY: forwarded contract.
        let bytes = unsafe { slice(json.cast::<u8>(), len, "json") }?;
        let text =
            std::str::from_utf8(bytes).map_err(|_| Fail::Invalid("`json` is not UTF-8".into()))?;
        let cfg = ModelConfig::from_json(text, Path::new("<config.json text>"))?;
        out.put(dims_of(&cfg));
        Ok(())
    })
}

/// Copies the rows of `role` that tp-rank `tp_rank` of `tp` holds in `layer` (ignored for the
/// embedding and head) into `buf`, as pat loads them for its own ranks: f32, row-major
/// [rows, hidden_size], rows in the order `PAT_ROLE_*` describes, zero padding rows included.
/// `*n` receives the element count (rows * hidden_size); with `cap` too small only `*n` is
/// written and the call returns `PAT_BUFFER_TOO_SMALL` (call with `buf` NULL and `cap` 0 to ask).
/// Errors: `PAT_ERR_INVALID_ARGUMENT` for a bad role, layer, tp or tp_rank. Thread-safe.
///
/// # Safety
/// `buf` is NULL or holds `cap` writable floats; `n` is a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_model_load_shard(
    model: *const pat_model,
    role: u32,
    layer: u32,
    tp: u32,
    tp_rank: u32,
    buf: *mut f32,
    cap: usize,
    n: *mut usize,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`n` is writable).
        let n = unsafe { Out::new(n, "n") }?;
        let role = role_of(role)?;
        handle::with(model, "model", "pat_model", |m: &mut ModelDir| {
            let cfg = &m.cfg;
            let (tp, r, l) = (tp as usize, tp_rank as usize, layer as usize);
            if tp == 0 || r >= tp {
                return Err(Fail::Invalid(format!("tp_rank {r} is not below tp {tp}")));
            }
            check_tp_for_model(tp, cfg)?;
            if Role::LAYER.contains(&role) && l >= cfg.num_layers {
                return Err(Fail::Invalid(format!(
                    "layer {l}: the model has {} layers",
                    cfg.num_layers
                )));
            }
            let elems = shard::rows(cfg, role, tp) * cfg.hidden_size;
            if elems > cap {
                n.put(elems);
                return Err(Fail::TooSmall {
                    what: "buf",
                    needed: elems,
                    cap,
                });
            }
            let rows = load_role(&m.ck, cfg, role, l, tp, r)?;
            // SAFETY: forwarded contract (`buf` holds `cap >= elems` floats).
            unsafe { copy_out(&rows, buf, cap, &n, "buf") }
        })
    })
}
