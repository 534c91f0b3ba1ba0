//! Opaque handles: never-reused tokens that name an object in one registry, so a freed, forged
//! or wrongly typed handle is an error code, not a crash.
//!
//! A handle given to C is a token (a multiple of 16, never 0 and never reused), not an address:
//! pat never dereferences it. Each object sits in an `Arc<Handle<T>>` behind its own mutex, so
//! calls on one handle from several threads run one at a time, and `_free` while another thread
//! is inside a call drops the object when that call returns. A panic while the mutex is held
//! poisons it, and every later call on the handle returns `PAT_ERR_POISONED`.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::status::{Fail, FfiResult};

/// One live object: what kind it is (for messages) and its state behind a mutex.
pub struct Handle<T> {
    pub what: &'static str,
    state: Mutex<T>,
}

type Entry = (&'static str, Arc<dyn Any + Send + Sync>);

static LIVE: Mutex<BTreeMap<usize, Entry>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicUsize = AtomicUsize::new(1);

fn live() -> std::sync::MutexGuard<'static, BTreeMap<usize, Entry>> {
    // Nothing panics while the registry is locked; recover the map if it ever did.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers `value` and returns its handle as a `*mut P` token.
pub fn register<T: Send + 'static, P>(what: &'static str, value: T) -> *mut P {
    let token = NEXT.fetch_add(1, Ordering::Relaxed) << 4;
    let h: Arc<Handle<T>> = Arc::new(Handle {
        what,
        state: Mutex::new(value),
    });
    live().insert(token, (what, h));
    std::ptr::without_provenance_mut(token)
}

/// The live object behind `p` (the export's parameter `param`, a `what` handle), or the error
/// that says why there is none.
pub fn lookup<T: Send + 'static, P>(
    p: *const P,
    param: &'static str,
    what: &'static str,
) -> FfiResult<Arc<Handle<T>>> {
    if p.is_null() {
        return Err(Fail::Null(param));
    }
    let token = p.addr();
    let entry = live().get(&token).cloned();
    match entry {
        None => Err(Fail::BadHandle(format!(
            "`{param}`: {what} handle {token:#x} is not live (already freed, or not made by pat)"
        ))),
        Some((kind, any)) => any.downcast::<Handle<T>>().map_err(|_| {
            Fail::BadHandle(format!(
                "`{param}`: handle {token:#x} is a {kind}, not a {what}"
            ))
        }),
    }
}

/// Runs `f` on the object behind `p` (the export's parameter `param`, a `what` handle), holding
/// its lock.
pub fn with<T: Send + 'static, P, R>(
    p: *const P,
    param: &'static str,
    what: &'static str,
    f: impl FnOnce(&mut T) -> FfiResult<R>,
) -> FfiResult<R> {
    let h = lookup::<T, P>(p, param, what)?;
    let mut state = h.state.lock().map_err(|_| Fail::Poisoned(h.what))?;
    f(&mut state)
}

/// Forgets the handle `p` of type `T` (its object is dropped once no call uses it). NULL, a
/// handle already freed and a handle of another type are left alone.
pub fn release<T: Send + 'static, P>(p: *mut P) {
    if p.is_null() {
        return;
    }
    let token = p.addr();
    let mut map = live();
    let removed = if map
        .get(&token)
        .is_some_and(|(_, any)| any.clone().downcast::<Handle<T>>().is_ok())
    {
        map.remove(&token)
    } else {
        None
    };
    // The object may take a while to drop (an engine joins nothing, but frees its pools): not
    // under the registry lock.
    drop(map);
    drop(removed);
}
