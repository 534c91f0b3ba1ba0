//! Rollout length traces: JSONL, one request per line `{"prompt_len":P,"response_len":R}`.
//!
//! A line may also carry `input_ids` (a list of token ids, kept but unused by the simulator);
//! any other key is an error, as are zero lengths, blank-only files and non-integer values. Errors
//! name the file and the line. `response_len` is the number of decode steps the request needs (one
//! token per step); `prompt_len` the tokens prefilled before decoding starts.
//!
//! Generators are seeded (ChaCha8) and deterministic:
//!
//! - [`deepscaler_like`]: a DeepScaleR-like reasoning tail at a response cap. Lengths follow a
//!   log-logistic body, `P(X > x) = 1 / (1 + (x/alpha)^beta)`, truncated at the cap (everything
//!   past it lands exactly on the cap, as a capped generation does). `alpha`, `beta` solve
//!   `P(X > cap/3) = 0.1085` (10.85% over 8K at a 24K cap) and `P(X >= cap) = 2.8/128` (~2.8
//!   stragglers at the cap per 128), so the shape scales with the cap. The log-logistic is used
//!   instead of a lognormal because its quantile function is closed-form (no erf approximation):
//!   `x(u) = alpha * (u / (1-u))^(1/beta)`. Samples are stratified (`u_i = (i + U_i)/n`, then
//!   shuffled), so a batch of 128 holds the intended fractions up to one request.
//!   Prompt lengths are uniform in `[cap/384, cap/48]` (64..512 at a 24K cap).
//! - [`uniform`]: response lengths uniform in `[lo, hi]`, prompts uniform in 64..=512.
//! - [`one_straggler`]: `n-1` requests of `short` and one of `long` (the last), prompts 256.
//! - [`super::grpo::grpo`]: GRPO batches (prompts x responses, correlated lengths in a group).

use std::fmt::Write as _;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::error::{Error, Result};

/// Fraction of responses over cap/3 in the DeepScaleR-like generator (PAT: 10.85% over 8K at 24K).
pub const DEEPSCALER_OVER_THIRD: f64 = 0.1085;
/// Fraction of responses that run to the cap (PAT: ~2.8 extreme stragglers per batch of 128).
pub const DEEPSCALER_AT_CAP: f64 = 2.8 / 128.0;

/// The most of a batch that may run to the cap with [`DEEPSCALER_OVER_THIRD`] of it over cap/3:
/// where the log-logistic fitted to both fractions ([`loglogistic_params`]) keeps a shape of at
/// least 1 (0.0389, rounded down to the shown digits). Closer to the fraction over cap/3 the shape falls toward 0: its mean
/// diverges and most responses collapse to a few tokens (at 0.08 the median is 8 tokens of
/// 24K), which no RL batch looks like.
pub fn max_at_cap() -> f64 {
    let odds_third = 1.0 / DEEPSCALER_OVER_THIRD - 1.0;
    (1e4 / (1.0 + 3.0 * odds_third)).floor() / 1e4
}

/// One request of a rollout trace.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TraceRequest {
    pub prompt_len: usize,
    pub response_len: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_ids: Option<Vec<u32>>,
    /// The prompt this response answers (GRPO: `n` responses share a prompt); kept, unused by
    /// the simulator's clock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<usize>,
}

/// A rollout batch: the requests in file order (never empty once parsed or generated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    pub requests: Vec<TraceRequest>,
}

/// Summary numbers of a trace (see [`Trace::stats`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TraceStats {
    pub count: usize,
    pub prompt_mean: f64,
    pub response_mean: f64,
    pub response_p50: usize,
    pub response_p90: usize,
    pub response_p99: usize,
    pub response_max: usize,
    /// The cap the fractions refer to.
    pub cap: usize,
    /// Fraction of responses strictly longer than cap/3.
    pub frac_over_third: f64,
    /// Fraction of responses at (or over) the cap.
    pub frac_at_cap: f64,
    /// Sum of response lengths: decode tokens in the batch.
    pub response_tokens: usize,
    /// GRPO groups (distinct `group` ids) and the fewest and most responses in one, when the
    /// trace names groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<GroupStats>,
}

/// How a trace's responses fall into prompt groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GroupStats {
    pub count: usize,
    pub min_size: usize,
    pub max_size: usize,
}

/// The longest prompt or response a trace may give: no model has more positions, and sums of
/// many such lengths stay far inside u64.
pub const MAX_TRACE_LEN: usize = 1 << 30;
/// The most requests a generated trace may have.
pub const MAX_TRACE_REQUESTS: usize = 1 << 24;

pub(crate) fn positive(v: &Value, key: &str) -> std::result::Result<usize, String> {
    let n = v
        .as_u64()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{key}` must be a positive integer, got {v}"))?;
    usize::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_TRACE_LEN)
        .ok_or_else(|| {
            format!("`{key}` {n} is longer than any model's context (at most {MAX_TRACE_LEN})")
        })
}

impl Trace {
    /// Parses JSONL text; `path` is only used in messages. Blank lines are skipped.
    pub fn parse(path: &Path, text: &str) -> Result<Trace> {
        let mut requests = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let err = |msg: String| Error::Input {
                path: path.to_path_buf(),
                line: i + 1,
                msg,
            };
            let line = if i == 0 {
                crate::model::config::strip_bom(line)
            } else {
                line
            };
            let obj = crate::json::object(line, "each line must be a JSON object").map_err(err)?;
            if let Some(k) = obj.keys().find(|k| {
                !["prompt_len", "response_len", "input_ids", "group"].contains(&k.as_str())
            }) {
                return Err(err(format!(
                    "unknown key `{k}` (expected prompt_len, response_len, input_ids, group)"
                )));
            }
            let field = |key: &str| -> Result<usize> {
                let v = obj
                    .get(key)
                    .ok_or_else(|| err(format!("missing `{key}`")))?;
                positive(v, key).map_err(err)
            };
            let prompt_len = field("prompt_len")?;
            let response_len = field("response_len")?;
            let input_ids =
                match obj.get("input_ids") {
                    None => None,
                    Some(ids) => {
                        let a = ids
                            .as_array()
                            .ok_or_else(|| err("`input_ids` must be a list of token ids".into()))?;
                        let ids =
                            a.iter()
                                .map(|x| {
                                    x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(
                                        || err(format!("`input_ids` holds {x}, not a token id")),
                                    )
                                })
                                .collect::<Result<Vec<u32>>>()?;
                        if ids.len() != prompt_len {
                            return Err(err(format!(
                                "`input_ids` has {} ids but prompt_len is {prompt_len}",
                                ids.len()
                            )));
                        }
                        Some(ids)
                    }
                };
            let group = match obj.get("group") {
                None => None,
                Some(g) => Some(g.as_u64().map(|g| g as usize).ok_or_else(|| {
                    err(format!("`group` must be a non-negative integer, got {g}"))
                })?),
            };
            requests.push(TraceRequest {
                prompt_len,
                response_len,
                input_ids,
                group,
            });
        }
        if requests.is_empty() {
            return Err(Error::Input {
                path: path.to_path_buf(),
                line: 0,
                msg: "empty trace: no requests".into(),
            });
        }
        Ok(Trace { requests })
    }

    /// Reads and parses a JSONL trace file.
    pub fn load(path: &Path) -> Result<Trace> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, &text)
    }

    /// The trace as JSONL (one object per line, newline-terminated).
    pub fn to_jsonl(&self) -> String {
        let mut s = String::new();
        for r in &self.requests {
            // Serializing plain integers and u32 lists cannot fail.
            s.push_str(&serde_json::to_string(r).unwrap_or_default());
            s.push('\n');
        }
        s
    }

    pub fn response_lens(&self) -> Vec<usize> {
        self.requests.iter().map(|r| r.response_len).collect()
    }

    /// Count, means, nearest-rank percentiles (`p`-th = sorted[ceil(p/100 n) - 1]) and fractions
    /// over `cap`/3 and at `cap`; `cap` defaults to the longest response.
    pub fn stats(&self, cap: Option<usize>) -> TraceStats {
        let mut r = self.response_lens();
        r.sort_unstable();
        let n = r.len().max(1);
        let pct = |p: f64| r[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];
        let max = r.last().copied().unwrap_or(0);
        let cap = cap.unwrap_or(max);
        let over = r.iter().filter(|&&x| x > cap / 3).count();
        let at_cap = r.iter().filter(|&&x| x >= cap).count();
        // Saturating: hand-built traces are not bounded like parsed ones.
        let total = r.iter().fold(0usize, |a, &x| a.saturating_add(x));
        let prompts = self
            .requests
            .iter()
            .fold(0usize, |a, q| a.saturating_add(q.prompt_len));
        TraceStats {
            count: r.len(),
            prompt_mean: prompts as f64 / n as f64,
            response_mean: total as f64 / n as f64,
            response_p50: pct(50.0),
            response_p90: pct(90.0),
            response_p99: pct(99.0),
            response_max: max,
            cap,
            frac_over_third: over as f64 / n as f64,
            frac_at_cap: at_cap as f64 / n as f64,
            response_tokens: total,
            groups: self.group_stats(),
        }
    }
}

impl Trace {
    fn group_stats(&self) -> Option<GroupStats> {
        let mut sizes: std::collections::HashMap<usize, usize> = Default::default();
        for g in self.requests.iter().filter_map(|r| r.group) {
            *sizes.entry(g).or_default() += 1;
        }
        Some(GroupStats {
            count: sizes.len(),
            min_size: *sizes.values().min()?,
            max_size: *sizes.values().max()?,
        })
    }
}

impl TraceStats {
    /// A readable two-column table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let rows: [(&str, String); 10] = [
            ("requests", self.count.to_string()),
            ("prompt mean", format!("{:.1}", self.prompt_mean)),
            ("response mean", format!("{:.1}", self.response_mean)),
            ("response p50", self.response_p50.to_string()),
            ("response p90", self.response_p90.to_string()),
            ("response p99", self.response_p99.to_string()),
            ("response max", self.response_max.to_string()),
            (
                "over cap/3",
                format!(
                    "{:.2}% (cap {}, cap/3 = {})",
                    100.0 * self.frac_over_third,
                    self.cap,
                    self.cap / 3
                ),
            ),
            ("at cap", format!("{:.2}%", 100.0 * self.frac_at_cap)),
            ("response tokens", self.response_tokens.to_string()),
        ];
        let groups = self.groups.map(|g| {
            let sizes = match g.min_size == g.max_size {
                true => g.min_size.to_string(),
                false => format!("{} to {}", g.min_size, g.max_size),
            };
            ("groups", format!("{} of {sizes}", g.count))
        });
        for (k, v) in rows.into_iter().chain(groups) {
            let _ = writeln!(s, "{k:<15} {v}");
        }
        s
    }
}

/// Log-logistic `(alpha, beta)` with `P(X > cap/3) = over_third` and `P(X >= cap) = at_cap`.
///
/// With odds `o(x) = (x/alpha)^beta = 1/P(X>x) - 1`: `o(cap)/o(cap/3) = 3^beta`, so
/// `beta = ln(o(cap)/o(cap/3)) / ln 3` and `alpha = cap / o(cap)^(1/beta)`.
pub fn loglogistic_params(cap: usize, over_third: f64, at_cap: f64) -> (f64, f64) {
    let o_cap = 1.0 / at_cap - 1.0;
    let o_third = 1.0 / over_third - 1.0;
    let beta = (o_cap / o_third).ln() / 3f64.ln();
    let alpha = cap as f64 / o_cap.powf(1.0 / beta);
    (alpha, beta)
}

fn check_n(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Invalid(
            "a trace needs at least one request (`n` = 0)".into(),
        ));
    }
    if n > MAX_TRACE_REQUESTS {
        return Err(Error::Invalid(format!(
            "`n` {n} is more requests than a trace may have ({MAX_TRACE_REQUESTS})"
        )));
    }
    Ok(())
}

fn check_len(what: &str, v: usize) -> Result<()> {
    if v > MAX_TRACE_LEN {
        return Err(Error::Invalid(format!(
            "`{what}` {v} is longer than any model's context (at most {MAX_TRACE_LEN})"
        )));
    }
    Ok(())
}

/// A DeepScaleR-like batch of `n` requests at response cap `cap` (see the module docs).
pub fn deepscaler_like(n: usize, cap: usize, seed: u64) -> Result<Trace> {
    check_n(n)?;
    check_len("cap", cap)?;
    if cap < 48 {
        return Err(Error::Invalid(format!(
            "`cap` {cap} is too small (need >= 48)"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (alpha, beta) = loglogistic_params(cap, DEEPSCALER_OVER_THIRD, DEEPSCALER_AT_CAP);
    let mut us: Vec<f64> = (0..n)
        .map(|i| (i as f64 + rng.random::<f64>()) / n as f64)
        .collect();
    us.shuffle(&mut rng);
    let (plo, phi) = ((cap / 384).max(1), (cap / 48).max(1));
    let requests = us
        .into_iter()
        .map(|u| {
            let u = u.clamp(1e-12, 1.0 - 1e-12);
            let x = alpha * (u / (1.0 - u)).powf(1.0 / beta);
            TraceRequest {
                prompt_len: rng.random_range(plo..=phi),
                response_len: (x.round() as usize).clamp(1, cap),
                input_ids: None,
                group: None,
            }
        })
        .collect();
    Ok(Trace { requests })
}

/// `n` requests with response lengths uniform in `[lo, hi]` and prompts uniform in 64..=512.
pub fn uniform(n: usize, lo: usize, hi: usize, seed: u64) -> Result<Trace> {
    check_n(n)?;
    check_len("hi", hi)?;
    if lo == 0 || lo > hi {
        return Err(Error::Invalid(format!(
            "uniform lengths need 1 <= `lo` <= `hi`, got `lo` {lo}, `hi` {hi}"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let requests = (0..n)
        .map(|_| TraceRequest {
            prompt_len: rng.random_range(64..=512),
            response_len: rng.random_range(lo..=hi),
            input_ids: None,
            group: None,
        })
        .collect();
    Ok(Trace { requests })
}

/// `n - 1` requests of `short` tokens and one (the last) of `long`; prompts of 256.
pub fn one_straggler(n: usize, short: usize, long: usize) -> Result<Trace> {
    check_n(n)?;
    check_len("short", short)?;
    check_len("long", long)?;
    if short == 0 || long == 0 {
        return Err(Error::Invalid(format!(
            "straggler lengths must be positive, got `short` {short}, `long` {long}"
        )));
    }
    let requests = (0..n)
        .map(|i| TraceRequest {
            prompt_len: 256,
            response_len: if i + 1 == n { long } else { short },
            input_ids: None,
            group: None,
        })
        .collect();
    Ok(Trace { requests })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("t.jsonl")
    }

    #[test]
    fn parse_reports_file_and_line() {
        let t = Trace::parse(
            p(),
            "{\"prompt_len\":3,\"response_len\":5}\n\n{\"prompt_len\":2,\"response_len\":1,\"input_ids\":[7,8]}\n",
        )
        .unwrap();
        assert_eq!(t.response_lens(), vec![5, 1]);
        assert_eq!(t.requests[1].input_ids, Some(vec![7, 8]));
        let e = Trace::parse(
            p(),
            "{\"prompt_len\":3,\"response_len\":5}\n{\"prompt_len\":3,\"resp\":5}",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("t.jsonl:2:") && e.contains("unknown key `resp`"),
            "{e}"
        );
        let e = Trace::parse(p(), "{\"prompt_len\":0,\"response_len\":5}").unwrap_err();
        assert!(e
            .to_string()
            .contains("`prompt_len` must be a positive integer"));
        let e = Trace::parse(p(), "\n  \n").unwrap_err();
        assert!(e.to_string().contains("empty trace"));
        let e = Trace::parse(
            p(),
            "{\"prompt_len\":2,\"response_len\":1,\"input_ids\":[7]}",
        );
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("has 1 ids but prompt_len is 2"));
    }

    #[test]
    fn jsonl_round_trips() {
        let t = uniform(5, 10, 20, 3).unwrap();
        assert_eq!(Trace::parse(p(), &t.to_jsonl()).unwrap(), t);
    }
}
