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
        let cached = self.cached_tps.contains(&layout.tp);
        for d in 0..layout.dp() {
            if !(cached && self.activate(layout, d).is_ok()) {
                self.connect(layout, d)?;
            }
        }
        if !cached {
            self.cached_tps.push(layout.tp);
        }
        self.groups.last_ms = t.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    /// Gives replica `d`'s members a fresh group for `layout.tp`, replacing any cached one (all
    /// sent before any reply is awaited).
    pub(super) fn connect(&mut self, layout: &Layout, d: usize) -> Result<()> {
        let specs = group_specs(self.group_kinds[d], layout.tp)?;
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

    /// Makes replica `d`'s members use their cached group for `layout.tp`.
    fn activate(&mut self, layout: &Layout, d: usize) -> Result<()> {
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
        first_error(replies)?;
        self.groups.reused += 1;
        Ok(())
    }

    /// Device collective groups made and reused so far.
    pub fn group_counts(&self) -> GroupCounts {
        self.groups
    }
}
