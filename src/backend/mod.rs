//! Compute backends. `cpu` is the reference oracle every device kernel is tested against.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
