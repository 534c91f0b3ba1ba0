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
    /// A bad generation request: token id out of range, prompt too long, empty prompt, ...
    #[error("bad request: {0}")]
    Request(String),
    /// Malformed input file (JSONL requests, traces, profiles), with its line.
    #[error("{path}:{line}: {msg}")]
    Input {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A bad command-line argument combination.
    #[error("{0}")]
    Usage(String),
    /// A rank's worker thread failed or a collective was left by a peer.
    #[error("rank {rank}: {msg}")]
    Rank { rank: usize, msg: String },
    /// Device (CUDA) failures; never raised by the CPU backend.
    #[error("device: {0}")]
    Device(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
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
