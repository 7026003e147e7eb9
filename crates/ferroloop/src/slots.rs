//! Direct reads of a Python class's `__slots__`, for the native fast paths of the Python
//! transports.
//!
//! `getattr(tr, "_sock_fd")` on a slotted instance walks the type's method cache, finds the
//! member descriptor, checks the instance's type against it and reads one pointer: 20-30 ns, and
//! a request used about ten of them. A slot is a pointer at a fixed offset in the instance, so
//! the offsets are resolved once per class and the pointer is read directly.
//!
//! Soundness: an offset is only used for an object whose exact type is the one it was resolved
//! for, while that type's version tag is unchanged. CPython assigns a new tag (globally unique)
//! whenever the type or one of its bases is modified, so a class attribute or property that
//! later shadows a slot invalidates the entry. An offset is only taken from a plain object
//! member (`T_OBJECT_EX`, what `__slots__` creates) of a base of that type; anything else
//! (a property, a missing name) makes the whole table fall back to `getattr`, which is also
//! what an unset slot does, so the error raised is Python's own.

use std::os::raw::c_uint;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::gil::GilCell;

/// Entries kept per table: one per concrete class seen (the transport class and, rarely, a
/// user subclass).
const MAX_ENTRIES: usize = 8;

struct Entry<const N: usize> {
    ty: usize,
    tag: c_uint,
    offsets: Option<Offsets<N>>,
}

/// A class's resolved offsets, shared with the readers made for its instances (a reader
/// takes a reference, not a copy of the array).
type Offsets<const N: usize> = std::sync::Arc<[isize; N]>;

/// The offsets of `N` named slots, per concrete class.
pub(crate) struct SlotTable<const N: usize> {
    names: [&'static str; N],
    cache: GilCell<Vec<Entry<N>>>,
}

/// Whether a non-zero `tp_version_tag` is valid by itself. Up to 3.11 a modified type keeps
/// its stale tag and only loses `Py_TPFLAGS_VALID_VERSION_TAG`; from 3.12 modification zeroes
/// the tag, and 3.13 no longer maintains the flag at all.
static TAG_ALONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// A type's method-cache version tag, or 0 when it has none (then nothing is cached for it).
///
/// # Safety
/// `ty` must be a live type object.
#[inline(always)]
pub(crate) unsafe fn version_tag(py: Python<'_>, ty: *mut ffi::PyTypeObject) -> c_uint {
    // SAFETY: `ty` is live per the caller; the flags and the tag are plain fields.
    let (flags, tag) = unsafe { ((*ty).tp_flags, (*ty).tp_version_tag) };
    if tag == 0 || flags & ffi::Py_TPFLAGS_VALID_VERSION_TAG != 0 {
        return tag;
    }
    if *TAG_ALONE.get_or_init(|| py.version_info() >= (3, 12)) {
        tag
    } else {
        0
    }
}

impl<const N: usize> SlotTable<N> {
    pub(crate) const fn new(names: [&'static str; N]) -> Self {
        SlotTable {
            names,
            cache: GilCell::new(Vec::new()),
        }
    }

    /// A reader of `obj`'s slots: direct when its class's layout is known, `getattr` otherwise.
    pub(crate) fn reader<'a, 'py>(&'a self, obj: &'a Bound<'py, PyAny>) -> SlotReader<'a, 'py, N> {
        SlotReader {
            obj,
            names: &self.names,
            offsets: self.offsets(obj),
        }
    }

    #[inline(always)]
    fn offsets(&self, obj: &Bound<'_, PyAny>) -> Option<Offsets<N>> {
        let py = obj.py();
        // SAFETY: `obj` is live, so is its type.
        let ty_ptr = unsafe { ffi::Py_TYPE(obj.as_ptr()) };
        // SAFETY: `ty_ptr` is a live type (held by `obj`).
        let tag = unsafe { version_tag(py, ty_ptr) };
        if tag != 0 {
            let cache = self.cache.borrow_mut(py).ok()?;
            if let Some(e) = cache
                .iter()
                .find(|e| e.ty == ty_ptr as usize && e.tag == tag)
            {
                return e.offsets.clone();
            }
        }
        self.refresh(obj)
    }

    #[cold]
    fn refresh(&self, obj: &Bound<'_, PyAny>) -> Option<Offsets<N>> {
        let py = obj.py();
        let ty = obj.get_type();
        let ty_ptr = ty.as_type_ptr();
        let offsets = self.resolve(&ty).map(std::sync::Arc::new);
        // Looking the names up gave the type a tag if it had none.
        // SAFETY: as above.
        let tag = unsafe { version_tag(py, ty_ptr) };
        if tag != 0 {
            if let Ok(mut cache) = self.cache.borrow_mut(py) {
                cache.retain(|e| e.ty != ty_ptr as usize);
                if cache.len() >= MAX_ENTRIES {
                    cache.remove(0);
                }
                cache.push(Entry {
                    ty: ty_ptr as usize,
                    tag,
                    offsets: offsets.clone(),
                });
            }
        }
        offsets
    }

    fn resolve(&self, ty: &Bound<'_, pyo3::types::PyType>) -> Option<[isize; N]> {
        let py = ty.py();
        // A class with its own __getattribute__ or __getattr__ does not read slots plainly.
        // SAFETY: `ty` is a live type object.
        let getattro = unsafe { (*ty.as_type_ptr()).tp_getattro };
        let generic = getattro.map(|f| f as usize)
            == Some(ffi::PyObject_GenericGetAttr as ffi::getattrofunc as usize);
        if !generic {
            return None;
        }
        let mut offsets = [0isize; N];
        for (slot, name) in offsets.iter_mut().zip(self.names) {
            // Class attribute access returns a member descriptor itself.
            let descr = ty.getattr(PyString::intern(py, name)).ok()?;
            let member_type = std::ptr::addr_of_mut!(ffi::PyMemberDescr_Type);
            if descr.get_type().as_type_ptr() != member_type {
                return None;
            }
            // SAFETY: `descr` is exactly a member descriptor, so it has this layout; its
            // `d_member` points to the owning type's member table, which lives as long as the
            // type. `d_type` is the class that defined the slot. (pyo3-ffi declares `d_member`
            // with another pointer type before 3.11; the object is the same PyMemberDef.)
            let (def, owner) = unsafe {
                let d = descr.as_ptr().cast::<ffi::PyMemberDescrObject>();
                (
                    &*((*d).d_member as *const ffi::PyMemberDef),
                    (*d).d_common.d_type,
                )
            };
            // SAFETY: both are live type objects.
            let is_base = unsafe { ffi::PyType_IsSubtype(ty.as_type_ptr(), owner) } != 0;
            if def.type_code != ffi::Py_T_OBJECT_EX || !is_base || def.offset <= 0 {
                return None;
            }
            *slot = def.offset;
        }
        Some(offsets)
    }
}

pub(crate) struct SlotReader<'a, 'py, const N: usize> {
    obj: &'a Bound<'py, PyAny>,
    names: &'a [&'static str; N],
    offsets: Option<Offsets<N>>,
}

impl<'py, const N: usize> SlotReader<'_, 'py, N> {
    /// The value of slot `i`: what `getattr(obj, names[i])` returns.
    #[inline(always)]
    pub(crate) fn get(&self, i: usize) -> PyResult<Bound<'py, PyAny>> {
        if let Some(offsets) = &self.offsets {
            // SAFETY: `offsets` were resolved for this object's exact type under its current
            // version tag (see the module comment): slot `i` is an object pointer at this
            // offset inside the instance, NULL when unset.
            let p = unsafe {
                *self
                    .obj
                    .as_ptr()
                    .cast::<u8>()
                    .offset(offsets[i])
                    .cast::<*mut ffi::PyObject>()
            };
            if !p.is_null() {
                // SAFETY: a non-NULL slot holds a strong reference to a live object.
                return Ok(unsafe { Bound::from_borrowed_ptr(self.obj.py(), p) });
            }
        }
        self.getattr(i)
    }

    /// `setattr(obj, names[i], value)`: a direct store when the class's layout is known.
    #[inline(always)]
    pub(crate) fn set(&self, i: usize, value: &Bound<'py, PyAny>) -> PyResult<()> {
        if let Some(offsets) = &self.offsets {
            // SAFETY: as in `get`: slot `i` is an object pointer at this offset, NULL or a
            // strong reference. The new value's reference is stored before the old one is
            // released (which may run code that reads the slot).
            unsafe {
                let slot = self
                    .obj
                    .as_ptr()
                    .cast::<u8>()
                    .offset(offsets[i])
                    .cast::<*mut ffi::PyObject>();
                let old = *slot;
                *slot = value.clone().into_ptr();
                ffi::Py_XDECREF(old);
            }
            return Ok(());
        }
        self.obj
            .setattr(PyString::intern(self.obj.py(), self.names[i]), value)
    }

    /// The value of slot `i`, or None when the slot is unset (what `getattr(obj, name, None)`
    /// returns for a slot).
    #[inline(always)]
    pub(crate) fn get_or_none(&self, i: usize) -> PyResult<Bound<'py, PyAny>> {
        match self.get(i) {
            Ok(v) => Ok(v),
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyAttributeError>(self.obj.py()) => {
                Ok(self.obj.py().None().into_bound(self.obj.py()))
            }
            Err(e) => Err(e),
        }
    }

    #[cold]
    #[inline(never)]
    fn getattr(&self, i: usize) -> PyResult<Bound<'py, PyAny>> {
        self.obj
            .getattr(PyString::intern(self.obj.py(), self.names[i]))
    }
}

/// `int(obj)` for an fd-sized exact int (what `_sock_fd` holds); other values go through
/// PyO3's conversion and its errors.
#[inline(always)]
pub(crate) fn small_int(obj: &Bound<'_, PyAny>) -> PyResult<i32> {
    // SAFETY: `obj` is live; PyLong_AsLong on an exact int only fails by overflow, which
    // leaves an exception that the fallback below replaces with PyO3's own.
    unsafe {
        if ffi::PyLong_CheckExact(obj.as_ptr()) != 0 {
            let v = ffi::PyLong_AsLong(obj.as_ptr());
            if let Ok(v) = i32::try_from(v) {
                if v != -1 || ffi::PyErr_Occurred().is_null() {
                    return Ok(v);
                }
            }
            ffi::PyErr_Clear();
        }
    }
    obj.extract()
}

/// The interpreter's cached `0` (CPython keeps one object per small int), once looked up.
static ZERO: std::sync::atomic::AtomicPtr<ffi::PyObject> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// `bool(obj)`, without a call for the values slots usually hold (True, False, None, the
/// counter at 0, the empty tuple that stands for "no write queue").
#[inline(always)]
pub(crate) fn truthy(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let p = obj.as_ptr();
    // SAFETY: pointer comparisons with the interpreter's singletons, and the type and size
    // fields of a live object.
    unsafe {
        if p == ffi::Py_True() {
            return Ok(true);
        }
        if p == ffi::Py_False() || p == ffi::Py_None() {
            return Ok(false);
        }
        let zero = ZERO.load(std::sync::atomic::Ordering::Relaxed);
        if p == zero {
            return Ok(false);
        }
        if ffi::PyTuple_CheckExact(p) != 0 {
            return Ok(ffi::Py_SIZE(p) != 0);
        }
        if zero.is_null() {
            // A new reference to the cached small int, kept for the life of the process.
            ZERO.store(
                ffi::PyLong_FromLong(0),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
    obj.is_truthy()
}
