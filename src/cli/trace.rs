//! `pat trace gen | import | stats`: make seeded rollout length traces or convert another tool's
//! output (JSONL on stdout), and summarize them.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};

use pat::error::{Error, Result};
use pat::policy::grpo::{grpo, GrpoSpec};
use pat::policy::trace::{deepscaler_like, one_straggler, uniform, Trace, DEEPSCALER_AT_CAP};

#[derive(Args, Debug)]
pub struct TraceArgs {
    #[command(subcommand)]
    pub cmd: TraceCommand,
}

#[derive(Subcommand, Debug)]
pub enum TraceCommand {
    /// Write a seeded trace as JSONL (`{"prompt_len":P,"response_len":R}` per line) to stdout.
    Gen(GenArgs),
    /// Convert another tool's output into a trace: VeRL's generation dumps (decoded text,
    /// re-tokenized; GRPO groups kept) or Mooncake traces (token counts).
    Import(super::trace_import::ImportArgs),
    /// Count, mean / p50 / p90 / p99 / max response length, the fractions over cap/3 and at the
    /// cap, and the GRPO groups (how many, of how many responses) when the trace names them.
    Stats(StatsArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TraceKind {
    /// DeepScaleR-like: log-logistic lengths, ~10.85% over cap/3, ~2.8 per 128 at the cap;
    /// prompts uniform in [cap/384, cap/48] (64..512 at the default cap).
    Deepscaler,
    /// Response lengths uniform in [--lo, --hi]; prompts uniform in 64..512 whatever the cap.
    Uniform,
    /// n-1 requests of --short tokens and one of --long; prompts of 256.
    Straggler,
    /// GRPO: --prompts x --group-size responses, DeepScaleR-like lengths correlated within a
    /// prompt's group (--rho), --at-cap of them at the cap; groups contiguous, as VeRL places them;
    /// one prompt length per group, as deepscaler draws it (scaled by the cap).
    Grpo,
}

impl TraceKind {
    fn name(self) -> &'static str {
        match self {
            TraceKind::Deepscaler => "deepscaler",
            TraceKind::Uniform => "uniform",
            TraceKind::Straggler => "straggler",
            TraceKind::Grpo => "grpo",
        }
    }
}

// Each flag is used by the kinds its help names first; given with any other --kind it is an
// error, not ignored (`check_gen_flags`).
#[derive(Args, Debug)]
pub struct GenArgs {
    #[arg(long, value_enum, default_value = "deepscaler")]
    pub kind: TraceKind,
    /// Deepscaler, uniform, straggler: requests in the batch [default: 128] (grpo: --prompts x
    /// --group-size).
    #[arg(long, value_parser = super::common::count)]
    pub n: Option<usize>,
    /// Grpo: prompts in the batch (PAT's "batch 128" is 128 prompts) [default: 128].
    #[arg(long, value_parser = super::common::count)]
    pub prompts: Option<usize>,
    /// Grpo: responses per prompt (GRPO's n) [default: 8].
    #[arg(long, value_parser = super::common::count)]
    pub group_size: Option<usize>,
    /// Grpo: correlation of sibling responses' latent lengths, 0 (independent) to 1
    /// [default: 0.5].
    #[arg(long, value_parser = super::common::fraction)]
    pub rho: Option<f64>,
    /// Grpo: fraction of responses that run to the cap, above 0 and at most 0.0389 (default
    /// 2.8/128, PAT's ~2.8 per 128). The fraction over cap/3 stays DeepScaleR's 10.85%, so a
    /// larger --at-cap also fattens the tail below the cap and lowers the median.
    #[arg(long)]
    pub at_cap: Option<f64>,
    /// Response cap: no response is longer. Deepscaler and grpo clamp their drawn lengths to it
    /// (as a capped generation does); an explicit --lo, --hi, --short or --long above it is an
    /// error, not clamped.
    #[arg(long, default_value_t = 24576, value_parser = super::common::count)]
    pub cap: usize,
    /// Deepscaler, uniform, grpo: seed of the draws [default: 0] (straggler draws nothing).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Uniform: shortest response (default cap/4 - cap/32).
    #[arg(long)]
    pub lo: Option<usize>,
    /// Uniform: longest response (default cap/4 + cap/32), at most --cap.
    #[arg(long)]
    pub hi: Option<usize>,
    /// Straggler: length of the n-1 short responses (default cap/16), at most --long.
    #[arg(long)]
    pub short: Option<usize>,
    /// Straggler: length of the one long response (default cap), at most --cap.
    #[arg(long)]
    pub long: Option<usize>,
    /// Write here instead of stdout (`-`: stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// A JSONL trace; `-` reads standard input.
    pub file: PathBuf,
    /// Cap the fractions refer to (default: the longest response in the file); a response longer
    /// than it is an error, since a trace made with that cap has none.
    #[arg(long, value_parser = super::common::count)]
    pub cap: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Which kinds use each kind-specific flag, and whether it was given.
fn kind_flags(a: &GenArgs) -> [(&'static str, bool, &'static [TraceKind]); 10] {
    use TraceKind::*;
    [
        ("--n", a.n.is_some(), &[Deepscaler, Uniform, Straggler]),
        ("--prompts", a.prompts.is_some(), &[Grpo]),
        ("--group-size", a.group_size.is_some(), &[Grpo]),
        ("--rho", a.rho.is_some(), &[Grpo]),
        ("--at-cap", a.at_cap.is_some(), &[Grpo]),
        ("--seed", a.seed.is_some(), &[Deepscaler, Uniform, Grpo]),
        ("--lo", a.lo.is_some(), &[Uniform]),
        ("--hi", a.hi.is_some(), &[Uniform]),
        ("--short", a.short.is_some(), &[Straggler]),
        ("--long", a.long.is_some(), &[Straggler]),
    ]
}

/// Refuses a flag the chosen kind does not use, and lengths above the cap.
fn check_gen_flags(a: &GenArgs) -> Result<()> {
    let cap = a.cap;
    for (flag, given, kinds) in kind_flags(a) {
        if given && !kinds.contains(&a.kind) {
            let users: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
            return Err(Error::Usage(format!(
                "{flag} is not used by --kind {} (only by {})",
                a.kind.name(),
                users.join(", ")
            )));
        }
    }
    for (flag, v) in [
        ("--lo", a.lo),
        ("--hi", a.hi),
        ("--short", a.short),
        ("--long", a.long),
    ] {
        if let Some(v) = v.filter(|&v| v > cap) {
            return Err(Error::Usage(format!(
                "{flag} {v} is longer than --cap {cap}: no response may be longer than the cap"
            )));
        }
    }
    if a.kind == TraceKind::Straggler {
        let (short, long) = straggler_lens(a);
        if long < short {
            let said = |v: Option<usize>, default: &str| match v {
                Some(_) => String::new(),
                None => format!(" ({default})"),
            };
            return Err(Error::Usage(format!(
                "--long {long}{} is shorter than --short {short}{}: the straggler is the longest",
                said(a.long, "the default, --cap"),
                said(a.short, "the default, cap/16"),
            )));
        }
    }
    Ok(())
}

/// (short, long) of a straggler trace, defaults applied.
fn straggler_lens(a: &GenArgs) -> (usize, usize) {
    (
        a.short.unwrap_or((a.cap / 16).max(1)),
        a.long.unwrap_or(a.cap),
    )
}

/// Builds the trace `pat trace gen` would write.
pub fn generate(a: &GenArgs) -> Result<Trace> {
    check_gen_flags(a)?;
    let cap = a.cap;
    let (n, seed) = (a.n.unwrap_or(128), a.seed.unwrap_or(0));
    if a.kind == TraceKind::Uniform && a.lo.is_none() && a.hi.is_none() && cap / 4 == 0 {
        return Err(Error::Usage(format!(
            "--cap {cap} is too small for the default uniform range (cap/4 +- cap/32); give --lo and --hi"
        )));
    }
    let (lo, hi) = (
        a.lo.unwrap_or((cap / 4).saturating_sub(cap / 32).max(1)),
        a.hi.unwrap_or(cap / 4 + cap / 32),
    );
    if a.kind == TraceKind::Uniform && lo > hi {
        // One of the two was the default: say which, and what it was.
        let said = |v: usize, given: bool, default: &str| match given {
            true => v.to_string(),
            false => format!("{v} (the default, {default})"),
        };
        return Err(Error::Usage(format!(
            "--lo {} is above --hi {}: uniform lengths need --lo <= --hi",
            said(lo, a.lo.is_some(), "cap/4 - cap/32"),
            said(hi, a.hi.is_some(), "cap/4 + cap/32")
        )));
    }
    let r = match a.kind {
        TraceKind::Deepscaler => deepscaler_like(n, cap, seed),
        TraceKind::Uniform => uniform(n, lo, hi, seed),
        TraceKind::Straggler => {
            let (short, long) = straggler_lens(a);
            one_straggler(n, short, long)
        }
        TraceKind::Grpo => grpo(&GrpoSpec {
            prompts: a.prompts.unwrap_or(128),
            group_size: a.group_size.unwrap_or(8),
            cap,
            rho: a.rho.unwrap_or(0.5),
            at_cap: a.at_cap.unwrap_or(DEEPSCALER_AT_CAP),
            seed,
        }),
    };
    // A trace is made from the command line alone: whatever it refuses is a usage error.
    r.map_err(|e| Error::Usage(trace_flags(&e.to_string())))
}

/// A generator's message with its parameter names as the flags of `pat trace gen`.
fn trace_flags(msg: &str) -> String {
    let mut m = msg.to_string();
    for (p, f) in [
        ("`n`", "--n"),
        ("`cap`", "--cap"),
        ("`lo`", "--lo"),
        ("`hi`", "--hi"),
        ("`short`", "--short"),
        ("`long`", "--long"),
        ("`prompts`", "--prompts"),
        ("`group_size`", "--group-size"),
        ("`rho`", "--rho"),
        ("`at_cap`", "--at-cap"),
    ] {
        m = m.replace(p, f);
    }
    m
}

/// The trace in `file` (`-`: stdin), checked against `cap`: a response longer than the cap is an
/// error naming its line.
fn load_for_stats(file: &Path, cap: Option<usize>) -> Result<Trace> {
    let t = super::common::load_trace(file)?;
    if let Some(cap) = cap {
        if let Some((i, r)) = t
            .trace
            .requests
            .iter()
            .enumerate()
            .find(|(_, r)| r.response_len > cap)
        {
            return Err(t.request_error(
                i,
                &format!(
                    "`response_len` {} is longer than --cap {cap} (a trace made with that cap has none longer)",
                    r.response_len
                ),
            ));
        }
    }
    Ok(t.trace)
}

/// Writes `t` as JSONL to `out` (`None` or `-`: stdout).
fn write_trace(t: &Trace, out: Option<&Path>) -> Result<()> {
    let text = t.to_jsonl();
    match out.filter(|p| p.as_os_str() != "-") {
        Some(p) => super::common::OutFile::claim(p, "--out")?.write(text.as_bytes()),
        None => std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .map_err(|e| Error::io("<stdout>", e)),
    }
}

pub fn run(a: TraceArgs) -> Result<()> {
    match a.cmd {
        TraceCommand::Gen(g) => write_trace(&generate(&g)?, g.out.as_deref()),
        TraceCommand::Import(i) => {
            let (path, r) = super::trace_import::convert(&i)?;
            write_trace(&r.trace, i.out.as_deref())?;
            eprintln!("{}", super::trace_import::summary(&path, &i, &r));
            Ok(())
        }
        TraceCommand::Stats(s) => {
            let st = load_for_stats(&s.file, s.cap)?.stats(s.cap);
            if s.json {
                outln!("{}", serde_json::to_string(&st).unwrap_or_default())?;
            } else {
                if s.file.as_os_str() == "-" {
                    outln!("<stdin>")?;
                } else {
                    outln!("{}", s.file.display())?;
                }
                super::common::stdout_write(format_args!("{}", st.table()))?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(kind: TraceKind) -> GenArgs {
        GenArgs {
            kind,
            n: (kind != TraceKind::Grpo).then_some(8),
            prompts: (kind == TraceKind::Grpo).then_some(4),
            group_size: (kind == TraceKind::Grpo).then_some(2),
            rho: None,
            at_cap: None,
            cap: 3200,
            seed: None,
            lo: None,
            hi: None,
            short: None,
            long: None,
            out: None,
        }
    }

    #[test]
    fn defaults_follow_the_cap() {
        // Straggler: 7 of cap/16 = 200 and one of 3200. Uniform: within cap/4 -+ cap/32 = 700..900.
        let s = generate(&gen(TraceKind::Straggler)).unwrap();
        assert_eq!(
            s.response_lens(),
            vec![200, 200, 200, 200, 200, 200, 200, 3200]
        );
        let u = generate(&gen(TraceKind::Uniform)).unwrap();
        assert!(u.response_lens().iter().all(|r| (700..=900).contains(r)));
        let mut bad = gen(TraceKind::Uniform);
        bad.lo = Some(10);
        bad.hi = Some(5);
        assert!(generate(&bad).is_err());
    }

    #[test]
    fn gen_writes_a_file_stats_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let mut g = gen(TraceKind::Deepscaler);
        g.out = Some(path.clone());
        run(TraceArgs {
            cmd: TraceCommand::Gen(g),
        })
        .unwrap();
        let t = Trace::load(&path).unwrap();
        assert_eq!(t, deepscaler_like(8, 3200, 0).unwrap());
        let stats = StatsArgs {
            file: path,
            cap: None,
            json: true,
        };
        run(TraceArgs {
            cmd: TraceCommand::Stats(stats),
        })
        .unwrap();
        let missing = StatsArgs {
            file: dir.path().join("nope.jsonl"),
            cap: None,
            json: false,
        };
        let e = run(TraceArgs {
            cmd: TraceCommand::Stats(missing),
        })
        .unwrap_err();
        assert!(e.to_string().contains("nope.jsonl"));
    }
}
