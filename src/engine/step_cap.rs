//! What one step may prefill: the cap on a step's activations (host bytes on CPU ranks, each
//! rank's device bytes on GPU ranks) and the caller's cap on its prompt tokens, if set; what a
//! step allocates for the tokens
//! and sequences it feeds ([`host_step_bytes`], [`device_step_bytes`]: tests/step_memory.rs and
//! tests/cuda_model/step_memory.rs measure them), and the room left as a step's sequences are
//! counted in.

use super::Engine;
use crate::error::Result;
use crate::kv::blocks_for;
use crate::model::config::ModelConfig;
use crate::parallel::shard::{self, Role};

/// What a step's cap in bytes is, for messages: what one step's activations may take.
pub const STEP_CAP: &str = "half the host's available memory less the KV pools on CPU ranks, \
     each rank's share of its GPU's free memory on GPU ranks";

/// What one step's activations may take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum StepCap {
    /// No cap (a host whose memory cannot be read).
    None,
    /// A step's activations within this many bytes (CPU ranks: half the host memory available
    /// when the engine loaded, less the KV pools that will fill it; a host step that outgrew
    /// memory would kill the process).
    HostBytes(u64),
    /// Each rank's activations within `per_rank` bytes of its GPU (what the GPU had free after
    /// the weights and KV pools, shared by its ranks, less what every step holds; read again
    /// after each switch and pool growth), at `elem` bytes per element. Counted per replica:
    /// the replicas' ranks allocate at once, each on its own GPU or its share of one. A step
    /// that did not fit would fail, and so would every retry of it.
    DeviceBytes { per_rank: u64, elem: u64 },
    /// GPU memory that could not be read (after a switch or a growth): each replica prefills
    /// one sequence a step, all of it that the cap on prompt tokens allows, and the next step
    /// reads the memory again.
    Unread,
}

/// Host bytes a CPU step holds per rank whatever it feeds: rank threads, per-replica lists (a
/// step's cap counts them apart from `host_step_bytes`, with [`host_step_fixed_bytes`]).
pub const STEP_FIXED_BYTES_PER_RANK: u64 = 64 << 10;

/// Host bytes a CPU step of `world` ranks may hold whatever it feeds: each rank's bookkeeping
/// ([`STEP_FIXED_BYTES_PER_RANK`]), the attention's scores
/// (`backend::cpu::attention_scratch_bound`) and, where `packs`, the GEMMs' packing
/// (`backend::cpu::pack_bytes_bound`: a step with more rows than they stream).
pub fn host_step_fixed_bytes(cfg: &ModelConfig, world: usize, packs: bool) -> u64 {
    let pack = if packs {
        crate::backend::cpu::pack_bytes_bound(world)
    } else {
        0
    };
    STEP_FIXED_BYTES_PER_RANK * world as u64
        + crate::backend::cpu::attention_scratch_bound(cfg, world)
        + pack
}

/// Host bytes a CPU step allocates to feed `tokens` tokens of `seqs` sequences through one
/// replica of `tp` ranks (`decoder::forward` on `CpuOps`, f32): per token and rank, the residual
/// stream, its normed copy and the projection (whole on every rank), the all-reduce's slot
/// (tp > 1), q/k/v, the attention output and the attention's q/k/v scratch, gate/up and their
/// product (split over the ranks), and the batch's positions and slots; per sequence and rank,
/// its last row, the padded vocab shard, the all-gather's slot (tp > 1), the gathered and host
/// copies of the logits and the logits row. What a CPU step's cap counts, with what every step
/// holds ([`host_step_fixed_bytes`]); the step-memory test measures
/// it with a counting allocator.
pub fn host_step_bytes(cfg: &ModelConfig, tp: usize, tokens: usize, seqs: usize) -> u64 {
    let t = tp as u64;
    let (h, hd) = (cfg.hidden_size as u64, cfg.head_dim as u64);
    let (q, kv) = ((cfg.num_heads / tp) as u64, (cfg.num_kv_heads / tp) as u64);
    let inter = (cfg.intermediate_size / tp) as u64;
    let vl = shard::rows(cfg, Role::Embed, tp) as u64;
    let slot = u64::from(tp > 1);
    let token = 3 * h + slot * h + (q + 2 * kv) * hd * 2 + q * hd + 3 * inter + 8;
    let seq = h + vl + slot * vl + 2 * t * vl + cfg.vocab_size as u64;
    4 * t * (token * tokens as u64 + seq * seqs as u64)
}

/// Device bytes one GPU rank of a replica of `tp` ranks allocates in a step that feeds `tokens`
/// tokens of `seqs` sequences (`decoder::forward` on `GpuOps`, buffers of `elem` bytes per
/// element): per token, the residual stream, its normed copy and the projection, q/k/v and the
/// attention output, gate/up and their product, and the batch's ids, positions (4 bytes each)
/// and KV slots (8); per sequence, its last row, the vocab shard and the gathered logits, its
/// context length, query offset and last row index (4 bytes each) and its block table row (at
/// most `max_position_embeddings` tokens in blocks of `block_size`). What every step holds
/// besides (the decode attention's split scratch, the pool's rounding) the GPU ranks count
/// apart (`GpuRanks::step_fixed_bytes`); tests/cuda_model/step_memory.rs measures what this
/// counts with the device memory pool's high watermark, and `ops::split_scratch_bound` is
/// checked against every batch's split.
pub fn device_step_bytes(
    cfg: &ModelConfig,
    tp: usize,
    elem: u64,
    block_size: usize,
    tokens: usize,
    seqs: usize,
) -> u64 {
    let (h, hd) = (cfg.hidden_size as u64, cfg.head_dim as u64);
    let (q, kv) = ((cfg.num_heads / tp) as u64, (cfg.num_kv_heads / tp) as u64);
    let inter = (cfg.intermediate_size / tp) as u64;
    let vl = shard::rows(cfg, Role::Embed, tp) as u64;
    let token = elem * (3 * h + 2 * (q + kv) * hd + 3 * inter) + 16;
    let table = 4 * blocks_for(cfg.max_position_embeddings, block_size.max(1)) as u64;
    let seq = elem * (h + vl + tp as u64 * vl) + 12 + table;
    (token.saturating_mul(tokens as u64)).saturating_add(seq.saturating_mul(seqs as u64))
}

/// One count of what is left of a cap in bytes: the whole step's, or one replica's.
#[derive(Clone, Copy)]
struct Room {
    left: u64,
    /// Whether a prefill was taken here (the first takes at least a token; see `take`).
    prefilled: bool,
}

/// What is left of one step's cap as its sequences are counted in.
pub(super) struct StepRoom {
    /// One room for the whole step (host memory), or one per replica (each rank's device
    /// memory).
    rooms: Vec<Room>,
    /// Bytes of one token fed and of one sequence's logits row (0 without a cap in bytes).
    per_token: u64,
    per_seq: u64,
    /// Prompt tokens the whole step may still prefill (the caller's cap; `u64::MAX` if none).
    tokens: u64,
    /// Whether any prefill was taken in the whole step.
    any: bool,
    /// The cap in bytes is unknown (`StepCap::Unread`): a room's first prefill takes what the
    /// cap on prompt tokens allows, nothing after it.
    unread: bool,
}

impl StepRoom {
    /// The room a step has under `cap`, and at most `tokens` prompt tokens if set, at degree
    /// `tp` with `dp` replicas and KV blocks of `block_size` tokens.
    pub(super) fn new(
        cap: StepCap,
        tokens: Option<usize>,
        cfg: &ModelConfig,
        tp: usize,
        dp: usize,
        block_size: usize,
    ) -> Self {
        let (left, per_token, per_seq, rooms) = match cap {
            StepCap::None => (u64::MAX, 0, 0, 1),
            StepCap::Unread => (0, 1, 0, dp.max(1)),
            StepCap::HostBytes(b) => {
                let token = host_step_bytes(cfg, tp, 1, 0);
                (b, token, host_step_bytes(cfg, tp, 0, 1), 1)
            }
            StepCap::DeviceBytes { per_rank, elem } => {
                let bytes = |t, s| device_step_bytes(cfg, tp, elem, block_size, t, s);
                (per_rank, bytes(1, 0), bytes(0, 1), dp.max(1))
            }
        };
        let room = Room {
            left,
            prefilled: false,
        };
        StepRoom {
            rooms: vec![room; rooms],
            per_token,
            per_seq,
            tokens: tokens.map_or(u64::MAX, |n| n as u64),
            any: false,
            unread: cap == StepCap::Unread,
        }
    }

    fn cost(&self, feed: usize) -> u64 {
        (feed as u64)
            .saturating_mul(self.per_token)
            .saturating_add(self.per_seq)
    }

    fn room(&mut self, replica: usize) -> &mut Room {
        let i = if self.rooms.len() == 1 { 0 } else { replica };
        &mut self.rooms[i]
    }

    /// Counts a sequence of replica `replica` that feeds `feed` tokens whatever is left (a
    /// decode; the cap on prompt tokens does not count it).
    pub(super) fn charge(&mut self, replica: usize, feed: usize) {
        if self.per_seq > 0 {
            let cost = self.cost(feed);
            let r = self.room(replica);
            r.left = r.left.saturating_sub(cost);
        }
    }

    /// How many of the `feed` tokens a prefill on replica `replica` may take of what is left
    /// in bytes and prompt tokens (counted in; 0 when none fit): all of them, or the part of
    /// the prompt that fits (a chunk; the rest waits for later steps). The first prefill of a
    /// step takes at least one token whatever is left, so every step makes progress; under a
    /// per-replica cap so does each replica's first, while the cap on prompt tokens lasts.
    pub(super) fn take(&mut self, replica: usize, feed: usize) -> usize {
        let (per_token, per_seq) = (self.per_token, self.per_seq);
        let r = *self.room(replica);
        let bytes = match (per_token, r.left.checked_sub(per_seq)) {
            _ if self.unread && !r.prefilled => u64::MAX,
            (0, _) => u64::MAX,
            (t, Some(rest)) => rest / t,
            (_, None) => 0,
        };
        let fit = usize::try_from(bytes.min(self.tokens))
            .unwrap_or(usize::MAX)
            .min(feed);
        let n = match (fit, r.prefilled) {
            (0, true) => return 0,
            (0, false) if self.any && self.tokens == 0 => return 0,
            (0, false) => feed.min(1),
            (n, _) => n,
        };
        self.any = true;
        let cost = self.cost(n);
        self.tokens = self.tokens.saturating_sub(n as u64);
        let r = self.room(replica);
        r.left = r.left.saturating_sub(cost);
        r.prefilled = true;
        n
    }
}

impl Engine {
    /// Caps the prompt tokens a step (or one pass of a switch's recompute) prefills, besides
    /// what its activations may take in memory (decodes are not counted): a longer queue is
    /// prefilled over more steps, a longer prompt in chunks. A caller bounds by it how long a
    /// step that prefills keeps the decodes waiting; tests use it to make chunks. At least one
    /// token a step is prefilled whatever the cap. Switches keep it; `None` lifts it.
    pub fn cap_step_tokens(&mut self, tokens: Option<usize>) {
        self.prefill_tokens = tokens;
    }

    /// The cap on a step's prompt tokens (`cap_step_tokens`), if set.
    pub fn step_prefill_tokens(&self) -> Option<usize> {
        self.prefill_tokens
    }

    /// Bytes a step's activations may take now (what its cap in bytes allows): on CPU ranks the
    /// whole step's host memory, on GPU ranks each rank's device memory (each replica counts
    /// apart); `None` where no cap in bytes holds (a host whose memory cannot be read).
    pub fn step_cap_bytes(&self) -> Option<u64> {
        match self.step_cap {
            StepCap::HostBytes(b) | StepCap::DeviceBytes { per_rank: b, .. } => Some(b),
            StepCap::Unread => Some(0),
            StepCap::None => None,
        }
    }

    /// Reads the step cap again from what the ranks' memory holds now: on GPU ranks each rank's
    /// share of its GPU's free memory, for a caller that shares the GPUs with something else (a
    /// trainer colocated with the rollout) after it took or gave back memory. The engine reads
    /// it itself at load, after each switch and after each pool growth. Host memory is read
    /// once, at load. Errors when a GPU cannot be read (the cap is then as it was).
    pub fn refresh_step_cap(&mut self) -> Result<()> {
        let (tp, bs) = (self.layout.tp, self.opts.block_size);
        if let Some(cap) = self.ranks.set_ref().step_cap(&self.cfg, tp, bs)? {
            self.step_cap = cap;
        }
        Ok(())
    }

    /// [`Engine::refresh_step_cap`] where generation goes on whatever happens (after a switch
    /// or a growth): memory that cannot be read leaves one prefill per replica a step
    /// ([`StepCap::Unread`]: as much of one sequence as the cap on prompt tokens allows) rather
    /// than an old layout's budget, and the next step reads again.
    pub(super) fn refresh_step_cap_or_least(&mut self) {
        self.step_cap_stale = self.refresh_step_cap().is_err();
        // Only GPU ranks read their memory after load.
        if self.step_cap_stale && self.ranks.backend() == "cuda" {
            self.step_cap = StepCap::Unread;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::shard::tests::cfg;

    #[test]
    fn a_step_room_takes_what_fits_in_chunks_and_at_least_a_token_first() {
        let c = cfg(301);
        let mut r = StepRoom::new(StepCap::None, None, &c, 1, 1, 16);
        assert!((0..100).all(|_| r.take(0, 1 << 20) == 1 << 20));
        // A token cap counts prompt tokens only, over the whole step: a prompt longer than
        // what is left takes a chunk of it.
        let mut r = StepRoom::new(StepCap::None, Some(5), &c, 2, 2, 16);
        r.charge(0, 1);
        assert_eq!(r.take(0, 3), 3);
        assert_eq!(r.take(1, 3), 2, "the chunk that fits");
        assert_eq!((r.take(1, 2), r.take(0, 1)), (0, 0), "nothing is left");
        let mut r = StepRoom::new(StepCap::None, Some(1), &c, 1, 1, 16);
        assert_eq!(r.take(0, 40), 1, "a chunk of one token");
        assert_eq!(r.take(0, 1), 0);
        let mut r = StepRoom::new(StepCap::None, Some(0), &c, 1, 1, 16);
        assert_eq!(
            r.take(0, 40),
            1,
            "the first prefill takes a token whatever is left"
        );
        assert_eq!(r.take(0, 40), 0);

        // Host bytes: what `host_step_bytes` counts (the step-memory test measures it), linear
        // in tokens and sequences, over the whole step.
        for tp in [1, 2, 4] {
            let (token, seq) = (host_step_bytes(&c, tp, 1, 0), host_step_bytes(&c, tp, 0, 1));
            assert_eq!(host_step_bytes(&c, tp, 10, 3), 10 * token + 3 * seq);
            let ten = 10 * token + seq;
            let mut r = StepRoom::new(StepCap::HostBytes(ten), None, &c, tp, 2, 16);
            assert_eq!(r.take(0, 10), 10, "tp {tp}: ten tokens fit exactly");
            assert_eq!(r.take(1, 1), 0, "tp {tp}: nothing is left for any replica");
            // A decode counts first; a prefill then takes the chunk that fits.
            let mut r = StepRoom::new(StepCap::HostBytes(ten + token + seq), None, &c, tp, 1, 16);
            r.charge(0, 1);
            assert_eq!((r.take(0, 30), r.take(0, 1)), (10, 0), "tp {tp}");
            let mut r = StepRoom::new(StepCap::HostBytes(ten - 1), None, &c, tp, 1, 16);
            assert_eq!(
                r.take(0, 10),
                9,
                "tp {tp}: one byte short of the tenth token"
            );
            assert_eq!(r.take(0, 1), 0, "tp {tp}");
            // Two prompts share what is left: each pays its sequence's bytes.
            let mut r = StepRoom::new(StepCap::HostBytes(2 * seq + 7 * token), None, &c, tp, 1, 16);
            assert_eq!((r.take(0, 4), r.take(0, 10), r.take(0, 1)), (4, 3, 0));
            // Less than a sequence's bytes left: the first prefill still takes a token.
            let mut r = StepRoom::new(StepCap::HostBytes(seq - 1), None, &c, tp, 1, 16);
            assert_eq!((r.take(0, 10), r.take(0, 10)), (1, 0), "tp {tp}");
            // A cap on prompt tokens as well: the tighter of the two holds.
            let mut r = StepRoom::new(StepCap::HostBytes(ten), Some(4), &c, tp, 1, 16);
            assert_eq!(
                (r.take(0, 10), r.take(0, 1)),
                (4, 0),
                "tp {tp}: four tokens"
            );
            let mut r = StepRoom::new(StepCap::HostBytes(ten), Some(40), &c, tp, 1, 16);
            assert_eq!(
                (r.take(0, 30), r.take(0, 1)),
                (10, 0),
                "tp {tp}: ten tokens' bytes"
            );
        }
    }

    #[test]
    fn a_device_cap_counts_each_replicas_ranks_apart() {
        let c = cfg(301);
        for (tp, elem) in [(1, 4), (2, 2), (4, 2)] {
            let bytes = |t, s| device_step_bytes(&c, tp, elem, 16, t, s);
            let (token, seq) = (bytes(1, 0), bytes(0, 1));
            assert_eq!(bytes(10, 3), 10 * token + 3 * seq, "linear");
            // Elements of `elem` bytes: a bf16 rank holds half an f32 rank's activations, less
            // the 4- and 8-byte batch metadata.
            assert_eq!(
                device_step_bytes(&c, tp, 2 * elem, 16, 1, 0) - token,
                token - 16
            );
            let ten = 10 * token + seq;
            let cap = StepCap::DeviceBytes {
                per_rank: ten,
                elem,
            };
            let mut r = StepRoom::new(cap, None, &c, tp, 2, 16);
            assert_eq!(
                (r.take(0, 10), r.take(0, 1)),
                (10, 0),
                "tp {tp}: replica 0 is full"
            );
            assert_eq!(r.take(1, 12), 10, "tp {tp}: replica 1 has its own ranks");
            assert_eq!(r.take(1, 1), 0);
            // A decode on replica 1 leaves replica 0's room alone; replica 1 then has nine
            // tokens' bytes, less its prefill's own sequence bytes.
            let mut r = StepRoom::new(cap, None, &c, tp, 2, 16);
            r.charge(1, 1);
            let chunk = ((9 * token - seq) / token) as usize;
            assert!(chunk < 9, "tp {tp}: a sequence costs more than a token");
            assert_eq!((r.take(0, 10), r.take(1, 10), r.take(1, 1)), (10, chunk, 0));
            // A cap on prompt tokens counts the whole step: a replica's first prefill takes
            // nothing once the other replicas took it all.
            let mut r = StepRoom::new(cap, Some(6), &c, tp, 2, 16);
            assert_eq!((r.take(0, 10), r.take(1, 10), r.take(1, 1)), (6, 0, 0));
            let mut r = StepRoom::new(cap, Some(0), &c, tp, 2, 16);
            assert_eq!((r.take(0, 10), r.take(1, 10)), (1, 0), "one token a step");
            // Memory that could not be read: each replica's first prefill whole (up to the cap
            // on prompt tokens), nothing after it.
            let mut r = StepRoom::new(StepCap::Unread, None, &c, tp, 2, 16);
            assert_eq!(
                (r.take(0, 900), r.take(0, 1), r.take(1, 700)),
                (900, 0, 700)
            );
            let mut r = StepRoom::new(StepCap::Unread, Some(100), &c, tp, 2, 16);
            assert_eq!((r.take(0, 90), r.take(1, 700), r.take(1, 1)), (90, 10, 0));
            // Device bytes short on both replicas: each one's first prefill takes a token.
            let tight = StepCap::DeviceBytes { per_rank: 0, elem };
            let mut r = StepRoom::new(tight, None, &c, tp, 2, 16);
            assert_eq!((r.take(0, 10), r.take(1, 10), r.take(1, 1)), (1, 1, 0));
        }
        // The block table row: one 4-byte entry per block of the longest context.
        let long = ModelConfig {
            max_position_embeddings: 16 * 1000,
            ..c.clone()
        };
        assert_eq!(
            device_step_bytes(&long, 1, 2, 16, 0, 1) - device_step_bytes(&c, 1, 2, 16, 0, 1),
            4 * (1000 - blocks_for(c.max_position_embeddings, 16) as u64)
        );
    }
}
