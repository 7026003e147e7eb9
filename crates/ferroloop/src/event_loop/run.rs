//! The run loop. `run_once` is the only place callbacks are called.
//!
//! One iteration, with CPython's `_run_once` semantics:
//! 1. purge cancelled timers (CPython's thresholds, see `ferroloop_core::timers`);
//! 2. timeout = 0 if callbacks are ready or the loop is stopping, else until the earliest timer
//!    (capped at 24 h), else forever;
//! 3. poll once. A zero-timeout poll never blocks, so it runs with the GIL held; it is skipped
//!    outright when no fd is watched (it could only report our own waker, whose only job is
//!    to end a sleep). A blocking poll releases the GIL;
//! 4. turn I/O events into ready handles; move due timers to ready (never early: `when` is
//!    compared with `time() + clock_resolution`, as CPython does);
//! 5. run exactly the callbacks that were ready at this point; callbacks they schedule wait for
//!    the next iteration, after another poll.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferroloop_core::Event;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::{ffi, intern};

use super::{current_thread_id, io_watch, monotonic, LoopCore, Ready, WAKER_TOKEN};
use crate::errors::os_error;
use crate::handles::Handle;
use crate::stdlib::{stdlib, support};

/// Spent handles kept for reuse: up to the burst size while the loop is busy (a gather of 100k
/// tasks reuses its 100k step handles on every round instead of allocating them), trimmed to
/// the idle size when the loop goes to sleep with a surplus older than `POOL_SURPLUS_AGE`, so
/// a past burst does not hold memory. Trimming at every sleep would free and reallocate the
/// surplus on every burst of a producer thread (`call_soon_threadsafe` wakes the loop each
/// time): measured, that tripled the page faults, as pymalloc returned and re-mapped arenas.
const POOL_MAX_BURST: usize = 1 << 17;
const POOL_MAX_IDLE: usize = 256;
const POOL_SURPLUS_AGE: f64 = 1.0;

/// Nothing but the loop references `h`.
#[inline(always)]
fn only_ours(h: &Py<Handle>) -> bool {
    // SAFETY: reading the reference count of a live object.
    unsafe { ffi::Py_REFCNT(h.as_ptr()) == 1 }
}

thread_local! {
    /// `run_once`'s event list, kept between iterations.
    static EVENTS: std::cell::Cell<Vec<Event>> = const { std::cell::Cell::new(Vec::new()) };
}

/// asyncio's MAXIMUM_SELECT_TIMEOUT.
const MAX_TIMEOUT: f64 = 24.0 * 3600.0;

impl LoopCore {
    fn purge_timers(&self, py: Python<'_>) -> PyResult<()> {
        let cancelled = self.shared.timer_cancelled_count.load(Ordering::Relaxed);
        let removed = {
            let mut st = self.state.borrow_mut(py)?;
            let is_cancelled =
                |t: &Py<crate::handles::TimerHandle>| t.bind(py).as_super().get().is_cancelled();
            // Fast exit: nothing cancelled is at the head and no rebuild is due.
            let head_cancelled = st.timers.peek().is_some_and(is_cancelled);
            let rebuild_due = st.timers.len() > ferroloop_core::timers::MIN_SCHEDULED_FOR_REBUILD
                && cancelled * 2 > st.timers.len();
            if !head_cancelled && !rebuild_due {
                return Ok(());
            }
            let mut removed = Vec::new();
            st.timers
                .purge(cancelled, is_cancelled, |t| removed.push(t));
            removed
        };
        for t in &removed {
            t.get().scheduled.store(false, Ordering::Relaxed);
        }
        let n = removed.len();
        let _ = self.shared.timer_cancelled_count.fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |c| Some(c.saturating_sub(n)),
        );
        drop(removed); // outside the borrow
        Ok(())
    }

    /// Step 2: `None` means "block until an event". Also says whether any fd is watched.
    fn compute_timeout(&self, loop_obj: &Bound<'_, PyAny>) -> PyResult<(Option<f64>, bool)> {
        let (next, has_fds) = {
            let st = self.state.borrow_mut(loop_obj.py())?;
            let has_fds = !st.fds.is_empty();
            if !st.ready.is_empty() || st.stopping {
                return Ok((Some(0.0), has_fds));
            }
            (st.timers.peek_when(), has_fds)
        };
        let Some(when) = next else {
            return Ok((None, has_fds));
        };
        // `!(d > 0)` also maps a NaN deadline to 0, as CPython's max(0, nan) does.
        let d = when - self.now(loop_obj)?;
        let timeout = if d > 0.0 { d.min(MAX_TIMEOUT) } else { 0.0 };
        Ok((Some(timeout), has_fds))
    }

    /// `busy`: work is queued for this iteration anyway (hung-up readers): do not sleep.
    fn poll(
        &self,
        loop_obj: &Bound<'_, PyAny>,
        events: &mut Vec<Event>,
        busy: bool,
    ) -> PyResult<()> {
        let py = loop_obj.py();
        // Before the timeout is known: letting go of a callback may run __del__ code, which
        // may schedule more.
        self.release_spent_soon_handle(py)?;
        let (mut timeout, has_fds) = self.compute_timeout(loop_obj)?;
        if busy {
            timeout = Some(0.0);
        }
        if timeout == Some(0.0) && !has_fds {
            return Ok(());
        }
        let mut buf = self.event_buf.borrow_mut(py)?.take().unwrap_or_default();
        let result = if timeout == Some(0.0) {
            self.shared
                .poller
                .wait(Some(Duration::ZERO), &mut buf, events)
        } else {
            // Commit to sleeping with the GIL held, then re-check: a call_soon_threadsafe that
            // ran before this point left work in `ready`; one that runs after it sees
            // `sleeping` and writes the eventfd.
            self.shared.sleeping.store(true, Ordering::SeqCst);
            let surplus = {
                let mut st = self.state.borrow_mut(py)?;
                if !st.ready.is_empty() {
                    timeout = Some(0.0);
                }
                if st.pool.len() <= POOL_MAX_IDLE {
                    st.pool_surplus_since = None;
                    Vec::new()
                } else {
                    let now = monotonic();
                    match st.pool_surplus_since {
                        Some(since) if now - since >= POOL_SURPLUS_AGE => {
                            st.pool_surplus_since = None;
                            st.pool.split_off(POOL_MAX_IDLE)
                        }
                        Some(_) => Vec::new(),
                        None => {
                            st.pool_surplus_since = Some(now);
                            Vec::new()
                        }
                    }
                }
            };
            drop(surplus); // outside the borrow
            let poller = &self.shared.poller;
            let d = timeout.map(Duration::from_secs_f64);
            let r = py.detach(|| poller.wait(d, &mut buf, events));
            self.shared.sleeping.store(false, Ordering::SeqCst);
            r
        };
        *self.event_buf.borrow_mut(py)? = Some(buf);
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                // A signal interrupted the sleep: let Python run its handler now (Ctrl+C raises
                // KeyboardInterrupt here and leaves run_forever).
                // SAFETY: called with the GIL held, as PyErr_CheckSignals requires.
                if unsafe { ffi::PyErr_CheckSignals() } != 0 {
                    return Err(PyErr::fetch(py));
                }
                Ok(())
            }
            Err(e) => Err(os_error(e)),
        }
    }

    fn process_events(&self, py: Python<'_>, events: &[Event]) -> PyResult<()> {
        let mut stale = Vec::new();
        let mut stale_tokens = Vec::new();
        let renew = {
            let mut st = self.state.borrow_mut(py)?;
            let st = &mut *st;
            for ev in events {
                if ev.token == WAKER_TOKEN {
                    self.shared.waker.drain();
                    continue;
                }
                let (fd, generation) = io_watch::untoken(ev.token);
                let w = match st.fds.get_mut(&fd) {
                    Some(w) if w.generation == generation => w,
                    _ => {
                        // A registration left by a closing transport, or one of a file this
                        // number referred to before (see `io_watch.rs`): no watcher's.
                        stale_tokens.push(ev.token);
                        continue;
                    }
                };
                let mut queued = false;
                if ev.hangup && w.reader_edge {
                    if ev.eof && w.native_reader.is_some() {
                        // EOF or an error may outlast the reader's next read, and the fd stays
                        // readable: the reader is queued on every iteration from now on
                        // (`requeue_hung_up`), as level-triggering would have it. (Once
                        // flagged, that is what queues it: not its events too.)
                        queued = w.hup;
                        if !w.hup {
                            w.hup = true;
                            st.hup_next.push(fd);
                        }
                    } else {
                        // Urgent data may outlast the reader's next read (and a Python reader
                        // is not known to finish at EOF): from now on the kernel reports the
                        // fd for as long as it is readable.
                        self.level_trigger(fd, w).map_err(os_error)?;
                    }
                }
                if ev.readable && !queued {
                    if let Some(h) = &w.reader {
                        if h.get().is_cancelled() {
                            stale.push((fd, true));
                        } else if let Some(n) = w.native_reader {
                            st.ready.push_back(Ready::Reader(h.clone_ref(py), n));
                        } else {
                            st.ready.push_back(Ready::Handle(h.clone_ref(py)));
                        }
                    }
                }
                if ev.writable {
                    if let Some(h) = &w.writer {
                        if h.get().is_cancelled() {
                            stale.push((fd, false));
                        } else {
                            st.ready.push_back(Ready::Handle(h.clone_ref(py)));
                        }
                    }
                }
            }
            !(stale_tokens.is_empty() && st.stale_tokens.is_empty())
                && io_watch::stale_again(st, stale_tokens)
        };
        if renew {
            self.renew_poller(py)?;
        }
        // A watcher whose handle was cancelled directly is unregistered, as asyncio does.
        for (fd, reader) in stale {
            drop(self.remove_watch(py, fd, reader)?);
        }
        Ok(())
    }

    /// Queues again the native readers of hung-up fds (`FdWatch::hup`) that are still
    /// registered: once per iteration, as a level-triggered fd that stays readable is
    /// reported. A reader at EOF removes itself (the transport closes or half-closes).
    fn requeue_hung_up(&self, py: Python<'_>, mut fds: Vec<RawFd>) -> PyResult<()> {
        if fds.capacity() == 0 {
            return Ok(());
        }
        let mut st = self.state.borrow_mut(py)?;
        let st = &mut *st;
        for &fd in &fds {
            let Some(w) = st.fds.get(&fd) else {
                continue;
            };
            if !w.hup || !w.reader_edge {
                continue;
            }
            if let (Some(h), Some(n)) = (&w.reader, w.native_reader) {
                if !h.get().is_cancelled() {
                    st.ready.push_back(Ready::Reader(h.clone_ref(py), n));
                    st.hup_next.push(fd);
                }
            }
        }
        // Its allocation serves again (a connection hanging up once would otherwise allocate
        // and free this list).
        fds.clear();
        st.hup_spare = fds;
        Ok(())
    }

    fn collect_due_timers(&self, loop_obj: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = loop_obj.py();
        if self.state.borrow_mut(py)?.timers.is_empty() {
            return Ok(());
        }
        let end_time = self.now(loop_obj)? + self.clock_resolution;
        let mut st = self.state.borrow_mut(py)?;
        let st = &mut *st;
        while let Some(t) = st.timers.pop_due(end_time) {
            t.get().scheduled.store(false, Ordering::Relaxed);
            let h: Py<Handle> = t.into_bound(py).into_super().unbind();
            st.ready.push_back(Ready::Handle(h));
        }
        Ok(())
    }

    pub(crate) fn run_once(&self, loop_obj: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = loop_obj.py();
        self.purge_timers(py)?;
        // The event list is reused from one iteration to the next (no allocation per poll).
        let mut events = EVENTS.with(|e| e.take());
        events.clear();
        // The hung-up readers queued again this iteration: those pending before this poll
        // (one hung up by an event of this poll was queued by it).
        let hung_up = {
            let mut st = self.state.borrow_mut(py)?;
            let spare = std::mem::take(&mut st.hup_spare);
            std::mem::replace(&mut st.hup_next, spare)
        };
        let polled = self
            .poll(loop_obj, &mut events, !hung_up.is_empty())
            .and_then(|()| {
                if events.is_empty() {
                    Ok(())
                } else {
                    self.process_events(py, &events)
                }
            });
        EVENTS.with(|e| e.set(events));
        polled?;
        self.requeue_hung_up(py, hung_up)?;
        self.collect_due_timers(loop_obj)?;

        let ntodo = self.state.borrow_mut(py)?.ready.len();
        let debug = self.shared.debug();
        for _ in 0..ntodo {
            let Some(r) = self.state.borrow_mut(py)?.ready.pop_front() else {
                break;
            };
            let h = match r {
                Ready::Handle(h) => h.into_bound(py),
                Ready::TaskStep {
                    func,
                    args,
                    context,
                } => {
                    self.run_task_step(func, args, context, loop_obj)?;
                    continue;
                }
                Ready::Soon { func, args, ticket } => {
                    let mark = self.shared.leave_soon(py, ticket)?;
                    self.run_soon(func, args, Some(ticket), mark, loop_obj)?;
                    self.release_soon_handle(py, ticket)?;
                    continue;
                }
                Ready::Internal { func, args } => {
                    self.run_soon(func, args, None, None, loop_obj)?;
                    continue;
                }
                Ready::Reader(h, reader) => {
                    // A watcher: never recycled. Debug mode times it as a handle.
                    let h = h.into_bound(py);
                    if !h.get().is_cancelled() {
                        if debug {
                            self.run_timed(&h, loop_obj)?;
                        } else {
                            Handle::run_native_reader(&h, reader, loop_obj)?;
                        }
                    }
                    continue;
                }
            };
            if !h.get().is_cancelled() {
                if debug {
                    self.run_timed(&h, loop_obj)?;
                } else {
                    Handle::run(&h, loop_obj)?;
                }
            }
            self.recycle(h)?;
        }
        Ok(())
    }

    /// Runs a C Task step queued without a Handle, as `Handle::run` would: in its context, a
    /// raised exception to the exception handler (with a Handle made for the report), SystemExit
    /// and KeyboardInterrupt out of the loop.
    fn run_task_step(
        &self,
        func: Py<PyAny>,
        args: crate::handles::Args,
        context: Py<PyAny>,
        loop_obj: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let py = loop_obj.py();
        // SAFETY: `context`, `func` and `args` are owned references alive for the block.
        let result = unsafe {
            crate::context::run_in(py, context.as_ptr(), || {
                Bound::from_owned_ptr_or_err(py, args.call(func.as_ptr())).map(drop)
            })
        };
        // Untracked while queued (see `push_task_step`): if something besides us still holds
        // it, the collector must see it again before we let go.
        // SAFETY: reading the reference count of a live object we own a reference to.
        if unsafe { ffi::Py_REFCNT(func.as_ptr()) } > 1 {
            crate::handles::track(func.bind(py));
        }
        match result {
            Ok(()) => Ok(()),
            Err(err) if crate::stdlib::is_exit_exception(py, &err) => Err(err),
            Err(err) => {
                let fb = func.bind(py);
                crate::handles::track(fb);
                let args_tuple = args.to_tuple(py)?;
                let handle = Py::new(py, self.new_handle(py, fb, args, Some(context.bind(py)))?)?;
                crate::handles::report_callback_error(
                    handle.bind(py).as_any(),
                    &func,
                    &args_tuple,
                    err,
                    loop_obj,
                )
            }
        }
    }

    /// Runs a `Ready::Soon` entry as its handle's `run` would: skipped if the handle was
    /// cancelled, in the context the handle gave out or else in the shared empty context, a
    /// raised exception to the exception handler (with a handle made for the report),
    /// SystemExit and KeyboardInterrupt out of the loop. A `Ready::Internal` entry (no
    /// `ticket`: it has no handle) runs the same way.
    fn run_soon(
        &self,
        func: Py<PyAny>,
        args: crate::handles::Args,
        ticket: Option<u64>,
        mark: Option<super::SoonMark>,
        loop_obj: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let py = loop_obj.py();
        let given = match mark {
            Some(m) if m.cancelled => return Ok(()),
            Some(m) => m.context,
            None => None,
        };
        // Bound: dropping them is a plain decref.
        let (context, shared) = match given {
            Some(c) => (c.into_bound(py), None),
            None => {
                let (c, shared) = self.shared.enter_empty_context(py)?;
                (c.into_bound(py), Some(shared))
            }
        };
        // SAFETY: `context`, `func` and `args` are owned references alive for the block.
        let result = unsafe {
            crate::context::run_in(py, context.as_ptr(), || {
                Bound::from_owned_ptr_or_err(py, args.call(func.as_ptr())).map(drop)
            })
        };
        if let Some(shared) = shared {
            // A callback that set a variable in the shared empty context makes it its own.
            // SAFETY: a live, exact Context (made by PyContext_New).
            let set_var = unsafe { crate::context::len(context.as_ptr()) } != 0;
            self.shared.leave_empty_context(py, shared, set_var)?;
        }
        match result {
            Ok(()) => {
                args.release(py);
                drop(func.into_bound(py));
                Ok(())
            }
            Err(err) if crate::stdlib::is_exit_exception(py, &err) => Err(err),
            Err(err) => {
                let fb = func.bind(py);
                let args_tuple = args.to_tuple(py)?;
                // The handle returned for it if the loop still has it, else one made for the
                // report.
                let returned = match ticket {
                    Some(ticket) => self
                        .state
                        .borrow_mut(py)?
                        .soon_handle
                        .as_ref()
                        .filter(|h| h.get().soon_ticket() == ticket)
                        .map(|h| h.clone_ref(py)),
                    None => None,
                };
                let handle = match returned {
                    Some(h) => h,
                    None => Py::new(py, self.new_handle(py, fb, args, Some(&context))?)?,
                };
                crate::handles::report_callback_error(
                    handle.bind(py).as_any(),
                    &func,
                    &args_tuple,
                    err,
                    loop_obj,
                )
            }
        }
    }

    /// The entry of the loop's reusable `soon` handle ran and nothing else references the
    /// handle: it lets go of the callback and arguments now, not at its next reuse.
    #[inline(always)]
    fn release_soon_handle(&self, py: Python<'_>, ticket: u64) -> PyResult<()> {
        let spent = {
            let st = self.state.borrow_mut(py)?;
            match &st.soon_handle {
                Some(h) if h.get().soon_ticket() == ticket && only_ours(h) => {
                    h.get().take_callback(py)
                }
                _ => None,
            }
        };
        // Outside the borrow: may run __del__ code.
        if let Some(c) = spent {
            drop(c.func.into_bound(py));
            c.args.release(py);
        }
        Ok(())
    }

    /// Before each poll and when the loop stops: the reusable `soon` handle lets go of the
    /// callback of an entry that ran while its caller still held it, if the caller let go since.
    fn release_spent_soon_handle(&self, py: Python<'_>) -> PyResult<()> {
        let spent = {
            let st = self.state.borrow_mut(py)?;
            match &st.soon_handle {
                Some(h) if only_ours(h) && !self.shared.soon_pending(h.get().soon_ticket()) => {
                    h.get().take_callback(py)
                }
                _ => None,
            }
        };
        // Outside the borrow: may run __del__ code.
        drop(spent);
        Ok(())
    }

    /// Keeps a spent handle for reuse when nothing else can see it.
    fn recycle(&self, h: Bound<'_, Handle>) -> PyResult<()> {
        if !Handle::recyclable(&h) {
            return Ok(());
        }
        let py = h.py();
        let held = h.get().empty_for_reuse(py)?;
        {
            let mut st = self.state.borrow_mut(py)?;
            if st.pool.len() < POOL_MAX_BURST && !st.closed {
                st.pool.push(h.unbind());
            }
        }
        // The callback and context may run __del__ code: outside the borrow. (A handle that
        // ran gave up its callback already: checked here, without a call to the drop glue.)
        let (cb, ctx) = held;
        if let Some(cb) = cb {
            drop(cb);
        }
        if let Some(ctx) = ctx {
            drop(ctx);
        }
        Ok(())
    }

    /// Debug mode: warn about callbacks slower than `loop.slow_callback_duration`.
    fn run_timed(&self, h: &Bound<'_, Handle>, loop_obj: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = h.py();
        self.state.borrow_mut(py)?.current_handle = Some(h.clone().unbind());
        let t0 = monotonic();
        let r = Handle::run(h, loop_obj);
        let dt = monotonic() - t0;
        let prev = self.state.borrow_mut(py)?.current_handle.take();
        drop(prev);
        let limit: f64 = loop_obj
            .getattr(intern!(py, "slow_callback_duration"))
            .and_then(|v| v.extract())
            .unwrap_or(0.1);
        if dt >= limit {
            support(py)?.call_method1(intern!(py, "warn_slow_callback"), (h, dt))?;
        }
        r
    }
}

impl LoopCore {
    /// Runs one iteration (asyncio's `_run_once`); exposed for tests and debugging.
    pub(crate) fn _run_once_impl(slf: &Bound<'_, Self>) -> PyResult<()> {
        slf.get().run_once(slf.as_any())
    }

    /// asyncio's `_check_running`.
    pub(crate) fn _check_running_impl(&self, py: Python<'_>) -> PyResult<()> {
        if self.state.borrow_mut(py)?.thread_id.is_some() {
            return Err(PyRuntimeError::new_err(
                "This event loop is already running",
            ));
        }
        if !stdlib(py)?.get_running_loop(py)?.is_none() {
            return Err(PyRuntimeError::new_err(
                "Cannot run the event loop while another loop is running",
            ));
        }
        Ok(())
    }

    /// The core of `run_forever`: marks the loop running in this thread, iterates until
    /// `stop()`, and always leaves the loop stopped and usable, even when a callback raised
    /// KeyboardInterrupt or SystemExit through it.
    pub(crate) fn _run_forever_native_impl(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        this.check_closed(py)?;
        this._check_running_impl(py)?;
        let s = stdlib(py)?;
        this.state.borrow_mut(py)?.thread_id = Some(current_thread_id());
        // A Rust panic must not skip the cleanup below (the loop would stay "running"
        // forever); it is caught here and re-raised as PanicException after it.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.set_running_loop(py, slf.as_any()).and_then(|_| loop {
                this.run_once(slf.as_any())?;
                if this.state.borrow_mut(py)?.stopping {
                    break Ok(());
                }
            })
        }))
        .unwrap_or_else(|payload| {
            Err(super::fastcall::panic_error(
                payload,
                "Rust panic in the event loop",
            ))
        });
        let released = this.release_spent_soon_handle(py);
        let surplus = {
            let mut st = this.state.borrow_mut(py)?;
            st.stopping = false;
            st.thread_id = None;
            // Callbacks and timers still pending once the loop stops are shown to the garbage
            // collector again (they are hidden from it for speed): a loop dropped unclosed with
            // a pending callback that refers back to it (`o.loop = loop; o.t =
            // loop.call_later(60, o.tick)`) is then collectable, as asyncio's is.
            for r in st.ready.iter() {
                match r {
                    Ready::Handle(h) | Ready::Reader(h, _) => {
                        crate::handles::track(h.bind(py).as_any())
                    }
                    Ready::TaskStep { func, .. } => crate::handles::track(func.bind(py)),
                    Ready::Soon { .. } | Ready::Internal { .. } => {}
                }
            }
            for t in st.timers.iter() {
                crate::handles::track(t.bind(py).as_any());
            }
            // A stopped loop does not keep a past burst's spare handles.
            st.pool_surplus_since = None;
            if st.pool.len() > POOL_MAX_IDLE {
                st.pool.split_off(POOL_MAX_IDLE)
            } else {
                Vec::new()
            }
        };
        drop(surplus); // outside the borrow
        let reset = s.set_running_loop(py, &py.None().into_bound(py));
        result.and(released).and(reset)
    }
}
