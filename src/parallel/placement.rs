//! The one replica-placement rule: longest processing time first (LPT).
//!
//! Items in descending weight (ties by index) each go to the replica with the least total weight;
//! ties go to the item's `home` replica when one is given (so a switch keeps a sequence's cache
//! where it is when nothing is gained by moving it), then to the replica with fewer items, then to
//! the lower index. Deterministic; with equal weights and no homes it deals items round-robin.
//!
//! Every placement in pat uses it, with the weight that is known at that point:
//! - the engine admitting requests: prompt + max_new_tokens, on top of the replicas' live load;
//! - the engine switching without a policy: each live sequence's remaining KV footprint, homes
//!   set to the replica holding its cache;
//! - the policy and the simulator: each live sequence's estimated remaining steps.

/// [`balance_onto`] with empty replicas and no homes.
pub fn balance(weights: &[f64], replicas: usize) -> Vec<usize> {
    balance_onto(weights, &vec![0.0; replicas.max(1)], None)
}

/// LPT placement of `weights` onto replicas already holding `initial` weight (one entry per
/// replica, at least one). Returns the replica of each item.
pub fn balance_onto(weights: &[f64], initial: &[f64], home: Option<&[usize]>) -> Vec<usize> {
    let mut load = if initial.is_empty() {
        vec![0.0]
    } else {
        initial.to_vec()
    };
    let dp = load.len();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&i, &j| weights[j].total_cmp(&weights[i]).then(i.cmp(&j)));
    let mut count = vec![0usize; dp];
    let mut out = vec![0usize; weights.len()];
    for i in order {
        let away = |r: usize| home.and_then(|h| h.get(i)).is_some_and(|&h| h != r);
        let r = (0..dp)
            .min_by(|&x, &y| {
                load[x]
                    .total_cmp(&load[y])
                    .then(away(x).cmp(&away(y)))
                    .then(count[x].cmp(&count[y]))
                    .then(x.cmp(&y))
            })
            .unwrap_or(0);
        load[r] += weights[i];
        count[r] += 1;
        out[i] = r;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpt_by_hand() {
        // Weights 5,4,3,3,1 (items 1,3,0,4,2) over 2: 5->r0, 4->r1, 3->r1 (4<5), 3->r0 (5<7),
        // 1->r1 (7<8).
        assert_eq!(balance(&[3.0, 5.0, 1.0, 4.0, 3.0], 2), vec![1, 0, 1, 1, 0]);
        assert_eq!(balance(&[1.0; 5], 2), vec![0, 1, 0, 1, 0]);
    }

    #[test]
    fn initial_load_and_homes_break_ties() {
        // Replica 0 already holds 10: both items go to replica 1 until it catches up.
        assert_eq!(balance_onto(&[3.0, 3.0], &[10.0, 0.0], None), vec![1, 1]);
        // Equal loads: each item stays home.
        assert_eq!(
            balance_onto(&[2.0, 2.0], &[0.0, 0.0], Some(&[1, 0])),
            vec![1, 0]
        );
        // Without homes the same items go round-robin from replica 0.
        assert_eq!(balance_onto(&[2.0, 2.0], &[0.0, 0.0], None), vec![0, 1]);
    }
}
