//! Reads into a loop-thread buffer, returned as an exact-size `bytes`.
//!
//! `socket.recv(256 KiB)` and `os.read(fd, 256 KiB)` allocate a 256 KiB `bytes`, read into it
//! and shrink it: above glibc's mmap threshold that is an mmap, an mremap and a munmap per
//! read (measured: three extra syscalls for every 1 KiB echo). Here the kernel writes into one
//! reusable buffer and only the bytes received are copied into a new object.
//!
//! For big reads that copy is most of the user-space cost (a 100 KiB echo spends more time in
//! `memcpy` than anywhere else), so a stream whose reads are big is read straight into a new
//! `bytes` of the size its last reads had, with the loop buffer behind it (one `readv`) for
//! whatever does not fit: see [`read_stream`].

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddrV4};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::os_error;

const BUF_SIZE: usize = 256 * 1024;

thread_local! {
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; BUF_SIZE]);
}

fn with_buf<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    READ_BUF.with(|b| match b.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        // Re-entered from a signal handler or similar: use a private buffer.
        Err(_) => f(&mut vec![0u8; BUF_SIZE]),
    })
}

/// `read(fd, max)` → bytes (empty at EOF). Errors are `OSError` with errno
/// (`BlockingIOError` for EAGAIN, `InterruptedError` for EINTR), as `os.read` raises them.
#[pyfunction]
#[pyo3(signature = (fd, max_size = BUF_SIZE))]
pub fn read_bytes(py: Python<'_>, fd: i32, max_size: usize) -> PyResult<Py<PyBytes>> {
    with_buf(|buf| {
        let n = max_size.min(buf.len());
        // SAFETY: `buf[..n]` is a valid writable region; the kernel writes at most n bytes.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), n) };
        if r < 0 {
            return Err(os_error(std::io::Error::last_os_error()));
        }
        Ok(PyBytes::new(py, &buf[..r as usize]).unbind())
    })
}

/// Reads at least this big make their fd read straight into a new `bytes`.
const DIRECT_MIN: usize = 4 * 1024;

thread_local! {
    /// Per fd: the size of `bytes` to read into directly, 0 for "read into the loop buffer".
    /// Only a hint: a stale entry for a reused fd costs one oversized allocation, then decays.
    static READ_HINTS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

fn hint(fd: i32) -> usize {
    READ_HINTS.with(|h| {
        h.try_borrow()
            .ok()
            .and_then(|h| h.get(fd as usize).copied())
            .unwrap_or(0) as usize
    })
}

fn set_hint(fd: i32, size: usize) {
    if fd < 0 {
        return;
    }
    READ_HINTS.with(|h| {
        if let Ok(mut h) = h.try_borrow_mut() {
            let i = fd as usize;
            if size == 0 && i >= h.len() {
                return;
            }
            if i >= h.len() {
                h.resize(i + 1, 0);
            }
            h[i] = size as u32;
        }
    })
}

extern "C" {
    // CPython's (private but exported and stable since 2.x) in-place resize of a fresh bytes.
    fn _PyBytes_Resize(bytes: *mut *mut pyo3::ffi::PyObject, newsize: pyo3::ffi::Py_ssize_t)
        -> i32;
}

/// One read of up to 256 KiB from a stream fd → bytes (empty at EOF), into the loop buffer or,
/// for an fd whose reads are big, straight into the new object.
pub(crate) fn read_stream(py: Python<'_>, fd: i32) -> Result<Bound<'_, PyBytes>, ReadError> {
    let size = hint(fd);
    if size < DIRECT_MIN {
        return with_buf(|buf| {
            // SAFETY: `buf` is a valid writable region of its length.
            let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if r < 0 {
                return Err(ReadError::Os(std::io::Error::last_os_error()));
            }
            let n = r as usize;
            if n >= DIRECT_MIN {
                set_hint(fd, n);
            }
            Ok(PyBytes::new(py, &buf[..n]))
        });
    }
    // Direct: the kernel writes into the new object; the loop buffer takes any excess.
    let cap = size.min(BUF_SIZE);
    // SAFETY: a NULL source makes an uninitialised bytes of `cap` bytes (a new reference or
    // NULL with an exception set).
    let mut obj = unsafe {
        pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), cap as pyo3::ffi::Py_ssize_t)
    };
    if obj.is_null() {
        return Err(ReadError::Py(PyErr::fetch(py)));
    }
    with_buf(|buf| {
        let tail = BUF_SIZE - cap;
        let iov = [
            libc::iovec {
                // SAFETY: `obj` is a live bytes object of `cap` bytes.
                iov_base: unsafe { pyo3::ffi::PyBytes_AsString(obj) }.cast(),
                iov_len: cap,
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: tail.min(buf.len()),
            },
        ];
        // SAFETY: both regions are valid and writable for their lengths.
        let r = unsafe { libc::readv(fd, iov.as_ptr(), 2) };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            // SAFETY: we own the only reference to `obj`.
            unsafe { pyo3::ffi::Py_DECREF(obj) };
            return Err(ReadError::Os(err));
        }
        let n = r as usize;
        let next = n.max(size / 2);
        set_hint(fd, if next >= DIRECT_MIN { next } else { 0 });
        if n != cap {
            // SAFETY: `obj` is a fresh bytes object nobody else references, as _PyBytes_Resize
            // requires; on failure it has released it and set `obj` to NULL.
            if unsafe { _PyBytes_Resize(&mut obj, n as pyo3::ffi::Py_ssize_t) } != 0 {
                return Err(ReadError::Py(PyErr::fetch(py)));
            }
            if n > cap {
                // SAFETY: `obj` now holds `n` bytes; the tail came into `buf[..n - cap]`.
                unsafe {
                    let dst = pyo3::ffi::PyBytes_AsString(obj).cast::<u8>().add(cap);
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, n - cap);
                }
            }
        }
        // SAFETY: `obj` is a new reference to a bytes object.
        Ok(unsafe { Bound::from_owned_ptr(py, obj).cast_into_unchecked() })
    })
}

/// Why [`read_stream`] failed: the read itself (with its errno), or Python (no memory).
pub(crate) enum ReadError {
    Os(std::io::Error),
    Py(PyErr),
}

/// What `socket.recvfrom` returns on an AF_INET socket.
type InetDatagram = (Py<PyBytes>, (String, u16));

/// `recvfrom(fd, max)` on an AF_INET datagram socket → (bytes, (host, port)), the value
/// `socket.recvfrom` returns. Only for AF_INET sockets (the caller checks the family; other
/// families use the socket's own method, which formats every address kind).
#[pyfunction]
#[pyo3(signature = (fd, max_size = BUF_SIZE))]
pub fn recvfrom_inet(py: Python<'_>, fd: i32, max_size: usize) -> PyResult<InetDatagram> {
    with_buf(|buf| {
        let n = max_size.min(buf.len());
        // SAFETY: an all-zero sockaddr_storage is a valid value.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: valid buffer and address out-pointers of the sizes given.
        let r = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                n,
                0,
                (&mut addr as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(os_error(std::io::Error::last_os_error()));
        }
        if addr.ss_family as i32 != libc::AF_INET {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "recvfrom_inet() needs an AF_INET socket",
            ));
        }
        // SAFETY: the family says the storage holds a sockaddr_in.
        let sin: libc::sockaddr_in =
            unsafe { std::ptr::read((&addr as *const libc::sockaddr_storage).cast()) };
        let a = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            u16::from_be(sin.sin_port),
        );
        Ok((
            PyBytes::new(py, &buf[..r as usize]).unbind(),
            (a.ip().to_string(), a.port()),
        ))
    })
}
