//! The event loop: `LoopCore`, the native base of `ferroloop.Loop`.
//!
//! Ground rules:
//! - One loop, one thread: the thread running `run_forever`. Everything per callback, per event
//!   or per timer is here, in Rust; cold, argument-heavy glue lives in `python/ferroloop/_loop.py`.
//! - `run.rs`'s `run_once` is the only place callbacks are called.
//! - Loop state lives in a [`GilCell`]: borrows are short and never span a call into Python,
//!   a possibly-final drop of a Python object, or the GIL-released poll (see `gil.rs`).
//! - Other threads reach the loop only through `call_soon_threadsafe`, which pushes to the same
//!   ready queue under the GIL and writes the eventfd only when the loop is (about to be) asleep
//!   in `epoll_wait`. Because the loop decides to sleep with the GIL held, after setting
//!   `sleeping`, a push either happens before that decision (and is seen) or after it (and
//!   wakes the poll): no wake-up can be lost, and an awake loop costs no syscall.

mod callbacks;
pub(crate) mod fastcall;
mod io_watch;
mod run;

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use ferroloop_core::{EventBuf, Poller, TimerHeap, Waker};
use pyo3::prelude::*;
use pyo3::{PyTraverseError, PyVisit};

use crate::errors::os_error;
use crate::gil::GilCell;
use crate::handles::{Handle, TimerHandle};
use pyo3::types::PyTuple;

/// The part of the loop that handles and other threads may touch: atomics and fds only.
pub struct Shared {
    debug: AtomicBool,
    timer_cancelled_count: AtomicUsize,
    sleeping: AtomicBool,
    /// The loop's class overrides `time()`: `call_later` and the run loop call it, as
    /// asyncio's do, instead of reading the clock (see `LoopCore::now`).
    python_time: AtomicBool,
    pub(crate) waker: Waker,
    pub(crate) poller: Poller,
    /// The empty context that handles made from an empty caller context run in (see
    /// `context.rs` and `Handle::run`). Always empty while no callback runs in it.
    empty_ctx: GilCell<Option<Py<PyAny>>>,
    /// A callback runs in `empty_ctx` right now (a nested `Handle._run()`, or one on another
    /// thread, gets a context of its own).
    empty_ctx_busy: AtomicBool,
    /// The book of `call_soon_threadsafe` entries queued without their handle (`Ready::Soon`).
    soon: SoonBook,
}

/// `call_soon_threadsafe(cb[, arg])` in its plain case queues the callback itself
/// (`Ready::Soon`), not the handle it returns: a producer thread that runs far ahead of the
/// loop (and drops the handles, as callers do) then leaves no handle alive per pending callback:
/// the loop reuses the one handle it returned last once its caller let go of it. Measured on
/// the bench's 200k calls, with half of them pending at the peak: the 100k handles that were
/// alive at once (14 MB, page-faulted in, allocated past the pool) cost a fifth of the call.
/// Each queued callback has a ticket, and its handle knows the ticket: what the handle does
/// while its callback waits (cancel, giving out its context) is written here for the loop to
/// see when the entry comes up.
struct SoonBook {
    /// The last ticket given out (tickets start at 1; 0 means "not queued this way").
    last: AtomicU64,
    /// Every ticket up to this one has left the ready queue (run, skipped or dropped by close):
    /// entries leave in the order they were queued.
    done: AtomicU64,
    /// `marks` is not empty: the loop looks a ticket up only then.
    marked: AtomicBool,
    marks: GilCell<HashMap<u64, SoonMark>>,
}

/// What the handle of a queued `Ready::Soon` entry did while the entry waited.
#[derive(Default)]
pub(crate) struct SoonMark {
    pub cancelled: bool,
    /// The context the handle gave out (`get_context()`): the callback runs in it.
    pub context: Option<Py<PyAny>>,
}

impl Shared {
    #[inline]
    pub fn debug(&self) -> bool {
        self.debug.load(Ordering::Relaxed)
    }

    pub fn timer_cancelled(&self) {
        self.timer_cancelled_count.fetch_add(1, Ordering::Relaxed);
    }

    /// The empty context for a handle's run: the shared one (and `true`) if no callback runs
    /// in it, else a new one. Must be followed by [`Shared::leave_empty_context`].
    #[inline(always)]
    pub(crate) fn enter_empty_context(&self, py: Python<'_>) -> PyResult<(Py<PyAny>, bool)> {
        if !self.empty_ctx_busy.load(Ordering::Relaxed) {
            let mut slot = self.empty_ctx.borrow_mut(py)?;
            let ctx = match slot.as_ref() {
                Some(c) => c.clone_ref(py),
                None => {
                    let c = new_context(py)?;
                    *slot = Some(c.clone_ref(py));
                    c
                }
            };
            self.empty_ctx_busy.store(true, Ordering::Relaxed);
            return Ok((ctx, true));
        }
        Ok((new_context(py)?, false))
    }

    /// After a run in a context from [`Shared::enter_empty_context`]: `keep` says the handle
    /// keeps that context for good (a callback set a variable in it, or Python code got hold
    /// of it), so it is no longer the shared one.
    #[inline(always)]
    pub(crate) fn leave_empty_context(
        &self,
        py: Python<'_>,
        shared: bool,
        keep: bool,
    ) -> PyResult<()> {
        if shared {
            self.empty_ctx_busy.store(false, Ordering::Relaxed);
            if keep {
                let old = self.empty_ctx.borrow_mut(py)?.take();
                drop(old); // the handle holds it too: not its last reference
            }
        }
        Ok(())
    }

    /// A ticket for a `Ready::Soon` entry about to be queued.
    #[inline(always)]
    pub(crate) fn next_soon_ticket(&self) -> u64 {
        // Under the GIL: a load and a store, no locked instruction.
        let t = self.soon.last.load(Ordering::Relaxed) + 1;
        self.soon.last.store(t, Ordering::Relaxed);
        t
    }

    /// The `Ready::Soon` entry of `ticket` is still queued.
    pub(crate) fn soon_pending(&self, ticket: u64) -> bool {
        ticket > self.soon.done.load(Ordering::Relaxed)
    }

    /// Records what the handle of a still-queued `Ready::Soon` entry did.
    pub(crate) fn mark_soon(
        &self,
        py: Python<'_>,
        ticket: u64,
        f: impl FnOnce(&mut SoonMark),
    ) -> PyResult<()> {
        if !self.soon_pending(ticket) {
            return Ok(());
        }
        let mut marks = self.soon.marks.borrow_mut(py)?;
        f(marks.entry(ticket).or_default());
        self.soon.marked.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The `Ready::Soon` entry of `ticket` leaves the queue: what its handle did meanwhile.
    #[inline(always)]
    pub(crate) fn leave_soon(&self, py: Python<'_>, ticket: u64) -> PyResult<Option<SoonMark>> {
        self.soon.done.store(ticket, Ordering::Relaxed);
        if !self.soon.marked.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let mut marks = self.soon.marks.borrow_mut(py)?;
        let mark = marks.remove(&ticket);
        if marks.is_empty() {
            self.soon.marked.store(false, Ordering::Relaxed);
        }
        Ok(mark)
    }

    /// Every `Ready::Soon` entry left the queue (the loop closed); returns the marks, to be
    /// dropped outside the borrow.
    fn forget_soon(&self, py: Python<'_>) -> PyResult<HashMap<u64, SoonMark>> {
        let last = self.soon.last.load(Ordering::Relaxed);
        self.soon.done.store(last, Ordering::Relaxed);
        self.soon.marked.store(false, Ordering::Relaxed);
        Ok(std::mem::take(&mut *self.soon.marks.borrow_mut(py)?))
    }

    /// Drops the shared empty context (the loop is closing).
    pub(crate) fn clear_empty_context(&self, py: Python<'_>) -> PyResult<()> {
        let old = self.empty_ctx.borrow_mut(py)?.take();
        drop(old); // an empty context frees nothing else
        Ok(())
    }

    /// Wakes the loop if it sleeps in (or is committed to) a blocking poll; coalesces wakes.
    #[inline]
    pub fn wake_if_sleeping(&self) {
        // Load first: an awake loop (the common case) costs a shared read, not a write that
        // would pull the cache line away from the loop thread on every call.
        if self.sleeping.load(Ordering::Acquire) && self.sleeping.swap(false, Ordering::AcqRel) {
            self.waker.wake();
        }
    }
}

/// Readers and writers registered on one fd (`add_reader`/`add_writer`).
#[derive(Default)]
pub(crate) struct FdWatch {
    /// The object given to add_reader/add_writer: `remove_reader(sock)` must still find the
    /// registration after `sock.close()` made `sock.fileno()` return -1, as `selectors` does.
    pub fileobj: Option<Py<PyAny>>,
    pub reader: Option<Py<Handle>>,
    pub writer: Option<Py<Handle>>,
    /// The reader drains the fd on each event (a native stream transport), so the kernel may
    /// report readability edge-triggered while nothing else is watched (see `io_watch.rs`).
    pub reader_edge: bool,
    /// The reader is a native transport's `_read_ready`: its events are queued as
    /// `Ready::Reader` and run without the call through Python (see `run.rs`).
    pub native_reader: Option<crate::transports::NativeReader>,
    /// The edge-triggered native reader's fd reported EOF, a hang-up or an error: it stays
    /// readable, so the reader is queued on every iteration from now on (`State::hup_next`),
    /// as a level-triggered registration would have it, without a syscall to make it one.
    pub hup: bool,
    /// Which registration of the fd number this is (the high half of its epoll token): an
    /// event whose token carries another comes from a registration the kernel still holds
    /// for a file this number no longer refers to, and is dropped (see `io_watch.rs`).
    pub generation: u32,
}

pub(crate) struct State {
    pub ready: VecDeque<Ready>,
    pub timers: TimerHeap<Py<TimerHandle>>,
    pub fds: HashMap<RawFd, FdWatch, io_watch::FdHash>,
    pub task_factory: Option<Py<PyAny>>,
    /// `threading.get_ident()` of the thread in `run_forever`, if running.
    pub thread_id: Option<u64>,
    pub stopping: bool,
    pub closed: bool,
    /// Debug mode only: the handle being run (the default exception handler reports where it
    /// was created).
    pub current_handle: Option<Py<Handle>>,
    /// Spent one-shot handles kept for reuse by `call_soon` (see `Handle::recyclable`).
    pub pool: Vec<Py<Handle>>,
    /// When the loop first went to sleep with more than the idle pool size (see run.rs).
    pub pool_surplus_since: Option<f64>,
    /// `{"loop": self}`, the keyword arguments of `Future.__init__` and `Task.__init__` before
    /// 3.12 (see `callbacks::new_static`): made by the first `create_future`/`create_task`,
    /// dropped by `close`. It and the loop refer to each other; the collector sees that
    /// through `__traverse__`.
    pub loop_kwargs: Option<Py<pyo3::types::PyDict>>,
    /// The fds whose readers (`FdWatch::hup`) are queued again in the next iteration.
    pub hup_next: Vec<RawFd>,
    /// An empty list kept for `hup_next`'s next turn (see `requeue_hung_up`).
    pub hup_spare: Vec<RawFd>,
    /// The tokens of the events the last poll dropped as stale (`run.rs`), and for how many
    /// polls in a row one of them came again: a stale level-triggered registration, which
    /// makes every poll return at once until the epoll instance is renewed (`io_watch.rs`).
    pub stale_tokens: Vec<u64>,
    pub stale_polls: u32,
    /// The handle last returned for a `Ready::Soon` entry: reused for the next one once
    /// nothing else references it (see `schedule_soon_detached`).
    pub soon_handle: Option<Py<Handle>>,
}

/// An entry of the ready queue.
pub(crate) enum Ready {
    Handle(Py<Handle>),
    /// A step or wake-up of CPython's C Task, scheduled by `call_soon(cb[, arg], context=ctx)`
    /// from C code that discards the handle it returns (see `fastcall.rs`): no Handle is made.
    TaskStep {
        func: Py<PyAny>,
        args: crate::handles::Args,
        context: Py<PyAny>,
    },
    /// A readiness event for a native transport reader (`FdWatch::native_reader`): the watcher's
    /// handle, run in its place in the queue, skipped if cancelled by then, as any handle is.
    Reader(Py<Handle>, crate::transports::NativeReader),
    /// A plain `call_soon_threadsafe(cb[, arg])` from an empty context (see `SoonBook`): run in
    /// the shared empty context, unless its handle was cancelled or gave out a context.
    Soon {
        func: Py<PyAny>,
        args: crate::handles::Args,
        ticket: u64,
    },
    /// A `call_soon(cb, *args)` of a native transport path (`stream_life.rs`) from an empty
    /// context, outside debug mode, whose handle nobody ever sees: queued without one (see
    /// `LoopCore::push_internal`) and run as the handle would run, in the shared empty context.
    Internal {
        func: Py<PyAny>,
        args: crate::handles::Args,
    },
}

impl Ready {
    pub(crate) fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        match self {
            Ready::Handle(h) | Ready::Reader(h, _) => visit.call(h),
            Ready::TaskStep {
                func,
                args,
                context,
            } => {
                visit.call(func)?;
                args.visit(visit)?;
                visit.call(context)
            }
            Ready::Soon { func, args, .. } | Ready::Internal { func, args } => {
                visit.call(func)?;
                args.visit(visit)
            }
        }
    }

    pub(crate) fn handle(&self) -> Option<&Py<Handle>> {
        match self {
            Ready::Handle(h) | Ready::Reader(h, _) => Some(h),
            Ready::TaskStep { .. } | Ready::Soon { .. } | Ready::Internal { .. } => None,
        }
    }
}

/// Token of the waker's eventfd in the poller; a watched fd's is its number and generation
/// (`io_watch::token`), never this (fd numbers are not negative).
pub(crate) const WAKER_TOKEN: u64 = u64::MAX;

#[pyclass(module = "ferroloop._ferroloop", subclass, frozen, weakref)]
pub struct LoopCore {
    pub(crate) state: GilCell<State>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) event_buf: GilCell<Option<EventBuf>>,
    pub(crate) clock_resolution: f64,
    /// The process that created the loop. In a forked child the epoll instance is shared
    /// with the parent, so closing the loop there must not unregister anything from it.
    pub(crate) owner_pid: libc::pid_t,
    /// The last generation given to a registration (`FdWatch::generation`).
    pub(crate) generation: AtomicU32,
}

impl Drop for LoopCore {
    fn drop(&mut self) {
        // A loop dropped without close(): its pending handles will never run. Drop their
        // callbacks so cycles through them (a task sleeping on a timer) can be collected.
        Python::attach(|py| {
            if let Some(st) = self.state.try_borrow_for_gc() {
                for t in st.timers.iter() {
                    t.bind(py).as_super().get().forget_callback(py);
                }
                for h in st.ready.iter().filter_map(Ready::handle) {
                    h.get().forget_callback(py);
                }
            }
            // Handles that outlive the loop share the book: what it keeps for them goes now.
            let marks = self.shared.forget_soon(py);
            drop(marks);
        });
    }
}

/// A new, empty `contextvars.Context`.
pub(crate) fn new_context(py: Python<'_>) -> PyResult<Py<PyAny>> {
    // SAFETY: PyContext_New returns a new reference or NULL with an exception set.
    unsafe { Bound::from_owned_ptr_or_err(py, pyo3::ffi::PyContext_New()) }.map(Bound::unbind)
}

pub(crate) fn current_thread_id() -> u64 {
    // SAFETY: pthread_self has no preconditions; it is what threading.get_ident() returns.
    unsafe { libc::pthread_self() as u64 }
}

pub(crate) fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux. This is the
    // clock `time.monotonic()` reads, so `loop.time()` equals it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

impl LoopCore {
    /// `stop()` was called and the current iteration is the last one (for the batching fast
    /// paths, which must not deliver more than asyncio would before the loop stops).
    pub(crate) fn is_stopping(&self, py: Python<'_>) -> bool {
        self.state.borrow_mut(py).is_ok_and(|st| st.stopping)
    }

    pub(crate) fn check_closed(&self, py: Python<'_>) -> PyResult<()> {
        if self.state.borrow_mut(py)?.closed {
            Err(crate::errors::closed_loop())
        } else {
            Ok(())
        }
    }

    /// `loop.time()`: the clock, or the class's own `time()` when it overrides it (asyncio's
    /// `call_later` and `_run_once` call `self.time()`, so a subclass with a virtual clock
    /// drives them). No loop state may be borrowed: the override is Python code.
    pub(crate) fn now(&self, loop_obj: &Bound<'_, PyAny>) -> PyResult<f64> {
        if !self.shared.python_time.load(Ordering::Relaxed) {
            return Ok(monotonic());
        }
        let t = loop_obj.call_method0(pyo3::intern!(loop_obj.py(), "time"))?;
        callbacks::extract_seconds(&t, "time()")
    }
}

#[pymethods]
impl LoopCore {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn py_new(
        _args: &Bound<'_, pyo3::types::PyTuple>,
        _kwargs: Option<&Bound<'_, pyo3::types::PyDict>>,
    ) -> PyResult<LoopCore> {
        io_watch::watch_forks();
        let poller = Poller::new().map_err(os_error)?;
        let waker = Waker::new().map_err(os_error)?;
        poller
            .add(
                waker.as_raw_fd(),
                ferroloop_core::Interest {
                    readable: true,
                    writable: false,
                },
                WAKER_TOKEN,
            )
            .map_err(os_error)?;
        let mut res = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out-pointer.
        unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC, &mut res) };
        let clock_resolution = (res.tv_sec as f64 + res.tv_nsec as f64 * 1e-9).max(1e-9);
        Ok(LoopCore {
            state: GilCell::new(State {
                ready: VecDeque::with_capacity(64),
                timers: TimerHeap::new(),
                fds: HashMap::default(),
                task_factory: None,
                thread_id: None,
                stopping: false,
                closed: false,
                current_handle: None,
                pool: Vec::new(),
                pool_surplus_since: None,
                loop_kwargs: None,
                hup_next: Vec::new(),
                hup_spare: Vec::new(),
                stale_tokens: Vec::new(),
                stale_polls: 0,
                soon_handle: None,
            }),
            shared: Arc::new(Shared {
                debug: AtomicBool::new(false),
                timer_cancelled_count: AtomicUsize::new(0),
                sleeping: AtomicBool::new(false),
                python_time: AtomicBool::new(false),
                waker,
                poller,
                empty_ctx: GilCell::new(None),
                empty_ctx_busy: AtomicBool::new(false),
                soon: SoonBook {
                    last: AtomicU64::new(0),
                    done: AtomicU64::new(0),
                    marked: AtomicBool::new(false),
                    marks: GilCell::new(HashMap::new()),
                },
            }),
            event_buf: GilCell::new(Some(EventBuf::default())),
            clock_resolution,
            // SAFETY: getpid has no preconditions.
            owner_pid: unsafe { libc::getpid() },
            generation: AtomicU32::new(0),
        })
    }

    fn time(&self) -> f64 {
        monotonic()
    }

    /// Called by `Loop.__init__` when the class overrides `time()`.
    fn _use_python_time(&self, enabled: bool) {
        self.shared.python_time.store(enabled, Ordering::Relaxed);
    }

    #[getter]
    fn _clock_resolution(&self) -> f64 {
        self.clock_resolution
    }

    /// Spent handles kept for reuse (for tests of the pool's trimming).
    fn _handle_pool_size(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.state.borrow_mut(py)?.pool.len())
    }

    fn get_debug(&self) -> bool {
        self.shared.debug()
    }

    fn set_debug(&self, enabled: &Bound<'_, PyAny>) -> PyResult<()> {
        self.shared
            .debug
            .store(enabled.is_truthy()?, Ordering::Relaxed);
        Ok(())
    }

    fn is_running(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.state.borrow_mut(py)?.thread_id.is_some())
    }

    fn is_closed(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.state.borrow_mut(py)?.closed)
    }

    #[getter]
    fn _thread_id(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        Ok(self.state.borrow_mut(py)?.thread_id)
    }

    #[getter]
    fn _current_handle(&self, py: Python<'_>) -> PyResult<Option<Py<Handle>>> {
        Ok(self
            .state
            .borrow_mut(py)?
            .current_handle
            .as_ref()
            .map(|h| h.clone_ref(py)))
    }

    #[getter]
    fn _stopping(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.state.borrow_mut(py)?.stopping)
    }

    #[getter]
    fn _timer_cancelled_count(&self) -> usize {
        self.shared.timer_cancelled_count.load(Ordering::Relaxed)
    }

    #[getter]
    fn _scheduled_count(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.state.borrow_mut(py)?.timers.len())
    }

    #[getter]
    fn _ready_count(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.state.borrow_mut(py)?.ready.len())
    }

    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        self.state.borrow_mut(py)?.stopping = true;
        Ok(())
    }

    fn _check_closed(&self, py: Python<'_>) -> PyResult<()> {
        self.check_closed(py)
    }

    fn _check_thread(&self, py: Python<'_>) -> PyResult<()> {
        callbacks::check_thread(self.state.borrow_mut(py)?.thread_id)
    }

    #[staticmethod]
    fn _check_callback(py: Python<'_>, callback: &Bound<'_, PyAny>, method: &str) -> PyResult<()> {
        crate::handles::check_callback(py, callback, method)
    }

    /// Native half of `close()`: drops every queued callback, timer and watcher and releases
    /// the loop's own fds. The Python half refuses while running and shuts the executor down.
    fn _close_native(&self, py: Python<'_>) -> PyResult<()> {
        let (ready, timers, fds, soon_handle) = {
            let mut st = self.state.borrow_mut(py)?;
            if st.closed {
                return Ok(());
            }
            st.closed = true;
            let ready = std::mem::take(&mut st.ready);
            let timers: Vec<_> = st.timers.drain().collect();
            let fds = std::mem::take(&mut st.fds);
            st.pool.clear();
            drop(st.loop_kwargs.take());
            let soon_handle = st.soon_handle.take();
            (ready, timers, fds, soon_handle)
        };
        for t in &timers {
            t.get().scheduled.store(false, Ordering::Relaxed);
            t.bind(py).as_super().get().forget_callback(py);
        }
        for h in ready.iter().filter_map(Ready::handle) {
            h.get().forget_callback(py);
        }
        self.shared
            .timer_cancelled_count
            .store(0, Ordering::Relaxed);
        // SAFETY: getpid has no preconditions.
        let forked = unsafe { libc::getpid() } != self.owner_pid;
        if !forked {
            for fd in fds.keys() {
                let _ = self.shared.poller.delete(*fd);
            }
        }
        self.shared.poller.close();
        self.shared.waker.close();
        self.shared.clear_empty_context(py)?;
        let marks = self.shared.forget_soon(py)?;
        // Dropped here, outside any borrow: their callbacks' __del__ may call back in.
        drop(marks);
        drop(soon_handle);
        drop(ready);
        drop(timers);
        drop(fds);
        Ok(())
    }

    // ---- scheduling (callbacks.rs) / running (run.rs) / fd watchers (io_watch.rs) ----

    fn create_future(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        LoopCore::create_future_impl(slf)
    }

    #[pyo3(signature = (coro, *, name=None, context=None))]
    fn create_task(
        slf: &Bound<'_, Self>,
        coro: &Bound<'_, PyAny>,
        name: Option<&Bound<'_, PyAny>>,
        context: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        LoopCore::create_task_impl(slf, coro, name, context)
    }

    fn set_task_factory(&self, py: Python<'_>, factory: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set_task_factory_impl(py, factory)
    }

    fn get_task_factory(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.get_task_factory_impl(py)
    }

    /// Runs one iteration (asyncio's `_run_once`); exposed for tests and debugging.
    fn _run_once(slf: &Bound<'_, Self>) -> PyResult<()> {
        LoopCore::_run_once_impl(slf)
    }

    /// asyncio's private `_write_to_self`: wakes the loop from its poll. Some programs call it
    /// from a thread after a non-thread-safe `call_soon` (e.g. `Queue.put_nowait`); every
    /// change they make is under the GIL, so waking a sleeping loop is all it takes: an awake
    /// loop sees the new ready work before it decides to sleep.
    fn _write_to_self(&self) {
        self.shared.wake_if_sleeping();
    }

    /// asyncio's `_check_running`.
    fn _check_running(&self, py: Python<'_>) -> PyResult<()> {
        self._check_running_impl(py)
    }

    /// The core of `run_forever`: marks the loop running in this thread, iterates until
    /// `stop()`, and always leaves the loop stopped and usable, even when a callback raised
    /// KeyboardInterrupt or SystemExit through it.
    fn _run_forever_native(slf: &Bound<'_, Self>) -> PyResult<()> {
        LoopCore::_run_forever_native_impl(slf)
    }

    #[pyo3(signature = (fd, callback, *args))]
    fn _add_reader(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        self._add_reader_impl(py, fd, callback, args)
    }

    #[pyo3(signature = (fd, callback, *args))]
    fn _add_writer(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        self._add_writer_impl(py, fd, callback, args)
    }

    /// `_add_reader` for a reader that drains the fd on each event and calls `_rearm_reader`
    /// when it could not (the native stream transport): watched edge-triggered.
    #[pyo3(signature = (fd, callback, *args))]
    fn _add_reader_edge(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        self._add_reader_edge_impl(py, fd, callback, args)
    }

    /// An edge-triggered reader left data unread: have the kernel report the fd again.
    fn _rearm_reader(&self, py: Python<'_>, fd: i32) -> PyResult<()> {
        self.rearm_reader(py, fd)
    }

    fn _remove_reader(&self, py: Python<'_>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        self._remove_reader_impl(py, fd)
    }

    fn _remove_writer(&self, py: Python<'_>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        self._remove_writer_impl(py, fd)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(st) = self.state.try_borrow_for_gc() {
            // While the loop runs, it is reachable (its run_forever is on a thread's stack), and
            // so is everything it holds: not reporting the queued callbacks and timers to the
            // collector changes nothing it decides, and spares a full collection a visit of
            // each of them (100k queued task steps in a large gather).
            let running = st.thread_id.is_some();
            for r in st.ready.iter().filter(|_| !running) {
                r.visit(&visit)?;
            }
            for w in st.fds.values() {
                if let Some(h) = &w.reader {
                    visit.call(h)?;
                }
                if let Some(h) = &w.writer {
                    visit.call(h)?;
                }
            }
            for t in st.timers.iter().filter(|_| !running) {
                visit.call(t)?;
            }
            if let Some(f) = &st.task_factory {
                visit.call(f)?;
            }
            if let Some(d) = &st.loop_kwargs {
                visit.call(d)?;
            }
            if let Some(h) = &st.soon_handle {
                visit.call(h)?;
            }
        }
        Ok(())
    }
}
