//! Every baseline of one simulation ([`simulate_all`]): the static layouts first, then the rules
//! and the optimum searches on a thread each, the optimum rows last checked against the rules'
//! schedules.

use super::{check, optimum, simulate, PolicyKind, SimConfig, SimModel, SimResult, PAT_SWITCH_MS};
use crate::error::Result;
use crate::policy::trace::Trace;

/// Every candidate's static run, and the tp of the fastest (the first on ties); `done` is told
/// of each run as it ends.
fn static_runs(
    trace: &Trace,
    model: &SimModel,
    cfg: &SimConfig,
    done: &(dyn Fn(&SimResult) + Sync),
) -> Result<(Vec<SimResult>, usize)> {
    check(cfg, model)?;
    let mut runs = Vec::new();
    let mut best: Option<(usize, f64)> = None;
    for &tp in &cfg.candidates {
        let r = simulate(trace, model, cfg, PolicyKind::Static(tp), tp)?;
        if best.is_none_or(|(_, t)| r.total_ms < t) {
            best = Some((tp, r.total_ms));
        }
        done(&r);
        runs.push(r);
    }
    Ok((runs, best.map(|b| b.0).unwrap_or(cfg.candidates[0])))
}

/// Every baseline (module docs): the static layouts, PAT's rule at 5.52 s and at the modeled
/// switch cost, adaptive, the oracle rule, (with `cfg.optimum`) the optimum and (with
/// `cfg.optimum_on_estimates`) the optimum placed on estimates. Returns the runs and the best
/// static tp.
pub fn simulate_all(
    trace: &Trace,
    model: &SimModel,
    cfg: &SimConfig,
) -> Result<(Vec<SimResult>, usize)> {
    simulate_all_reporting(trace, model, cfg, &|_| {})
}

/// How many runs [`simulate_all`] makes for `cfg`.
pub fn runs_in_all(cfg: &SimConfig) -> usize {
    cfg.candidates.len() + after_static(cfg).len()
}

/// The runs after the static ones, in the order [`simulate_all`] returns them.
fn after_static(cfg: &SimConfig) -> Vec<PolicyKind> {
    let mut kinds = vec![
        PolicyKind::Pat {
            flat_ms: Some(PAT_SWITCH_MS),
        },
        PolicyKind::Pat { flat_ms: None },
        PolicyKind::Adaptive,
        PolicyKind::Oracle,
    ];
    if cfg.optimum {
        kinds.push(PolicyKind::Optimum {
            on_estimates: false,
        });
    }
    if cfg.optimum_on_estimates {
        kinds.push(PolicyKind::Optimum { on_estimates: true });
    }
    kinds
}

/// [`simulate_all`], telling `done` of each run as it ends (a progress bar: the policies that
/// decide take seconds on a large node, the optimum's search longer). The static runs go first
/// (the others need the best of them); the others, independent of each other, run on a thread
/// each, and come back in the fixed order whatever order they end in.
pub fn simulate_all_reporting(
    trace: &Trace,
    model: &SimModel,
    cfg: &SimConfig,
    done: &(dyn Fn(&SimResult) + Sync),
) -> Result<(Vec<SimResult>, usize)> {
    let (mut runs, best) = static_runs(trace, model, cfg, done)?;
    let kinds = after_static(cfg);
    let rest: Vec<Result<SimResult>> = std::thread::scope(|scope| {
        let handles: Vec<_> = kinds
            .into_iter()
            .map(|k| {
                scope.spawn(move || {
                    let r = simulate(trace, model, cfg, k, best);
                    // The optimum is told of once it has met the other runs (below).
                    if let (Ok(r), false) = (&r, matches!(k, PolicyKind::Optimum { .. })) {
                        done(r);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    for r in rest {
        runs.push(r?);
    }
    // The optimum rows come last. The search's grid can miss a rule's switch round: each also
    // tries the schedules the rules followed at this node's switch cost (all but PAT's flat
    // 5.52 s); the one placed on estimates only those of the rules that placed on the same
    // estimates (not the oracle's), and first, so that the optimum also meets it (LPT on the
    // true lengths is not always the better placement: the optimum is the best found).
    let kinds: Vec<PolicyKind> = cfg
        .candidates
        .iter()
        .map(|&tp| PolicyKind::Static(tp))
        .chain(after_static(cfg))
        .collect();
    let est = super::estimator(trace, cfg)?;
    for on_estimates in [true, false] {
        let Some(i) = kinds
            .iter()
            .position(|k| *k == PolicyKind::Optimum { on_estimates })
        else {
            continue;
        };
        let others: Vec<&SimResult> = runs
            .iter()
            .zip(&kinds)
            .filter(|(_, k)| match k {
                PolicyKind::Pat { flat_ms: None } | PolicyKind::Adaptive => true,
                PolicyKind::Oracle => !on_estimates,
                PolicyKind::Optimum { on_estimates: e } => *e && !on_estimates,
                _ => false,
            })
            .map(|(r, _)| r)
            // Static schedules are the search's own first level.
            .filter(|r| !r.switches.is_empty())
            .collect();
        let found = runs[i].clone();
        let at = on_estimates.then_some(&est);
        runs[i] = optimum::no_worse_than(trace, model, cfg, found, &others, at)?;
        done(&runs[i]);
    }
    Ok((runs, best))
}
