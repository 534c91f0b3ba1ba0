//! Compute backends behind one interface: [`RankOps`], the operations one tensor-parallel rank
//! needs to run the decoder (`model::decoder::forward`, written once over it).
//!
//! - [`cpu`]: the reference oracle every device kernel is tested against (host `Vec<f32>`).
//! - `cuda` (feature `cuda`): the hand-written kernels on a GPU (device buffers); without the
//!   feature a stub says how to build it.
//!
//! A backend never sees the model's structure (which norm comes where, where the collectives
//! go, the residual stream, the vocab-parallel head): only these operations on its own buffers.

pub mod batch;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub mod cuda;

pub use batch::{BatchPlan, SeqInput};

/// `MemAvailable` of /proc/meminfo in bytes (`None` where it cannot be read).
pub fn host_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Device collective groups a backend makes and reuses itself, counted over its ranks' life (one
/// per replica); the CPU backend's groups come from the engine's `GroupCache` instead.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GroupCounts {
    pub created: usize,
    pub reused: usize,
    /// Time the last switch spent making or activating groups, ms.
    pub last_ms: f64,
}

/// What a switch's exchange on the devices did, on one rank or (summed; the slowest rank's times)
/// on every rank together.
#[derive(Clone, Debug, Default)]
pub struct DeviceApplied {
    pub kv: crate::reshard::KvStats,
    /// The KV phase (on the devices: staging, exchange, scatters) and the weight phase (the
    /// rows' exchange), ms.
    pub kv_ms: f64,
    pub weight_ms: f64,
    /// Bytes the staging and both exchanges read plus wrote in device memory, every rank
    /// together: each copy's reads and writes (a byte moved to another rank is read once and
    /// written once by the copy that moves it, and by a gather and a scatter too where it
    /// travels as a message).
    pub memory_bytes: u64,
}

use crate::error::Result;

/// Head counts and constants of one rank's attention block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    /// Query heads on this rank.
    pub q_heads: usize,
    /// KV heads on this rank.
    pub kv_heads: usize,
    pub head_dim: usize,
    /// RMSNorm epsilon (q/k norms).
    pub eps: f32,
    /// Softmax scale, 1 / sqrt(head_dim).
    pub scale: f32,
}

/// The operations one rank runs the decoder with, on its own buffers. Shapes are row-major
/// `[rows, width]`; every method checks what its kernel cannot. `Buf` is an activation buffer,
/// `Weight` a weight tensor of the rank's shard, `Batch` the per-call metadata of a packed batch
/// (token ids, positions, cache slots, block tables) in the backend's memory.
pub trait RankOps {
    type Buf;
    type Weight;
    type Batch;

    /// Validates a packed batch against the rank's KV pool and uploads its metadata.
    fn batch(&mut self, seqs: &[SeqInput], vocab_size: usize) -> Result<Self::Batch>;
    /// A zeroed activation buffer of `len` elements.
    fn zeros(&mut self, len: usize) -> Result<Self::Buf>;
    /// `out[t] = table[id_t - vocab_start]` for the tokens whose id falls in this rank's rows of
    /// the vocab-parallel table, zero for the others (the all-reduce that follows completes it).
    fn embedding(
        &mut self,
        out: &mut Self::Buf,
        b: &Self::Batch,
        table: &Self::Weight,
        hidden: usize,
        vocab_start: usize,
    ) -> Result<()>;
    /// `out = rmsnorm(x) * w` over `rows` rows.
    fn rmsnorm(
        &mut self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Weight,
        rows: usize,
        eps: f32,
    ) -> Result<()>;
    /// The residual step: `x += add`, then `out = rmsnorm(x) * w`.
    fn add_rmsnorm(
        &mut self,
        out: &mut Self::Buf,
        x: &mut Self::Buf,
        add: &Self::Buf,
        w: &Self::Weight,
        rows: usize,
        eps: f32,
    ) -> Result<()>;
    /// `out[n, m] = a[n, k] · w[m, k]ᵀ` (a column-parallel weight stored [out, in]).
    #[allow(clippy::too_many_arguments)]
    fn gemm_nt(
        &mut self,
        out: &mut Self::Buf,
        a: &Self::Buf,
        w: &Self::Weight,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()>;
    /// `out[n, m] = a[n, k] · w[k, m]` (a row-parallel weight stored [in, out]).
    #[allow(clippy::too_many_arguments)]
    fn gemm_nn(
        &mut self,
        out: &mut Self::Buf,
        a: &Self::Buf,
        w: &Self::Weight,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()>;
    /// The attention core of layer `layer` over the packed `qkv` rows `[q | k | v]`: optional
    /// per-head q/k RMSNorm, RoPE on q and k, K/V appended to the paged cache at the batch's
    /// slots, then causal attention of each token over its sequence's cache into `out`
    /// `[rows, q_heads * head_dim]`. `qkv` may be changed in place.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        layer: usize,
        out: &mut Self::Buf,
        qkv: &mut Self::Buf,
        b: &Self::Batch,
        qk_norm: Option<(&Self::Weight, &Self::Weight)>,
        shape: AttnShape,
    ) -> Result<()>;
    /// `out[r] = silu(gu[r][..inter]) * gu[r][inter..]`.
    fn silu_mul(
        &mut self,
        out: &mut Self::Buf,
        gu: &Self::Buf,
        rows: usize,
        inter: usize,
    ) -> Result<()>;
    /// Row `last_row(s)` of `x` for every sequence `s` of the batch, into `out` `[seqs, hidden]`.
    fn last_rows(
        &mut self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        b: &Self::Batch,
        hidden: usize,
    ) -> Result<()>;
    /// Sums `buf` over the rank's tp group, in place.
    fn all_reduce_sum(&mut self, buf: &mut Self::Buf) -> Result<()>;
    /// Concatenates every member's `local` in rank order into `out`.
    fn all_gather(&mut self, local: &Self::Buf, out: &mut Self::Buf) -> Result<()>;
    /// An f32 host copy of `buf`.
    fn to_host(&mut self, buf: &Self::Buf) -> Result<Vec<f32>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_memory_is_read_from_proc_meminfo() {
        let avail = host_available_bytes().expect("/proc/meminfo has MemAvailable on Linux");
        assert!(avail > 1 << 20, "{avail} bytes available");
    }
}
