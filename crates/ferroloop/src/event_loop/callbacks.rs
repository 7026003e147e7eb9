//! Scheduling: `call_soon`, `call_soon_threadsafe`, `call_later`, `call_at`, and the factories
//! for futures and tasks. These are the hottest entry points: the C Task calls
//! `loop.call_soon(step, context=ctx)` for every step and wake-up.

use std::sync::atomic::{AtomicU8, Ordering};

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use pyo3::{ffi, intern};

use super::{current_thread_id, LoopCore};
use crate::handles::{check_callback, untrack, Args, FreshContext, Handle, TimerHandle};
use crate::stdlib::{call_kw, stdlib, support, Stdlib};

/// asyncio's `_check_thread`: a non-thread-safe call from a thread other than the running loop's.
pub(crate) fn check_thread(loop_thread: Option<u64>) -> PyResult<()> {
    match loop_thread {
        Some(tid) if tid != current_thread_id() => Err(PyRuntimeError::new_err(
            "Non-thread-safe operation invoked on an event loop other than the current one",
        )),
        _ => Ok(()),
    }
}

impl LoopCore {
    /// Checks shared by every scheduling method: closed loop first, then (debug only) the
    /// calling thread, as asyncio orders them.
    #[inline]
    fn check_schedule(&self, py: Python<'_>, thread_sensitive: bool) -> PyResult<()> {
        let st = self.state.borrow_mut(py)?;
        if st.closed {
            return Err(crate::errors::closed_loop());
        }
        if thread_sensitive && self.shared.debug() {
            check_thread(st.thread_id)?;
        }
        Ok(())
    }

    #[inline(always)]
    fn context_or_current(
        py: Python<'_>,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<FreshContext> {
        match context {
            Some(c) if !c.is_none() => Ok(FreshContext::given(c.clone().unbind())),
            _ => FreshContext::of_caller(py),
        }
    }

    #[inline(always)]
    fn source_traceback(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        if self.shared.debug() {
            Ok(Some(
                support(py)?
                    .call_method0(intern!(py, "extract_stack"))?
                    .unbind(),
            ))
        } else {
            Ok(None)
        }
    }

    pub(crate) fn new_handle(
        &self,
        py: Python<'_>,
        callback: &Bound<'_, PyAny>,
        args: Args,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Handle> {
        Ok(Handle::new(
            callback.clone().unbind(),
            args,
            Self::context_or_current(py, context)?,
            self.shared.clone(),
            self.source_traceback(py)?,
        ))
    }

    #[inline]
    pub(crate) fn push_ready(&self, py: Python<'_>, h: Py<Handle>) -> PyResult<()> {
        self.state
            .borrow_mut(py)?
            .ready
            .push_back(super::Ready::Handle(h));
        Ok(())
    }

    /// `call_soon(callback, *args)` for a native transport path that drops the handle: outside
    /// debug mode, from an empty context, on an open loop, the callback is queued without a
    /// handle (`Ready::Internal`): nobody could see one. Returns false, having done nothing,
    /// when any of that does not hold (the caller then calls `call_soon_impl`, which makes
    /// asyncio's checks in asyncio's order).
    pub(crate) fn push_internal(
        &self,
        py: Python<'_>,
        callback: &Bound<'_, PyAny>,
        args: impl FnOnce() -> PyResult<Args>,
    ) -> PyResult<bool> {
        if self.shared.debug() || crate::context::current_is_empty(py) != Some(true) {
            return Ok(false);
        }
        if self.state.borrow_mut(py)?.closed {
            return Ok(false);
        }
        check_callback(py, callback, "call_soon")?;
        let args = args()?;
        let mut st = self.state.borrow_mut(py)?;
        if st.closed {
            // Closed by code the check ran: the general path raises.
            return Ok(false);
        }
        st.ready.push_back(super::Ready::Internal {
            func: callback.clone().unbind(),
            args,
        });
        Ok(true)
    }

    /// `call_soon` of a C Task step or wake-up (see `fastcall.rs`): queued without a Handle.
    ///
    /// The step wrapper (or wake-up method) is made by the C Task for this one call and
    /// referenced by nothing but the ready queue: like a one-shot handle, it is hidden from the
    /// garbage collector while it waits. With 100k tasks pending, these objects otherwise
    /// survive into the oldest generation on every round and trigger full collections.
    /// Only while the loop runs: `run_task_step` shows it to the collector again if anything
    /// still holds it after it ran, and `run_forever` does for the ones still queued when it
    /// returns, so a loop dropped unclosed with a queued step stays collectable.
    pub(crate) fn push_task_step(
        &self,
        py: Python<'_>,
        callback: &Bound<'_, PyAny>,
        args: Args,
        context: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let mut st = self.state.borrow_mut(py)?;
        if st.closed {
            return Err(crate::errors::closed_loop());
        }
        // (debug mode never comes here: its steps get a Handle)
        if st.thread_id.is_some() {
            crate::handles::untrack_object(callback);
        }
        st.ready.push_back(super::Ready::TaskStep {
            func: callback.clone().unbind(),
            args,
            context: context.clone().unbind(),
        });
        Ok(())
    }
}

impl LoopCore {
    pub(crate) fn call_soon_impl(
        &self,
        py: Python<'_>,
        callback: &Bound<'_, PyAny>,
        args: Args,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<Handle>> {
        self.schedule_soon(py, callback, args, context, "call_soon", true)
    }

    /// `call_soon` and `call_soon_threadsafe`: a handle at the end of the ready queue, a
    /// recycled one when the pool has one (never in debug mode).
    #[inline(always)]
    fn schedule_soon(
        &self,
        py: Python<'_>,
        callback: &Bound<'_, PyAny>,
        args: Args,
        context: Option<&Bound<'_, PyAny>>,
        method: &str,
        thread_sensitive: bool,
    ) -> PyResult<Py<Handle>> {
        self.check_schedule(py, thread_sensitive)?;
        check_callback(py, callback, method)?;
        // Before the borrow below: a copy of the context may run the garbage collector.
        let ctx = Self::context_or_current(py, context)?;
        let debug = self.shared.debug();
        if !debug {
            let mut st = self.state.borrow_mut(py)?;
            if let Some(h) = st.pool.pop() {
                // Refilling a pooled handle replaces nothing (it is empty): no Python code
                // runs under the borrow.
                h.get().refill(py, callback.clone().unbind(), args, ctx)?;
                untrack(&h);
                st.ready.push_back(super::Ready::Handle(h.clone_ref(py)));
                return Ok(h);
            }
        }
        let h = Py::new(
            py,
            Handle::new(
                callback.clone().unbind(),
                args,
                ctx,
                self.shared.clone(),
                self.source_traceback(py)?,
            ),
        )?;
        if !debug {
            untrack(&h);
        }
        self.push_ready(py, h.clone_ref(py))?;
        Ok(h)
    }

    /// The common case of `call_soon(callback[, arg])` and `call_soon_threadsafe(...)` that
    /// `schedule_soon_plain` and `schedule_soon_detached` take: outside debug mode, a plain
    /// function whose code is known not to be a coroutine's (or a C function), an empty caller
    /// context, an open loop. Returns the borrowed loop state with new references to the
    /// callback and its argument, or `None` (nothing was done).
    ///
    /// # Safety
    /// `args` must point to `nargs` live object pointers, and the GIL be held.
    #[inline(always)]
    unsafe fn plain_call<'a>(
        &'a self,
        py: Python<'_>,
        args: *const *mut ffi::PyObject,
        nargs: usize,
    ) -> Option<(std::cell::RefMut<'a, super::State>, Py<PyAny>, Args)> {
        if nargs == 0 || nargs > 2 || self.shared.debug() {
            return None;
        }
        // SAFETY: `args[..nargs]` are live borrowed references (the caller's contract).
        let callback = unsafe { *args };
        if !crate::handles::is_plain_callback(callback)
            || crate::context::current_is_empty(py) != Some(true)
        {
            return None;
        }
        let st = self.state.borrow_mut(py).ok()?;
        if st.closed {
            return None;
        }
        // SAFETY: as above; each takes a new reference.
        let (callback, args) = unsafe {
            (
                Bound::from_borrowed_ptr(py, callback).unbind(),
                if nargs == 2 {
                    Args::One(Bound::from_borrowed_ptr(py, *args.add(1)).unbind())
                } else {
                    Args::Empty
                },
            )
        };
        Some((st, callback, args))
    }

    /// `call_soon(callback[, arg])` and `call_soon_threadsafe(...)` in their common case, in one
    /// step: outside debug mode, with a plain function whose code is known not to be a
    /// coroutine's (or a C function) as callback, from an empty caller context, on an open loop.
    /// `None` when any of that does not hold (nothing was done): the general path then makes
    /// asyncio's checks in asyncio's order and raises their errors.
    ///
    /// # Safety
    /// `args` must point to `nargs` live object pointers, and the GIL be held.
    #[inline(always)]
    pub(crate) unsafe fn schedule_soon_plain(
        &self,
        py: Python<'_>,
        args: *const *mut ffi::PyObject,
        nargs: usize,
    ) -> Option<PyResult<Py<Handle>>> {
        // SAFETY: the caller's contract is this function's.
        let (mut st, callback, args) = unsafe { self.plain_call(py, args, nargs) }?;
        let h = match st.pool.pop() {
            Some(h) => {
                // No Python code runs under the borrow: a pooled handle holds nothing, and
                // nothing else borrows its cells (so the refill cannot fail).
                let refilled = h.get().refill(py, callback, args, FreshContext::empty());
                if let Err(e) = refilled {
                    st.pool.push(h);
                    return Some(Err(e));
                }
                h
            }
            None => {
                // Allocating may run the garbage collector: not under the borrow.
                drop(st);
                let handle = Handle::new(
                    callback,
                    args,
                    FreshContext::empty(),
                    self.shared.clone(),
                    None,
                );
                let h = match Py::new(py, handle) {
                    Ok(h) => h,
                    Err(e) => return Some(Err(e)),
                };
                st = match self.state.borrow_mut(py) {
                    Ok(st) => st,
                    Err(e) => return Some(Err(e)),
                };
                if st.closed {
                    // Closed by code the collector ran meanwhile: the general path raises.
                    drop(st);
                    drop(h);
                    return None;
                }
                h
            }
        };
        untrack(&h);
        st.ready.push_back(super::Ready::Handle(h.clone_ref(py)));
        Some(Ok(h))
    }

    /// `call_soon_threadsafe(callback[, arg])` in the common case `schedule_soon_plain` takes:
    /// the callback itself is queued (`Ready::Soon`), and the handle returned is not. A
    /// producer thread that runs ahead of the loop then leaves no handle alive per pending
    /// callback (it drops them): see `SoonBook`. `None` as for `schedule_soon_plain`.
    ///
    /// # Safety
    /// `args` must point to `nargs` live object pointers, and the GIL be held.
    #[inline(always)]
    pub(crate) unsafe fn schedule_soon_detached(
        &self,
        py: Python<'_>,
        args: *const *mut ffi::PyObject,
        nargs: usize,
    ) -> Option<PyResult<Py<Handle>>> {
        // SAFETY: the caller's contract is this function's.
        let (mut st, callback, args) = unsafe { self.plain_call(py, args, nargs) }?;
        // The last handle returned, if its caller dropped it (as callers do): nothing else
        // can see it (handles support no weak references), so it can stand for this entry.
        let reuse = st
            .soon_handle
            .as_ref()
            // SAFETY: reading the reference count of a live object.
            .filter(|h| unsafe { ffi::Py_REFCNT(h.as_ptr()) } == 1)
            .map(|h| h.clone_ref(py));
        let (h, old_cb, old_ctx, old_handle) = match reuse {
            Some(h) => {
                // No Python code runs: what the handle held is returned, to be dropped below.
                let refilled = h
                    .get()
                    .refill_soon(py, callback.clone_ref(py), args.clone_ref(py));
                match refilled {
                    Ok((cb, ctx)) => (h, cb, ctx, None),
                    Err(e) => return Some(Err(e)),
                }
            }
            None => {
                // Allocating may run the garbage collector: not under the borrow.
                drop(st);
                let handle = Handle::soon(
                    callback.clone_ref(py),
                    args.clone_ref(py),
                    self.shared.clone(),
                );
                let h = match Py::new(py, handle) {
                    Ok(h) => h,
                    Err(e) => return Some(Err(e)),
                };
                st = match self.state.borrow_mut(py) {
                    Ok(st) => st,
                    Err(e) => return Some(Err(e)),
                };
                if st.closed {
                    // Closed by code the collector ran meanwhile: the general path raises.
                    drop(st);
                    drop(h.into_bound(py));
                    return None;
                }
                let old = st.soon_handle.replace(h.clone_ref(py));
                (h, None, None, old)
            }
        };
        // The ticket is taken as the entry is queued, so tickets follow the queue's order.
        let ticket = self.shared.next_soon_ticket();
        h.get().set_soon_ticket(ticket);
        st.ready.push_back(super::Ready::Soon {
            func: callback,
            args,
            ticket,
        });
        drop(st);
        // Outside the borrow: the old callback and arguments may run __del__ code. As
        // `Bound`s: a plain decref (a `Py` dropped here goes to PyO3's deferred pool).
        if let Some(c) = old_cb {
            drop(c.func.into_bound(py));
            c.args.release(py);
        }
        if let Some(c) = old_ctx {
            drop(c.into_bound(py));
        }
        if let Some(old) = old_handle {
            drop(old.into_bound(py));
        }
        Some(Ok(h))
    }

    pub(crate) fn call_soon_threadsafe_impl(
        &self,
        py: Python<'_>,
        callback: &Bound<'_, PyAny>,
        args: Args,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<Handle>> {
        let h = self.schedule_soon(py, callback, args, context, "call_soon_threadsafe", false)?;
        self.shared.wake_if_sleeping();
        Ok(h)
    }

    pub(crate) fn call_later_impl(
        &self,
        py: Python<'_>,
        loop_obj: &Bound<'_, PyAny>,
        delay: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: Args,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<TimerHandle>> {
        if delay.is_none() {
            return Err(PyTypeError::new_err("delay must not be None"));
        }
        let delay = extract_seconds(delay, "delay")?;
        let when = self.now(loop_obj)? + delay;
        self.schedule_timer(py, when, callback, args, context, "call_later")
    }

    pub(crate) fn call_at_impl(
        &self,
        py: Python<'_>,
        when: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: Args,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<TimerHandle>> {
        if when.is_none() {
            return Err(PyTypeError::new_err("when cannot be None"));
        }
        let when = extract_seconds(when, "when")?;
        self.schedule_timer(py, when, callback, args, context, "call_at")
    }

    pub(crate) fn create_future_impl(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let s = stdlib(py)?;
        if let Some(fut) = bare_future(slf, s) {
            return fut;
        }
        let running_here = s.running_loop_lookup_is_cheap
            && slf.get().state.borrow_mut(py)?.thread_id == Some(current_thread_id());
        if running_here {
            // Running in this thread, this loop is the thread's running loop: `Future()` finds
            // it by itself, without the keyword argument's parsing. (Before 3.12 that lookup
            // costs a getpid() system call, far more than the parsing: see `Stdlib`.)
            // SAFETY: a live callable; NULL args with nargs 0 is a valid vectorcall.
            let r = unsafe {
                ffi::PyObject_Vectorcall(
                    s.future_type.as_ptr(),
                    std::ptr::null(),
                    0,
                    std::ptr::null_mut(),
                )
            };
            // SAFETY: a new reference or NULL with an exception set.
            return unsafe { Bound::from_owned_ptr_or_err(py, r) }.map(Bound::unbind);
        }
        if s.future_is_static_c_type {
            if let Some(kwargs) = Self::loop_kwargs(slf)? {
                let args = PyTuple::empty(py);
                return new_static(py, s.future_type.bind(py), &args, kwargs.bind(py));
            }
        }
        Ok(call_kw(
            py,
            s.future_type.bind(py),
            &[],
            s.kw_loop.bind(py),
            &[slf.as_any()],
        )?
        .unbind())
    }

    /// The loop's `{"loop": self}` (made on first use, dropped by `close`), or None once
    /// closed (the caller then builds the keywords itself).
    fn loop_kwargs(slf: &Bound<'_, Self>) -> PyResult<Option<Py<PyDict>>> {
        let py = slf.py();
        let mut st = slf.get().state.borrow_mut(py)?;
        if st.closed {
            return Ok(None);
        }
        if st.loop_kwargs.is_none() {
            let d = PyDict::new(py);
            d.set_item(intern!(py, "loop"), slf)?;
            st.loop_kwargs = Some(d.unbind());
        }
        Ok(st.loop_kwargs.as_ref().map(|d| d.clone_ref(py)))
    }

    pub(crate) fn create_task_impl(
        slf: &Bound<'_, Self>,
        coro: &Bound<'_, PyAny>,
        name: Option<&Bound<'_, PyAny>>,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let this = slf.get();
        this.check_closed(py)?;
        let s = stdlib(py)?;
        let none = py.None().into_bound(py);
        let name = name.filter(|n| !n.is_none());
        let context = context.filter(|c| !c.is_none());
        let factory = this
            .state
            .borrow_mut(py)?
            .task_factory
            .as_ref()
            .map(|f| f.clone_ref(py));
        let task = match factory {
            None => {
                let task_type = s.task_type.bind(py);
                let name_arg = name.unwrap_or(&none);
                let plain = name.is_none() && context.is_none();
                let kwargs = if plain && s.task_is_static_c_type {
                    Self::loop_kwargs(slf)?
                } else {
                    None
                };
                if let Some(kwargs) = kwargs {
                    // The common case before 3.12: `Task(coro, loop=self)` by its slots.
                    let args = PyTuple::new(py, [coro])?;
                    new_static(py, task_type, &args, kwargs.bind(py))?.into_bound(py)
                } else if plain {
                    // The common case: one keyword for the C Task to parse, not three.
                    call_kw(py, task_type, &[coro], s.kw_loop.bind(py), &[slf.as_any()])?
                } else if s.task_accepts_context {
                    let ctx_arg = context.unwrap_or(&none);
                    call_kw(
                        py,
                        task_type,
                        &[coro],
                        s.kw_loop_name_context.bind(py),
                        &[slf.as_any(), name_arg, ctx_arg],
                    )?
                } else {
                    if context.is_some() {
                        return Err(PyTypeError::new_err(
                            "create_task() got an unexpected keyword argument 'context'",
                        ));
                    }
                    call_kw(
                        py,
                        task_type,
                        &[coro],
                        s.kw_loop_name.bind(py),
                        &[slf.as_any(), name_arg],
                    )?
                }
            }
            Some(factory) => {
                let factory = factory.bind(py);
                let task = match context {
                    None => factory.call1((slf, coro))?,
                    Some(ctx) => call_kw(
                        py,
                        factory,
                        &[slf.as_any(), coro],
                        s.kw_context.bind(py),
                        &[ctx],
                    )?,
                };
                if let Some(name) = name {
                    task.call_method1(intern!(py, "set_name"), (name,))?;
                }
                task
            }
        };
        Ok(task.unbind())
    }

    pub(crate) fn set_task_factory_impl(
        &self,
        py: Python<'_>,
        factory: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let new = if factory.is_none() {
            None
        } else if factory.is_callable() {
            Some(factory.clone().unbind())
        } else {
            return Err(PyTypeError::new_err(
                "task factory must be a callable or None",
            ));
        };
        let old = std::mem::replace(&mut self.state.borrow_mut(py)?.task_factory, new);
        drop(old);
        Ok(())
    }

    pub(crate) fn get_task_factory_impl(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(self
            .state
            .borrow_mut(py)?
            .task_factory
            .as_ref()
            .map(|f| f.clone_ref(py)))
    }
}

impl LoopCore {
    fn schedule_timer(
        &self,
        py: Python<'_>,
        when: f64,
        callback: &Bound<'_, PyAny>,
        args: Args,
        context: Option<&Bound<'_, PyAny>>,
        method: &str,
    ) -> PyResult<Py<TimerHandle>> {
        self.check_schedule(py, true)?;
        check_callback(py, callback, method)?;
        let base = self.new_handle(py, callback, args, context)?;
        let timer = TimerHandle::new(when);
        let t = Py::new(py, pyo3::PyClassInitializer::from(base).add_subclass(timer))?;
        t.get().scheduled.store(true, Ordering::Relaxed);
        if !self.shared.debug() {
            untrack(&t);
        }
        self.state
            .borrow_mut(py)?
            .timers
            .push(when, t.clone_ref(py));
        Ok(t)
    }
}

/// A delay or deadline as float seconds; anything that is not a real number is a TypeError, as
/// the `time() + delay` arithmetic in asyncio would raise, and an int too large for a float the
/// OverflowError that arithmetic raises.
pub(crate) fn extract_seconds(v: &Bound<'_, PyAny>, what: &str) -> PyResult<f64> {
    v.extract::<f64>().map_err(|e| {
        if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(v.py()) {
            return e;
        }
        PyTypeError::new_err(format!(
            "{what} must be a real number, not {}",
            v.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })
}

/// `tp(*args, **kwargs)` for a C type of asyncio's before 3.12 (`Future`, `Task`): its
/// `tp_new` and `tp_init` called directly with the loop's keyword dict. Calling the type
/// instead turns the keyword into a fresh dict on every call (these types have no vectorcall
/// before 3.12), about a quarter of the cost of a future.
/// Whether `bare_future` may be used: 0 not known yet, 1 yes, 2 no.
static BARE_FUTURE: AtomicU8 = AtomicU8::new(0);

/// `asyncio.Future(loop=slf)` as `Future.__init__` leaves it outside debug mode, made without
/// running `__init__`: on a newly allocated (zeroed) C Future, `__init__` sets the state to
/// pending (0), clears the flags (0), stores the loop, and calls `loop.get_debug()`, which
/// only matters when it is true (the future then records where it was made). So when the
/// loop's `get_debug` is ferroloop's own (not replaced on a subclass or the instance) and
/// debug mode is off, storing the loop is all that is left. That halves the cost of
/// `create_future` (about 1,160 instructions before, 250 after), which every `await` on a
/// stream, a queue, a lock or an event pays.
///
/// The C Future keeps its loop in the first field after the object header (3.9 to 3.13);
/// that and the type's slots are checked on the first call, against a future made the
/// ordinary way (see [`check_bare_future`]). Another version, a Python `asyncio.Future`, or a
/// failed check keeps the ordinary path. None: take the ordinary path.
#[inline]
fn bare_future(slf: &Bound<'_, LoopCore>, s: &Stdlib) -> Option<PyResult<Py<PyAny>>> {
    let py = slf.py();
    match BARE_FUTURE.load(Ordering::Relaxed) {
        1 => {}
        0 => return Some(check_bare_future(slf, s)),
        _ => return None,
    }
    if slf.get().shared.debug() || !get_debug_is_native(slf.as_any()) {
        return None;
    }
    let tp = s.future_type.as_ptr().cast::<ffi::PyTypeObject>();
    // SAFETY: the check passed for this type: it is the C Future, allocated by `tp_alloc`
    // (zeroed, tracked by the collector), whose first field after the header is the loop,
    // owned (one reference).
    unsafe {
        let alloc = (*tp).tp_alloc?;
        let obj = alloc(tp, 0);
        if obj.is_null() {
            return Some(Err(PyErr::fetch(py)));
        }
        *obj.cast::<*mut ffi::PyObject>().add(FUT_LOOP_WORD) = slf.clone().into_any().into_ptr();
        Some(Ok(Bound::from_owned_ptr(py, obj).unbind()))
    }
}

/// Where the C Future's `fut_loop` is, in pointer-sized words from the object's start.
const FUT_LOOP_WORD: usize = 2;

/// `loop.get_debug` is the method ferroloop installed on `LoopCore`, unshadowed: what
/// `Future.__init__` would call.
fn get_debug_is_native(slf: &Bound<'_, PyAny>) -> bool {
    let py = slf.py();
    let expected = crate::event_loop::fastcall::GET_DEBUG_DESCR.load(Ordering::Relaxed);
    let mut found = std::ptr::null_mut();
    // SAFETY: live object and str; `found` receives a new reference or NULL. The lookup finds
    // a method descriptor (not a data descriptor) on the class unless it was replaced, so it
    // runs no code in the expected case; what else it might run is what `get_debug()` would.
    let unbound =
        unsafe { _PyObject_GetMethod(slf.as_ptr(), intern!(py, "get_debug").as_ptr(), &mut found) };
    if found.is_null() {
        drop(PyErr::take(py));
        return false;
    }
    let same = unbound == 1 && found == expected;
    // SAFETY: the new reference returned above.
    unsafe { ffi::Py_DECREF(found) };
    same
}

/// The first `create_future` of the process: makes the future the ordinary way, and decides
/// whether `bare_future` may be used from now on (see there).
#[cold]
#[inline(never)]
fn check_bare_future(slf: &Bound<'_, LoopCore>, s: &Stdlib) -> PyResult<Py<PyAny>> {
    let py = slf.py();
    let fut = call_kw(
        py,
        s.future_type.bind(py),
        &[],
        s.kw_loop.bind(py),
        &[slf.as_any()],
    )?;
    let (major, minor) = (py.version_info().major, py.version_info().minor);
    let ty = s.future_type.bind(py);
    let c_future = py
        .import("_asyncio")
        .and_then(|m| m.getattr("Future"))
        .map(|f| f.is(ty))
        .unwrap_or(false);
    let tp = ty.as_ptr().cast::<ffi::PyTypeObject>();
    // SAFETY: `tp` is a live type (`fut`'s, checked first); the word read is inside the
    // object (its basic size covers it), a pointer-sized field of the C Future.
    let ok = major == 3
        && (9..=13).contains(&minor)
        && c_future
        && unsafe {
            ffi::Py_TYPE(fut.as_ptr()) == tp
                && (*tp).tp_alloc.map(|f| f as *const () as usize)
                    == Some(ffi::PyType_GenericAlloc as *const () as usize)
                && (*tp).tp_basicsize as usize
                    >= (FUT_LOOP_WORD + 1) * std::mem::size_of::<*mut ffi::PyObject>()
                && *fut.as_ptr().cast::<*mut ffi::PyObject>().add(FUT_LOOP_WORD) == slf.as_ptr()
        };
    BARE_FUTURE.store(if ok { 1 } else { 2 }, Ordering::Relaxed);
    Ok(fut.unbind())
}

extern "C" {
    // Exported by CPython 3.9 through 3.13 (private, declared PyAPI_FUNC): what `obj.name(...)`
    // does before a call (see `streams.rs`).
    fn _PyObject_GetMethod(
        obj: *mut ffi::PyObject,
        name: *mut ffi::PyObject,
        method: *mut *mut ffi::PyObject,
    ) -> std::os::raw::c_int;
}

fn new_static(
    py: Python<'_>,
    tp: &Bound<'_, PyAny>,
    args: &Bound<'_, PyTuple>,
    kwargs: &Bound<'_, PyDict>,
) -> PyResult<Py<PyAny>> {
    let tp = tp.as_ptr().cast::<ffi::PyTypeObject>();
    // SAFETY: `Stdlib::*_is_static_c_type` checked that `tp` is a static type with both slots;
    // `args` is a tuple and `kwargs` a dict of str keys, as the slots expect (`tp_init` only
    // reads them). `tp_new` returns a new reference or NULL with an exception set; `tp_init`
    // returns 0, or -1 with an exception set.
    unsafe {
        let new = (*tp).tp_new.unwrap_unchecked();
        let init = (*tp).tp_init.unwrap_unchecked();
        let obj = Bound::from_owned_ptr_or_err(py, new(tp, args.as_ptr(), std::ptr::null_mut()))?;
        if init(obj.as_ptr(), args.as_ptr(), kwargs.as_ptr()) < 0 {
            return Err(PyErr::fetch(py));
        }
        Ok(obj.unbind())
    }
}
