//! Is the calling thread's current `contextvars.Context` empty? Answered without copying it.
//!
//! `call_soon` and friends without `context=` must run the callback in a copy of the caller's
//! context. A copy is a new object that the garbage collector counts and tracks, made and freed
//! once per callback: about 300 instructions of a `call_soon_threadsafe` that costs about
//! 1,000 in all. When the caller's context holds no variable (a plain thread, or asyncio code
//! that never sets one), every copy is an empty context, and all empty contexts are alike
//! until a callback sets a variable in one. Handles then share one empty context per loop
//! instead (see `Handle::run`), and make their own only when a callback sets a variable in it
//! or when Python code asks for it (`get_context()`).
//!
//! CPython has no API that returns the current context without copying it: it is the
//! `context` field of the thread state (`PyThreadState.context`, present since 3.7 and read by
//! `PyContext_CopyCurrent`). Its position differs between versions, so it is found once at
//! run time: a fresh context is entered with `PyContext_Enter` and the thread state is scanned,
//! pointer by pointer from its start, for the first slot that holds it; the scan stops there,
//! so it never reads past that field. The slot is then checked with a second context, and
//! again after each exit. Anything unexpected disables the shortcut for good: callers then copy
//! the context as before.

use std::sync::atomic::{AtomicUsize, Ordering};

use pyo3::ffi;
use pyo3::prelude::*;

/// `UNPROBED`, `UNAVAILABLE`, or the pointer slot of `PyThreadState.context` plus one.
static SLOT: AtomicUsize = AtomicUsize::new(UNPROBED);
const UNPROBED: usize = 0;
const UNAVAILABLE: usize = usize::MAX;
/// The field sits in slot 26..30 on CPython 3.9 to 3.13; the scan gives up past this.
const MAX_SLOT: usize = 48;

/// `Some(true)` if the current context holds no variable (or the thread has none yet: then
/// `copy_context()` would make an empty one), `Some(false)` if it holds some, `None` if this
/// cannot be told without copying it.
#[inline]
pub(crate) fn current_is_empty(py: Python<'_>) -> Option<bool> {
    let slot = match SLOT.load(Ordering::Relaxed) {
        UNAVAILABLE => return None,
        UNPROBED => probe(py)?,
        s => s - 1,
    };
    // SAFETY: the GIL is held, so the thread has a thread state; `slot` was found (and checked)
    // to be the `context` field of the thread state, which holds NULL or a live Context that
    // the thread state owns a reference to while we read it.
    unsafe {
        let ts = ffi::PyThreadState_Get() as *const *mut ffi::PyObject;
        let ctx = *ts.add(slot);
        Some(ctx.is_null() || len(ctx) == 0)
    }
}

/// The number of variables set in `ctx`: its type's `mp_length` slot (CPython's
/// `context_tp_len`) called directly, without `PyObject_Length`'s generic dispatch (about 25
/// instructions, on every callback that runs in the shared empty context).
///
/// # Safety
/// `ctx` must be a live, exact `contextvars.Context` (one made by `PyContext_New` or
/// `PyContext_CopyCurrent`, one `PyContext_Enter` accepted, or the thread's current one: Enter
/// only takes exact Contexts), and the GIL held.
#[inline(always)]
pub(crate) unsafe fn len(ctx: *mut ffi::PyObject) -> ffi::Py_ssize_t {
    // SAFETY: per the caller's contract `ctx` is a live object, so its type object is readable;
    // a Context's length cannot fail.
    unsafe {
        let tp = ffi::Py_TYPE(ctx);
        debug_assert!(tp == std::ptr::addr_of_mut!(ffi::PyContext_Type));
        match (*tp).tp_as_mapping.as_ref().and_then(|m| m.mp_length) {
            Some(mp_length) => mp_length(ctx),
            None => ffi::PyObject_Length(ctx),
        }
    }
}

/// Finds the slot (see the module comment). Runs once, with the GIL held.
#[cold]
fn probe(py: Python<'_>) -> Option<usize> {
    let found = find_slot(py);
    SLOT.store(found.map_or(UNAVAILABLE, |s| s + 1), Ordering::Relaxed);
    found
}

fn find_slot(py: Python<'_>) -> Option<usize> {
    // SAFETY: the GIL is held. The contexts are new objects we own; each is entered and exited
    // once, in order, on this thread. The scan reads the thread state pointer by pointer from
    // its start and stops at the first slot equal to the context just entered, which the
    // `context` field is: every slot read lies at or before that field, inside the structure.
    // No slot could match up to MAX_SLOT only in a thread state whose `context` field lies
    // further on: one larger than MAX_SLOT pointers, so those reads are inside it too.
    unsafe {
        let ts = ffi::PyThreadState_Get() as *const *mut ffi::PyObject;
        let a = Bound::from_owned_ptr_or_err(py, ffi::PyContext_New()).ok()?;
        let b = Bound::from_owned_ptr_or_err(py, ffi::PyContext_New()).ok()?;
        let current = |slot: usize| *ts.add(slot);
        if ffi::PyContext_Enter(a.as_ptr()) != 0 {
            ffi::PyErr_Clear();
            return None;
        }
        let slot = (0..MAX_SLOT).find(|&i| current(i) == a.as_ptr());
        let ok_a = ffi::PyContext_Exit(a.as_ptr()) == 0;
        let slot = slot.filter(|_| ok_a)?;
        if current(slot) == a.as_ptr() || ffi::PyContext_Enter(b.as_ptr()) != 0 {
            ffi::PyErr_Clear();
            return None;
        }
        let ok_b = current(slot) == b.as_ptr();
        if ffi::PyContext_Exit(b.as_ptr()) != 0 {
            ffi::PyErr_Clear();
            return None;
        }
        (ok_b && current(slot) != b.as_ptr()).then_some(slot)
    }
}

/// Runs `body` with `ctx` entered as the thread's current context, as `Context.run` does
/// without the method call: an error if `ctx` cannot be entered (not a Context, or already
/// entered), else `body`'s result, or the error of leaving the context if `body` succeeded.
///
/// # Safety
/// `ctx` is a live object that stays alive until this returns; the GIL is held.
#[inline(always)]
pub(crate) unsafe fn run_in(
    py: Python<'_>,
    ctx: *mut ffi::PyObject,
    body: impl FnOnce() -> PyResult<()>,
) -> PyResult<()> {
    // SAFETY: `ctx` is live (the caller's contract). PyContext_Enter type-checks its argument
    // and fails with an exception (never UB); Exit is only called after Enter succeeded.
    unsafe {
        if ffi::PyContext_Enter(ctx) != 0 {
            return Err(PyErr::fetch(py));
        }
        let r = body();
        if ffi::PyContext_Exit(ctx) != 0 && r.is_ok() {
            Err(PyErr::fetch(py))
        } else {
            r
        }
    }
}
