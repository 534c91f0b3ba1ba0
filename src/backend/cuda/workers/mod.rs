//! `GpuRanks`: an engine's ranks on GPUs, one long-lived worker thread per rank.
//!
//! A `CudaDev` (and so a `GpuRank`) is confined to the thread that made it, so each rank is a
//! thread that creates its device, receives its host shard once, uploads it, and then serves
//! jobs from a channel until the `GpuRanks` is dropped:
//!
//! 1. `Upload`: the host shard (loaded by the engine's loader threads straight from the mmapped
//!    checkpoint) becomes a `GpuRank` (weights in the engine dtype, zeroed paged KV pool); the host
//!    copy is dropped right after.
//! 2. `Connect`: the rank's collective group — `SoloComm` for tp 1, one `SameDeviceComm` group
//!    when a replica's ranks share a GPU, NCCL when each has its own GPU. Sent to every member
//!    before any reply is awaited, because NCCL's init blocks until all members join. A rank
//!    keeps the group of every replica it has been a member of (keyed by the replica's ranks in
//!    tp order, which a switch's nested placement permutes); `Activate` puts one in use, so a
//!    live switch back to a replica seen before makes no group (no NCCL init), and counts it
//!    (`GpuRanks::group_counts`, the switch record's `groups_created` / `groups_reused`).
//! 3. `Forward`: one packed batch (owned copies of the engine's `SeqInput`s, shared by the
//!    replica's members) → logits [n_seqs, vocab] on the host, from tp-rank 0.
//! 4. A live switch: on the devices (`ConnectWorld` once, then `SwitchBegin`, `SwitchStage`,
//!    `SwitchExchange`, `SwitchBuild`, `SwitchSwap`, or `SwitchAbort`; see `rank::switch`), or
//!    through the host (`Download`, then `Replace`).
//!
//! Failures: a rank's error poisons its group, so peers return instead of waiting; the failed
//! replica then gets a fresh group (`Connect` again) so the engine can carry on, as it does on the
//! CPU. What cannot be recovered is an NCCL collective a peer never joins (NCCL has no timeout):
//! every input is validated on the host identically on all members, and every buffer of a step is
//! allocated, before the first collective; what is left are device faults and the small split-K
//! scratch of paged attention, allocated inside the layer loop.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::buffer::DType;
use super::comm::{DeviceComm, SameDeviceComm, SoloComm};
use super::device::{mem_info_of, probe, CudaDev};
use super::nccl::{NcclComm, NcclId};
pub use super::placement::GroupKind;
use super::placement::{check_upload_room, group_kind, place};
use super::rank::{ExchangeStats, GpuRank};
use crate::backend::host_available_bytes;
use crate::backend::GroupCounts;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::kv::KvPool;
use crate::model::config::ModelConfig;
use crate::model::decoder::{RankWeights, SeqInput};
use crate::model::weights::Checkpoint;
use crate::parallel::{first_cause, Layout};
use crate::reshard::SwitchPrograms;

mod groups;
mod info;
pub use info::{step_split_bytes, STEP_SLACK_BYTES};
mod switch;
mod worker;
use worker::WorkerCtx;

/// How an engine's ranks go onto GPUs.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// CUDA ordinal of each physical rank; `None`: one GPU per rank when there are at least
    /// `world` GPUs, else every rank on GPU 0.
    pub devices: Option<Vec<usize>>,
    /// Weight, activation and KV dtype on the device (f32 arithmetic inside every kernel).
    pub dtype: Dtype,
    /// KV blocks per rank.
    pub kv_blocks: usize,
    pub block_size: usize,
    /// RoPE inverse frequencies (`ModelConfig::inv_freq`).
    pub inv_freq: Vec<f32>,
}

/// The device dtype for an engine dtype.
pub fn device_dtype(d: Dtype) -> DType {
    match d {
        Dtype::F32 => DType::F32,
        Dtype::Bf16 => DType::Bf16,
        Dtype::F16 => DType::F16,
    }
}

/// One sequence of a forward job, owned so it can cross to the worker threads.
struct OwnedSeq {
    tokens: Vec<u32>,
    start_pos: usize,
    table: Vec<u32>,
}

/// A rank's collective group, as handed to its worker.
enum CommSpec {
    Solo,
    Same(SameDeviceComm),
    Nccl {
        id: NcclId,
        rank: usize,
        size: usize,
    },
}

/// What a rank reports after its upload.
struct Uploaded {
    weight_bytes: usize,
    read_bytes: usize,
    kv_bytes: usize,
    device_name: String,
    /// The device's multiprocessors (what the decode attention's split depends on).
    num_sms: u32,
}

enum Job {
    Upload {
        weights: Box<RankWeights>,
        reply: Sender<Result<Uploaded>>,
    },
    /// Make the rank's group for the replica of `members` (physical ranks in tp order),
    /// replacing a cached one; `Activate` uses it.
    Connect {
        comm: CommSpec,
        members: Vec<usize>,
        reply: Sender<Result<()>>,
    },
    /// Use the group for `members` made by an earlier `Connect` (a switch back to a replica seen
    /// before).
    Activate {
        members: Vec<usize>,
        reply: Sender<Result<()>>,
    },
    Forward {
        batch: Arc<Vec<OwnedSeq>>,
        reply: Sender<Result<Vec<f32>>>,
    },
    /// The rank's shard and KV pool as f32 host copies (a live switch stages through them).
    Download {
        reply: Sender<Result<HostRank>>,
    },
    /// Drop the rank's buffers, then make the rank again from host copies (a switch's commit, or
    /// the restore after a failed one); its groups stay cached. Activate or Connect follows.
    Replace {
        rank: HostRank,
        reply: Sender<Result<Uploaded>>,
    },
    /// Make the rank's member of the world group (member index = physical rank), replacing any
    /// earlier one: what a switch on the devices exchanges through.
    ConnectWorld {
        comm: CommSpec,
        reply: Sender<Result<()>>,
    },
    /// A switch on the device, phase by phase (`rank::switch`); `fail` injects a failure.
    SwitchBegin {
        plan: Arc<SwitchPrograms>,
        fail: bool,
        reply: Sender<Result<()>>,
    },
    SwitchStage {
        reply: Sender<Result<u64>>,
    },
    /// `fail`: an injected failure of this rank's KV scatter, between the two exchanges.
    SwitchExchange {
        fail: bool,
        reply: Sender<Result<ExchangeStats>>,
    },
    SwitchBuild {
        fail: bool,
        reply: Sender<Result<()>>,
    },
    SwitchSwap {
        reply: Sender<Result<Uploaded>>,
    },
    /// Drop whatever the switch made; the rank keeps its current layout.
    SwitchAbort {
        reply: Sender<Result<()>>,
    },
    /// Grow the rank's KV pool to `blocks` blocks, keeping blocks `[0, used)`
    /// (`GpuKvPool::grow`); the reply says how far it got whatever happened.
    GrowKv {
        blocks: usize,
        used: usize,
        reply: Sender<Result<Grown>>,
    },
    /// Wait for the rank's stream: the frees it queued are done.
    Sync {
        reply: Sender<Result<()>>,
    },
    /// The rank's device's free memory, bytes.
    FreeBytes {
        reply: Sender<Result<usize>>,
    },
}

/// A rank's pool after `Job::GrowKv`: its blocks and bytes now, and the error that stopped it
/// short, if any.
struct Grown {
    blocks: usize,
    kv_bytes: usize,
    error: Option<Error>,
}

/// A rank's shard and KV pool on the host.
pub(crate) struct HostRank {
    pub weights: Box<RankWeights>,
    pub kv: Box<KvPool>,
}

struct Worker {
    tx: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

/// An engine's `world` ranks on GPUs, arranged as one `Layout` until a live switch makes them
/// again from host copies ([`GpuRanks::replace`]).
pub struct GpuRanks {
    workers: Vec<Worker>,
    devices: Vec<usize>,
    /// The layout the ranks hold now (placement included: groups are per replica).
    layout: Layout,
    /// The device dtype of weights, activations and KV.
    dtype: DType,
    /// What each replica's collectives run on.
    group_kinds: Vec<GroupKind>,
    /// What each rank reported after its upload (empty until every rank has uploaded).
    uploaded: Vec<Uploaded>,
    /// Set when a failed replica could not get a fresh group: every later step errors with it.
    broken: Option<String>,
    /// Replicas (physical ranks in tp order) whose members all hold a group for them (made
    /// once, reused by a switch back).
    cached: Vec<Vec<usize>>,
    /// Whether every rank holds a usable member of the world group (a switch on the devices).
    world_group: bool,
    /// During a switch on the devices: whether each new replica's group was cached before it.
    new_cached: Option<Vec<bool>>,
    groups: GroupCounts,
}

impl Drop for GpuRanks {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.tx.take(); // closes the channel: the worker leaves its loop and frees its device
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// A reply from worker `rank`, or an error if it died.
fn recv<T>(rank: usize, rx: &Receiver<Result<T>>) -> Result<T> {
    rx.recv().unwrap_or_else(|_| {
        Err(Error::Rank {
            rank,
            msg: "GPU worker thread exited (see the panic message above)".into(),
        })
    })
}

impl GpuRanks {
    /// Starts one worker per rank of `layout`, loads each rank's shard from `ck` on the host (one
    /// loader thread per rank, reading only its rows), uploads it and connects the groups.
    pub fn new(
        cfg: &ModelConfig,
        ck: &Checkpoint,
        layout: &Layout,
        opts: &GpuOptions,
    ) -> Result<Self> {
        let count = probe()?;
        let world = layout.world;
        let devices = place(opts.devices.as_deref(), world, count)?;
        let group_kinds = (0..layout.dp())
            .map(|d| group_kind(layout, &devices, d))
            .collect::<Result<Vec<_>>>()?;
        if opts.inv_freq.len() != cfg.head_dim / 2 {
            return Err(Error::Device(format!(
                "inv_freq has {} entries, head_dim {} needs {}",
                opts.inv_freq.len(),
                cfg.head_dim,
                cfg.head_dim / 2
            )));
        }
        let dtype = device_dtype(opts.dtype);
        let elem = dtype.size();
        let each = crate::parallel::shard::weight_bytes_per_rank(cfg, layout.tp, elem)
            + crate::kv::kv_block_bytes(cfg, layout.tp, opts.block_size, elem)
                * opts.kv_blocks as u64
            + (512 << 20);
        check_upload_room(&devices, each, mem_info_of)?;
        let mut me = GpuRanks {
            workers: Vec::with_capacity(world),
            devices: devices.clone(),
            layout: layout.clone(),
            dtype,
            group_kinds,
            uploaded: Vec::new(),
            broken: None,
            cached: Vec::new(),
            world_group: false,
            new_cached: None,
            groups: GroupCounts::default(),
        };
        for (rank, &ordinal) in devices.iter().enumerate() {
            let (tx, rx) = channel();
            let ctx = WorkerCtx {
                rank,
                ordinal,
                cfg: cfg.clone(),
                inv_freq: opts.inv_freq.clone(),
                dtype,
                kv_blocks: opts.kv_blocks,
                block_size: opts.block_size,
            };
            let handle = std::thread::Builder::new()
                .name(format!("pat-gpu-rank-{rank}"))
                .spawn(move || ctx.serve(rx))
                .map_err(|e| Error::Rank {
                    rank,
                    msg: format!("cannot start its worker thread: {e}"),
                })?;
            me.workers.push(Worker {
                tx: Some(tx),
                handle: Some(handle),
            });
        }

        // Load on the host and upload, one loader thread per rank; the host shard lives only
        // until its worker has uploaded it. (Dropping `me` on error stops every worker.)
        let senders: Vec<Sender<Job>> = me.workers.iter().filter_map(|w| w.tx.clone()).collect();
        // Host shards are f32 until uploaded: load in waves that fit in the host's available
        // memory (half of it), so a wide dp does not stage every replica's weights at once.
        let shard = crate::parallel::shard::weight_bytes_per_rank(cfg, layout.tp, 4).max(1);
        let wave = host_available_bytes()
            .map(|avail| ((avail / 2) / shard).max(1) as usize)
            .unwrap_or(world)
            .min(world);
        let mut uploaded = Vec::with_capacity(world);
        for first in (0..world).step_by(wave) {
            let n = wave.min(world - first);
            uploaded.extend(crate::parallel::per_rank(n, "loader", |i| {
                let rank = first + i;
                let (_, t) = layout.position(rank);
                // Loaded in f32: the upload rounds once to the device dtype.
                let weights = RankWeights::load(ck, cfg, layout.tp, t, Dtype::F32)?;
                let (rtx, rrx) = channel();
                senders[rank]
                    .send(Job::Upload {
                        weights: Box::new(weights),
                        reply: rtx,
                    })
                    .map_err(|_| Error::Rank {
                        rank,
                        msg: "GPU worker thread exited before the upload".into(),
                    })?;
                recv(rank, &rrx)
            })?);
        }
        me.uploaded = uploaded;
        me.group_all(layout)?;
        Ok(me)
    }

    /// Sends every rank the job `make(rank, reply)` (all sent before any reply is awaited), then
    /// collects the replies in rank order; the first error, after every reply arrived.
    fn all<T>(&self, mut make: impl FnMut(usize, Sender<Result<T>>) -> Job) -> Result<Vec<T>> {
        let each = vec![(); self.workers.len()];
        self.all_with(each, |rank, (), reply| make(rank, reply))
    }

    /// [`GpuRanks::all`] with one input per rank (`inputs[rank]`, moved into its job).
    fn all_with<I, T>(
        &self,
        inputs: Vec<I>,
        mut make: impl FnMut(usize, I, Sender<Result<T>>) -> Job,
    ) -> Result<Vec<T>> {
        if inputs.len() != self.workers.len() {
            return Err(Error::Internal(format!(
                "{} inputs for {} GPU ranks",
                inputs.len(),
                self.workers.len()
            )));
        }
        let mut replies = Vec::with_capacity(inputs.len());
        for (rank, input) in inputs.into_iter().enumerate() {
            let (rtx, rrx) = channel();
            self.send(rank, make(rank, input, rtx))?;
            replies.push(rrx);
        }
        // Every reply is awaited; the error reported is the cause, not a peer's echo of it.
        let results = replies
            .iter()
            .enumerate()
            .map(|(rank, rx)| recv(rank, rx))
            .collect();
        first_cause(results)
    }

    fn send(&self, rank: usize, job: Job) -> Result<()> {
        self.workers[rank]
            .tx
            .as_ref()
            .and_then(|tx| tx.send(job).ok())
            .ok_or_else(|| Error::Rank {
                rank,
                msg: "GPU worker thread exited".into(),
            })
    }

    /// Runs replica d's batch `inputs[d]` on its ranks (all replicas at once); returns each
    /// replica's logits [n_seqs, vocab] (empty for idle replicas).
    pub fn step(&mut self, layout: &Layout, inputs: &[Vec<SeqInput<'_>>]) -> Result<Vec<Vec<f32>>> {
        if let Some(why) = &self.broken {
            return Err(Error::Device(format!(
                "the GPU ranks are unusable after an earlier failure: {why}"
            )));
        }
        if layout != &self.layout || inputs.len() != layout.dp() {
            return Err(Error::Layout(format!(
                "GPU ranks hold world {} tp {} ({:?}), asked to run world {} tp {} ({:?}) with {} replica batches",
                self.layout.world,
                self.layout.tp,
                (0..self.layout.dp()).map(|d| self.layout.replica_ranks(d)).collect::<Vec<_>>(),
                layout.world,
                layout.tp,
                (0..layout.dp()).map(|d| layout.replica_ranks(d)).collect::<Vec<_>>(),
                inputs.len()
            )));
        }
        let mut pending = Vec::new();
        for (d, seqs) in inputs.iter().enumerate() {
            if seqs.is_empty() {
                continue;
            }
            let batch = Arc::new(
                seqs.iter()
                    .map(|s| OwnedSeq {
                        tokens: s.tokens.to_vec(),
                        start_pos: s.start_pos,
                        table: s.table.to_vec(),
                    })
                    .collect::<Vec<_>>(),
            );
            for (t, &rank) in layout.replica_ranks(d).iter().enumerate() {
                let (rtx, rrx) = channel();
                let job = Job::Forward {
                    batch: batch.clone(),
                    reply: rtx,
                };
                if let Err(e) = self.send(rank, job) {
                    // A dead worker (it panicked, which poisoned its group): send this replica
                    // nothing more; the members already sent return with the poison error.
                    pending.push((d, t, rank, None));
                    self.broken = Some(e.to_string());
                    break;
                }
                pending.push((d, t, rank, Some(rrx)));
            }
        }
        let mut logits = vec![Vec::new(); layout.dp()];
        let mut failed: Vec<usize> = Vec::new();
        let mut errors: Vec<Result<()>> = Vec::new();
        for (d, t, rank, rrx) in pending {
            let r = match rrx {
                Some(rrx) => recv(rank, &rrx),
                None => Err(Error::Rank {
                    rank,
                    msg: "GPU worker thread exited".into(),
                }),
            };
            match r {
                Ok(l) if t == 0 => logits[d] = l,
                Ok(_) => {}
                Err(e) => {
                    if !failed.contains(&d) {
                        failed.push(d);
                    }
                    errors.push(Err(e));
                }
            }
        }
        if let Err(e) = first_cause(errors) {
            if self.broken.is_none() {
                for d in failed {
                    let regroup = self
                        .connect(layout, d)
                        .and_then(|()| self.activate(layout, d));
                    if let Err(c) = regroup {
                        self.broken = Some(format!("replica {d} could not regroup: {c}"));
                        break;
                    }
                }
            }
            return Err(e);
        }
        Ok(logits)
    }
}
