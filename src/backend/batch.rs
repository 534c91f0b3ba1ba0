//! A packed batch of sequences for one forward call, and its host-side metadata (token ids,
//! positions, cache slots, padded block tables, query offsets), validated once for every backend.

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::kv::blocks_for;

/// One sequence's part of a forward call.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; positions before it are already in the cache.
    pub start_pos: usize,
    /// Block table covering at least start_pos + tokens.len() positions.
    pub table: &'a [u32],
}

/// Host-side metadata of one forward call, validated before it is uploaded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchPlan {
    pub ids: Vec<u32>,
    pub positions: Vec<i32>,
    pub slots: Vec<i64>,
    /// [num_seqs, max_blocks], padded with block 0 (never read past a sequence's context).
    pub tables: Vec<i32>,
    pub max_blocks: usize,
    pub context: Vec<i32>,
    pub cu_q: Vec<i32>,
    /// Row of each sequence's last token.
    pub last_rows: Vec<u32>,
    pub max_context: usize,
    pub max_q: usize,
}

impl BatchPlan {
    /// Validates `seqs` against the vocabulary and the pool (kernels cannot check index contents)
    /// and builds the per-token and per-sequence metadata.
    pub fn new(
        seqs: &[SeqInput],
        vocab_size: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<BatchPlan> {
        let bs = block_size;
        if bs == 0 {
            return Err(Error::Invalid("`block_size` must be at least 1".into()));
        }
        let bad = |i: usize, m: String| Error::Request(format!("sequence {i}: {m}"));
        let mut b = BatchPlan {
            cu_q: vec![0],
            ..BatchPlan::default()
        };
        b.max_blocks = seqs
            .iter()
            .map(|s| blocks_for(s.start_pos.saturating_add(s.tokens.len()), bs))
            .max()
            .unwrap_or(0);
        let mut seen = HashSet::new();
        for (i, s) in seqs.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(bad(i, "no tokens to feed".into()));
            }
            let end = s.start_pos.saturating_add(s.tokens.len());
            if end > i32::MAX as usize {
                return Err(bad(i, format!("position {end} out of range")));
            }
            let need = blocks_for(end, bs);
            if s.table.len() < need {
                return Err(bad(
                    i,
                    format!(
                        "block table has {} blocks, positions up to {end} need {need}",
                        s.table.len()
                    ),
                ));
            }
            if let Some(blk) = s.table[..need]
                .iter()
                .find(|&&blk| blk as usize >= num_blocks)
            {
                return Err(bad(
                    i,
                    format!("block {blk} outside the pool of {}", num_blocks),
                ));
            }
            for (j, &t) in s.tokens.iter().enumerate() {
                if t as usize >= vocab_size {
                    return Err(bad(
                        i,
                        format!("token id {t} out of range (vocab_size {})", vocab_size),
                    ));
                }
                let p = s.start_pos + j;
                let slot = s.table[p / bs] as usize * bs + p % bs;
                if !seen.insert(slot) {
                    return Err(bad(
                        i,
                        format!("cache slot {slot} written twice in one call"),
                    ));
                }
                b.ids.push(t);
                b.positions.push(p as i32);
                b.slots.push(slot as i64);
            }
            b.tables.extend(s.table[..need].iter().map(|&x| x as i32));
            b.tables.resize((i + 1) * b.max_blocks, 0);
            b.context.push(end as i32);
            let rows = i32::try_from(b.ids.len())
                .map_err(|_| Error::Request(format!("{} tokens in one call", b.ids.len())))?;
            b.cu_q.push(rows);
            b.last_rows.push(rows as u32 - 1);
            b.max_context = b.max_context.max(end);
            b.max_q = b.max_q.max(s.tokens.len());
        }
        Ok(b)
    }

    /// Sequences in the batch.
    pub fn num_seqs(&self) -> usize {
        self.context.len()
    }
    /// Tokens (rows) in the batch.
    pub fn num_tokens(&self) -> usize {
        self.ids.len()
    }
    /// Sequence `s`'s rows `cu_q[s]..cu_q[s + 1]`, its first position and its block table.
    pub fn seq(&self, s: usize) -> (usize, usize, usize, &[i32]) {
        let (row, end) = (self.cu_q[s] as usize, self.cu_q[s + 1] as usize);
        let start_pos = self.context[s] as usize - (end - row);
        let table = &self.tables[s * self.max_blocks..(s + 1) * self.max_blocks];
        (row, end - row, start_pos, table)
    }
}
