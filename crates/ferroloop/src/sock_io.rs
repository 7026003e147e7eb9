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
use std::net::Ipv4Addr;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt, PyString, PyTuple};

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
    /// After a direct read of `n` bytes into room sized `size`: the next one is sized like the
    /// larger of the two (halving after short reads), or goes through the loop buffer when that
    /// is below [`DIRECT_MIN`].
    fn after_direct_read(&self, fd: i32, size: usize, n: usize) {
        let next = n.max(size / 2);
        self.set_hint(fd, size, if next >= DIRECT_MIN { next } else { 0 });
    }

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
        if err.is_none() && n >= DIRECT_MIN {
            // Big: the next read goes straight into a bytes object.
            st.set_hint(fd, 0, n);
        }
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
        Ok(PyBytes::new(py, &buf[..n]))
    })
}

/// One `readv` into `len` bytes at `dst`, then into the loop buffer `buf` for what does not fit
/// (up to [`BUF_SIZE`] in all). The byte count, or `Err(())` with `errno` set.
///
/// # Safety
/// `dst` must be valid and writable for `len` bytes.
unsafe fn readv_spill(fd: i32, dst: *mut u8, len: usize, buf: &mut [u8]) -> Result<usize, ()> {
    let iov = [
        libc::iovec {
            iov_base: dst.cast(),
            iov_len: len,
        },
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: BUF_SIZE.saturating_sub(len).min(buf.len()),
        },
    ];
    // SAFETY: both regions are valid and writable for their lengths (the caller's and `buf`).
    let r = unsafe { libc::readv(fd, iov.as_ptr(), 2) };
    if r < 0 {
        Err(())
    } else {
        Ok(r as usize)
    }
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
        // SAFETY: `obj` is a live bytes object of `cap` bytes.
        let r = unsafe { readv_spill(fd, ffi::PyBytes_AsString(obj).cast(), cap, buf) };
        let Ok(r) = r else {
            let err = std::io::Error::last_os_error();
            // SAFETY: we own the only reference to `obj`; keep it for the next read.
            recycle(unsafe { Bound::from_owned_ptr(py, obj).cast_into_unchecked() });
            return Err(ReadError::Os(err));
        };
        let n = r;
        st.after_direct_read(fd, size, n);
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

/// One read of up to 256 KiB from a stream fd, appended to a bytearray (what
/// `bytearray.extend(read(fd))` does, without the intermediate `bytes`). Returns the byte count,
/// 0 at EOF (the bytearray is then unchanged, as it is on an error).
///
/// Reads sized like the fd's earlier ones ([`read_stream`]'s hints) go straight into the
/// bytearray's grown tail, with the loop buffer behind it for whatever does not fit; small ones
/// into the loop buffer, copied onto the end.
///
/// # Safety
/// `ba` must be an exact `bytearray` with no buffer exports (so it may be resized).
pub(crate) unsafe fn read_into_bytearray(
    py: Python<'_>,
    fd: i32,
    ba: *mut ffi::PyObject,
) -> Result<usize, ReadError> {
    // SAFETY: `ba` is a live bytearray per the caller.
    let old = unsafe { ffi::PyByteArray_Size(ba) } as usize;
    STREAM_READS.with(|st| {
        let size = st.hint(fd);
        with_buf(|buf| {
            if size < DIRECT_MIN {
                // SAFETY: `buf` is a valid writable region of its length.
                let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if r < 0 {
                    return Err(ReadError::Os(std::io::Error::last_os_error()));
                }
                let n = r as usize;
                if n >= DIRECT_MIN {
                    st.set_hint(fd, 0, n);
                }
                if n > 0 {
                    // SAFETY: `ba` may be resized (caller); after a successful resize its
                    // storage holds `old + n` bytes, the last `n` of which we fill.
                    unsafe {
                        resize(py, ba, old + n)?;
                        let dst = ffi::PyByteArray_AsString(ba).cast::<u8>().add(old);
                        std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, n);
                    }
                }
                return Ok(n);
            }
            // SAFETY: as above: room for `size` more bytes at the end.
            unsafe { resize(py, ba, old + size)? };
            // SAFETY: the bytearray's storage holds `old + size` bytes.
            let tail = unsafe { ffi::PyByteArray_AsString(ba).cast::<u8>().add(old) };
            // SAFETY: `tail` has room for `size` bytes.
            let r = unsafe { readv_spill(fd, tail, size, buf) };
            let Ok(r) = r else {
                let err = std::io::Error::last_os_error();
                // SAFETY: shrinking back to the original contents.
                unsafe { truncate(ba, old) };
                return Err(ReadError::Os(err));
            };
            let n = r;
            st.after_direct_read(fd, size, n);
            if n <= size {
                // SAFETY: shrinking to what was read.
                unsafe { truncate(ba, old + n) };
            } else {
                // SAFETY: growing to what was read; the part past `size` is in `buf`.
                unsafe {
                    if let Err(e) = resize(py, ba, old + n) {
                        truncate(ba, old);
                        return Err(e);
                    }
                    let dst = ffi::PyByteArray_AsString(ba).cast::<u8>().add(old + size);
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, n - size);
                }
            }
            Ok(n)
        })
    })
}

/// `PyByteArray_Resize`, its error (MemoryError) as a [`ReadError`].
///
/// # Safety
/// `ba` must be a live bytearray without buffer exports.
unsafe fn resize(py: Python<'_>, ba: *mut ffi::PyObject, len: usize) -> Result<(), ReadError> {
    // SAFETY: per the caller.
    if unsafe { ffi::PyByteArray_Resize(ba, len as ffi::Py_ssize_t) } != 0 {
        return Err(ReadError::Py(PyErr::fetch(py)));
    }
    Ok(())
}

/// Shrinks a bytearray to `len` bytes, which cannot fail: if the allocator will not give the
/// surplus back, the bytearray keeps it (what a minor shrink does anyway).
///
/// # Safety
/// `ba` must be a live bytearray without buffer exports and with at least `len` bytes.
unsafe fn truncate(ba: *mut ffi::PyObject, len: usize) {
    // SAFETY: per the caller.
    unsafe {
        debug_assert!(ffi::PyByteArray_Size(ba) as usize >= len);
        if ffi::PyByteArray_Resize(ba, len as ffi::Py_ssize_t) != 0 {
            ffi::PyErr_Clear();
            (*ba.cast::<ffi::PyVarObject>()).ob_size = len as ffi::Py_ssize_t;
            *ffi::PyByteArray_AsString(ba).add(len) = 0;
        }
    }
}

/// Why [`read_stream`] failed: the read itself (with its errno), or Python (no memory).
pub(crate) enum ReadError {
    Os(std::io::Error),
    Py(PyErr),
}

/// Why [`recv_inet`] returned no datagram.
pub(crate) enum RecvError {
    /// The system call failed (EAGAIN included: the caller decides whether that is an error,
    /// without the cost of an exception object).
    Os(std::io::Error),
    /// The sender's address is not AF_INET (the socket is not an AF_INET socket).
    NotInet,
    /// Building the result failed (MemoryError).
    Py(PyErr),
}

impl RecvError {
    pub(crate) fn into_pyerr(self) -> PyErr {
        match self {
            RecvError::Os(e) => os_error(e),
            RecvError::NotInet => {
                pyo3::exceptions::PyValueError::new_err("recvfrom_inet() needs an AF_INET socket")
            }
            RecvError::Py(e) => e,
        }
    }
}

/// `recvfrom(fd, max)` on an AF_INET datagram socket → (bytes, (host, port)), the values
/// `socket.recvfrom` returns. The address tuple comes from the thread's address cache when the
/// same sender was seen recently (see [`AddrCache`]).
pub(crate) fn recv_inet<'py>(
    py: Python<'py>,
    fd: i32,
    max_size: usize,
) -> Result<(Bound<'py, PyBytes>, Bound<'py, PyTuple>), RecvError> {
    let (data, sin) = with_buf(|buf| {
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
            return Err(RecvError::Os(std::io::Error::last_os_error()));
        }
        if addr.ss_family as i32 != libc::AF_INET {
            return Err(RecvError::NotInet);
        }
        // SAFETY: the family says the storage holds a sockaddr_in.
        let sin: libc::sockaddr_in =
            unsafe { std::ptr::read((&addr as *const libc::sockaddr_storage).cast()) };
        Ok((PyBytes::new(py, &buf[..r as usize]), sin))
    })?;
    let addr = inet_addr_tuple(py, &sin).map_err(RecvError::Py)?;
    Ok((data, addr))
}

/// `recvfrom(fd, max)` on an AF_INET datagram socket → (bytes, (host, port)), the value
/// `socket.recvfrom` returns. Only for AF_INET sockets (the caller checks the family; other
/// families use the socket's own method, which formats every address kind).
#[pyfunction]
#[pyo3(signature = (fd, max_size = BUF_SIZE))]
pub fn recvfrom_inet<'py>(
    py: Python<'py>,
    fd: i32,
    max_size: usize,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyTuple>)> {
    recv_inet(py, fd, max_size).map_err(RecvError::into_pyerr)
}

// ---- accept ------------------------------------------------------------------------------------
//
// `socket.accept()` then `setblocking(False)` costs a Python method, an `accept4` without
// SOCK_NONBLOCK, an `ioctl(FIONBIO)` and an exception object for the EAGAIN that ends every
// batch. A server's accept loop calls [`accept_inet`] instead: one `accept4` that makes the
// socket non-blocking and close-on-exec at once, and None when nothing is waiting.

/// `accept4(fd, SOCK_NONBLOCK | SOCK_CLOEXEC)` on an AF_INET or AF_INET6 listening socket →
/// `(fd, address)`, the address as `socket.accept()` formats it (its host string interned:
/// connections from one host share it); None when no connection is waiting, the call was
/// interrupted or the peer gave up first. Other errors raise `OSError` with their errno. The
/// caller owns the fd returned.
#[pyfunction]
pub fn accept_inet(py: Python<'_>, fd: i32) -> PyResult<Option<(i32, Py<PyAny>)>> {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid address out-pointers of the sizes given.
    let conn = unsafe {
        libc::accept4(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if conn < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR | libc::ECONNABORTED) => Ok(None),
            #[allow(unreachable_patterns)] // EWOULDBLOCK is EAGAIN on Linux
            Some(libc::EWOULDBLOCK) => Ok(None),
            _ => Err(os_error(err)),
        };
    }
    match peer_address(py, &addr, len) {
        Ok(a) => Ok(Some((conn, a))),
        Err(e) => {
            // SAFETY: `conn` is the fd accept4 just returned, owned by nobody else yet.
            unsafe { libc::close(conn) };
            Err(e)
        }
    }
}

extern "C" {
    // POSIX (not in the libc crate for Linux).
    fn inet_ntop(
        af: libc::c_int,
        src: *const libc::c_void,
        dst: *mut libc::c_char,
        size: libc::socklen_t,
    ) -> *const libc::c_char;
}

thread_local! {
    /// The host string of the last IPv4 peer accepted: clients mostly come from a few hosts
    /// (a proxy, a load balancer), so most accepts skip formatting and interning it.
    static LAST_INET_HOST: RefCell<Option<(u32, Py<PyString>)>> = const { RefCell::new(None) };
    /// The same for the local address of the last connection closed (`local_address`): a
    /// server's connections mostly share one.
    static LAST_LOCAL_HOST: RefCell<Option<(u32, Py<PyString>)>> = const { RefCell::new(None) };
}

type HostCache = std::thread::LocalKey<RefCell<Option<(u32, Py<PyString>)>>>;

/// "a.b.c.d" as a new str, formatted by hand (no formatting machinery, no heap buffer).
fn ipv4_string(py: Python<'_>, ip: u32) -> Bound<'_, PyString> {
    let mut buf = [0u8; 15];
    let mut n = 0;
    for (i, octet) in ip.to_be_bytes().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    // SAFETY: `buf[..n]` is ASCII.
    PyString::new(py, unsafe { std::str::from_utf8_unchecked(&buf[..n]) })
}

/// The "a.b.c.d" string of an IPv4 address, shared while the cache holds it.
fn inet_host<'py>(py: Python<'py>, ip: u32, cache: &'static HostCache) -> Bound<'py, PyString> {
    let hit = cache.with(|last| {
        let last = last.try_borrow().ok()?;
        let (cached, host) = last.as_ref()?;
        (*cached == ip).then(|| host.clone_ref(py))
    });
    if let Some(host) = hit {
        return host.into_bound(py);
    }
    // Not interned: the cache is what makes connections from one host share the string
    // (interning would cost a dict insert here and a removal when the string dies).
    let host = ipv4_string(py, ip);
    let old = cache.with(|last| {
        last.try_borrow_mut()
            .ok()
            .and_then(|mut l| l.replace((ip, host.clone().unbind())))
    });
    drop(old); // outside the borrow (a str runs no code when freed)
    host
}

/// An accepted peer's address as `socket.accept()` returns it for the inet families:
/// `(host, port)` or `(host, port, flowinfo, scope_id)`; None for an empty or other address.
fn peer_address(
    py: Python<'_>,
    addr: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> PyResult<Py<PyAny>> {
    inet_address(py, addr, len, &LAST_INET_HOST)
}

/// `sock.getsockname()` of an inet socket, formatted as the socket module does; None for
/// another family (the caller asks the socket itself).
pub(crate) fn local_address(py: Python<'_>, fd: i32) -> PyResult<Option<Py<PyAny>>> {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid address out-pointers of the sizes given.
    let r = unsafe {
        libc::getsockname(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(os_error(std::io::Error::last_os_error()));
    }
    match addr.ss_family as i32 {
        libc::AF_INET | libc::AF_INET6 => inet_address(py, &addr, len, &LAST_LOCAL_HOST).map(Some),
        _ => Ok(None),
    }
}

fn inet_address(
    py: Python<'_>,
    addr: &libc::sockaddr_storage,
    len: libc::socklen_t,
    cache: &'static HostCache,
) -> PyResult<Py<PyAny>> {
    let len = len as usize;
    match addr.ss_family as i32 {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family and length say the storage holds a sockaddr_in.
            let sin: &libc::sockaddr_in =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast() };
            let t = PyTuple::new(
                py,
                [
                    inet_host(py, u32::from_be(sin.sin_addr.s_addr), cache).into_any(),
                    u16::from_be(sin.sin_port).into_pyobject(py)?.into_any(),
                ],
            )?;
            Ok(t.into_any().unbind())
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family and length say the storage holds a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast() };
            // inet_ntop, as the socket module formats it (Rust's Display differs for some
            // IPv4-compatible addresses).
            let mut buf = [0 as libc::c_char; 64];
            // SAFETY: `sin6_addr` is a valid in6_addr and `buf` holds more than
            // INET6_ADDRSTRLEN bytes.
            let p = unsafe {
                inet_ntop(
                    libc::AF_INET6,
                    (&sin6.sin6_addr as *const libc::in6_addr).cast(),
                    buf.as_mut_ptr(),
                    buf.len() as libc::socklen_t,
                )
            };
            if p.is_null() {
                return Err(os_error(std::io::Error::last_os_error()));
            }
            // SAFETY: inet_ntop succeeded, so `buf` holds a NUL-terminated ASCII string.
            let host = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
            let t = PyTuple::new(
                py,
                [
                    PyString::intern(py, &host).into_any(),
                    u16::from_be(sin6.sin6_port).into_pyobject(py)?.into_any(),
                    u32::from_be(sin6.sin6_flowinfo)
                        .into_pyobject(py)?
                        .into_any(),
                    sin6.sin6_scope_id.into_pyobject(py)?.into_any(),
                ],
            )?;
            Ok(t.into_any().unbind())
        }
        _ => Ok(py.None()),
    }
}

// ---- address caches ----------------------------------------------------------------------------
//
// A UDP server answers the same few peers over and over: formatting "a.b.c.d" and building a
// (host, port) tuple for every datagram received, and parsing them back for every `sendto`, is
// most of the Python-object work of an echo. Small caches per thread (the loop's thread)
// remove it:
// - by address: (IPv4, port) → the (host, port) tuple handed to `datagram_received`;
// - by object: a (host, port) tuple object (held, so its identity stays unique) → its sockaddr,
//   plus the tuple of the last datagram received (the address a reply goes to).
//   Tuples are immutable, so a cached parse stays valid for the object's lifetime.
// A tuple handed out twice is the same object both times, which is indistinguishable from two
// equal tuples for any code that does not compare identities.

const CACHE_SLOTS: usize = 64;

/// The cached value: numeric IPv4 address and port in host byte order.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Inet {
    ip: u32,
    port: u16,
}

impl Inet {
    fn of(sin: &libc::sockaddr_in) -> Inet {
        Inet {
            ip: u32::from_be(sin.sin_addr.s_addr),
            port: u16::from_be(sin.sin_port),
        }
    }

    fn sockaddr(self) -> libc::sockaddr_in {
        // SAFETY: an all-zero sockaddr_in is a valid value; the fields are filled below.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_port = self.port.to_be();
        sa.sin_addr.s_addr = self.ip.to_be();
        sa
    }

    fn hash(self) -> u64 {
        mix((u64::from(self.ip) << 16) | u64::from(self.port))
    }
}

fn mix(x: u64) -> u64 {
    x.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

struct Entry<K, V> {
    key: K,
    value: V,
    used: u32,
}

/// A fixed-size cache where each key may live in one of two slots (picked by two parts of its
/// hash); a new key replaces the less recently used of the two. Unlike a direct-mapped table,
/// two hot keys that share one slot do not evict each other on every use.
struct TwoWay<K, V> {
    slots: Vec<Option<Entry<K, V>>>,
    clock: u32,
}

impl<K: Copy + PartialEq, V> TwoWay<K, V> {
    fn new() -> Self {
        TwoWay {
            slots: (0..CACHE_SLOTS).map(|_| None).collect(),
            clock: 0,
        }
    }

    fn candidates(h: u64) -> [usize; 2] {
        let a = (h >> 58) as usize % CACHE_SLOTS;
        let b = (h >> 52) as usize % CACHE_SLOTS;
        [a, if b == a { a ^ 1 } else { b }]
    }

    fn get(&mut self, key: K, h: u64) -> Option<&V> {
        self.clock = self.clock.wrapping_add(1);
        let now = self.clock;
        let i = Self::candidates(h)
            .into_iter()
            .find(|&i| self.slots[i].as_ref().is_some_and(|e| e.key == key))?;
        let e = self.slots[i].as_mut()?;
        e.used = now;
        Some(&e.value)
    }

    /// Stores `value` for `key` (not present); returns what it evicted, for the caller to drop
    /// outside any borrow.
    fn insert(&mut self, key: K, h: u64, value: V) -> Option<Entry<K, V>> {
        self.clock = self.clock.wrapping_add(1);
        let [a, b] = Self::candidates(h);
        let age = |e: &Option<Entry<K, V>>| {
            e.as_ref()
                .map_or(u32::MAX, |e| self.clock.wrapping_sub(e.used))
        };
        let i = if age(&self.slots[b]) > age(&self.slots[a]) {
            b
        } else {
            a
        };
        self.slots[i].replace(Entry {
            key,
            value,
            used: self.clock,
        })
    }
}

struct AddrCache {
    by_addr: TwoWay<Inet, Py<PyTuple>>,
    by_obj: TwoWay<usize, (Py<PyAny>, Inet)>,
    /// The address of the last datagram received: the one an echo or a reply sends to.
    last: Option<(Py<PyTuple>, Inet)>,
}

thread_local! {
    static ADDR_CACHE: RefCell<AddrCache> = RefCell::new(AddrCache {
        by_addr: TwoWay::new(),
        by_obj: TwoWay::new(),
        last: None,
    });
}

/// The (host, port) tuple for a received IPv4 sockaddr, from the cache or new (and cached).
fn inet_addr_tuple<'py>(py: Python<'py>, sin: &libc::sockaddr_in) -> PyResult<Bound<'py, PyTuple>> {
    let key = Inet::of(sin);
    let h = key.hash();
    let hit = ADDR_CACHE.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        let t = c.by_addr.get(key, h)?.clone_ref(py);
        let old_last = c.last.replace((t.clone_ref(py), key));
        Some((t, old_last))
    });
    if let Some((t, old_last)) = hit {
        drop(old_last); // outside the borrow
        return Ok(t.into_bound(py));
    }
    // Built outside any borrow: allocating may run the garbage collector, hence Python code.
    let host = Ipv4Addr::from(key.ip).to_string();
    let t = PyTuple::new(
        py,
        [
            host.into_pyobject(py)?.into_any(),
            key.port.into_pyobject(py)?.into_any(),
        ],
    )?;
    let evicted = ADDR_CACHE.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        let old_addr = c.by_addr.insert(key, h, t.clone().unbind());
        let p = t.as_ptr() as usize;
        let old_obj = c
            .by_obj
            .insert(p, mix(p as u64 >> 4), (t.clone().into_any().unbind(), key));
        let old_last = c.last.replace((t.clone().unbind(), key));
        Some((old_addr, old_obj, old_last))
    });
    drop(evicted); // outside the borrow
    Ok(t)
}

/// The sockaddr for a `sendto` address that is a numeric IPv4 `(host, port)`, or None (the
/// caller then uses the socket's own sendto, which resolves names and reports errors).
pub(crate) fn inet_sockaddr(addr: &Bound<'_, PyAny>) -> Option<libc::sockaddr_in> {
    let p = addr.as_ptr() as usize;
    let h = mix(p as u64 >> 4);
    let hit = ADDR_CACHE.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        if let Some((t, k)) = &c.last {
            if t.as_ptr() as usize == p {
                return Some(*k);
            }
        }
        c.by_obj.get(p, h).map(|(_, k)| *k)
    });
    if let Some(k) = hit {
        return Some(k.sockaddr());
    }
    let t = addr.cast::<PyTuple>().ok()?;
    if t.len() != 2 {
        return None;
    }
    let host = t.get_item(0).ok()?;
    let port_obj = t.get_item(1).ok()?;
    let ip: Ipv4Addr = host.cast::<PyString>().ok()?.to_str().ok()?.parse().ok()?;
    let port: u16 = port_obj.extract().ok()?;
    let key = Inet {
        ip: u32::from(ip),
        port,
    };
    // Only exact tuples of an exact str and int are kept: nothing a subclass could change.
    if t.is_exact_instance_of::<PyTuple>()
        && host.is_exact_instance_of::<PyString>()
        && port_obj.is_exact_instance_of::<PyInt>()
    {
        let evicted = ADDR_CACHE.with(|c| {
            let mut c = c.try_borrow_mut().ok()?;
            c.by_obj.insert(p, h, (addr.clone().unbind(), key))
        });
        drop(evicted); // outside the borrow
    }
    Some(key.sockaddr())
}
