//! The KV side of a GPU rank's switch (`switch`): messages (one round of layers of a KV batch),
//! block ids on the device, the `kv_gather` / `kv_scatter` launches that move a batch between a
//! pool and a message and the `kv_copy` launches that move a batch staying on the rank from the
//! old pool to the new one, one launch per layer.

use super::GpuKvPool;
use crate::backend::cuda::buffer::{DBuf, DView};
use crate::backend::cuda::ops;
use crate::error::Result;
use crate::kv::blocks_for;
use crate::reshard::kv::batch::KvBatch;
use crate::reshard::kv::program::KvStep;
use crate::reshard::kv::KvPlan;

/// A KV batch this rank sends (gathered from the old pool) or receives (scattered into the
/// new pool), a round of layers at a time through `data`.
pub(super) struct Message {
    /// The peer (the receiver of a send, the sender of a receive).
    pub(super) peer: usize,
    /// Local head in the old pool (send) or the new pool (receive).
    pub(super) head: usize,
    /// The batch's blocks (i32 ids) in that pool, `blocks` of them.
    pub(super) ids: DBuf,
    pub(super) blocks: usize,
    /// One round's layers of the batch.
    pub(super) data: DBuf,
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
    if src.1.is_empty() {
        return Ok(());
    }
    let (from, to) = (src.0.layer(l)?, dst.0.layer(l)?);
    ops::kv_copy(dev, &from, src.1.view(), src.2, &to, dst.1.view(), dst.2, 1)
}

/// [`kv_move`] for layers `layers` of `pool` and message `m`'s blocks and head: `data` =
/// `[layers][2 (K, V)][blocks][block_size][head_dim]`, its first layer `layers.start`.
pub(super) fn kv_layers(
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
        m.data.view().slice(0, batch_len(plan, layers, m.blocks))?,
    ))
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
