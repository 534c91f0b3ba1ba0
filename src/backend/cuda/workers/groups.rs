//! The device collective groups of GPU ranks: one per replica — its ranks in tp order, which a
//! switch's nested placement may permute — made at the first visit to that replica (`Connect`)
//! and reused by every later one (`Activate`), counted in [`GroupCounts`]; and the world group a
//! switch on the devices exchanges through.

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

/// Waits for every reply; the error that caused the others, if any (see [`first_cause`]).
fn first_error(replies: Vec<(usize, Receiver<Result<()>>)>) -> Result<()> {
    let results = replies
        .into_iter()
        .map(|(rank, rrx)| recv(rank, &rrx))
        .collect();
    first_cause(results).map(|_| ())
}

impl GpuRanks {
    /// Gives every replica of `layout` its group: the cached one when its members hold one for
    /// exactly this replica (the same ranks in the same tp order: a switch back), else a fresh
    /// one, which is then cached.
    pub(super) fn group_all(&mut self, layout: &Layout) -> Result<()> {
        let t = std::time::Instant::now();
        let cached = self.prepare_groups(layout)?;
        self.activate_all(layout, &cached)?;
        self.groups.last_ms = t.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    /// Makes sure the members of every replica of `layout` hold a group for it (made and cached
    /// now unless it was already), without using it yet; returns, per replica, whether it was
    /// cached.
    pub(super) fn prepare_groups(&mut self, layout: &Layout) -> Result<Vec<bool>> {
        let mut was = Vec::with_capacity(layout.dp());
        for d in 0..layout.dp() {
            let cached = self.cached.iter().any(|c| c == layout.replica_ranks(d));
            if !cached {
                self.connect(layout, d)?;
            }
            was.push(cached);
        }
        Ok(was)
    }

    /// Makes every replica of `layout` use its group, made again for a replica whose members
    /// cannot (counted as reused where `cached[d]`, i.e. made by an earlier visit).
    pub(super) fn activate_all(&mut self, layout: &Layout, cached: &[bool]) -> Result<()> {
        for d in 0..layout.dp() {
            if self.activate(layout, d).is_ok() {
                self.groups.reused += cached.get(d).copied().unwrap_or(false) as usize;
            } else {
                self.connect(layout, d)?;
                self.activate(layout, d)?;
            }
        }
        Ok(())
    }

    /// Makes a fresh group for replica `d` of `layout` on its members and caches it, replacing
    /// any cached one of the same members (all sent before any reply is awaited). `activate`
    /// puts it in use.
    pub(super) fn connect(&mut self, layout: &Layout, d: usize) -> Result<()> {
        let members = layout.replica_ranks(d).to_vec();
        let specs = group_specs(self.group_kinds_for(layout)?[d], layout.tp)?;
        self.cached.retain(|c| c != &members);
        let mut replies = Vec::with_capacity(specs.len());
        for (&rank, comm) in members.iter().zip(specs) {
            let (rtx, rrx) = channel();
            let job = Job::Connect {
                comm,
                members: members.clone(),
                reply: rtx,
            };
            self.send(rank, job)?;
            replies.push((rank, rrx));
        }
        // On error some members may hold no usable group: it stays out of the cache.
        first_error(replies)?;
        self.groups.created += 1;
        self.cached.push(members);
        Ok(())
    }

    /// The kind of each replica's group in `layout` on these ranks' devices.
    pub(super) fn group_kinds_for(&self, layout: &Layout) -> Result<Vec<GroupKind>> {
        (0..layout.dp())
            .map(|d| group_kind(layout, &self.devices, d))
            .collect()
    }

    /// Makes replica `d`'s members use their cached group for exactly that replica.
    pub(super) fn activate(&mut self, layout: &Layout, d: usize) -> Result<()> {
        let members = layout.replica_ranks(d);
        let mut replies = Vec::new();
        for &rank in members {
            let (rtx, rrx) = channel();
            let job = Job::Activate {
                members: members.to_vec(),
                reply: rtx,
            };
            self.send(rank, job)?;
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

    /// Whether the world group's members share one GPU's memory (and read each other's KV in
    /// place in a switch, `DeviceComm::share`).
    pub fn world_shares_memory(&self) -> bool {
        self.world_kind() == Some(GroupKind::SameDevice)
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
