//! Parallel layout (world, tp, placement), shard rules, and communication groups.

pub mod comm;
pub mod layout;
pub mod placement;
pub mod shard;

pub use comm::{first_cause, Comm, CpuComm, GroupCache, PEER_FAILED};
pub use layout::Layout;

use crate::error::{Error, Result};

/// Runs `f(rank)` for every rank in `0..world`, one scoped thread each, and returns the results
/// in rank order, or the first error that caused the others (`first_cause`), or `Error::Rank`
/// naming a rank whose thread panicked. Every thread is joined before returning.
pub fn per_rank<T: Send>(
    world: usize,
    what: &str,
    f: impl Fn(usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    std::thread::scope(|s| {
        let f = &f;
        let mut hs = Vec::with_capacity(world);
        for rank in 0..world {
            // A thread the OS refuses (limits, memory) is an error, not a panic; the threads
            // already started finish and are joined by the scope.
            match std::thread::Builder::new().spawn_scoped(s, move || f(rank)) {
                Ok(h) => hs.push(h),
                Err(e) => {
                    return Err(Error::Rank {
                        rank,
                        msg: format!("cannot start its {what} thread: {e}"),
                    })
                }
            }
        }
        let results: Vec<Result<T>> = hs
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Rank {
                        rank,
                        msg: format!("{what} thread panicked"),
                    })
                })
            })
            .collect();
        first_cause(results)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_rank_keeps_rank_order_and_reports_failures() {
        assert_eq!(
            per_rank(4, "t", |r| Ok(r * 10)).unwrap(),
            vec![0, 10, 20, 30]
        );
        let e = per_rank(3, "t", |r| {
            if r == 1 {
                Err(Error::Invalid("rank one failed".into()))
            } else {
                Ok(r)
            }
        });
        assert!(matches!(e, Err(Error::Invalid(m)) if m == "rank one failed"));
        let p = per_rank(3, "loader", |r| {
            if r == 2 {
                panic!("boom");
            }
            Ok(r)
        });
        assert!(
            matches!(&p, Err(Error::Rank { rank: 2, msg }) if msg == "loader thread panicked"),
            "{p:?}"
        );
    }
}
