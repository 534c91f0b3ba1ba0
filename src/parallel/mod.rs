//! Parallel layout (world, tp, placement), shard rules, and communication groups.

pub mod comm;
pub mod layout;
pub mod shard;

pub use comm::{Comm, CpuComm, GroupCache};
pub use layout::Layout;
