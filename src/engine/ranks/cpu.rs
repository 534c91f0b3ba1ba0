//! Host ranks: each rank's shard and KV pool in host memory; a step runs one scoped thread per
//! busy rank over the decoder on the CPU backend, with `CpuComm` groups from the engine's cache.

use super::{RankSet, StepCtx};
use crate::error::{Error, Result};
use crate::kv::KvPool;
use crate::model::decoder::{forward_cpu, RankWeights, SeqInput};
use crate::parallel::Comm;

/// Host ranks: shards and pools in host memory.
pub(crate) struct CpuRanks {
    pub weights: Vec<RankWeights>,
    pub pools: Vec<KvPool>,
}

impl RankSet for CpuRanks {
    fn forward(&mut self, ctx: StepCtx<'_>, inputs: &[Vec<SeqInput<'_>>]) -> Result<Vec<Vec<f32>>> {
        let StepCtx {
            cfg,
            layout,
            inv_freq,
            groups,
        } = ctx;
        let dp = layout.dp();
        let comms: Vec<_> = (0..dp)
            .map(|d| {
                if inputs[d].is_empty() {
                    Vec::new()
                } else {
                    groups.get(layout.replica_ranks(d))
                }
            })
            .collect();
        let results: Vec<(usize, usize, Result<Vec<f32>>)> = std::thread::scope(|sc| {
            let hs: Vec<_> = self
                .weights
                .iter()
                .zip(self.pools.iter_mut())
                .enumerate()
                .filter_map(|(rank, (w, kv))| {
                    let (d, t) = layout.position(rank);
                    if inputs[d].is_empty() {
                        return None;
                    }
                    let comm = comms[d][t].clone();
                    let inp = &inputs[d];
                    Some((
                        rank,
                        t,
                        sc.spawn(move || {
                            let r = forward_cpu(cfg, w, kv, inv_freq, &comm, inp);
                            if r.is_err() {
                                comm.poison();
                            }
                            r
                        }),
                    ))
                })
                .collect();
            // Join every rank, so a failure anywhere is reported rather than left behind.
            hs.into_iter()
                .map(|(rank, t, h)| {
                    let r = h.join().unwrap_or_else(|_| {
                        Err(Error::Rank {
                            rank,
                            msg: "worker panicked".into(),
                        })
                    });
                    (rank, t, r)
                })
                .collect()
        });
        let mut logits = vec![Vec::new(); dp];
        for (rank, t, r) in results {
            let l = r?;
            if t == 0 {
                logits[layout.position(rank).0] = l;
            }
        }
        Ok(logits)
    }

    fn rank_bytes(&self, rank: usize) -> (usize, usize) {
        (self.weights[rank].bytes(), self.pools[rank].bytes())
    }
    fn decode_read_bytes(&self, rank: usize) -> usize {
        self.weights[rank].decode_read_bytes()
    }
    fn memory_ids(&self) -> Vec<usize> {
        vec![0; self.weights.len()]
    }
    fn memory_bandwidths(&self, threads: usize) -> Result<Vec<(usize, f64)>> {
        Ok(vec![(0, crate::backend::cpu::copy_bandwidth(threads))])
    }
    fn describe(&self) -> String {
        format!("{} CPU rank thread(s)", self.weights.len())
    }
}
