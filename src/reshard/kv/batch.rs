//! A rank's [`KvProgram`] grouped into batches that one block-list copy per layer can move: the
//! pieces of one batch share their kind, peer, source head and destination head, and differ only
//! in sequence. An executor whose copies take a list of blocks (the `kv_gather` / `kv_scatter`
//! kernels) then launches once per batch and layer instead of once per piece and layer: for a
//! TP2xDP4 -> TP8 switch of 32 sequences, 8 batches per rank instead of 64 pieces.
//!
//! A batch's data is its pieces' blocks concatenated in sequence order (`[layers][2 (K, V)]
//! [blocks][block_size][head_dim]` for a block-granular executor). Between two ranks the sender's
//! [`KvBatch`]es to a peer and the peer's batches from it list the same sequences in the same
//! order, so a message is one batch on both sides: within one pair of ranks a global kv head has
//! one source head and one destination head, and both sides take the pair's pieces in plan order.

use super::program::{KvProgram, KvStep};
use super::KvPlan;
use crate::kv::blocks_for;

/// What a batch does on its rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BatchKind {
    /// Gather from the old pool and send to rank `to`.
    Send { to: usize },
    /// Copy from the old pool into the new pool of the same rank.
    Local,
    /// Receive from rank `from` and scatter into the new pool.
    Recv { from: usize },
}

/// Pieces of one rank's program moved together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvBatch {
    pub kind: BatchKind,
    /// Local head read from the old pool (`None` for a receive).
    pub src_head: Option<usize>,
    /// Local head written in the new pool (`None` for a send).
    pub dst_head: Option<usize>,
    /// Sequences (indices into [`KvPlan::seqs`]) in plan order.
    pub seqs: Vec<usize>,
    /// Blocks of all `seqs` together (`blocks_for(len)` each).
    pub blocks: usize,
}

/// Most KV message bytes (sent plus received) one rank holds at once in an executor that
/// exchanges a switch's KV a round of layers at a time (unless one layer needs more).
pub const ROUND_BYTES: u64 = 256 << 20;

/// [`ROUND_BYTES`], or the environment's `PAT_SWITCH_ROUND_BYTES` when it is a positive count
/// (the GPU tests set it to 1 to run a round per layer on small models; a benchmark can try
/// other sizes). One process reads one value, so every rank of a switch agrees.
pub fn round_bytes() -> u64 {
    std::env::var("PAT_SWITCH_ROUND_BYTES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&b| b > 0)
        .unwrap_or(ROUND_BYTES)
}

/// Layers per exchange round: as many as keep the busiest rank's messages within
/// [`round_bytes`] (`per_layer`: its bytes sent plus received for one layer), at least one, at
/// most `layers`. Every rank of a switch must use the same value.
pub fn round_layers(per_layer: u64, layers: usize) -> usize {
    round_layers_within(round_bytes(), per_layer, layers)
}

fn round_layers_within(cap: u64, per_layer: u64, layers: usize) -> usize {
    let most = layers.max(1);
    match cap.checked_div(per_layer) {
        Some(n) => (n.min(most as u64) as usize).max(1),
        None => most,
    }
}

/// What each rank holds in KV messages at once when every rank exchanges a round of layers at
/// a time ([`round_layers`]), from what it sends plus receives over all `layers`
/// (`messages[r]`).
pub fn round_messages(messages: &[u64], layers: usize) -> Vec<u64> {
    let per = |m: u64| m.div_ceil(layers.max(1) as u64);
    let round = round_layers(messages.iter().map(|&m| per(m)).max().unwrap_or(0), layers);
    messages.iter().map(|&m| per(m) * round as u64).collect()
}

/// Groups `prog`'s steps into batches, in program order (sends, locals, receives; within each,
/// batches by first appearance). A local batch is cut before it would pass `local_cap_blocks`
/// blocks, unless it holds a single sequence (for an executor that stages local batches through
/// bounded scratch; the GPU ranks copy pool to pool and pass `usize::MAX`); sends and receives
/// are never cut, so both sides of a message agree.
pub fn batches(plan: &KvPlan, prog: &KvProgram, local_cap_blocks: usize) -> Vec<KvBatch> {
    let mut out: Vec<KvBatch> = Vec::new();
    // Index in `out` of the open batch for each key.
    let mut open = std::collections::HashMap::new();
    for st in &prog.steps {
        let (seq, src_head, dst_head) = st.parts();
        let kind = match *st {
            KvStep::Send { to, .. } => BatchKind::Send { to },
            KvStep::Local { .. } => BatchKind::Local,
            KvStep::Recv { from, .. } => BatchKind::Recv { from },
        };
        let nb = plan
            .seqs
            .get(seq)
            .map_or(0, |s| blocks_for(s.len, plan.block_size));
        let key = (kind, src_head, dst_head);
        match open.get(&key).map(|&i: &usize| &mut out[i]) {
            Some(b) if kind != BatchKind::Local || b.blocks + nb <= local_cap_blocks => {
                b.seqs.push(seq);
                b.blocks += nb;
            }
            _ => {
                open.insert(key, out.len());
                out.push(KvBatch {
                    kind,
                    src_head,
                    dst_head,
                    seqs: vec![seq],
                    blocks: nb,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::Layout;
    use crate::reshard::kv::program::programs;
    use crate::reshard::kv::{plan, SeqKv};
    use crate::reshard::nested_layout;
    use proptest::prelude::*;

    /// Every step of `prog` as (kind, seq, src head, dst head), sorted.
    fn steps_of(prog: &KvProgram) -> Vec<(BatchKind, usize, Option<usize>, Option<usize>)> {
        let mut v: Vec<_> = prog
            .steps
            .iter()
            .map(|st| {
                let (seq, s, d) = st.parts();
                let kind = match *st {
                    KvStep::Send { to, .. } => BatchKind::Send { to },
                    KvStep::Local { .. } => BatchKind::Local,
                    KvStep::Recv { from, .. } => BatchKind::Recv { from },
                };
                (kind, seq, s, d)
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn rounds_hold_at_most_round_bytes_unless_one_layer_is_more() {
        // At the default cap, whatever PAT_SWITCH_ROUND_BYTES says (check-gpu-emu sets it).
        let r = |per, layers| round_layers_within(ROUND_BYTES, per, layers);
        assert_eq!(r(0, 32), 32);
        assert_eq!(r(1, 0), 1);
        assert_eq!(r(ROUND_BYTES / 4, 32), 4);
        assert_eq!(r(ROUND_BYTES / 4 + 1, 32), 3);
        assert_eq!(r(ROUND_BYTES * 3, 32), 1);
        assert_eq!(r(1, 32), 32);
        // 8B TP2xDP4 -> TP8, 32 x 4K: 3 GiB sent + received per rank over 32 layers, 96 MiB a
        // layer: 2 layers a round, 192 MiB held instead of 3 GiB.
        if round_bytes() == ROUND_BYTES {
            let m = 3u64 << 30;
            let held = round_messages(&[m, m / 2, 0], 32);
            assert_eq!(held, vec![192 << 20, 96 << 20, 0]);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Batches cover every step once, keep plan order inside, and the two sides of every
        /// pair of ranks list the same sequences and blocks in the same order.
        #[test]
        fn batches_cover_the_program_and_both_sides_agree(
            kv_log in 0usize..4,
            world_log in 0usize..4,
            tps in (0usize..4, 0usize..4),
            lens in proptest::collection::vec((0usize..40, 0usize..8, 0usize..8), 0..12),
            cap in 1usize..12,
        ) {
            let (kv, world) = (1 << kv_log, 1 << world_log);
            let tp = |l: usize| (1usize << l).min(world).min(kv);
            let cfg = crate::reshard::kv::tests::cfg(kv);
            let old = Layout::new(world, tp(tps.0)).unwrap();
            let new = nested_layout(&old, tp(tps.1)).unwrap();
            let bs = 4;
            let mut next = vec![0u32; world];
            let seqs: Vec<SeqKv> = lens
                .iter()
                .map(|&(len, a, b)| {
                    let (o, n) = (a % old.dp(), b % new.dp());
                    let nb = blocks_for(len, bs) as u32;
                    let table = |at: &mut u32| { let t = (*at..*at + nb).collect(); *at += nb; t };
                    SeqKv {
                        old_replica: o,
                        new_replica: n,
                        len,
                        old_table: (0..nb).collect(),
                        new_table: table(&mut next[n]),
                    }
                })
                .collect();
            let p = plan(&cfg, &old, &new, bs, &seqs, 4).unwrap();
            let progs = programs(&p);
            let all: Vec<Vec<KvBatch>> = progs.iter().map(|g| batches(&p, g, cap)).collect();
            for (g, bat) in progs.iter().zip(&all) {
                let mut covered: Vec<_> = bat
                    .iter()
                    .flat_map(|b| b.seqs.iter().map(|&s| (b.kind, s, b.src_head, b.dst_head)))
                    .collect();
                covered.sort();
                prop_assert_eq!(covered, steps_of(g));
                for b in bat {
                    prop_assert!(b.seqs.windows(2).all(|w| w[0] < w[1]));
                    let blocks: usize =
                        b.seqs.iter().map(|&s| blocks_for(p.seqs[s].len, p.block_size)).sum();
                    prop_assert_eq!(blocks, b.blocks);
                    if b.kind == BatchKind::Local && b.seqs.len() > 1 {
                        prop_assert!(b.blocks <= cap);
                    }
                }
            }
            for s in 0..world {
                for d in (0..world).filter(|&d| d != s) {
                    let sent: Vec<_> = all[s]
                        .iter()
                        .filter(|b| b.kind == BatchKind::Send { to: d })
                        .map(|b| (&b.seqs, b.blocks))
                        .collect();
                    let got: Vec<_> = all[d]
                        .iter()
                        .filter(|b| b.kind == BatchKind::Recv { from: s })
                        .map(|b| (&b.seqs, b.blocks))
                        .collect();
                    prop_assert_eq!(sent, got);
                }
            }
        }
    }
}
