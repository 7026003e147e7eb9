//! The native life of a stream transport (`python/ferroloop/_net/transports.py`): its
//! construction, the start of reading, EOF, `close()` and `connection_lost`.
//!
//! A server under connection churn runs each of these once per connection, and as Python
//! methods they were most of what a short connection cost besides the kernel (a dozen frames:
//! two `__init__`s, `set_protocol`, `_add_reader`, `_read_ready__on_eof`, `close`, two
//! `_call_connection_lost`s, `_complete_extra`, `_build_extra`, `_forget_fd`, the table's
//! `discard`, `socket.close`, `_real_close`, `__del__`). Here they are the same steps on the
//! same slots, in the same order, with the same errors.
//!
//! Ground rules:
//! - Only an instance of exactly `StreamTransport` over exactly `socket.socket` takes these
//!   paths; a subclass (`SocketMethodsStreamTransport`, a user's) or another call shape
//!   forwards to the Python method, kept on the class as `_<name>_py`, which stays the
//!   reference behaviour.
//! - User code (the protocol's callbacks, `Server._attach`/`_detach`) is called exactly where
//!   the Python methods call it; the loop is called through its native core.
//! - Debug mode takes the Python paths where they log.

use std::ffi::CStr;
use std::os::raw::c_int;

use pyo3::exceptions::{PyConnectionError, PyOSError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};
use pyo3::{ffi, intern};

use crate::event_loop::fastcall::trampoline;
use crate::event_loop::LoopCore;
use crate::slots::{small_int, truthy, SlotTable};
use crate::transports::{forward, takes, Raw};

/// The objects the paths need, taken from the Python module once.
struct Life {
    /// `StreamTransport`.
    cls: Py<PyType>,
    /// `socket.socket`.
    socket_type: Py<PyType>,
    buffered_protocol: Py<PyAny>,
    /// `_NO_QUEUE`: the empty write queue.
    no_queue: Py<PyAny>,
    high_water: Py<PyAny>,
    low_water: Py<PyAny>,
    /// `_socket.socket.close`, the C method `socket.socket._real_close` calls.
    raw_close: Py<PyAny>,
    /// `StreamTransport._read_ready` and `_call_connection_lost` (the native descriptors).
    read_ready: Py<PyAny>,
    call_connection_lost: Py<PyAny>,
    start_reading: Py<PyAny>,
    /// `_CLOSED_EXTRA`: marks the tuple `_extra` holds after the native connection_lost.
    closed_extra: Py<PyAny>,
    /// `asyncio.Protocol.eof_received` (does nothing, returns None).
    protocol_eof_received: Py<PyAny>,
    /// The native `__init__` installed on `StreamTransport` (its descriptor).
    init_descr: Py<PyAny>,
}

static LIFE: PyOnceLock<Life> = PyOnceLock::new();

/// The transport's slots these paths use (see `slots.rs`).
static SLOTS: SlotTable<17> = SlotTable::new([
    "_extra",
    "_loop",
    "_sock",
    "_sock_fd",
    "_protocol",
    "_server",
    "_buffer",
    "_buffer_size",
    "_conn_lost",
    "_closing",
    "_protocol_paused",
    "_high_water",
    "_low_water",
    "_buffered",
    "_eof",
    "_paused",
    "_empty_waiter",
]);
const EXTRA: usize = 0;
const LOOP: usize = 1;
const SOCK: usize = 2;
const SOCK_FD: usize = 3;
const PROTOCOL: usize = 4;
const SERVER: usize = 5;
const BUFFER: usize = 6;
const BUFFER_SIZE: usize = 7;
const CONN_LOST: usize = 8;
const CLOSING: usize = 9;
const PROTOCOL_PAUSED: usize = 10;
const HIGH_WATER: usize = 11;
const LOW_WATER: usize = 12;
const BUFFERED: usize = 13;
const EOF: usize = 14;
const PAUSED: usize = 15;
const EMPTY_WAITER: usize = 16;

/// `socket.socket`'s own slots.
static SOCKET_SLOTS: SlotTable<2> = SlotTable::new(["_io_refs", "_closed"]);
const IO_REFS: usize = 0;
const CLOSED: usize = 1;

/// The head of CPython's `PySocketSockObject` (`Modules/socketmodule.h`, the same from 3.9 to
/// 3.13 on POSIX, where `SOCKET_T` is an int).
#[repr(C)]
struct SockHead {
    ob_base: ffi::PyObject,
    fd: c_int,
    family: c_int,
    stype: c_int,
    proto: c_int,
}

/// `tr` is exactly `StreamTransport` (then its native paths apply).
#[inline(always)]
fn exact(tr: &Bound<'_, PyAny>) -> Option<&'static Life> {
    let l = LIFE.get(tr.py())?;
    // SAFETY: a live object's type.
    (unsafe { ffi::Py_TYPE(tr.as_ptr()) } == l.cls.as_ptr().cast()).then_some(l)
}

/// `sock` is exactly `socket.socket`: its C fields (family, type, proto), else None.
/// The fd an exact `socket.socket` holds (its C field), else None.
fn socket_fd(l: &Life, sock: &Bound<'_, PyAny>) -> Option<c_int> {
    socket_fields(l, sock)?;
    // SAFETY: an exact `socket.socket` (checked above) starts with `SockHead`.
    Some(unsafe { (*sock.as_ptr().cast::<SockHead>()).fd })
}

fn socket_fields(l: &Life, sock: &Bound<'_, PyAny>) -> Option<(c_int, c_int, c_int)> {
    // SAFETY: a live object's type; an exact `socket.socket` starts with `SockHead`.
    unsafe {
        if ffi::Py_TYPE(sock.as_ptr()) != l.socket_type.as_ptr().cast() {
            return None;
        }
        let h = sock.as_ptr().cast::<SockHead>();
        Some(((*h).family, (*h).stype, (*h).proto))
    }
}

fn is_tcp((family, stype, proto): (c_int, c_int, c_int)) -> bool {
    (family == libc::AF_INET || family == libc::AF_INET6)
        && stype == libc::SOCK_STREAM
        && proto == libc::IPPROTO_TCP
}

extern "C" {
    // CPython's MRO lookup through the type's method cache (exported 3.9-3.13; see streams.rs):
    // a borrowed reference or NULL, no exception, no code run.
    fn _PyType_Lookup(ty: *mut ffi::PyTypeObject, name: *mut ffi::PyObject) -> *mut ffi::PyObject;
}

/// `LoopCore`'s method descriptors, for [`core_method`].
static CORE_CALL_SOON: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static CORE_GET_DEBUG: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Up to 3.11 a dict's `ma_version_tag` changes with every modification and is unique across
/// all dicts (PEP 509): a dict found at the same address with the same tag is in the same
/// state. From 3.12 the field serves dict watchers and is deprecated: not used there.
static VERSION_TAGS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// The version tag of `d`, where it can stand for its state (see `VERSION_TAGS`).
#[inline(always)]
fn dict_version(d: &Bound<'_, PyDict>) -> Option<u64> {
    if !*VERSION_TAGS.get_or_init(|| d.py().version_info() < (3, 12)) {
        return None;
    }
    // SAFETY: `d` is a live dict; the field exists in `PyDictObject` up to 3.13 (read only
    // before 3.12, per the check above).
    #[allow(deprecated)]
    Some(unsafe { (*d.as_ptr().cast::<ffi::PyDictObject>()).ma_version_tag })
}

/// One check of an instance dict (that it lacks a name, or holds the expected value there)
/// remembered for the dict's state in which it last passed: the same dict, unmodified since,
/// passes without the lookup. The checks are pure lookups of `str` keys (no Python code).
pub(crate) struct DictMemo(crate::gil::GilCell<(usize, u64)>);

impl DictMemo {
    pub(crate) const fn new() -> Self {
        DictMemo(crate::gil::GilCell::new((0, 0)))
    }

    #[inline(always)]
    fn check(&self, d: &Bound<'_, PyDict>, check: impl FnOnce() -> bool) -> bool {
        let Some(version) = dict_version(d) else {
            return check();
        };
        let state = (d.as_ptr() as usize, version);
        if matches!(self.0.borrow_mut(d.py()), Ok(m) if *m == state) {
            return true;
        }
        let ok = check();
        if ok {
            if let Ok(mut m) = self.0.borrow_mut(d.py()) {
                *m = state;
            }
        }
        ok
    }
}

static CALL_SOON_MEMO: DictMemo = DictMemo::new();
static GET_DEBUG_MEMO: DictMemo = DictMemo::new();
static MAKE_TRANSPORT_MEMO: DictMemo = DictMemo::new();
static ATTACH_MEMO: DictMemo = DictMemo::new();
static DETACH_MEMO: DictMemo = DictMemo::new();

/// Whether `lp.<name>` is the loop core's own method (`descr`, taken from `LoopCore` once):
/// nothing replaced it on the class or on the instance (where `ferroloop.Loop` may keep the
/// core's method bound, before 3.12). `dict` is the loop's instance dict.
fn core_method(
    lp: &Bound<'_, PyAny>,
    dict: &Bound<'_, PyDict>,
    cell: &'static PyOnceLock<Py<PyAny>>,
    memo: &DictMemo,
    name: &Bound<'_, PyString>,
) -> bool {
    let py = lp.py();
    let Ok(descr) = cell
        .get_or_try_init(py, || {
            py.get_type::<LoopCore>().getattr(name).map(Bound::unbind)
        })
        .map(|d| d.as_ptr())
    else {
        return false;
    };
    // SAFETY: live objects; `_PyType_Lookup` returns a borrowed reference (only compared); an
    // exact method descriptor and a builtin method have the layouts read.
    unsafe {
        if _PyType_Lookup(ffi::Py_TYPE(lp.as_ptr()), name.as_ptr()) != descr {
            return false;
        }
        memo.check(dict, || match dict.get_item(name) {
            Ok(None) => true,
            Ok(Some(m)) => {
                if ffi::Py_TYPE(m.as_ptr()) != std::ptr::addr_of_mut!(ffi::PyCFunction_Type)
                    || ffi::Py_TYPE(descr) != std::ptr::addr_of_mut!(ffi::PyMethodDescr_Type)
                {
                    return false;
                }
                let f = m.as_ptr().cast::<ffi::PyCFunctionObject>();
                let def = (*descr.cast::<ffi::PyMethodDescrObject>()).d_method;
                (*f).m_self == lp.as_ptr() && (*f).m_ml == def
            }
            Err(_) => false,
        })
    }
}

/// Whether `lp.call_soon` is the loop core's own method.
fn native_call_soon(lp: &Bound<'_, PyAny>) -> bool {
    let Ok(d) = instance_dict(lp) else {
        drop(PyErr::take(lp.py()));
        return false;
    };
    core_method(
        lp,
        &d,
        &CORE_CALL_SOON,
        &CALL_SOON_MEMO,
        intern!(lp.py(), "call_soon"),
    )
}

/// `loop.call_soon(callback, *args)` (the loop's own method: an override is honoured).
fn call_soon(
    lp: &Bound<'_, PyAny>,
    callback: &Bound<'_, PyAny>,
    args: &[&Bound<'_, PyAny>],
) -> PyResult<()> {
    if let Ok(core) = lp.cast::<LoopCore>() {
        if native_call_soon(lp) {
            let py = lp.py();
            let pack = || {
                Ok(match args {
                    [one] => crate::handles::Args::One((*one).clone().unbind()),
                    _ => crate::handles::Args::Many(PyTuple::new(py, args)?.unbind()),
                })
            };
            // The handle is dropped here: nobody sees it, so none is made when that is
            // possible.
            if !core.get().push_internal(py, callback, pack)? {
                core.get().call_soon_impl(py, callback, pack()?, None)?;
            }
            return Ok(());
        }
    }
    let mut v: Vec<*mut ffi::PyObject> = Vec::with_capacity(args.len() + 2);
    v.push(lp.as_ptr());
    v.push(callback.as_ptr());
    v.extend(args.iter().map(|a| a.as_ptr()));
    // SAFETY: live objects; `v` holds `self` then the arguments.
    unsafe {
        let r = ffi::PyObject_VectorcallMethod(
            intern!(lp.py(), "call_soon").as_ptr(),
            v.as_ptr(),
            v.len() | ffi::PY_VECTORCALL_ARGUMENTS_OFFSET,
            std::ptr::null_mut(),
        );
        Bound::from_owned_ptr_or_err(lp.py(), r).map(drop)
    }
}

/// `TransportTable`'s one slot, `_refs` (its dict of fd -> weak reference).
static TABLE_SLOTS: SlotTable<1> = SlotTable::new(["_refs"]);

/// The loop's fd -> transport table (`loop._transports`), without creating it.
fn transport_table<'py>(lp: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    instance_dict(lp)?.get_item(intern!(lp.py(), "_net_transports"))
}

/// `obj.__dict__` of an instance of a class with one (the loop, a server).
fn instance_dict<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    // SAFETY: a live object; a new reference or NULL with an exception set.
    let d = unsafe {
        Bound::from_owned_ptr_or_err(
            obj.py(),
            ffi::PyObject_GenericGetDict(obj.as_ptr(), std::ptr::null_mut()),
        )?
    };
    Ok(d.cast_into::<PyDict>()?)
}

/// `object.__class__` (its descriptor), for `is_instance`.
static OBJECT_CLASS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `isinstance(obj, cls)`. For a class whose metaclass is `type` and an object whose type
/// neither overrides `__class__` nor attribute lookup, `obj.__class__` is `type(obj)`, so
/// the answer is whether that type is a subclass: the `__class__` lookup `isinstance` makes
/// when it is not is skipped.
fn is_instance(obj: &Bound<'_, PyAny>, cls: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = obj.py();
    let descr = OBJECT_CLASS
        .get_or_try_init(py, || {
            py.get_type::<pyo3::types::PyAny>()
                .getattr("__dict__")?
                .get_item("__class__")
                .map(Bound::unbind)
        })?
        .as_ptr();
    // SAFETY: live objects and their types; `_PyType_Lookup` returns a borrowed reference
    // (compared) or NULL.
    unsafe {
        let ty = ffi::Py_TYPE(obj.as_ptr());
        if ffi::Py_TYPE(cls.as_ptr()) == std::ptr::addr_of_mut!(ffi::PyType_Type)
            && (*ty).tp_getattro.map(|f| f as usize)
                == Some(ffi::PyObject_GenericGetAttr as ffi::getattrofunc as usize)
            && _PyType_Lookup(ty, intern!(py, "__class__").as_ptr()) == descr
        {
            return Ok(ffi::PyType_IsSubtype(ty, cls.as_ptr().cast()) != 0);
        }
    }
    obj.is_instance(cls)
}

// ---- the server's connection count -----------------------------------------------------------

/// `Server` (`python/ferroloop/_net/server.py`) and its `_attach` / `_detach` functions.
struct ServerClass {
    cls: Py<PyType>,
    attach: Py<PyAny>,
    detach: Py<PyAny>,
    /// `ConnectMixin._make_socket_transport` (the function) and the native set-up of an
    /// accepted connection that assumes it (`accept_plain_connection`), for `accept_ready`.
    make_socket_transport: Py<PyAny>,
    accept_plain: Py<PyAny>,
}

static SERVER_CLASS: PyOnceLock<ServerClass> = PyOnceLock::new();

/// Registers ferroloop's `Server` class: its `_attach` / `_detach` then run natively for
/// an exact instance whose class and instance still have those functions. Also the accept
/// path's objects (see `ServerClass`).
#[pyfunction]
pub fn install_server_class(
    cls: &Bound<'_, PyType>,
    make_socket_transport: &Bound<'_, PyAny>,
    accept_plain: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let d = cls.getattr("__dict__")?;
    let s = ServerClass {
        cls: cls.clone().unbind(),
        attach: d.get_item("_attach")?.unbind(),
        detach: d.get_item("_detach")?.unbind(),
        make_socket_transport: make_socket_transport.clone().unbind(),
        accept_plain: accept_plain.clone().unbind(),
    };
    let _ = SERVER_CLASS.set(cls.py(), s);
    Ok(())
}

/// `Server`'s slots the native paths read and write (see `slots.rs`).
static SERVER_SLOTS: SlotTable<3> = SlotTable::new(["_sockets", "_active_count", "_local_name"]);
const SV_SOCKETS: usize = 0;
const SV_ACTIVE_COUNT: usize = 1;
const SV_LOCAL_NAME: usize = 2;

/// Whether `server.<name>` is `Server`'s own function (`pick`), unshadowed.
fn plain_server(
    server: &Bound<'_, PyAny>,
    name: &Bound<'_, pyo3::types::PyString>,
    pick: fn(&ServerClass) -> &Py<PyAny>,
    memo: &DictMemo,
) -> bool {
    let Some(sv) = SERVER_CLASS.get(server.py()) else {
        return false;
    };
    // SAFETY: a live object's type; `_PyType_Lookup` returns a borrowed reference (compared).
    unsafe {
        let ty = ffi::Py_TYPE(server.as_ptr());
        if ty != sv.cls.as_ptr().cast() || _PyType_Lookup(ty, name.as_ptr()) != pick(sv).as_ptr() {
            return false;
        }
    }
    match instance_dict(server) {
        Ok(d) => memo.check(&d, || matches!(d.contains(name), Ok(false))),
        Err(_) => false,
    }
}

/// `server._attach(tr)`: `assert self._sockets is not None; self._active_count += 1`.
fn server_attach(server: &Bound<'_, PyAny>, tr: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = server.py();
    if plain_server(server, intern!(py, "_attach"), |s| &s.attach, &ATTACH_MEMO) {
        let s = SERVER_SLOTS.reader(server);
        if let (Ok(sockets), Ok(count)) = (s.get(SV_SOCKETS), s.get(SV_ACTIVE_COUNT)) {
            if !sockets.is_none() {
                return s.set(SV_ACTIVE_COUNT, &count.add(1)?);
            }
        }
    }
    // (Also what raises the AssertionError.)
    server.call_method1(intern!(py, "_attach"), (tr,))?;
    Ok(())
}

/// `server._detach(tr)`: one connection fewer; the last one of a closed server wakes
/// `wait_closed()`.
fn server_detach(server: &Bound<'_, PyAny>, tr: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = server.py();
    if plain_server(server, intern!(py, "_detach"), |s| &s.detach, &DETACH_MEMO) {
        let s = SERVER_SLOTS.reader(server);
        if let Ok(count) = s.get(SV_ACTIVE_COUNT) {
            let count = count.sub(1)?;
            s.set(SV_ACTIVE_COUNT, &count)?;
            if count.eq(0)? && s.get(SV_SOCKETS)?.is_none() {
                server.call_method0(intern!(py, "_wakeup"))?;
            }
            return Ok(());
        }
    }
    server.call_method1(intern!(py, "_detach"), (tr,))?;
    Ok(())
}

// ---- __init__ ----------------------------------------------------------------------------

/// `StreamTransport.__init__(loop, sock, protocol, waiter, extra, server, peername)` with no
/// waiter and no extra (an accepted connection): `SocketTransportBase.__init__` and
/// `StreamTransport.__init__` in one.
fn init(
    l: &Life,
    tr: &Bound<'_, PyAny>,
    lp: &Bound<'_, PyAny>,
    sock: &Bound<'_, PyAny>,
    protocol: &Bound<'_, PyAny>,
    server: &Bound<'_, PyAny>,
    peername: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = tr.py();
    let s = SLOTS.reader(tr);
    let peername = if peername.is_none() {
        match sock.call_method0(intern!(py, "getpeername")) {
            Ok(p) => p,
            Err(e) if e.is_instance_of::<PyOSError>(py) => py.None().into_bound(py),
            Err(e) => return Err(e),
        }
    } else {
        peername.clone()
    };
    s.set(EXTRA, &peername)?;
    s.set(LOOP, lp)?;
    s.set(SOCK, sock)?;
    // sock.fileno()
    let fd = match socket_fd(l, sock) {
        Some(fd) => fd.into_pyobject(py)?.into_any(),
        None => sock.call_method0(intern!(py, "fileno"))?,
    };
    s.set(SOCK_FD, &fd)?;
    let none = py.None().into_bound(py);
    s.set(PROTOCOL, &none)?;
    // StreamTransport.set_protocol
    let buffered = is_instance(protocol, l.buffered_protocol.bind(py))?;
    s.set(
        BUFFERED,
        &pyo3::types::PyBool::new(py, buffered).to_owned().into_any(),
    )?;
    s.set(PROTOCOL, protocol)?;
    s.set(SERVER, server)?;
    s.set(BUFFER, l.no_queue.bind(py))?;
    let zero = 0i32.into_pyobject(py)?.into_any();
    s.set(BUFFER_SIZE, &zero)?;
    s.set(CONN_LOST, &zero)?;
    let false_ = pyo3::types::PyBool::new(py, false).to_owned().into_any();
    s.set(CLOSING, &false_)?;
    s.set(PROTOCOL_PAUSED, &false_)?;
    s.set(HIGH_WATER, l.high_water.bind(py))?;
    s.set(LOW_WATER, l.low_water.bind(py))?;
    // StreamTransport's own attributes before the server's `_attach`, which may fail (a closed
    // server): the half-made transport's __del__ and repr read them.
    s.set(EOF, &false_)?;
    s.set(PAUSED, &false_)?;
    s.set(EMPTY_WAITER, &none)?;
    if !server.is_none() {
        server_attach(server, tr)?;
    }
    let table = match transport_table(lp)? {
        Some(t) => t,
        None => lp.getattr(intern!(py, "_transports"))?,
    };
    let refs = TABLE_SLOTS.reader(&table).get(0)?;
    // SAFETY: `tr` is live and weakly referenceable (its class has `__weakref__`); a new
    // reference or NULL with an exception set.
    let wr = unsafe {
        Bound::from_owned_ptr_or_err(py, ffi::PyWeakref_NewRef(tr.as_ptr(), std::ptr::null_mut()))?
    };
    match refs.cast::<PyDict>() {
        Ok(refs) => refs.set_item(&fd, wr)?,
        Err(_) => refs.set_item(&fd, wr)?,
    }
    if let Some(fields) = socket_fields(l, sock) {
        if is_tcp(fields) {
            let one: c_int = 1;
            let fd = small_int(&fd)?;
            // SAFETY: setsockopt with a properly sized int option value.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&one as *const c_int).cast(),
                    std::mem::size_of::<c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(crate::errors::os_error(std::io::Error::last_os_error()));
            }
        }
    }
    let made = protocol.getattr(intern!(py, "connection_made"))?;
    call_soon(lp, &made, &[tr])?;
    // Only start reading once connection_made() has been called.
    call_soon(lp, l.start_reading.bind(py), &[tr])?;
    Ok(())
}

/// A native method's vectorcall entry (`extern "C"`): [`entry`] with the name of the Python
/// method to fall back on and the body.
macro_rules! native_method {
    ($name:ident, $fallback:literal, $body:expr) => {
        unsafe extern "C" fn $name(
            slf: *mut ffi::PyObject,
            args: *const *mut ffi::PyObject,
            nargsf: ffi::Py_ssize_t,
            kwnames: *mut ffi::PyObject,
        ) -> *mut ffi::PyObject {
            // SAFETY: CPython's vectorcall method call.
            unsafe {
                entry(
                    slf,
                    args,
                    nargsf,
                    kwnames,
                    |py| intern!(py, $fallback),
                    $body,
                )
            }
        }
    };
}

/// What the native methods below share: on an exact `StreamTransport` called with `N`
/// positional arguments and no keywords, `body` gets them and returns `Ok(true)` when it has
/// done the call; any other call, or `Ok(false)` (a case `body` leaves to Python), goes
/// unchanged to the Python method named by `fallback`, the reference implementation.
///
/// # Safety
/// `slf`, `args`, `nargsf` and `kwnames` must be CPython's vectorcall method call.
unsafe fn entry<const N: usize>(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
    fallback: for<'py> fn(Python<'py>) -> &'py Bound<'py, PyString>,
    body: impl for<'py> FnOnce(
        &'static Life,
        &Bound<'py, PyAny>,
        [Bound<'py, PyAny>; N],
    ) -> PyResult<bool>,
) -> *mut ffi::PyObject {
    trampoline(|py| {
        // SAFETY: CPython passes a live `self`.
        let tr = unsafe { Bound::from_borrowed_ptr(py, slf) };
        // SAFETY: per the caller, a valid vectorcall triple.
        if let Some(l) = exact(&tr).filter(|_| unsafe { takes(N, nargsf, kwnames) }) {
            // SAFETY: `N` positional arguments (checked), live borrowed references.
            let a = std::array::from_fn(|i| unsafe { Bound::from_borrowed_ptr(py, *args.add(i)) });
            if body(l, &tr, a)? {
                return Ok(py.None());
            }
        }
        // SAFETY: as above.
        unsafe { forward(&tr, fallback(py), args, nargsf, kwnames) }
    })
}

native_method!(init_raw, "_init_py", |l, tr, a| {
    let [lp, sock, protocol, waiter, extra, server, peername] = a;
    if !waiter.is_none() || !extra.is_none() || socket_fields(l, &sock).is_none() {
        return Ok(false);
    }
    init(l, tr, &lp, &sock, &protocol, &server, &peername).map(|()| true)
});

// ---- reading starts ------------------------------------------------------------------------

/// `_add_reader(fd, type(self)._read_ready, self)` as `__init__` schedules it: nothing if the
/// protocol paused reading or closed the transport in connection_made.
fn start_reading(l: &Life, tr: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = tr.py();
    let s = SLOTS.reader(tr);
    if truthy(&s.get(PAUSED)?)? || truthy(&s.get(CLOSING)?)? {
        return Ok(());
    }
    let fd = s.get(SOCK_FD)?;
    let sock = s.get(SOCK)?;
    let lp = s.get(LOOP)?;
    let edge = socket_fields(l, &sock)
        .is_some_and(|(family, _, _)| family == libc::AF_INET || family == libc::AF_INET6);
    match lp.cast::<LoopCore>() {
        Ok(core) if edge => {
            core.get()
                .add_reader_edge_one(py, &fd, l.read_ready.bind(py), tr)?;
        }
        _ => {
            tr.call_method1(intern!(py, "_add_reader"), (fd, l.read_ready.bind(py), tr))?;
        }
    }
    Ok(())
}

native_method!(start_reading_raw, "_start_reading_py", |l, tr, []| {
    start_reading(l, tr).map(|()| true)
});

// ---- EOF and close -------------------------------------------------------------------------

/// `_read_ready__on_eof`: the peer closed its side. Called by the native read paths.
pub(crate) fn on_eof(tr: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = tr.py();
    let Some(l) = exact(tr) else {
        tr.call_method0(intern!(py, "_read_ready__on_eof"))?;
        return Ok(());
    };
    let s = SLOTS.reader(tr);
    let lp = s.get(LOOP)?;
    let core = match lp.cast::<LoopCore>() {
        Ok(c) if !c.get().shared.debug() => c.clone(),
        // Debug mode logs the EOF.
        _ => {
            tr.call_method0(intern!(py, "_read_ready__on_eof"))?;
            return Ok(());
        }
    };
    let protocol = s.get(PROTOCOL)?;
    let keep_open = if plain_eof_received(l, &protocol) {
        // asyncio.Protocol's own eof_received: it does nothing and returns None.
        Ok(py.None().into_bound(py))
    } else {
        protocol.call_method0(intern!(py, "eof_received"))
    };
    let keep_open = match keep_open {
        Ok(k) => k,
        Err(e) => {
            return crate::transports::fatal(
                tr,
                e,
                "Fatal error: protocol.eof_received() call failed.",
            )
        }
    };
    if truthy(&keep_open)? {
        // Half-closed: stop reading, the protocol may still write.
        core.get().remove_reader_closing(py, &s.get(SOCK_FD)?)?;
        Ok(())
    } else {
        close(l, tr)
    }
}

extern "C" {
    // What `obj.name(...)` does before a call (exported 3.9-3.13; see streams.rs).
    fn _PyObject_GetMethod(
        obj: *mut ffi::PyObject,
        name: *mut ffi::PyObject,
        method: *mut *mut ffi::PyObject,
    ) -> c_int;
}

/// `protocol.eof_received` is `asyncio.Protocol.eof_received` itself (not replaced on the
/// class, not shadowed on the instance).
fn plain_eof_received(l: &Life, protocol: &Bound<'_, PyAny>) -> bool {
    let py = protocol.py();
    let mut found = std::ptr::null_mut();
    // SAFETY: live objects; `found` receives a new reference or NULL (with an exception set,
    // which is cleared: the call then runs and raises it again).
    let unbound = unsafe {
        _PyObject_GetMethod(
            protocol.as_ptr(),
            intern!(py, "eof_received").as_ptr(),
            &mut found,
        )
    };
    if found.is_null() {
        drop(PyErr::take(py));
        return false;
    }
    let same = unbound == 1 && found == l.protocol_eof_received.as_ptr();
    // SAFETY: the new reference `_PyObject_GetMethod` returned.
    unsafe { ffi::Py_DECREF(found) };
    same
}

/// `close()`.
fn close(l: &Life, tr: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = tr.py();
    let s = SLOTS.reader(tr);
    if truthy(&s.get(CLOSING)?)? {
        return Ok(());
    }
    let lp = s.get(LOOP)?;
    let Ok(core) = lp.cast::<LoopCore>() else {
        tr.call_method0(intern!(py, "_close_py"))?;
        return Ok(());
    };
    s.set(
        CLOSING,
        &pyo3::types::PyBool::new(py, true).to_owned().into_any(),
    )?;
    let fd = s.get(SOCK_FD)?;
    core.get().remove_reader_closing(py, &fd)?;
    if !truthy(&s.get(BUFFER)?)? {
        let n = s.get(CONN_LOST)?.add(1)?;
        s.set(CONN_LOST, &n)?;
        core.get()._remove_writer_impl(py, &fd)?;
        call_soon(
            &lp,
            l.call_connection_lost.bind(py),
            &[tr, &py.None().into_bound(py)],
        )?;
    }
    Ok(())
}

/// `_fatal_error(exc, message)` for a routine error (an `OSError`: a reset, a broken pipe...)
/// outside debug mode, where asyncio only closes the transport (`_force_close(exc)`): done
/// here. Returns false when the Python method must run (another error, debug mode, another
/// class).
pub(crate) fn fatal_routine(tr: &Bound<'_, PyAny>, exc: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = tr.py();
    let Some(l) = exact(tr) else {
        return Ok(false);
    };
    if !exc.is_instance_of::<PyOSError>() {
        return Ok(false);
    }
    let s = SLOTS.reader(tr);
    let lp = s.get(LOOP)?;
    let core = match lp.cast::<LoopCore>() {
        Ok(c) if !c.get().shared.debug() => c.clone(),
        _ => return Ok(false),
    };
    // _force_close(exc)
    if truthy(&s.get(CONN_LOST)?)? {
        return Ok(true);
    }
    let fd = s.get(SOCK_FD)?;
    let buffer = s.get(BUFFER)?;
    if truthy(&buffer)? {
        buffer.call_method0(intern!(py, "clear"))?;
        s.set(BUFFER_SIZE, &0i32.into_pyobject(py)?.into_any())?;
        core.get()._remove_writer_impl(py, &fd)?;
    }
    if !truthy(&s.get(CLOSING)?)? {
        s.set(
            CLOSING,
            &pyo3::types::PyBool::new(py, true).to_owned().into_any(),
        )?;
        core.get().remove_reader_closing(py, &fd)?;
    }
    let n = s.get(CONN_LOST)?.add(1)?;
    s.set(CONN_LOST, &n)?;
    call_soon(&lp, l.call_connection_lost.bind(py), &[tr, exc])?;
    Ok(true)
}

native_method!(close_raw, "_close_py", |l, tr, []| {
    close(l, tr).map(|()| true)
});

// ---- connection_lost -----------------------------------------------------------------------

/// `_call_connection_lost(exc)`: `StreamTransport`'s and `SocketTransportBase`'s.
fn call_connection_lost(l: &Life, tr: &Bound<'_, PyAny>, exc: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = tr.py();
    let s = SLOTS.reader(tr);
    let lost = (|| {
        // `self._protocol_connected`: a class attribute (the instance has no __dict__).
        // SAFETY: a live object's type; a borrowed reference or NULL, no code run.
        let connected = unsafe {
            _PyType_Lookup(
                ffi::Py_TYPE(tr.as_ptr()),
                intern!(py, "_protocol_connected").as_ptr(),
            )
        };
        let connected = if connected.is_null() {
            tr.getattr(intern!(py, "_protocol_connected"))?
        } else {
            // SAFETY: non-NULL, borrowed from the type's dict for this call.
            unsafe { Bound::from_borrowed_ptr(py, connected) }
        };
        if truthy(&connected)? {
            s.get(PROTOCOL)?
                .call_method1(intern!(py, "connection_lost"), (exc,))?;
        }
        Ok(())
    })();
    // The `finally:` of SocketTransportBase._call_connection_lost.
    let teardown = teardown(l, tr, &s);
    // The `finally:` of StreamTransport._call_connection_lost.
    let waiter = (|| {
        let w = s.get(EMPTY_WAITER)?;
        if !w.is_none() {
            let err = PyConnectionError::new_err("Connection is closed by peer");
            w.call_method1(intern!(py, "set_exception"), (err.into_value(py),))?;
        }
        Ok(())
    })();
    // As with nested try/finally: the last exception raised is the one that propagates.
    waiter.and(teardown.and(lost))
}

fn teardown(
    l: &Life,
    tr: &Bound<'_, PyAny>,
    s: &crate::slots::SlotReader<'_, '_, 17>,
) -> PyResult<()> {
    let py = tr.py();
    let extra = s.get(EXTRA)?;
    if !extra.is_instance_of::<PyDict>() {
        // _complete_extra(), while the socket can still tell its name.
        complete_extra(l, s, &extra)?;
    }
    let lp = s.get(LOOP)?;
    let fd = s.get(SOCK_FD)?;
    // _forget_fd(loop): TransportTable.discard(fd, self)
    if let Some(table) = transport_table(&lp)? {
        let refs = TABLE_SLOTS.reader(&table).get(0)?;
        let refs = refs.cast::<PyDict>()?;
        if let Some(r) = refs.get_item(&fd)? {
            let mut obj = std::ptr::null_mut();
            // SAFETY: `r` is live; PyWeakref_GetRef checks its type, and returns a new
            // reference (1), NULL for a dead referent (0) or -1 with an exception set.
            let got = unsafe { ffi::compat::PyWeakref_GetRef(r.as_ptr(), &mut obj) };
            if got < 0 {
                return Err(PyErr::fetch(py));
            }
            let same = obj.is_null() || obj == tr.as_ptr();
            if !obj.is_null() {
                // SAFETY: the new reference just returned.
                unsafe { ffi::Py_DECREF(obj) };
            }
            if same {
                refs.del_item(&fd)?;
            }
        }
    }
    let sock = s.get(SOCK)?;
    close_socket(l, &sock)?;
    let none = py.None().into_bound(py);
    s.set(SOCK, &none)?;
    s.set(PROTOCOL, &none)?;
    s.set(LOOP, &none)?;
    let server = s.get(SERVER)?;
    if !server.is_none() {
        server_detach(&server, tr)?;
        s.set(SERVER, &none)?;
    }
    Ok(())
}

/// What `_complete_extra()` would need later, taken while the socket is open: `_extra`
/// becomes `(_CLOSED_EXTRA, peername, sockname, socket)` and `_complete_extra` builds
/// asyncio's dict from it if anyone asks (most closed transports are freed unasked).
fn complete_extra(
    l: &Life,
    s: &crate::slots::SlotReader<'_, '_, 17>,
    peername: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = peername.py();
    let sock = s.get(SOCK)?;
    if sock.is_none() {
        let extra = PyDict::new(py);
        extra.set_item(intern!(py, "peername"), peername)?;
        return s.set(EXTRA, extra.as_any());
    }
    let family = socket_fields(l, &sock).map(|(family, _, _)| family);
    // Accepted by a server listening on one IPv4 address: that address (looked up once).
    let local = if family == Some(libc::AF_INET) {
        server_local_name(s)
    } else {
        None
    };
    let name = match family {
        _ if local.is_some() => Ok(local),
        // An inet socket's name read and formatted here (as the socket module does).
        Some(family) if family == libc::AF_INET || family == libc::AF_INET6 => {
            let fd = small_int(&s.get(SOCK_FD)?)?;
            crate::sock_io::local_address(py, fd).map(|a| a.map(|a| a.into_bound(py)))
        }
        _ => Ok(None),
    };
    let name = match name {
        Ok(Some(n)) => Ok(n),
        Ok(None) => sock.call_method0(intern!(py, "getsockname")),
        Err(e) => Err(e),
    };
    let name = match name {
        Ok(n) => n,
        Err(e) if e.is_instance_of::<PyOSError>(py) => py.None().into_bound(py),
        Err(e) => return Err(e),
    };
    let held = PyTuple::new(py, [l.closed_extra.bind(py), peername, &name, &sock])?;
    s.set(EXTRA, held.as_any())
}

/// The `_local_name` of the transport's server (ferroloop's `Server`): the local address of
/// every connection it accepted, when it listens on one IPv4 address.
fn server_local_name<'py>(s: &crate::slots::SlotReader<'_, 'py, 17>) -> Option<Bound<'py, PyAny>> {
    let server = s.get(SERVER).ok()?;
    let sv = SERVER_CLASS.get(server.py())?;
    // SAFETY: a live object's type.
    if unsafe { ffi::Py_TYPE(server.as_ptr()) } != sv.cls.as_ptr().cast() {
        return None;
    }
    let name = SERVER_SLOTS.reader(&server).get(SV_LOCAL_NAME).ok()?;
    name.is_exact_instance_of::<PyTuple>().then_some(name)
}

/// `sock.close()` for exactly `socket.socket`: `_closed = True`, then the C close unless a
/// `makefile()` object still uses the socket.
fn close_socket(l: &Life, sock: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = sock.py();
    if socket_fields(l, sock).is_none() {
        sock.call_method0(intern!(py, "close"))?;
        return Ok(());
    }
    let s = SOCKET_SLOTS.reader(sock);
    s.set(
        CLOSED,
        &pyo3::types::PyBool::new(py, true).to_owned().into_any(),
    )?;
    let io_refs = s.get(IO_REFS)?;
    if io_refs.le(0)? {
        // SAFETY: live objects; a one-argument vectorcall (no tuple) returning a new
        // reference or NULL with an exception set.
        unsafe {
            let args = [sock.as_ptr()];
            let r = ffi::PyObject_Vectorcall(
                l.raw_close.as_ptr(),
                args.as_ptr(),
                1,
                std::ptr::null_mut(),
            );
            Bound::from_owned_ptr_or_err(py, r)?;
        }
    }
    Ok(())
}

native_method!(
    call_connection_lost_raw,
    "_call_connection_lost_py",
    |l, tr, [exc]| call_connection_lost(l, tr, &exc).map(|()| true)
);

// ---- __del__ -------------------------------------------------------------------------------

native_method!(del_raw, "_del_py", |_, tr, []| {
    // A closed transport (or one whose __init__ never set the socket): nothing to do.
    Ok(SLOTS.reader(tr).get_or_none(SOCK)?.is_none())
});

const METHODS: [(&CStr, Raw, &CStr); 5] = [
    (
        c"__init__",
        init_raw,
        c"__init__($self, loop, sock, protocol, waiter=None, extra=None, server=None, peername=None)\n--\n\n",
    ),
    (
        c"_start_reading",
        start_reading_raw,
        c"_start_reading($self, /)\n--\n\nStart watching the socket for reading (after connection_made).",
    ),
    (
        c"close",
        close_raw,
        c"close($self, /)\n--\n\nClose the transport: connection_lost follows in a later iteration.",
    ),
    (
        c"_call_connection_lost",
        call_connection_lost_raw,
        c"_call_connection_lost($self, exc, /)\n--\n\n",
    ),
    (c"__del__", del_raw, c"__del__($self, /)\n--\n\n"),
];

/// Installs the native lifecycle on `StreamTransport` (the Python methods must already be
/// kept as `_init_py`, `_start_reading_py`, `_close_py`, `_call_connection_lost_py` and
/// `_del_py`).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn install_stream_lifecycle(
    cls: &Bound<'_, PyType>,
    socket_type: &Bound<'_, PyType>,
    buffered_protocol: &Bound<'_, PyAny>,
    no_queue: &Bound<'_, PyAny>,
    high_water: &Bound<'_, PyAny>,
    low_water: &Bound<'_, PyAny>,
    raw_close: &Bound<'_, PyAny>,
    closed_extra: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = cls.py();
    crate::transports::install_methods_on_class(cls, &METHODS)?;
    let l = Life {
        cls: cls.clone().unbind(),
        socket_type: socket_type.clone().unbind(),
        buffered_protocol: buffered_protocol.clone().unbind(),
        no_queue: no_queue.clone().unbind(),
        high_water: high_water.clone().unbind(),
        low_water: low_water.clone().unbind(),
        raw_close: raw_close.clone().unbind(),
        read_ready: cls.getattr("_read_ready")?.unbind(),
        call_connection_lost: cls.getattr("_call_connection_lost")?.unbind(),
        start_reading: cls.getattr("_start_reading")?.unbind(),
        closed_extra: closed_extra.clone().unbind(),
        init_descr: cls.getattr("__dict__")?.get_item("__init__")?.unbind(),
        protocol_eof_received: py
            .import("asyncio.protocols")?
            .getattr("Protocol")?
            .getattr("__dict__")?
            .get_item("eof_received")?
            .unbind(),
    };
    let _ = LIFE.set(py, l);
    Ok(())
}

// ---- accepting -----------------------------------------------------------------------------

extern "C" {
    // CPython's public C API (not declared by pyo3-ffi).
    fn PySys_Audit(event: *const std::ffi::c_char, format: *const std::ffi::c_char, ...) -> c_int;
}

/// Byte offsets in `_socket.socket`'s C object (`SockHead`, then the error handler, then the
/// timeout in nanoseconds).
const SOCK_FD_AT: usize = std::mem::offset_of!(SockHead, fd);
const SOCK_TIMEOUT_AT: usize = std::mem::size_of::<SockHead>() + std::mem::size_of::<usize>();

/// Whether those offsets hold what a socket made the ordinary way holds (checked once, on a
/// probe socket with a timeout set, then cleared): if so, `new_socket` fills an accepted
/// socket's fields itself, as `_socket.socket.__init__` would, without the `getsockname()`
/// with which `__init__` checks that a descriptor it is given is a socket.
static SOCK_LAYOUT_CHECKED: PyOnceLock<bool> = PyOnceLock::new();

fn sock_layout_checked(py: Python<'_>, socket_type: &Bound<'_, PyType>) -> bool {
    *SOCK_LAYOUT_CHECKED.get_or_init(py, || {
        let check = || -> PyResult<bool> {
            let probe = socket_type.call1((libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_TCP))?;
            let read = |probe: &Bound<'_, PyAny>| {
                let p = probe.as_ptr().cast::<u8>();
                // SAFETY: a live `_socket.socket` object, at least as large as the fields
                // read (its basic size is checked first); unaligned reads of plain integers.
                unsafe {
                    (
                        std::ptr::read_unaligned(p.add(SOCK_FD_AT).cast::<c_int>()),
                        std::ptr::read_unaligned(p.add(SOCK_FD_AT + 4).cast::<c_int>()),
                        std::ptr::read_unaligned(p.add(SOCK_FD_AT + 8).cast::<c_int>()),
                        std::ptr::read_unaligned(p.add(SOCK_FD_AT + 12).cast::<c_int>()),
                        std::ptr::read_unaligned(p.add(SOCK_TIMEOUT_AT).cast::<i64>()),
                    )
                }
            };
            let result = (|| -> PyResult<bool> {
                // SAFETY: a live type object.
                let size = unsafe { (*ffi::Py_TYPE(probe.as_ptr())).tp_basicsize };
                if usize::try_from(size).unwrap_or(0) < SOCK_TIMEOUT_AT + 8 {
                    return Ok(false);
                }
                let fd: c_int = probe.call_method0("fileno")?.extract()?;
                probe.call_method1("settimeout", (1.5,))?;
                let with_timeout = read(&probe)
                    == (
                        fd,
                        libc::AF_INET,
                        libc::SOCK_STREAM,
                        libc::IPPROTO_TCP,
                        1_500_000_000,
                    );
                probe.call_method1("settimeout", (0.0,))?;
                Ok(with_timeout && read(&probe).4 == 0)
            })();
            probe.call_method0("close")?;
            result
        };
        check().unwrap_or(false)
    })
}

/// `socket.socket(family, type, proto, fd)` for a descriptor just accepted: the C socket's
/// `__init__`, then the two slots `socket.socket.__init__` sets, without its Python frame.
/// With `SOCK_NONBLOCK` in `stype` and the layout checked, `__init__`'s work is done here:
/// its audit event, then the fields it sets (the type without `SOCK_NONBLOCK` and
/// `SOCK_CLOEXEC`, a zero timeout).
fn new_socket<'py>(
    py: Python<'py>,
    socket_type: &Bound<'py, PyType>,
    family: c_int,
    stype: c_int,
    proto: c_int,
    fd: c_int,
) -> PyResult<Bound<'py, PyAny>> {
    // Only for `socket.socket` itself: a replacement's own `__init__` must run.
    let exact = LIFE
        .get(py)
        .is_some_and(|l| socket_type.is(l.socket_type.bind(py)));
    let obj = if exact && stype & libc::SOCK_NONBLOCK != 0 && sock_layout_checked(py, socket_type) {
        // SAFETY: a live type (a subclass of `_socket.socket`); its `tp_new` (the C socket's)
        // returns a new reference with the descriptor unset (-1), or NULL with an exception
        // set. PySys_Audit takes the object and three C ints for "Oiii". The fields written
        // are at the offsets checked above, in an object of this same C type.
        unsafe {
            let tp = socket_type.as_type_ptr();
            let Some(new) = (*tp).tp_new else {
                return Err(pyo3::exceptions::PyTypeError::new_err("not a socket type"));
            };
            let empty = PyTuple::empty(py);
            let obj =
                Bound::from_owned_ptr_or_err(py, new(tp, empty.as_ptr(), std::ptr::null_mut()))?;
            if PySys_Audit(
                c"socket.__new__".as_ptr(),
                c"Oiii".as_ptr(),
                obj.as_ptr(),
                family,
                stype,
                proto,
            ) < 0
            {
                return Err(PyErr::fetch(py));
            }
            let p = obj.as_ptr().cast::<u8>();
            let kind = stype & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
            std::ptr::write_unaligned(p.add(SOCK_FD_AT).cast::<c_int>(), fd);
            std::ptr::write_unaligned(p.add(SOCK_FD_AT + 4).cast::<c_int>(), family);
            std::ptr::write_unaligned(p.add(SOCK_FD_AT + 8).cast::<c_int>(), kind);
            std::ptr::write_unaligned(p.add(SOCK_FD_AT + 12).cast::<c_int>(), proto);
            std::ptr::write_unaligned(p.add(SOCK_TIMEOUT_AT).cast::<i64>(), 0);
            obj
        }
    } else {
        let args = PyTuple::new(
            py,
            [
                family.into_pyobject(py)?,
                stype.into_pyobject(py)?,
                proto.into_pyobject(py)?,
                fd.into_pyobject(py)?,
            ],
        )?;
        // SAFETY: a live type (a subclass of `_socket.socket`): its `tp_new` and its base's
        // `tp_init` are called as `type.__call__` and `_socket.socket.__init__` call them; each
        // returns a new reference (or 0) or NULL (or -1) with an exception set.
        unsafe {
            let tp = socket_type.as_type_ptr();
            let base = (*tp).tp_base;
            let (Some(new), Some(init)) = ((*tp).tp_new, (*base).tp_init) else {
                return Err(pyo3::exceptions::PyTypeError::new_err("not a socket type"));
            };
            let obj =
                Bound::from_owned_ptr_or_err(py, new(tp, args.as_ptr(), std::ptr::null_mut()))?;
            if init(obj.as_ptr(), args.as_ptr(), std::ptr::null_mut()) != 0 {
                return Err(PyErr::fetch(py));
            }
            obj
        }
    };
    let s = SOCKET_SLOTS.reader(&obj);
    s.set(IO_REFS, &0i32.into_pyobject(py)?.into_any())?;
    s.set(
        CLOSED,
        &pyo3::types::PyBool::new(py, false).to_owned().into_any(),
    )?;
    Ok(obj)
}

/// One `accept4()` on a TCP listener (`sock_io::accept_inet`), the connection wrapped in a
/// `socket.socket` of the given family, type and proto: `(sock, peer address)`, or None when
/// there is nothing to accept.
#[pyfunction]
pub fn accept_socket<'py>(
    py: Python<'py>,
    fd: c_int,
    socket_type: &Bound<'py, PyType>,
    family: c_int,
    stype: c_int,
    proto: c_int,
) -> PyResult<Option<(Bound<'py, PyAny>, Py<PyAny>)>> {
    let Some((conn, addr)) = crate::sock_io::accept_inet(py, fd)? else {
        return Ok(None);
    };
    match new_socket(py, socket_type, family, stype, proto, conn) {
        Ok(sock) => Ok(Some((sock, addr))),
        Err(e) => {
            // SAFETY: `conn` was just accepted and no socket object took it.
            unsafe { libc::close(conn) };
            Err(e)
        }
    }
}

/// `StreamTransport(lp, sock, protocol, None, None, server, peername)` for an exact
/// `socket.socket`. While the class is made the plain way (metaclass `type`, `object.__new__`,
/// not abstract) and its `__init__` is still the native one, what `type.__call__` would do is
/// done directly: the instance allocated, then the native `__init__`'s body (see `init_raw`),
/// without the argument tuple and the calls between.
fn new_transport<'py>(
    l: &Life,
    lp: &Bound<'py, PyAny>,
    sock: &Bound<'py, PyAny>,
    protocol: &Bound<'py, PyAny>,
    server: &Bound<'py, PyAny>,
    peername: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = lp.py();
    let cls = l.cls.bind(py);
    let tp = cls.as_type_ptr();
    // SAFETY: live type objects; `_PyType_Lookup` returns a borrowed reference (compared).
    let alloc = unsafe {
        let plain = ffi::Py_TYPE(cls.as_ptr()) == std::ptr::addr_of_mut!(ffi::PyType_Type)
            && (*tp).tp_new.map(|f| f as usize)
                == (*std::ptr::addr_of_mut!(ffi::PyBaseObject_Type))
                    .tp_new
                    .map(|f| f as usize)
            && (*tp).tp_flags & ffi::Py_TPFLAGS_IS_ABSTRACT == 0
            && _PyType_Lookup(tp, intern!(py, "__init__").as_ptr()) == l.init_descr.as_ptr();
        if plain {
            (*tp).tp_alloc
        } else {
            None
        }
    };
    let Some(alloc) = alloc else {
        let none = py.None().into_bound(py);
        return cls.call1((lp, sock, protocol, &none, &none, server, peername));
    };
    // SAFETY: `tp_alloc` of a live type returns a new reference (a zeroed instance, every
    // slot unset, as `object.__new__` returns it) or NULL with an exception set.
    let tr = unsafe { Bound::from_owned_ptr_or_err(py, alloc(tp, 0))? };
    init(l, &tr, lp, sock, protocol, server, peername)?;
    Ok(tr)
}

/// `_accept_plain_connection` (`python/ferroloop/_net/server.py`) for a loop whose
/// `_make_socket_transport` is ferroloop's: the protocol factory, then the transport (for an
/// exact `socket.socket`, `StreamTransport(...)` as `_make_socket_transport` calls it). An
/// error goes to the Python `_accepted_setup_failed`, as asyncio's accept task handles it.
#[pyfunction]
pub fn accept_plain_connection(
    lp: &Bound<'_, PyAny>,
    protocol_factory: &Bound<'_, PyAny>,
    conn: &Bound<'_, PyAny>,
    addr: &Bound<'_, PyAny>,
    server: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = lp.py();
    let mut protocol = None;
    let mut transport = None;
    let r = (|| {
        let p = protocol_factory.call0()?;
        protocol = Some(p.clone());
        let t = match LIFE.get(py) {
            Some(l) if socket_fields(l, conn).is_some() => {
                new_transport(l, lp, conn, &p, server, addr)?
            }
            _ => {
                let kw = PyDict::new(py);
                kw.set_item(intern!(py, "server"), server)?;
                kw.set_item(intern!(py, "peername"), addr)?;
                lp.getattr(intern!(py, "_make_socket_transport"))?
                    .call((conn, &p), Some(&kw))?
            }
        };
        transport = Some(t);
        Ok(())
    })();
    let Err(err) = r else {
        return Ok(());
    };
    if crate::stdlib::is_exit_exception(py, &err) {
        return Err(err);
    }
    // The error path is the Python one (`Loop._accepted_setup_failed`): reported in debug mode
    // only, the socket closed if no transport owns it.
    let none = || py.None().into_bound(py);
    lp.call_method1(
        intern!(py, "_accepted_setup_failed"),
        (
            err.into_value(py),
            conn,
            protocol.unwrap_or_else(none),
            transport.unwrap_or_else(none),
        ),
    )?;
    Ok(())
}

/// `_accept_connection`'s loop for a plain TCP listener outside debug mode: up to `backlog`
/// connections accepted, each wrapped in a `socket.socket` (`accept_socket`) and its set-up
/// scheduled as `loop.call_soon(setup, loop, protocol_factory, sock, addr, server)`. Returns
/// when nothing more is pending; an error of `accept4` (out of fds...) is raised for the
/// caller to handle, after the connections accepted before it were scheduled.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn accept_connections(
    lp: &Bound<'_, PyAny>,
    fd: c_int,
    socket_type: &Bound<'_, PyType>,
    family: c_int,
    stype: c_int,
    proto: c_int,
    backlog: usize,
    setup: &Bound<'_, PyAny>,
    protocol_factory: &Bound<'_, PyAny>,
    server: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = lp.py();
    for _ in 0..backlog {
        let Some((sock, addr)) = accept_socket(py, fd, socket_type, family, stype, proto)? else {
            return Ok(());
        };
        call_soon(
            lp,
            setup,
            &[lp, protocol_factory, &sock, addr.bind(py), server],
        )?;
    }
    Ok(())
}

/// `ServingMixin._accept_connection(protocol_factory, sock, sslcontext, server, backlog,
/// ssl_handshake_timeout, ssl_shutdown_timeout)` without its Python frame, the listener's
/// reader callback (`_start_serving` registers it for a plain TCP `socket.socket` when the
/// loop's `_accept_connection` is the mixin's): the batch of `accept_connections`, its set-up
/// callback chosen as the Python method chooses it. Debug mode, a replaced `get_debug` and
/// any other case go to the Python method, the reference implementation.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn accept_ready(
    lp: &Bound<'_, PyAny>,
    protocol_factory: &Bound<'_, PyAny>,
    sock: &Bound<'_, PyAny>,
    sslcontext: &Bound<'_, PyAny>,
    server: &Bound<'_, PyAny>,
    backlog: &Bound<'_, PyAny>,
    ssl_handshake_timeout: &Bound<'_, PyAny>,
    ssl_shutdown_timeout: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = lp.py();
    let plan = (|| {
        let l = LIFE.get(py)?;
        let sv = SERVER_CLASS.get(py)?;
        let (family, stype, proto) = socket_fields(l, sock)?;
        if !sslcontext.is_none() || !(family == libc::AF_INET || family == libc::AF_INET6) {
            return None;
        }
        let core = lp.cast::<LoopCore>().ok()?;
        if core.get().shared.debug() {
            return None;
        }
        let dict = instance_dict(lp).ok()?;
        if !core_method(
            lp,
            &dict,
            &CORE_GET_DEBUG,
            &GET_DEBUG_MEMO,
            intern!(py, "get_debug"),
        ) {
            return None;
        }
        let backlog = backlog.extract::<usize>().ok()?;
        // SAFETY: an exact `socket.socket` (checked above) starts with `SockHead`.
        let fd = unsafe { (*sock.as_ptr().cast::<SockHead>()).fd };
        // `getattr(self._make_socket_transport, "__func__", None) is
        // _DEFAULT_MAKE_SOCKET_TRANSPORT`: the class's, not shadowed on the instance.
        let name = intern!(py, "_make_socket_transport");
        // SAFETY: a live object's type; a borrowed reference (compared) or NULL.
        let default_make = unsafe { _PyType_Lookup(ffi::Py_TYPE(lp.as_ptr()), name.as_ptr()) }
            == sv.make_socket_transport.as_ptr()
            && MAKE_TRANSPORT_MEMO.check(&dict, || matches!(dict.contains(name), Ok(false)));
        Some((l, sv, fd, family, stype, proto, backlog, default_make))
    })();
    let Some((l, sv, fd, family, stype, proto, backlog, default_make)) = plan else {
        lp.call_method1(
            intern!(py, "_accept_connection"),
            (
                protocol_factory,
                sock,
                sslcontext,
                server,
                backlog,
                ssl_handshake_timeout,
                ssl_shutdown_timeout,
            ),
        )?;
        return Ok(());
    };
    let setup = if default_make {
        sv.accept_plain.bind(py).clone()
    } else {
        lp.get_type()
            .getattr(intern!(py, "_accept_plain_connection"))?
    };
    let err = match accept_connections(
        lp,
        fd,
        l.socket_type.bind(py),
        family,
        stype | libc::SOCK_NONBLOCK,
        proto,
        backlog,
        &setup,
        protocol_factory,
        server,
    ) {
        Ok(()) => return Ok(()),
        Err(e) if e.is_instance_of::<PyOSError>(py) => e,
        Err(e) => return Err(e),
    };
    let errno = err.value(py).getattr(intern!(py, "errno"))?;
    let out_of_resources = match errno.extract::<c_int>() {
        Ok(n) => matches!(
            n,
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
        ),
        Err(_) => false,
    };
    if !out_of_resources {
        return Err(err); // the loop reports it through the exception handler
    }
    lp.call_method1(
        intern!(py, "_accept_out_of_resources"),
        (
            err.into_value(py),
            protocol_factory,
            sock,
            sslcontext,
            server,
            backlog,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
        ),
    )?;
    Ok(())
}
