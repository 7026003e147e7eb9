//! Native fast paths of the datagram transport (`python/ferroloop/_net/datagram.py`):
//! `_read_ready` receives a datagram into the loop's buffer and calls
//! `protocol.datagram_received`; `sendto` sends a bytes object at once when nothing is queued.
//! Other cases go to the Python methods (`_read_ready_py`, `_sendto_py`).

use std::ffi::CStr;

use pyo3::exceptions::{PyBlockingIOError, PyInterruptedError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyType};
use pyo3::{ffi, intern};

use crate::event_loop::fastcall::trampoline;
use crate::transports::{fatal, install, Raw};

fn datagram_read_ready(tr: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = tr.py();
    if !tr.getattr(intern!(py, "_inet"))?.is_truthy()? {
        tr.call_method0(intern!(py, "_read_ready_py"))?;
        return Ok(());
    }
    if tr.getattr(intern!(py, "_conn_lost"))?.is_truthy()? {
        return Ok(());
    }
    let fd: i32 = tr.getattr(intern!(py, "_sock_fd"))?.extract()?;
    match crate::sock_io::recvfrom_inet(py, fd, 256 * 1024) {
        Ok((data, addr)) => {
            let protocol = tr.getattr(intern!(py, "_protocol"))?;
            protocol.call_method1(intern!(py, "datagram_received"), (data, addr))?;
            Ok(())
        }
        Err(e)
            if e.is_instance_of::<PyBlockingIOError>(py)
                || e.is_instance_of::<PyInterruptedError>(py) =>
        {
            Ok(())
        }
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyOSError>(py) => {
            let protocol = tr.getattr(intern!(py, "_protocol"))?;
            protocol.call_method1(intern!(py, "error_received"), (e.into_value(py),))?;
            Ok(())
        }
        Err(e) => fatal(tr, e, "Fatal read error on datagram transport"),
    }
}

/// A numeric IPv4 `(host, port)` as a sockaddr, or None (the Python path resolves the rest).
fn inet_sockaddr(addr: &Bound<'_, PyAny>) -> Option<libc::sockaddr_in> {
    let t = addr.cast::<pyo3::types::PyTuple>().ok()?;
    if t.len() != 2 {
        return None;
    }
    let host: String = t.get_item(0).ok()?.extract().ok()?;
    let port: u16 = t.get_item(1).ok()?.extract().ok()?;
    let ip: std::net::Ipv4Addr = host.parse().ok()?;
    // SAFETY: an all-zero sockaddr_in is a valid value; the fields are filled below.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = port.to_be();
    sa.sin_addr.s_addr = u32::from(ip).to_be();
    Some(sa)
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
    let fast = data.is_exact_instance_of::<PyBytes>()
        && data.len()? > 0
        && tr.getattr(intern!(py, "_inet"))?.is_truthy()?
        && tr.getattr(intern!(py, "_address"))?.is_none()
        && tr.getattr(intern!(py, "_buffer"))?.len()? == 0
        && !tr.getattr(intern!(py, "_conn_lost"))?.is_truthy()?;
    if !fast {
        return fallback();
    }
    let Some(sa) = inet_sockaddr(addr) else {
        return fallback();
    };
    let bytes = data.cast::<PyBytes>()?.as_bytes();
    let fd: i32 = tr.getattr(intern!(py, "_sock_fd"))?.extract()?;
    // SAFETY: `bytes` and `sa` are valid for the call; sizes are given exactly.
    let r = unsafe {
        libc::sendto(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r >= 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // Socket buffer full: the Python path queues the datagram and waits for writability.
        Some(libc::EAGAIN) | Some(libc::EINTR) => fallback(),
        _ => {
            let protocol = tr.getattr(intern!(py, "_protocol"))?;
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
    _args: *const *mut ffi::PyObject,
    _nargsf: ffi::Py_ssize_t,
    _kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    trampoline(|py| {
        // SAFETY: CPython passes a live `self`.
        let tr = unsafe { Bound::from_borrowed_ptr(py, slf) };
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
        if !kwnames.is_null() || !(1..=2).contains(&nargs) {
            // Keyword or unusual calls: the Python method parses them.
            let m = tr.getattr(intern!(py, "_sendto_py"))?;
            // SAFETY: forwarding the caller's valid vectorcall triple unchanged.
            let r = unsafe { ffi::PyObject_Vectorcall(m.as_ptr(), args, nargsf as usize, kwnames) };
            // SAFETY: a new reference or NULL with an exception set.
            return unsafe { Bound::from_owned_ptr_or_err(py, r) }.map(Bound::unbind);
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

const DATAGRAM_METHODS: [(&CStr, Raw, &CStr); 2] = [
    (
        c"_read_ready",
        datagram_read_ready_raw,
        c"_read_ready($self, /)\n--\n\nThe socket is readable: receive one datagram.",
    ),
    (
        c"sendto",
        datagram_sendto_raw,
        c"sendto($self, data, addr=None, /)\n--\n\nSend a datagram (at once when possible).",
    ),
];

/// Installs the native `_read_ready` and `sendto` on the given datagram transport class.
#[pyfunction]
pub fn install_datagram_fast_paths(cls: &Bound<'_, PyType>) -> PyResult<()> {
    install(cls, &DATAGRAM_METHODS)
}
