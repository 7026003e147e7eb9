//! The reactor: readiness polling for the loop thread.
//!
//! Ground rules:
//! - One [`Poller`] per loop, used only from the loop thread. Blocking in [`Poller::wait`] happens
//!   with the GIL released, so nothing reachable from here may hold a Python object.
//! - User watchers (`add_reader`/`add_writer`) are level-triggered: as with `selectors`, a reader
//!   whose data is not drained fires again on the next iteration, and no re-arm syscall is needed.
//! - [`Waker`] is the only part other threads touch.
//!
//! Epoll and closed descriptors: epoll tracks the open file description (and the number it was
//! registered under), not the fd number. If a user closes an fd without removing its watcher,
//! the kernel drops the registration silently, and the number may be reused: `modify` then
//! fails with `ENOENT` and the caller registers the new file with `add`; `add` falls back to
//! `modify` on `EEXIST` (the same file is still registered), and `delete` ignores
//! `ENOENT`/`EBADF`. But the kernel drops a registration only when the *last* fd of the open
//! file closes: while a `dup` (or a forked child) holds the file, its registration stays,
//! keeps its token, and can no longer be removed (`EPOLL_CTL_DEL` by number finds the new file).
//! Its events arrive beside those of whatever is registered on the number next, so a token
//! must tell the two apart: the loop's carry a generation beside the fd number (`io_watch.rs`).

mod epoll;
mod waker;

pub use epoll::{Event, EventBuf, Interest, Poller};
pub use waker::Waker;
