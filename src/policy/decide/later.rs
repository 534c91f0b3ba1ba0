//! The forecast of a later switch: the live set some steps on at the current layout.

use super::{group, replicas, room, switched_kv, value_at, DecideInput, EstimatedSeq};
use crate::error::Result;
use crate::policy::forecast::drain_until;

/// The live set `k` steps on at the current layout, as the forecast sees it (estimated lengths;
/// with a KV room, only what ran moved on), and the predicted ms of those `k` steps.
pub(super) struct Later {
    pub(super) live: Vec<EstimatedSeq>,
    /// Cached tokens of the sequences holding KV then: what a switch then moves.
    pub(super) contexts: Vec<usize>,
    pub(super) before_ms: f64,
}

impl Later {
    pub(super) fn new(inp: &DecideInput, k: usize) -> Result<Later> {
        let (world, cur) = (inp.world, inp.current_tp);
        let dp = world / cur.max(1);
        let part = drain_until(
            inp.predictor.fit(cur)?,
            &group(dp, inp.live, &replicas(inp.live)),
            room(inp, cur),
            k as u64,
        );
        // `group` keeps live order within a replica: the n-th of replica r is progress[r][n].
        let mut next = vec![0usize; dp];
        let mut live = Vec::new();
        for s in inp.live {
            let n = next[s.replica];
            next[s.replica] += 1;
            let (ran, holds_kv) = part.progress[s.replica][n];
            if ran >= s.steps() {
                continue;
            }
            live.push(EstimatedSeq {
                context: s.context.saturating_add(ran),
                // One that ran holds all its tokens' KV; one that did not, what it held.
                kv: match (holds_kv, ran) {
                    (false, _) => 0,
                    (true, 0) => s.kv,
                    (true, _) => s.context.saturating_add(ran),
                },
                generated: s.generated.saturating_add(ran),
                est_remaining: s.est_remaining - ran as f64,
                cached: holds_kv,
                ..*s
            });
        }
        Ok(Later {
            contexts: switched_kv(&live),
            live,
            before_ms: part.ms,
        })
    }

    /// Predicted total of staying until then, switching to `tp` and draining there.
    pub(super) fn switch_to(&self, inp: &DecideInput, tp: usize) -> Result<f64> {
        Ok(self.before_ms
            + inp.switch.cost(inp.current_tp, tp, &self.contexts).total_ms
            + value_at(inp, tp, &self.live)?)
    }
}
