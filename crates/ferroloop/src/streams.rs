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
//!
//! The checks on the two classes (their functions are streams.py's) only change when a class
//! does, so they are cached per type version tag ([`ClassCheck`]). Those on the instances run
//! on every read: the reader and its state, and that nothing on the instance shadows a
//! function, which on 3.11 is settled per class too: an instance keeping its attributes inline
//! has no name its class's shared keys lack, and keys once seen lacking the function names are
//! remembered until they grow (`Attrs::lacks_all`; a name set on any instance adds it).
//!
//! Per read that is about ten attribute reads and writes on the reader and the protocol, and
//! one method call on the waiter (`set_result`; `cancelled` only when that fails). On 3.11, when a class defines none of the attribute names
//! (cached per version tag too), they go straight to the instance's inline values
//! (`inline_attrs.rs`), with a new snapshot after anything that may run code; the waiter's
//! `cancelled` and `set_result` are called through the C Future's method descriptors when the
//! future has no instance attribute that could shadow them. A 1 KiB streams echo, server
//! instructions per request (`bench/net/callgrind_echo.py`): 20.6k before, 18.1k after; the
//! remembered keys, the single waiter call, the type checks of the inline attributes cached
//! per tag and the checks' snapshot reused for the wake-up, 17.5k -> 16.9k.

use std::os::raw::c_int;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use pyo3::exceptions::PyNotImplementedError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyByteArray, PyFunction, PyString, PyType};
use pyo3::{ffi, intern};

use crate::inline_attrs::{Attrs, Hint, KeysSeen};
use crate::slots::{truthy, version_tag};
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
    /// The C `asyncio.Future` and its `cancelled` / `set_result` method descriptors, when the
    /// type is C (immutable): see [`Waiter`].
    waiter: Option<Waiter>,
    /// The attribute names read per read, interned (one lookup of `Streams` instead of one
    /// per name).
    names: Names,
}

struct Names {
    stream_reader_wr: Py<PyString>,
    data_received: Py<PyString>,
    feed_data: Py<PyString>,
    wakeup_waiter: Py<PyString>,
    eof: Py<PyString>,
    buffer: Py<PyString>,
    waiter: Py<PyString>,
    transport: Py<PyString>,
    paused: Py<PyString>,
    limit: Py<PyString>,
}

impl Names {
    fn new(py: Python<'_>) -> Self {
        let n = |s: &str| PyString::intern(py, s).unbind();
        Names {
            stream_reader_wr: n("_stream_reader_wr"),
            data_received: n("data_received"),
            feed_data: n("feed_data"),
            wakeup_waiter: n("_wakeup_waiter"),
            eof: n("_eof"),
            buffer: n("_buffer"),
            waiter: n("_waiter"),
            transport: n("_transport"),
            paused: n("_paused"),
            limit: n("_limit"),
        }
    }
}

/// The reader's `_waiter` when it is exactly a C `asyncio.Future`: its type cannot be changed,
/// so `fut.cancelled()` and `fut.set_result(x)` are the type's methods unless the instance's
/// own dict shadows them; when it is empty, they are called through the method descriptors
/// (no lookup by name).
struct Waiter {
    ty: *mut ffi::PyTypeObject,
    cancelled: Py<PyAny>,
    set_result: Py<PyAny>,
}

// SAFETY: `ty` is a type object kept alive by the `asyncio` module for the interpreter's life,
// only read with the GIL held.
unsafe impl Send for Waiter {}
// SAFETY: as above.
unsafe impl Sync for Waiter {}

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
        waiter: load_waiter(py)?,
        names: Names::new(py),
    }))
}

fn load_waiter(py: Python<'_>) -> PyResult<Option<Waiter>> {
    let std = crate::stdlib::stdlib(py)?;
    if !std.future_is_static_c_type {
        return Ok(None);
    }
    let ty = std.future_type.bind(py).cast::<PyType>()?;
    // Instances keep their attributes in a dict at a fixed offset (read in `Waiter::exact`).
    // SAFETY: a live type object.
    if unsafe { (*ty.as_type_ptr()).tp_dictoffset } <= 0 {
        return Ok(None);
    }
    let dict = ty.getattr("__dict__")?;
    let (cancelled, set_result) = (dict.get_item("cancelled")?, dict.get_item("set_result")?);
    let descr_type = std::ptr::addr_of_mut!(ffi::PyMethodDescr_Type);
    // SAFETY: live objects' types.
    let is_descr = |o: &Bound<'_, PyAny>| unsafe { ffi::Py_TYPE(o.as_ptr()) } == descr_type;
    if !is_descr(&cancelled) || !is_descr(&set_result) {
        return Ok(None);
    }
    Ok(Some(Waiter {
        ty: ty.as_type_ptr(),
        cancelled: cancelled.unbind(),
        set_result: set_result.unbind(),
    }))
}

impl Waiter {
    /// `fut` if it is exactly the C Future and nothing on the instance shadows its methods.
    fn exact<'a, 'py>(&self, fut: &'a Bound<'py, PyAny>) -> Option<&'a Bound<'py, PyAny>> {
        // SAFETY: a live object; its type is the C Future, whose instances hold their dict
        // (NULL until an attribute is set) at the positive `tp_dictoffset` checked at load.
        unsafe {
            let ty = ffi::Py_TYPE(fut.as_ptr());
            if ty != self.ty {
                return None;
            }
            let dict = *fut
                .as_ptr()
                .cast::<u8>()
                .offset((*ty).tp_dictoffset)
                .cast::<*mut ffi::PyObject>();
            (dict.is_null() || ffi::PyDict_Size(dict) == 0).then_some(fut)
        }
    }

    /// `descr(fut[, arg])`: the method called directly.
    fn call<'py>(
        descr: &Py<PyAny>,
        fut: &Bound<'py, PyAny>,
        arg: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let args = [
            fut.as_ptr(),
            arg.map_or(std::ptr::null_mut(), Bound::as_ptr),
        ];
        let nargs = if arg.is_some() { 2 } else { 1 };
        // SAFETY: a live method descriptor and arguments; it checks `self`'s type itself.
        unsafe {
            Bound::from_owned_ptr_or_err(
                fut.py(),
                ffi::PyObject_Vectorcall(
                    descr.as_ptr(),
                    args.as_ptr(),
                    nargs,
                    std::ptr::null_mut(),
                ),
            )
        }
    }
}

/// The class-level half of the checks, cached per version tag (see `slots.rs` on tags):
/// `type(obj).name` is streams.py's function for each of a class's names. A class modified
/// since (`StreamReader.feed_data = ...`, even put back later) has a new tag and is checked
/// again; a type without a tag is checked every time.
struct ClassCheck {
    /// The tag the checks last passed for (0: never).
    passed: AtomicU32,
    /// The checks also require instances' inline attributes to be usable (`Attrs::type_ok`).
    inline_attrs: bool,
}

impl ClassCheck {
    const fn new() -> Self {
        ClassCheck {
            passed: AtomicU32::new(0),
            inline_attrs: false,
        }
    }

    /// Names the class must not define, and instances with inline attributes.
    const fn inline_attrs() -> Self {
        ClassCheck {
            passed: AtomicU32::new(0),
            inline_attrs: true,
        }
    }

    /// Whether `type(name)` is the expected object for each `(name, expected)` of `ty` (a live
    /// type): one load and compare once they passed for its current tag.
    #[inline(always)]
    fn holds<'py, const N: usize>(
        &self,
        py: Python<'py>,
        ty: *mut ffi::PyTypeObject,
        checks: impl FnOnce() -> [(&'py Bound<'py, PyString>, *mut ffi::PyObject); N],
    ) -> bool {
        // SAFETY: a live type, per the caller.
        let tag = unsafe { version_tag(py, ty) };
        if tag != 0 && self.passed.load(Ordering::Relaxed) == tag {
            return true;
        }
        self.check(py, ty, &checks())
    }

    #[cold]
    #[inline(never)]
    fn check(
        &self,
        py: Python<'_>,
        ty: *mut ffi::PyTypeObject,
        checks: &[(&Bound<'_, PyString>, *mut ffi::PyObject)],
    ) -> bool {
        // SAFETY: a live type; `_PyType_Lookup` returns a borrowed reference (only compared)
        // or NULL, and runs no code.
        let ok = checks
            .iter()
            .all(|(name, f)| unsafe { _PyType_Lookup(ty, name.as_ptr()) } == *f)
            // SAFETY: a live type.
            && (!self.inline_attrs || unsafe { Attrs::type_ok(py, ty) });
        // The lookups gave the type a tag if it had none; 0 caches nothing.
        // SAFETY: as above.
        let tag = unsafe { version_tag(py, ty) };
        self.passed
            .store(if ok { tag } else { 0 }, Ordering::Relaxed);
        ok
    }
}

static PROTOCOL_CLASS: ClassCheck = ClassCheck::new();
static READER_CLASS: ClassCheck = ClassCheck::new();

/// `obj.name` is the class's function `expected`, unshadowed by the instance. Only called once
/// the class's `name` is known to be `expected`, so the lookup runs no code (a function is no
/// data descriptor).
fn not_shadowed(obj: &Bound<'_, PyAny>, name: &Bound<'_, PyString>, expected: &Py<PyAny>) -> bool {
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

/// `obj.name` through `PyObject_GetAttr`.
#[inline(always)]
fn getattr<'py>(
    obj: &Bound<'py, PyAny>,
    name: &Bound<'py, PyString>,
) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: live object and str; a new reference or NULL with an exception set.
    unsafe {
        Bound::from_owned_ptr_or_err(obj.py(), ffi::PyObject_GetAttr(obj.as_ptr(), name.as_ptr()))
    }
}

/// `obj.name()` or `obj.name(arg)` with an interned name, by vectorcall (no argument tuple).
fn call_method<'py>(
    obj: &Bound<'py, PyAny>,
    name: &Bound<'py, PyString>,
    arg: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let args = [
        obj.as_ptr(),
        arg.map_or(std::ptr::null_mut(), Bound::as_ptr),
    ];
    let nargs = if arg.is_some() { 2 } else { 1 };
    // SAFETY: live objects; `args[..nargs]` holds `self`, then the argument if any.
    unsafe {
        let r = ffi::PyObject_VectorcallMethod(
            name.as_ptr(),
            args.as_ptr(),
            nargs | ffi::PY_VECTORCALL_ARGUMENTS_OFFSET,
            std::ptr::null_mut(),
        );
        Bound::from_owned_ptr_or_err(obj.py(), r)
    }
}

/// A `StreamReader` that the transport may feed directly, and its buffer.
pub(crate) struct Feed<'py> {
    st: &'static Streams,
    reader: Bound<'py, PyAny>,
    buffer: Bound<'py, PyAny>,
    /// The reader's attributes as the checks last saw them (valid while no code runs).
    attrs: Option<Attrs>,
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

    fn checked(protocol: &Bound<'py, PyAny>, st: &'static Streams) -> Option<Feed<'py>> {
        let py = protocol.py();
        let names = &st.names;
        // SAFETY: a live object's type (`of` checked it is `StreamReaderProtocol`).
        let ty = unsafe { ffi::Py_TYPE(protocol.as_ptr()) };
        let class_ok = PROTOCOL_CLASS.holds(py, ty, || {
            [
                (intern!(py, "_stream_reader"), st.stream_reader.as_ptr()),
                (intern!(py, "data_received"), st.data_received.as_ptr()),
            ]
        });
        if !class_ok {
            return None;
        }
        // The protocol's plain attributes, read directly when the class defines none of them.
        let attrs = PROTOCOL_ATTRS
            .holds(py, ty, || [(intern!(py, "_stream_reader_wr"), NONE)])
            .then(|| {
                // SAFETY: a live object, whose type passed `type_ok` for its current tag.
                unsafe { Attrs::of_instance(protocol.as_ptr()) }
            })
            .flatten();
        let proto = Inst {
            obj: protocol,
            attrs,
        };
        // `_stream_reader` is a property, which the instance cannot shadow.
        if !proto.not_shadowed(
            &[(names.data_received.bind(py), &st.data_received)],
            &PROTOCOL_SEEN,
        ) {
            return None;
        }
        // `self._stream_reader`: the weakref's referent.
        let wr = proto
            .get(names.stream_reader_wr.bind(py), &HINTS.stream_reader_wr)
            .ok()?;
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
        let ty = unsafe { ffi::Py_TYPE(reader.as_ptr()) };
        if ty != st.reader_type.as_ptr().cast()
            || !READER_CLASS.holds(py, ty, || {
                [
                    (intern!(py, "feed_data"), st.feed_data.as_ptr()),
                    (intern!(py, "_wakeup_waiter"), st.wakeup_waiter.as_ptr()),
                ]
            })
        {
            return None;
        }
        // One snapshot of the reader's attributes while no code runs (see `Feed::inst`).
        let mut r = Feed::inst_of(&reader);
        if !r.not_shadowed(
            &[
                (names.feed_data.bind(py), &st.feed_data),
                (names.wakeup_waiter.bind(py), &st.wakeup_waiter),
            ],
            &READER_SEEN,
        ) {
            return None;
        }
        let eof = r.get(names.eof.bind(py), &HINTS.eof).ok()?;
        if truthy(&eof).ok()? {
            return None;
        }
        if !eof.is_exact_instance_of::<PyBool>() {
            r = Feed::inst_of(&reader); // `bool()` may have run code
        }
        let buffer = r.get(names.buffer.bind(py), &HINTS.buffer).ok()?;
        if !buffer.is_exact_instance_of::<PyByteArray>() {
            return None;
        }
        // SAFETY: an exact bytearray has this layout.
        let exports = unsafe { (*buffer.as_ptr().cast::<ffi::PyByteArrayObject>()).ob_exports };
        if exports != 0 {
            return None;
        }
        let attrs = r.attrs;
        Some(Feed {
            st,
            reader,
            buffer,
            attrs,
        })
    }

    /// The reader with its attributes as they are now: take a new one after any call that
    /// may run code (which may also have changed the class).
    fn inst(&self) -> Inst<'_, 'py> {
        Self::inst_of(&self.reader)
    }

    /// `reader`, an exact `StreamReader`, with its inline attributes when its class defines
    /// none of the names read here (checked per version tag).
    fn inst_of<'a>(reader: &'a Bound<'py, PyAny>) -> Inst<'a, 'py> {
        let py = reader.py();
        // SAFETY: a live object's type.
        let ty = unsafe { ffi::Py_TYPE(reader.as_ptr()) };
        let direct = READER_ATTRS.holds(py, ty, || {
            [
                (intern!(py, "_eof"), NONE),
                (intern!(py, "_buffer"), NONE),
                (intern!(py, "_waiter"), NONE),
                (intern!(py, "_transport"), NONE),
                (intern!(py, "_paused"), NONE),
                (intern!(py, "_limit"), NONE),
            ]
        });
        let attrs = if direct {
            // SAFETY: a live object, whose type passed `type_ok` for its current tag.
            unsafe { Attrs::of_instance(reader.as_ptr()) }
        } else {
            None
        };
        Inst { obj: reader, attrs }
    }

    /// One read from `fd` onto the end of the reader's buffer: the byte count, 0 at EOF.
    pub(crate) fn read(&self, fd: i32) -> Result<usize, ReadError> {
        // SAFETY: an exact bytearray without exports (checked by `of`; no code ran since).
        unsafe { crate::sock_io::read_into_bytearray(self.buffer.py(), fd, self.buffer.as_ptr()) }
    }

    /// The rest of `feed_data` once the data is in the buffer: wake the reader, and pause
    /// reading when the buffer holds more than twice the limit. An error is what
    /// `data_received` would have raised.
    /// `code_ran`: Python code may have run since `of` (the snapshot it took is stale).
    pub(crate) fn fed(mut self, code_ran: bool) -> PyResult<()> {
        let py = self.reader.py();
        let names = &self.st.names;
        // _wakeup_waiter()
        let r = match self.attrs.take() {
            Some(attrs) if !code_ran => Inst {
                obj: &self.reader,
                attrs: Some(attrs),
            },
            _ => self.inst(),
        };
        let reader = &self.reader;
        let waiter = r.get(names.waiter.bind(py), &HINTS.waiter)?;
        if !waiter.is_none() {
            r.set(
                names.waiter.bind(py),
                &HINTS.waiter,
                &py.None().into_bound(py),
            )?;
            let direct = (self.st.waiter.as_ref()).and_then(|w| Some((w, w.exact(&waiter)?)));
            if let Some((w, fut)) = direct {
                // `if not waiter.cancelled(): waiter.set_result(None)`, asking `cancelled()`
                // only when `set_result` fails: the C method raises before changing anything
                // when the future is done, and a cancelled one is then dropped as streams.py
                // drops it. Any other failure is what the two calls raise in that order (an
                // uninitialised future: the same RuntimeError from either).
                let none = py.None().into_bound(py);
                if let Err(e) = Waiter::call(&w.set_result, fut, Some(&none)) {
                    if !truthy(&Waiter::call(&w.cancelled, fut, None)?)? {
                        return Err(e);
                    }
                }
            } else if !truthy(&call_method(&waiter, intern!(py, "cancelled"), None)?)? {
                let none = py.None().into_bound(py);
                call_method(&waiter, intern!(py, "set_result"), Some(&none))?;
            }
        }
        // if self._transport is not None and not self._paused and
        //         len(self._buffer) > 2 * self._limit: ...
        // A new snapshot after waking the waiter, and after `bool()` or `len()` on an object
        // of another type, which may run code.
        let mut r = self.inst();
        let transport = r.get(names.transport.bind(py), &HINTS.transport)?;
        if transport.is_none() {
            return Ok(());
        }
        let paused = r.get(names.paused.bind(py), &HINTS.paused)?;
        if truthy(&paused)? {
            return Ok(());
        }
        if !paused.is_exact_instance_of::<PyBool>() {
            r = self.inst();
        }
        let buffer = r.get(names.buffer.bind(py), &HINTS.buffer)?;
        let size = if buffer.is_exact_instance_of::<PyByteArray>() {
            // SAFETY: an exact bytearray, whose length is its size field.
            unsafe { ffi::Py_SIZE(buffer.as_ptr()) as usize }
        } else {
            let size = buffer.len()?;
            r = self.inst(); // `len()` may have run code
            size
        };
        let limit = r.get(names.limit.bind(py), &HINTS.limit)?;
        let over = match exact_int(&limit) {
            Some(l) => size as i128 > 2 * l as i128,
            None => size
                .into_pyobject(py)?
                .gt(2i32.into_pyobject(py)?.mul(&limit)?)?,
        };
        if over {
            match call_method(&transport, intern!(py, "pause_reading"), None) {
                // The transport cannot pause: forget it, and buffer everything.
                Err(e) if e.is_instance_of::<PyNotImplementedError>(py) => {
                    reader.setattr(names.transport.bind(py), py.None())?
                }
                Err(e) => return Err(e),
                Ok(_) => reader.setattr(names.paused.bind(py), true)?,
            }
        }
        Ok(())
    }
}

/// The value of an exact int that fits a C long (no code runs, no exception left).
#[inline(always)]
fn exact_int(obj: &Bound<'_, PyAny>) -> Option<i64> {
    // SAFETY: a live object; on an exact int `PyLong_AsLongAndOverflow` sets no exception and
    // reports a value out of range through `overflow`.
    unsafe {
        if ffi::PyLong_CheckExact(obj.as_ptr()) == 0 {
            return None;
        }
        let mut overflow = 0;
        let v = ffi::PyLong_AsLongAndOverflow(obj.as_ptr(), &mut overflow);
        (overflow == 0).then_some(v as i64)
    }
}

/// "The class defines no attribute of this name" in a [`ClassCheck`].
const NONE: *mut ffi::PyObject = std::ptr::null_mut();

static PROTOCOL_ATTRS: ClassCheck = ClassCheck::inline_attrs();
static READER_ATTRS: ClassCheck = ClassCheck::inline_attrs();

/// The classes' shared keys as last seen holding none of the function names checked per
/// read (`Inst::not_shadowed`).
static PROTOCOL_SEEN: KeysSeen = KeysSeen::new();
static READER_SEEN: KeysSeen = KeysSeen::new();

/// Where the attributes read per read were last found among their class's keys.
struct Hints {
    stream_reader_wr: Hint,
    eof: Hint,
    buffer: Hint,
    waiter: Hint,
    transport: Hint,
    paused: Hint,
    limit: Hint,
}

static HINTS: Hints = Hints {
    stream_reader_wr: Hint::new(),
    eof: Hint::new(),
    buffer: Hint::new(),
    waiter: Hint::new(),
    transport: Hint::new(),
    paused: Hint::new(),
    limit: Hint::new(),
};

/// A stdlib instance, with its inline attributes when they may be used directly (see
/// `inline_attrs.rs`: the class defines none of the names read through `get`/`set`).
struct Inst<'a, 'py> {
    obj: &'a Bound<'py, PyAny>,
    attrs: Option<Attrs>,
}

impl<'py> Inst<'_, 'py> {
    /// `obj.name`.
    #[inline(always)]
    fn get(&self, name: &Bound<'py, PyString>, hint: &Hint) -> PyResult<Bound<'py, PyAny>> {
        if let Some(v) = self.attrs.as_ref().and_then(|a| a.get(name, hint)) {
            // SAFETY: a borrowed reference to a live value of a live instance.
            return Ok(unsafe { Bound::from_borrowed_ptr(self.obj.py(), v) });
        }
        getattr(self.obj, name)
    }

    /// `obj.name = value`. Consumes the snapshot (dropping the old value may run code).
    fn set(
        self,
        name: &Bound<'py, PyString>,
        hint: &Hint,
        value: &Bound<'py, PyAny>,
    ) -> PyResult<()> {
        if let Some(a) = self.attrs {
            if a.replace(name, hint, value) {
                return Ok(());
            }
        }
        self.obj.setattr(name, value)
    }

    /// For each `(name, expected)`, `obj.name` is the class's function `expected` (checked by
    /// the caller's `ClassCheck`), unshadowed by the instance. With inline attributes, the
    /// class's shared keys holding none of the names settle it, `seen` remembering keys that
    /// did not (see `Attrs::lacks_all`).
    #[inline(always)]
    fn not_shadowed<const N: usize>(
        &self,
        checks: &[(&Bound<'py, PyString>, &Py<PyAny>); N],
        seen: &KeysSeen,
    ) -> bool {
        match &self.attrs {
            Some(a) => a.lacks_all(&checks.map(|(name, _)| name), seen),
            None => checks
                .iter()
                .all(|(name, expected)| not_shadowed(self.obj, name, expected)),
        }
    }
}
