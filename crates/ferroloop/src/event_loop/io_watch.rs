//! `add_reader`/`add_writer`: user watchers on file descriptors, level-triggered like
//! `selectors` (a reader whose data is not consumed runs again on the next iteration).
//!
//! The native TCP transport's reader is the exception (`_add_reader_edge`): it reads all that
//! is there on each event (a read that fills the whole buffer calls `_rearm_reader`), so while
//! it is the fd's only watcher the kernel reports readability edge-triggered. A
//! level-triggered fd is re-checked by the kernel on every wait after it was reported: a
//! socket poll per ready connection per loop iteration, about 4% of a 1 KiB TCP echo.
//! A read that returns data can leave a pending EOF or the data behind an urgent mark, and no
//! new edge would announce them. So once the fd reports EOF, a hang-up or an error
//! (`Event::eof`), which it keeps reporting until the reader removes itself, the native reader
//! is queued on every iteration by the loop itself (`FdWatch::hup`, `run.rs`), as a
//! level-triggered registration would have it, without a syscall to make it one (one per
//! closed connection); urgent data alone, or a Python reader, drops edge-triggering for good
//! (`Event::hangup`). While a writer is also
//! registered (a transport with queued writes) the registration is level-triggered, so the
//! writer keeps `selectors`' semantics.
//!
//! A registration's epoll token is its fd number and a generation (`FdWatch::generation`),
//! new with each registration the kernel makes (a new table entry, or a number whose old file
//! the kernel forgot): a registration can outlive its fd number (the file is closed while a
//! `dup` or a forked child holds it, see `reactor`), and its events must not reach whatever
//! is watched on that number next. Events of another generation are dropped. Nothing can
//! unregister such a registration but closing the epoll instance: when one keeps reporting
//! (level-triggered, left by a user who closed a shared fd without removing its watcher, its
//! file ready: every poll would return at once), the loop moves its watches to a new instance
//! (`renew_poller`).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use ferroloop_core::Interest;
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::{FdWatch, LoopCore, State, WAKER_TOKEN};
use crate::errors::os_error;
use crate::handles::{Args, Handle};

/// `selectors._fileobj_to_fd`: an int, or an object whose `fileno()` returns one. Numbers
/// beyond a C int are returned as they are: `add_*` reports them as OverflowError, `remove_*`
/// simply finds nothing, as with `selectors`.
pub(crate) fn fileobj_to_fd(obj: &Bound<'_, PyAny>) -> PyResult<i64> {
    let py = obj.py();
    let fd: i64 = if obj.is_instance_of::<pyo3::types::PyInt>() {
        obj.extract::<i64>().unwrap_or(i64::MAX)
    } else {
        // Only "this has no usable fileno()" becomes ValueError; anything else fileno() raises
        // (an OSError from a closed socket, say) propagates, as in `selectors`.
        let invalid = |e: PyErr| -> PyErr {
            let py = obj.py();
            if e.is_instance_of::<pyo3::exceptions::PyAttributeError>(py)
                || e.is_instance_of::<pyo3::exceptions::PyTypeError>(py)
                || e.is_instance_of::<PyValueError>(py)
            {
                PyValueError::new_err(format!(
                    "Invalid file object: {}",
                    obj.repr().map(|r| r.to_string()).unwrap_or_default()
                ))
            } else {
                e
            }
        };
        obj.call_method0(intern!(py, "fileno"))
            .and_then(|f| {
                f.call_method0(intern!(py, "__index__"))
                    .or_else(|_| f.call_method0(intern!(py, "__int__")))
            })
            .map(|f| f.extract::<i64>().unwrap_or(i64::MAX))
            .map_err(invalid)?
    };
    if fd < 0 {
        return Err(PyValueError::new_err(format!(
            "Invalid file descriptor: {fd}"
        )));
    }
    Ok(fd)
}

/// The fd table's hasher. Keys are small distinct ints chosen by the kernel, not by a peer,
/// so SipHash's flood resistance buys nothing; this is looked up once per I/O event.
pub(crate) type FdHash = std::hash::BuildHasherDefault<FdHasher>;

#[derive(Default)]
pub(crate) struct FdHasher(u64);

impl std::hash::Hasher for FdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_i32(&mut self, fd: i32) {
        // A multiplicative spread: hashbrown takes its control bits from the top of the hash.
        self.0 = (fd as u32 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// The process has forked (`fork()` returned in the parent) since the first loop was made: a
/// child may hold copies of the loop's sockets, so closing transports unregister their fds
/// explicitly again (see [`LoopCore::remove_reader_closing`]).
static FORKED: AtomicBool = AtomicBool::new(false);

extern "C" fn forked_in_parent() {
    FORKED.store(true, Ordering::Relaxed);
}

/// Installs the `fork()` hook that sets [`FORKED`] (once per process).
pub(crate) fn watch_forks() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: registers a handler that only stores to an atomic (async-signal-safe), with
        // no prepare or child handler. If registration fails (ENOMEM), assume a fork.
        if unsafe { libc::pthread_atfork(None, Some(forked_in_parent), None) } != 0 {
            FORKED.store(true, Ordering::Relaxed);
        }
    });
}

/// Polls in a row that return again a token dropped as stale by the one before, after which
/// the epoll instance is renewed. An edge-triggered registration left behind reports each
/// change of its file once: it is gone after a few polls, or reports a peer that keeps sending
/// (until its socket buffer fills). A level-triggered one reports on every poll.
const STALE_POLLS_BEFORE_RENEW: u32 = 16;

/// Records the tokens the last poll dropped as stale (`run.rs`); true when the epoll instance
/// should be renewed (see `STALE_POLLS_BEFORE_RENEW`).
pub(crate) fn stale_again(st: &mut State, tokens: Vec<u64>) -> bool {
    let again = tokens.iter().any(|t| st.stale_tokens.contains(t));
    st.stale_polls = if again { st.stale_polls + 1 } else { 0 };
    st.stale_tokens = tokens;
    st.stale_polls >= STALE_POLLS_BEFORE_RENEW
}

fn interest_of(w: &FdWatch) -> Interest {
    Interest {
        readable: w.reader.is_some(),
        writable: w.writer.is_some(),
    }
}

/// The epoll token of `fd`'s registration of generation `generation`.
fn token(fd: RawFd, generation: u32) -> u64 {
    (generation as u64) << 32 | fd as u32 as u64
}

/// The fd number and generation of an event's token (the waker's token aside).
pub(crate) fn untoken(token: u64) -> (RawFd, u32) {
    (token as u32 as RawFd, (token >> 32) as u32)
}

impl LoopCore {
    /// Tells the kernel what `w` watches `fd` for: see the module comment. A new
    /// registration (`existed` false, or the kernel forgot the fd) gets a new generation.
    fn register(&self, fd: RawFd, w: &mut FdWatch, existed: bool) -> std::io::Result<()> {
        let poller = &self.shared.poller;
        let edge = w.reader_edge && w.reader.is_some() && w.writer.is_none();
        if existed {
            let token = token(fd, w.generation);
            let r = if edge {
                poller.modify_read_edge(fd, token)
            } else {
                poller.modify(fd, interest_of(w), token)
            };
            match r {
                // The fd was closed under its watchers and the number reused: the old file
                // may still be registered (a dup holds it), so the new one needs a token
                // of its own.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                r => return r,
            }
        }
        w.generation = self
            .generation
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        let token = token(fd, w.generation);
        if edge {
            poller.add_read_edge(fd, token)
        } else {
            poller.add(fd, interest_of(w), token)
        }
    }

    /// Moves every watch to a new epoll instance, leaving behind the registrations that
    /// outlived their fds: a level-triggered one whose file stays ready would have every poll
    /// return at once (a `dup` of an fd the user closed under its watcher, say).
    pub(crate) fn renew_poller(&self, py: Python<'_>) -> PyResult<()> {
        let mut st = self.state.borrow_mut(py)?;
        let st = &mut *st;
        st.stale_polls = 0;
        st.stale_tokens.clear();
        let poller = &self.shared.poller;
        if poller.renew().is_err() {
            return Ok(()); // no fd for a new instance (EMFILE): keep the old one
        }
        let waker = Interest {
            readable: true,
            writable: false,
        };
        poller
            .add(self.shared.waker.as_raw_fd(), waker, WAKER_TOKEN)
            .map_err(os_error)?;
        for (&fd, w) in st.fds.iter_mut() {
            // An fd closed under its watchers fails (EBADF): the kernel had dropped it from
            // the old instance too, and the table keeps it as it did.
            let _ = self.register(fd, w, false);
        }
        Ok(())
    }

    /// Watches `w`'s reader level-triggered from now on (see `run.rs`, `process_events`).
    pub(crate) fn level_trigger(&self, fd: RawFd, w: &mut FdWatch) -> std::io::Result<()> {
        w.reader_edge = false;
        self.register(fd, w, true)
    }

    /// `_rearm_reader`: an edge-triggered reader stopped before the fd was drained.
    pub(crate) fn rearm_reader(&self, py: Python<'_>, fd: RawFd) -> PyResult<()> {
        let mut st = self.state.borrow_mut(py)?;
        match st.fds.get_mut(&fd) {
            Some(w) if w.reader_edge && w.reader.is_some() && w.writer.is_none() => {
                self.register(fd, w, true).map_err(os_error)
            }
            _ => Ok(()),
        }
    }

    fn add_watch(
        &self,
        py: Python<'_>,
        fileobj: &Bound<'_, PyAny>,
        reader: bool,
        edge: bool,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        self.add_watch_args(py, fileobj, reader, edge, callback, || {
            let native = if reader {
                crate::transports::NativeReader::of(callback, args)
            } else {
                None
            };
            (Args::from_tuple(args), native)
        })
    }

    /// `add_watch` with the handle's arguments (and the native reader they make, if any)
    /// made by `args`, after the checks.
    fn add_watch_args(
        &self,
        py: Python<'_>,
        fileobj: &Bound<'_, PyAny>,
        reader: bool,
        edge: bool,
        callback: &Bound<'_, PyAny>,
        args: impl FnOnce() -> (Args, Option<crate::transports::NativeReader>),
    ) -> PyResult<Py<Handle>> {
        self.check_closed(py)?;
        let fd: RawFd = fileobj_to_fd(fileobj)?.try_into().map_err(|_| {
            pyo3::exceptions::PyOverflowError::new_err("signed integer is greater than maximum")
        })?;
        let (args, native) = args();
        let mut h = self.new_handle(py, callback, args, None)?;
        h.one_shot = false;
        // A watcher runs on every event for as long as it is registered: its context is shown
        // to the collector from the start (one object per watched fd), so no run has to check
        // whether the callback set a variable in it (see `Handle::call_in_context`).
        h.retrack_context(py);
        // Nor does it share the loop's empty context (see `Handle::call_in_empty_context`).
        h.make_own_context(py)?;
        let handle = Py::new(py, h)?;
        let old = {
            let mut st = self.state.borrow_mut(py)?;
            let existed = st.fds.contains_key(&fd);
            let mut w = st.fds.remove(&fd).unwrap_or_default();
            let slot = if reader { &mut w.reader } else { &mut w.writer };
            let old = slot.replace(handle.clone_ref(py));
            let old_fileobj = w.fileobj.replace(fileobj.clone().unbind());
            let old_edge = w.reader_edge;
            let old_native = w.native_reader;
            let old_hup = w.hup;
            let old_generation = w.generation;
            if reader {
                w.reader_edge = edge;
                w.native_reader = native;
                // A new reader: the kernel reports a hang-up again (a registration reports
                // the fd's current state).
                w.hup = false;
            }
            let r = self.register(fd, &mut w, existed);
            match r {
                Ok(()) => {
                    st.fds.insert(fd, w);
                    drop(st);
                    drop(old_fileobj);
                    old
                }
                Err(e) => {
                    // Registration failed: leave the table as it was.
                    let slot = if reader { &mut w.reader } else { &mut w.writer };
                    let new = std::mem::replace(slot, old);
                    let new_fileobj = std::mem::replace(&mut w.fileobj, old_fileobj);
                    w.reader_edge = old_edge;
                    w.native_reader = old_native;
                    w.hup = old_hup;
                    w.generation = old_generation;
                    if existed {
                        st.fds.insert(fd, w);
                    }
                    drop(st);
                    drop(new);
                    drop(new_fileobj);
                    return Err(os_error(e));
                }
            }
        };
        if let Some(old) = old {
            Handle::cancel_impl(old.bind(py).as_any(), old.get())?;
        }
        Ok(handle)
    }

    /// Removes one side of a watcher; returns the removed handle (to be dropped by the caller
    /// outside any borrow).
    pub(crate) fn remove_watch(
        &self,
        py: Python<'_>,
        fd: RawFd,
        reader: bool,
    ) -> PyResult<Option<Py<Handle>>> {
        self.remove_watch_as(py, fd, reader, false)
    }

    /// `remove_watch`; with `closing`, the native transport that owns `fd` is closing or
    /// half-closing (see [`LoopCore::remove_reader_closing`]).
    fn remove_watch_as(
        &self,
        py: Python<'_>,
        fd: RawFd,
        reader: bool,
        closing: bool,
    ) -> PyResult<Option<Py<Handle>>> {
        let mut st = self.state.borrow_mut(py)?;
        let Some(w) = st.fds.get_mut(&fd) else {
            return Ok(None);
        };
        // An edge-triggered reader alone on its fd, removed by its closing transport: the
        // kernel registration may stay (see `remove_reader_closing`).
        let keep_registered = closing
            && reader
            && w.reader_edge
            && w.writer.is_none()
            && !FORKED.load(Ordering::Relaxed);
        let old = if reader {
            w.reader_edge = false;
            w.native_reader = None;
            w.hup = false;
            w.reader.take()
        } else {
            w.writer.take()
        };
        if old.is_none() {
            return Ok(None);
        }
        let interest = interest_of(w);
        if interest.is_empty() {
            let gone = st.fds.remove(&fd);
            drop(st);
            drop(gone.and_then(|mut w| w.fileobj.take()));
            if !keep_registered {
                self.shared.poller.delete(fd).map_err(os_error)?;
            }
        } else if let Err(e) = self.register(fd, w, true) {
            // (An edge-triggered reader left alone again is re-registered, so it is reported
            // once if readable now.) The fd was closed under its watchers (EBADF/ENOENT):
            // forget it entirely, as `selectors` does when modify fails, and drop the handles
            // outside the borrow.
            let gone = st.fds.remove(&fd);
            drop(st);
            let _ = self.shared.poller.delete(fd);
            drop(old);
            drop(gone);
            return Err(os_error(e));
        }
        Ok(old)
    }

    fn remove_watch_public(
        &self,
        py: Python<'_>,
        fileobj: &Bound<'_, PyAny>,
        reader: bool,
    ) -> PyResult<bool> {
        if self.state.borrow_mut(py)?.closed {
            return Ok(false);
        }
        let fd = match fileobj_to_fd(fileobj) {
            Ok(fd) => fd,
            // A closed socket's fileno() is -1: find its registration by identity instead.
            Err(e) if e.is_instance_of::<PyValueError>(py) => {
                let st = self.state.borrow_mut(py)?;
                let found = st.fds.iter().find_map(|(fd, w)| {
                    w.fileobj
                        .as_ref()
                        .filter(|o| o.bind(py).is(fileobj))
                        .map(|_| *fd as i64)
                });
                match found {
                    Some(fd) => fd,
                    None => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let Ok(fd) = RawFd::try_from(fd) else {
            return Ok(false);
        };
        match self.remove_watch(py, fd, reader)? {
            Some(h) => {
                Handle::cancel_impl(h.bind(py).as_any(), h.get())?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl LoopCore {
    pub(crate) fn _add_reader_impl(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        self.add_watch(py, fd, true, false, callback, args)
    }

    pub(crate) fn _add_reader_edge_impl(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        self.add_watch(py, fd, true, true, callback, args)
    }

    /// `_add_reader_edge_impl` with one argument for the callback (a stream transport's
    /// `_read_ready, tr`), without an argument tuple.
    pub(crate) fn add_reader_edge_one(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        arg: &Bound<'_, PyAny>,
    ) -> PyResult<Py<Handle>> {
        self.add_watch_args(py, fd, true, true, callback, || {
            let native = crate::transports::NativeReader::of_args(callback, 1, Some(arg));
            (Args::One(arg.clone().unbind()), native)
        })
    }

    pub(crate) fn _add_writer_impl(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        self.add_watch(py, fd, false, false, callback, args)
    }

    pub(crate) fn _remove_reader_impl(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        self.remove_watch_public(py, fd, true)
    }

    /// `_remove_reader(fd)` for a native stream transport that is closing, or half-closing
    /// at EOF (`close`, `_force_close`, `eof_received` keeping it open): its socket is closed
    /// when connection_lost runs, a few iterations later, and it reads nothing more.
    ///
    /// While its edge-triggered reader was the fd's only watcher, the kernel registration is
    /// left in place instead of an `EPOLL_CTL_DEL` (one syscall less per connection): closing
    /// the last fd of an open file removes it from every epoll set. Until then the fd is out of
    /// the table, so its events are ignored; edge-triggered, a socket past EOF reports one more
    /// at most (a reset). Re-watching it meanwhile (a writer for queued data after a half-close)
    /// registers it again: `EPOLL_CTL_ADD` finds it and turns into a modification.
    ///
    /// A socket whose open file outlives its fd (a `dup`, a forked child holding it) stays
    /// registered until the copy closes, and its changes keep coming, edge-triggered, under
    /// its old token: the fd number it had, and the generation of that registration. The
    /// number may be watched again by then, but under a new generation, so those events are
    /// dropped (`run.rs`) rather than taken for the new watcher's (a hang-up taken so had a new
    /// connection's reader queued on every iteration). The usual source of such copies,
    /// `fork()` without exec, turns this off for the process's life (`FORKED`), so that no
    /// such registrations pile up; a child that execs drops them (accepted sockets are
    /// close-on-exec).
    pub(crate) fn remove_reader_closing(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let fd = match fd.extract::<RawFd>() {
            Ok(fd) if !self.state.borrow_mut(py)?.closed => fd,
            _ => return self.remove_watch_public(py, fd, true),
        };
        match self.remove_watch_as(py, fd, true, true)? {
            Some(h) => {
                Handle::cancel_impl(h.bind(py).as_any(), h.get())?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    pub(crate) fn _remove_writer_impl(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        self.remove_watch_public(py, fd, false)
    }
}
