//! Where GPU ranks go: each rank's CUDA ordinal, the kind of group each replica forms on those
//! devices (none, same-device, NCCL), and how much host memory the loaders may stage in.

use crate::error::{Error, Result};
use crate::parallel::Layout;

/// Errors, naming the sizes, unless each GPU holds what all its ranks upload at once: `each`
/// bytes per rank (its weights and KV pool in the device dtype plus what a step's activations
/// need), `free(ordinal)` its free memory. Each rank checks its own share when it uploads, but
/// ranks sharing a GPU upload concurrently: every check could pass before any allocation and the
/// last allocations then fail with a bare out-of-memory error. A GPU with one rank is left to
/// that rank's own check.
pub fn check_upload_room(
    devices: &[usize],
    each: u64,
    free: impl Fn(usize) -> Result<(usize, usize)>,
) -> Result<()> {
    let mut ords = devices.to_vec();
    ords.sort_unstable();
    ords.dedup();
    for o in ords {
        let n = devices.iter().filter(|&&d| d == o).count();
        if n < 2 {
            continue;
        }
        let (avail, total) = free(o)?;
        let need = each.saturating_mul(n as u64);
        if need > avail as u64 {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            return Err(Error::Device(format!(
                "GPU {o}: its {n} ranks need {:.2} GiB together ({:.2} GiB each: weights, KV \
                 pool and 0.5 GiB for activations), more than its free memory {:.2} of {:.2} \
                 GiB (lower `kv_blocks` or the batch, raise `tp`, or spread ranks with \
                 `devices`)",
                gib(need),
                gib(each),
                gib(avail as u64),
                gib(total as u64)
            )));
        }
    }
    Ok(())
}

/// What a replica's group runs on (for reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupKind {
    /// tp 1: no collectives.
    Solo,
    /// Several ranks on one GPU: device copies and the `all_reduce_sum` kernel.
    SameDevice,
    /// One rank per GPU: NCCL.
    Nccl,
}

impl GroupKind {
    pub fn name(self) -> &'static str {
        match self {
            GroupKind::Solo => "none (tp 1)",
            GroupKind::SameDevice => "same-device",
            GroupKind::Nccl => "nccl",
        }
    }
}

/// Each rank's CUDA ordinal: `explicit` checked against the device count, else the default.
pub(crate) fn place(explicit: Option<&[usize]>, world: usize, count: usize) -> Result<Vec<usize>> {
    match explicit {
        Some(d) => {
            if d.len() != world {
                return Err(Error::Invalid(format!(
                    "`devices` lists {} GPUs but `world` is {world} (one ordinal per rank)",
                    d.len()
                )));
            }
            if let Some(&bad) = d.iter().find(|&&o| o >= count) {
                return Err(Error::Device(format!(
                    "`devices` names GPU {bad} but only {count} CUDA device(s) are present"
                )));
            }
            Ok(d.to_vec())
        }
        None if count >= world => Ok((0..world).collect()),
        None => Ok(vec![0; world]),
    }
}

/// The kind of group replica `d`'s ranks form on `devices`.
pub(crate) fn group_kind(layout: &Layout, devices: &[usize], d: usize) -> Result<GroupKind> {
    let ranks = layout.replica_ranks(d);
    let devs: Vec<usize> = ranks.iter().map(|&r| devices[r]).collect();
    if devs.len() == 1 {
        return Ok(GroupKind::Solo);
    }
    if devs.iter().all(|&o| o == devs[0]) {
        return Ok(GroupKind::SameDevice);
    }
    let mut sorted = devs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() == devs.len() {
        return Ok(GroupKind::Nccl);
    }
    Err(Error::Layout(format!(
        "replica {d}'s ranks {ranks:?} are on GPUs {devs:?}: a tp group must be all on one GPU \
         or one rank per GPU"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_sharing_a_gpu_must_fit_it_together() {
        let free = |o: usize| Ok(([100usize, 40][o], 200usize));
        // GPU 0: three ranks of 30 fit its 100; GPU 1: one rank of 30 is its own check.
        assert!(check_upload_room(&[0, 0, 0, 1], 30, free).is_ok());
        // Four ranks of 30 on GPU 0 do not, though each alone would.
        let e = check_upload_room(&[0, 0, 1, 0, 0], 30, free).unwrap_err();
        assert!(e.to_string().contains("GPU 0: its 4 ranks need"), "{e}");
        // Two ranks of 30 on GPU 1 (40 free) do not either.
        let e = check_upload_room(&[0, 1, 1], 30, free).unwrap_err();
        assert!(e.to_string().contains("GPU 1: its 2 ranks"), "{e}");
        // A GPU that cannot be read is an error, not a pass.
        let broken = |_: usize| Err(Error::Device("no".into()));
        assert!(check_upload_room(&[0, 0], 1, broken).is_err());
        assert!(check_upload_room(&[0, 1], 1, broken).is_ok());
    }

    #[test]
    fn placement_defaults_and_checks() {
        assert_eq!(place(None, 4, 8).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(place(None, 4, 1).unwrap(), vec![0, 0, 0, 0]);
        assert_eq!(place(None, 4, 2).unwrap(), vec![0, 0, 0, 0]);
        assert_eq!(place(Some(&[1, 0]), 2, 2).unwrap(), vec![1, 0]);
        assert!(matches!(place(Some(&[0]), 2, 2), Err(Error::Invalid(_))));
        assert!(matches!(place(Some(&[0, 2]), 2, 2), Err(Error::Device(_))));
    }

    #[test]
    fn group_kinds_follow_the_devices() {
        let l = Layout::new(4, 2).unwrap();
        let kinds = |devs: &[usize]| -> Vec<Result<GroupKind>> {
            (0..l.dp()).map(|d| group_kind(&l, devs, d)).collect()
        };
        let k = kinds(&[0, 0, 0, 0]);
        assert!(k.iter().all(|g| matches!(g, Ok(GroupKind::SameDevice))));
        let k = kinds(&[0, 1, 2, 3]);
        assert!(k.iter().all(|g| matches!(g, Ok(GroupKind::Nccl))));
        let one = Layout::new(2, 1).unwrap();
        assert!(matches!(group_kind(&one, &[0, 0], 1), Ok(GroupKind::Solo)));
        let l3 = Layout::new(3, 3).unwrap();
        assert!(matches!(
            group_kind(&l3, &[0, 0, 1], 0),
            Err(Error::Layout(_))
        ));
    }
}
