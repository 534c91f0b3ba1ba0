//! What several commands share: opening `--model`, progress bars on stderr, counts with their
//! nouns, and where each request of a JSONL file sits.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use pat::error::{Error, Result};
use pat::model::ModelDir;
use pat::policy::Trace;

/// Opens the `--model` directory; errors about the directory itself name the flag.
pub fn open_model(dir: &Path) -> Result<ModelDir> {
    ModelDir::open(dir).map_err(|e| match e {
        e @ pat::Error::Invalid(_) => e.context("--model"),
        e => e,
    })
}

pub use pat::text::{plural, plural_with, GIB, MIB};

/// The 1-based line of each record of a JSONL text, in order: the library's JSONL readers
/// (requests, traces) skip blank lines, so record `i` (0-based, as the library and the outputs'
/// `index` number requests) sits on line `lines[i]`.
pub fn record_lines(text: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, _)| i + 1)
        .collect()
}

/// The text of the file at `path`, or of stdin when `path` is `-`, with the name messages give
/// it (`<stdin>` for `-`).
pub fn read_input(path: &Path) -> Result<(PathBuf, String)> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text)
            .map_err(|e| pat::Error::io("<stdin>", e))?;
        Ok((PathBuf::from("<stdin>"), text))
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| pat::Error::io(path, e))?;
        Ok((path.to_path_buf(), text))
    }
}

/// A trace read once from a file or stdin ([`read_input`]).
pub struct LoadedTrace {
    /// The name messages give the trace: its path, or `<stdin>`.
    pub path: PathBuf,
    pub trace: Trace,
    /// The line of each request ([`record_lines`]).
    pub lines: Vec<usize>,
}

/// Reads and parses the trace at `path` (`-`: stdin).
pub fn load_trace(path: &Path) -> Result<LoadedTrace> {
    let (path, text) = read_input(path)?;
    let trace = Trace::parse(&path, &text)?;
    let lines = record_lines(&text);
    Ok(LoadedTrace { path, trace, lines })
}

impl LoadedTrace {
    /// An error about request `i` of this trace ([`request_line_error`]).
    pub fn request_error(&self, i: usize, msg: &str) -> pat::Error {
        request_line_error(&self.path, &self.lines, i, msg)
    }
}

/// An error about request `i` of the file at `path` whose requests sit on `lines`:
/// "FILE:LINE: request I: msg", the line 1-based as files are, the request 0-based as the
/// library and the outputs number requests.
pub fn request_line_error(path: &Path, lines: &[usize], i: usize, msg: &str) -> pat::Error {
    pat::Error::Input {
        path: path.to_path_buf(),
        line: lines.get(i).copied().unwrap_or(0),
        msg: format!("request {i}: {msg}"),
    }
}

/// The estimator's lengths from the trace at `path` (`--lengths-from`), capped at `cap` when
/// given (a longer response is an error naming its line), else at the longer of its longest
/// response and `batch_longest` (the cap the batch itself is taken to have).
pub fn lengths_from(
    path: &Path,
    cap: Option<usize>,
    batch_longest: usize,
) -> Result<pat::policy::remaining::LengthDist> {
    let t = load_trace(path)?;
    if let Some(cap) = cap {
        if let Some(i) = t.trace.requests.iter().position(|r| r.response_len > cap) {
            return Err(t.request_error(
                i,
                &format!(
                    "`response_len` {} is longer than --cap {cap}",
                    t.trace.requests[i].response_len
                ),
            ));
        }
    }
    let lens = t.trace.response_lens();
    let longest = lens.iter().copied().max().unwrap_or(1).max(batch_longest);
    pat::policy::remaining::LengthDist::new(&lens, Some(cap.unwrap_or(longest)))
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

/// A count flag that must be at least 1, where leaving it out means no cap ([`count`], with a
/// hint for 0).
pub fn at_least_one(v: &str) -> std::result::Result<std::num::NonZeroUsize, String> {
    let n = count(v).map_err(|e| {
        if e == AT_LEAST_ONE {
            format!("{e} (leave the flag out for no cap)")
        } else {
            e
        }
    })?;
    Ok(std::num::NonZeroUsize::new(n).unwrap_or(std::num::NonZeroUsize::MIN))
}

const AT_LEAST_ONE: &str = "must be at least 1";

/// A count flag: a whole number of at least 1 (a value no command takes is a usage error, exit
/// 2, like any other flag clap refuses).
pub fn count(v: &str) -> std::result::Result<usize, String> {
    match v.trim().parse::<usize>() {
        Ok(0) => Err(AT_LEAST_ONE.into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("expected a whole number >= 1, got {v:?}")),
    }
}

/// A finite number flag within `lo..=hi`, excluding `lo` when `open_lo` and `hi` when `open_hi`;
/// `what` says the range in the message.
fn number_in(
    v: &str,
    lo: f64,
    hi: f64,
    (open_lo, open_hi): (bool, bool),
    what: &str,
) -> std::result::Result<f64, String> {
    let x: f64 = v
        .trim()
        .parse()
        .map_err(|_| format!("expected a number {what}, got {v:?}"))?;
    let above = if open_lo { x > lo } else { x >= lo };
    let below = if open_hi { x < hi } else { x <= hi };
    match x.is_finite() && above && below {
        true => Ok(x),
        false => Err(format!("must be {what}")),
    }
}

/// A number of milliseconds (a least gain, a switch cost): 0 to 1e9 (11 days).
pub fn millis(v: &str) -> std::result::Result<f64, String> {
    number_in(v, 0.0, 1e9, (false, false), "from 0 to 1e9 ms")
}

/// A host cost in microseconds (per sequence or per step): 0 to 1e6 (a second).
pub fn micros(v: &str) -> std::result::Result<f64, String> {
    number_in(v, 0.0, 1e6, (false, false), "from 0 to 1e6 us (a second)")
}

/// A fraction in [0, 1].
pub fn fraction(v: &str) -> std::result::Result<f64, String> {
    number_in(v, 0.0, 1.0, (false, false), "in [0, 1]")
}

/// A fraction in [0, 1) (a margin: 1 would never act).
pub fn fraction_below_one(v: &str) -> std::result::Result<f64, String> {
    number_in(v, 0.0, 1.0, (false, true), "in [0, 1)")
}

/// A share in (0, 1] (a memory fraction, a nucleus mass).
pub fn share(v: &str) -> std::result::Result<f64, String> {
    number_in(v, 0.0, 1.0, (true, false), "in (0, 1]")
}

/// [`share`] as an f32.
pub fn share_f32(v: &str) -> std::result::Result<f32, String> {
    share(v).map(|x| x as f32)
}

/// A sampling temperature: a finite number >= 0 (0: greedy).
pub fn temperature(v: &str) -> std::result::Result<f32, String> {
    let t = number_in(
        v,
        0.0,
        f32::MAX as f64,
        (false, false),
        "a finite number >= 0",
    )?;
    Ok(t as f32)
}

/// A `--world` flag: a number of ranks from 1 to what pat supports, checked as the flag is read
/// so that the message names it (the layout's own check does not know the flag).
pub fn ranks(v: &str) -> std::result::Result<usize, String> {
    let max = pat::parallel::layout::MAX_WORLD;
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        Ok(0) => Err(format!("0 ranks: a world is 1 to {max} ranks")),
        Ok(n) => Err(format!("{n} is more ranks than pat supports ({max})")),
        Err(_) => Err(format!(
            "expected a number of ranks (1 to {max}), got {v:?}"
        )),
    }
}

/// Writes to stderr, ignoring a failure (`errln!`): a diagnostic that cannot be shown must not
/// stop the command (`eprintln!` would panic) or cost the output it was making.
pub fn stderr_write(text: fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(text).and_then(|()| err.flush());
}

/// An output file named by `flag`, made sure of before a run that ends by writing it, and
/// written whole or not at all.
///
/// [`Self::claim`] refuses a directory, a missing parent, an existing file that cannot be
/// written or a directory that takes no new file, naming the flag, before any work; it makes an
/// empty sibling (`.NAME.pat-PID-N.tmp`) that [`Self::write`] fills and renames over the path.
/// So `path` holds its old bytes or the new ones, never a part: not after an error, not after a
/// Ctrl-C (the sibling is removed on every way out, a signal included), not while a reader
/// looks. An existing file keeps its permissions; a symbolic link keeps pointing where it did,
/// its target replaced. Written in place instead (truncated, then written, as most tools do):
/// what is not a regular file (`/dev/null`, a FIFO), what is reached through `/dev` or `/proc`
/// (`/dev/stdout` redirected to a file: replacing that file would cut off the shell's
/// redirection), and an existing file that a rename would change: one with other hard links, or
/// owned by another user (the replacement would be the caller's; in a sticky directory the
/// rename is refused).
pub struct OutFile {
    /// As the user gave it, for messages.
    path: PathBuf,
    /// The sibling and what it is renamed over; `None` for a special file, written in place.
    replace: Option<Replace>,
    written: bool,
}

struct Replace {
    /// `path`, or the file a symbolic link at `path` leads to.
    target: PathBuf,
    tmp: PathBuf,
    _interrupt: super::interrupt::RemoveOnInterrupt,
}

impl OutFile {
    pub fn claim(path: &Path, flag: &str) -> Result<OutFile> {
        let bad = |why: String| Error::Invalid(format!("{flag} {}: {why}", path.display()));
        let out = |replace| OutFile {
            path: path.to_path_buf(),
            replace,
            written: false,
        };
        if path == Path::new("-") {
            // `-` reads stdin where a command takes input; here stdout carries the report.
            return Err(bad(
                "`-` is not a file here (stdout carries the command's report): give a file name"
                    .into(),
            ));
        }
        if path.as_os_str().to_string_lossy().ends_with('/') {
            return Err(bad("names a directory (a trailing /)".into()));
        }
        let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        let writable_now = |fifo: bool| {
            // A FIFO is not opened now: it would wait here for its reader.
            if fifo {
                return Ok(());
            }
            std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .map(drop)
                .map_err(|e| bad(format!("cannot write it ({e})")))
        };
        // Followed through links.
        let existing = match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => return Err(bad("is a directory".into())),
            Ok(m) if in_place(path, &m) => {
                writable_now(is_fifo(&m))?;
                return Ok(out(None));
            }
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && is_link => {
                return Err(bad("a symbolic link to a file that does not exist".into()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(bad(format!("cannot read it ({e})"))),
        };
        let target = if is_link {
            std::fs::canonicalize(path).map_err(|e| bad(format!("cannot follow the link ({e})")))?
        } else {
            path.to_path_buf()
        };
        let name = target
            .file_name()
            .ok_or_else(|| bad("names no file".into()))?;
        let dir = target.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            return Err(bad(format!("directory {} does not exist", dir.display())));
        }
        if existing.is_some() {
            writable_now(false)?;
        }
        static SERIAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp_name = format!(
            ".{}.pat-{}-{n}.tmp",
            name.to_string_lossy(),
            std::process::id()
        );
        let tmp = dir.map_or_else(|| PathBuf::from(&tmp_name), |d| d.join(&tmp_name));
        // Registered before it exists: an interrupt from here on removes it.
        let guard = super::interrupt::RemoveOnInterrupt::new(&tmp);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| bad(format!("cannot create a file next to it ({e})")))?;
        if let Some(m) = existing {
            // Best effort: the replacement reads as the file it replaces did.
            let _ = f.set_permissions(m.permissions());
        }
        Ok(out(Some(Replace {
            target,
            tmp,
            _interrupt: guard,
        })))
    }

    /// The path as the user gave it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `bytes` as the whole file: into the sibling, then renamed over the path (a
    /// special file: into it).
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let io = |e| Error::io(&self.path, e);
        match &self.replace {
            None => std::fs::write(&self.path, bytes).map_err(io)?,
            Some(r) => {
                std::fs::write(&r.tmp, bytes).map_err(io)?;
                std::fs::rename(&r.tmp, &r.target).map_err(io)?;
            }
        }
        self.written = true;
        Ok(())
    }
}

impl Drop for OutFile {
    fn drop(&mut self) {
        if let Some(r) = self.replace.as_ref().filter(|_| !self.written) {
            let _ = std::fs::remove_file(&r.tmp);
        }
    }
}

/// Refuses `--backend cuda` in a build without the cuda feature, before anything else.
pub fn check_backend_built(backend: &pat::engine::Backend) -> Result<()> {
    #[cfg(not(feature = "cuda"))]
    if matches!(backend, pat::engine::Backend::Cuda { .. }) {
        return Err(pat::backend::cuda::not_built());
    }
    let _ = backend;
    Ok(())
}

/// Whether an existing `path` (its metadata `m`, links followed) is written in place rather than
/// replaced ([`OutFile`]).
fn in_place(path: &Path, m: &std::fs::Metadata) -> bool {
    let special = !m.is_file() || path.starts_with("/dev") || path.starts_with("/proc");
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        special || m.nlink() > 1 || m.uid() != me
    }
    #[cfg(not(unix))]
    special
}

fn is_fifo(m: &std::fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_fifo()
    }
    #[cfg(not(unix))]
    {
        let _ = m;
        false
    }
}

/// Whether `e` is stdout's reader having gone away (the consumer of a pipe exited).
pub fn is_closed_pipe(e: &pat::Error) -> bool {
    matches!(e, pat::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_sit_on_their_lines() {
        assert_eq!(record_lines("a\n\n  \nb\nc"), [1, 4, 5]);
        assert!(record_lines("").is_empty());
    }
}
