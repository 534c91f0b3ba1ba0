//! The device collective groups of GPU ranks: one per replica per tp, made at the first visit to
//! a tp (`Connect`) and reused by every later one (`Activate`), counted in [`GroupCounts`].

use super::*;

/// Fresh group handles for one replica of `tp` members, in tp-rank order.
fn group_specs(kind: GroupKind, tp: usize) -> Result<Vec<CommSpec>> {
    Ok(match kind {
        GroupKind::Solo => vec![CommSpec::Solo],
        GroupKind::SameDevice => SameDeviceComm::group(tp)?
            .into_iter()
            .map(CommSpec::Same)
            .collect(),
        GroupKind::Nccl => {
            let id = NcclId::new()?;
            (0..tp)
                .map(|rank| CommSpec::Nccl { id, rank, size: tp })
                .collect()
        }
    })
}

/// Waits for every reply; the first error, if any.
fn first_error(replies: Vec<(usize, Receiver<Result<()>>)>) -> Result<()> {
    let mut first = Ok(());
    for (rank, rrx) in replies {
        if let Err(e) = recv(rank, &rrx) {
            if first.is_ok() {
                first = Err(e);
            }
        }
    }
    first
}

impl GpuRanks {
    /// Gives every replica of `layout` its group: the cached one when every rank holds one for
    /// this tp (a switch back), else a fresh one, which is then cached.
    pub(super) fn group_all(&mut self, layout: &Layout) -> Result<()> {
        let t = std::time::Instant::now();
        let cached = self.prepare_groups(layout)?;
        self.activate_all(layout, cached)?;
        self.groups.last_ms = t.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    /// Makes sure every rank holds a group for `layout.tp` (made and cached now unless it was
    /// already), without using it yet; returns whether it was cached.
    pub(super) fn prepare_groups(&mut self, layout: &Layout) -> Result<bool> {
        if self.cached_tps.contains(&layout.tp) {
            return Ok(true);
        }
        for d in 0..layout.dp() {
            self.connect(layout, d)?;
        }
        self.cached_tps.push(layout.tp);
        Ok(false)
    }

    /// Makes every replica of `layout` use its group for `layout.tp`, made again for a replica
    /// whose members cannot (counted as reused when `cached`, i.e. made by an earlier visit).
    pub(super) fn activate_all(&mut self, layout: &Layout, cached: bool) -> Result<()> {
        for d in 0..layout.dp() {
            if self.activate(layout, d).is_ok() {
                self.groups.reused += cached as usize;
            } else {
                self.connect(layout, d)?;
                self.activate(layout, d)?;
            }
        }
        Ok(())
    }

    /// Makes a fresh group for replica `d` of `layout` on its members and caches it, replacing
    /// any cached one (all sent before any reply is awaited). `activate` puts it in use.
    pub(super) fn connect(&mut self, layout: &Layout, d: usize) -> Result<()> {
        let specs = group_specs(self.group_kinds_for(layout)?[d], layout.tp)?;
        let mut replies = Vec::with_capacity(specs.len());
        for (&rank, comm) in layout.replica_ranks(d).iter().zip(specs) {
            let (rtx, rrx) = channel();
            let job = Job::Connect {
                comm,
                tp: layout.tp,
                reply: rtx,
            };
            self.send(rank, job)?;
            replies.push((rank, rrx));
        }
        let r = first_error(replies);
        match r {
            Ok(()) => self.groups.created += 1,
            // Some members may hold no usable group for this tp now: never activate it again.
            Err(_) => self.cached_tps.retain(|&t| t != layout.tp),
        }
        r
    }

    /// The kind of each replica's group in `layout` on these ranks' devices.
    pub(super) fn group_kinds_for(&self, layout: &Layout) -> Result<Vec<GroupKind>> {
        (0..layout.dp())
            .map(|d| group_kind(layout, &self.devices, d))
            .collect()
    }

    /// Makes replica `d`'s members use their cached group for `layout.tp`.
    pub(super) fn activate(&mut self, layout: &Layout, d: usize) -> Result<()> {
        let mut replies = Vec::new();
        for &rank in layout.replica_ranks(d) {
            let (rtx, rrx) = channel();
            self.send(
                rank,
                Job::Activate {
                    tp: layout.tp,
                    reply: rtx,
                },
            )?;
            replies.push((rank, rrx));
        }
        first_error(replies)
    }

    /// The kind of group every rank of the world forms, when a switch can run on the devices:
    /// all ranks on one GPU (at most 16, the same-device group's size) or each on its own GPU.
    pub fn world_kind(&self) -> Option<GroupKind> {
        let world = self.workers.len();
        let l = Layout::new(world, world).ok()?;
        match group_kind(&l, &self.devices, 0).ok()? {
            GroupKind::SameDevice if world <= PAT_MAX_SAME_DEVICE => Some(GroupKind::SameDevice),
            GroupKind::Nccl => Some(GroupKind::Nccl),
            _ => None,
        }
    }

    /// Gives every rank its member of the world group (member index = physical rank): made at
    /// the first switch on the devices, reused by later ones, made again after a failed
    /// exchange poisoned it.
    pub(super) fn ensure_world(&mut self) -> Result<()> {
        if self.world_group {
            self.groups.reused += 1;
            return Ok(());
        }
        let kind = self.world_kind().ok_or_else(|| {
            Error::Layout(
                "a switch on the devices needs every rank on one GPU (at most 16) or each on \
                 its own GPU"
                    .into(),
            )
        })?;
        let specs = group_specs(kind, self.workers.len())?;
        let mut replies = Vec::with_capacity(specs.len());
        for (rank, comm) in specs.into_iter().enumerate() {
            let (rtx, rrx) = channel();
            self.send(rank, Job::ConnectWorld { comm, reply: rtx })?;
            replies.push((rank, rrx));
        }
        first_error(replies)?;
        self.world_group = true;
        self.groups.created += 1;
        Ok(())
    }

    /// Device collective groups made and reused so far.
    pub fn group_counts(&self) -> GroupCounts {
        self.groups
    }
}

/// The most ranks one same-device group holds (the all-reduce kernel's inputs).
const PAT_MAX_SAME_DEVICE: usize = super::super::params::PAT_MAX_ALLREDUCE_INPUTS as usize;
