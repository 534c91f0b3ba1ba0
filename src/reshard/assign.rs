//! Rank assignment for a new tp degree that keeps shards nested, so weight reshards move few bytes.
//!
//! Every tp-split axis is cut into equal contiguous pieces (`shard::split`), so tp-rank `t` of `tp`
//! holds the fraction [t/tp, (t+1)/tp) of every layer weight. The assignment only has to decide
//! which physical rank becomes which (replica, tp-rank) of the new layout:
//!
//! - tp grows by k: new replica e is made of old replicas e*k .. e*k+k-1, and new tp-rank t*k+j goes
//!   to the rank that was tp-rank t of old replica e*k+j. Its new fraction [(tk+j)/(k tp), ..) lies
//!   inside [t/tp, (t+1)/tp): the layer weights move zero bytes between ranks.
//! - tp shrinks by k: old replica e splits into new replicas e*k+j, whose tp-rank t' goes to the
//!   rank that was tp-rank t'*k+j of old replica e. That rank already holds 1/k of its new shard.
//! - neither divides the other (world 6, tp 2 -> 3): a greedy assignment maximising the rows each
//!   rank keeps (documented on the private `greedy`).
//!
//! The vocab-parallel embedding and head are padded to a multiple of lcm(tp, 64)
//! (`shard::padded_vocab`), so for power-of-two tp degrees their shards nest too: growing tp moves
//! zero weight bytes in total (at most 63 padding rows change owner, and those are zeros).

use crate::error::{Error, Result};
use crate::parallel::Layout;

/// A placement for `new_tp` over the same ranks as `old` that keeps shards nested (see module docs).
///
/// Errors when `new_tp` is 0 or does not divide the world. Whether the model can be split `new_tp`
/// ways is a separate check (`layout::check_tp_for_model`).
pub fn nested_layout(old: &Layout, new_tp: usize) -> Result<Layout> {
    let world = old.world;
    if new_tp == 0 || !world.is_multiple_of(new_tp) {
        return Err(Error::Layout(format!(
            "cannot switch to tp {new_tp}: it does not divide world {world}"
        )));
    }
    let (old_tp, new_dp) = (old.tp, world / new_tp);
    let placement: Vec<Vec<usize>> = if new_tp == old_tp {
        (0..old.dp())
            .map(|e| old.replica_ranks(e).to_vec())
            .collect()
    } else if new_tp.is_multiple_of(old_tp) {
        let k = new_tp / old_tp;
        (0..new_dp)
            .map(|e| {
                (0..new_tp)
                    .map(|t2| old.rank_of(e * k + t2 % k, t2 / k))
                    .collect()
            })
            .collect()
    } else if old_tp % new_tp == 0 {
        let k = old_tp / new_tp;
        (0..new_dp)
            .map(|e2| {
                (0..new_tp)
                    .map(|t2| old.rank_of(e2 / k, t2 * k + e2 % k))
                    .collect()
            })
            .collect()
    } else {
        greedy(old, new_tp)
    };
    Layout::with_placement(world, new_tp, placement)
}

/// Length of the shared part of old tp-rank `u`'s fraction [u/old_tp, (u+1)/old_tp) and new tp-rank
/// `t`'s fraction [t/new_tp, (t+1)/new_tp), in units of 1/(old_tp*new_tp) of the split axis.
///
/// Every tp-split layer weight is cut proportionally (heads, intermediate), so the rows a rank keeps
/// in place are this overlap times (rows of the axis)/(old_tp*new_tp) for every role alike.
pub fn overlap_units(old_tp: usize, u: usize, new_tp: usize, t: usize) -> usize {
    let (a0, a1) = (u * new_tp, (u + 1) * new_tp);
    let (b0, b1) = (t * old_tp, (t + 1) * old_tp);
    a1.min(b1).saturating_sub(a0.max(b0))
}

/// Greedy assignment when neither tp divides the other.
///
/// Each new tp-rank has `dp_new` slots (one per new replica). All (physical rank, new tp-rank)
/// pairs are scored by [`overlap_units`] of the rank's old tp-rank with the new one, and visited by
/// decreasing score, then increasing rank, then increasing new tp-rank; a pair is taken when the
/// rank is still unplaced and the new tp-rank still has a free slot, which goes to the lowest free
/// replica. Pairs of score 0 are in the list too, so every rank gets a slot. This maximises the
/// rows kept in place greedily (not always optimally); it ignores which old replica a rank came from.
fn greedy(old: &Layout, new_tp: usize) -> Vec<Vec<usize>> {
    let (world, old_tp) = (old.world, old.tp);
    let new_dp = world / new_tp;
    let mut pairs: Vec<(usize, usize, usize)> = Vec::with_capacity(world * new_tp);
    for r in 0..world {
        let u = old.position(r).1;
        for t in 0..new_tp {
            pairs.push((overlap_units(old_tp, u, new_tp, t), r, t));
        }
    }
    pairs.sort_by_key(|&(score, r, t)| (std::cmp::Reverse(score), r, t));
    let mut placement = vec![vec![usize::MAX; new_tp]; new_dp];
    let mut filled = vec![0usize; new_tp];
    let mut placed = vec![false; world];
    for (_, r, t) in pairs {
        if !placed[r] && filled[t] < new_dp {
            placement[filled[t]][t] = r;
            filled[t] += 1;
            placed[r] = true;
        }
    }
    placement
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fraction of the split axis held by a physical rank, in units of 1/lcm-free denominators.
    fn frac(l: &Layout, rank: usize, denom: usize) -> (usize, usize) {
        let t = l.position(rank).1;
        (t * denom / l.tp, (t + 1) * denom / l.tp)
    }

    fn nests(old: &Layout, new: &Layout) -> bool {
        let d = old.tp * new.tp;
        (0..old.world).all(|r| {
            let (a, b) = (frac(old, r, d), frac(new, r, d));
            if new.tp >= old.tp {
                a.0 <= b.0 && b.1 <= a.1
            } else {
                b.0 <= a.0 && a.1 <= b.1
            }
        })
    }

    #[test]
    fn growing_nests_new_shards_inside_old_ones() {
        let a = Layout::new(8, 2).unwrap();
        let b = nested_layout(&a, 4).unwrap();
        assert!(nests(&a, &b));
        // New replica 0 = old replicas 0 and 1; tp-rank t*2+j from old replica j's tp-rank t.
        assert_eq!(b.replica_ranks(0), &[0, 2, 1, 3]);
        assert_eq!(b.replica_ranks(1), &[4, 6, 5, 7]);
        let c = nested_layout(&b, 8).unwrap();
        assert!(nests(&b, &c));
        assert_eq!(c.replica_ranks(0), &[0, 4, 2, 6, 1, 5, 3, 7]);
    }

    #[test]
    fn shrinking_keeps_a_piece_of_each_new_shard() {
        let a = Layout::new(8, 8).unwrap();
        let b = nested_layout(&a, 2).unwrap();
        assert!(nests(&a, &b));
        assert_eq!(b.replica_ranks(0), &[0, 4]);
        assert_eq!(b.replica_ranks(3), &[3, 7]);
        // A ladder up and back down stays nested at every step.
        let mut l = Layout::new(8, 1).unwrap();
        for tp in [2, 4, 8, 4, 2, 1, 8, 1] {
            let n = nested_layout(&l, tp).unwrap();
            assert!(nests(&l, &n), "{} -> {tp}", l.tp);
            l = n;
        }
    }

    #[test]
    fn same_tp_keeps_the_placement() {
        let a = Layout::with_placement(4, 2, vec![vec![3, 1], vec![0, 2]]).unwrap();
        assert_eq!(nested_layout(&a, 2).unwrap(), a);
    }

    #[test]
    fn non_dividing_degrees_are_assigned_greedily() {
        // World 6, tp 2 -> 3. Old tp-rank 0 holds [0, 1/2): best new tp-rank 0 ([0, 1/3), 2 units
        // of 1/6); old tp-rank 1 best goes to new tp-rank 2. Ranks 0, 2 take the two slots of new
        // tp-rank 0, ranks 1, 3 those of new tp-rank 2, ranks 4, 5 (1 unit each) fill tp-rank 1.
        let a = Layout::new(6, 2).unwrap();
        let b = nested_layout(&a, 3).unwrap();
        assert_eq!(b.replica_ranks(0), &[0, 4, 1]);
        assert_eq!(b.replica_ranks(1), &[2, 5, 3]);
        let kept: usize = (0..6)
            .map(|r| overlap_units(2, a.position(r).1, 3, b.position(r).1))
            .sum();
        assert_eq!(kept, 2 + 1 + 2 + 2 + 1 + 2);
        // And back: every tp-2 shard [t/2, (t+1)/2) gets ranks that hold some of it.
        let c = nested_layout(&b, 2).unwrap();
        for r in 0..6 {
            assert!(
                overlap_units(3, b.position(r).1, 2, c.position(r).1) > 0,
                "rank {r}"
            );
        }
    }

    #[test]
    fn impossible_degrees_are_errors() {
        let a = Layout::new(8, 2).unwrap();
        assert!(matches!(nested_layout(&a, 3), Err(Error::Layout(_))));
        assert!(matches!(nested_layout(&a, 0), Err(Error::Layout(_))));
        assert!(matches!(nested_layout(&a, 16), Err(Error::Layout(_))));
    }

    /// Nested placements permute ranks, and device groups are cached per replica order, so the
    /// cache is bounded only if the orders switches can reach are. From the canonical layout,
    /// switches among the power-of-two tp degrees reach (log2(world) + 1)! layouts: 6, 24 and
    /// 120 of worlds 4, 8 and 16, holding 6, 30 and 152 distinct replicas of tp > 1 (counted by
    /// a separate script that re-implements the module docs' rules).
    #[test]
    fn switches_reach_a_bounded_set_of_layouts() {
        use std::collections::{BTreeSet, HashSet};
        for (world, layouts, groups) in [(4, 6, 6), (8, 24, 30), (16, 120, 152)] {
            let tps: Vec<usize> = [1, 2, 4, 8, 16]
                .into_iter()
                .filter(|&t| t <= world)
                .collect();
            let key = |l: &Layout| -> Vec<Vec<usize>> {
                (0..l.dp()).map(|e| l.replica_ranks(e).to_vec()).collect()
            };
            let start = Layout::new(world, 1).unwrap();
            let mut seen: HashSet<(usize, Vec<Vec<usize>>)> = HashSet::new();
            seen.insert((1, key(&start)));
            let mut todo = vec![start];
            while let Some(l) = todo.pop() {
                for &tp in &tps {
                    let n = nested_layout(&l, tp).unwrap();
                    if seen.insert((tp, key(&n))) {
                        todo.push(n);
                    }
                }
            }
            let replicas: BTreeSet<&Vec<usize>> = seen
                .iter()
                .filter(|(tp, _)| *tp > 1)
                .flat_map(|(_, k)| k.iter())
                .collect();
            assert_eq!(
                (seen.len(), replicas.len()),
                (layouts, groups),
                "world {world}"
            );
        }
    }
}
