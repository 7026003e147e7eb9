//! Stdlib objects and interned names, looked up once per interpreter.
//!
//! Futures and tasks are CPython's C `asyncio.Future`/`asyncio.Task`: their fast paths check
//! exact types, so ferroloop creates those, never subclasses of its own.

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyString, PyTuple};

pub struct Stdlib {
    pub future_type: Py<PyAny>,
    pub task_type: Py<PyAny>,
    /// `asyncio.events`: its `_get_running_loop`/`_set_running_loop` are looked up per
    /// `run_forever`, not cached, so code (and CPython's tests) that swaps them is honoured.
    pub events: Py<PyAny>,
    pub iscoroutine: Py<PyAny>,
    pub iscoroutinefunction: Py<PyAny>,
    pub system_exit: Py<PyAny>,
    pub keyboard_interrupt: Py<PyAny>,
    pub kw_loop: Py<PyTuple>,
    pub kw_loop_name_context: Py<PyTuple>,
    pub kw_loop_name: Py<PyTuple>,
    pub kw_context: Py<PyTuple>,
    pub task_accepts_context: bool,
    pub method_type: Py<PyAny>,
    /// C asyncio finds the running loop without a system call. Before 3.12 its lookup (what
    /// `Future()` without `loop=` does) compares the pid saved with the loop to `getpid()`, a
    /// system call per future on glibc, which caches no pid.
    pub running_loop_lookup_is_cheap: bool,
    /// `asyncio.Future` / `asyncio.Task` are the C types (static types before 3.12), whose
    /// `tp_new` and `tp_init` can be called directly (see `callbacks::new_static`).
    pub future_is_static_c_type: bool,
    pub task_is_static_c_type: bool,
}

static STDLIB: PyOnceLock<Stdlib> = PyOnceLock::new();
static SUPPORT: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn load(py: Python<'_>) -> PyResult<Stdlib> {
    let asyncio = py.import("asyncio")?;
    let events = py.import("asyncio.events")?;
    let coroutines = py.import("asyncio.coroutines")?;
    let builtins = py.import("builtins")?;
    let names = |items: &[&str]| -> PyResult<Py<PyTuple>> {
        Ok(PyTuple::new(py, items.iter().map(|s| PyString::intern(py, s)))?.unbind())
    };
    Ok(Stdlib {
        future_type: asyncio.getattr("Future")?.unbind(),
        task_type: asyncio.getattr("Task")?.unbind(),
        events: events.clone().into_any().unbind(),
        iscoroutine: coroutines.getattr("iscoroutine")?.unbind(),
        iscoroutinefunction: coroutines.getattr("iscoroutinefunction")?.unbind(),
        system_exit: builtins.getattr("SystemExit")?.unbind(),
        keyboard_interrupt: builtins.getattr("KeyboardInterrupt")?.unbind(),
        kw_loop: names(&["loop"])?,
        kw_loop_name_context: names(&["loop", "name", "context"])?,
        kw_loop_name: names(&["loop", "name"])?,
        kw_context: names(&["context"])?,
        task_accepts_context: py.version_info() >= (3, 11),
        method_type: py.import("types")?.getattr("MethodType")?.unbind(),
        running_loop_lookup_is_cheap: py.version_info() >= (3, 12),
        future_is_static_c_type: is_static_c_type(&asyncio.getattr("Future")?),
        task_is_static_c_type: is_static_c_type(&asyncio.getattr("Task")?),
    })
}

/// `obj` is a static (non-heap) type with `tp_new` and `tp_init`: a C type whose slots can be
/// called directly.
fn is_static_c_type(obj: &Bound<'_, PyAny>) -> bool {
    let tp = obj.as_ptr().cast::<ffi::PyTypeObject>();
    // SAFETY: `obj` is live; its type fields are read only once it is known to be a type.
    unsafe {
        ffi::PyType_Check(obj.as_ptr()) != 0
            && ffi::PyType_GetFlags(tp) & ffi::Py_TPFLAGS_HEAPTYPE == 0
            && (*tp).tp_new.is_some()
            && (*tp).tp_init.is_some()
    }
}

impl Stdlib {
    pub fn get_running_loop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.events
            .bind(py)
            .getattr(pyo3::intern!(py, "_get_running_loop"))?
            .call0()
    }

    pub fn set_running_loop(&self, py: Python<'_>, lp: &Bound<'_, PyAny>) -> PyResult<()> {
        self.events
            .bind(py)
            .getattr(pyo3::intern!(py, "_set_running_loop"))?
            .call1((lp,))
            .map(drop)
    }
}

pub fn stdlib(py: Python<'_>) -> PyResult<&'static Stdlib> {
    STDLIB.get_or_try_init(py, || load(py))
}

/// `ferroloop._support`: the cold Python helpers (message formatting, logging).
pub fn support(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    let m = SUPPORT.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("ferroloop._support")?.unbind())
    })?;
    Ok(m.bind(py))
}

/// Calls `callable(*args, **dict(zip(kwnames, kwvalues)))` by vectorcall, without building a
/// dict. `kwnames` must be a tuple of interned strings.
pub fn call_kw<'py>(
    py: Python<'py>,
    callable: &Bound<'py, PyAny>,
    args: &[&Bound<'py, PyAny>],
    kwnames: &Bound<'py, PyTuple>,
    kwvalues: &[&Bound<'py, PyAny>],
) -> PyResult<Bound<'py, PyAny>> {
    debug_assert_eq!(kwnames.len(), kwvalues.len());
    let mut stack: [*mut ffi::PyObject; 8] = [std::ptr::null_mut(); 8];
    let n = args.len() + kwvalues.len();
    assert!(n < stack.len(), "call_kw supports at most 7 arguments");
    for (i, a) in args.iter().chain(kwvalues.iter()).enumerate() {
        stack[i + 1] = a.as_ptr();
    }
    // SAFETY: `stack[1..=n]` holds borrowed pointers to live objects (kept alive by the `Bound`
    // references for the duration of the call); slot 0 is scratch space, which
    // PY_VECTORCALL_ARGUMENTS_OFFSET allows the callee to use. `kwnames` is a tuple of str.
    unsafe {
        let ret = ffi::PyObject_Vectorcall(
            callable.as_ptr(),
            stack.as_ptr().add(1),
            args.len() | ffi::PY_VECTORCALL_ARGUMENTS_OFFSET,
            kwnames.as_ptr(),
        );
        Bound::from_owned_ptr_or_err(py, ret)
    }
}

/// `exc` is SystemExit or KeyboardInterrupt: the two exceptions asyncio lets escape a callback.
pub fn is_exit_exception(py: Python<'_>, err: &PyErr) -> bool {
    match stdlib(py) {
        Ok(s) => {
            err.is_instance(py, s.system_exit.bind(py))
                || err.is_instance(py, s.keyboard_interrupt.bind(py))
        }
        Err(_) => false,
    }
}
