//! `DeviceComm`: collectives on device buffers, for GPU ranks.
//!
//! - [`SoloComm`]: a group of one (tp = 1).
//! - [`SameDeviceComm`]: several ranks on one GPU, each on its own thread and stream. All-reduce is
//!   one `all_reduce_sum` kernel launched by rank 0 that reads every rank's buffer and writes the
//!   sum (f32, rank order, one rounding — the same as the CPU Comm) back into every rank's buffer;
//!   all-gather is each rank copying its peers' buffers. Cross-stream order uses events: each rank
//!   records "ready" after producing its buffer, the readers wait on it, and every rank waits for
//!   the readers' "done" events before it touches its buffer again.
//! - [`HostComm`]: any host `Comm` (e.g. the CPU group) through host memory — correct anywhere,
//!   slow; the cross-check for the device collectives.
//! - `NcclComm` (`nccl.rs`): one rank per GPU.
//!
//! Besides collectives, every group does point-to-point [`DeviceComm::exchange`]: what a live
//! TP switch's per-rank programs send and receive (KV pieces, weight rows), all of a rank's
//! messages in one call. Same-device members copy straight out of the sender's buffers (no
//! staging), or with [`DeviceComm::exchange_then`] read them in place (no copy at all), or with
//! [`DeviceComm::share`] exchange only descriptions of memory that each reader then reads in
//! place (a switch's KV, copied from the sender's old pool into the receiver's new one); NCCL
//! runs them as one grouped `ncclSend` / `ncclRecv`.

use super::buffer::DView;
use super::device::CudaDev;
use crate::error::{Error, Result};
use crate::parallel::Comm;

pub use super::same_device::SameDeviceComm;

/// What [`DeviceComm::exchange_then`] hands each received message to: (its index in `recvs`,
/// a view of its bytes).
pub type Take<'a> = dyn FnMut(usize, DView<'_>) -> Result<()> + 'a;

/// What [`DeviceComm::share`] hands each offer addressed to this member: (its index in
/// `expect`, the offer's words).
pub type Read<'a> = dyn FnMut(usize, &[u64]) -> Result<()> + 'a;

/// Collectives over one group of ranks, on device buffers of any float dtype.
pub trait DeviceComm {
    /// This member's index in the group (its tp-rank).
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over the group, in rank order with f32 accumulation, into every member's
    /// `buf` (same length and dtype on every member). Ordered on `dev`'s stream.
    fn all_reduce_sum(&self, dev: &CudaDev, buf: DView<'_>) -> Result<()>;
    /// Every member's `local` (equal lengths) concatenated in rank order into `out`.
    fn all_gather(&self, dev: &CudaDev, local: DView<'_>, out: DView<'_>) -> Result<()>;
    /// Point-to-point, called by every member at once: sends each `sends[i].1` to member
    /// `sends[i].0` and receives into each `recvs[j].1` from member `recvs[j].0`. Between two
    /// members the k-th send matches the k-th receive, and they must hold the same bytes. A sent
    /// buffer must stay unchanged until the call returns; work this member's stream runs after
    /// the call may reuse or free it. Ordered on `dev`'s stream.
    fn exchange(
        &self,
        dev: &CudaDev,
        sends: &[(usize, DView<'_>)],
        recvs: &[(usize, DView<'_>)],
    ) -> Result<()>;
    /// [`DeviceComm::exchange`], then each received message handed to `take(j, message)` in
    /// `recvs` order, ordered on `dev`'s stream; `recvs[j]` names the peer and the length.
    /// What `take` reads may be `recvs[j].1` (received into, the default) or, where a member
    /// can read the sender's buffer directly ([`SameDeviceComm`]), the sender's own buffer: no
    /// copy, and only valid for work `take` enqueues on `dev`'s stream before it returns. An
    /// error from `take` fails the exchange (and poisons the group); a caller that must keep
    /// its peers' protocol going records its own failure and returns `Ok`.
    fn exchange_then(
        &self,
        dev: &CudaDev,
        sends: &[(usize, DView<'_>)],
        recvs: &[(usize, DView<'_>)],
        take: &mut Take<'_>,
    ) -> Result<()> {
        self.exchange(dev, sends, recvs)?;
        recvs
            .iter()
            .enumerate()
            .try_for_each(|(j, (_, v))| take(j, *v))
    }
    /// Whether members read each other's device memory in place ([`DeviceComm::share`]).
    fn shares_memory(&self) -> bool {
        false
    }
    /// Point-to-point by reference, where members share device memory ([`SameDeviceComm`]):
    /// called by every member at once. Each member offers `offers[i].1` to member
    /// `offers[i].0`: words describing some of its own device memory (addresses and geometry,
    /// in the caller's encoding, as RDMA keys would). `read(j, words)` is then called for each
    /// offer addressed to this member, `expect[j]` naming the member of its j-th; between two
    /// members the k-th offer matches the k-th expected. Work `read` enqueues on `dev`'s stream
    /// before it returns may read the offered memory, after whatever the offering member's
    /// stream did before the call; the offering member leaves that memory allocated and
    /// unchanged until its stream has waited for every reader. Errors (poisoning nothing)
    /// where members do not share memory; an error from `read` fails the call and poisons the
    /// group.
    fn share(
        &self,
        _dev: &CudaDev,
        _offers: &[(usize, Vec<u64>)],
        _expect: &[usize],
        _read: &mut Read<'_>,
    ) -> Result<()> {
        Err(Error::Rank {
            rank: self.rank(),
            msg: "this group's members do not share device memory: exchange messages instead"
                .into(),
        })
    }
    /// Marks the group failed so peers stop waiting.
    fn poison(&self);
}

/// Errors unless every one of `peers` is another member of a group of `size`.
pub(super) fn check_members(
    me: usize,
    size: usize,
    mut peers: impl Iterator<Item = usize>,
) -> Result<()> {
    match peers.find(|&p| p >= size || p == me) {
        Some(p) => Err(Error::Rank {
            rank: me,
            msg: format!("exchange names member {p} of a group of {size} (itself or outside it)"),
        }),
        None => Ok(()),
    }
}

/// Errors unless every peer of `sends` and `recvs` is another member of a group of `size`.
pub(super) fn check_peers(
    me: usize,
    size: usize,
    sends: &[(usize, DView<'_>)],
    recvs: &[(usize, DView<'_>)],
) -> Result<()> {
    check_members(me, size, sends.iter().chain(recvs).map(|(p, _)| *p))
}

/// Bytes a view covers.
pub(super) fn bytes_of(v: &DView<'_>) -> usize {
    v.len() * v.dtype().size()
}

/// A group of one: all-reduce is a no-op, all-gather a copy.
pub struct SoloComm;

impl DeviceComm for SoloComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _dev: &CudaDev, _buf: DView<'_>) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, dev: &CudaDev, local: DView<'_>, out: DView<'_>) -> Result<()> {
        copy_into(dev, out, 0, local)
    }
    fn exchange(
        &self,
        _dev: &CudaDev,
        sends: &[(usize, DView<'_>)],
        recvs: &[(usize, DView<'_>)],
    ) -> Result<()> {
        check_peers(0, 1, sends, recvs)
    }
    fn poison(&self) {}
}

/// `out[at ..] = src` on `dev`'s stream.
pub(super) fn copy_into(dev: &CudaDev, out: DView<'_>, at: usize, src: DView<'_>) -> Result<()> {
    let dst = out.slice(at, src.len())?;
    dst.check_dtype(src.dtype(), "all_gather")?;
    // SAFETY: both views are live and hold src.len() elements of the same dtype.
    unsafe { dev.dtod(dst.ptr(), src.ptr(), src.len() * src.dtype().size()) }
}

/// Device collectives through a host `Comm`: download (waits for the stream), host collective,
/// upload. Results match the host Comm's exactly (then rounded once to the buffer's dtype).
pub struct HostComm<'a> {
    comm: &'a dyn Comm,
}

impl<'a> HostComm<'a> {
    pub fn new(comm: &'a dyn Comm) -> Self {
        HostComm { comm }
    }
}

impl DeviceComm for HostComm<'_> {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn size(&self) -> usize {
        self.comm.size()
    }
    fn all_reduce_sum(&self, dev: &CudaDev, buf: DView<'_>) -> Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let mut h = buf.to_f32(dev)?;
        self.comm.all_reduce_sum(&mut h)?;
        buf.write_f32(dev, &h)
    }
    fn all_gather(&self, dev: &CudaDev, local: DView<'_>, out: DView<'_>) -> Result<()> {
        let h = local.to_f32(dev)?;
        let mut g = vec![0f32; h.len() * self.comm.size()];
        self.comm.all_gather(&h, &mut g)?;
        out.write_f32(dev, &g)
    }
    /// Through host f32 copies (float views only): the host `Comm`'s sends are buffered, so
    /// every member sends everything first, then receives.
    fn exchange(
        &self,
        dev: &CudaDev,
        sends: &[(usize, DView<'_>)],
        recvs: &[(usize, DView<'_>)],
    ) -> Result<()> {
        let r = (|| {
            check_peers(self.comm.rank(), self.comm.size(), sends, recvs)?;
            for (to, v) in sends {
                self.comm.send(*to, &v.to_f32(dev)?)?;
            }
            for (from, v) in recvs {
                let mut h = vec![0f32; v.len()];
                self.comm.recv(*from, &mut h)?;
                v.write_f32(dev, &h)?;
            }
            Ok(())
        })();
        if r.is_err() {
            self.comm.poison();
        }
        r
    }
    fn poison(&self) {
        self.comm.poison();
    }
}
