//! Raw `METH_FASTCALL | METH_KEYWORDS` entry points for the scheduling methods.
//!
//! `call_soon(callback, *args, context=None)` is the hottest method of the loop: the C Task
//! calls it by vectorcall for every step and every future done-callback. A PyO3 `*args`
//! signature builds a tuple per call (an allocation the garbage collector counts) and parses
//! keywords generically. These functions read the vectorcall array directly: no tuple for zero
//! or one argument, and a single comparison for the only keyword, `context`.
//!
//! They are installed on `LoopCore` as method descriptors by [`install`]. Each one catches
//! panics and turns them into Python exceptions: a Rust panic never unwinds into CPython.

use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, Ordering};

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use super::LoopCore;
use crate::handles::Args;

/// A second `"context"` string object seen as a keyword name (see `parse`), never freed.
static OTHER_CONTEXT_NAME: AtomicPtr<ffi::PyObject> = AtomicPtr::new(std::ptr::null_mut());

/// The parsed arguments of a scheduling call.
struct Call<'py> {
    leading: [Option<Bound<'py, PyAny>>; 2],
    callback: Bound<'py, PyAny>,
    args: Args,
    context: Option<Bound<'py, PyAny>>,
}

/// Parses `(leading..., callback, *args, context=None)`. The hot path knows only positional
/// arguments and the `context` keyword passed as a known string object; any other keyword goes
/// to [`parse_keywords`].
///
/// # Safety
/// `args`/`nargsf`/`kwnames` must be a valid vectorcall argument triple and the GIL held.
///
/// Inlined into each entry point: with its constant leading count, the positional-only call
/// (`call_soon_threadsafe(cb, arg)` from a thread) compiles to a few loads.
#[inline(always)]
unsafe fn parse<'py>(
    py: Python<'py>,
    method: &str,
    n_leading: usize,
    leading_names: &[&str],
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<Call<'py>> {
    debug_assert!(n_leading <= 2 && leading_names.len() == n_leading);
    // SAFETY: vectorcall contract (see above); all pointers are borrowed for the call's duration.
    unsafe {
        let nargs = ffi::PyVectorcall_NARGS(nargsf as usize) as usize;
        let mut context = None;
        if !kwnames.is_null() {
            // Callers such as the C Task pass the interned "context": a pointer comparison.
            // CPython's C Task uses its own static "context" (not the interned one on 3.11);
            // the first such object seen is remembered (one reference kept for good).
            let interned = pyo3::intern!(py, "context").as_ptr();
            let other = OTHER_CONTEXT_NAME.load(Ordering::Relaxed);
            // The vectorcall protocol passes the keyword names as an exact tuple of strings.
            let nkw = ffi::PyTuple_GET_SIZE(kwnames) as usize;
            for i in 0..nkw {
                let name = ffi::PyTuple_GET_ITEM(kwnames, i as ffi::Py_ssize_t);
                if name == interned || name == other {
                    context = Some(Bound::from_borrowed_ptr(py, *args.add(nargs + i)));
                    continue;
                }
                let names = Bound::from_borrowed_ptr(py, kwnames).cast_into::<PyTuple>()?;
                return parse_keywords(py, method, n_leading, leading_names, args, nargs, &names);
            }
        }
        if nargs < n_leading + 1 {
            return Err(missing_error(method, leading_names, |p| p < nargs));
        }
        let mut leading = [None, None];
        for (i, slot) in leading.iter_mut().enumerate().take(n_leading) {
            *slot = Some(Bound::from_borrowed_ptr(py, *args.add(i)));
        }
        let callback = Bound::from_borrowed_ptr(py, *args.add(n_leading));
        let rest = Args::from_raw(py, args.add(n_leading + 1), nargs - n_leading - 1)?;
        Ok(Call {
            leading,
            callback,
            args: rest,
            context: context.filter(|c| !c.is_none()),
        })
    }
}

/// `parse` for calls with keywords other than a known `context` string: `context` spelled by
/// another string object, and (as asyncio's signatures allow) the leading arguments or the
/// callback by name, in which case there are no `*args`.
///
/// # Safety
/// As for [`parse`]; `nargs` positional arguments in `args`, followed by one value per name.
#[cold]
unsafe fn parse_keywords<'py>(
    py: Python<'py>,
    method: &str,
    n_leading: usize,
    leading_names: &[&str],
    args: *const *mut ffi::PyObject,
    nargs: usize,
    names: &Bound<'py, PyTuple>,
) -> PyResult<Call<'py>> {
    let names_of = || leading_names.iter().chain(std::iter::once(&"callback"));
    // The leading arguments and the callback, by position.
    let mut slots: [Option<Bound<'py, PyAny>>; 3] = [None, None, None];
    let mut context = None;
    // SAFETY: vectorcall contract: `nargs` positional values, then one per keyword name.
    let value = |i: usize| unsafe { Bound::from_borrowed_ptr(py, *args.add(i)) };
    for (i, slot) in slots
        .iter_mut()
        .enumerate()
        .take((n_leading + 1).min(nargs))
    {
        *slot = Some(value(i));
    }
    for (i, name) in names.iter().enumerate() {
        let name = name.cast_into::<PyString>()?;
        let text = name.to_str()?;
        if text == "context" {
            let other = OTHER_CONTEXT_NAME.load(Ordering::Relaxed);
            if other.is_null() && name.is_exact_instance_of::<PyString>() {
                OTHER_CONTEXT_NAME.store(name.clone().into_ptr(), Ordering::Relaxed);
            }
            context = Some(value(nargs + i));
        } else if let Some(pos) = names_of().position(|n| *n == text) {
            if slots[pos].is_some() {
                return Err(PyTypeError::new_err(format!(
                    "{method}() got multiple values for argument '{text}'"
                )));
            }
            slots[pos] = Some(value(nargs + i));
        } else {
            return Err(PyTypeError::new_err(format!(
                "{method}() got an unexpected keyword argument '{text}'"
            )));
        }
    }
    let missing = |p: usize| slots[p].is_some();
    if !(0..=n_leading).all(missing) {
        return Err(missing_error(method, leading_names, missing));
    }
    let rest = if nargs > n_leading + 1 {
        // SAFETY: `args[n_leading + 1 .. nargs]` are live borrowed references.
        unsafe { Args::from_raw(py, args.add(n_leading + 1), nargs - n_leading - 1)? }
    } else {
        Args::Empty
    };
    let [a, b, c] = slots;
    let (leading, callback) = match n_leading {
        0 => ([None, None], a),
        1 => ([a, None], b),
        _ => ([a, b], c),
    };
    Ok(Call {
        leading,
        callback: callback.ok_or_else(|| missing_error(method, leading_names, |_| false))?,
        args: rest,
        context: context.filter(|c| !c.is_none()),
    })
}

/// CPython's "missing N required positional argument(s)" TypeError, for the leading arguments
/// and the callback that `given` says were not passed.
fn missing_error(method: &str, leading_names: &[&str], given: impl Fn(usize) -> bool) -> PyErr {
    let missing: Vec<String> = leading_names
        .iter()
        .chain(std::iter::once(&"callback"))
        .enumerate()
        .filter(|&(p, _)| !given(p))
        .map(|(_, n)| format!("'{n}'"))
        .collect();
    PyTypeError::new_err(format!(
        "{method}() missing {} required positional argument{}: {}",
        missing.len(),
        if missing.len() == 1 { "" } else { "s" },
        missing.join(" and ")
    ))
}

/// Runs `body`, turning a Rust panic into `PanicException`, as PyO3's own trampolines do.
#[inline(always)]
pub(crate) fn catch_panic<T>(body: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(body))
        .unwrap_or_else(|payload| Err(panic_error(payload, "Rust panic in ferroloop")))
}

/// The `PanicException` for a caught panic: its message, or `default` when it has none.
#[cold]
pub(crate) fn panic_error(payload: Box<dyn std::any::Any + Send>, default: &str) -> PyErr {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| default.into());
    pyo3::panic::PanicException::new_err(msg)
}

/// Runs `body` with the GIL token, turning errors into a raised exception and panics into
/// `PanicException`, as PyO3's own trampolines do.
///
/// CPython calls us with the GIL held, but PyO3 is not told (`Python::attach` would cost ~50
/// instructions per call, a thread-local lookup included, on the hottest path). So a `Py<T>`
/// dropped in `body` while no PyO3 frame is below us (a call from plain Python code, outside
/// the running loop) is parked in PyO3's deferred-decref pool rather than released. The success
/// paths drop nothing of the caller's; on an error path (the arguments of a rejected call), the
/// pool is drained before returning, so the caller sees them released as a Python method would.
pub(crate) fn trampoline(
    body: impl FnOnce(Python<'_>) -> PyResult<Py<PyAny>>,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls method implementations with the GIL held.
    let py = unsafe { Python::assume_attached() };
    let err = match catch_panic(|| body(py)) {
        Ok(obj) => return obj.into_ptr(),
        Err(err) => err,
    };
    // Attaching drains PyO3's deferred-decref pool (cheap: the thread holds the GIL). It may run
    // finalizers, which must not see our exception set yet. Not once `Py_FinalizeEx` has cleared
    // `Py_IsInitialized()` (a `__del__` run by its last collections calling `call_soon` on a
    // closed loop): PyO3 refuses to attach then (3.13+ always, older versions if it is the
    // process's first attach) by panicking, which here aborts the process. The pool can wait:
    // the process is exiting.
    // SAFETY: Py_IsInitialized may be called at any time.
    if unsafe { ffi::Py_IsInitialized() } != 0 {
        Python::attach(|_| ());
    }
    err.restore(py);
    std::ptr::null_mut()
}

macro_rules! entry {
    ($fname:ident, $method:literal, $n_leading:expr, [$($lead:literal),*], |$py:ident, $loop:ident, $call:ident| $body:expr) => {
        entry!($fname, $method, $n_leading, [$($lead),*], |$py, _slf, $loop, $call| $body);
    };
    ($fname:ident, $method:literal, $n_leading:expr, [$($lead:literal),*], |$py:ident, $slf:ident, $loop:ident, $call:ident| $body:expr) => {
        entry!($fname, $method, $n_leading, [$($lead),*], fast |_py, _loop, _args, _nargs| None, |$py, $slf, $loop, $call| $body);
    };
    // `fast` is tried first for a call without keywords: `Some(result)` is the call's result,
    // `None` goes on to the parsed, general path.
    ($fname:ident, $method:literal, $n_leading:expr, [$($lead:literal),*], fast |$fpy:ident, $floop:ident, $fargs:ident, $fnargs:ident| $fast:expr, |$py:ident, $slf:ident, $loop:ident, $call:ident| $body:expr) => {
        unsafe extern "C" fn $fname(
            slf: *mut ffi::PyObject,
            args: *const *mut ffi::PyObject,
            nargsf: ffi::Py_ssize_t,
            kwnames: *mut ffi::PyObject,
        ) -> *mut ffi::PyObject {
            trampoline(|$py| {
                // SAFETY: CPython passes a live `self` and a valid vectorcall triple.
                let $slf = unsafe { Bound::from_borrowed_ptr($py, slf) };
                // SAFETY: the method descriptor (see `install`) checked that `self` is a
                // LoopCore or a subclass of it before calling us.
                let $loop = unsafe { $slf.cast_unchecked::<LoopCore>() }.get();
                if kwnames.is_null() {
                    let ($fpy, $floop, $fargs) = ($py, $loop, args);
                    // SAFETY: `nargsf` comes from the vectorcall protocol.
                    let $fnargs = unsafe { ffi::PyVectorcall_NARGS(nargsf as usize) } as usize;
                    let fast: Option<PyResult<Py<PyAny>>> = $fast;
                    if let Some(result) = fast {
                        return result;
                    }
                }
                // SAFETY: as above.
                let $call = unsafe { parse($py, $method, $n_leading, &[$($lead),*], args, nargsf, kwnames)? };
                $body
            })
        }
    };
}

entry!(
    call_soon,
    "call_soon",
    0,
    [],
    fast | py,
    lp,
    args,
    nargs | {
        // SAFETY: `args` holds `nargs` live positional arguments (vectorcall contract).
        unsafe { lp.schedule_soon_plain(py, args, nargs) }.map(|h| h.map(Py::into_any))
    },
    |py, _slf, lp, c| {
        if let Some(context) = &c.context {
            if !lp.shared.debug() && is_c_task_callback(&c.callback) {
                // The C Task and Future discard what call_soon returns: no Handle is made.
                lp.push_task_step(py, &c.callback, c.args, context)?;
                return Ok(py.None());
            }
        }
        lp.call_soon_impl(py, &c.callback, c.args, c.context.as_ref())
            .map(Py::into_any)
    }
);

/// The type of CPython's C Task step callback (`TaskStepMethWrapper`), once seen.
static TASK_STEP_TYPE: AtomicPtr<ffi::PyTypeObject> = AtomicPtr::new(std::ptr::null_mut());
/// The method definition of the C Task's wake-up callback (`task_wakeup`), once seen.
static TASK_WAKEUP_DEF: AtomicPtr<ffi::PyMethodDef> = AtomicPtr::new(std::ptr::null_mut());

/// Is `cb` a step or wake-up callback of CPython's C Task? Those objects only exist inside the
/// C Task, which schedules them through `call_soon(cb[, arg], context=ctx)` from C and drops
/// the returned handle at once (as does the C Future for its callbacks), so the loop may queue
/// them without making a Handle. Recognised by type name and method name the first time, then
/// by pointer.
fn is_c_task_callback(cb: &Bound<'_, PyAny>) -> bool {
    // SAFETY: `cb` is a live object; its type object outlives it. The name and method-table
    // pointers read here are static C data of the `_asyncio` module or of the interpreter.
    unsafe {
        let tp = ffi::Py_TYPE(cb.as_ptr());
        let step = TASK_STEP_TYPE.load(Ordering::Relaxed);
        if tp == step {
            return true;
        }
        if tp == std::ptr::addr_of_mut!(ffi::PyCFunction_Type) {
            let f = cb.as_ptr().cast::<ffi::PyCFunctionObject>();
            let def = (*f).m_ml;
            let wakeup = TASK_WAKEUP_DEF.load(Ordering::Relaxed);
            if def == wakeup {
                return true;
            }
            if wakeup.is_null()
                && !(*f).m_self.is_null()
                && CStr::from_ptr((*def).ml_name) == c"task_wakeup"
                && CStr::from_ptr((*ffi::Py_TYPE((*f).m_self)).tp_name) == c"_asyncio.Task"
            {
                TASK_WAKEUP_DEF.store(def, Ordering::Relaxed);
                return true;
            }
            return false;
        }
        // "TaskStepMethWrapper" up to 3.11, "_asyncio.TaskStepMethWrapper" from 3.12.
        let name = CStr::from_ptr((*tp).tp_name);
        if step.is_null()
            && (name == c"TaskStepMethWrapper" || name == c"_asyncio.TaskStepMethWrapper")
        {
            TASK_STEP_TYPE.store(tp, Ordering::Relaxed);
            return true;
        }
        false
    }
}

entry!(
    call_soon_threadsafe,
    "call_soon_threadsafe",
    0,
    [],
    fast | py,
    lp,
    args,
    nargs | {
        // SAFETY: `args` holds `nargs` live positional arguments (vectorcall contract).
        unsafe { lp.schedule_soon_detached(py, args, nargs) }.map(|h| {
            let h = h?;
            lp.shared.wake_if_sleeping();
            Ok(h.into_any())
        })
    },
    |py, _slf, lp, c| {
        lp.call_soon_threadsafe_impl(py, &c.callback, c.args, c.context.as_ref())
            .map(Py::into_any)
    }
);

entry!(call_later, "call_later", 1, ["delay"], |py, slf, lp, c| {
    let delay = c.leading[0].as_ref().expect("parsed");
    lp.call_later_impl(py, &slf, delay, &c.callback, c.args, c.context.as_ref())
        .map(Py::into_any)
});

entry!(call_at, "call_at", 1, ["when"], |py, lp, c| {
    let when = c.leading[0].as_ref().expect("parsed");
    lp.call_at_impl(py, when, &c.callback, c.args, c.context.as_ref())
        .map(Py::into_any)
});

type Raw = unsafe extern "C" fn(
    *mut ffi::PyObject,
    *const *mut ffi::PyObject,
    ffi::Py_ssize_t,
    *mut ffi::PyObject,
) -> *mut ffi::PyObject;

const METHODS: [(&CStr, Raw, &CStr); 4] = [
    (
        c"call_soon",
        call_soon,
        c"call_soon($self, callback, *args, context=None)\n--\n\nArrange for callback(*args) to be called soon.",
    ),
    (
        c"call_soon_threadsafe",
        call_soon_threadsafe,
        c"call_soon_threadsafe($self, callback, *args, context=None)\n--\n\nLike call_soon(), but thread-safe: wakes the loop.",
    ),
    (
        c"call_later",
        call_later,
        c"call_later($self, delay, callback, *args, context=None)\n--\n\nArrange for callback(*args) to be called after delay seconds.",
    ),
    (
        c"call_at",
        call_at,
        c"call_at($self, when, callback, *args, context=None)\n--\n\nArrange for callback(*args) to be called at loop time `when`.",
    ),
];

/// `create_future()`: called for every `await` on a stream, a queue or a lock. A raw
/// `METH_NOARGS` function spares PyO3's argument handling.
unsafe extern "C" fn create_future(
    slf: *mut ffi::PyObject,
    _unused: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    trampoline(|py| {
        // SAFETY: CPython passes a live `self` (the descriptor checked its type).
        let slf = unsafe { Bound::from_borrowed_ptr(py, slf) };
        LoopCore::create_future_impl(slf.cast::<LoopCore>()?)
    })
}

/// The `get_debug` method descriptor installed on `LoopCore` (see `callbacks::bare_future`).
pub(crate) static GET_DEBUG_DESCR: AtomicPtr<ffi::PyObject> = AtomicPtr::new(std::ptr::null_mut());

/// `get_debug()`: every new Future asks its loop (CPython's `future_init`).
unsafe extern "C" fn get_debug(
    slf: *mut ffi::PyObject,
    _unused: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    trampoline(|py| {
        // SAFETY: as above.
        let slf = unsafe { Bound::from_borrowed_ptr(py, slf) };
        let debug = slf.cast::<LoopCore>()?.get().shared.debug();
        Ok(pyo3::types::PyBool::new(py, debug)
            .to_owned()
            .into_any()
            .unbind())
    })
}

type RawNoArgs = unsafe extern "C" fn(*mut ffi::PyObject, *mut ffi::PyObject) -> *mut ffi::PyObject;

const NOARGS_METHODS: [(&CStr, RawNoArgs, &CStr); 2] = [
    (
        c"create_future",
        create_future,
        c"create_future($self, /)\n--\n\nCreate a Future object attached to the loop.",
    ),
    (
        c"get_debug",
        get_debug,
        c"get_debug($self, /)\n--\n\nIs the loop in debug mode?",
    ),
];

/// Installs the raw entry points as methods of `LoopCore`.
pub(crate) fn install(py: Python<'_>, ty: &Bound<'_, pyo3::types::PyType>) -> PyResult<()> {
    for (name, func, doc) in NOARGS_METHODS {
        let def = Box::leak(Box::new(ffi::PyMethodDef {
            ml_name: name.as_ptr(),
            ml_meth: ffi::PyMethodDefPointer { PyCFunction: func },
            ml_flags: ffi::METH_NOARGS,
            ml_doc: doc.as_ptr(),
        }));
        // SAFETY: `ty` is a live type object and `def` a valid, 'static method definition.
        let descr = unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyDescr_NewMethod(ty.as_type_ptr(), def as *mut ffi::PyMethodDef),
            )?
        };
        if *name == c"get_debug" {
            // One reference kept for good: the address stays this descriptor's.
            GET_DEBUG_DESCR.store(descr.clone().into_ptr(), Ordering::Relaxed);
        }
        ty.setattr(PyString::new(py, name.to_str().expect("ascii")), descr)?;
    }
    for (name, func, doc) in METHODS {
        // The method table must live as long as the type: leak one small struct per method,
        // once per interpreter.
        let def = Box::leak(Box::new(ffi::PyMethodDef {
            ml_name: name.as_ptr(),
            ml_meth: ffi::PyMethodDefPointer {
                PyCFunctionFastWithKeywords: func,
            },
            ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
            ml_doc: doc.as_ptr(),
        }));
        // SAFETY: `ty` is a live type object and `def` a valid, 'static method definition.
        let descr = unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyDescr_NewMethod(ty.as_type_ptr(), def as *mut ffi::PyMethodDef),
            )?
        };
        ty.setattr(PyString::new(py, name.to_str().expect("ascii")), descr)?;
    }
    Ok(())
}
