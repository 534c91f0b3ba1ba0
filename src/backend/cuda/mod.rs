//! CUDA backend (feature `cuda`): driver probe, devices (context, stream, embedded kernels,
//! cuBLAS), device buffers, typed launch wrappers, device collectives and a GPU decoder rank.
//!
//! Layering, bottom up:
//! - [`device`]: [`CudaDev`] — probes `libcuda` before touching it (cudarc's dynamic loading
//!   panics on a missing library), owns one context handle, one stream, every `cuda/*.cu` fatbin
//!   loaded with `cuModuleLoadData`, and one cuBLAS handle.
//! - [`buffer`]: [`DBuf`] (owned, dtype-tagged device memory) and [`DView`] (a bounds-carrying
//!   window into one) — the only way device memory is named above this layer.
//! - [`ops`]: one typed wrapper per kernel family plus the cuBLAS GEMMs; the only place raw
//!   launches happen. Wrappers check the limits listed in the kernel headers and return
//!   `Error::Device` instead of launching.
//! - [`comm`]: [`DeviceComm`] collectives on device buffers: same-device groups (several ranks on
//!   one GPU, all-reduce by the `all_reduce_sum` kernel) and an adapter over any host `Comm`.
//! - [`testing`]: device-or-skip and tolerance helpers shared by the GPU tests.
//! - [`rank`]: [`GpuRank`] — one rank's weights and paged KV pool on a device and the decoder
//!   forward, step for step the same as `model::decoder::forward`.
//!
//! Threading: a `CudaDev` (and so a `GpuRank`) is confined to the thread that made it — it holds
//! raw driver handles and is neither `Send` nor `Sync`. Run one thread per rank and create each
//! rank's device inside its thread (several devices on one GPU share its primary context, so
//! their buffers are visible to each other, which the same-device comm relies on).

pub mod bench;
pub mod bench_reshard;
pub mod buffer;
pub mod comm;
pub mod device;
pub mod nccl;
pub mod ops;
pub mod placement;
pub mod rank;
mod same_device;
pub mod testing;
pub mod workers;

pub use buffer::{DBuf, DType, DView, HostElem};
pub use comm::{DeviceComm, HostComm, SameDeviceComm, SoloComm};
pub use device::{probe, CudaDev};
pub use ops::launches;
pub use rank::{GpuKvPool, GpuRank};
pub use workers::{GpuOptions, GpuRanks};

// Committed bindgen output for `cuda/params.h` (see the file's header and
// scripts/check-params-bindings.sh); generated code, so bindgen's naming is kept.
#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    missing_docs,
    clippy::all
)]
pub mod params;

/// The embedded fatbins, one per `cuda/*.cu` file (see build.rs).
#[allow(dead_code, clippy::all)]
mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Names of the embedded kernel files (`cuda/<name>.cu`), in load order.
pub fn kernel_files() -> Vec<&'static str> {
    kernels::KERNELS.iter().map(|(name, _)| *name).collect()
}

/// `map_err` adapter for driver and cuBLAS errors: `Error::Device("<what>: <cause>")`.
pub(crate) fn dev_err<E: std::fmt::Display>(
    what: impl std::fmt::Display,
) -> impl FnOnce(E) -> crate::error::Error {
    move |e| crate::error::Error::Device(format!("{what}: {e}"))
}
