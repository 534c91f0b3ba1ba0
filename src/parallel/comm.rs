//! `Comm`: collectives and point-to-point messages between the ranks of one group; CPU
//! implementation and the group cache.
//!
//! Ranks are threads that own their buffers; bytes cross ranks only through these calls. Sums are
//! taken in rank order so a reduction is deterministic. Point-to-point sends are buffered (a send
//! returns at once) and messages between two members arrive in the order they were sent. If a
//! member leaves (error or panic), the group is poisoned and every peer's pending call returns an
//! error instead of hanging.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, Result};

/// The message of the error a member gets when a peer left the group: a consequence, never the
/// cause (see [`first_cause`]).
pub const PEER_FAILED: &str = "a peer in the communication group failed";

/// Of several ranks' results, the first error that is a cause rather than a peer's reaction to
/// it (a rank that only saw its group poisoned), else the first error, else every value.
pub fn first_cause<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    // A context added to a rank's error (`Error::context`) goes in front of its message.
    let is_echo = |e: &Error| matches!(e, Error::Rank { msg, .. } if msg.ends_with(PEER_FAILED));
    if let Some(i) = results
        .iter()
        .position(|r| matches!(r, Err(e) if !is_echo(e)))
        .or_else(|| results.iter().position(Result::is_err))
    {
        return Err(results
            .into_iter()
            .nth(i)
            .and_then(Result::err)
            .unwrap_or_else(|| Error::Internal("lost a rank's error".into())));
    }
    results.into_iter().collect()
}

/// Collectives over one group of ranks.
pub trait Comm: Send + Sync {
    /// This member's index in the group (its tp-rank).
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over the group, result in every member's `buf`.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Concatenates every member's `local` (equal lengths) in rank order into `out`.
    fn all_gather(&self, local: &[f32], out: &mut [f32]) -> Result<()>;
    /// Sends `data` to member `to`; returns without waiting for the receiver.
    fn send(&self, to: usize, data: &[f32]) -> Result<()>;
    /// Receives the next message member `from` sent to this member into `out`, whose length must
    /// be the message's.
    fn recv(&self, from: usize, out: &mut [f32]) -> Result<()>;
    /// Marks the group failed so peers stop waiting.
    fn poison(&self);
}

/// A reusable barrier: arrivals counted atomically; waiters spin briefly (yielding, so an
/// oversubscribed world still progresses), then park on a condvar. Poisoning wakes everyone.
struct Group {
    size: usize,
    slots: Mutex<Vec<Vec<f32>>>,
    /// Point-to-point queues, index `from * size + to`.
    mail: Mutex<Vec<VecDeque<Vec<f32>>>>,
    arrived: AtomicUsize,
    generation: AtomicU64,
    poisoned: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

/// Spin iterations before parking (a few tens of microseconds).
const SPIN: usize = 1 << 12;

impl Group {
    fn new(size: usize) -> Self {
        Group {
            size,
            slots: Mutex::new(vec![Vec::new(); size]),
            mail: Mutex::new(vec![VecDeque::new(); size * size]),
            arrived: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    fn wait(&self, rank: usize) -> Result<()> {
        let fail = || Error::Rank {
            rank,
            msg: PEER_FAILED.into(),
        };
        if self.is_poisoned() {
            return Err(fail());
        }
        let gen = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.size {
            // Last to arrive: reset the count before releasing the others into the next round.
            self.arrived.store(0, Ordering::Release);
            self.generation.fetch_add(1, Ordering::AcqRel);
            let _g = self.lock.lock().map_err(|_| fail())?;
            self.cv.notify_all();
            return Ok(());
        }
        for i in 0..SPIN {
            if self.generation.load(Ordering::Acquire) != gen {
                return Ok(());
            }
            if self.is_poisoned() {
                return Err(fail());
            }
            if i % 64 == 63 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        let mut g = self.lock.lock().map_err(|_| fail())?;
        while self.generation.load(Ordering::Acquire) == gen && !self.is_poisoned() {
            g = self.cv.wait(g).map_err(|_| fail())?;
        }
        if self.generation.load(Ordering::Acquire) == gen {
            return Err(fail());
        }
        Ok(())
    }
}

/// One member's handle on a CPU communication group.
#[derive(Clone)]
pub struct CpuComm {
    group: Arc<Group>,
    rank: usize,
}

impl CpuComm {
    fn deposit(&self, data: &[f32]) -> Result<()> {
        let mut slots = self
            .group
            .slots
            .lock()
            .map_err(|_| self.err("lock poisoned"))?;
        slots[self.rank].clear();
        slots[self.rank].extend_from_slice(data);
        Ok(())
    }
    /// Frees this member's slot once every member has read it, where it holds more than a
    /// decode step's data (a prefill's): a group lives as long as the engine, and a slot kept
    /// at its largest size would hold host memory no step's cap counts.
    fn release_large_slot(&self) -> Result<()> {
        const KEEP: usize = (1 << 20) / 4;
        let mut slots = self
            .group
            .slots
            .lock()
            .map_err(|_| self.err("lock poisoned"))?;
        if slots[self.rank].capacity() > KEEP {
            slots[self.rank] = Vec::new();
        }
        Ok(())
    }
    fn err(&self, msg: &str) -> Error {
        Error::Rank {
            rank: self.rank,
            msg: msg.into(),
        }
    }
}

impl Comm for CpuComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.group.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        if self.group.size == 1 {
            return Ok(());
        }
        self.deposit(buf)?;
        self.group.wait(self.rank)?;
        {
            let slots = self
                .group
                .slots
                .lock()
                .map_err(|_| self.err("lock poisoned"))?;
            if slots.iter().any(|s| s.len() != buf.len()) {
                self.poison();
                return Err(self.err("all_reduce called with different lengths on different ranks"));
            }
            buf.copy_from_slice(&slots[0]);
            for s in &slots[1..] {
                buf.iter_mut().zip(s).for_each(|(a, b)| *a += *b);
            }
        }
        // Nobody may overwrite a slot before every member has read all of them.
        self.group.wait(self.rank)?;
        self.release_large_slot()
    }

    fn all_gather(&self, local: &[f32], out: &mut [f32]) -> Result<()> {
        let n = local.len();
        if out.len() != n * self.group.size {
            return Err(self.err("all_gather output has the wrong length"));
        }
        if self.group.size == 1 {
            out.copy_from_slice(local);
            return Ok(());
        }
        self.deposit(local)?;
        self.group.wait(self.rank)?;
        {
            let slots = self
                .group
                .slots
                .lock()
                .map_err(|_| self.err("lock poisoned"))?;
            if slots.iter().any(|s| s.len() != n) {
                self.poison();
                return Err(self.err("all_gather called with different lengths on different ranks"));
            }
            for (chunk, s) in out.chunks_exact_mut(n).zip(slots.iter()) {
                chunk.copy_from_slice(s);
            }
        }
        self.group.wait(self.rank)?;
        self.release_large_slot()
    }

    fn send(&self, to: usize, data: &[f32]) -> Result<()> {
        let size = self.group.size;
        if to >= size {
            return Err(self.err(&format!("send to member {to} of a group of {size}")));
        }
        if self.group.is_poisoned() {
            return Err(self.err(PEER_FAILED));
        }
        self.group
            .mail
            .lock()
            .map_err(|_| self.err("lock poisoned"))?[self.rank * size + to]
            .push_back(data.to_vec());
        // Taking the lock orders this notify after a receiver's check-then-wait.
        let _g = self
            .group
            .lock
            .lock()
            .map_err(|_| self.err("lock poisoned"))?;
        self.group.cv.notify_all();
        Ok(())
    }

    fn recv(&self, from: usize, out: &mut [f32]) -> Result<()> {
        let size = self.group.size;
        if from >= size {
            return Err(self.err(&format!("receive from member {from} of a group of {size}")));
        }
        let take = || -> Result<Option<Vec<f32>>> {
            Ok(self
                .group
                .mail
                .lock()
                .map_err(|_| self.err("lock poisoned"))?[from * size + self.rank]
                .pop_front())
        };
        let mut g = self
            .group
            .lock
            .lock()
            .map_err(|_| self.err("lock poisoned"))?;
        let msg = loop {
            if let Some(m) = take()? {
                break m;
            }
            if self.group.is_poisoned() {
                return Err(self.err(PEER_FAILED));
            }
            g = self
                .group
                .cv
                .wait(g)
                .map_err(|_| self.err("lock poisoned"))?;
        };
        drop(g);
        if msg.len() != out.len() {
            self.poison();
            return Err(self.err(&format!(
                "message from member {from} has {} elements, the receiver expects {}",
                msg.len(),
                out.len()
            )));
        }
        out.copy_from_slice(&msg);
        Ok(())
    }

    fn poison(&self) {
        self.group.poisoned.store(true, Ordering::Release);
        let _g = self.group.lock.lock();
        self.group.cv.notify_all();
    }
}

/// Communication groups keyed by their member ranks, created at most once per engine lifetime.
#[derive(Default)]
pub struct GroupCache {
    groups: HashMap<Vec<usize>, Arc<Group>>,
    /// Groups created so far.
    pub created: usize,
    /// Lookups answered from the cache.
    pub reused: usize,
}

impl GroupCache {
    /// One handle per member of the group of physical `ranks` (in tp-rank order).
    pub fn get(&mut self, ranks: &[usize]) -> Vec<CpuComm> {
        let size = ranks.len();
        let group = match self.groups.get(ranks) {
            Some(g) if !g.is_poisoned() => {
                self.reused += 1;
                g.clone()
            }
            _ => {
                self.created += 1;
                let g = Arc::new(Group::new(size));
                self.groups.insert(ranks.to_vec(), g.clone());
                g
            }
        };
        (0..size)
            .map(|rank| CpuComm {
                group: group.clone(),
                rank,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_cause_is_found_under_added_context() {
        let echo = |rank| Error::Rank {
            rank,
            msg: PEER_FAILED.into(),
        };
        let cause = || Error::Device("out of memory".into());
        // The echo comes first in rank order, with or without a context in front of it.
        for first in [echo(0), echo(0).context("rank 0")] {
            let e = first_cause::<()>(vec![Err(first), Err(cause()), Ok(())]).unwrap_err();
            assert!(e.to_string().contains("out of memory"), "{e}");
        }
        // Only echoes: the first of them.
        let e = first_cause::<()>(vec![Ok(()), Err(echo(1).context("x"))]).unwrap_err();
        assert!(e.to_string().contains(PEER_FAILED), "{e}");
        assert_eq!(first_cause(vec![Ok(1), Ok(2)]).unwrap(), vec![1, 2]);
    }

    #[test]
    fn all_reduce_and_gather_across_threads() {
        let mut cache = GroupCache::default();
        let comms = cache.get(&[3, 1, 2]);
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let mut buf = vec![r, 10.0 * r];
                        for _ in 0..50 {
                            buf = vec![r, 10.0 * r];
                            c.all_reduce_sum(&mut buf).unwrap();
                        }
                        let mut g = vec![0.0; 6];
                        c.all_gather(&[r, -r], &mut g).unwrap();
                        (buf, g)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, g) in results {
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(g, vec![0.0, -0.0, 1.0, -1.0, 2.0, -2.0]);
        }
        let _ = cache.get(&[3, 1, 2]);
        assert_eq!((cache.created, cache.reused), (1, 1));
    }

    #[test]
    fn point_to_point_keeps_order_and_fails_cleanly() {
        let mut cache = GroupCache::default();
        let comms = cache.get(&[0, 1, 2]);
        let got: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .cloned()
                .map(|c| {
                    s.spawn(move || {
                        // Everyone sends two messages to everyone else, then receives.
                        let me = c.rank() as f32;
                        for to in (0..3).filter(|&t| t != c.rank()) {
                            c.send(to, &[me, to as f32]).unwrap();
                            c.send(to, &[me + 10.0, to as f32]).unwrap();
                        }
                        let mut got = Vec::new();
                        for from in (0..3).filter(|&f| f != c.rank()) {
                            let mut buf = [0f32; 2];
                            c.recv(from, &mut buf).unwrap();
                            got.extend(buf);
                            c.recv(from, &mut buf).unwrap();
                            got.extend(buf);
                        }
                        got
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got[0], vec![1.0, 0.0, 11.0, 0.0, 2.0, 0.0, 12.0, 0.0]);
        assert_eq!(got[2], vec![0.0, 2.0, 10.0, 2.0, 1.0, 2.0, 11.0, 2.0]);
        // A wrong length is an error; a receiver whose peer fails is released.
        comms[0].send(1, &[1.0, 2.0, 3.0]).unwrap();
        assert!(comms[1].recv(0, &mut [0.0; 2]).is_err());
        let comms = cache.get(&[0, 1]);
        let r = std::thread::scope(|s| {
            let b = comms[1].clone();
            let h = s.spawn(move || b.recv(0, &mut [0.0]));
            comms[0].poison();
            h.join().unwrap()
        });
        assert!(r.is_err());
        assert!(comms[0].send(5, &[1.0]).is_err());
    }

    #[test]
    fn a_failed_peer_releases_the_others() {
        let mut cache = GroupCache::default();
        let comms = cache.get(&[0, 1]);
        let r = std::thread::scope(|s| {
            let mut it = comms.into_iter();
            let (a, b) = (it.next().unwrap(), it.next().unwrap());
            let h = s.spawn(move || a.all_reduce_sum(&mut [1.0]));
            b.poison();
            h.join().unwrap()
        });
        assert!(r.is_err());
        // A poisoned group is replaced, not reused.
        let _ = cache.get(&[0, 1]);
        assert_eq!(cache.created, 2);
    }
}
