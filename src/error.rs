//! The one error type of the crate: every failure is a value that names the bad input.

use std::path::PathBuf;

/// Every way `pat` can fail. Messages name the offending file, field, value or rank.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config.json / generation_config.json problem: missing field, wrong type, bad value.
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// The model uses a feature this engine does not implement (field and value named).
    #[error("unsupported model: {field} = {value} ({hint})")]
    Unsupported {
        field: String,
        value: String,
        hint: String,
    },
    /// A checkpoint problem: truncated or malformed safetensors, missing tensor, wrong shape or dtype.
    #[error("{path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// An impossible parallel layout (tp not dividing world, heads, kv heads, ...).
    #[error("invalid layout: {0}")]
    Layout(String),
    /// The paged KV pool cannot hold what was asked of it.
    #[error("KV cache exhausted: {0}")]
    KvExhausted(String),
    /// The host has too little memory available for what the CPU ranks must hold (their
    /// weights, checked when the engine loads).
    #[error("host memory: {0}")]
    HostMemory(String),
    /// A bad generation request: token id out of range, prompt too long, empty prompt, ...
    #[error("bad request: {0}")]
    Request(String),
    /// Malformed input file (JSONL requests, traces, profiles), with its line (0: the file as
    /// a whole, e.g. empty; then no line is shown).
    #[error("{}{}: {msg}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Input {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An invalid argument or combination of arguments. Library messages name the parameter
    /// or value (`block_size`, `tp 3`); only the command line names its flags.
    #[error("{0}")]
    Invalid(String),
    /// The command line alone is wrong, whatever the files it names hold: a flag's value no
    /// command takes, or flags the chosen mode makes moot. `pat` exits 2 for it, as for clap's
    /// own usage errors; the library never raises it.
    #[error("{0}")]
    Usage(String),
    /// A rank's worker thread failed or a collective was left by a peer.
    #[error("rank {rank}: {msg}")]
    Rank { rank: usize, msg: String },
    /// Device (CUDA) failures; never raised by the CPU backend.
    #[error("device: {0}")]
    Device(String),
    /// A broken internal invariant (a bug in pat, not in the input).
    #[error("internal error: {0}")]
    Internal(String),
}

/// The kind of an [`Error`]: what a caller (or a C ABI status code) can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A bad argument, request or layout: fix the call.
    InvalidArgument,
    /// The model uses a feature pat does not implement.
    Unsupported,
    /// A file's content is malformed (config, checkpoint, tokenizer, JSONL, profile).
    BadFile,
    /// Out of KV blocks or device memory: retry with fewer sequences or more memory.
    ResourceExhausted,
    /// A device (CUDA driver, cuBLAS, NCCL) failed.
    Device,
    /// The operating system refused a read or write.
    Io,
    /// A rank thread died or an internal invariant broke.
    Internal,
}

impl ErrorKind {
    /// A short stable name (`invalid_argument`, `unsupported`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::BadFile => "bad_file",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::Device => "device",
            ErrorKind::Io => "io",
            ErrorKind::Internal => "internal",
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Config { .. } | Error::Checkpoint { .. } | Error::Input { .. } => {
                ErrorKind::BadFile
            }
            Error::Tokenizer(_) => ErrorKind::BadFile,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Layout(_) | Error::Request(_) | Error::Invalid(_) | Error::Usage(_) => {
                ErrorKind::InvalidArgument
            }
            Error::KvExhausted(_) | Error::HostMemory(_) => ErrorKind::ResourceExhausted,
            Error::Device(_) => ErrorKind::Device,
            Error::Rank { .. } | Error::Internal(_) => ErrorKind::Internal,
        }
    }
    /// An [`Error::Invalid`] whose message is prefixed by `what` (a parameter or a flag).
    pub fn invalid(what: impl std::fmt::Display, msg: impl std::fmt::Display) -> Self {
        Error::Invalid(format!("{what}: {msg}"))
    }
    /// The same error with `ctx` (a flag, a file, a step) in front of its message, kind kept.
    pub fn context(self, ctx: impl std::fmt::Display) -> Self {
        match self {
            Error::Invalid(m) => Error::Invalid(format!("{ctx}: {m}")),
            Error::Usage(m) => Error::Usage(format!("{ctx}: {m}")),
            Error::Layout(m) => Error::Layout(format!("{ctx}: {m}")),
            Error::Request(m) => Error::Request(format!("{ctx}: {m}")),
            Error::KvExhausted(m) => Error::KvExhausted(format!("{ctx}: {m}")),
            Error::HostMemory(m) => Error::HostMemory(format!("{ctx}: {m}")),
            Error::Device(m) => Error::Device(format!("{ctx}: {m}")),
            Error::Internal(m) => Error::Internal(format!("{ctx}: {m}")),
            Error::Rank { rank, msg } => Error::Rank {
                rank,
                msg: format!("{ctx}: {msg}"),
            },
            other => other,
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn unsupported(field: &str, value: impl ToString, hint: &str) -> Self {
        Error::Unsupported {
            field: field.to_string(),
            value: value.to_string(),
            hint: hint.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_a_kind_and_context_keeps_it() {
        let cases = [
            (Error::io("x", std::io::Error::other("e")), ErrorKind::Io),
            (Error::config("c.json", "bad"), ErrorKind::BadFile),
            (Error::checkpoint("m", "bad"), ErrorKind::BadFile),
            (Error::unsupported("f", 1, "h"), ErrorKind::Unsupported),
            (Error::Layout("l".into()), ErrorKind::InvalidArgument),
            (Error::KvExhausted("k".into()), ErrorKind::ResourceExhausted),
            (Error::HostMemory("h".into()), ErrorKind::ResourceExhausted),
            (Error::Request("r".into()), ErrorKind::InvalidArgument),
            (Error::Tokenizer("t".into()), ErrorKind::BadFile),
            (Error::Invalid("i".into()), ErrorKind::InvalidArgument),
            (
                Error::Rank {
                    rank: 1,
                    msg: "m".into(),
                },
                ErrorKind::Internal,
            ),
            (Error::Device("d".into()), ErrorKind::Device),
            (Error::Internal("x".into()), ErrorKind::Internal),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e}");
            let c = e.context("ctx");
            assert_eq!(c.kind(), kind);
        }
        let e = Error::KvExhausted("need 3 blocks".into()).context("request 2");
        assert_eq!(
            e.to_string(),
            "KV cache exhausted: request 2: need 3 blocks"
        );
        assert_eq!(ErrorKind::ResourceExhausted.name(), "resource_exhausted");
    }
}
