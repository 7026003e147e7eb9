//! `GilCell`: interior mutability for state that is only ever touched with the GIL held.
//!
//! Ground rules:
//! - The module is declared `gil_used = true`, so on every build (free-threaded included) Python
//!   code that reaches a ferroloop object runs under the GIL. Access through a `GilCell` demands a
//!   `Python<'_>` token, which proves the GIL is held; the GIL serialises all accesses and gives
//!   them happens-before order, which is all `RefCell` needs.
//! - A borrow is never held across a call into Python, a drop of a `Py<T>` whose refcount may
//!   reach zero, or `Python::detach`: any of those can run arbitrary Python code (another thread,
//!   a `__del__`) that re-enters the loop. A re-entrant borrow is reported as `RuntimeError`,
//!   never a panic or UB.

use std::cell::{RefCell, RefMut};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

pub struct GilCell<T>(RefCell<T>);

// SAFETY: every access requires a `Python<'_>` token (the GIL is held) and the extension module
// is declared `gil_used = true`, so accesses from different threads are serialised by the GIL.
unsafe impl<T: Send> Sync for GilCell<T> {}

impl<T> GilCell<T> {
    pub const fn new(value: T) -> Self {
        GilCell(RefCell::new(value))
    }

    #[inline(always)]
    pub fn borrow_mut<'a>(&'a self, _py: Python<'_>) -> PyResult<RefMut<'a, T>> {
        match self.0.try_borrow_mut() {
            Ok(r) => Ok(r),
            Err(_) => Err(reentrant_access()),
        }
    }

    /// For `__traverse__`, which runs during garbage collection with the GIL held but without a
    /// token; a state that is borrowed right now is simply not traversed this time.
    pub fn try_borrow_for_gc(&self) -> Option<std::cell::Ref<'_, T>> {
        self.0.try_borrow().ok()
    }
}

#[cold]
fn reentrant_access() -> PyErr {
    PyRuntimeError::new_err("ferroloop: re-entrant access to loop state")
}
