//! Native fast paths of the socket stream transport (`python/ferroloop/_net/transports.py`).
//!
//! The transport's state lives in its Python slots; these functions read the few they need
//! (directly, at offsets resolved once per class: `slots.rs`) and do the per-event work
//! natively: `_read_ready` reads a message (`sock_io::read_stream`) and calls
//! `protocol.data_received` (or, for a `BufferedProtocol`, receives straight into
//! `get_buffer()`'s buffer and calls `buffer_updated`), `write` sends a bytes object at once
//! when nothing is queued. Any other case (a queued write, a closed or half-closed transport,
//! a non-bytes argument) goes to the Python methods, which remain the reference behaviour.
//!
//! They are installed as method descriptors of the Python class, so they bind to its
//! instances like ordinary methods (and a stray `self` gets CPython's TypeError).

use std::ffi::CStr;

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple, PyType};
use pyo3::{ffi, intern};

use crate::event_loop::fastcall::trampoline;
use crate::slots::{small_int, truthy, SlotReader, SlotTable};
use crate::sock_io::ReadError;
use crate::stdlib::is_exit_exception;
use crate::streams::Feed;

/// Routes an exception from a transport operation like the Python code does: SystemExit and
/// KeyboardInterrupt propagate, anything else goes to `_fatal_error(exc, message)`.
pub(crate) fn fatal(tr: &Bound<'_, PyAny>, err: PyErr, message: &str) -> PyResult<()> {
    let py = tr.py();
    if is_exit_exception(py, &err) {
        return Err(err);
    }
    let exc = err.into_value(py).into_bound(py);
    if crate::stream_life::fatal_routine(tr, exc.as_any())? {
        return Ok(());
    }
    tr.call_method1(intern!(py, "_fatal_error"), (exc, message))?;
    Ok(())
}

/// The stream transport's slots the fast paths read (see `slots.rs`).
static SLOTS: SlotTable<8> = SlotTable::new([
    "_buffered",
    "_conn_lost",
    "_sock_fd",
    "_protocol",
    "_buffer",
    "_eof",
    "_empty_waiter",
    "_closing",
]);
const BUFFERED: usize = 0;
const CONN_LOST: usize = 1;
const SOCK_FD: usize = 2;
const PROTOCOL: usize = 3;
const BUFFER: usize = 4;
const EOF: usize = 5;
const EMPTY_WAITER: usize = 6;
const CLOSING: usize = 7;

fn read_ready(tr: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = tr.py();
    let s = SLOTS.reader(tr);
    if !s.is_plainly_false(CONN_LOST) && truthy(&s.get(CONN_LOST)?)? {
        return Ok(());
    }
    if !s.is_plainly_false(BUFFERED) && truthy(&s.get(BUFFERED)?)? {
        return read_ready_buffered(tr, &s);
    }
    let fd = small_int(&s.get(SOCK_FD)?)?;
    let protocol = s.get(PROTOCOL)?;
    if let Some(feed) = Feed::of(&protocol) {
        return read_ready_stream_reader(tr, fd, feed);
    }
    let data = match crate::sock_io::read_stream(py, fd) {
        Ok(d) => d,
        Err(e) => return read_error(tr, e),
    };
    if !after_read(tr, fd, data.as_bytes().len())? {
        return Ok(());
    }
    let r = protocol.call_method1(intern!(py, "data_received"), (&data,));
    crate::sock_io::recycle(data);
    match r {
        Ok(_) => Ok(()),
        Err(e) => fatal(tr, e, "Fatal error: protocol.data_received() call failed."),
    }
}

/// What both stream read paths do once `n` bytes were read, before delivering them: at EOF
/// (`n == 0`) run `_read_ready__on_eof` and return false (nothing to deliver); after a read
/// that filled all its room, have the reader reported again ([`rearm`]).
#[inline(always)]
fn after_read(tr: &Bound<'_, PyAny>, fd: i32, n: usize) -> PyResult<bool> {
    if n == 0 {
        crate::stream_life::on_eof(tr)?;
        return Ok(false);
    }
    if n == crate::sock_io::MAX_READ {
        rearm(tr, fd)?;
    }
    Ok(true)
}

/// A failed read: nothing to do on EAGAIN/EINTR (wait for the next readiness event), else the
/// transport's fatal error.
fn read_error(tr: &Bound<'_, PyAny>, err: ReadError) -> PyResult<()> {
    match err {
        ReadError::Os(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) => {
            Ok(())
        }
        ReadError::Os(e) => fatal(
            tr,
            crate::errors::os_error(e),
            "Fatal read error on socket transport",
        ),
        ReadError::Py(e) => fatal(tr, e, "Fatal read error on socket transport"),
    }
}

/// `_read_ready__data_received` for a stdlib `StreamReaderProtocol` (`streams.rs`): the read
/// lands in the reader's buffer and `data_received`'s work is done here, its errors reported
/// as that call's.
fn read_ready_stream_reader(tr: &Bound<'_, PyAny>, fd: i32, feed: Feed<'_>) -> PyResult<()> {
    let n = match feed.read(fd) {
        Ok(n) => n,
        Err(e) => return read_error(tr, e),
    };
    if !after_read(tr, fd, n)? {
        return Ok(());
    }
    // Only `rearm` may have run code since the checks (a read or a resize runs none).
    match feed.fed(n == crate::sock_io::MAX_READ) {
        Ok(()) => Ok(()),
        Err(e) => fatal(tr, e, "Fatal error: protocol.data_received() call failed."),
    }
}

/// The read filled all the room it had, so the fd may hold more: the reader is watched
/// edge-triggered (`io_watch.rs`), so have the kernel report it again.
#[cold]
fn rearm(tr: &Bound<'_, PyAny>, fd: i32) -> PyResult<()> {
    let lp = tr.getattr(intern!(tr.py(), "_loop"))?;
    match lp.cast::<crate::event_loop::LoopCore>() {
        Ok(core) => core.get().rearm_reader(tr.py(), fd),
        Err(_) => Ok(()),
    }
}

/// `_read_ready__get_buffer` (a `BufferedProtocol`, such as the stdlib's TLS protocol): the
/// kernel writes straight into the protocol's buffer. Same steps, errors and messages as the
/// Python method.
fn read_ready_buffered(tr: &Bound<'_, PyAny>, s: &SlotReader<'_, '_, 8>) -> PyResult<()> {
    let py = tr.py();
    let protocol = s.get(PROTOCOL)?;
    let buf = protocol
        .call_method1(intern!(py, "get_buffer"), (-1,))
        .and_then(|buf| match buf.len()? {
            0 => Err(PyRuntimeError::new_err(
                "get_buffer() returned an empty buffer",
            )),
            _ => Ok(buf),
        });
    let buf = match buf {
        Ok(b) => b,
        Err(e) => return fatal(tr, e, "Fatal error: protocol.get_buffer() call failed."),
    };
    let (nbytes, room) = match recv_into(s, &buf) {
        Ok(r) => r,
        Err(RecvError::Again) => return Ok(()),
        Err(RecvError::Py(e)) => return fatal(tr, e, "Fatal read error on socket transport"),
    };
    if nbytes != 0 && nbytes == room {
        rearm(tr, small_int(&s.get(SOCK_FD)?)?)?;
    }
    drop(buf);
    if nbytes == 0 {
        crate::stream_life::on_eof(tr)?;
        return Ok(());
    }
    match protocol.call_method1(intern!(py, "buffer_updated"), (nbytes,)) {
        Ok(_) => Ok(()),
        Err(e) => fatal(tr, e, "Fatal error: protocol.buffer_updated() call failed."),
    }
}

enum RecvError {
    /// EAGAIN or EINTR: nothing to do until the next readiness event.
    Again,
    Py(PyErr),
}

/// `sock.recv_into(buf)`: one `recv` into a writable buffer of any kind. Returns the bytes
/// received and the room there was.
fn recv_into(
    s: &SlotReader<'_, '_, 8>,
    buf: &Bound<'_, PyAny>,
) -> Result<(usize, usize), RecvError> {
    let py = buf.py();
    let fd = small_int(&s.get(SOCK_FD).map_err(RecvError::Py)?).map_err(RecvError::Py)?;
    // SAFETY: an all-zero Py_buffer is a valid out-parameter for PyObject_GetBuffer.
    let mut view: ffi::Py_buffer = unsafe { std::mem::zeroed() };
    // SAFETY: `buf` is live; on success `view` holds a writable, contiguous region of
    // `view.len` bytes until PyBuffer_Release, which is called on every path below.
    if unsafe { ffi::PyObject_GetBuffer(buf.as_ptr(), &mut view, ffi::PyBUF_WRITABLE) } != 0 {
        // What socket.recv_into's argument parsing raises instead of the buffer error.
        drop(PyErr::fetch(py));
        let name = buf
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        return Err(RecvError::Py(PyTypeError::new_err(format!(
            "recv_into() argument 1 must be read-write bytes-like object, not {name}"
        ))));
    }
    let room = view.len as usize;
    // SAFETY: see above; recv writes at most `view.len` bytes.
    let r = unsafe { libc::recv(fd, view.buf, room, 0) };
    let err = std::io::Error::last_os_error();
    // SAFETY: `view` was filled by a successful PyObject_GetBuffer.
    unsafe { ffi::PyBuffer_Release(&mut view) };
    if r < 0 {
        return match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Err(RecvError::Again),
            _ => Err(RecvError::Py(crate::errors::os_error(err))),
        };
    }
    Ok((r as usize, room))
}

/// Nothing is queued, written after `write_eof`, in the way of a sendfile, or lost: a write
/// goes straight to the socket.
#[inline(always)]
fn idle(s: &SlotReader<'_, '_, 8>) -> PyResult<bool> {
    // The usual values, read in place.
    if s.is_plainly_false(BUFFER)
        && s.is_plainly_false(EOF)
        && s.is_plainly_none(EMPTY_WAITER)
        && s.is_plainly_false(CONN_LOST)
    {
        return Ok(true);
    }
    idle_slow(s)
}

#[cold]
#[inline(never)]
fn idle_slow(s: &SlotReader<'_, '_, 8>) -> PyResult<bool> {
    Ok(!truthy(&s.get(BUFFER)?)?
        && !truthy(&s.get(EOF)?)?
        && s.get(EMPTY_WAITER)?.is_none()
        && !truthy(&s.get(CONN_LOST)?)?)
}

fn write(tr: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = tr.py();
    let s = SLOTS.reader(tr);
    let fast = data.is_exact_instance_of::<PyBytes>()
        // SAFETY: an exact bytes object, whose size is its ob_size.
        && unsafe { ffi::Py_SIZE(data.as_ptr()) } > 0
        && idle(&s)?;
    if !fast {
        tr.call_method1(intern!(py, "_write_py"), (data,))?;
        return Ok(());
    }
    let bytes = data.cast::<PyBytes>()?.as_bytes();
    let fd = small_int(&s.get(SOCK_FD)?)?;
    // SAFETY: `bytes` is a live buffer of the given length (the bytes object is borrowed for
    // the call); MSG_NOSIGNAL turns a closed peer into EPIPE instead of a signal.
    let r = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
    let sent = if r < 0 {
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => 0,
            _ => {
                return fatal(
                    tr,
                    crate::errors::os_error(err),
                    "Fatal write error on socket transport",
                )
            }
        }
    } else {
        r as usize
    };
    if sent < bytes.len() {
        tr.call_method1(intern!(py, "_write_queue"), (data, sent, true))?;
    }
    Ok(())
}

/// The most pieces `writelines` sends with one `sendmsg` (more take the Python path).
const WRITELINES_MAX: usize = 64;

/// `writelines(list_of_data)`: asyncio's `WriteTransport.writelines` joins the pieces and
/// writes the result. For a list or tuple of exact `bytes` written to an idle transport this
/// sends them with one `sendmsg` instead (the join's copy spared, as 3.12's selector transport
/// does), and queues a joined copy of only what the kernel did not take, as the join-and-write
/// would have queued it. Anything else (another iterable, another type of piece, a busy or
/// closing transport) goes to the Python method.
fn writelines(tr: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = tr.py();
    let items = if let Ok(list) = data.cast_exact::<pyo3::types::PyList>() {
        // SAFETY: an exact list; its item array is read while no code runs (below, up to the
        // send), and every item is borrowed from it.
        unsafe {
            let l = list.as_ptr().cast::<ffi::PyListObject>();
            std::slice::from_raw_parts((*l).ob_item, ffi::PyList_GET_SIZE(list.as_ptr()) as usize)
        }
    } else if let Ok(tuple) = data.cast_exact::<PyTuple>() {
        // SAFETY: an exact tuple's items, immutable.
        unsafe {
            let t = tuple.as_ptr().cast::<ffi::PyTupleObject>();
            std::slice::from_raw_parts(
                (*t).ob_item.as_ptr(),
                ffi::PyTuple_GET_SIZE(tuple.as_ptr()) as usize,
            )
        }
    } else {
        &[]
    };
    let bytes_type = std::ptr::addr_of_mut!(ffi::PyBytes_Type);
    // SAFETY: live items of a live list or tuple.
    let fast = !items.is_empty()
        && items.len() <= WRITELINES_MAX
        && items
            .iter()
            .all(|&o| unsafe { ffi::Py_TYPE(o) } == bytes_type)
        && idle(&SLOTS.reader(tr))?;
    if !fast {
        tr.call_method1(intern!(py, "_writelines_py"), (data,))?;
        return Ok(());
    }
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; WRITELINES_MAX];
    let mut n = 0;
    let mut total = 0usize;
    for &o in items {
        // SAFETY: an exact bytes object: its buffer and size.
        let (ptr, len) = unsafe { (ffi::PyBytes_AS_STRING(o), ffi::Py_SIZE(o) as usize) };
        if len > 0 {
            iov[n] = libc::iovec {
                iov_base: ptr.cast_mut().cast(),
                iov_len: len,
            };
            n += 1;
            total += len;
        }
    }
    if total == 0 {
        return Ok(()); // write(b""): nothing to do on an idle transport
    }
    let fd = small_int(&SLOTS.reader(tr).get(SOCK_FD)?)?;
    // SAFETY: an all-zero msghdr is valid; `iov[..n]` describe live buffers of the bytes
    // objects, which the list or tuple keeps alive (no code runs until the send returns).
    let r = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n as _;
        libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
    };
    let sent = if r < 0 {
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => 0,
            _ => {
                return fatal(
                    tr,
                    crate::errors::os_error(err),
                    "Fatal write error on socket transport",
                )
            }
        }
    } else {
        r as usize
    };
    if sent < total {
        // The unsent tail, joined: what `write(b"".join(...))` would have queued.
        let rest = PyBytes::new_with(py, total - sent, |out| {
            let mut skip = sent;
            let mut at = 0;
            for v in &iov[..n] {
                let len = v.iov_len;
                if skip >= len {
                    skip -= len;
                    continue;
                }
                // SAFETY: `v` describes a live buffer of `len` bytes (see above).
                let src = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), len) };
                out[at..at + len - skip].copy_from_slice(&src[skip..]);
                at += len - skip;
                skip = 0;
            }
            Ok(())
        })?;
        tr.call_method1(intern!(py, "_write_queue"), (rest, 0, true))?;
    }
    Ok(())
}

unsafe extern "C" fn writelines_raw(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    trampoline(|py| {
        // SAFETY: CPython passes a live `self` and a valid vectorcall triple, borrowed for the
        // call.
        let tr = unsafe { Borrowed::from_ptr(py, slf) };
        // SAFETY: as above.
        if unsafe { !takes(1, nargsf, kwnames) } {
            // SAFETY: as above.
            return unsafe { forward(&tr, intern!(py, "_writelines_py"), args, nargsf, kwnames) };
        }
        // SAFETY: one positional argument, so args[0] is a live borrowed reference.
        let data = unsafe { Borrowed::from_ptr(py, *args) };
        writelines(&tr, &data).map(|()| py.None())
    })
}

/// The call passes exactly `n` positional arguments after `self` and no keyword.
///
/// # Safety
/// `nargsf`/`kwnames` must come from a valid vectorcall argument triple.
#[inline(always)]
pub(crate) unsafe fn takes(n: usize, nargsf: ffi::Py_ssize_t, kwnames: *mut ffi::PyObject) -> bool {
    // SAFETY: per the caller; `kwnames` is NULL or a tuple.
    unsafe {
        ffi::PyVectorcall_NARGS(nargsf as usize) as usize == n
            && (kwnames.is_null() || ffi::PyTuple_GET_SIZE(kwnames) == 0)
    }
}

/// `obj.name(...)` with a native entry point's arguments passed on unchanged: the Python
/// method parses a call the native one does not take (a wrong call gets Python's TypeError).
///
/// # Safety
/// `args`/`nargsf`/`kwnames` must be the caller's valid vectorcall triple.
#[cold]
#[inline(never)]
pub(crate) unsafe fn forward(
    obj: &Bound<'_, PyAny>,
    name: &Bound<'_, pyo3::types::PyString>,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<Py<PyAny>> {
    let py = obj.py();
    let m = obj.getattr(name)?;
    // SAFETY: forwarding the caller's valid vectorcall triple unchanged.
    let r = unsafe { ffi::PyObject_Vectorcall(m.as_ptr(), args, nargsf as usize, kwnames) };
    // SAFETY: a new reference or NULL with an exception set.
    unsafe { Bound::from_owned_ptr_or_err(py, r) }.map(Bound::unbind)
}

unsafe extern "C" fn read_ready_raw(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    trampoline(|py| {
        // SAFETY: CPython passes a live `self`.
        let tr = unsafe { Bound::from_borrowed_ptr(py, slf) };
        // SAFETY: CPython passes a valid vectorcall triple.
        if unsafe { !takes(0, nargsf, kwnames) } {
            // SAFETY: as above.
            return unsafe { forward(&tr, intern!(py, "_read_ready_py"), args, nargsf, kwnames) };
        }
        read_ready(&tr).map(|()| py.None())
    })
}

unsafe extern "C" fn write_raw(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    trampoline(|py| {
        // SAFETY: CPython passes a live `self` and a valid vectorcall triple, borrowed for the
        // call.
        let tr = unsafe { Borrowed::from_ptr(py, slf) };
        // SAFETY: as above.
        if unsafe { !takes(1, nargsf, kwnames) } {
            // `write(data=...)`, or a wrong call: the Python method parses it.
            // SAFETY: as above.
            return unsafe { forward(&tr, intern!(py, "_write_py"), args, nargsf, kwnames) };
        }
        // SAFETY: one positional argument, so args[0] is a live borrowed reference.
        let data = unsafe { Borrowed::from_ptr(py, *args) };
        write(&tr, &data).map(|()| py.None())
    })
}

unsafe extern "C" fn is_closing_raw(
    slf: *mut ffi::PyObject,
    _args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    trampoline(|py| {
        // SAFETY: CPython passes a valid vectorcall triple.
        if unsafe { !takes(0, nargsf, kwnames) } {
            return Err(PyTypeError::new_err("is_closing() takes no arguments"));
        }
        // SAFETY: CPython passes a live `self`.
        let tr = unsafe { Bound::from_borrowed_ptr(py, slf) };
        // `return self._closing` (asyncio's drain() asks on every call).
        Ok(SLOTS.reader(&tr).get(CLOSING)?.unbind())
    })
}

/// A native `_read_ready` the loop calls without going through its watcher's Handle
/// (`event_loop/run.rs`): the Rust body of the method, and where the transport is.
#[derive(Clone, Copy)]
pub(crate) struct NativeReader {
    read: fn(&Bound<'_, PyAny>) -> PyResult<()>,
    /// The watcher's callback is `tr._read_ready` (the transport is its `__self__`), not the
    /// class's descriptor called with the transport as the one argument.
    bound: bool,
}

impl NativeReader {
    /// Recognises a watcher that calls a native `_read_ready`: `add_reader(fd, Cls._read_ready,
    /// tr)` (the stream transport; `tr` passes the descriptor's type check) or `add_reader(fd,
    /// tr._read_ready)` (the datagram transport). Anything else runs through its Handle.
    pub(crate) fn of(callback: &Bound<'_, PyAny>, args: &Bound<'_, PyTuple>) -> Option<Self> {
        // SAFETY: an item of a live tuple, borrowed while the tuple lives.
        let first = (args.len() == 1).then(|| unsafe { args.get_borrowed_item_unchecked(0) });
        Self::of_args(callback, args.len(), first.as_deref())
    }

    /// `of` for the arguments given as their count and the first one (when it is the only
    /// one).
    pub(crate) fn of_args(
        callback: &Bound<'_, PyAny>,
        nargs: usize,
        first: Option<&Bound<'_, PyAny>>,
    ) -> Option<Self> {
        let cb = callback.as_ptr();
        // SAFETY: `cb` is live; each struct is only read after an exact type check says it is
        // that object's layout; `ml_meth` is read as the variant of the fast-call flag checked.
        unsafe {
            let ty = ffi::Py_TYPE(cb);
            let (def, bound) = if ty == std::ptr::addr_of_mut!(ffi::PyMethodDescr_Type) {
                let descr = cb.cast::<ffi::PyMethodDescrObject>();
                let first = first.filter(|_| nargs == 1)?;
                if ffi::PyObject_TypeCheck(first.as_ptr(), (*descr).d_common.d_type) == 0 {
                    return None;
                }
                ((*descr).d_method, false)
            } else if ty == std::ptr::addr_of_mut!(ffi::PyCFunction_Type) {
                let f = cb.cast::<ffi::PyCFunctionObject>();
                if nargs != 0 || (*f).m_self.is_null() {
                    return None;
                }
                ((*f).m_ml, true)
            } else {
                return None;
            };
            if def.is_null() || (*def).ml_flags != ffi::METH_FASTCALL | ffi::METH_KEYWORDS {
                return None;
            }
            let meth = (*def).ml_meth.PyCFunctionFastWithKeywords as *const ();
            let read: fn(&Bound<'_, PyAny>) -> PyResult<()> = if meth == read_ready_raw as *const ()
            {
                read_ready
            } else if meth == crate::datagram_fast::READ_READY_RAW as *const () {
                crate::datagram_fast::datagram_read_ready
            } else {
                return None;
            };
            Some(NativeReader { read, bound })
        }
    }

    /// The transport the watcher's callback names (`None`: not this reader's shape, which
    /// cannot happen for a callback `of` accepted).
    pub(crate) fn target<'py>(
        &self,
        func: &Bound<'py, PyAny>,
        args: &crate::handles::Args,
    ) -> Option<Bound<'py, PyAny>> {
        let py = func.py();
        if self.bound {
            // SAFETY: `of` checked that `func` is a builtin method with a `__self__`, and a
            // handle's callback never changes.
            unsafe {
                let f = func.as_ptr().cast::<ffi::PyCFunctionObject>();
                Some(Bound::from_borrowed_ptr(py, (*f).m_self))
            }
        } else {
            match args {
                crate::handles::Args::One(tr) => Some(tr.bind(py).clone()),
                _ => None,
            }
        }
    }

    /// The callback is a bound method (its only argument is its `__self__`).
    pub(crate) fn is_bound(&self) -> bool {
        self.bound
    }

    /// Reads for `target`. A panic becomes `PanicException`, as the method's own entry point
    /// makes it.
    #[inline(always)]
    pub(crate) fn run(&self, target: &Bound<'_, PyAny>) -> PyResult<()> {
        crate::event_loop::fastcall::catch_panic(|| (self.read)(target))
    }
}

pub(crate) type Raw = unsafe extern "C" fn(
    *mut ffi::PyObject,
    *const *mut ffi::PyObject,
    ffi::Py_ssize_t,
    *mut ffi::PyObject,
) -> *mut ffi::PyObject;

const METHODS: [(&CStr, Raw, &CStr); 4] = [
    (
        c"_read_ready",
        read_ready_raw,
        c"_read_ready($self, /)\n--\n\nThe socket is readable: read and deliver to the protocol.",
    ),
    (
        c"write",
        write_raw,
        c"write($self, /, data)\n--\n\nWrite data to the transport (sent at once when possible).",
    ),
    (
        c"writelines",
        writelines_raw,
        c"writelines($self, /, list_of_data)\n--\n\nWrite a list (or any iterable) of data bytes to the transport.",
    ),
    (
        c"is_closing",
        is_closing_raw,
        c"is_closing($self, /)\n--\n\nReturn True if the transport is closing or closed.",
    ),
];

/// Installs the native `_read_ready`, `write`, `writelines` and `is_closing` on the given stream transport class.
#[pyfunction]
pub fn install_stream_fast_paths(cls: &Bound<'_, PyType>) -> PyResult<()> {
    // Descriptors of the class itself: a stray `self` gets TypeError from CPython's check,
    // which costs an exact instance one comparison (a descriptor of `object` walks the MRO).
    install_on(cls, cls.as_type_ptr(), &METHODS)
}

/// Installs `methods` on `cls` as descriptors of `cls` itself (see `install_stream_fast_paths`).
pub(crate) fn install_methods_on_class(
    cls: &Bound<'_, PyType>,
    methods: &[(&'static CStr, Raw, &'static CStr)],
) -> PyResult<()> {
    install_on(cls, cls.as_type_ptr(), methods)
}

/// Installs `methods` on `cls` as descriptors of `object`: any `self` reaches the function,
/// which must cope (a stray one gets the AttributeError a Python method would raise).
pub(crate) fn install(
    cls: &Bound<'_, PyType>,
    methods: &[(&'static CStr, Raw, &'static CStr)],
) -> PyResult<()> {
    let object = std::ptr::addr_of_mut!(ffi::PyBaseObject_Type);
    install_on(cls, object, methods)
}

/// Installs `methods` on `cls` as descriptors of `owner`: calling one checks `self` against
/// `owner` first (for the exact class, one pointer comparison instead of an MRO walk).
fn install_on(
    cls: &Bound<'_, PyType>,
    owner: *mut ffi::PyTypeObject,
    methods: &[(&'static CStr, Raw, &'static CStr)],
) -> PyResult<()> {
    let py = cls.py();
    for &(name, func, doc) in methods {
        let def = Box::leak(Box::new(ffi::PyMethodDef {
            ml_name: name.as_ptr(),
            ml_meth: ffi::PyMethodDefPointer {
                PyCFunctionFastWithKeywords: func,
            },
            ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
            ml_doc: doc.as_ptr(),
        }));
        // SAFETY: `owner` is a live type object (`object` or `cls`); `def` is 'static.
        let descr = unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyDescr_NewMethod(owner, def as *mut ffi::PyMethodDef),
            )?
        };
        cls.setattr(name.to_str().expect("ascii"), descr)?;
    }
    Ok(())
}
