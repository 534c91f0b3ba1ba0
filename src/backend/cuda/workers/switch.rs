//! A live switch's side of the GPU ranks: host copies of every rank, and every rank made again
//! from host copies in a new layout (see `engine::ranks::gpu`).

use super::*;

impl GpuRanks {
    /// Every rank's shard and KV pool as f32 host copies, rank order (all ranks at once).
    pub fn download(&self) -> Result<Vec<(RankWeights, KvPool)>> {
        let mut replies = Vec::with_capacity(self.workers.len());
        for rank in 0..self.workers.len() {
            let (rtx, rrx) = channel();
            self.send(rank, Job::Download { reply: rtx })?;
            replies.push(rrx);
        }
        replies
            .iter()
            .enumerate()
            .map(|(rank, rx)| recv(rank, rx).map(|h| (*h.weights, *h.kv)))
            .collect()
    }

    /// Makes every rank again from host copies (`ranks[r]` for physical rank r) as the ranks of
    /// a layout of `tp`, then gives every replica its group (cached from an earlier visit to this
    /// tp, else made and cached: `group_counts`). Each rank's old buffers are
    /// freed before its new ones are allocated. On error the ranks are in no usable layout: the
    /// caller restores them (again with `replace`) or gives up on them.
    pub fn replace(&mut self, tp: usize, ranks: Vec<(RankWeights, KvPool)>) -> Result<()> {
        let world = self.workers.len();
        let layout = Layout::new(world, tp)?;
        if ranks.len() != world {
            return Err(Error::Internal(format!(
                "replace: {} host ranks for {world} GPU ranks",
                ranks.len()
            )));
        }
        let group_kinds = (0..layout.dp())
            .map(|d| group_kind(&layout, &self.devices, d))
            .collect::<Result<Vec<_>>>()?;
        let mut replies = Vec::with_capacity(world);
        for (rank, (w, kv)) in ranks.into_iter().enumerate() {
            let (rtx, rrx) = channel();
            let host = HostRank {
                weights: Box::new(w),
                kv: Box::new(kv),
            };
            self.send(
                rank,
                Job::Replace {
                    rank: host,
                    reply: rtx,
                },
            )?;
            replies.push(rrx);
        }
        let mut uploaded = Vec::with_capacity(world);
        let mut first = None;
        for (rank, rx) in replies.iter().enumerate() {
            match recv(rank, rx) {
                Ok(u) => uploaded.push(u),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first {
            return Err(e);
        }
        self.uploaded = uploaded;
        self.tp = tp;
        self.group_kinds = group_kinds;
        self.broken = None;
        self.group_all(&layout)
    }

    /// Marks the ranks unusable (every later step errors with `why`).
    pub fn set_broken(&mut self, why: String) {
        self.broken = Some(why);
    }
}
