//! The KV side of a GPU rank's switch (`switch`): messages (one round of layers of a KV batch),
//! block ids on the device, the `kv_gather` / `kv_scatter` launches that move a batch between a
//! pool and a message, the `kv_copy` launches that move a batch pool to pool (staying on the
//! rank, or offered in place by a peer on the same GPU), one launch per layer, and the two ways
//! batches change rank (`GpuRank::kv_rounds`, `GpuRank::kv_in_place`).

use super::switch::RankSwitch;
use super::{GpuKvPool, GpuRank};
use crate::backend::cuda::buffer::{DBuf, DType, DView};
use crate::backend::cuda::comm::DeviceComm;
use crate::backend::cuda::ops::{self, KvCacheView};
use crate::error::{Error, Result};
use crate::kv::blocks_for;
use crate::reshard::kv::batch::KvBatch;
use crate::reshard::kv::program::KvStep;
use crate::reshard::kv::KvPlan;

/// A KV batch this rank sends (gathered from the old pool) or receives (scattered into the
/// new pool), a round of layers at a time through `data`; or, where ranks share device memory,
/// offered in place (`kv_offer`) and copied pool to pool by the receiver (`data` None).
pub(super) struct Message {
    /// The peer (the receiver of a send, the sender of a receive).
    pub(super) peer: usize,
    /// Local head in the old pool (send) or the new pool (receive).
    pub(super) head: usize,
    /// The batch's blocks (i32 ids) in that pool, `blocks` of them.
    pub(super) ids: DBuf,
    pub(super) blocks: usize,
    /// What both sides of the batch agree on: its global kv head, first sequence and number of
    /// sequences (an offer carries it; the receiver checks it).
    pub(super) key: [u64; 3],
    /// One round's layers of the batch (None when offered in place).
    pub(super) data: Option<DBuf>,
}

/// Elements of `layers` layers of a KV batch of `nb` blocks (K and V).
pub(super) fn batch_len(plan: &KvPlan, layers: usize, nb: usize) -> usize {
    layers * 2 * nb * plan.block_size * plan.head_dim
}

/// The batch's blocks (i32 ids) on the device: its sequences' old or `new` tables, in order.
pub(super) fn batch_ids(
    dev: &crate::backend::cuda::device::CudaDev,
    plan: &KvPlan,
    b: &KvBatch,
    new: bool,
) -> Result<DBuf> {
    let mut ids = Vec::with_capacity(b.blocks);
    for &seq in &b.seqs {
        let s = &plan.seqs[seq];
        let nb = blocks_for(s.len, plan.block_size);
        let table = if new { &s.new_table } else { &s.old_table };
        ids.extend(table[..nb].iter().map(|&x| x as i32));
    }
    DBuf::from_slice(dev, &ids)
}

/// One layer of a KV batch: kv head `head` of `nb` blocks (`ids`) of `pool`'s layer `l` copied
/// into `data` (`gather`) or out of it, `data` = `[2 (K, V)][nb][block_size][head_dim]`.
#[allow(clippy::too_many_arguments)]
fn kv_move(
    dev: &crate::backend::cuda::device::CudaDev,
    pool: &GpuKvPool,
    l: usize,
    ids: &DBuf,
    nb: usize,
    head: usize,
    data: DView<'_>,
    gather: bool,
) -> Result<()> {
    if nb == 0 {
        return Ok(());
    }
    let cache = pool.layer(l)?;
    if gather {
        ops::kv_gather(dev, &cache, data, ids.view(), head, 1)
    } else {
        ops::kv_scatter(dev, &cache, data, ids.view(), head, 1)
    }
}

/// One layer of a KV batch that stays on the rank: its blocks (`src.1`) and head (`src.2`) of
/// the old pool copied into its blocks and head of the new pool (`dst`), in one pass.
pub(super) fn kv_copy_layer(
    dev: &crate::backend::cuda::device::CudaDev,
    src: (&GpuKvPool, &DBuf, usize),
    dst: (&GpuKvPool, &DBuf, usize),
    l: usize,
) -> Result<()> {
    let (from, to) = (src.0.layer(l)?, dst.0.layer(l)?);
    ops::kv_copy(dev, &from, src.1.view(), src.2, &to, dst.1.view(), dst.2, 1)
}

/// [`kv_move`] for layers `layers` of `pool` and message `m`'s blocks and head: `data` =
/// `[layers][2 (K, V)][blocks][block_size][head_dim]`, its first layer `layers.start`.
fn kv_layers(
    dev: &crate::backend::cuda::device::CudaDev,
    pool: &GpuKvPool,
    m: &Message,
    data: DView<'_>,
    layers: std::ops::Range<usize>,
    gather: bool,
) -> Result<()> {
    let per = 2 * m.blocks * pool.block_size * pool.head_dim;
    for (i, l) in layers.enumerate() {
        let data = data.slice(i * per, per)?;
        kv_move(dev, pool, l, &m.ids, m.blocks, m.head, data, gather)?;
    }
    Ok(())
}

/// The peer of `m` and its first `layers` layers of data (one round's message).
pub(super) fn round_part<'a>(
    plan: &KvPlan,
    layers: usize,
    m: &'a Message,
) -> Result<(usize, DView<'a>)> {
    Ok((
        m.peer,
        data(m)?.slice(0, batch_len(plan, layers, m.blocks))?,
    ))
}

/// `m`'s message buffer.
fn data(m: &Message) -> Result<DView<'_>> {
    (m.data.as_ref().map(DBuf::view))
        .ok_or_else(|| Error::Internal("a KV message without its buffer".into()))
}

/// Words before the per-layer pointers of a [`kv_offer`].
const OFFER_HEAD: usize = 11;

/// A batch this rank sends, offered in place ([`DeviceComm::share`]): its block ids (device
/// address and count) and head in this rank's old pool, the pool's geometry and element size,
/// the batch's key ([`Message::key`]), then each layer's K and V addresses.
///
/// [`DeviceComm::share`]: crate::backend::cuda::comm::DeviceComm::share
fn kv_offer(pool: &GpuKvPool, m: &Message) -> Result<Vec<u64>> {
    let es = pool.layer(0).map_or(0, |c| c.k.dtype().size());
    let mut w = vec![
        m.ids.view().ptr(),
        m.blocks as u64,
        m.head as u64,
        pool.kv_heads as u64,
        pool.num_blocks as u64,
        pool.block_size as u64,
        pool.head_dim as u64,
        es as u64,
    ];
    w.extend(m.key);
    for l in 0..pool.layers() {
        let c = pool.layer(l)?;
        w.extend([c.k.ptr(), c.v.ptr()]);
    }
    Ok(w)
}

/// Every layer of a batch a peer offered in place (`words`, [`kv_offer`]) copied from the
/// peer's old pool into `pool` (this rank's new one) at receive `m`'s blocks and head
/// (`kv_copy`). Errors, copying nothing, when the offer does not describe `m`'s batch in a pool
/// of `pool`'s geometry and dtype.
fn kv_take_offer(
    dev: &crate::backend::cuda::device::CudaDev,
    words: &[u64],
    pool: &GpuKvPool,
    m: &Message,
) -> Result<()> {
    let layers = pool.layers();
    let bad = |what: &str| Error::Internal(format!("a KV offer from rank {}: {what}", m.peer));
    if words.len() != OFFER_HEAD + 2 * layers {
        return Err(bad(&format!("{} words for {layers} layers", words.len())));
    }
    let n = |i: usize| words[i] as usize;
    let (ids, blocks, head, heads, num_blocks) = (words[0], n(1), n(2), n(3), n(4));
    let own = pool.layer(0)?;
    let dtype = own.k.dtype();
    if words[8..OFFER_HEAD] != m.key {
        return Err(bad(&format!(
            "it is the batch of global kv head {}, first sequence {} and {} sequences; this rank \
             receives head {}, first sequence {} and {} sequences",
            words[8], words[9], words[10], m.key[0], m.key[1], m.key[2]
        )));
    }
    if blocks != m.blocks || (n(5), n(6), n(7)) != (pool.block_size, pool.head_dim, dtype.size()) {
        return Err(bad(&format!(
            "{blocks} blocks of {} x {} x {} bytes, this rank receives {} of {} x {} x {}",
            n(5),
            n(6),
            n(7),
            m.blocks,
            pool.block_size,
            pool.head_dim,
            dtype.size()
        )));
    }
    let elems = num_blocks * heads * pool.block_size * pool.head_dim;
    // SAFETY: the offering rank's old pool and block ids stay allocated and unchanged until its
    // stream waited for this rank's reads (`DeviceComm::share`); the copies below are enqueued
    // on this rank's stream before `share` returns.
    let src_ids = unsafe { DView::from_raw(ids, blocks, DType::I32) };
    for l in 0..layers {
        let (k, v) = (words[OFFER_HEAD + 2 * l], words[OFFER_HEAD + 2 * l + 1]);
        // SAFETY: as above: layer `l` of the offering pool, `elems` elements of `dtype` each.
        let src = unsafe {
            KvCacheView {
                k: DView::from_raw(k, elems, dtype),
                v: DView::from_raw(v, elems, dtype),
                num_blocks,
                num_kv_heads: heads,
                block_size: pool.block_size,
                head_dim: pool.head_dim,
            }
        };
        let dst = pool.layer(l)?;
        ops::kv_copy(dev, &src, src_ids, head, &dst, m.ids.view(), m.head, 1)?;
    }
    Ok(())
}

/// Blocks a rank's program sends plus receives (each batch's blocks, per layer and K or V).
pub(super) fn message_blocks(plan: &KvPlan, prog: &crate::reshard::kv::KvProgram) -> usize {
    prog.steps
        .iter()
        .filter(|s| !matches!(s, KvStep::Local { .. }))
        .filter_map(|s| plan.seqs.get(s.parts().0))
        .map(|s| blocks_for(s.len, plan.block_size))
        .sum()
}

/// The two ways a switch's KV batches change rank ([`GpuRank::switch_exchange`]).
impl GpuRank {
    /// The KV exchange by messages, a round of layers at a time: each round's layers of every
    /// batch sent gathered into its message, the messages exchanged, and each received one
    /// scattered into the new pool as the exchange hands it over. Only an exchange's own error
    /// returns; a failed gather or scatter goes to `failed` and the rounds go on.
    pub(super) fn kv_rounds(
        &self,
        sw: &RankSwitch,
        world: &dyn DeviceComm,
        failed: &mut Option<Error>,
    ) -> Result<()> {
        let layers = sw.plan.kv_plan.num_layers;
        for l0 in (0..layers).step_by(sw.round.max(1)) {
            let ls = l0..layers.min(l0 + sw.round);
            if failed.is_none() {
                if let Err(e) = (sw.outbox.iter())
                    .try_for_each(|m| kv_layers(&self.dev, &self.kv, m, data(m)?, ls.clone(), true))
                {
                    *failed = Some(e);
                }
            }
            let (plan, n) = (&sw.plan.kv_plan, ls.len());
            let sends = (sw.outbox.iter())
                .map(|m| round_part(plan, n, m))
                .collect::<Result<Vec<_>>>()?;
            let recvs = (sw.inbox.iter())
                .map(|m| round_part(plan, n, m))
                .collect::<Result<Vec<_>>>()?;
            let (inbox, pool) = (&sw.inbox, &sw.new_kv);
            let mut take = |j: usize, data: DView<'_>| {
                if failed.is_none() {
                    let m = &inbox[j];
                    if let Err(e) = kv_layers(&self.dev, pool, m, data, ls.clone(), false) {
                        *failed = Some(e);
                    }
                }
                Ok(())
            };
            world.exchange_then(&self.dev, &sends, &recvs, &mut take)?;
        }
        Ok(())
    }

    /// The KV exchange by reference (ranks sharing device memory): every batch sent offered in
    /// place (`kv_offer`: its blocks in the old pool), and each batch received copied from the
    /// sender's old pool into the new pool in one pass per layer (`kv_copy`): no gather, no
    /// message. Errors as [`Self::kv_rounds`].
    pub(super) fn kv_in_place(
        &self,
        sw: &RankSwitch,
        world: &dyn DeviceComm,
        failed: &mut Option<Error>,
    ) -> Result<()> {
        let offers = (sw.outbox.iter())
            .map(|m| Ok((m.peer, kv_offer(&self.kv, m)?)))
            .collect::<Result<Vec<_>>>()?;
        let expect: Vec<usize> = sw.inbox.iter().map(|m| m.peer).collect();
        let (inbox, pool) = (&sw.inbox, &sw.new_kv);
        let mut read = |j: usize, words: &[u64]| {
            if failed.is_none() {
                if let Err(e) = kv_take_offer(&self.dev, words, pool, &inbox[j]) {
                    *failed = Some(e);
                }
            }
            Ok(())
        };
        world.share(&self.dev, &offers, &expect, &mut read)
    }
}
