//! NCCL collectives for groups of one rank per GPU: [`NcclComm`] implements [`DeviceComm`] with
//! `ncclAllReduce` / `ncclAllGather` enqueued on the rank's own stream, and a switch's
//! point-to-point exchange as one `ncclGroupStart` .. `ncclGroupEnd` of `ncclSend` / `ncclRecv`
//! (bytes), so no member waits on a peer that is itself waiting.
//!
//! Set-up: one thread makes an [`NcclId`] (it also starts NCCL's bootstrap listener in this
//! process) and hands a copy to every rank thread; each rank thread opens its own [`CudaDev`] on
//! its own GPU and calls [`NcclComm::init`] — all `size` of them concurrently, since the call
//! blocks until the whole group has joined. The communicator then stays on that thread.
//!
//! Loading: cudarc is built with dynamic loading and *panics* on the first NCCL call when the
//! library cannot be opened, so every entry point here first checks [`nccl_available`]. Note that
//! cudarc (0.19) looks for `libnccl.so`, `libnccl.so.1`, `.9` .. `.13` — not `libnccl.so.2`, the
//! only name NVIDIA's pip wheel (`nvidia-nccl-cu12`) ships; with that wheel, make a `libnccl.so`
//! symlink to `libnccl.so.2` in a folder on `LD_LIBRARY_PATH`. The bindings are those of NCCL
//! 2.30 (cudarc's default `nccl` feature); only functions present in every NCCL 2.x are called,
//! except `ncclGetLastError` (2.13+), which is called only when the loaded library is new enough.
//!
//! Numerics: NCCL sums in its own order (ring or tree, chosen by size and topology) and, for
//! bf16/f16, rounds to the buffer's dtype at every hop, so results are *not* bitwise equal to
//! [`SameDeviceComm`](super::SameDeviceComm) or [`HostComm`](super::HostComm) (rank order, f32
//! accumulation, one rounding); they agree to the dtype's tolerance.
//!
//! Failure: NCCL cannot be woken from a collective a peer never joins except through
//! `ncclCommAbort` on the waiting rank's communicator — the kernel spins on the GPU, and a later
//! stream synchronize on that rank blocks forever. [`DeviceComm::poison`] aborts this rank's
//! communicator at once (so its own stream drains), but it cannot reach the peers' communicators:
//! every rank must poison its own on failure, before it waits on its stream again.

use std::cell::Cell;
use std::ffi::{c_int, c_void, CStr};
use std::fmt;
use std::sync::OnceLock;

use cudarc::nccl::result::{self as nccl, NcclError};
use cudarc::nccl::sys;

use super::buffer::{DType, DView};
use super::comm::{bytes_of, DeviceComm};
use super::device::CudaDev;
use crate::error::{Error, Result};

/// Whether the NCCL library can be loaded (a dlopen probe, cached for the process). Every
/// function of this module checks it first, because cudarc panics on a missing library.
pub fn nccl_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: `is_culib_present` only tries to dlopen the candidate library names and closes them.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// `Ok` when NCCL can be loaded, else the error every entry point returns.
fn require_nccl() -> Result<()> {
    if nccl_available() {
        Ok(())
    } else {
        Err(Error::Device(
            "NCCL not found (libnccl.so.2); put the folder holding it on LD_LIBRARY_PATH \
             (cudarc opens it as libnccl.so, so that folder needs a libnccl.so -> libnccl.so.2 \
             symlink)"
                .into(),
        ))
    }
}

/// NCCL's text for a result code (static strings owned by the library).
fn describe(code: sys::ncclResult_t) -> String {
    // SAFETY: only reached after an NCCL call returned `code`, so the library is loaded;
    // ncclGetErrorString returns a pointer to a static NUL-terminated string (or null).
    let s = unsafe { sys::ncclGetErrorString(code) };
    if s.is_null() {
        format!("{code:?}")
    } else {
        // SAFETY: non-null, NUL-terminated and static (see above).
        let text = unsafe { CStr::from_ptr(s) }.to_string_lossy();
        format!("{code:?} ({text})")
    }
}

/// `map_err` adapter for NCCL errors: `Error::Device("<what>: <code> (<text>)")`.
fn nccl_err(what: impl fmt::Display) -> impl FnOnce(NcclError) -> Error {
    move |e| Error::Device(format!("{what}: {}", describe(e.0)))
}

/// The loaded NCCL's version as (major, minor, patch).
pub fn nccl_version() -> Result<(u32, u32, u32)> {
    require_nccl()?;
    let code = nccl::get_nccl_version().map_err(nccl_err("ncclGetVersion"))?;
    Ok(split_version(code))
}

/// Decodes NCCL_VERSION_CODE: `major*10000 + minor*100 + patch` since 2.9, `major*1000 +
/// minor*100 + patch` before.
fn split_version(code: c_int) -> (u32, u32, u32) {
    let c = code.max(0) as u32;
    if c >= 10000 {
        (c / 10000, (c % 10000) / 100, c % 100)
    } else {
        (c / 1000, (c % 1000) / 100, c % 100)
    }
}

/// NCCL_VERSION_CODE of 2.10.0, the first release with bf16.
const NCCL_BF16_SINCE: c_int = 21000;
/// NCCL_VERSION_CODE of 2.13.0, the first release with ncclGetLastError.
const NCCL_LAST_ERROR_SINCE: c_int = 21300;

/// A group's unique id (`ncclUniqueId`, 128 opaque bytes): made once, copied to every member.
/// Plain bytes, so it is `Send` and can be handed to the rank threads.
#[derive(Clone, Copy)]
pub struct NcclId(sys::ncclUniqueId);

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`). This also starts NCCL's bootstrap root in this process,
    /// which the members reach over a socket (`NCCL_SOCKET_IFNAME` picks the interface), so keep
    /// the process alive until every member has finished [`NcclComm::init`].
    pub fn new() -> Result<NcclId> {
        require_nccl()?;
        nccl::get_uniqueid()
            .map(NcclId)
            .map_err(nccl_err("ncclGetUniqueId"))
    }
}

impl fmt::Debug for NcclId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NcclId(..)")
    }
}

// The id is handed from the thread that made it to the rank threads.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<NcclId>();
};

/// NCCL's element type for a reduction over `dt` (floats only); `version` is the loaded NCCL's.
fn reduce_dtype(dt: DType, version: c_int) -> Result<sys::ncclDataType_t> {
    match dt {
        DType::F32 => Ok(sys::ncclDataType_t::ncclFloat32),
        DType::F16 => Ok(sys::ncclDataType_t::ncclFloat16),
        DType::Bf16 if version < NCCL_BF16_SINCE => {
            let (ma, mi, pa) = split_version(version);
            Err(Error::Device(format!(
                "all_reduce_sum: the loaded NCCL {ma}.{mi}.{pa} has no bf16 reductions \
                 (2.10 or newer needed)"
            )))
        }
        // cudarc's NCCL 2.24+ bindings (ours: 2.30, its default `nccl` feature) have the
        // variant; the 2.22 bindings do not, and this line would stop compiling if the cudarc
        // features were changed to those.
        DType::Bf16 => Ok(sys::ncclDataType_t::ncclBfloat16),
        other => Err(Error::Device(format!(
            "all_reduce_sum: {} is not a float dtype",
            other.name()
        ))),
    }
}

/// One rank's NCCL communicator, for a group of one rank per GPU.
///
/// Confined to the thread that made it (it holds a raw `ncclComm_t`, so it is neither `Send` nor
/// `Sync`), like the [`CudaDev`] it was made with. Collectives are enqueued on that device's
/// stream and return without waiting. Drop it after the device's stream has drained of its
/// collectives and before dropping the device.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    rank: usize,
    size: usize,
    /// The device ordinal the communicator was made on; collectives check it.
    ordinal: usize,
    /// NCCL_VERSION_CODE of the loaded library.
    version: c_int,
    /// Set by `poison` (after which `comm` has been aborted and must not be used again).
    poisoned: Cell<bool>,
}

impl NcclComm {
    /// Joins member `rank` of a group of `size` (`ncclCommInitRank`) on `dev`'s GPU.
    ///
    /// Must be called concurrently by all `size` members with copies of the same `id`, each from
    /// its own thread with its own `dev` on a distinct GPU: the call blocks until every member
    /// has joined (a member that never calls it leaves the others blocked). `dev`'s context is
    /// made current first, since NCCL takes the device from the calling thread's current one.
    pub fn init(dev: &CudaDev, id: NcclId, rank: usize, size: usize) -> Result<NcclComm> {
        require_nccl()?;
        let gpus = cudarc::driver::result::device::get_count()
            .map_err(super::dev_err("cuDeviceGetCount"))?
            .max(0) as usize;
        if size == 0 || size > gpus {
            return Err(Error::Layout(format!(
                "an NCCL group has 1..={gpus} members (one per GPU), not {size}"
            )));
        }
        if rank >= size {
            return Err(Error::Layout(format!(
                "NCCL rank {rank} is outside a group of {size}"
            )));
        }
        let version = nccl::get_nccl_version().map_err(nccl_err("ncclGetVersion"))?;
        dev.bind()?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; size and rank were checked (size <= device count
        // fits a c_int, rank < size), and `id` is a complete ncclUniqueId made by ncclGetUniqueId.
        let r = unsafe { nccl::comm_init_rank(&mut comm, size as c_int, id.0, rank as c_int) };
        if let Err(e) = r {
            if !comm.is_null() {
                // SAFETY: a non-null handle from a failed init is a live, half-made communicator
                // (NCCL nulls the pointer when it frees one itself); abort releases it.
                let _ = unsafe { nccl::comm_abort(comm) };
            }
            return Err(nccl_err(format!(
                "ncclCommInitRank (rank {rank} of {size} on GPU {})",
                dev.ordinal()
            ))(e));
        }
        if comm.is_null() {
            return Err(Error::Device(format!(
                "ncclCommInitRank (rank {rank} of {size}) returned no communicator"
            )));
        }
        let made = NcclComm {
            comm,
            rank,
            size,
            ordinal: dev.ordinal(),
            version,
            poisoned: Cell::new(false),
        };
        // SAFETY: `comm` is the live communicator just made.
        let on = unsafe { nccl::comm_cu_device(comm) }.map_err(nccl_err("ncclCommCuDevice"))?;
        if on < 0 || on as usize != dev.ordinal() {
            made.poison();
            return Err(Error::Device(format!(
                "NCCL rank {rank} was made on GPU {on}, not on the device's GPU {}",
                dev.ordinal()
            )));
        }
        Ok(made)
    }

    /// `Error::Rank` once poisoned, `Error::Device` for a device other than the communicator's.
    fn check_usable(&self, dev: &CudaDev) -> Result<()> {
        if self.poisoned.get() {
            return Err(Error::Rank {
                rank: self.rank,
                msg: "the NCCL communicator was poisoned after a failure".into(),
            });
        }
        if dev.ordinal() != self.ordinal {
            return Err(Error::Device(format!(
                "NCCL rank {} lives on GPU {} but was called with GPU {}",
                self.rank,
                self.ordinal,
                dev.ordinal()
            )));
        }
        Ok(())
    }

    /// Error adapter for a failed NCCL call of this rank, with NCCL's last message when the
    /// library has `ncclGetLastError`.
    fn call_err(&self, what: &'static str) -> impl FnOnce(NcclError) -> Error + '_ {
        move |e| {
            let mut msg = format!("rank {} {what}: {}", self.rank, describe(e.0));
            if self.version >= NCCL_LAST_ERROR_SINCE {
                // SAFETY: the symbol exists in this library (version checked); the communicator
                // is live (not poisoned: check_usable ran first); the string is NCCL's,
                // NUL-terminated, and copied before any other NCCL call.
                let last = unsafe { sys::ncclGetLastError(self.comm) };
                if !last.is_null() {
                    // SAFETY: as above.
                    let text = unsafe { CStr::from_ptr(last) }.to_string_lossy();
                    if !text.is_empty() {
                        msg.push_str(&format!(": {text}"));
                    }
                }
            }
            Error::Device(msg)
        }
    }

    /// Runs `f`; on error poisons the communicator (a failed or skipped collective leaves it out
    /// of step with its peers).
    fn guarded(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let r = f();
        if r.is_err() {
            self.poison();
        }
        r
    }

    fn stream(dev: &CudaDev) -> sys::cudaStream_t {
        // A CUstream is a cudaStream_t (the runtime and driver share stream handles).
        dev.cu_stream() as sys::cudaStream_t
    }
}

impl DeviceComm for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }

    /// In-place `ncclAllReduce(sum)` over `buf` (f32, bf16 or f16; same length and dtype on
    /// every member — NCCL cannot check that, a mismatch hangs or corrupts). Summation order and
    /// per-hop rounding are NCCL's (see the module docs).
    fn all_reduce_sum(&self, dev: &CudaDev, buf: DView<'_>) -> Result<()> {
        self.guarded(|| {
            self.check_usable(dev)?;
            let dt = reduce_dtype(buf.dtype(), self.version)?;
            if self.size == 1 || buf.is_empty() {
                return Ok(());
            }
            dev.bind()?;
            let p = buf.ptr();
            // SAFETY: the communicator is live and on this device; `buf` is a live view of
            // `buf.len()` elements of `dt` (in place: send == recv), and the reduction is
            // ordered on the device's stream like every other use of the buffer.
            unsafe {
                nccl::all_reduce(
                    p as *const c_void,
                    p as *mut c_void,
                    buf.len(),
                    dt,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    Self::stream(dev),
                )
            }
            .map_err(self.call_err("ncclAllReduce"))?;
            Ok(())
        })
    }

    /// `ncclAllGather` of `local` into the first `local.len() * size` elements of `out` (any
    /// dtype: moved as bytes). `local` may be this rank's own slot of `out` (in place); any other
    /// overlap is an error.
    fn all_gather(&self, dev: &CudaDev, local: DView<'_>, out: DView<'_>) -> Result<()> {
        self.guarded(|| {
            self.check_usable(dev)?;
            let n = local.len();
            out.check_dtype(local.dtype(), "all_gather")?;
            let total = n.checked_mul(self.size).ok_or_else(|| {
                Error::Device(format!(
                    "all_gather: {n} elements x {} ranks overflows",
                    self.size
                ))
            })?;
            out.need(total, "all_gather")?;
            let out = out.slice(0, total)?;
            let es = local.dtype().size();
            let (lb, ob) = (n * es, total * es);
            let own = out.ptr() + (self.rank * lb) as u64;
            let overlaps =
                local.ptr() < out.ptr() + ob as u64 && out.ptr() < local.ptr() + lb as u64;
            if n > 0 && overlaps && local.ptr() != own {
                return Err(Error::Device(format!(
                    "all_gather: rank {}'s input overlaps the output but is not its own slot",
                    self.rank
                )));
            }
            if n == 0 {
                return Ok(());
            }
            if self.size == 1 {
                if local.ptr() != out.ptr() {
                    // SAFETY: both views are live and hold `lb` bytes; they do not overlap
                    // (checked above: an overlapping input must be the own slot, i.e. equal).
                    unsafe { dev.dtod(out.ptr(), local.ptr(), lb)? };
                }
                return Ok(());
            }
            dev.bind()?;
            // SAFETY: the communicator is live and on this device; `local` holds `lb` bytes and
            // `out` (sliced to `total` elements) `ob = lb * size` bytes; they are disjoint or
            // `local` is exactly this rank's slot (NCCL's in-place form); stream ordered.
            unsafe {
                nccl::all_gather(
                    local.ptr() as *const c_void,
                    out.ptr() as *mut c_void,
                    lb,
                    sys::ncclDataType_t::ncclUint8,
                    self.comm,
                    Self::stream(dev),
                )
            }
            .map_err(self.call_err("ncclAllGather"))?;
            Ok(())
        })
    }

    /// One NCCL group of every send and receive (as bytes), in list order: NCCL matches the k-th
    /// send to a peer with that peer's k-th receive from this rank. Sizes cannot be checked
    /// across ranks here (a mismatch is NCCL's error or a hang): the switch programs make both
    /// sides from one plan.
    fn exchange(
        &self,
        dev: &CudaDev,
        sends: &[(usize, DView<'_>)],
        recvs: &[(usize, DView<'_>)],
    ) -> Result<()> {
        self.guarded(|| {
            self.check_usable(dev)?;
            super::comm::check_peers(self.rank, self.size, sends, recvs)?;
            if sends.is_empty() && recvs.is_empty() {
                return Ok(());
            }
            dev.bind()?;
            nccl::group_start().map_err(self.call_err("ncclGroupStart"))?;
            let mut r = Ok(());
            let all = sends.iter().map(|m| (true, m));
            for (send, (peer, v)) in all.chain(recvs.iter().map(|m| (false, m))) {
                let (p, n, peer) = (v.ptr() as *mut c_void, bytes_of(v), *peer as c_int);
                let (u8s, stream) = (sys::ncclDataType_t::ncclUint8, Self::stream(dev));
                // The communicator is live and on this device; `v` is a live view of `n` bytes that
                // stays unchanged (a send) or unused by anything else (a receive) until the
                // grouped call has run on the stream.
                r = if send {
                    // SAFETY: see above.
                    unsafe { nccl::send(p as *const c_void, n, u8s, peer, self.comm, stream) }
                        .map(|_| ())
                        .map_err(self.call_err("ncclSend"))
                } else {
                    // SAFETY: see above.
                    unsafe { nccl::recv(p, n, u8s, peer, self.comm, stream) }
                        .map(|_| ())
                        .map_err(self.call_err("ncclRecv"))
                };
                if r.is_err() {
                    break;
                }
            }
            // The group is closed even after a failed call, so NCCL's group state is not left open.
            let end = nccl::group_end()
                .map(|_| ())
                .map_err(self.call_err("ncclGroupEnd"));
            r.and(end)
        })
    }

    /// Marks the communicator failed and aborts it now (`ncclCommAbort`), which also ends this
    /// rank's collectives still queued or spinning on its stream, so the stream can drain; later
    /// calls return `Error::Rank`. Peers blocked in a collective with this rank stay blocked
    /// until their own communicators are poisoned (see the module docs).
    fn poison(&self) {
        if self.poisoned.replace(true) {
            return;
        }
        // SAFETY: the communicator is live (first poison) and, since this type is confined to
        // its thread, no other call is using it; it is never used again (drop checks the flag).
        let _ = unsafe { nccl::comm_abort(self.comm) };
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.poisoned.get() {
            return; // already aborted
        }
        // SAFETY: the communicator is live (not aborted) and released exactly once, here. A
        // panicking thread may have left a collective half done: abort rather than destroy.
        let _ = unsafe {
            if std::thread::panicking() {
                nccl::comm_abort(self.comm)
            } else {
                nccl::comm_destroy(self.comm)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_decode_both_formats() {
        assert_eq!(split_version(22703), (2, 27, 3));
        assert_eq!(split_version(21000), (2, 10, 0));
        assert_eq!(split_version(2804), (2, 8, 4));
    }

    #[test]
    fn a_missing_library_is_an_error_not_a_panic() {
        if nccl_available() {
            return; // only meaningful where NCCL cannot be loaded
        }
        for e in [
            NcclId::new().map(|_| ()).unwrap_err(),
            nccl_version().map(|_| ()).unwrap_err(),
        ] {
            assert!(e.to_string().contains("NCCL not found"), "{e}");
        }
    }
}
