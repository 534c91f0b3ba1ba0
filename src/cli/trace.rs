//! `pat trace gen | stats`: make seeded rollout length traces (JSONL on stdout) and summarize them.

use std::io::Write as _;
use std::path::PathBuf;

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
    /// Count, mean / p50 / p90 / p99 / max response length and the fraction over cap/3.
    Stats(StatsArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TraceKind {
    /// DeepScaleR-like: log-logistic lengths, ~10.85% over cap/3, ~2.8 per 128 at the cap.
    Deepscaler,
    /// Response lengths uniform in [--lo, --hi].
    Uniform,
    /// n-1 requests of --short tokens and one of --long.
    Straggler,
    /// GRPO: --prompts x --group-size responses, DeepScaleR-like lengths correlated within a
    /// prompt's group (--rho), --at-cap of them at the cap; groups contiguous, as VeRL places them.
    Grpo,
}

#[derive(Args, Debug)]
pub struct GenArgs {
    #[arg(long, value_enum, default_value = "deepscaler")]
    pub kind: TraceKind,
    /// Requests in the batch (not grpo: there it is --prompts x --group-size).
    #[arg(long, default_value_t = 128)]
    pub n: usize,
    /// Grpo: prompts in the batch (PAT's "batch 128" is 128 prompts).
    #[arg(long, default_value_t = 128)]
    pub prompts: usize,
    /// Grpo: responses per prompt (GRPO's n).
    #[arg(long, default_value_t = 8)]
    pub group_size: usize,
    /// Grpo: correlation of sibling responses' latent lengths, 0 (independent) to 1.
    #[arg(long, default_value_t = 0.5)]
    pub rho: f64,
    /// Grpo: fraction of responses that run to the cap (default 2.8/128, PAT's ~2.8 per 128).
    #[arg(long)]
    pub at_cap: Option<f64>,
    /// Response cap (longest response).
    #[arg(long, default_value_t = 24576)]
    pub cap: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Uniform: shortest response (default cap/4 - cap/32).
    #[arg(long)]
    pub lo: Option<usize>,
    /// Uniform: longest response (default cap/4 + cap/32).
    #[arg(long)]
    pub hi: Option<usize>,
    /// Straggler: length of the n-1 short responses (default cap/16).
    #[arg(long)]
    pub short: Option<usize>,
    /// Straggler: length of the one long response (default cap).
    #[arg(long)]
    pub long: Option<usize>,
    /// Write here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// A JSONL trace.
    pub file: PathBuf,
    /// Cap the fractions refer to (default: the longest response in the file).
    #[arg(long)]
    pub cap: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Builds the trace `pat trace gen` would write.
pub fn generate(a: &GenArgs) -> Result<Trace> {
    let cap = a.cap;
    if cap == 0 {
        return Err(Error::Invalid("--cap must be at least 1".into()));
    }
    if a.kind == TraceKind::Uniform && a.lo.is_none() && a.hi.is_none() && cap / 4 == 0 {
        return Err(Error::Invalid(format!(
            "--cap {cap} is too small for the default uniform range (cap/4 +- cap/32); give --lo and --hi"
        )));
    }
    let r = match a.kind {
        TraceKind::Deepscaler => deepscaler_like(a.n, cap, a.seed),
        TraceKind::Uniform => uniform(
            a.n,
            a.lo.unwrap_or((cap / 4).saturating_sub(cap / 32).max(1)),
            a.hi.unwrap_or(cap / 4 + cap / 32),
            a.seed,
        ),
        TraceKind::Straggler => one_straggler(
            a.n,
            a.short.unwrap_or((cap / 16).max(1)),
            a.long.unwrap_or(cap),
        ),
        TraceKind::Grpo => grpo(&GrpoSpec {
            prompts: a.prompts,
            group_size: a.group_size,
            cap,
            rho: a.rho,
            at_cap: a.at_cap.unwrap_or(DEEPSCALER_AT_CAP),
            seed: a.seed,
        }),
    };
    r.map_err(|e| Error::Invalid(trace_flags(&e.to_string())))
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

pub fn run(a: TraceArgs) -> Result<()> {
    match a.cmd {
        TraceCommand::Gen(g) => {
            let text = generate(&g)?.to_jsonl();
            match &g.out {
                Some(p) => std::fs::write(p, text).map_err(|e| Error::io(p, e)),
                None => std::io::stdout()
                    .lock()
                    .write_all(text.as_bytes())
                    .map_err(|e| Error::io("<stdout>", e)),
            }
        }
        TraceCommand::Stats(s) => {
            let st = Trace::load(&s.file)?.stats(s.cap);
            if s.json {
                outln!("{}", serde_json::to_string(&st).unwrap_or_default())?;
            } else {
                outln!("{}", s.file.display())?;
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
            n: 8,
            prompts: 4,
            group_size: 2,
            rho: 0.5,
            at_cap: None,
            cap: 3200,
            seed: 0,
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
