//! `ferroloop._ferroloop`: the native half of ferroloop.
//!
//! The Python-visible surface is declared here, in one place. `python/ferroloop/_loop.py`
//! subclasses `LoopCore` (adding `asyncio.AbstractEventLoop` membership and the cold glue).

mod context;
mod datagram_fast;
mod errors;
mod event_loop;
mod gc_alloc;
mod gil;
mod handles;
mod inline_attrs;
mod slots;
mod sock_io;
mod spawn;
mod stdlib;
mod stream_life;
mod streams;
mod transports;

use pyo3::prelude::*;

/// `gil_used = true`: loop state relies on the GIL for exclusion (see `gil.rs`).
#[pymodule(gil_used = true)]
fn _ferroloop(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<event_loop::LoopCore>()?;
    event_loop::fastcall::install(m.py(), &m.py().get_type::<event_loop::LoopCore>())?;
    m.add_class::<handles::Handle>()?;
    m.add_class::<handles::TimerHandle>()?;
    if m.py().version_info() < (3, 12) {
        // asyncio's handles have get_context() from 3.12 on; before, neither does ours.
        m.py()
            .get_type::<handles::Handle>()
            .delattr(pyo3::intern!(m.py(), "get_context"))?;
    }
    // Both, unconditionally (no short circuit); the flag is for the tests.
    let uncounted = [
        gc_alloc::install::<handles::Handle>(m.py()),
        gc_alloc::install::<handles::TimerHandle>(m.py()),
    ];
    m.add("_HANDLES_OUTSIDE_GC_COUNT", uncounted.iter().all(|&b| b))?;
    m.add_function(wrap_pyfunction!(sock_io::read_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(sock_io::recvfrom_inet, m)?)?;
    m.add_function(wrap_pyfunction!(sock_io::accept_inet, m)?)?;
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        m.add_class::<spawn::Spawn>()?;
        m.add_function(wrap_pyfunction!(spawn::spawn, m)?)?;
    }
    m.add_function(wrap_pyfunction!(spawn::spawn_features, m)?)?;
    m.add_function(wrap_pyfunction!(transports::install_stream_fast_paths, m)?)?;
    m.add_function(wrap_pyfunction!(stream_life::install_stream_lifecycle, m)?)?;
    m.add_function(wrap_pyfunction!(stream_life::accept_socket, m)?)?;
    m.add_function(wrap_pyfunction!(stream_life::accept_connections, m)?)?;
    m.add_function(wrap_pyfunction!(stream_life::accept_ready, m)?)?;
    m.add_function(wrap_pyfunction!(stream_life::install_server_class, m)?)?;
    m.add_function(wrap_pyfunction!(stream_life::accept_plain_connection, m)?)?;
    m.add_function(wrap_pyfunction!(
        datagram_fast::install_datagram_fast_paths,
        m
    )?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
