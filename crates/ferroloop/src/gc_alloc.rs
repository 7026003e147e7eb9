//! Allocation of handles outside the collector's young-generation count.
//!
//! CPython starts a young-generation collection after every 700 net allocations of objects of
//! GC types, and every tenth of those walks the middle generation, every tenth of those the
//! whole heap. A burst of handles (a producer thread running far ahead of the loop with
//! `call_soon_threadsafe`, 100k `call_later`s) is exactly such a run of allocations, so it
//! paid for collections of objects it has nothing to do with: measured, one full collection
//! of a bench process's heap was about a fifth of 200k `call_soon_threadsafe` calls.
//!
//! Handles need no such collections: outside debug mode they are hidden from the collector
//! while queued (see [`crate::handles::untrack`]) and give up their callback as they run, and
//! the loop's recycling pool already reuses them without allocating. So `Handle` and
//! `TimerHandle` get their own `tp_alloc`/`tp_free`: the same memory layout as
//! `PyType_GenericAlloc` and `PyObject_GC_Del` (the collector's link words before the object,
//! the object zeroed and tracked), without moving the count. Collections still see every
//! tracked handle; they are only no longer started by one.
//!
//! The layout is CPython's and is relied on only where it is known: CPython 3.9 to 3.13 with
//! the GIL, types without pre-header words (managed `__dict__`/weakrefs). Elsewhere the slots
//! are left as they are. Python subclasses of `Handle` are unaffected (`type.__new__` gives
//! them `PyType_GenericAlloc` and `PyObject_GC_Del`).

use std::os::raw::c_void;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::PyTypeInfo;

/// `sizeof(PyGC_Head)` on 3.9-3.13: two pointer-sized words.
const GC_HEAD: usize = 2 * std::mem::size_of::<usize>();

/// `Py_TPFLAGS_MANAGED_WEAKREF` (3.12+) and `Py_TPFLAGS_MANAGED_DICT` (3.11+): the type's
/// instances have extra words before the collector's (unused bits before 3.11).
const PREHEADER_FLAGS: std::os::raw::c_ulong = (1 << 3) | (1 << 4);

/// `tp_alloc`: `PyType_GenericAlloc` for a fixed-size GC type, without the young-generation
/// count (see the module comment).
unsafe extern "C" fn alloc(
    tp: *mut ffi::PyTypeObject,
    nitems: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    // SAFETY: called by CPython's object_new with the GIL held and a live type whose slots
    // `install` set, so the layout checks made there hold for it; the block is ours, sized for
    // the collector's words and the object.
    unsafe {
        let size = (*tp).tp_basicsize as usize;
        if nitems != 0 || (*tp).tp_itemsize != 0 {
            return ffi::PyType_GenericAlloc(tp, nitems);
        }
        let mem = ffi::PyObject_Malloc(GC_HEAD + size).cast::<u8>();
        if mem.is_null() {
            return ffi::PyErr_NoMemory();
        }
        // Zeroed: the collector's words say "not tracked", the object's fields are empty.
        std::ptr::write_bytes(mem, 0, GC_HEAD + size);
        let obj = mem.add(GC_HEAD).cast::<ffi::PyObject>();
        // Sets the type (a new reference, for a heap type) and the reference count.
        ffi::PyObject_Init(obj, tp);
        ffi::PyObject_GC_Track(obj.cast());
        obj
    }
}

/// `tp_free`: `PyObject_GC_Del` without the young-generation count.
unsafe extern "C" fn free(obj: *mut c_void) {
    if obj.is_null() {
        return;
    }
    // SAFETY: `obj` came from `alloc` above (the slot pair is installed together, on types
    // whose every instance comes from their own `tp_alloc`), so its block starts GC_HEAD bytes
    // before it; untracking is idempotent.
    unsafe {
        ffi::PyObject_GC_UnTrack(obj);
        ffi::PyObject_Free(obj.cast::<u8>().sub(GC_HEAD).cast());
    }
}

/// Whether the running CPython has the layout `alloc` and `free` assume: 3.9-3.13, and not a
/// free-threaded build (`sys.abiflags` with a `t`), whose objects carry no collector words.
fn layout_known(py: Python<'_>) -> bool {
    let v = py.version_info();
    if v.major != 3 || !(9..=13).contains(&v.minor) {
        return false;
    }
    py.import("sys")
        .and_then(|sys| sys.getattr("abiflags"))
        .and_then(|f| f.extract::<String>())
        .is_ok_and(|flags| !flags.contains('t'))
}

/// Gives `T`'s type object the slot pair, where the layout is known; the type's instances
/// must not exist yet (a module-init call). Whether it did.
pub(crate) fn install<T: PyTypeInfo>(py: Python<'_>) -> bool {
    if !layout_known(py) {
        return false;
    }
    let tp = T::type_object_raw(py);
    // SAFETY: `tp` is T's live heap type, created by PyO3 and not yet instantiated; setting
    // the two slots of a heap type before its first instance is what a `tp_alloc`/`tp_free`
    // given at creation would have done.
    unsafe {
        let flags = (*tp).tp_flags;
        if flags & ffi::Py_TPFLAGS_HAVE_GC == 0 || flags & PREHEADER_FLAGS != 0 {
            return false;
        }
        // Only in place of CPython's own pair (compared by address: both come from libpython).
        let generic = (*tp)
            .tp_alloc
            .is_some_and(|f| std::ptr::fn_addr_eq(f, ffi::PyType_GenericAlloc as ffi::allocfunc))
            && (*tp)
                .tp_free
                .is_some_and(|f| std::ptr::fn_addr_eq(f, ffi::PyObject_GC_Del as ffi::freefunc));
        if !generic {
            return false;
        }
        (*tp).tp_alloc = Some(alloc);
        (*tp).tp_free = Some(free);
        ffi::PyType_Modified(tp);
    }
    true
}
