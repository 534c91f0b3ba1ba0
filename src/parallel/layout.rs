//! `Layout`: world size, tp degree, and which physical rank holds which (replica, tp-rank).

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;

/// The most ranks a layout may have: far above one node, and small enough that per-rank
/// threads, buffers and plans stay bounded.
pub const MAX_WORLD: usize = 4096;

/// `world` ranks split into `dp = world / tp` replicas of `tp` ranks each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub world: usize,
    pub tp: usize,
    /// placement[replica][tp_rank] = physical rank.
    placement: Vec<Vec<usize>>,
}

impl Layout {
    /// Contiguous placement: replica d holds physical ranks d*tp .. (d+1)*tp.
    pub fn new(world: usize, tp: usize) -> Result<Self> {
        Self::check(world, tp)?;
        let placement = (0..world / tp)
            .map(|d| (0..tp).map(|t| d * tp + t).collect())
            .collect();
        Ok(Layout {
            world,
            tp,
            placement,
        })
    }

    /// An explicit placement; must be a permutation of 0..world in dp rows of tp.
    pub fn with_placement(world: usize, tp: usize, placement: Vec<Vec<usize>>) -> Result<Self> {
        Self::check(world, tp)?;
        let mut seen = vec![false; world];
        if placement.len() != world / tp || placement.iter().any(|r| r.len() != tp) {
            return Err(Error::Layout(format!(
                "placement must have {} replicas of {tp} ranks",
                world / tp
            )));
        }
        for &r in placement.iter().flatten() {
            if r >= world || std::mem::replace(&mut seen[r], true) {
                return Err(Error::Layout(format!(
                    "placement is not a permutation of ranks 0..{world} (rank {r})"
                )));
            }
        }
        Ok(Layout {
            world,
            tp,
            placement,
        })
    }

    fn check(world: usize, tp: usize) -> Result<()> {
        if world > MAX_WORLD {
            return Err(Error::Layout(format!(
                "`world` {world} is more ranks than pat supports ({MAX_WORLD})"
            )));
        }
        if world == 0 || tp == 0 {
            return Err(Error::Layout(format!(
                "world ({world}) and tp ({tp}) must be at least 1"
            )));
        }
        if !world.is_multiple_of(tp) {
            return Err(Error::Layout(format!(
                "tp {tp} does not divide world {world}"
            )));
        }
        Ok(())
    }

    /// Checks that the model can be split `tp` ways.
    pub fn validate_for(&self, cfg: &ModelConfig) -> Result<()> {
        check_tp_for_model(self.tp, cfg)
    }

    pub fn dp(&self) -> usize {
        self.world / self.tp
    }
    pub fn rank_of(&self, replica: usize, tp_rank: usize) -> usize {
        self.placement[replica][tp_rank]
    }
    /// Physical ranks of one replica, in tp-rank order.
    pub fn replica_ranks(&self, replica: usize) -> &[usize] {
        &self.placement[replica]
    }
    /// (replica, tp_rank) of a physical rank.
    pub fn position(&self, rank: usize) -> (usize, usize) {
        for (d, ranks) in self.placement.iter().enumerate() {
            if let Some(t) = ranks.iter().position(|&r| r == rank) {
                return (d, t);
            }
        }
        unreachable!("placement is a permutation of 0..world")
    }
}

/// Checks that `tp` divides the q heads, kv heads and intermediate size of the model.
pub fn check_tp_for_model(tp: usize, cfg: &ModelConfig) -> Result<()> {
    check_tp_for_dims(tp, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size)
}

/// [`check_tp_for_model`] on the dimensions alone (a model not yet written).
pub fn check_tp_for_dims(
    tp: usize,
    num_heads: usize,
    num_kv_heads: usize,
    intermediate_size: usize,
) -> Result<()> {
    if tp == 0 {
        return Err(Error::Layout("tp 0: tp is at least 1".into()));
    }
    for (what, n) in [
        ("num_attention_heads", num_heads),
        ("num_key_value_heads", num_kv_heads),
        ("intermediate_size", intermediate_size),
    ] {
        if n % tp != 0 {
            // Only the KV heads could be replicated instead of split (not implemented).
            let note = if what == "num_key_value_heads" {
                " (KV-head replication is not implemented)"
            } else {
                ""
            };
            return Err(Error::Layout(format!(
                "tp {tp} does not divide {what} {n}{note}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_placement_and_positions() {
        let l = Layout::new(8, 2).unwrap();
        assert_eq!(l.dp(), 4);
        assert_eq!(l.replica_ranks(3), &[6, 7]);
        for r in 0..8 {
            let (d, t) = l.position(r);
            assert_eq!(l.rank_of(d, t), r);
        }
    }

    #[test]
    fn impossible_layouts_are_errors() {
        assert!(Layout::new(4, 3)
            .unwrap_err()
            .to_string()
            .contains("does not divide world"));
        assert!(Layout::new(0, 1).is_err());
        assert!(Layout::with_placement(4, 2, vec![vec![0, 1], vec![1, 2]]).is_err());
        assert!(Layout::with_placement(4, 2, vec![vec![3, 1], vec![0, 2]]).is_ok());
    }
}
