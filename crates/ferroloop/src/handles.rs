//! `Handle` and `TimerHandle`: what `call_soon`, `call_later` and `add_reader` return.
//!
//! Ground rules:
//! - One Python allocation per `call_soon`; the handle is what sits in the ready queue.
//! - A handle runs its callback inside its `contextvars.Context` with the raw
//!   `PyContext_Enter`/`PyContext_Exit` pair (the same thing `Context.run` does, minus a method
//!   call). Entering a context that is already entered fails with CPython's `RuntimeError`.
//! - `cancel()` drops the callback and arguments at once (as asyncio does), so a cancelled timer
//!   does not keep its closure alive until its deadline. In debug mode the repr is kept first.
//! - Handles point at the loop's [`Shared`] block (atomics only), never at the Python loop, so
//!   they create no reference cycle with it.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use pyo3::{intern, PyTraverseError, PyVisit};

use crate::event_loop::Shared;
use crate::gil::GilCell;
use crate::stdlib::{is_exit_exception, support};

/// The context a handle runs in, as `call_soon` obtained it.
///
/// `call_soon` without `context=` must run the callback in a *copy* of the caller's context,
/// and every copy is a new object the garbage collector tracks. With 100k callbacks pending,
/// those copies are what makes every collection slow. A copy with no variables in it holds no
/// references, so it cannot be part of a cycle: such copies are untracked
/// (`untracked = true`) until they gain a variable or escape to Python code
/// (`Handle::retrack_context`). Contexts passed by the caller are never touched.
///
/// Invariant: an untracked context must be tracked again before its last reference goes
/// (CPython's `context_tp_dealloc` unlinks it from the GC list without checking), so every
/// path that lets go of a handle's context calls `retrack_context` first, and `Drop` does too.
/// Until a handle owns it, the `FreshContext` itself keeps that promise: dropped on an error
/// path (debug mode's stack capture failing, say), it tracks the context again first.
///
/// Better still, when the caller's context is known to be empty (see `context.rs`), no copy is
/// made at all: `ctx` is `None` and the handle runs in its loop's shared empty context.
pub(crate) struct FreshContext {
    ctx: Option<Py<PyAny>>,
    untracked: bool,
}

impl Drop for FreshContext {
    fn drop(&mut self) {
        if let (true, Some(ctx)) = (self.untracked, &self.ctx) {
            // SAFETY: a FreshContext only lives in code that holds the GIL; `ctx` is a live
            // Context, tracked only if it is not tracked, which PyObject_GC_Track requires.
            unsafe {
                if ffi::PyObject_GC_IsTracked(ctx.as_ptr()) == 0 {
                    ffi::PyObject_GC_Track(ctx.as_ptr().cast());
                }
            }
        }
    }
}

impl FreshContext {
    pub(crate) fn given(ctx: Py<PyAny>) -> FreshContext {
        FreshContext {
            ctx: Some(ctx),
            untracked: false,
        }
    }

    /// Hands the context to a handle, which from then on keeps the invariant above.
    fn into_parts(self) -> (Option<Py<PyAny>>, bool) {
        let mut this = std::mem::ManuallyDrop::new(self);
        (this.ctx.take(), this.untracked)
    }

    /// An empty caller context: the handle runs in its loop's shared empty context.
    pub(crate) fn empty() -> FreshContext {
        FreshContext {
            ctx: None,
            untracked: false,
        }
    }

    /// A copy of the caller's context, or none at all when that context is empty.
    #[inline]
    pub(crate) fn of_caller(py: Python<'_>) -> PyResult<FreshContext> {
        if crate::context::current_is_empty(py) == Some(true) {
            return Ok(FreshContext::empty());
        }
        FreshContext::copy_current(py)
    }

    pub(crate) fn copy_current(py: Python<'_>) -> PyResult<FreshContext> {
        // SAFETY: PyContext_CopyCurrent returns a new reference or NULL with an error set.
        let ctx = unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyContext_CopyCurrent()) }?;
        // SAFETY: `ctx` is a live, exact Context object we just created and nobody else has
        // seen; PyObject_Length on it cannot fail; untracking a tracked object is allowed.
        let untracked = unsafe {
            if crate::context::len(ctx.as_ptr()) == 0 {
                ffi::PyObject_GC_UnTrack(ctx.as_ptr().cast());
                true
            } else {
                false
            }
        };
        Ok(FreshContext {
            ctx: Some(ctx.unbind()),
            untracked,
        })
    }
}

pub(crate) struct Callback {
    pub func: Py<PyAny>,
    pub args: Args,
}

/// A callback's positional arguments. Zero and one argument (the C Task's steps and every
/// future done-callback) need no tuple: that saves an allocation the garbage collector counts.
pub(crate) enum Args {
    Empty,
    One(Py<PyAny>),
    Many(Py<PyTuple>),
}

impl Args {
    pub(crate) fn from_tuple(t: &Bound<'_, PyTuple>) -> Args {
        match t.len() {
            0 => Args::Empty,
            1 => Args::One(t.get_item(0).expect("len is 1").unbind()),
            _ => Args::Many(t.clone().unbind()),
        }
    }

    /// # Safety
    /// `items` must point to `n` valid, borrowed object pointers.
    #[inline(always)] // on call_soon's hot path
    pub(crate) unsafe fn from_raw(
        py: Python<'_>,
        items: *const *mut ffi::PyObject,
        n: usize,
    ) -> PyResult<Args> {
        // SAFETY: the caller guarantees `items[..n]` are live borrowed references.
        unsafe {
            Ok(match n {
                0 => Args::Empty,
                1 => Args::One(Bound::from_borrowed_ptr(py, *items).unbind()),
                _ => {
                    let slice = std::slice::from_raw_parts(items, n);
                    let objs = slice.iter().map(|&p| Bound::from_borrowed_ptr(py, p));
                    Args::Many(PyTuple::new(py, objs)?.unbind())
                }
            })
        }
    }

    /// Drops the arguments with a plain decref: dropping a `Py` asks PyO3 whether the GIL is
    /// held (a thread-local lookup), which `Handle::run` would pay once per callback.
    #[inline(always)]
    pub(crate) fn release(self, py: Python<'_>) {
        match self {
            Args::Empty => {}
            Args::One(o) => drop(o.into_bound(py)),
            Args::Many(t) => drop(t.into_bound(py)),
        }
    }

    pub(crate) fn clone_ref(&self, py: Python<'_>) -> Args {
        match self {
            Args::Empty => Args::Empty,
            Args::One(o) => Args::One(o.clone_ref(py)),
            Args::Many(t) => Args::Many(t.clone_ref(py)),
        }
    }

    /// The arguments as asyncio stores them (`Handle._args`).
    pub(crate) fn to_tuple(&self, py: Python<'_>) -> PyResult<Py<PyTuple>> {
        Ok(match self {
            Args::Empty => PyTuple::empty(py).unbind(),
            Args::One(o) => PyTuple::new(py, [o.bind(py)])?.unbind(),
            Args::Many(t) => t.clone_ref(py),
        })
    }

    /// Calls `func(*self)`; returns a new reference or NULL with an exception set.
    ///
    /// # Safety
    /// `func` must be a live object pointer and the GIL must be held.
    pub(crate) unsafe fn call(&self, func: *mut ffi::PyObject) -> *mut ffi::PyObject {
        // SAFETY: live pointers per the caller's contract and our own owned references.
        unsafe {
            match self {
                Args::Empty => ffi::PyObject_CallNoArgs(func),
                Args::One(o) => ffi::PyObject_CallOneArg(func, o.as_ptr()),
                Args::Many(t) => ffi::PyObject_Call(func, t.as_ptr(), std::ptr::null_mut()),
            }
        }
    }

    /// Calls `func(*self)` and drops the result.
    #[inline(always)]
    pub(crate) fn call_discard(&self, func: &Bound<'_, PyAny>) -> PyResult<()> {
        // SAFETY: `func` is live (borrowed for the call) and the GIL is held; `call` returns a
        // new reference or NULL with an exception set.
        unsafe { Bound::from_owned_ptr_or_err(func.py(), self.call(func.as_ptr())).map(drop) }
    }

    pub(crate) fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        match self {
            Args::Empty => Ok(()),
            Args::One(o) => visit.call(o),
            Args::Many(t) => visit.call(t),
        }
    }
}

#[pyclass(module = "ferroloop", subclass, frozen)]
pub struct Handle {
    pub(crate) callback: GilCell<Option<Callback>>,
    pub(crate) cancelled: AtomicBool,
    /// False for `add_reader`/`add_writer` handles, which run once per readiness event.
    pub(crate) one_shot: bool,
    /// `None` while the handle sits in its loop's recycling pool (see `recycle`), or while
    /// `ctx_empty` says it runs in the loop's shared empty context.
    pub(crate) context: GilCell<Option<Py<PyAny>>>,
    /// The handle's context is an empty copy that was never made: it runs in the loop's shared
    /// empty context (see `context.rs`), and makes its own when it needs one.
    ctx_empty: AtomicBool,
    pub(crate) shared: Arc<Shared>,
    /// The context is our own, still-empty copy and is hidden from the garbage collector
    /// (see [`FreshContext`]); it is tracked again as soon as it holds a value or escapes.
    ctx_untracked: AtomicBool,
    /// The repr captured at cancel time in debug mode (asyncio's `_repr`). A boxed `str`, not
    /// a `String`: 8 bytes less puts a handle in pymalloc's 128-byte class (every fd watcher,
    /// e.g. an idle connection's reader, holds one).
    repr_cache: GilCell<Option<Box<str>>>,
    source_traceback: Option<Py<PyAny>>,
    /// Not 0: the handle of a `Ready::Soon` entry, which holds the callback itself (see
    /// `SoonBook` in `event_loop`); the handle is not queued and never recycled.
    soon_ticket: AtomicU64,
}

impl Handle {
    pub(crate) fn new(
        func: Py<PyAny>,
        args: Args,
        context: FreshContext,
        shared: Arc<Shared>,
        source_traceback: Option<Py<PyAny>>,
    ) -> Handle {
        let (ctx, untracked) = context.into_parts();
        Handle {
            callback: GilCell::new(Some(Callback { func, args })),
            cancelled: AtomicBool::new(false),
            one_shot: true,
            ctx_untracked: AtomicBool::new(untracked),
            ctx_empty: AtomicBool::new(ctx.is_none()),
            context: GilCell::new(ctx),
            shared,
            repr_cache: GilCell::new(None),
            source_traceback,
            soon_ticket: AtomicU64::new(0),
        }
    }

    /// The handle returned for a `Ready::Soon` entry, which queues `func(*args)` itself: a
    /// copy of the callback (for `repr`, `_callback`, `_args` and `_run`), the shared empty
    /// context, no source traceback (never in debug mode); its ticket is set as the entry is
    /// queued. It stays visible to the garbage collector: it may hold its callback for as long
    /// as it lives.
    pub(crate) fn soon(func: Py<PyAny>, args: Args, shared: Arc<Shared>) -> Handle {
        Handle::new(func, args, FreshContext::empty(), shared, None)
    }

    /// Makes this `soon` handle the one of the entry `ticket`, queued right now.
    #[inline(always)]
    pub(crate) fn set_soon_ticket(&self, ticket: u64) {
        self.soon_ticket.store(ticket, Ordering::Relaxed);
    }

    /// The ticket of the `Ready::Soon` entry this handle stands for, or 0.
    #[inline(always)]
    pub(crate) fn soon_ticket(&self) -> u64 {
        self.soon_ticket.load(Ordering::Relaxed)
    }

    /// Makes a `soon` handle that nothing else references (its last caller dropped it) the
    /// handle of another entry (`set_soon_ticket` follows); returns what it held, to be
    /// dropped outside any borrow.
    #[inline(always)]
    pub(crate) fn refill_soon(
        &self,
        py: Python<'_>,
        func: Py<PyAny>,
        args: Args,
    ) -> PyResult<(Option<Callback>, Option<Py<PyAny>>)> {
        let old_cb = self
            .callback
            .borrow_mut(py)?
            .replace(Callback { func, args });
        // A context only if its last caller asked for one (`own_context` cleared the flag).
        let old_ctx = if self.ctx_empty.load(Ordering::Relaxed) {
            None
        } else {
            self.ctx_empty.store(true, Ordering::Relaxed);
            self.context.borrow_mut(py)?.take()
        };
        if self.cancelled.load(Ordering::Relaxed) {
            self.cancelled.store(false, Ordering::Relaxed);
            // (Set if debug mode was turned on meanwhile and the handle cancelled then.)
            *self.repr_cache.borrow_mut(py)? = None;
        }
        Ok((old_cb, old_ctx))
    }

    /// Gives up the callback of a `soon` handle whose entry ran: nothing can ask for it again
    /// but the handle's repr.
    pub(crate) fn take_callback(&self, py: Python<'_>) -> Option<Callback> {
        self.callback.borrow_mut(py).ok().and_then(|mut c| c.take())
    }

    #[inline]
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    pub(crate) fn cancel_impl(slf: &Bound<'_, PyAny>, this: &Handle) -> PyResult<()> {
        let py = slf.py();
        if this.cancelled.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        if this.shared.debug() {
            let r = slf.repr()?.to_string();
            *this.repr_cache.borrow_mut(py)? = Some(r.into_boxed_str());
        }
        let old = this.callback.borrow_mut(py)?.take();
        drop(old); // outside the borrow: may run arbitrary __del__ code
        let ticket = this.soon_ticket();
        if ticket != 0 {
            this.shared.mark_soon(py, ticket, |m| m.cancelled = true)?;
        }
        Ok(())
    }

    /// Can this handle, which has just run (or was skipped as cancelled), be reused for a later
    /// `call_soon`? Only a plain one-shot handle that nobody else references: then no Python
    /// code can ever observe the reuse (handles do not support weak references). Reuse spares
    /// an allocation and, more importantly, a tick of the garbage collector's allocation
    /// counter, which otherwise triggers collections while 100k callbacks are pending.
    pub(crate) fn recyclable(h: &Bound<'_, Handle>) -> bool {
        let this = h.get();
        this.one_shot
            && this.soon_ticket() == 0
            && this.source_traceback.is_none()
            // SAFETY: reading the reference count of a live object.
            && unsafe { ffi::Py_REFCNT(h.as_ptr()) } == 1
            // SAFETY: reading the type of a live object.
            && unsafe { ffi::Py_TYPE(h.as_ptr()) }
                == <Handle as pyo3::PyTypeInfo>::type_object_raw(h.py())
    }

    /// Empties a recyclable handle; returns what it held, to be dropped outside any borrow.
    pub(crate) fn empty_for_reuse(
        &self,
        py: Python<'_>,
    ) -> PyResult<(Option<Callback>, Option<Py<PyAny>>)> {
        let cb = self.callback.borrow_mut(py)?.take();
        self.retrack_context(py);
        let ctx = self.context.borrow_mut(py)?.take();
        self.ctx_empty.store(false, Ordering::Relaxed);
        Ok((cb, ctx))
    }

    /// Gives a handle that would run in the shared empty context one of its own, now.
    pub(crate) fn make_own_context(&self, py: Python<'_>) -> PyResult<()> {
        if self.ctx_empty.swap(false, Ordering::Relaxed) {
            *self.context.borrow_mut(py)? = Some(crate::event_loop::new_context(py)?);
        }
        Ok(())
    }

    /// The handle's context, for Python code that asks for it: a handle still running in the
    /// shared empty context (or due to) gets a context of its own now, and keeps it.
    fn own_context(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.retrack_context(py);
        let mut ctx = self.context.borrow_mut(py)?;
        if self.ctx_empty.swap(false, Ordering::Relaxed) && ctx.is_none() {
            // Not running: an empty context of its own, as the copy would have been.
            let own = crate::event_loop::new_context(py)?;
            let ticket = self.soon_ticket();
            if ticket != 0 {
                // The queued callback runs in it too.
                let c = own.clone_ref(py);
                self.shared.mark_soon(py, ticket, |m| m.context = Some(c))?;
            }
            *ctx = Some(own);
        }
        // Running in the shared one (`ctx` holds it for the run): from now on it is the
        // handle's own, which `run` sees when the callback returns.
        Ok(ctx.as_ref().map(|c| c.clone_ref(py)))
    }

    /// Gives a context we hid from the garbage collector back to it.
    #[inline]
    pub(crate) fn retrack_context(&self, py: Python<'_>) {
        if self.ctx_untracked.load(Ordering::Relaxed) {
            self.retrack_context_now(py);
        }
    }

    #[cold]
    fn retrack_context_now(&self, py: Python<'_>) {
        if self.ctx_untracked.swap(false, Ordering::Relaxed) {
            if let Ok(ctx) = self.context.borrow_mut(py) {
                if let Some(c) = ctx.as_ref() {
                    // SAFETY: `c` is a live Context (a GC type); tracking is only done when it
                    // is not tracked, which PyObject_GC_Track requires.
                    unsafe {
                        if ffi::PyObject_GC_IsTracked(c.as_ptr()) == 0 {
                            ffi::PyObject_GC_Track(c.as_ptr().cast());
                        }
                    }
                }
            }
        }
    }

    /// Refills a handle taken from the pool.
    #[inline(always)]
    pub(crate) fn refill(
        &self,
        py: Python<'_>,
        func: Py<PyAny>,
        args: Args,
        context: FreshContext,
    ) -> PyResult<()> {
        // A pooled handle holds nothing (see `empty_for_reuse`): the checks spare the calls to
        // the drop glue on this hot path.
        if let Some(old) = self
            .callback
            .borrow_mut(py)?
            .replace(Callback { func, args })
        {
            drop(old);
        }
        let (ctx, untracked) = context.into_parts();
        self.ctx_empty.store(ctx.is_none(), Ordering::Relaxed);
        if let Some(old) = std::mem::replace(&mut *self.context.borrow_mut(py)?, ctx) {
            drop(old);
        }
        self.ctx_untracked.store(untracked, Ordering::Relaxed);
        self.cancelled.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Drops the callback of a handle that will never run (its loop closed), so that a
    /// reference cycle through its arguments can be collected.
    pub(crate) fn forget_callback(&self, py: Python<'_>) {
        let old = self.callback.borrow_mut(py).ok().and_then(|mut c| c.take());
        drop(old);
    }

    /// Runs the callback in its context. Returns `Err` only for SystemExit/KeyboardInterrupt,
    /// which must leave `run_forever`; any other exception goes to the loop's exception handler.
    pub(crate) fn run(slf: &Bound<'_, Handle>, loop_obj: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let (func, args) = {
            let mut cb = this.callback.borrow_mut(py)?;
            // A one-shot handle (call_soon, timers) gives up its callback as it runs, outside
            // debug mode: handles are not tracked by the garbage collector (tracking them
            // doubles GC work when 100k tasks are pending), so they must never be the link
            // that closes a reference cycle once they are done. Watchers keep theirs.
            let take = this.one_shot && !this.shared.debug();
            if this.one_shot && !take {
                // Debug mode keeps the callback, and the handle may have been created (and
                // untracked) before debug mode was turned on.
                track(slf.as_any());
            }
            let c = if take {
                cb.take()
            } else {
                cb.as_ref().map(|c| Callback {
                    func: c.func.clone_ref(py),
                    args: c.args.clone_ref(py),
                })
            };
            match c {
                // A `Bound`: dropping it is a plain decref (see `run_native_reader`).
                Some(c) => (c.func.into_bound(py), c.args),
                None => return Ok(()),
            }
        };
        let result = this.call_in_context(py, || args.call_discard(&func));
        Self::finish(slf, func, args, result, loop_obj)
    }

    /// `run` for a watcher whose callback is a native `_read_ready` (see `run.rs`): the same
    /// steps, with the Rust body called directly instead of through the method's entry point.
    pub(crate) fn run_native_reader(
        slf: &Bound<'_, Handle>,
        reader: crate::transports::NativeReader,
        loop_obj: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        debug_assert!(!this.one_shot);
        // Borrowed views, not owned `Py` clones: dropping a `Py` asks PyO3 whether the GIL is
        // held (a thread-local lookup), which is a measurable part of this path.
        let (func, target) = match this.callback.borrow_mut(py)?.as_ref() {
            Some(c) => {
                let func = c.func.bind(py).clone();
                match reader.target(&func, &c.args) {
                    Some(t) => (func, t),
                    None => return Self::run(slf, loop_obj),
                }
            }
            None => return Ok(()),
        };
        let result = this.call_in_context(py, || reader.run(&target));
        if result.is_ok() {
            return Ok(());
        }
        let args = if reader.is_bound() {
            Args::Empty
        } else {
            Args::One(target.unbind())
        };
        Self::finish(slf, func, args, result, loop_obj)
    }

    /// Calls `body` inside the handle's context (`Ok` without calling it if the handle has
    /// none, which only a pooled handle lacks).
    #[inline(always)]
    fn call_in_context(&self, py: Python<'_>, body: impl FnOnce() -> PyResult<()>) -> PyResult<()> {
        // A `Bound`, not a `Py`: its drop is a plain decref (see `run_native_reader`).
        let context = self
            .context
            .borrow_mut(py)?
            .as_ref()
            .map(|c| c.bind(py).clone());
        let Some(context) = context else {
            if self.ctx_empty.load(Ordering::Relaxed) {
                return self.call_in_empty_context(py, body);
            }
            return Ok(());
        };
        // SAFETY: `context` is an owned reference kept alive for the whole block.
        let r = unsafe { crate::context::run_in(py, context.as_ptr(), body) };
        if self.ctx_untracked.load(Ordering::Relaxed)
            // SAFETY: a live Context, as above.
            && unsafe { crate::context::len(context.as_ptr()) } != 0
        {
            // The callback set a context variable: the context may now be part of a cycle, so
            // the collector must see it again.
            self.retrack_context(py);
        }
        r
    }

    /// `call_in_context` for a handle whose context is an empty copy never made: the callback
    /// runs in the loop's shared empty context (see `context.rs`), put in `context` for the run
    /// with `ctx_empty` still set, so that `own_context` can hand it out (and clear the flag)
    /// if Python code asks for it meanwhile. A handle run again from its own callback (by hand,
    /// in debug mode) finds that context there and fails to enter it again, as in asyncio.
    fn call_in_empty_context(
        &self,
        py: Python<'_>,
        body: impl FnOnce() -> PyResult<()>,
    ) -> PyResult<()> {
        let (context, shared) = self.shared.enter_empty_context(py)?;
        // Bound, not Py, for a plain decref (see `run_native_reader`).
        let context = context.into_bound(py);
        *self.context.borrow_mut(py)? = Some(context.clone().unbind());
        // SAFETY: `context` is an owned reference kept alive for the whole block.
        let result = unsafe { crate::context::run_in(py, context.as_ptr(), body) };
        // The handle keeps the context if the callback set a variable in it or Python code
        // asked for it; else it goes back to sharing.
        // SAFETY: `context` is a live, exact Context (made by PyContext_New).
        let set_var = unsafe { crate::context::len(context.as_ptr()) } != 0;
        let asked = !self.ctx_empty.load(Ordering::Relaxed);
        let keep = set_var || asked;
        if keep {
            self.ctx_empty.store(false, Ordering::Relaxed);
        } else {
            let ours = self.context.borrow_mut(py)?.take();
            drop(ours.map(|c| c.into_bound(py))); // the loop (or `context`) still holds it
        }
        self.shared.leave_empty_context(py, shared, keep)?;
        result
    }

    /// The end of `run`: SystemExit and KeyboardInterrupt propagate, any other exception goes
    /// to the loop's exception handler with this handle.
    #[inline(always)]
    fn finish(
        slf: &Bound<'_, Handle>,
        func: Bound<'_, PyAny>,
        args: Args,
        result: PyResult<()>,
        loop_obj: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        match result {
            Ok(()) => {
                args.release(slf.py());
                Ok(())
            }
            Err(err) => Self::finish_error(slf, func, args, err, loop_obj),
        }
    }

    #[cold]
    fn finish_error(
        slf: &Bound<'_, Handle>,
        func: Bound<'_, PyAny>,
        args: Args,
        err: PyErr,
        loop_obj: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        if is_exit_exception(py, &err) {
            return Err(err);
        }
        // Put a taken callback back so the handle in the error context still names it.
        {
            let mut cb = this.callback.borrow_mut(py)?;
            if cb.is_none() && !this.is_cancelled() {
                *cb = Some(Callback {
                    func: func.clone().unbind(),
                    args: args.clone_ref(py),
                });
                // The handle holds its callback again and whoever keeps it (the callback's own
                // object, an error context) may close a cycle through it: the collector must
                // see it, as it sees asyncio's handles.
                track(slf.as_any());
            }
        }
        let func = func.unbind();
        report_callback_error(slf.as_any(), &func, &args.to_tuple(py)?, err, loop_obj)
    }

    fn repr_info(slf: &Bound<'_, PyAny>, this: &Handle, when: Option<f64>) -> PyResult<String> {
        let py = slf.py();
        if let Some(r) = this.repr_cache.borrow_mut(py)?.as_ref() {
            return Ok(r.to_string());
        }
        let mut parts = vec![slf.get_type().name()?.to_string()];
        if this.is_cancelled() {
            parts.push("cancelled".into());
        }
        if let Some(w) = when {
            parts.push(format!("when={}", pyo3::types::PyFloat::new(py, w).repr()?));
        }
        let cb = this
            .callback
            .borrow_mut(py)?
            .as_ref()
            .map(|c| (c.func.clone_ref(py), c.args.clone_ref(py)));
        if let Some((func, args)) = cb {
            let args = args.to_tuple(py)?;
            let s = support(py)?.call_method1(
                intern!(py, "format_callback_source"),
                (func, args, this.shared.debug()),
            )?;
            parts.push(s.extract()?);
        }
        if let Some(tb) = &this.source_traceback {
            let s = support(py)?.call_method1(intern!(py, "format_created_at"), (tb.bind(py),))?;
            parts.push(s.extract()?);
        }
        Ok(format!("<{}>", parts.join(" ")))
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if *self.ctx_untracked.get_mut() {
            // tp_dealloc runs with the GIL held, so attaching is immediate.
            Python::attach(|py| self.retrack_context(py));
        }
    }
}

/// Stops the garbage collector from tracking a one-shot handle.
///
/// A one-shot handle is referenced by the loop until it runs and drops its callback as it runs
/// (see [`Handle::run`]), so it never closes a reference cycle that outlives it; tracking it
/// would only make every young-generation collection walk 100k pending handles.
pub(crate) fn untrack<T>(obj: &Py<T>) {
    // SAFETY: `obj` is a live object of a GC-enabled type (PyO3 sets Py_TPFLAGS_HAVE_GC on every
    // pyclass); untracking an object is always allowed, and its dealloc untracks idempotently.
    unsafe { ffi::PyObject_GC_UnTrack(obj.as_ptr().cast()) }
}

/// Hides a C Task step or wake-up callback from the garbage collector while it sits in the
/// ready queue (see `push_task_step`).
pub(crate) fn untrack_object(obj: &Bound<'_, PyAny>) {
    // SAFETY: `obj` is a live object of a GC type (the C Task's step wrapper or a builtin
    // method, both GC types whose dealloc untracks with the idempotent PyObject_GC_UnTrack).
    unsafe {
        if ffi::PyObject_IS_GC(obj.as_ptr()) != 0 {
            ffi::PyObject_GC_UnTrack(obj.as_ptr().cast());
        }
    }
}

/// Lets the garbage collector see a handle again that [`untrack`] hid from it: needed as soon as
/// the handle keeps its callback after running, since it may then close a reference cycle.
pub(crate) fn track(obj: &Bound<'_, PyAny>) {
    // SAFETY: `obj` is a live object of a GC-enabled type; PyObject_GC_Track is only called when
    // it is not tracked, which it requires.
    unsafe {
        if ffi::PyObject_GC_IsTracked(obj.as_ptr()) == 0 {
            ffi::PyObject_GC_Track(obj.as_ptr().cast());
        }
    }
}

/// asyncio's `Handle._run` error path: `{'message': 'Exception in callback ...', 'exception':
/// exc, 'handle': handle}` to `loop.call_exception_handler`.
pub(crate) fn report_callback_error(
    handle: &Bound<'_, PyAny>,
    func: &Py<PyAny>,
    args: &Py<PyTuple>,
    err: PyErr,
    loop_obj: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = handle.py();
    let h: &Bound<'_, Handle> = handle.cast()?;
    let source = support(py)?
        .call_method1(
            intern!(py, "format_callback_source"),
            (func, args, h.get().shared.debug()),
        )
        .and_then(|s| s.extract::<String>())
        .unwrap_or_else(|_| "<callback>".to_owned());
    let context = PyDict::new(py);
    context.set_item(
        intern!(py, "message"),
        format!("Exception in callback {source}"),
    )?;
    // into_value attaches the traceback to the exception, so handlers and the default
    // handler's log see where it was raised.
    context.set_item(intern!(py, "exception"), err.into_value(py))?;
    context.set_item(intern!(py, "handle"), handle)?;
    if let Some(tb) = &h.get().source_traceback {
        context.set_item(intern!(py, "source_traceback"), tb.bind(py))?;
    }
    match loop_obj.call_method1(intern!(py, "call_exception_handler"), (context,)) {
        Ok(_) => Ok(()),
        Err(e) if is_exit_exception(py, &e) => Err(e),
        Err(e) => {
            // call_exception_handler already swallows handler failures; reaching here means
            // something is badly wrong, so say it rather than lose it.
            e.write_unraisable(py, Some(loop_obj));
            Ok(())
        }
    }
}

#[pymethods]
impl Handle {
    fn cancel(slf: &Bound<'_, Self>) -> PyResult<()> {
        Handle::cancel_impl(slf.as_any(), slf.get())
    }

    fn cancelled(&self) -> bool {
        self.is_cancelled()
    }

    fn get_context(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.own_context(py)
    }

    fn _run(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let running = crate::stdlib::stdlib(py)?.get_running_loop(py)?;
        Handle::run(slf, &running)
    }

    #[getter]
    fn _callback(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(self
            .callback
            .borrow_mut(py)?
            .as_ref()
            .map(|c| c.func.clone_ref(py)))
    }

    #[getter]
    fn _args(&self, py: Python<'_>) -> PyResult<Option<Py<PyTuple>>> {
        let args = self
            .callback
            .borrow_mut(py)?
            .as_ref()
            .map(|c| c.args.clone_ref(py));
        args.map(|a| a.to_tuple(py)).transpose()
    }

    #[getter]
    fn _cancelled(&self) -> bool {
        self.is_cancelled()
    }

    #[getter]
    fn _context(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.own_context(py)
    }

    #[getter]
    fn _source_traceback(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.source_traceback.as_ref().map(|t| t.clone_ref(py))
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        Handle::repr_info(slf.as_any(), slf.get(), None)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(cb) = self.callback.try_borrow_for_gc() {
            if let Some(c) = cb.as_ref() {
                visit.call(&c.func)?;
                c.args.visit(&visit)?;
            }
        }
        if let Some(ctx) = self.context.try_borrow_for_gc() {
            if let Some(c) = ctx.as_ref() {
                visit.call(c)?;
            }
        }
        if let Some(tb) = &self.source_traceback {
            visit.call(tb)?;
        }
        Ok(())
    }
}

#[pyclass(module = "ferroloop", extends = Handle, frozen)]
pub struct TimerHandle {
    pub(crate) when: f64,
    pub(crate) scheduled: AtomicBool,
}

impl TimerHandle {
    pub(crate) fn new(when: f64) -> TimerHandle {
        TimerHandle {
            when,
            scheduled: AtomicBool::new(false),
        }
    }
}

#[pymethods]
impl TimerHandle {
    fn when(&self) -> f64 {
        self.when
    }

    #[getter]
    fn _when(&self) -> f64 {
        self.when
    }

    #[getter]
    fn _scheduled(&self) -> bool {
        self.scheduled.load(Ordering::Relaxed)
    }

    fn cancel(slf: &Bound<'_, Self>) -> PyResult<()> {
        let base = slf.as_super().get();
        if !base.is_cancelled() && slf.get().scheduled.load(Ordering::Relaxed) {
            base.shared.timer_cancelled();
        }
        Handle::cancel_impl(slf.as_any(), base)
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        Handle::repr_info(slf.as_any(), slf.as_super().get(), Some(slf.get().when))
    }

    fn __hash__(&self) -> u64 {
        self.when.to_bits()
    }

    fn __richcmp__(
        slf: &Bound<'_, Self>,
        other: &Bound<'_, PyAny>,
        op: pyo3::basic::CompareOp,
    ) -> PyResult<Py<PyAny>> {
        use pyo3::basic::CompareOp::*;
        let py = slf.py();
        let Ok(other) = other.cast::<TimerHandle>() else {
            return Ok(py.NotImplemented());
        };
        let (a, b) = (slf.get().when, other.get().when);
        let same = || -> PyResult<bool> {
            if slf.is(other) {
                return Ok(true);
            }
            let (x, y) = (slf.as_super().get(), other.as_super().get());
            Ok(a == b
                && x.is_cancelled() == y.is_cancelled()
                && slf
                    .as_super()
                    .getattr("_callback")?
                    .eq(other.as_super().getattr("_callback")?)?
                && slf
                    .as_super()
                    .getattr("_args")?
                    .eq(other.as_super().getattr("_args")?)?)
        };
        let r = match op {
            Lt => a < b,
            Gt => a > b,
            Le => a < b || same()?,
            Ge => a > b || same()?,
            Eq => same()?,
            Ne => !same()?,
        };
        Ok(pyo3::types::PyBool::new(py, r)
            .to_owned()
            .into_any()
            .unbind())
    }
}

/// `call_soon`'s argument check (asyncio's `_check_callback`).
#[inline]
pub(crate) fn check_callback(
    py: Python<'_>,
    callback: &Bound<'_, PyAny>,
    method: &str,
) -> PyResult<()> {
    // SAFETY: exact type checks on a live object pointer.
    let tp = unsafe { ffi::Py_TYPE(callback.as_ptr()) };
    // Plain Python functions (a `call_soon_threadsafe` from a thread, gather's done-callback)
    // are the common case: only their code's flags matter.
    if tp == std::ptr::addr_of_mut!(ffi::PyFunction_Type) {
        if function_is_coroutine(py, callback)? {
            return Err(coroutine_error(method));
        }
        return Ok(());
    }
    check_other_callback(py, callback, tp, method)
}

/// A function is a coroutine function by its code's flags, or by asyncio's marks in its
/// `__dict__`: `_is_coroutine` (`@asyncio.coroutine`, 3.9/3.10) or `_is_coroutine_marker`
/// (`inspect.markcoroutinefunction`, 3.12+), which asyncio's `iscoroutinefunction` reads.
fn function_is_coroutine(py: Python<'_>, func: &Bound<'_, PyAny>) -> PyResult<bool> {
    if code_is_coroutine(py, func)? {
        return Ok(true);
    }
    // SAFETY: `func` is a live function object (the callers check its type).
    if !unsafe { function_has_coroutine_mark(func.as_ptr()) } {
        return Ok(false);
    }
    let s = crate::stdlib::stdlib(py)?;
    s.iscoroutinefunction.bind(py).call1((func,))?.is_truthy()
}

/// Whether a function's `__dict__` holds one of asyncio's coroutine-function marks (only their
/// presence: asyncio's `iscoroutinefunction` then checks their values).
///
/// # Safety
/// `func` must be a live object of exactly `PyFunction_Type`, and the GIL held.
#[inline(always)]
unsafe fn function_has_coroutine_mark(func: *mut ffi::PyObject) -> bool {
    // SAFETY: the caller's contract; `func_dict` is NULL until the function gets an attribute.
    unsafe {
        let dict = (*func.cast::<ffi::PyFunctionObject>()).func_dict;
        if dict.is_null() || ffi::PyDict_Size(dict) == 0 {
            return false;
        }
        function_dict_has_mark(dict)
    }
}

/// # Safety
/// `dict` must be a live dict, and the GIL held.
#[cold]
unsafe fn function_dict_has_mark(dict: *mut ffi::PyObject) -> bool {
    // SAFETY: the caller holds the GIL (this function's contract).
    let py = unsafe { Python::assume_attached() };
    [
        intern!(py, "_is_coroutine"),
        intern!(py, "_is_coroutine_marker"),
    ]
    .iter()
    // SAFETY: a borrowed lookup in a live dict with str keys (no error can be raised).
    .any(|key| unsafe { !ffi::PyDict_GetItem(dict, key.as_ptr()).is_null() })
}

/// A callback that [`check_callback`] accepts without running Python code: a plain function
/// whose code the one-entry cache knows is not a coroutine's, or a C function.
#[inline(always)]
pub(crate) fn is_plain_callback(callback: *mut ffi::PyObject) -> bool {
    // SAFETY: type checks on a live object pointer; a function's code is a live borrowed
    // reference.
    unsafe {
        let tp = ffi::Py_TYPE(callback);
        if tp == std::ptr::addr_of_mut!(ffi::PyFunction_Type) {
            return ffi::PyFunction_GET_CODE(callback) == LAST_CODE_PTR.load(Ordering::Relaxed)
                && !LAST_CODE_IS_CORO.load(Ordering::Relaxed)
                && !function_has_coroutine_mark(callback);
        }
        tp == std::ptr::addr_of_mut!(ffi::PyCFunction_Type)
    }
}

#[cold]
fn coroutine_error(method: &str) -> PyErr {
    PyTypeError::new_err(format!("coroutines cannot be used with {method}()"))
}

fn check_other_callback(
    py: Python<'_>,
    callback: &Bound<'_, PyAny>,
    tp: *mut ffi::PyTypeObject,
    method: &str,
) -> PyResult<()> {
    // C methods (the C Task's step and wakeup, Future.set_result ...) are the other common case
    // and can be neither coroutines nor coroutine functions.
    // SAFETY: type checks on a live object pointer.
    let is_cfunc = tp == std::ptr::addr_of_mut!(ffi::PyCFunction_Type)
        || unsafe { ffi::PyCFunction_Check(callback.as_ptr()) } != 0;
    if is_cfunc {
        return Ok(());
    }
    let s = crate::stdlib::stdlib(py)?;
    if !callback.is_callable() {
        if s.iscoroutine.bind(py).call1((callback,))?.is_truthy()? {
            return Err(PyTypeError::new_err(format!(
                "coroutines cannot be used with {method}()"
            )));
        }
        return Err(PyTypeError::new_err(format!(
            "a callable object was expected by {method}(), got {}",
            callback.repr()?
        )));
    }
    if is_coroutine_function(py, callback)? {
        return Err(PyTypeError::new_err(format!(
            "coroutines cannot be used with {method}()"
        )));
    }
    Ok(())
}

const CO_COROUTINE: i64 = 0x0080;

/// One-entry cache of "is this code object a coroutine's": a `call_soon` chain, a timer storm
/// or a producer thread schedules the same function over and over. `LAST_CODE` holds a strong
/// reference, so the cached pointer can never be reused by another code object; the pointer
/// and its flag are copies of it that the hot path reads without a borrow (they are only
/// written with the GIL held, as every reader holds it).
static LAST_CODE: GilCell<Option<Py<PyAny>>> = GilCell::new(None);
static LAST_CODE_PTR: AtomicPtr<ffi::PyObject> = AtomicPtr::new(std::ptr::null_mut());
static LAST_CODE_IS_CORO: AtomicBool = AtomicBool::new(false);

#[inline]
fn code_is_coroutine(py: Python<'_>, func: &Bound<'_, PyAny>) -> PyResult<bool> {
    // SAFETY: `func` is a live function object (checked by the caller); its code object is a
    // borrowed reference, alive as long as `func` is.
    let code_ptr = unsafe { ffi::PyFunction_GET_CODE(func.as_ptr()) };
    if code_ptr == LAST_CODE_PTR.load(Ordering::Relaxed) {
        return Ok(LAST_CODE_IS_CORO.load(Ordering::Relaxed));
    }
    code_is_coroutine_uncached(py, code_ptr)
}

/// Behind `LAST_CODE`: the last few code objects seen (strong references, so no pointer is
/// reused) with their flag. A connection's set-up and teardown schedule a handful of different
/// callbacks in turn (connection_made, the start of reading, connection_lost, the task's
/// done-callbacks), which the one-entry cache alone misses every time.
static RECENT_CODES: GilCell<Vec<(Py<PyAny>, bool)>> = GilCell::new(Vec::new());
const RECENT_CODES_MAX: usize = 8;

#[cold]
fn code_is_coroutine_uncached(py: Python<'_>, code_ptr: *mut ffi::PyObject) -> PyResult<bool> {
    // SAFETY: `code_ptr` is a valid borrowed reference (see above); we take a new strong one.
    let code = unsafe { Bound::from_borrowed_ptr(py, code_ptr) };
    let known = RECENT_CODES
        .borrow_mut(py)?
        .iter()
        .find(|(c, _)| c.as_ptr() == code_ptr)
        .map(|&(_, is_coro)| is_coro);
    let is_coro = match known {
        Some(is_coro) => is_coro,
        None => {
            let flags: i64 = code.getattr(intern!(py, "co_flags"))?.extract()?;
            let is_coro = flags & CO_COROUTINE != 0;
            let evicted = {
                let mut recent = RECENT_CODES.borrow_mut(py)?;
                let evicted = if recent.len() >= RECENT_CODES_MAX {
                    Some(recent.remove(0))
                } else {
                    None
                };
                recent.push((code.clone().unbind(), is_coro));
                evicted
            };
            // A code object's last reference may go here: outside the borrow.
            drop(evicted);
            is_coro
        }
    };
    let old = LAST_CODE.borrow_mut(py)?.replace(code.unbind());
    LAST_CODE_PTR.store(code_ptr, Ordering::Relaxed);
    LAST_CODE_IS_CORO.store(is_coro, Ordering::Relaxed);
    drop(old);
    Ok(is_coro)
}

extern "C" {
    // CPython's public C API (not declared by pyo3-ffi): a bound method's function.
    fn PyMethod_Function(method: *mut ffi::PyObject) -> *mut ffi::PyObject;
}

fn is_coroutine_function(py: Python<'_>, callback: &Bound<'_, PyAny>) -> PyResult<bool> {
    // SAFETY: type check on a live object pointer.
    if unsafe { ffi::PyFunction_Check(callback.as_ptr()) } != 0 {
        return function_is_coroutine(py, callback);
    }
    let s = crate::stdlib::stdlib(py)?;
    let ty = callback.get_type();
    if ty.is(s.method_type.bind(py)) {
        // `callback.__func__`, read from the (exact) method object.
        // SAFETY: `callback` is exactly a bound method: PyMethod_Function returns its
        // function, a borrowed reference alive as long as `callback`.
        let func = unsafe { Bound::from_borrowed_ptr(py, PyMethod_Function(callback.as_ptr())) };
        // SAFETY: type check on a live object pointer.
        if unsafe { ffi::PyFunction_Check(func.as_ptr()) } != 0 {
            return function_is_coroutine(py, &func);
        }
        return s
            .iscoroutinefunction
            .bind(py)
            .call1((callback,))?
            .is_truthy();
    }
    // An instance without a __dict__ of a type that is not a function, method or partial
    // cannot carry asyncio's coroutine markers: that covers the C Task's step wrapper and
    // other C callables on the hot path.
    // SAFETY: reading a field of the live type object.
    let dictoffset = unsafe { (*ty.as_type_ptr()).tp_dictoffset };
    if dictoffset == 0 {
        return Ok(false);
    }
    // partials, callable objects, mocks: asyncio's own (slower, complete) check.
    s.iscoroutinefunction
        .bind(py)
        .call1((callback,))?
        .is_truthy()
}
