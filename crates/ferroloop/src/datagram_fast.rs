//! Native fast paths of the datagram transport (`python/ferroloop/_net/datagram.py`):
//! `_read_ready` receives the waiting datagrams (up to [`MAX_BATCH`]) into the loop's buffer and
//! calls `protocol.datagram_received` for each; `sendto` sends a bytes object at once when nothing
//! is queued (to a numeric IPv4 address, or on a connected socket of any family).
//! Other cases go to the Python methods (`_read_ready_py`, `_sendto_py`).

use std::ffi::CStr;
use std::sync::OnceLock;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyType};
use pyo3::{ffi, intern};

use crate::event_loop::fastcall::trampoline;
use crate::event_loop::LoopCore;
use crate::sock_io::RecvError;
use crate::transports::{fatal, forward, install, takes, Raw};

/// Byte offsets of the transport's `__slots__` fields in an instance of the exact class the fast
/// paths were installed on, so that the per-datagram reads are loads instead of generic
/// attribute lookups (~150 instructions each). Resolved from the class's member descriptors at
/// install time; any other type (a subclass, a stray `self`) takes the generic path.
struct Layout {
    cls: Py<PyType>,
    loop_: isize,
    closing: isize,
    paused: isize,
    buffer: isize,
    protocol: isize,
    conn_lost: isize,
    sock_fd: isize,
    inet: isize,
    sendto_fd: isize,
    send_fd: isize,
}

static LAYOUT: OnceLock<Layout> = OnceLock::new();

/// The offset of a `__slots__` field (a member descriptor holding an object), or None.
fn member_offset(cls: &Bound<'_, PyType>, name: &str) -> Option<isize> {
    let d = cls.getattr(name).ok()?;
    let member_type = std::ptr::addr_of_mut!(ffi::PyMemberDescr_Type);
    if d.get_type().as_ptr() != member_type.cast() {
        return None;
    }
    // SAFETY: `d` is a member descriptor, whose `d_member` points to its PyMemberDef (declared
    // with another pointer type by pyo3-ffi before 3.11; the object is the same).
    let m = unsafe {
        &*((*(d.as_ptr() as *mut ffi::PyMemberDescrObject)).d_member as *const ffi::PyMemberDef)
    };
    (m.type_code == ffi::Py_T_OBJECT_EX && m.offset > 0).then_some(m.offset)
}

fn resolve_layout(cls: &Bound<'_, PyType>) -> Option<Layout> {
    Some(Layout {
        cls: cls.clone().unbind(),
        loop_: member_offset(cls, "_loop")?,
        closing: member_offset(cls, "_closing")?,
        paused: member_offset(cls, "_paused")?,
        buffer: member_offset(cls, "_buffer")?,
        protocol: member_offset(cls, "_protocol")?,
        conn_lost: member_offset(cls, "_conn_lost")?,
        sock_fd: member_offset(cls, "_sock_fd")?,
        inet: member_offset(cls, "_inet")?,
        sendto_fd: member_offset(cls, "_sendto_fd")?,
        send_fd: member_offset(cls, "_send_fd")?,
    })
}

/// Reads the transport's fields: straight from its slots when it is an instance of the class
/// the layout was resolved for, else (or for an unset slot) by `getattr`, which also raises
/// the AttributeError.
struct Fields<'a, 'py> {
    tr: &'a Bound<'py, PyAny>,
    layout: Option<&'static Layout>,
}

impl<'a, 'py> Fields<'a, 'py> {
    fn of(tr: &'a Bound<'py, PyAny>) -> Self {
        let layout = LAYOUT.get().filter(|l| {
            // SAFETY: `tr` is a live object.
            unsafe { ffi::Py_TYPE(tr.as_ptr()) == l.cls.as_ptr().cast() }
        });
        Fields { tr, layout }
    }

    #[inline]
    fn get(
        &self,
        offset: fn(&Layout) -> isize,
        name: &Bound<'py, pyo3::types::PyString>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if let Some(l) = self.layout {
            // SAFETY: the object's exact type is the class whose member descriptors gave the
            // offset, so the slot is a (possibly NULL) object pointer inside the instance.
            let p = unsafe {
                *(self.tr.as_ptr() as *const u8)
                    .offset(offset(l))
                    .cast::<*mut ffi::PyObject>()
            };
            if !p.is_null() {
                // SAFETY: a live object referenced by the slot; a new reference is taken.
                return Ok(unsafe { Bound::from_borrowed_ptr(self.tr.py(), p) });
            }
        }
        self.tr.getattr(name)
    }

    /// A field's truth value; the bools the transport stores are recognised without a call.
    #[inline]
    fn flag(
        &self,
        offset: fn(&Layout) -> isize,
        name: &Bound<'py, pyo3::types::PyString>,
    ) -> PyResult<bool> {
        if let Some(l) = self.layout {
            // SAFETY: as in `get`; only the pointer is compared (with the bool singletons).
            let p = unsafe {
                *(self.tr.as_ptr() as *const u8)
                    .offset(offset(l))
                    .cast::<*mut ffi::PyObject>()
            };
            // SAFETY: the addresses of the static bool singletons.
            let (t, f) = unsafe { (ffi::Py_True(), ffi::Py_False()) };
            if p == t || p == f {
                return Ok(p == t);
            }
        }
        self.get(offset, name)?.is_truthy()
    }
}

/// Datagrams received per readiness event at most: the socket is drained in one loop iteration
/// (one `epoll_wait` for a burst instead of one per datagram), but a flood on one socket still
/// lets the other ready callbacks and timers run between bursts.
const MAX_BATCH: usize = 32;

pub(crate) fn datagram_read_ready(tr: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = tr.py();
    let f = Fields::of(tr);
    if !f.flag(|l| l.inet, intern!(py, "_inet"))? {
        tr.call_method0(intern!(py, "_read_ready_py"))?;
        return Ok(());
    }
    if f.get(|l| l.conn_lost, intern!(py, "_conn_lost"))?
        .is_truthy()?
    {
        return Ok(());
    }
    let fd: i32 = f.get(|l| l.sock_fd, intern!(py, "_sock_fd"))?.extract()?;
    let loop_obj = f.get(|l| l.loop_, intern!(py, "_loop"))?;
    let core = loop_obj.cast::<LoopCore>().ok();
    for i in 0..MAX_BATCH {
        // After the first datagram: stop as soon as the protocol closed, aborted or paused
        // the transport (its reader is then removed: asyncio would deliver nothing more; every
        // path that sets `_conn_lost` sets `_closing` first), or stopped the loop (asyncio
        // delivers one datagram per iteration, so the rest waits for the next run).
        if i > 0
            && (f.flag(|l| l.closing, intern!(py, "_closing"))?
                || f.flag(|l| l.paused, intern!(py, "_paused"))?
                || core.is_some_and(|c| c.get().is_stopping(py)))
        {
            return Ok(());
        }
        match crate::sock_io::recv_inet(py, fd, 256 * 1024) {
            Ok((data, addr)) => {
                let protocol = f.get(|l| l.protocol, intern!(py, "_protocol"))?;
                protocol.call_method1(intern!(py, "datagram_received"), (data, addr))?;
            }
            Err(RecvError::Os(e))
                if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) =>
            {
                return Ok(());
            }
            Err(RecvError::Os(e)) => {
                // An OSError (an ICMP error reported on a connected socket, say) goes to the
                // protocol; the next readiness event resumes receiving.
                let protocol = f.get(|l| l.protocol, intern!(py, "_protocol"))?;
                protocol.call_method1(
                    intern!(py, "error_received"),
                    (crate::errors::os_error(e).into_value(py),),
                )?;
                return Ok(());
            }
            Err(e) => return fatal(tr, e.into_pyerr(), "Fatal read error on datagram transport"),
        }
    }
    Ok(())
}

fn datagram_sendto(
    tr: &Bound<'_, PyAny>,
    data: &Bound<'_, PyAny>,
    addr: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = tr.py();
    let fallback = || -> PyResult<()> {
        tr.call_method1(intern!(py, "_sendto_py"), (data, addr))?;
        Ok(())
    };
    if !data.is_exact_instance_of::<PyBytes>() {
        return fallback();
    }
    let bytes = data.cast::<PyBytes>()?.as_bytes();
    // `sendto(data)` on a connected socket is a send(); `sendto(data, addr)` on an unconnected
    // AF_INET socket a sendto(). `_send_fd` / `_sendto_fd` hold the fd when that applies, else
    // -1. A closing transport and a queue that must keep its order take the Python path, as
    // does an address given to a connected socket (the Python method checks it).
    let f = Fields::of(tr);
    let connected = addr.is_none();
    let fd: i32 = if connected {
        f.get(|l| l.send_fd, intern!(py, "_send_fd"))?
    } else {
        f.get(|l| l.sendto_fd, intern!(py, "_sendto_fd"))?
    }
    .extract()?;
    let fast = fd >= 0
        && !bytes.is_empty()
        && !f.flag(|l| l.closing, intern!(py, "_closing"))?
        && f.get(|l| l.buffer, intern!(py, "_buffer"))?.len()? == 0;
    if !fast {
        return fallback();
    }
    let r = if connected {
        // SAFETY: `bytes` is valid for the call.
        unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), 0) }
    } else {
        let Some(sa) = crate::sock_io::inet_sockaddr(addr) else {
            return fallback();
        };
        // SAFETY: `bytes` and `sa` are valid for the call; sizes are given exactly.
        unsafe {
            libc::sendto(
                fd,
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
    };
    if r >= 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // Socket buffer full: the Python path queues the datagram and waits for writability.
        Some(libc::EAGAIN) | Some(libc::EINTR) => fallback(),
        _ => {
            let protocol = f.get(|l| l.protocol, intern!(py, "_protocol"))?;
            protocol.call_method1(
                intern!(py, "error_received"),
                (crate::errors::os_error(err).into_value(py),),
            )?;
            Ok(())
        }
    }
}

unsafe extern "C" fn datagram_read_ready_raw(
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
        datagram_read_ready(&tr).map(|()| py.None())
    })
}

unsafe extern "C" fn datagram_sendto_raw(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    trampoline(|py| {
        // SAFETY: CPython passes a live `self` and a valid vectorcall triple.
        let (tr, nargs) = unsafe {
            (
                Bound::from_borrowed_ptr(py, slf),
                ffi::PyVectorcall_NARGS(nargsf as usize),
            )
        };
        // SAFETY: as above.
        if unsafe { !takes(nargs as usize, nargsf, kwnames) } || !(1..=2).contains(&nargs) {
            // Keyword or unusual calls: the Python method parses them.
            // SAFETY: as above.
            return unsafe { forward(&tr, intern!(py, "_sendto_py"), args, nargsf, kwnames) };
        }
        // SAFETY: nargs >= 1, so args[0] (and args[1] when nargs == 2) are live references.
        let data = unsafe { Bound::from_borrowed_ptr(py, *args) };
        let none = py.None().into_bound(py);
        let addr = if nargs == 2 {
            // SAFETY: as above.
            unsafe { Bound::from_borrowed_ptr(py, *args.add(1)) }
        } else {
            none
        };
        datagram_sendto(&tr, &data, &addr).map(|()| py.None())
    })
}

/// The native `_read_ready`'s entry point, for `transports::NativeReader`.
pub(crate) const READ_READY_RAW: Raw = datagram_read_ready_raw;

const DATAGRAM_METHODS: [(&CStr, Raw, &CStr); 2] = [
    (
        c"_read_ready",
        datagram_read_ready_raw,
        c"_read_ready($self, /)\n--\n\nThe socket is readable: receive the waiting datagrams.",
    ),
    (
        c"sendto",
        datagram_sendto_raw,
        c"sendto($self, /, data, addr=None)\n--\n\nSend a datagram (at once when possible).",
    ),
];

/// Installs the native `_read_ready` and `sendto` on the given datagram transport class.
#[pyfunction]
pub fn install_datagram_fast_paths(cls: &Bound<'_, PyType>) -> PyResult<()> {
    if LAYOUT.get().is_none() {
        if let Some(layout) = resolve_layout(cls) {
            let _ = LAYOUT.set(layout);
        }
    }
    install(cls, &DATAGRAM_METHODS)
}
