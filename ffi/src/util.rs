//! The checks every export makes on what C hands it: NULL pointers, (pointer, count) arrays,
//! strings, caller buffers with size negotiation, and versioned params structs.

use std::ffi::{c_char, CStr};

use crate::status::{Fail, FfiResult};

/// The array `(p, n)` as a slice; `p` may be NULL when `n` is 0.
///
/// # Safety
/// When `n > 0`, `p` points to `n` initialized `T` that stay valid and unchanged during the call.
pub unsafe fn slice<'a, T>(p: *const T, n: usize, what: &'static str) -> FfiResult<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Fail::Null(what));
    }
    if n.checked_mul(size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Fail::Invalid(format!("`{what}`: {n} entries is too many")));
    }
    // SAFETY: non-NULL, and the caller guarantees n valid entries (this function's contract);
    // the byte size fits isize.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid during the call.
pub unsafe fn c_str<'a>(p: *const c_char, what: &'static str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(Fail::Null(what));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| Fail::Invalid(format!("`{what}` is not UTF-8")))
}

/// An output pointer of an export, checked for NULL before any work (so a call with a missing
/// output changes nothing), written once the work succeeded.
pub struct Out<T>(*mut T);

impl<T> Out<T> {
    /// A required output: NULL fails with `PAT_ERR_NULL` naming `what`.
    ///
    /// # Safety
    /// `p` is NULL or valid for writing a `T` (aligned) until the export returns.
    pub unsafe fn new(p: *mut T, what: &'static str) -> FfiResult<Self> {
        if p.is_null() {
            Err(Fail::Null(what))
        } else {
            Ok(Out(p))
        }
    }

    /// An optional output: NULL means the caller does not want it.
    ///
    /// # Safety
    /// As [`Out::new`].
    pub unsafe fn optional(p: *mut T) -> Self {
        Out(p)
    }

    /// Writes `v` (nothing for an optional output left NULL).
    pub fn put(&self, v: T) {
        if !self.0.is_null() {
            // SAFETY: non-NULL, and valid for a write until the export returns (the contract
            // `new` / `optional` were called under).
            unsafe { self.0.write(v) }
        }
    }
}

/// Copies `items` into the caller's buffer `(buf, cap)` and writes the count to `n`. When `cap`
/// is too small only `*n` (the count needed) is written and the call returns
/// `PAT_BUFFER_TOO_SMALL`; `buf` may be NULL with `cap` 0 to ask for the count.
///
/// # Safety
/// `buf` is NULL or points to `cap` writable `T`.
pub unsafe fn copy_out<T: Copy>(
    items: &[T],
    buf: *mut T,
    cap: usize,
    n: &Out<usize>,
    what: &'static str,
) -> FfiResult {
    if items.len() > cap {
        n.put(items.len());
        return Err(Fail::TooSmall {
            what,
            needed: items.len(),
            cap,
        });
    }
    if !items.is_empty() {
        if buf.is_null() {
            return Err(Fail::Null(what));
        }
        // SAFETY: `buf` holds `cap >= items.len()` entries (contract); `items` is our own memory,
        // so the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), buf, items.len()) };
    }
    n.put(items.len());
    Ok(())
}

/// A params struct: `struct_size` first (a `uint32_t`), defaults from `pat_*_default_params()`.
pub trait Params: Copy {
    /// The defaults `pat_*_default_params()` returns.
    fn defaults() -> Self;
    /// The size of the first version of the struct: callers built against an older header pass
    /// at least this many bytes.
    const MIN_SIZE: usize;
}

/// Reads a params struct: NULL gives the defaults; otherwise `struct_size` bytes are taken over
/// the defaults (a caller built against an older header passes fewer fields, a newer one more:
/// fields this library does not know are ignored).
///
/// # Safety
/// `p` is NULL or points to at least `struct_size` readable bytes starting with a `uint32_t`
/// `struct_size`.
pub unsafe fn read_params<T: Params>(p: *const T, what: &'static str) -> FfiResult<T> {
    let mut out = T::defaults();
    if p.is_null() {
        return Ok(out);
    }
    // SAFETY: non-NULL; every params struct starts with a u32 struct_size (contract).
    let size = unsafe { p.cast::<u32>().read_unaligned() } as usize;
    if size < T::MIN_SIZE {
        return Err(Fail::Invalid(format!(
            "`{what}.struct_size` is {size}, expected at least {} (set it with the \
             *_default_params() function, or to sizeof the struct)",
            T::MIN_SIZE
        )));
    }
    let n = size.min(size_of::<T>());
    // SAFETY: the caller's struct has `size >= n` readable bytes; `out` is a local `T` of
    // size_of::<T>() >= n bytes; every field of a params struct is an integer, float or pointer,
    // so any bytes are a valid value.
    unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), (&mut out as *mut T).cast::<u8>(), n) };
    Ok(out)
}

/// A u32 from a usize (counts the library produces; they fit in practice).
pub fn u32_of(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}
