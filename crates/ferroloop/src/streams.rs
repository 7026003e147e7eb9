//! asyncio streams, fed by the transport itself.
//!
//! `asyncio.start_server` and `open_connection` put a `StreamReaderProtocol` on the transport,
//! and every read then runs `data_received` -> `_stream_reader` (a property over a weakref) ->
//! `StreamReader.feed_data` -> `_wakeup_waiter`: four Python frames, most of what a stream read
//! costs besides the reader's own coroutine. When the objects involved are exactly the stdlib's,
//! the transport does the same steps on the same attributes, in the same order: it reads
//! straight onto the end of the reader's `_buffer` (no intermediate `bytes`), wakes the reader's
//! `_waiter`, and pauses reading once the buffer holds more than twice the reader's limit.
//!
//! The steps follow `asyncio/streams.py`, whose four functions are identical from 3.9 to 3.13;
//! another version takes the generic path until its source has been checked. So does any read
//! where something differs, decided before the read (the generic path then reads the data
//! itself): a protocol or reader of another class (a subclass included), one of the functions
//! replaced on the class or shadowed on the instance, no reader or a dead one, a reader at EOF
//! (where `feed_data` asserts, or under `-O` extends anyway: Python decides), a `_buffer` that
//! is not a bytearray or that a memoryview holds (it cannot be resized).

use std::os::raw::c_int;

use std::sync::atomic::{AtomicPtr, Ordering};

use pyo3::exceptions::PyNotImplementedError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyFunction, PyInt, PyType};
use pyo3::{ffi, intern};

use crate::slots::truthy;
use crate::sock_io::ReadError;

extern "C" {
    // Exported by CPython 3.9 through 3.13 (private, declared PyAPI_FUNC). The first is the
    // type's MRO lookup through the method cache (a borrowed reference or NULL, no exception);
    // the second is what `obj.name(...)` does before a call: the class's function and 1 when
    // nothing on the instance shadows it, else the attribute's value and 0 (NULL and an
    // exception when there is none).
    fn _PyType_Lookup(ty: *mut ffi::PyTypeObject, name: *mut ffi::PyObject) -> *mut ffi::PyObject;
    fn _PyObject_GetMethod(
        obj: *mut ffi::PyObject,
        name: *mut ffi::PyObject,
        method: *mut *mut ffi::PyObject,
    ) -> c_int;
}

/// The stdlib objects a read is checked against.
struct Streams {
    protocol_type: Py<PyType>,
    reader_type: Py<PyType>,
    data_received: Py<PyAny>,
    stream_reader: Py<PyAny>,
    feed_data: Py<PyAny>,
    wakeup_waiter: Py<PyAny>,
}

static STREAMS: PyOnceLock<Option<Streams>> = PyOnceLock::new();

/// `StreamReaderProtocol` (kept alive by `STREAMS`), or a dangling pointer when the fast path
/// is off for this interpreter; NULL until the first read.
static PROTOCOL_TYPE: AtomicPtr<ffi::PyTypeObject> = AtomicPtr::new(std::ptr::null_mut());

fn streams(py: Python<'_>) -> Option<&'static Streams> {
    STREAMS.get_or_init(py, || load(py).ok().flatten()).as_ref()
}

fn load(py: Python<'_>) -> PyResult<Option<Streams>> {
    // The versions whose streams.py these steps were checked against.
    let (major, minor) = (py.version_info().major, py.version_info().minor);
    if major != 3 || !(9..=13).contains(&minor) {
        return Ok(None);
    }
    let module = py.import("asyncio.streams")?;
    let globals = module.dict();
    let protocol_type = module
        .getattr("StreamReaderProtocol")?
        .cast_into::<PyType>()?;
    let reader_type = module.getattr("StreamReader")?.cast_into::<PyType>()?;
    // What the class itself defines under `name`, if it is the function streams.py defined
    // there (not one put in its place before this ran).
    let own = |cls: &Bound<'_, PyType>, name: &str| -> PyResult<Option<Py<PyAny>>> {
        let dict = cls.getattr("__dict__")?;
        let Ok(obj) = dict.get_item(name) else {
            return Ok(None);
        };
        let func = if name == "_stream_reader" {
            obj.getattr("fget")?
        } else {
            obj.clone()
        };
        let genuine = func.is_exact_instance_of::<PyFunction>()
            && func.getattr("__globals__")?.is(&globals)
            && func.getattr("__qualname__")?.extract::<String>()?
                == format!("{}.{name}", cls.name()?);
        Ok(genuine.then(|| obj.unbind()))
    };
    let (Some(data_received), Some(stream_reader), Some(feed_data), Some(wakeup_waiter)) = (
        own(&protocol_type, "data_received")?,
        own(&protocol_type, "_stream_reader")?,
        own(&reader_type, "feed_data")?,
        own(&reader_type, "_wakeup_waiter")?,
    ) else {
        return Ok(None);
    };
    Ok(Some(Streams {
        protocol_type: protocol_type.unbind(),
        reader_type: reader_type.unbind(),
        data_received,
        stream_reader,
        feed_data,
        wakeup_waiter,
    }))
}

/// `type(obj).name` is `expected` (no code runs: a lookup in the class's MRO).
fn class_attr_is(obj: &Bound<'_, PyAny>, name: &Bound<'_, PyAny>, expected: &Py<PyAny>) -> bool {
    // SAFETY: live type and str objects; the result is borrowed and only compared.
    let found = unsafe { _PyType_Lookup(ffi::Py_TYPE(obj.as_ptr()), name.as_ptr()) };
    found == expected.as_ptr()
}

/// `obj.name` is the class's function `expected`, unshadowed by the instance. Only called once
/// [`class_attr_is`] holds, so the lookup runs no code (a function is no data descriptor).
fn method_is(obj: &Bound<'_, PyAny>, name: &Bound<'_, PyAny>, expected: &Py<PyAny>) -> bool {
    if !class_attr_is(obj, name, expected) {
        return false;
    }
    let mut found = std::ptr::null_mut();
    // SAFETY: live object and str; `found` receives a new reference or NULL.
    let unbound = unsafe { _PyObject_GetMethod(obj.as_ptr(), name.as_ptr(), &mut found) };
    if found.is_null() {
        drop(PyErr::take(obj.py()));
        return false;
    }
    let same = unbound == 1 && found == expected.as_ptr();
    // SAFETY: the new reference `_PyObject_GetMethod` returned.
    unsafe { ffi::Py_DECREF(found) };
    same
}

/// A `StreamReader` that the transport may feed directly, and its buffer.
pub(crate) struct Feed<'py> {
    reader: Bound<'py, PyAny>,
    buffer: Bound<'py, PyAny>,
}

impl<'py> Feed<'py> {
    /// The reader behind `protocol` if this read may go to it directly (see the module
    /// comment), else None: the read goes to `protocol.data_received`.
    #[inline(always)]
    pub(crate) fn of(protocol: &Bound<'py, PyAny>) -> Option<Feed<'py>> {
        // One load and compare for every other protocol (this runs on every stream read).
        // SAFETY: a live object's type.
        let ty = unsafe { ffi::Py_TYPE(protocol.as_ptr()) };
        let known = PROTOCOL_TYPE.load(Ordering::Relaxed);
        if ty != known {
            if !known.is_null() {
                return None;
            }
            return Self::first(protocol);
        }
        Self::checked(protocol, streams(protocol.py())?)
    }

    /// The first read of the process: loads the stdlib objects, then decides as `of`.
    #[cold]
    #[inline(never)]
    fn first(protocol: &Bound<'py, PyAny>) -> Option<Feed<'py>> {
        let known = match streams(protocol.py()) {
            Some(st) => st.protocol_type.as_ptr().cast(),
            None => std::ptr::NonNull::dangling().as_ptr(), // no type's address: disabled
        };
        PROTOCOL_TYPE.store(known, Ordering::Relaxed);
        Self::of(protocol)
    }

    fn checked(protocol: &Bound<'py, PyAny>, st: &Streams) -> Option<Feed<'py>> {
        let py = protocol.py();
        if !class_attr_is(protocol, intern!(py, "_stream_reader"), &st.stream_reader)
            || !method_is(protocol, intern!(py, "data_received"), &st.data_received)
        {
            return None;
        }
        // `self._stream_reader`: the weakref's referent.
        let wr = protocol.getattr(intern!(py, "_stream_reader_wr")).ok()?;
        // SAFETY: a live object.
        if unsafe { ffi::PyWeakref_CheckRefExact(wr.as_ptr()) } == 0 {
            return None;
        }
        let mut obj = std::ptr::null_mut();
        // SAFETY: an exact weakref; `obj` receives a new reference (1), or NULL (0: dead).
        if unsafe { ffi::compat::PyWeakref_GetRef(wr.as_ptr(), &mut obj) } != 1 {
            drop(PyErr::take(py));
            return None;
        }
        // SAFETY: the new reference just returned.
        let reader = unsafe { Bound::from_owned_ptr(py, obj) };
        // SAFETY: a live object's type.
        if unsafe { ffi::Py_TYPE(reader.as_ptr()) } != st.reader_type.as_ptr().cast()
            || !method_is(&reader, intern!(py, "feed_data"), &st.feed_data)
            || !method_is(&reader, intern!(py, "_wakeup_waiter"), &st.wakeup_waiter)
        {
            return None;
        }
        if truthy(&reader.getattr(intern!(py, "_eof")).ok()?).ok()? {
            return None;
        }
        let buffer = reader.getattr(intern!(py, "_buffer")).ok()?;
        if !buffer.is_exact_instance_of::<PyByteArray>() {
            return None;
        }
        // SAFETY: an exact bytearray has this layout.
        let exports = unsafe { (*buffer.as_ptr().cast::<ffi::PyByteArrayObject>()).ob_exports };
        if exports != 0 {
            return None;
        }
        Some(Feed { reader, buffer })
    }

    /// One read from `fd` onto the end of the reader's buffer: the byte count, 0 at EOF.
    pub(crate) fn read(&self, fd: i32) -> Result<usize, ReadError> {
        // SAFETY: an exact bytearray without exports (checked by `of`; no code ran since).
        unsafe { crate::sock_io::read_into_bytearray(self.buffer.py(), fd, self.buffer.as_ptr()) }
    }

    /// The rest of `feed_data` once the data is in the buffer: wake the reader, and pause
    /// reading when the buffer holds more than twice the limit. An error is what
    /// `data_received` would have raised.
    pub(crate) fn fed(self) -> PyResult<()> {
        let py = self.reader.py();
        let reader = &self.reader;
        // _wakeup_waiter()
        let waiter = reader.getattr(intern!(py, "_waiter"))?;
        if !waiter.is_none() {
            reader.setattr(intern!(py, "_waiter"), py.None())?;
            if !waiter.call_method0(intern!(py, "cancelled"))?.is_truthy()? {
                waiter.call_method1(intern!(py, "set_result"), (py.None(),))?;
            }
        }
        // if self._transport is not None and not self._paused and
        //         len(self._buffer) > 2 * self._limit: ...
        let transport = reader.getattr(intern!(py, "_transport"))?;
        if transport.is_none() || truthy(&reader.getattr(intern!(py, "_paused"))?)? {
            return Ok(());
        }
        let size = reader.getattr(intern!(py, "_buffer"))?.len()?;
        let limit = reader.getattr(intern!(py, "_limit"))?;
        let over = match limit
            .cast::<PyInt>()
            .ok()
            .filter(|l| l.is_exact_instance_of::<PyInt>())
        {
            Some(l) => match l.extract::<i64>() {
                Ok(l) => size as i128 > 2 * l as i128,
                Err(_) => size
                    .into_pyobject(py)?
                    .gt(2i32.into_pyobject(py)?.mul(&limit)?)?,
            },
            None => size
                .into_pyobject(py)?
                .gt(2i32.into_pyobject(py)?.mul(&limit)?)?,
        };
        if over {
            match transport.call_method0(intern!(py, "pause_reading")) {
                // The transport cannot pause: forget it, and buffer everything.
                Err(e) if e.is_instance_of::<PyNotImplementedError>(py) => {
                    reader.setattr(intern!(py, "_transport"), py.None())?
                }
                Err(e) => return Err(e),
                Ok(_) => reader.setattr(intern!(py, "_paused"), true)?,
            }
        }
        Ok(())
    }
}
