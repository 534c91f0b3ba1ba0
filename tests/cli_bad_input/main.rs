//! Bad and edge-case input to the `pat` binary, table-driven: one named case per row, each run as
//! a new user would run it, asserting the exit code, that nothing panicked or aborted (no
//! "panicked" on stderr, no exit 101 / 134 / signal), and that the output names the bad thing
//! (the flag, field, file or tensor the user gave). The tables are grouped by the class of defect
//! they guard (issue #13): `lengths.rs` (arithmetic on untrusted lengths, allocation before
//! validation), `models.rs` (broken, non-finite and degenerate models), `messages.rs` (layouts,
//! flags, requests and files whose messages must name what the user gave; KV admission),
//! `flags.rs` (what the user typed, not a library parameter or a type; outputs checked before a run).

mod fixtures;
mod flags;
mod lengths;
mod messages;
mod models;

use std::process::{Command, Output};

pub use fixtures::Fx;

/// One row: a name, the arguments (built from the fixtures), the exit code expected, text that
/// must appear on stderr or stdout, and text that must not.
pub struct Case {
    pub name: &'static str,
    pub args: fn(&Fx) -> Vec<String>,
    pub code: i32,
    pub needle: &'static str,
    pub absent: Option<&'static str>,
}

/// A case that must fail with pat's own error (exit 1) naming `needle`.
pub const fn err(name: &'static str, args: fn(&Fx) -> Vec<String>, needle: &'static str) -> Case {
    Case {
        name,
        args,
        code: 1,
        needle,
        absent: None,
    }
}

/// A case that clap must refuse (exit 2, a usage error) naming `needle`.
pub const fn usage(name: &'static str, args: fn(&Fx) -> Vec<String>, needle: &'static str) -> Case {
    Case {
        name,
        args,
        code: 2,
        needle,
        absent: None,
    }
}

fn run(fx: &Fx, c: &Case) -> Result<(), String> {
    let args = (c.args)(fx);
    let o: Output = Command::new(env!("CARGO_BIN_EXE_pat"))
        .args(&args)
        .output()
        .map_err(|e| format!("cannot run pat: {e}"))?;
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    let code = o.status.code();
    let what = format!(
        "{}: pat {}\n  exit {code:?}\n  stderr: {err}",
        c.name,
        args.join(" ")
    );
    if err.contains("panicked") || matches!(code, None | Some(101) | Some(134)) {
        return Err(format!("panicked or aborted: {what}"));
    }
    if code != Some(c.code) {
        return Err(format!("expected exit {}: {what}", c.code));
    }
    if !err.contains(c.needle) && !out.contains(c.needle) {
        return Err(format!("expected {:?} in the output: {what}", c.needle));
    }
    if let Some(a) = c.absent {
        if err.contains(a) {
            return Err(format!("{a:?} must not appear: {what}"));
        }
    }
    Ok(())
}

/// Runs every row of `table`, reporting every failing row at once.
pub fn check(table: &[Case]) {
    let fx = fixtures::get();
    let mut names = std::collections::HashSet::new();
    let failures: Vec<String> = table
        .iter()
        .inspect(|c| assert!(names.insert(c.name), "duplicate case name {}", c.name))
        .filter_map(|c| run(fx, c).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        table.len(),
        failures.join("\n\n")
    );
}

/// `["a", "b"]` as owned strings, with `{m}`-style fixture paths already formatted by the caller.
pub fn a(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}
