//! What several commands share: opening `--model`, progress bars on stderr.

use std::fmt;
use std::io::Write;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use pat::error::Result;
use pat::model::ModelDir;

/// Opens the `--model` directory; errors about the directory itself name the flag.
pub fn open_model(dir: &Path) -> Result<ModelDir> {
    ModelDir::open(dir).map_err(|e| match e {
        e @ pat::Error::Invalid(_) => e.context("--model"),
        e => e,
    })
}

/// Checks the decision rule's flags shared by `rollout` and `simulate` before any work: the
/// margin a fraction in [0, 1), the least gain a non-negative number of ms, checks at least
/// every step.
pub fn check_rule_flags(margin: f64, min_gain_ms: f64, check_every: usize) -> Result<()> {
    if !(0.0..1.0).contains(&margin) {
        return Err(pat::Error::Invalid(format!(
            "--margin must be a fraction in [0, 1), got {margin}"
        )));
    }
    if !(min_gain_ms >= 0.0 && min_gain_ms.is_finite()) {
        return Err(pat::Error::Invalid(format!(
            "--min-gain-ms must be a non-negative number of ms, got {min_gain_ms}"
        )));
    }
    if check_every == 0 {
        return Err(pat::Error::Invalid(
            "--check-every must be at least 1".into(),
        ));
    }
    Ok(())
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    let style =
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb
}

/// Writes `text` to stdout. A closed stdout (`pat ... | head -1`) or a full disk is an error
/// naming `<stdout>`, never a panic; `main` exits quietly on a closed pipe.
pub fn stdout_write(text: fmt::Arguments<'_>) -> pat::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(text)
        .and_then(|()| out.flush())
        .map_err(|e| pat::Error::io("<stdout>", e))
}

/// Whether `e` is stdout's reader having gone away (the consumer of a pipe exited).
pub fn is_closed_pipe(e: &pat::Error) -> bool {
    matches!(e, pat::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
}
