//! [`SameDeviceComm`]: a group of ranks sharing one GPU, each on its own thread and stream (see
//! `comm` for the model). All-reduce is one `all_reduce_sum` kernel launched by rank 0;
//! all-gather and exchanges read peers' buffers directly, ordered by "ready" and "done" events.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use cudarc::driver::CudaEvent;

use super::buffer::{DType, DView};
use super::comm::{bytes_of, check_members, copy_into, DeviceComm, Read, Take};
use super::device::CudaDev;
use super::ops;
use super::params::PAT_MAX_ALLREDUCE_INPUTS;
use crate::error::{Error, Result};

/// What one member published for the current collective.
#[derive(Default)]
struct Slot {
    ptr: u64,
    len: usize,
    dtype: Option<DType>,
    /// Recorded after the member's buffer was produced (written before the first barrier).
    ready: Option<Arc<CudaEvent>>,
    /// Recorded after the member's reads of its peers (written between the two barriers).
    done: Option<Arc<CudaEvent>>,
    /// An exchange's offers: (to, words), in send order (a message: its address and bytes).
    sends: Vec<(usize, Vec<u64>)>,
}

struct State {
    slots: Vec<Slot>,
    /// Rank 0's all-reduce completion (written between the two barriers).
    reduced: Option<Arc<CudaEvent>>,
    waiting: usize,
    generation: u64,
    poisoned: bool,
    /// Members inside a collective now (entered it and not yet returned).
    inside: usize,
}

struct Group {
    size: usize,
    state: Mutex<State>,
    cv: Condvar,
}

/// One member's handle on a group of ranks sharing one GPU. Move each handle to its rank's
/// thread; the group is poisoned if a member's thread panics while holding its handle.
pub struct SameDeviceComm {
    group: Arc<Group>,
    rank: usize,
}

impl SameDeviceComm {
    /// Handles for a new group of `size` members, in rank order (1..=16 members: the all-reduce
    /// kernel takes at most PAT_MAX_ALLREDUCE_INPUTS buffers).
    pub fn group(size: usize) -> Result<Vec<SameDeviceComm>> {
        if size == 0 || size > PAT_MAX_ALLREDUCE_INPUTS as usize {
            return Err(Error::Layout(format!(
                "a same-device group has 1..={PAT_MAX_ALLREDUCE_INPUTS} members, not {size}"
            )));
        }
        let group = Arc::new(Group {
            size,
            state: Mutex::new(State {
                slots: (0..size).map(|_| Slot::default()).collect(),
                reduced: None,
                waiting: 0,
                generation: 0,
                poisoned: false,
                inside: 0,
            }),
            cv: Condvar::new(),
        });
        Ok((0..size)
            .map(|rank| SameDeviceComm {
                group: group.clone(),
                rank,
            })
            .collect())
    }

    fn fail(&self, msg: &str) -> Error {
        Error::Rank {
            rank: self.rank,
            msg: msg.into(),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        let s = self
            .group
            .state
            .lock()
            .map_err(|_| self.fail("comm lock poisoned"))?;
        if s.poisoned {
            return Err(self.fail(crate::parallel::PEER_FAILED));
        }
        Ok(s)
    }

    /// Waits until every member arrives; errors if the group is poisoned meanwhile.
    fn barrier(&self) -> Result<()> {
        let mut s = self.lock()?;
        s.waiting += 1;
        if s.waiting == self.group.size {
            s.waiting = 0;
            s.generation += 1;
            self.group.cv.notify_all();
            return Ok(());
        }
        let gen = s.generation;
        while s.generation == gen && !s.poisoned {
            s = self
                .group
                .cv
                .wait(s)
                .map_err(|_| self.fail("comm lock poisoned"))?;
        }
        if s.generation == gen {
            return Err(self.fail(crate::parallel::PEER_FAILED));
        }
        Ok(())
    }

    /// Records "ready" on this rank's stream and publishes `buf`.
    fn publish(&self, dev: &CudaDev, buf: &DView<'_>) -> Result<()> {
        let ready = Arc::new(dev.new_event()?);
        dev.record(&ready)?;
        let mut s = self.lock()?;
        let slot = &mut s.slots[self.rank];
        slot.ptr = buf.ptr();
        slot.len = buf.len();
        slot.dtype = Some(buf.dtype());
        slot.ready = Some(ready);
        Ok(())
    }

    /// The peers' buffers as views, after making `dev`'s stream wait for each one's "ready".
    /// Errors if members disagree on length or dtype.
    fn peers<'s>(
        &self,
        dev: &CudaDev,
        s: &'s State,
        len: usize,
        dtype: DType,
    ) -> Result<Vec<DView<'s>>> {
        let mut views = Vec::with_capacity(s.slots.len());
        for (r, slot) in s.slots.iter().enumerate() {
            if slot.len != len || slot.dtype != Some(dtype) {
                return Err(self.fail(&format!(
                    "collective called with {} x {:?} on rank {r} but {len} x {dtype:?} on rank {}",
                    slot.len, slot.dtype, self.rank
                )));
            }
            if let Some(ev) = &slot.ready {
                dev.wait(ev)?;
            }
            // SAFETY: the member is blocked in this collective until every reader's "done" event
            // has been waited on by its stream, so its buffer stays allocated and unmodified for
            // as long as the work enqueued here may run.
            views.push(unsafe { DView::from_raw(slot.ptr, slot.len, dtype) });
        }
        Ok(views)
    }

    /// After this member's reads of its peers' buffers (enqueued on `dev`'s stream; `s` is the
    /// held lock): records "done", waits for every member, then makes the stream wait for every
    /// peer's "done", so no member's stream changes or frees a buffer its peers still read.
    fn end_reads(&self, dev: &CudaDev, mut s: MutexGuard<'_, State>) -> Result<()> {
        let done = Arc::new(dev.new_event()?);
        dev.record(&done)?;
        s.slots[self.rank].done = Some(done);
        drop(s);
        self.barrier()?;
        let s = self.lock()?;
        for (r, slot) in s.slots.iter().enumerate() {
            match &slot.done {
                Some(done) if r != self.rank => dev.wait(done)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Every member publishes its `offers` (each to one peer); after a barrier this member
    /// hands each offer addressed to it to `each(j, words)`, `expect[j]` naming its sender (in
    /// each sender's offer order), once its stream waited for that sender's "ready"; then
    /// "done" and the wait for every reader's "done" ([`Self::end_reads`]).
    fn offer_then(
        &self,
        dev: &CudaDev,
        offers: Vec<(usize, Vec<u64>)>,
        expect: &[usize],
        each: &mut Read<'_>,
    ) -> Result<()> {
        let peers: Vec<usize> = offers
            .iter()
            .map(|o| o.0)
            .chain(expect.iter().copied())
            .collect();
        if self.group.size == 1 {
            return check_members(self.rank, 1, peers.into_iter());
        }
        self.guarded(dev, || {
            check_members(self.rank, self.group.size, peers.into_iter())?;
            let ready = Arc::new(dev.new_event()?);
            dev.record(&ready)?;
            {
                let mut s = self.lock()?;
                let slot = &mut s.slots[self.rank];
                slot.sends = offers;
                slot.ready = Some(ready);
            }
            self.barrier()?;
            // Each peer's offers to this member, in its offer order, and its "ready": copied
            // out, so members read without holding the lock (no slot changes before every
            // member passed the barrier in `end_reads`).
            let (mut inbox, ready): (Vec<Vec<Vec<u64>>>, Vec<_>) = {
                let s = self.lock()?;
                (s.slots.iter())
                    .map(|slot| {
                        let mine = slot.sends.iter().filter(|m| m.0 == self.rank);
                        (mine.map(|m| m.1.clone()).rev().collect(), slot.ready.clone())
                    })
                    .unzip()
            };
            let mut waited = vec![false; self.group.size];
            for (j, &from) in expect.iter().enumerate() {
                let words = inbox[from].pop().ok_or_else(|| {
                    self.fail(&format!("exchange: member {from} offered fewer messages than this member takes from it"))
                })?;
                if !std::mem::replace(&mut waited[from], true) {
                    if let Some(ev) = &ready[from] {
                        dev.wait(ev)?;
                    }
                }
                each(j, &words)?;
            }
            if let Some(from) = inbox.iter().position(|m| !m.is_empty()) {
                return Err(self.fail(&format!(
                    "exchange: member {from} offered more messages than this member takes from it"
                )));
            }
            let s = self.lock()?;
            self.end_reads(dev, s)
        })
    }

    /// [`DeviceComm::exchange`] (`take` = None: each message copied into `recvs`) or
    /// [`DeviceComm::exchange_then`] (each message handed to `take` as a view of the sender's
    /// buffer, read before this member's "done" is recorded): offers of (address, bytes).
    fn exchange_with(
        &self,
        dev: &CudaDev,
        sends: &[(usize, DView<'_>)],
        recvs: &[(usize, DView<'_>)],
        mut take: Option<&mut Take<'_>>,
    ) -> Result<()> {
        let offers = (sends.iter())
            .map(|(to, v)| (*to, vec![v.ptr(), bytes_of(v) as u64]))
            .collect();
        let expect: Vec<usize> = recvs.iter().map(|r| r.0).collect();
        self.offer_then(dev, offers, &expect, &mut |j, words| {
            let ((from, dst), &[ptr, n]) = (&recvs[j], words) else {
                return Err(self.fail("exchange: a malformed message offer"));
            };
            let n = n as usize;
            if n != bytes_of(dst) {
                return Err(self.fail(&format!(
                    "exchange: member {from} sent {n} bytes, this member receives {}",
                    bytes_of(dst)
                )));
            }
            match take.as_mut() {
                // SAFETY: the sender published `n` bytes (`dst.len()` elements of `dst`'s
                // dtype) at `ptr` of a live buffer it does not change or free until every
                // reader's "done" is waited on by its stream, and `take` only enqueues work on
                // this stream before that "done".
                Some(f) => f(j, unsafe { DView::from_raw(ptr, dst.len(), dst.dtype()) }),
                // SAFETY: as above; `dst` is a live view of `n` bytes; the buffers are distinct.
                None => unsafe { dev.dtod(dst.ptr(), ptr, n) },
            }
        })
    }

    /// Runs `f`; on error poisons the group so peers return instead of waiting forever, then
    /// settles the device before the error reaches the caller ([`Self::settle`]).
    fn guarded<T>(&self, dev: &CudaDev, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let inside = Inside::enter(&self.group);
        let r = f();
        if r.is_err() {
            self.poison();
            drop(inside);
            self.settle(dev);
        }
        r
    }

    /// After a failed collective, before its caller frees anything: waits until no member is
    /// inside a collective any more (each returns promptly once the group is poisoned, having
    /// enqueued no more work on its peers' buffers), then for all work on the device (every
    /// member's stream). A failed call's buffers are freed in its own stream's order, which
    /// does not wait for a peer's copies out of them or rank 0's all-reduce into them: without
    /// this, memory the pool hands out again (or trims) could still be read or written by a
    /// peer's queued work. Best effort: a member still inside after 30 s, or a device that
    /// cannot synchronize (its error is the caller's to find), leaves it at that.
    fn settle(&self, dev: &CudaDev) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let Ok(mut s) = self.group.state.lock() else {
            return;
        };
        while s.inside > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match self.group.cv.wait_timeout(s, left) {
                Ok((g, _)) => s = g,
                Err(_) => return,
            }
        }
        drop(s);
        let _ = dev.synchronize_device();
    }
}

/// A member's presence inside a collective, counted in the group's state until dropped (also
/// when its thread unwinds).
struct Inside<'g>(&'g Group);

impl<'g> Inside<'g> {
    fn enter(group: &'g Group) -> Self {
        let mut s = match group.state.lock() {
            Ok(s) => s,
            Err(e) => e.into_inner(),
        };
        s.inside += 1;
        drop(s);
        Inside(group)
    }
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        // A lock poisoned by a panic still holds the count; settle's waiters need it.
        let mut s = match self.0.state.lock() {
            Ok(s) => s,
            Err(e) => e.into_inner(),
        };
        s.inside = s.inside.saturating_sub(1);
        drop(s);
        self.0.cv.notify_all();
    }
}

impl DeviceComm for SameDeviceComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.group.size
    }

    fn all_reduce_sum(&self, dev: &CudaDev, buf: DView<'_>) -> Result<()> {
        if self.group.size == 1 {
            return Ok(());
        }
        self.guarded(dev, || {
            self.publish(dev, &buf)?;
            self.barrier()?;
            if self.rank == 0 {
                let mut s = self.lock()?;
                let views = self.peers(dev, &s, buf.len(), buf.dtype())?;
                ops::all_reduce_sum(dev, &views, &views, buf.len())?;
                let done = Arc::new(dev.new_event()?);
                dev.record(&done)?;
                s.reduced = Some(done);
            }
            self.barrier()?;
            let s = self.lock()?;
            match (&s.reduced, self.rank) {
                (_, 0) => Ok(()),
                (Some(done), _) => dev.wait(done),
                (None, _) => Err(self.fail("all-reduce finished without a result")),
            }
        })
    }

    fn all_gather(&self, dev: &CudaDev, local: DView<'_>, out: DView<'_>) -> Result<()> {
        let n = local.len();
        out.need(n * self.group.size, "all_gather")?;
        if self.group.size == 1 {
            return copy_into(dev, out, 0, local);
        }
        self.guarded(dev, || {
            self.publish(dev, &local)?;
            self.barrier()?;
            let s = self.lock()?;
            let views = self.peers(dev, &s, n, local.dtype())?;
            for (r, v) in views.into_iter().enumerate() {
                copy_into(dev, out, r * n, v)?;
            }
            self.end_reads(dev, s)
        })
    }

    /// Every member publishes its sends (addresses into its own buffers, which stay unchanged
    /// until the call returns); after a barrier each member copies what is addressed to it, in
    /// order, straight out of the senders' buffers, and records "done"; after a second barrier
    /// each waits for its readers' "done" before its stream touches the sent buffers again.
    fn exchange(
        &self,
        dev: &CudaDev,
        sends: &[(usize, DView<'_>)],
        recvs: &[(usize, DView<'_>)],
    ) -> Result<()> {
        self.exchange_with(dev, sends, recvs, None)
    }

    /// Reads each message straight out of the sender's buffer: no copy into `recvs`.
    fn exchange_then(
        &self,
        dev: &CudaDev,
        sends: &[(usize, DView<'_>)],
        recvs: &[(usize, DView<'_>)],
        take: &mut Take<'_>,
    ) -> Result<()> {
        self.exchange_with(dev, sends, recvs, Some(take))
    }

    fn shares_memory(&self) -> bool {
        true
    }

    fn share(
        &self,
        dev: &CudaDev,
        offers: &[(usize, Vec<u64>)],
        expect: &[usize],
        read: &mut Read<'_>,
    ) -> Result<()> {
        self.offer_then(dev, offers.to_vec(), expect, read)
    }

    fn poison(&self) {
        if let Ok(mut s) = self.group.state.lock() {
            s.poisoned = true;
        }
        self.group.cv.notify_all();
    }
}

impl Drop for SameDeviceComm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.poison();
        }
    }
}

#[cfg(test)]
mod tests;
