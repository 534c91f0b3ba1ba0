//! Admission and per-step bookkeeping: checking requests against the model and the pool, placing
//! them on replicas (the one placement rule, `parallel::placement`), and granting each step's
//! KV blocks all or nothing.

use super::sequence::{Request, Sequence};
use super::Engine;
use crate::error::{Error, Result};
use crate::kv::blocks_for;
use crate::model::sampling::request_rng;
use crate::parallel::placement::balance_onto;

impl Engine {
    /// Checks a request against the model without admitting it.
    pub fn validate_request(&self, index: usize, r: &Request) -> Result<()> {
        let bad = |m: String| Err(Error::Request(format!("request {index}: {m}")));
        if r.input_ids.is_empty() {
            return bad("empty prompt".into());
        }
        if r.max_new_tokens == 0 {
            return bad("`max_new_tokens` must be at least 1".into());
        }
        if let Some((pos, &id)) = r
            .input_ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.cfg.vocab_size)
        {
            return bad(format!(
                "token id {id} at position {pos} is out of range (vocab_size {})",
                self.cfg.vocab_size
            ));
        }
        let total = r.input_ids.len().saturating_add(r.max_new_tokens);
        if total > self.cfg.max_position_embeddings {
            return bad(format!(
                "prompt ({}) + max_new_tokens ({}) = {total} exceeds max_position_embeddings {}",
                r.input_ids.len(),
                r.max_new_tokens,
                self.cfg.max_position_embeddings
            ));
        }
        let need = blocks_for(total, self.opts.block_size);
        if need > self.opts.kv_blocks {
            return Err(Error::KvExhausted(format!(
                "request {index} needs {need} blocks of {} tokens but a rank's pool has {} (raise `kv_blocks`)",
                self.opts.block_size, self.opts.kv_blocks
            )));
        }
        Ok(())
    }

    /// Admits requests (all or none). They are placed longest first, each on the replica with
    /// the least work (live sequences' remaining footprint plus what this call placed).
    pub fn add_requests(&mut self, reqs: &[Request]) -> Result<()> {
        let base = self.seqs.len();
        for (i, r) in reqs.iter().enumerate() {
            self.validate_request(base + i, r)?;
        }
        let mut load = vec![0f64; self.layout.dp()];
        for s in self.seqs.iter().filter(|s| s.finished.is_none()) {
            load[s.replica] += s.footprint() as f64;
        }
        let weights: Vec<f64> = reqs
            .iter()
            .map(|r| (r.input_ids.len() + r.max_new_tokens) as f64)
            .collect();
        let at = balance_onto(&weights, &load, None);
        for (i, (r, replica)) in reqs.iter().zip(at).enumerate() {
            self.seqs.push(Sequence {
                prompt_len: r.input_ids.len(),
                tokens: r.input_ids.clone(),
                max_new: r.max_new_tokens,
                ignore_eos: r.ignore_eos,
                replica,
                table: Vec::new(),
                cached: 0,
                finished: None,
                rng: request_rng(self.opts.sampling.seed, base + i),
            });
        }
        Ok(())
    }

    /// Blocks for this step's new tokens of the sequences `live`, all or nothing: on error no
    /// table has grown.
    pub(super) fn grant_blocks(&mut self, live: &[usize]) -> Result<()> {
        let mut granted: Vec<(usize, Vec<u32>)> = Vec::new();
        for &i in live {
            let s = &self.seqs[i];
            let need =
                blocks_for(s.tokens.len(), self.opts.block_size).saturating_sub(s.table.len());
            match self.allocs[s.replica].alloc(need) {
                Ok(b) => granted.push((i, b)),
                Err(e) => {
                    for (j, b) in granted {
                        self.allocs[self.seqs[j].replica].release(&b);
                    }
                    return Err(e);
                }
            }
        }
        for (i, b) in granted {
            self.seqs[i].table.extend(b);
        }
        Ok(())
    }

    /// Blocks per rank that hold every request in `reqs` at once.
    pub fn blocks_needed(reqs: &[Request], block_size: usize) -> usize {
        reqs.iter()
            .map(|r| blocks_for(r.input_ids.len() + r.max_new_tokens, block_size.max(1)))
            .sum()
    }
}
