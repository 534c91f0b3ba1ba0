//! Where GPU ranks go: each rank's CUDA ordinal, the kind of group each replica forms on those
//! devices (none, same-device, NCCL), and how much host memory the loaders may stage in.

use crate::error::{Error, Result};
use crate::parallel::Layout;

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
