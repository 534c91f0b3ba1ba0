//! The worker thread of one GPU rank: its context, the upload check, and the job loop.

use std::collections::BTreeMap;

use super::super::rank::RankSwitch;

use super::*;

/// What a worker thread needs besides its jobs.
pub(super) struct WorkerCtx {
    /// The physical rank.
    pub(super) rank: usize,
    pub(super) ordinal: usize,
    pub(super) cfg: ModelConfig,
    pub(super) inv_freq: Vec<f32>,
    pub(super) dtype: DType,
    pub(super) kv_blocks: usize,
    pub(super) block_size: usize,
}

/// A rank's member of a new group.
fn make_comm(rank: &Option<GpuRank>, spec: CommSpec) -> Result<Box<dyn DeviceComm>> {
    match (rank, spec) {
        (None, _) => Err(not_uploaded("connect")),
        (Some(_), CommSpec::Solo) => Ok(Box::new(SoloComm)),
        (Some(_), CommSpec::Same(c)) => Ok(Box::new(c)),
        (Some(g), CommSpec::Nccl { id, rank, size }) => {
            NcclComm::init(g.dev(), id, rank, size).map(|c| Box::new(c) as Box<dyn DeviceComm>)
        }
    }
}

fn not_uploaded(what: &str) -> Error {
    Error::Device(format!(
        "{what} before the rank's weights were uploaded (or out of order)"
    ))
}

fn injected(rank: usize, what: &str) -> Error {
    Error::Rank {
        rank,
        msg: format!("injected failure in {what}"),
    }
}

/// What a rank reports once its buffers are on the device.
fn uploaded(g: &GpuRank) -> Uploaded {
    Uploaded {
        weight_bytes: g.weight_bytes(),
        read_bytes: g.decode_read_bytes(),
        kv_bytes: g.kv().bytes(),
        device_name: g.dev().name().to_owned(),
        num_sms: g.dev().num_sms(),
    }
}

impl WorkerCtx {
    /// Errors, naming the sizes, unless the rank's weights and KV pool fit in the device's free
    /// memory with a margin for a step's activations (the allocations would fail anyway; this
    /// says why).
    fn check_fits(&self, dev: &CudaDev, w: &RankWeights, kv_blocks: usize) -> Result<()> {
        let elem = self.dtype.size();
        let weights = w.bytes() / 4 * elem;
        let kv =
            crate::kv::kv_block_bytes(&self.cfg, w.tp, self.block_size, elem) as usize * kv_blocks;
        let (_, total) = dev.mem_info()?;
        let free = dev.allocatable_bytes()?;
        let margin = 512 << 20;
        if weights + kv + margin > free {
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            return Err(Error::Device(format!(
                "GPU {} ({}): weights {:.2} GiB + KV pool {:.2} GiB ({} blocks of {} tokens) + 0.5 GiB for activations exceed its free memory {:.2} of {:.2} GiB (lower `kv_blocks` or the batch, raise `tp`, or spread ranks with `devices`)",
                self.ordinal,
                dev.name(),
                gib(weights),
                gib(kv),
                kv_blocks,
                self.block_size,
                gib(free),
                gib(total)
            )));
        }
        Ok(())
    }

    /// The worker loop: serves jobs until the channel closes. Replies that cannot be delivered
    /// (the engine gave up waiting) are dropped.
    pub(super) fn serve(self, rx: Receiver<Job>) {
        let mut rank: Option<GpuRank> = None;
        // This rank's groups, one per replica it has been a member of (made once, reused by later switches),
        // and the one its layout uses now. Declared after `rank`, so dropped first: groups go
        // before the device they live on.
        let mut comms: BTreeMap<Vec<usize>, Box<dyn DeviceComm>> = BTreeMap::new();
        let mut active: Option<Vec<usize>> = None;
        // The world group a switch on the devices exchanges through, and that switch.
        let mut world: Option<Box<dyn DeviceComm>> = None;
        let mut switch: Option<RankSwitch> = None;
        for job in rx {
            match job {
                Job::Upload { weights, reply } => {
                    let r = CudaDev::new(self.ordinal).and_then(|dev| {
                        self.check_fits(&dev, &weights, self.kv_blocks)?;
                        GpuRank::new(
                            dev,
                            &self.cfg,
                            &weights,
                            self.dtype,
                            self.kv_blocks,
                            self.block_size,
                        )
                    });
                    drop(weights);
                    let _ = reply.send(r.map(|g| {
                        let u = uploaded(&g);
                        rank = Some(g);
                        u
                    }));
                }
                Job::Connect {
                    comm: spec,
                    members,
                    reply,
                } => {
                    // The old group of these members (if any) goes before the new one is made.
                    // It is aborted, not closed in order: a regroup follows a failure, after
                    // which its peers' communicators may already be gone.
                    if let Some(old) = comms.remove(&members) {
                        old.poison();
                    }
                    if active.as_ref() == Some(&members) {
                        active = None;
                    }
                    let r = make_comm(&rank, spec);
                    let _ = reply.send(r.map(|c| {
                        comms.insert(members, c);
                    }));
                }
                Job::ConnectWorld { comm: spec, reply } => {
                    if let Some(old) = world.take() {
                        old.poison();
                    }
                    let _ = reply.send(make_comm(&rank, spec).map(|c| world = Some(c)));
                }
                Job::SwitchBegin { plan, fail, reply } => {
                    switch = None;
                    let r = match (&rank, fail) {
                        (_, true) => Err(injected(self.rank, "allocating the new KV pool")),
                        (None, _) => Err(not_uploaded("switch")),
                        (Some(g), _) => g.switch_begin(&self.cfg, plan),
                    };
                    let _ = reply.send(r.map(|sw| switch = Some(sw)));
                }
                Job::SwitchStage { reply } => {
                    let r = match (&rank, &mut switch) {
                        (Some(g), Some(sw)) => {
                            let in_place = world.as_ref().is_some_and(|c| c.shares_memory());
                            g.switch_stage(sw, self.rank, in_place)
                        }
                        _ => Err(not_uploaded("switch stage")),
                    };
                    let _ = reply.send(r);
                }
                Job::SwitchExchange { fail, reply } => {
                    let fail = fail.then(|| injected(self.rank, "scattering the KV it received"));
                    let r = match (&rank, &mut switch, &world) {
                        (Some(g), Some(sw), Some(c)) if c.rank() == self.rank => {
                            g.switch_exchange(sw, c.as_ref(), fail)
                        }
                        _ => Err(not_uploaded("switch exchange (or no world group)")),
                    };
                    if r.is_err() {
                        // Peers must not wait on this rank; the group is remade next time.
                        if let Some(c) = world.take() {
                            c.poison();
                        }
                        // Copies this rank enqueued may read peers' messages: let them finish
                        // before anyone's abort frees those (every rank replies first).
                        if let Some(g) = &rank {
                            let _ = g.dev().synchronize();
                        }
                    }
                    let _ = reply.send(r);
                }
                Job::SwitchBuild { fail, reply } => {
                    let r = match (&rank, &mut switch, fail) {
                        (_, _, true) => Err(injected(self.rank, "committing the switch")),
                        (Some(g), Some(sw), _) => g.switch_build(sw, self.rank),
                        _ => Err(not_uploaded("switch build")),
                    };
                    let _ = reply.send(r);
                }
                Job::SwitchSwap { reply } => {
                    let r = match (&mut rank, switch.take()) {
                        (Some(g), Some(sw)) => g.switch_swap(sw, self.rank).map(|()| uploaded(g)),
                        _ => Err(not_uploaded("switch swap")),
                    };
                    // The rank's tp changed: no group is in use until `Activate`.
                    active = None;
                    let _ = reply.send(r);
                }
                Job::SwitchAbort { reply } => {
                    switch = None;
                    let _ = reply.send(Ok(()));
                }
                Job::GrowKv {
                    blocks,
                    used,
                    reply,
                } => {
                    let r = match &mut rank {
                        Some(g) => {
                            let error = g.grow_kv(blocks, used).err();
                            Ok(Grown {
                                blocks: g.kv().num_blocks,
                                kv_bytes: g.kv().bytes(),
                                error,
                            })
                        }
                        None => Err(not_uploaded("pool growth")),
                    };
                    let _ = reply.send(r);
                }
                Job::Sync { reply } => {
                    let r = match &rank {
                        Some(g) => g.dev().synchronize(),
                        None => Err(not_uploaded("synchronize")),
                    };
                    let _ = reply.send(r);
                }
                Job::FreeBytes { reply } => {
                    let r = match &rank {
                        Some(g) => g.dev().allocatable_bytes(),
                        None => Err(not_uploaded("memory query")),
                    };
                    let _ = reply.send(r);
                }
                Job::Activate { members, reply } => {
                    let r = if rank.is_some() && comms.contains_key(&members) {
                        active = Some(members);
                        Ok(())
                    } else {
                        Err(Error::Internal(format!(
                            "no group for replica {members:?} is cached on this rank"
                        )))
                    };
                    let _ = reply.send(r);
                }
                Job::Download { reply } => {
                    let r = match &rank {
                        Some(g) => g.to_host().map(|(w, kv)| HostRank {
                            weights: Box::new(w),
                            kv: Box::new(kv),
                        }),
                        None => Err(Error::Device(
                            "download before the rank was uploaded".into(),
                        )),
                    };
                    let _ = reply.send(r);
                }
                Job::Replace { rank: host, reply } => {
                    // The old buffers go first: the device must hold only one copy of the rank.
                    // The cached groups stay (a later switch back reuses them), so the new
                    // device handle is made before the old one goes: the primary context they
                    // live in is never released in between.
                    active = None;
                    let dev = CudaDev::new(self.ordinal);
                    rank = None;
                    let r = dev.and_then(|dev| {
                        self.check_fits(&dev, &host.weights, host.kv.num_blocks)?;
                        GpuRank::from_host(dev, &self.cfg, &host.weights, &host.kv, self.dtype)
                    });
                    drop(host);
                    let _ = reply.send(r.map(|g| {
                        let u = uploaded(&g);
                        rank = Some(g);
                        u
                    }));
                }
                Job::Forward { batch, reply } => {
                    let comm = active.as_ref().and_then(|m| comms.get(m));
                    let r = match (&mut rank, comm) {
                        (Some(g), Some(c)) => {
                            let seqs: Vec<SeqInput> = batch
                                .iter()
                                .map(|s| SeqInput {
                                    tokens: &s.tokens,
                                    start_pos: s.start_pos,
                                    table: &s.table,
                                })
                                .collect();
                            g.forward(&self.cfg, &self.inv_freq, c.as_ref(), &seqs)
                        }
                        _ => Err(Error::Device(
                            "forward before the rank was uploaded and connected".into(),
                        )),
                    };
                    drop(batch);
                    let _ = reply.send(r);
                }
            }
        }
    }
}
