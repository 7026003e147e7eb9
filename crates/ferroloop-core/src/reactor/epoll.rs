use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use crate::sys::{self, cvt};

/// Which readiness a registration asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    pub readable: bool,
    pub writable: bool,
}

impl Interest {
    pub const NONE: Interest = Interest {
        readable: false,
        writable: false,
    };

    pub fn is_empty(self) -> bool {
        !self.readable && !self.writable
    }

    fn to_epoll(self) -> u32 {
        let mut bits = 0u32;
        if self.readable {
            bits |= libc::EPOLLIN as u32;
        }
        if self.writable {
            bits |= libc::EPOLLOUT as u32;
        }
        bits
    }
}

/// One readiness report. Errors and hang-ups are reported as both readable and writable, as
/// `selectors.EpollSelector` does, so the watcher runs and sees the error from its own syscall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub token: u64,
    pub readable: bool,
    pub writable: bool,
    /// The peer closed its side, the fd failed, or urgent data arrived: states that one read
    /// may not clear, so an edge-triggered reader must go back to level-triggered
    /// (`Poller::add_read_edge`).
    pub hangup: bool,
    /// Of those, the ones that last: the peer closed its side, or the fd hung up or failed
    /// (not urgent data alone). The fd stays readable from then on (a read returns the rest
    /// of the data, then EOF or the error).
    pub eof: bool,
}

/// An epoll instance: level-triggered, except the edge-triggered read watch of
/// [`Poller::add_read_edge`].
///
/// `wait` takes `&self` and a caller-owned buffer, so the loop can block in it with the GIL
/// released while other threads still hold a reference to the loop. `close` is explicit (the
/// loop's `close()` must release its fds at once, not when the last reference goes).
pub struct Poller {
    epfd: AtomicI32,
}

/// Kernel-side event buffer for [`Poller::wait`].
pub struct EventBuf {
    events: Vec<libc::epoll_event>,
}

impl Default for EventBuf {
    fn default() -> Self {
        EventBuf {
            events: Vec::with_capacity(MAX_EVENTS),
        }
    }
}

const MAX_EVENTS: usize = 1024;

/// Edge-triggered reading, plus the conditions that make it unsafe (reported in
/// `Event::hangup`): the peer's FIN and urgent data can sit behind a read that returned data.
const EDGE_READ: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLPRI | libc::EPOLLET) as u32;

impl Poller {
    pub fn new() -> io::Result<Poller> {
        // SAFETY: epoll_create1 takes only flags; the result is checked by `cvt`.
        let epfd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Poller {
            epfd: AtomicI32::new(epfd),
        })
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.epfd.load(Ordering::Acquire)
    }

    /// Closes the epoll fd. Later calls fail with `EBADF`; closing twice is a no-op.
    pub fn close(&self) {
        let fd = self.epfd.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            sys::close(fd);
        }
    }

    /// Replaces the epoll instance with a new, empty one; closing the old drops every
    /// registration with it, including those no `delete` can reach any more (see the module
    /// comment of `reactor`). The caller registers again what it watches.
    pub fn renew(&self) -> io::Result<()> {
        // SAFETY: as in `new`.
        let epfd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let old = self.epfd.swap(epfd, Ordering::AcqRel);
        if old < 0 {
            // Closed meanwhile: stay closed.
            self.close();
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        sys::close(old);
        Ok(())
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, interest: Interest, token: u64) -> io::Result<()> {
        self.ctl_bits(op, fd, interest.to_epoll(), token)
    }

    fn ctl_bits(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid, initialised epoll_event that outlives the call; epoll_ctl
        // validates `epfd` and `fd` itself and reports bad ones through errno.
        cvt(unsafe { libc::epoll_ctl(self.as_raw_fd(), op, fd, &mut ev) }).map(|_| ())
    }

    /// Starts watching `fd`. Re-registering a number whose old registration the kernel still
    /// holds turns into a modification.
    pub fn add(&self, fd: RawFd, interest: Interest, token: u64) -> io::Result<()> {
        self.add_bits(fd, interest.to_epoll(), token)
    }

    fn add_bits(&self, fd: RawFd, bits: u32, token: u64) -> io::Result<()> {
        match self.ctl_bits(libc::EPOLL_CTL_ADD, fd, bits, token) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                self.ctl_bits(libc::EPOLL_CTL_MOD, fd, bits, token)
            }
            r => r,
        }
    }

    /// Changes what `fd` is watched for, and its token. Fails with `ENOENT` if the kernel
    /// forgot the fd (it was closed, and the number may have been reused): the caller
    /// registers it afresh with [`Poller::add`], under a token of its own if a registration of
    /// the old open file may still be alive (see the module comment of `reactor`).
    pub fn modify(&self, fd: RawFd, interest: Interest, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, interest, token)
    }

    /// `add` for reading only, edge-triggered: readiness is reported once per change (new
    /// data, EOF, an error), not on every wait while unread data remains. The owner must read
    /// until it has drained what is there, or call [`Poller::modify_read_edge`], which has the
    /// current state reported once more.
    pub fn add_read_edge(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.add_bits(fd, EDGE_READ, token)
    }

    /// `modify` to the edge-triggered read watch of [`Poller::add_read_edge`].
    pub fn modify_read_edge(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl_bits(libc::EPOLL_CTL_MOD, fd, EDGE_READ, token)
    }

    /// Stops watching `fd`. A registration the kernel already dropped (closed fd) is not an error.
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        match self.ctl(libc::EPOLL_CTL_DEL, fd, Interest::NONE, 0) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EBADF)) => Ok(()),
            r => r,
        }
    }

    /// Waits for readiness. `None` blocks until an event arrives; `Some(ZERO)` never blocks.
    /// The timeout is rounded *up* to whole milliseconds so a timer is never woken early.
    /// Returns `Err` with `EINTR` when a signal interrupted the wait.
    pub fn wait(
        &self,
        timeout: Option<Duration>,
        buf: &mut EventBuf,
        out: &mut Vec<Event>,
    ) -> io::Result<()> {
        let ms: libc::c_int = match timeout {
            None => -1,
            Some(d) => {
                let ns = d.as_nanos();
                let ms = ns.div_ceil(1_000_000);
                ms.min(i32::MAX as u128) as libc::c_int
            }
        };
        let events = &mut buf.events;
        events.clear();
        // SAFETY: the buffer has capacity MAX_EVENTS and the kernel writes at most that many
        // entries; `set_len` below uses the count the kernel returned.
        let n = cvt(unsafe {
            libc::epoll_wait(
                self.as_raw_fd(),
                events.as_mut_ptr(),
                MAX_EVENTS as libc::c_int,
                ms,
            )
        })?;
        // SAFETY: epoll_wait initialised the first `n` entries, and n <= MAX_EVENTS = capacity.
        unsafe { events.set_len(n as usize) };
        let err_bits = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
        let hangup_bits =
            (libc::EPOLLERR | libc::EPOLLHUP | libc::EPOLLRDHUP | libc::EPOLLPRI) as u32;
        let eof_bits = (libc::EPOLLERR | libc::EPOLLHUP | libc::EPOLLRDHUP) as u32;
        for ev in events.iter() {
            let bits = ev.events;
            let failed = bits & err_bits != 0;
            out.push(Event {
                token: ev.u64,
                readable: failed || bits & (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 != 0,
                writable: failed || bits & libc::EPOLLOUT as u32 != 0,
                hangup: bits & hangup_bits != 0,
                eof: bits & eof_bits != 0,
            });
        }
        Ok(())
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (RawFd, RawFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) }).unwrap();
        (fds[0], fds[1])
    }

    #[test]
    fn edge_read_reports_each_change_once_and_again_when_re_armed() {
        let p = Poller::new().unwrap();
        let mut buf = EventBuf::default();
        let (r, w) = pipe();
        p.add_read_edge(r, 9).unwrap();
        let mut out = Vec::new();
        let ready = vec![Event {
            token: 9,
            readable: true,
            writable: false,
            hangup: false,
            eof: false,
        }];
        // SAFETY: writing one byte from a valid buffer to our own pipe.
        unsafe { libc::write(w, b"x".as_ptr().cast(), 1) };
        p.wait(Some(Duration::ZERO), &mut buf, &mut out).unwrap();
        assert_eq!(out, ready);
        out.clear();
        p.wait(Some(Duration::ZERO), &mut buf, &mut out).unwrap();
        assert!(out.is_empty(), "unread data is not reported twice");
        p.modify_read_edge(r, 9).unwrap();
        p.wait(Some(Duration::ZERO), &mut buf, &mut out).unwrap();
        assert_eq!(out, ready, "re-arming reports the current state");
        out.clear();
        // SAFETY: as above.
        unsafe { libc::write(w, b"y".as_ptr().cast(), 1) };
        p.wait(Some(Duration::ZERO), &mut buf, &mut out).unwrap();
        assert_eq!(out, ready, "new data is a new edge");
        // Switching to a level-triggered watch reports what is pending.
        out.clear();
        p.modify(
            r,
            Interest {
                readable: true,
                writable: false,
            },
            9,
        )
        .unwrap();
        for _ in 0..2 {
            out.clear();
            p.wait(Some(Duration::ZERO), &mut buf, &mut out).unwrap();
            assert_eq!(out, ready);
        }
        // The writer going away is reported as a hang-up.
        sys::close(w);
        out.clear();
        p.modify_read_edge(r, 9).unwrap();
        p.wait(Some(Duration::ZERO), &mut buf, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert!(out[0].readable && out[0].hangup);
        sys::close(r);
    }

    #[test]
    fn readable_is_level_triggered_until_drained() {
        let p = Poller::new().unwrap();
        let mut buf = EventBuf::default();
        let (r, w) = pipe();
        p.add(
            r,
            Interest {
                readable: true,
                writable: false,
            },
            7,
        )
        .unwrap();
        let mut out = Vec::new();
        p.wait(Some(Duration::ZERO), &mut buf, &mut out).unwrap();
        assert!(out.is_empty());
        // SAFETY: writing one byte from a valid buffer to our own pipe.
        unsafe { libc::write(w, b"x".as_ptr().cast(), 1) };
        for _ in 0..2 {
            out.clear();
            p.wait(Some(Duration::ZERO), &mut buf, &mut out).unwrap();
            assert_eq!(
                out,
                vec![Event {
                    token: 7,
                    readable: true,
                    writable: false,
                    hangup: false,
                    eof: false,
                }]
            );
        }
        let mut data = [0u8; 4];
        // SAFETY: reading into a valid 4-byte buffer from our own pipe.
        unsafe { libc::read(r, data.as_mut_ptr().cast(), 4) };
        out.clear();
        p.wait(Some(Duration::ZERO), &mut buf, &mut out).unwrap();
        assert!(out.is_empty());
        sys::close(r);
        sys::close(w);
    }

    #[test]
    fn modify_after_close_reports_enoent_and_add_registers_again() {
        let p = Poller::new().unwrap();
        let readable = Interest {
            readable: true,
            writable: false,
        };
        let (r, w) = pipe();
        p.add(r, readable, 1).unwrap();
        sys::close(r);
        sys::close(w);
        let (r2, w2) = pipe();
        // Whichever number we get, the kernel has no registration of this file under it.
        let e = p.modify(r2, readable, 2).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        p.add(r2, readable, 2).unwrap();
        p.modify(r2, readable, 3).unwrap();
        p.delete(r2).unwrap();
        p.delete(r2).unwrap();
        sys::close(r2);
        sys::close(w2);
    }

    #[test]
    fn a_registration_outlives_its_fd_while_a_dup_holds_the_file() {
        // Why the loop's tokens carry a generation: the old file's events keep coming under
        // its old token after its number is closed (and possibly reused), and no
        // `EPOLL_CTL_DEL` by number can reach the registration any more.
        let p = Poller::new().unwrap();
        let mut buf = EventBuf::default();
        let mut out = Vec::new();
        let (r, w) = pipe();
        p.add_read_edge(r, 1).unwrap();
        // SAFETY: dup of our own open pipe end.
        let copy = cvt(unsafe { libc::fcntl(r, libc::F_DUPFD_CLOEXEC, 0) }).unwrap();
        sys::close(r);
        p.delete(r).unwrap(); // EBADF, ignored: nothing to address the registration by
                              // SAFETY: writing one byte from a valid buffer to our own pipe.
        unsafe { libc::write(w, b"x".as_ptr().cast(), 1) };
        p.wait(Some(Duration::ZERO), &mut buf, &mut out).unwrap();
        assert_eq!(out.iter().map(|e| e.token).collect::<Vec<_>>(), vec![1]);
        // SAFETY: as above.
        unsafe { libc::write(w, b"x".as_ptr().cast(), 1) };
        out.clear();
        p.renew().unwrap();
        p.wait(Some(Duration::ZERO), &mut buf, &mut out).unwrap();
        assert!(
            out.is_empty(),
            "a new instance has none of the old registrations"
        );
        sys::close(copy);
        sys::close(w);
    }

    #[test]
    fn closing_the_last_fd_of_a_file_drops_its_registration() {
        let p = Poller::new().unwrap();
        let mut buf = EventBuf::default();
        let mut out = Vec::new();
        let (r, w) = pipe();
        p.add(
            r,
            Interest {
                readable: true,
                writable: false,
            },
            1,
        )
        .unwrap();
        // SAFETY: writing one byte from a valid buffer to our own pipe.
        unsafe { libc::write(w, b"x".as_ptr().cast(), 1) };
        sys::close(r);
        p.wait(Some(Duration::ZERO), &mut buf, &mut out).unwrap();
        assert!(out.is_empty());
        sys::close(w);
    }

    #[test]
    fn bad_fd_reports_ebadf() {
        let p = Poller::new().unwrap();
        let e = p
            .add(
                100_000,
                Interest {
                    readable: true,
                    writable: false,
                },
                1,
            )
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn timeout_is_not_early() {
        let p = Poller::new().unwrap();
        let mut buf = EventBuf::default();
        let mut out = Vec::new();
        let t0 = std::time::Instant::now();
        p.wait(Some(Duration::from_micros(1500)), &mut buf, &mut out)
            .unwrap();
        assert!(t0.elapsed() >= Duration::from_micros(1500));
    }
}
