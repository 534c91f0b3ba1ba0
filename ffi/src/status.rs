//! Status codes, the thread-local last-error message, and the guard every export runs in.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use pat::{Error, ErrorKind};

/// What every fallible function returns: 0 is success, a positive value means nothing changed and
/// the call may be retried (after stepping, freeing, or with a bigger buffer), a negative value is
/// an error. Each code's state after the call is documented with the code.
pub type pat_status = i32;

/// Success: every output was written.
pub const PAT_OK: pat_status = 0;
/// Out of KV blocks or memory (`ErrorKind::ResourceExhausted`). Nothing changed: finish or free
/// sequences, or give the engine more memory, then retry.
pub const PAT_RESOURCE_EXHAUSTED: pat_status = 1;
/// A caller buffer is too short. Nothing was written but the needed count (`*n`); retry with at
/// least that many entries.
pub const PAT_BUFFER_TOO_SMALL: pat_status = 2;
/// `pat_engine_take_output`: no finished request is waiting. Step the engine and retry.
pub const PAT_NO_OUTPUT: pat_status = 3;
/// A bad argument, request or layout (`ErrorKind::InvalidArgument`), including a bad enum value,
/// `struct_size` or count. Nothing changed.
pub const PAT_ERR_INVALID_ARGUMENT: pat_status = -1;
/// The model uses a feature pat does not implement (`ErrorKind::Unsupported`).
pub const PAT_ERR_UNSUPPORTED: pat_status = -2;
/// A file's content is malformed: config, checkpoint, tokenizer, profile (`ErrorKind::BadFile`).
pub const PAT_ERR_BAD_FILE: pat_status = -3;
/// A device (CUDA driver, cuBLAS, NCCL) failed (`ErrorKind::Device`).
pub const PAT_ERR_DEVICE: pat_status = -4;
/// The operating system refused a read or write (`ErrorKind::Io`).
pub const PAT_ERR_IO: pat_status = -5;
/// A rank thread died or an invariant broke inside pat (`ErrorKind::Internal`): a bug in pat.
pub const PAT_ERR_INTERNAL: pat_status = -6;
/// A required pointer argument was NULL. Nothing changed.
pub const PAT_ERR_NULL: pat_status = -20;
/// The handle is not a live handle of the expected type: already freed, never made by pat, or
/// of another type. Nothing changed. (Handles are never reused, so a freed one is always caught.)
pub const PAT_ERR_BAD_HANDLE: pat_status = -21;
/// An earlier call on this handle panicked: only its `_free` is allowed now.
pub const PAT_ERR_POISONED: pat_status = -22;
/// A panic inside pat was caught at the boundary (a bug in pat). The handle the call was working
/// on is poisoned.
pub const PAT_ERR_PANIC: pat_status = -23;

/// Every status code with its name, for `pat_status_name`.
pub(crate) const NAMES: [(pat_status, &str); 14] = [
    (PAT_OK, "PAT_OK\0"),
    (PAT_RESOURCE_EXHAUSTED, "PAT_RESOURCE_EXHAUSTED\0"),
    (PAT_BUFFER_TOO_SMALL, "PAT_BUFFER_TOO_SMALL\0"),
    (PAT_NO_OUTPUT, "PAT_NO_OUTPUT\0"),
    (PAT_ERR_INVALID_ARGUMENT, "PAT_ERR_INVALID_ARGUMENT\0"),
    (PAT_ERR_UNSUPPORTED, "PAT_ERR_UNSUPPORTED\0"),
    (PAT_ERR_BAD_FILE, "PAT_ERR_BAD_FILE\0"),
    (PAT_ERR_DEVICE, "PAT_ERR_DEVICE\0"),
    (PAT_ERR_IO, "PAT_ERR_IO\0"),
    (PAT_ERR_INTERNAL, "PAT_ERR_INTERNAL\0"),
    (PAT_ERR_NULL, "PAT_ERR_NULL\0"),
    (PAT_ERR_BAD_HANDLE, "PAT_ERR_BAD_HANDLE\0"),
    (PAT_ERR_POISONED, "PAT_ERR_POISONED\0"),
    (PAT_ERR_PANIC, "PAT_ERR_PANIC\0"),
];

/// The one status code of each error kind. Exhaustive: a new kind must be given a code here.
pub fn kind_status(kind: ErrorKind) -> pat_status {
    match kind {
        ErrorKind::InvalidArgument => PAT_ERR_INVALID_ARGUMENT,
        ErrorKind::Unsupported => PAT_ERR_UNSUPPORTED,
        ErrorKind::BadFile => PAT_ERR_BAD_FILE,
        ErrorKind::ResourceExhausted => PAT_RESOURCE_EXHAUSTED,
        ErrorKind::Device => PAT_ERR_DEVICE,
        ErrorKind::Io => PAT_ERR_IO,
        ErrorKind::Internal => PAT_ERR_INTERNAL,
    }
}

/// A failed export: a library error, or one of the boundary's own conditions.
#[derive(Debug)]
pub enum Fail {
    Pat(Error),
    /// The named pointer argument was NULL.
    Null(&'static str),
    BadHandle(String),
    Poisoned(&'static str),
    /// `what` needs `needed` entries.
    TooSmall {
        what: &'static str,
        needed: usize,
        cap: usize,
    },
    NoOutput,
    Invalid(String),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Pat(e)
    }
}

impl Fail {
    pub fn status(&self) -> pat_status {
        match self {
            Fail::Pat(e) => kind_status(e.kind()),
            Fail::Null(_) => PAT_ERR_NULL,
            Fail::BadHandle(_) => PAT_ERR_BAD_HANDLE,
            Fail::Poisoned(_) => PAT_ERR_POISONED,
            Fail::TooSmall { .. } => PAT_BUFFER_TOO_SMALL,
            Fail::NoOutput => PAT_NO_OUTPUT,
            Fail::Invalid(_) => PAT_ERR_INVALID_ARGUMENT,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Fail::Pat(e) => e.to_string(),
            Fail::Null(what) => format!("`{what}` is NULL"),
            Fail::BadHandle(m) => m.clone(),
            Fail::Poisoned(what) => format!(
                "this {what} is poisoned by an earlier panic inside pat: only its _free is allowed"
            ),
            Fail::TooSmall { what, needed, cap } => {
                format!("{what}: the buffer holds {cap} entries, {needed} are needed")
            }
            Fail::NoOutput => "no finished request is waiting to be taken".into(),
            Fail::Invalid(m) => m.clone(),
        }
    }
}

pub type FfiResult<T = ()> = std::result::Result<T, Fail>;

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_last_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(c));
}

fn clear_last_error() {
    LAST_ERROR.with(|e| *e.borrow_mut() = None);
}

/// Copies this thread's last message into `buf` (see `pat_last_error_message`); returns its length.
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
pub(crate) unsafe fn copy_last_error(buf: *mut c_char, len: usize) -> usize {
    LAST_ERROR.with(|e| {
        let e = e.borrow();
        let bytes = e.as_ref().map(|c| c.as_bytes()).unwrap_or(&[]);
        if !buf.is_null() && len > 0 {
            let n = bytes.len().min(len - 1);
            // SAFETY: `buf` has room for `len` bytes (this function's contract); we write
            // n + 1 <= len bytes, and the source is our own CString.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
        }
        bytes.len()
    })
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".into()
    }
}

/// Runs an export's body: a success clears the last error; a failure stores its message and
/// returns its code; a panic is caught (never crosses into C), stored as "panic: ..." and
/// returned as `PAT_ERR_PANIC` (the handle whose lock the body held is poisoned by the unwind).
pub fn guard(f: impl FnOnce() -> FfiResult) -> pat_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            clear_last_error();
            PAT_OK
        }
        Ok(Err(fail)) => {
            set_last_error(fail.message());
            fail.status()
        }
        Err(p) => {
            set_last_error(format!("panic: {}", panic_message(p.as_ref())));
            PAT_ERR_PANIC
        }
    }
}

/// `guard` for the `_free` functions and other calls that return nothing: a panic is swallowed
/// (stored as the last error) instead of crossing into C. They return no status, so they leave
/// the last error as it was (a caller cleaning up before reading the message still finds it).
pub fn guard_void(f: impl FnOnce()) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(f)) {
        set_last_error(format!("panic: {}", panic_message(p.as_ref())));
    }
}

/// `guard` for calls that return a value rather than a status (`fallback` on panic).
pub fn guard_value<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_distinct_code() {
        let kinds = [
            ErrorKind::InvalidArgument,
            ErrorKind::Unsupported,
            ErrorKind::BadFile,
            ErrorKind::ResourceExhausted,
            ErrorKind::Device,
            ErrorKind::Io,
            ErrorKind::Internal,
        ];
        let mut codes: Vec<pat_status> = kinds.iter().map(|&k| kind_status(k)).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), kinds.len());
        for c in codes {
            assert!(NAMES.iter().any(|(s, _)| *s == c));
        }
    }
}
