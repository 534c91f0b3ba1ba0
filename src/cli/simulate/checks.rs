//! What `pat simulate` refuses before it runs: command-line-only mistakes (usage errors), requests
//! past the model's context, layouts whose replica cannot hold the longest request.

use pat::error::{Error, Result};
use pat::policy::modeled::ModelShape;
use pat::policy::profile::Profile;

use super::{SimulateArgs, MAX_WORLD};

/// `--world` of a simulated node: 1 to [`MAX_WORLD`] GPUs.
pub(super) fn sim_world(v: &str) -> std::result::Result<usize, String> {
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_WORLD).contains(&n) => Ok(n),
        Ok(n) => Err(format!("{n} GPUs: a simulated node has 1 to {MAX_WORLD}")),
        Err(_) => Err(format!(
            "expected a number of GPUs (1 to {MAX_WORLD}), got {v:?}"
        )),
    }
}

/// Refuses what the simulator cannot model sensibly: lengths beyond the model's context (the
/// modeled shape's, or what a measured profile states), naming the request and its line.
pub(super) fn check_bounds(
    a: &SimulateArgs,
    loaded: &crate::cli::common::LoadedTrace,
    profile: &Profile,
) -> Result<()> {
    let shape = |s: ModelShape| Some((format!("{s}'s"), s.max_position_embeddings()));
    let context = match (&a.profile, profile.max_position_embeddings) {
        (Some(path), Some(n)) => Some((format!("the profiled model's ({})", path.display()), n)),
        // A profile written before profiles stated it: the shape named, if any.
        (Some(_), None) => a.model_shape.and_then(shape),
        (None, _) => shape(a.model_shape.unwrap_or(ModelShape::Llama3_8b)),
    };
    if let Some((whose, max_pos)) = context {
        if let Some((i, r)) = loaded
            .trace
            .requests
            .iter()
            .enumerate()
            .find(|(_, r)| r.prompt_len.saturating_add(r.response_len) > max_pos)
        {
            let msg = format!(
                "`prompt_len` {} + `response_len` {} is beyond {whose} context of {max_pos}",
                r.prompt_len, r.response_len
            );
            return Err(loaded.request_error(i, &msg));
        }
    }
    if let Some(cap) = a.cap {
        let reqs = &loaded.trace.requests;
        if let Some((i, r)) = reqs.iter().enumerate().find(|(_, r)| r.response_len > cap) {
            let msg = format!("`response_len` {} is over --cap {cap}", r.response_len);
            return Err(loaded.request_error(i, &msg));
        }
    }
    Ok(())
}

/// Leaves out of `candidates` the tps at which a replica cannot hold the longest request (an
/// engine refuses that layout; `sim::run::unfit_tps`), saying so on stderr and returning the
/// note for the report; refuses a `--start-tp` among them, and a node where none is left.
pub(super) fn fit_candidates(
    a: &SimulateArgs,
    trace: &pat::policy::Trace,
    clock: &dyn pat::sim::clock::StepClock,
    candidates: &mut Vec<usize>,
) -> Result<Option<String>> {
    use pat::sim::run::{longest_context, unfit_tps};
    // `check_flags` has refused a --start-tp that is no layout of --world.
    let start = a.start_tp.filter(|&s| a.world.is_multiple_of(s));
    let tps: Vec<usize> = candidates.iter().chain(start.iter()).copied().collect();
    let unfit = unfit_tps(trace, clock, &tps);
    if unfit.is_empty() {
        return Ok(None);
    }
    let longest = longest_context(trace);
    let whence = if a.profile.is_some() {
        "the profile's `kv_capacity_tokens`"
    } else {
        "--mem-fraction of the GPU memory, less the weights"
    };
    let holds = |tp: usize, cap: usize| format!("at tp {tp} a replica holds {cap} KV tokens");
    if let Some(&(tp, cap)) = unfit.iter().find(|u| Some(u.0) == start) {
        return Err(Error::Invalid(format!(
            "--start-tp {tp}: {} ({whence}), fewer than the longest request's {longest} \
             (prompt + response), which could never finish there",
            holds(tp, cap)
        )));
    }
    candidates.retain(|t| !unfit.iter().any(|u| u.0 == *t));
    let each = unfit
        .iter()
        .map(|&(tp, cap)| holds(tp, cap))
        .collect::<Vec<_>>()
        .join(", ");
    if candidates.is_empty() {
        let remedy = if a.profile.is_some() {
            "profile a node with more KV memory per replica"
        } else {
            "raise --mem-fraction, simulate a larger --world"
        };
        return Err(Error::Invalid(format!(
            "no layout of --world {} holds the longest request's {longest} KV tokens (prompt + \
             response) on a replica: {each} ({whence}); {remedy}, or cap the responses shorter",
            a.world
        )));
    }
    let note = format!(
        "left out: {each} ({whence}), fewer than the longest request's {longest} (prompt + \
         response); an engine refuses such a layout"
    );
    errln!("note: {note}");
    Ok(Some(note))
}

/// Refuses what the command line alone gets wrong (usage errors): the modeled node's flags with
/// a measured --profile, a --start-tp that is no layout of --world.
pub(super) fn check_flags(a: &SimulateArgs) -> Result<()> {
    // `sim_world` checks the flag as it is read; this, an `a` built by hand.
    sim_world(&a.world.to_string()).map_err(|e| Error::Usage(format!("--world: {e}")))?;
    if a.profile.is_some() {
        let modeled = [
            ("--link", a.link.is_some()),
            ("--gpu", a.gpu.is_some()),
            ("--per-seq-us", a.per_seq_us.is_some()),
            ("--mem-fraction", a.mem_fraction.is_some()),
            ("--cost-model", a.cost_model.is_some()),
        ];
        if let Some((flag, _)) = modeled.iter().find(|f| f.1) {
            return Err(Error::Usage(format!(
                "{flag} shapes the modeled node only; a --profile is measured and fixes the node \
                 (--link, --gpu, --per-seq-us, --mem-fraction and --cost-model are moot with it)"
            )));
        }
    }
    let stdin = |p: &Option<std::path::PathBuf>| p.as_ref().is_some_and(|p| p.as_os_str() == "-");
    if stdin(&a.trace) && stdin(&a.lengths_from) {
        return Err(Error::Usage(
            "--trace - and --lengths-from - cannot both read standard input: give one a file"
                .into(),
        ));
    }
    if let Some(s) = a.start_tp.filter(|&s| !a.world.is_multiple_of(s)) {
        return Err(Error::Usage(format!(
            "--start-tp {s} does not divide --world {}: a layout of {} GPUs has tp dividing it",
            a.world, a.world
        )));
    }
    Ok(())
}
