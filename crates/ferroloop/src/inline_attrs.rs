//! Direct access to the attributes of a plain Python instance, on CPython 3.11.
//!
//! The stream fast path (`streams.rs`) reads and writes about ten attributes of a
//! `StreamReader` and its protocol per read. `PyObject_GetAttr` costs 150-200 instructions
//! each: the type's method cache, then a hash lookup in the instance's attributes. On 3.11 an
//! instance of a class without `__slots__` keeps its attributes inline, as a values array beside
//! the class's shared keys (`ht_cached_keys`), until something asks for its `__dict__`; the
//! interpreter's own `LOAD_ATTR_INSTANCE_VALUE` reads `values[i]` with `i` cached. So does this
//! module: a hint per attribute name, checked against the key (identity) before use.
//!
//! What makes a direct read equal to `getattr`: the instance's type uses the generic
//! `__getattribute__`/`__setattr__` (`Attrs::type_ok`, which callers cache per version tag), and the class defines nothing under the
//! name, so no descriptor can take precedence (the caller checks that, cached per version tag,
//! see `ClassCheck`). Then `getattr` is exactly the instance's value, and a name that is not
//! among the instance's attributes is not shadowing the class's function of that name.
//! Anything else (no inline values because a `__dict__` was made, a key found only by equality,
//! an unset value, another Python version) returns "unknown" and the caller takes the generic
//! path, which raises Python's own errors.
//!
//! Layouts (CPython 3.11, `Include/internal/pycore_object.h` and `pycore_dict.h`): the values
//! pointer is the fourth word before the object (`_PyObject_ValuesPointer`), set only while
//! no dict exists; shared keys are a `PyDictKeysObject` of kind `DICT_KEYS_SPLIT` whose entries
//! (key, unused value) follow the index table, and only ever grow while the class lives (a
//! full table makes the instance's dict instead). A snapshot ([`Attrs`]) is only valid until
//! Python code runs: take a new one after any call that may run code.

use std::os::raw::c_ulong;
use std::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyString;

/// `Py_TPFLAGS_MANAGED_DICT` in 3.11.
const MANAGED_DICT: c_ulong = 1 << 4;
/// `DICT_KEYS_SPLIT`: shared keys, one values array per instance.
const DICT_KEYS_SPLIT: u8 = 2;

/// The fixed head of 3.11's `PyDictKeysObject`; `dk_indices` follows at its end.
#[repr(C)]
#[allow(dead_code)] // the layout: only some fields are read
struct DictKeys {
    dk_refcnt: ffi::Py_ssize_t,
    dk_log2_size: u8,
    dk_log2_index_bytes: u8,
    dk_kind: u8,
    dk_version: u32,
    dk_usable: ffi::Py_ssize_t,
    dk_nentries: ffi::Py_ssize_t,
}

/// 3.11's `PyDictUnicodeEntry`.
#[repr(C)]
#[allow(dead_code)] // the layout: `value` is unused in shared keys
struct Entry {
    key: *mut ffi::PyObject,
    value: *mut ffi::PyObject,
}

/// Whether this interpreter has the layout above (checked once).
fn enabled(py: Python<'_>) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let v = py.version_info();
        (v.major, v.minor) == (3, 11) && cfg!(target_pointer_width = "64")
    })
}

/// The index of an attribute name in a class's shared keys, as last seen: only a hint, checked
/// against the key before use.
pub(crate) struct Hint(AtomicU8);

impl Hint {
    pub(crate) const fn new() -> Self {
        Hint(AtomicU8::new(u8::MAX))
    }
}

/// Shared keys once seen holding none of some names ([`Attrs::lacks_all`]).
pub(crate) struct KeysSeen {
    keys: AtomicPtr<DictKeys>,
    len: AtomicUsize,
}

impl KeysSeen {
    pub(crate) const fn new() -> Self {
        KeysSeen {
            keys: AtomicPtr::new(std::ptr::null_mut()),
            len: AtomicUsize::new(0),
        }
    }
}

enum Lookup {
    At(usize),
    Absent,
    /// Only an equal-hash key that is not the name object itself: let Python compare.
    Unknown,
}

/// A snapshot of one instance's inline attributes (valid until Python code runs).
pub(crate) struct Attrs {
    keys: *mut DictKeys,
    values: *mut *mut ffi::PyObject,
    indices: *const u8,
    entries: *const Entry,
    len: usize,
    log2_size: u8,
    log2_index_bytes: u8,
}

impl Attrs {
    /// Whether instances of `ty` may keep their attributes inline and read them through the
    /// generic attribute access: what [`Attrs::of_instance`] needs of the type. It only
    /// changes when the type does (a `__getattribute__` or `__setattr__` set on it or a base
    /// gives it a new version tag), so a caller may cache it per tag.
    ///
    /// # Safety
    /// `ty` is a live type object; the GIL is held.
    pub(crate) unsafe fn type_ok(py: Python<'_>, ty: *mut ffi::PyTypeObject) -> bool {
        if !enabled(py) {
            return false;
        }
        // SAFETY: a live type's fields.
        unsafe {
            let generic_get = (*ty).tp_getattro.is_some_and(|f| {
                std::ptr::fn_addr_eq(f, ffi::PyObject_GenericGetAttr as ffi::getattrofunc)
            });
            let generic_set = (*ty).tp_setattro.is_some_and(|f| {
                std::ptr::fn_addr_eq(f, ffi::PyObject_GenericSetAttr as ffi::setattrofunc)
            });
            let heap_managed = MANAGED_DICT | ffi::Py_TPFLAGS_HEAPTYPE;
            (*ty).tp_flags & heap_managed == heap_managed && generic_get && generic_set
        }
    }

    /// `obj`'s inline attributes, if it keeps them inline.
    ///
    /// # Safety
    /// `obj` is a live object whose type passes [`Attrs::type_ok`] (now, not only once); the
    /// GIL is held.
    #[inline(always)]
    pub(crate) unsafe fn of_instance(obj: *mut ffi::PyObject) -> Option<Attrs> {
        // SAFETY: on 3.11 (`type_ok`) a type with MANAGED_DICT is a heap type with the values
        // pointer four words before its instances, and its shared keys (when not NULL) have
        // the layout of `DictKeys`.
        unsafe {
            let ty = ffi::Py_TYPE(obj);
            let values = *obj.cast::<*mut *mut ffi::PyObject>().sub(4);
            if values.is_null() {
                return None;
            }
            let keys = (*ty.cast::<ffi::PyHeapTypeObject>())
                .ht_cached_keys
                .cast::<DictKeys>();
            if keys.is_null() || (*keys).dk_kind != DICT_KEYS_SPLIT {
                return None;
            }
            let indices = keys.cast::<u8>().add(std::mem::size_of::<DictKeys>());
            let entries = indices
                .add(1usize << (*keys).dk_log2_index_bytes)
                .cast::<Entry>();
            Some(Attrs {
                keys,
                values,
                indices,
                entries,
                len: (*keys).dk_nentries as usize,
                log2_size: (*keys).dk_log2_size,
                log2_index_bytes: (*keys).dk_log2_index_bytes,
            })
        }
    }

    /// Where `name` is among the keys: the hint if it still holds, else a probe of the keys'
    /// hash table (the steps of CPython's `unicodekeys_lookup_unicode`).
    #[inline(always)]
    fn find(&self, name: &Bound<'_, PyString>, hint: &Hint) -> Lookup {
        let h = hint.0.load(Ordering::Relaxed) as usize;
        // SAFETY: entries `0..len` are initialised keys of the live keys.
        if h < self.len && unsafe { (*self.entries.add(h)).key } == name.as_ptr() {
            return Lookup::At(h);
        }
        self.probe(name, hint)
    }

    /// `find` without a hint that holds.
    #[inline(never)]
    fn probe(&self, name: &Bound<'_, PyString>, hint: &Hint) -> Lookup {
        let name = name.as_ptr();
        // SAFETY: entries `0..len` are initialised keys (exact str objects) of the live keys;
        // the index table holds `1 << dk_log2_size` one-byte indices when the two logs are equal.
        unsafe {
            let hash = (*name.cast::<ffi::PyASCIIObject>()).hash;
            // Shared keys hold at most 30 names: one-byte indices. Anything else is unexpected.
            if hash == -1 || self.log2_size != self.log2_index_bytes {
                return Lookup::Unknown;
            }
            let mask = (1usize << self.log2_size) - 1;
            let mut perturb = hash as usize;
            let mut i = perturb & mask;
            // An open-addressing table always has an empty slot; the bound is only a guard.
            for _ in 0..=mask {
                let ix = *self.indices.add(i) as i8;
                if ix == -1 {
                    return Lookup::Absent;
                }
                if ix >= 0 {
                    let ix = ix as usize;
                    if ix >= self.len {
                        return Lookup::Unknown;
                    }
                    let key = (*self.entries.add(ix)).key;
                    if key == name {
                        hint.0.store(ix as u8, Ordering::Relaxed);
                        return Lookup::At(ix);
                    }
                    if (*key.cast::<ffi::PyASCIIObject>()).hash == hash {
                        // Equal hashes, another object: equal or not, Python decides.
                        return Lookup::Unknown;
                    }
                }
                perturb >>= 5;
                i = (i * 5 + perturb + 1) & mask;
            }
        }
        Lookup::Unknown
    }

    /// The instance's value for `name` (borrowed), or None: unknown here, ask `getattr`.
    #[inline(always)]
    pub(crate) fn get(
        &self,
        name: &Bound<'_, PyString>,
        hint: &Hint,
    ) -> Option<*mut ffi::PyObject> {
        match self.find(name, hint) {
            // SAFETY: `i < len`, and the values array has a slot per key.
            Lookup::At(i) => Some(unsafe { *self.values.add(i) }).filter(|v| !v.is_null()),
            _ => None,
        }
    }

    /// True when the instance certainly has no attribute `name`.
    pub(crate) fn lacks(&self, name: &Bound<'_, PyString>) -> bool {
        let unused = Hint::new();
        match self.find(name, &unused) {
            Lookup::Absent => true,
            // SAFETY: as in `get`.
            Lookup::At(i) => unsafe { (*self.values.add(i)).is_null() },
            Lookup::Unknown => false,
        }
    }

    /// True when the instance certainly has none of the attributes `names`: its class's
    /// shared keys hold none of them. That verdict is kept in `seen` for these keys as they
    /// are (the same object, with as many entries), so it costs two comparisons until a name
    /// is added to the keys, whatever instance asks.
    ///
    /// Sound because shared keys only grow: an entry, once added, is never removed or
    /// replaced (an attribute deleted from an instance leaves its key, with a NULL value),
    /// so keys with the same address and entry count hold the same names. The address is
    /// only compared while it cannot be reused: the keys are kept alive (one reference,
    /// never released, taken when `seen` first names them).
    #[inline(always)]
    pub(crate) fn lacks_all(&self, names: &[&Bound<'_, PyString>], seen: &KeysSeen) -> bool {
        if seen.keys.load(Ordering::Relaxed) == self.keys
            && seen.len.load(Ordering::Relaxed) == self.len
        {
            return true;
        }
        self.lacks_all_slow(names, seen)
    }

    #[cold]
    #[inline(never)]
    fn lacks_all_slow(&self, names: &[&Bound<'_, PyString>], seen: &KeysSeen) -> bool {
        let unused = Hint::new();
        if names
            .iter()
            .all(|n| matches!(self.find(n, &unused), Lookup::Absent))
        {
            if seen.keys.load(Ordering::Relaxed) != self.keys {
                // SAFETY: live shared keys (their class holds them); the GIL is held, which
                // guards the count. The reference is never released (see above).
                unsafe { (*self.keys).dk_refcnt += 1 };
                seen.keys.store(self.keys, Ordering::Relaxed);
            }
            seen.len.store(self.len, Ordering::Relaxed);
            return true;
        }
        // A name among the keys: this instance may still lack it (no value).
        names.iter().all(|n| self.lacks(n))
    }

    /// Replaces the instance's existing value for `name` with `value`, as `setattr` does;
    /// false (nothing done) when there is no such value here. Consumes the snapshot: dropping
    /// the old value may run code.
    pub(crate) fn replace(
        self,
        name: &Bound<'_, PyString>,
        hint: &Hint,
        value: &Bound<'_, PyAny>,
    ) -> bool {
        let Lookup::At(i) = self.find(name, hint) else {
            return false;
        };
        // SAFETY: `i < len`; the slot holds a strong reference or NULL.
        unsafe {
            let slot = self.values.add(i);
            let old = *slot;
            if old.is_null() {
                return false;
            }
            *slot = value.clone().into_ptr();
            ffi::Py_DECREF(old);
        }
        true
    }
}
