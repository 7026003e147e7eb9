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
//! whatever does not fit: see [`read_stream`]. A `bytes` the protocol did not keep is kept
//! for the next read instead of being freed ([`recycle`]), so a steady echo allocates nothing.

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddrV4};

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::os_error;

const BUF_SIZE: usize = 256 * 1024;

/// The most one stream read returns: a read of this size may have left data behind.
pub(crate) const MAX_READ: usize = BUF_SIZE;

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

/// Per-thread state of [`read_stream`].
struct StreamReads {
    /// Per fd: the size of `bytes` to read into directly, 0 for "read into the loop buffer".
    /// Only a hint: a stale entry for a reused fd costs one oversized allocation, then decays.
    hints: RefCell<Vec<u32>>,
    /// A `bytes` a protocol let go of (see [`recycle`]), to read the next message into.
    spare: std::cell::Cell<Option<Py<PyBytes>>>,
}

thread_local! {
    static STREAM_READS: StreamReads = const {
        StreamReads {
            hints: RefCell::new(Vec::new()),
            spare: std::cell::Cell::new(None),
        }
    };
}

impl StreamReads {
    fn hint(&self, fd: i32) -> usize {
        self.hints
            .try_borrow()
            .ok()
            .and_then(|h| h.get(fd as usize).copied())
            .unwrap_or(0) as usize
    }

    #[inline]
    fn set_hint(&self, fd: i32, old: usize, size: usize) {
        if fd < 0 || size == old {
            return;
        }
        if let Ok(mut h) = self.hints.try_borrow_mut() {
            let i = fd as usize;
            if i >= h.len() {
                h.resize(i + 1, 0);
            }
            h[i] = size as u32;
        }
    }
}

extern "C" {
    // CPython's (private but exported and stable since 2.x) in-place resize of a bytes object
    // that nothing else references.
    fn _PyBytes_Resize(bytes: *mut *mut ffi::PyObject, newsize: ffi::Py_ssize_t) -> i32;
}

/// Keeps `data`, which [`read_stream`] returned and the protocol has finished with, for the
/// next read, if nothing else holds it.
///
/// A `bytes` that only we reference can be observed by no one, so refilling it is
/// indistinguishable from allocating a new one (CPython's own `zip` reuses its result tuple
/// on the same ground). In a steady echo this removes the allocation, the free and the copy
/// of every message. At most one object, of at most one read's size, is kept per thread.
pub(crate) fn recycle(data: Bound<'_, PyBytes>) {
    // SAFETY: reading the reference count and size of a live object.
    let (refs, len) = unsafe { (ffi::Py_REFCNT(data.as_ptr()), ffi::Py_SIZE(data.as_ptr())) };
    if refs != 1 || len <= 1 || len as usize > BUF_SIZE || !data.is_exact_instance_of::<PyBytes>() {
        return;
    }
    let old = STREAM_READS.with(|st| st.spare.replace(Some(data.unbind())));
    drop(old); // a bytes object runs no code when freed
}

/// One read of up to 256 KiB from a stream fd → bytes (empty at EOF). Big reads go straight
/// into the spare `bytes` (see [`recycle`]) or a new one of the size the fd's reads have; small
/// ones into the loop buffer, copied into the spare or a new object.
pub(crate) fn read_stream(py: Python<'_>, fd: i32) -> Result<Bound<'_, PyBytes>, ReadError> {
    STREAM_READS.with(|st| {
        let size = st.hint(fd);
        let spare = st.spare.take();
        if size < DIRECT_MIN {
            // Small reads: `read` into the loop buffer (a plain read costs the kernel less
            // than a readv) and a copy into the spare when the size matches, as it does in a
            // steady exchange of equal messages.
            return read_copied(py, st, fd, spare);
        }
        let obj = match spare {
            // SAFETY: the spare is a live bytes object.
            Some(sp) if unsafe { ffi::Py_SIZE(sp.as_ptr()) } as usize >= size => sp.into_ptr(),
            other => {
                drop(other);
                // SAFETY: a NULL source makes an uninitialised bytes of `size` bytes (a new
                // reference, or NULL with an exception set).
                let obj = unsafe {
                    ffi::PyBytes_FromStringAndSize(
                        std::ptr::null(),
                        size.min(BUF_SIZE) as ffi::Py_ssize_t,
                    )
                };
                if obj.is_null() {
                    return Err(ReadError::Py(PyErr::fetch(py)));
                }
                obj
            }
        };
        // SAFETY: `obj` is a bytes object we hold the only reference to.
        unsafe { read_direct(py, st, fd, obj, size) }
    })
}

/// Reads into the loop buffer and copies what came into the spare if it has that size, else
/// into a new bytes (the spare is then kept for later).
fn read_copied<'py>(
    py: Python<'py>,
    st: &StreamReads,
    fd: i32,
    spare: Option<Py<PyBytes>>,
) -> Result<Bound<'py, PyBytes>, ReadError> {
    with_buf(|buf| {
        // SAFETY: `buf` is a valid writable region of its length.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let err = (r < 0).then(std::io::Error::last_os_error);
        let n = r as usize;
        match spare {
            // SAFETY: the spare is a live bytes object.
            Some(sp) if r >= 0 && unsafe { ffi::Py_SIZE(sp.as_ptr()) } as usize == n => {
                let p = sp.into_ptr();
                // SAFETY: the spare is ours alone (see `recycle`) and holds `n` bytes; a new
                // content needs a new hash.
                #[allow(deprecated)]
                unsafe {
                    (*p.cast::<ffi::PyBytesObject>()).ob_shash = -1;
                    std::ptr::copy_nonoverlapping(
                        buf.as_ptr(),
                        ffi::PyBytes_AsString(p).cast::<u8>(),
                        n,
                    );
                    return Ok(Bound::from_owned_ptr(py, p).cast_into_unchecked());
                }
            }
            other => st.spare.set(other),
        }
        if let Some(err) = err {
            return Err(ReadError::Os(err));
        }
        if n >= DIRECT_MIN {
            st.set_hint(fd, 0, n);
        }
        Ok(PyBytes::new(py, &buf[..n]))
    })
}

/// Reads into `obj` (its whole size), with the loop buffer behind it for what does not fit,
/// and makes `obj` exactly what was read.
///
/// # Safety
/// `obj` must be a bytes object of which the caller gives us the only reference.
unsafe fn read_direct<'py>(
    py: Python<'py>,
    st: &StreamReads,
    fd: i32,
    mut obj: *mut ffi::PyObject,
    size: usize,
) -> Result<Bound<'py, PyBytes>, ReadError> {
    // SAFETY: `obj` is a live bytes object per the caller.
    let cap = unsafe { ffi::Py_SIZE(obj) } as usize;
    // A recycled object may carry the cached hash of its old contents.
    // SAFETY: as above; the field is plain data.
    #[allow(deprecated)]
    unsafe {
        (*obj.cast::<ffi::PyBytesObject>()).ob_shash = -1
    };
    with_buf(|buf| {
        let iov = [
            libc::iovec {
                // SAFETY: `obj` is a live bytes object of `cap` bytes.
                iov_base: unsafe { ffi::PyBytes_AsString(obj) }.cast(),
                iov_len: cap,
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: BUF_SIZE.saturating_sub(cap).min(buf.len()),
            },
        ];
        // SAFETY: both regions are valid and writable for their lengths.
        let r = unsafe { libc::readv(fd, iov.as_ptr(), 2) };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            // SAFETY: we own the only reference to `obj`; keep it for the next read.
            recycle(unsafe { Bound::from_owned_ptr(py, obj).cast_into_unchecked() });
            return Err(ReadError::Os(err));
        }
        let n = r as usize;
        let next = n.max(size / 2);
        st.set_hint(fd, size, if next >= DIRECT_MIN { next } else { 0 });
        if n != cap {
            // SAFETY: `obj` is a bytes object nobody else references, as _PyBytes_Resize
            // requires; on failure it has released it and set `obj` to NULL.
            if unsafe { _PyBytes_Resize(&mut obj, n as ffi::Py_ssize_t) } != 0 {
                return Err(ReadError::Py(PyErr::fetch(py)));
            }
            if n > cap {
                // SAFETY: `obj` now holds `n` bytes; the tail came into `buf[..n - cap]`.
                unsafe {
                    let dst = ffi::PyBytes_AsString(obj).cast::<u8>().add(cap);
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
