//! Parallel layouts as plain values (`pat::parallel::Layout`): world, tp, and which physical rank
//! holds which (replica, tp-rank).

use pat::parallel::Layout;
use pat::reshard::nested_layout;

use crate::status::{guard, pat_status, Fail, FfiResult};
use crate::util::{copy_out, slice, Out};

/// `world` ranks as `world / tp` replicas of `tp` ranks. `placement` is NULL for the contiguous
/// placement (replica d holds ranks d*tp .. d*tp + tp - 1), or `world` physical ranks, row-major
/// `[replica][tp_rank]`: a permutation of 0 .. world - 1. Borrowed for the call only.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pat_layout {
    pub world: u32,
    pub tp: u32,
    pub placement: *const u32,
}

/// The `Layout` a C layout describes.
///
/// # Safety
/// `l` is NULL or a readable `pat_layout` whose `placement` is NULL or holds `world` entries.
pub(crate) unsafe fn layout_of(l: *const pat_layout, what: &'static str) -> FfiResult<Layout> {
    if l.is_null() {
        return Err(Fail::Null(what));
    }
    // SAFETY: non-NULL and readable by the contract.
    let l = unsafe { l.read_unaligned() };
    let (world, tp) = (l.world as usize, l.tp as usize);
    if l.placement.is_null() {
        return Ok(Layout::new(world, tp)?);
    }
    // SAFETY: the placement holds `world` entries (contract).
    let flat = unsafe { slice(l.placement, world, "placement") }?;
    if tp == 0 || world % tp != 0 {
        return Ok(Layout::new(world, tp)?); // the same error as without a placement
    }
    let rows = flat
        .chunks(tp)
        .map(|r| r.iter().map(|&x| x as usize).collect())
        .collect();
    Ok(Layout::with_placement(world, tp, rows)?)
}

/// The placement of a layout, row-major [replica][tp_rank].
pub(crate) fn flat_placement(l: &Layout) -> Vec<u32> {
    (0..l.dp())
        .flat_map(|d| l.replica_ranks(d).iter().map(|&r| r as u32))
        .collect()
}

/// The placement for `new_tp` over the same ranks as `old` whose weight shards nest inside the
/// old ones (`pat::reshard::nested_layout`): when tp grows by a factor, every rank's new shard lies
/// inside its old one, so the weight reshard moves zero bytes between ranks. Writes `world`
/// entries, row-major `[replica][tp_rank]`, to `placement` and `world` to `*n` (with `cap` too small
/// only `*n`, and `PAT_BUFFER_TOO_SMALL`). Use it as the new layout's `placement`. Errors:
/// `PAT_ERR_INVALID_ARGUMENT` (a bad layout, or `new_tp` not dividing world). Whether the model
/// splits `new_tp` ways is checked by the plans. Thread-safe.
///
/// # Safety
/// `old` is a readable `pat_layout`; `placement` is NULL or holds `cap` writable entries; `n` is
/// a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pat_layout_nested(
    old: *const pat_layout,
    new_tp: u32,
    placement: *mut u32,
    cap: usize,
    n: *mut usize,
) -> pat_status {
    guard(|| {
        // SAFETY: forwarded contract (`n` is writable).
        let n = unsafe { Out::new(n, "n") }?;
        // SAFETY: forwarded contract.
        let old = unsafe { layout_of(old, "old") }?;
        let new = nested_layout(&old, new_tp as usize)?;
        // SAFETY: forwarded contract.
        unsafe { copy_out(&flat_placement(&new), placement, cap, &n, "placement") }
    })
}
