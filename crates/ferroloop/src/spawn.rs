//! Spawning a child for `subprocess_exec` / `subprocess_shell` without blocking the loop.
//!
//! Ground rules:
//! - This is only the common case: `python/ferroloop/_unix/subprocess.py` decides whether a
//!   call can be served here (stdio as pipes, inherited, /dev/null or fds; `executable`,
//!   `close_fds=True`, `cwd`, `env`, `restore_signals`, `start_new_session`) and otherwise uses
//!   `subprocess.Popen`.
//! - Why: `Popen` (and `posix_spawn`) clone with `CLONE_VFORK`, so the calling thread sleeps
//!   until the child has been scheduled and has exec'd. When the CPUs are busy (other
//!   children running) that wait is most of the time a loop spends per child, and the loop
//!   does nothing else meanwhile. Here the child is cloned with `CLONE_VM` only: the loop goes
//!   on at once and learns the outcome from a close-on-exec pipe, as `Popen` does: EOF when
//!   the exec succeeded, or the stage and errno of the failure.
//! - The child shares the parent's memory (and thread-local storage) while the parent runs,
//!   so it touches nothing but its [`ChildData`] (its own stack, the argument and environment
//!   arrays, copied beforehand) and makes raw system calls (a libc wrapper would write the
//!   parent thread's `errno`). The data is freed only once the pipe reports: the child has
//!   exec'd or is exiting by then.
//! - The child is what `Popen` makes: signal handlers the parent installed are reset (all
//!   signals are blocked from before the clone until then), SIGPIPE and SIGXFSZ are reset to
//!   their defaults when `restore_signals`; the parent's signal mask is restored; stdio dup'ed
//!   onto 0, 1 and 2; optionally a new session and a new cwd; with `close_fds` every fd from 3
//!   up is closed (`close_range`); then exec, trying each candidate path in turn and reporting
//!   the first error that is not ENOENT/ENOTDIR (else the last), as `_posixsubprocess` does.
//! - x86-64 only (raw system calls); elsewhere the caller uses `Popen`.

use pyo3::prelude::*;

/// `(supported, close_range)`: whether this platform spawns natively, and whether the kernel
/// has `close_range` (needed for `close_fds`).
#[pyfunction]
pub fn spawn_features() -> (bool, bool) {
    imp::features()
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub use imp::{spawn, Spawn};

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
mod imp {
    pub fn features() -> (bool, bool) {
        (false, false)
    }
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod imp {
    use std::ffi::{c_char, c_int, c_void, CString};
    use std::ptr;
    use std::sync::OnceLock;

    use pyo3::exceptions::{PyRuntimeError, PyValueError};
    use pyo3::prelude::*;
    use pyo3::types::{PyBytes, PyList};

    use crate::errors::os_error;
    use ferroloop_core::sys::{close, cvt};

    /// The child's stdio, per fd 0..2, as the caller encodes it.
    const INHERIT: i32 = -1;
    const PIPE: i32 = -2;
    const DEVNULL: i32 = -3;
    /// stderr only: stdout's (`stderr=STDOUT` with stdout redirected).
    const SAME_AS_STDOUT: i32 = -4;

    /// What a failed child reports: a stage, then errno (two native-endian i32s).
    const STAGE_SETUP: i32 = 1;
    const STAGE_EXEC: i32 = 2;

    const STACK_SIZE: usize = 32 * 1024;

    mod nr {
        pub const WRITE: usize = 1;
        pub const CLOSE: usize = 3;
        pub const RT_SIGACTION: usize = 13;
        pub const RT_SIGPROCMASK: usize = 14;
        pub const DUP2: usize = 33;
        pub const EXECVE: usize = 59;
        pub const FCNTL: usize = 72;
        pub const CHDIR: usize = 80;
        pub const SETSID: usize = 112;
        pub const EXIT_GROUP: usize = 231;
        pub const OPENAT: usize = 257;
        pub const CLOSE_RANGE: usize = 436;
    }

    /// A raw system call: returns the result, or -errno. Touches no thread-local state.
    ///
    /// # Safety
    /// The arguments must be valid for system call `n`.
    #[inline(always)]
    unsafe fn syscall(n: usize, a1: usize, a2: usize, a3: usize, a4: usize) -> isize {
        let ret: isize;
        // SAFETY: the x86-64 Linux system call convention; rcx and r11 are clobbered by the
        // instruction, memory effects are the kernel's (hence no `nomem`).
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") n as isize => ret,
                in("rdi") a1,
                in("rsi") a2,
                in("rdx") a3,
                in("r10") a4,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    /// The kernel's `struct sigaction` on x86-64 (with an 8-byte signal set).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }

    pub fn features() -> (bool, bool) {
        static FEATURES: OnceLock<(bool, bool)> = OnceLock::new();
        *FEATURES.get_or_init(|| {
            // An empty range past any fd: 0 where close_range exists, ENOSYS where it does not.
            // SAFETY: closes nothing (no fd is that large).
            let r = unsafe { syscall(nr::CLOSE_RANGE, u32::MAX as usize, u32::MAX as usize, 0, 0) };
            (true, r == 0)
        })
    }

    /// Everything the child reads, allocated by the parent and freed only after the child has
    /// exec'd or is exiting. Pointers in the arrays point into the `CString`s beside them.
    #[repr(C, align(16))]
    struct ChildData {
        stack: [u8; STACK_SIZE],
        paths: Vec<CString>,
        path_ptrs: Vec<*const c_char>,
        argv: Vec<CString>,
        argv_ptrs: Vec<*const c_char>,
        envp: Vec<CString>,
        envp_ptrs: Vec<*const c_char>,
        cwd: Option<CString>,
        sources: [i32; 3],
        close_fds: bool,
        restore_signals: bool,
        setsid: bool,
        /// Leave glibc's internal signals (32, 33) ignored, as its posix_spawn does (the
        /// caller says when Popen would have used it).
        ignore_internal: bool,
        /// The parent thread's signal mask, restored in the child before exec.
        mask: u64,
        /// The write end of the error pipe (at least 3).
        err_w: i32,
    }

    // SAFETY: the raw pointers point into the `CString`s of the same struct, which move with
    // it; nothing is written through them.
    unsafe impl Send for ChildData {}
    // SAFETY: as above; shared access only reads.
    unsafe impl Sync for ChildData {}

    /// Reports a failure to the parent and exits, as `_posixsubprocess`'s child does.
    unsafe fn fail(d: &ChildData, stage: i32, errno: isize) -> ! {
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&stage.to_ne_bytes());
        msg[4..].copy_from_slice(&(errno as i32).to_ne_bytes());
        // SAFETY: `msg` is valid for 8 bytes; a failed write only loses the report.
        unsafe {
            syscall(nr::WRITE, d.err_w as usize, msg.as_ptr() as usize, 8, 0);
            syscall(nr::EXIT_GROUP, 127, 0, 0, 0);
        }
        // exit_group does not return.
        #[allow(clippy::empty_loop)]
        loop {}
    }

    /// The child, on its own stack in the parent's memory. Raw system calls only.
    extern "C" fn child_main(arg: *mut c_void) -> c_int {
        // SAFETY: the parent keeps the data alive and unchanged until the error pipe reports.
        let d = unsafe { &*(arg as *const ChildData) };
        // SAFETY: each call below is given valid pointers into `d` or the local structs.
        unsafe {
            for sig in 1..=64usize {
                if sig == libc::SIGKILL as usize || sig == libc::SIGSTOP as usize {
                    continue;
                }
                let mut old = KernelSigaction {
                    handler: 0,
                    flags: 0,
                    restorer: 0,
                    mask: 0,
                };
                if syscall(nr::RT_SIGACTION, sig, 0, &mut old as *mut _ as usize, 8) != 0 {
                    continue;
                }
                let restore = d.restore_signals
                    && (sig == libc::SIGPIPE as usize || sig == libc::SIGXFSZ as usize);
                let handled = old.handler != libc::SIG_DFL && old.handler != libc::SIG_IGN;
                let internal = d.ignore_internal && (sig == 32 || sig == 33);
                if restore || handled || internal {
                    let new = KernelSigaction {
                        handler: if internal {
                            libc::SIG_IGN
                        } else {
                            libc::SIG_DFL
                        },
                        flags: 0,
                        restorer: 0,
                        mask: 0,
                    };
                    syscall(nr::RT_SIGACTION, sig, &new as *const _ as usize, 0, 8);
                }
            }
            if d.setsid {
                let r = syscall(nr::SETSID, 0, 0, 0, 0);
                if r < 0 {
                    fail(d, STAGE_SETUP, -r);
                }
            }
            for target in 0..3usize {
                let source = d.sources[target];
                let r = match source {
                    INHERIT => 0,
                    DEVNULL => {
                        let fd = syscall(
                            nr::OPENAT,
                            libc::AT_FDCWD as isize as usize,
                            c"/dev/null".as_ptr() as usize,
                            libc::O_RDWR as usize,
                            0,
                        );
                        if fd < 0 {
                            fd
                        } else if fd as usize != target {
                            let r = syscall(nr::DUP2, fd as usize, target, 0, 0);
                            syscall(nr::CLOSE, fd as usize, 0, 0, 0);
                            r
                        } else {
                            0
                        }
                    }
                    SAME_AS_STDOUT => syscall(nr::DUP2, 1, 2, 0, 0),
                    fd if fd as usize == target => {
                        // Already in place: only make it inheritable.
                        syscall(nr::FCNTL, target, libc::F_SETFD as usize, 0, 0)
                    }
                    fd => syscall(nr::DUP2, fd as usize, target, 0, 0),
                };
                if r < 0 {
                    fail(d, STAGE_SETUP, -r);
                }
            }
            if let Some(cwd) = &d.cwd {
                let r = syscall(nr::CHDIR, cwd.as_ptr() as usize, 0, 0, 0);
                if r < 0 {
                    fail(d, STAGE_SETUP, -r);
                }
            }
            if d.close_fds {
                // Everything from 3 up but the error pipe.
                let e = d.err_w as usize;
                let mut r = 0;
                if e > 3 {
                    r = syscall(nr::CLOSE_RANGE, 3, e - 1, 0, 0);
                }
                if r == 0 {
                    r = syscall(nr::CLOSE_RANGE, e + 1, u32::MAX as usize, 0, 0);
                }
                if r < 0 {
                    fail(d, STAGE_SETUP, -r);
                }
            }
            syscall(
                nr::RT_SIGPROCMASK,
                libc::SIG_SETMASK as usize,
                &d.mask as *const u64 as usize,
                0,
                8,
            );
            let mut saved = 0isize;
            let mut last = libc::ENOENT as isize;
            for &path in &d.path_ptrs {
                if path.is_null() {
                    break;
                }
                let r = syscall(
                    nr::EXECVE,
                    path as usize,
                    d.argv_ptrs.as_ptr() as usize,
                    d.envp_ptrs.as_ptr() as usize,
                    0,
                );
                last = -r;
                if last != libc::ENOENT as isize && last != libc::ENOTDIR as isize && saved == 0 {
                    saved = last;
                }
            }
            fail(d, STAGE_EXEC, if saved != 0 { saved } else { last });
        }
    }

    fn cstrings(items: &Bound<'_, PyList>) -> PyResult<Vec<CString>> {
        items
            .iter()
            .map(|item| {
                let bytes = item.cast_into::<PyBytes>()?;
                CString::new(bytes.as_bytes())
                    .map_err(|_| PyValueError::new_err("embedded null byte"))
            })
            .collect()
    }

    fn pointers(strings: &[CString]) -> Vec<*const c_char> {
        strings
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(ptr::null()))
            .collect()
    }

    /// A copy of the process environment (the parent may change `environ` while the child
    /// runs, which vfork's callers need not fear).
    fn environment() -> Vec<CString> {
        extern "C" {
            static environ: *const *const c_char;
        }
        let mut out = Vec::new();
        // SAFETY: `environ` is a null-terminated array of NUL-terminated strings; this thread
        // holds the GIL, so Python code does not change it meanwhile.
        unsafe {
            let mut p = environ;
            while !p.is_null() && !(*p).is_null() {
                out.push(std::ffi::CStr::from_ptr(*p).to_owned());
                p = p.add(1);
            }
        }
        out
    }

    /// Owns fds until they are handed over; closes what is left on drop.
    struct Fds(Vec<i32>);

    impl Drop for Fds {
        fn drop(&mut self) {
            for &fd in &self.0 {
                close(fd);
            }
        }
    }

    fn pipe() -> std::io::Result<(i32, i32)> {
        let mut fds = [0 as c_int; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
        Ok((fds[0], fds[1]))
    }

    fn set_nonblocking(fd: i32) -> std::io::Result<()> {
        let on: c_int = 1;
        // SAFETY: FIONBIO reads one int through the pointer, valid for the call.
        cvt(unsafe { libc::ioctl(fd, libc::FIONBIO, &on) }).map(|_| ())
    }

    /// A child being spawned: holds what it reads until its error pipe reports.
    #[pyclass(module = "ferroloop")]
    pub struct Spawn {
        data: Option<Box<ChildData>>,
        err_r: i32,
        pid: i32,
        /// The process that cloned the child. In a process forked from it meanwhile, the data
        /// is a copy the child does not use, and the error pipe's report is not ours to read
        /// (reading it would take it from the parent, which would then see a failed exec as a
        /// successful one).
        owner: i32,
    }

    impl Spawn {
        fn forked(&self) -> bool {
            // SAFETY: getpid has no preconditions.
            (unsafe { libc::getpid() }) != self.owner
        }

        /// Reads the error pipe: `None` while nothing is known yet (with `block`: waits),
        /// `Some(None)` once the child exec'd, `Some(Some((stage, errno)))` if it failed.
        fn poll(&mut self, block: bool) -> std::io::Result<Option<Option<(i32, i32)>>> {
            if self.data.is_none() {
                return Err(std::io::Error::from_raw_os_error(libc::EBADF));
            }
            if self.forked() {
                // (The child is the parent process's, not this one's.)
                return Err(std::io::Error::from_raw_os_error(libc::ECHILD));
            }
            let mut msg = [0u8; 8];
            let mut got = 0usize;
            loop {
                // SAFETY: `msg[got..]` is valid for the length given.
                let r = unsafe {
                    libc::read(self.err_r, msg[got..].as_mut_ptr().cast(), msg.len() - got)
                };
                if r > 0 {
                    got += r as usize;
                    if got < msg.len() {
                        continue;
                    }
                } else if r < 0 {
                    let err = std::io::Error::last_os_error();
                    match err.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        Some(libc::EAGAIN) => {
                            if !block && got == 0 {
                                return Ok(None);
                            }
                            let mut pfd = libc::pollfd {
                                fd: self.err_r,
                                events: libc::POLLIN,
                                revents: 0,
                            };
                            // SAFETY: one valid pollfd.
                            unsafe { libc::poll(&mut pfd, 1, -1) };
                            continue;
                        }
                        _ => return Err(err),
                    }
                }
                break;
            }
            // EOF or a full report: either way the child no longer runs on our data.
            self.release();
            if got < msg.len() {
                return Ok(Some(None));
            }
            let stage = i32::from_ne_bytes(msg[..4].try_into().unwrap_or_default());
            let errno = i32::from_ne_bytes(msg[4..].try_into().unwrap_or_default());
            // The child is exiting: reap it, as Popen does before raising.
            let mut status = 0;
            // SAFETY: waitpid on our own child.
            while unsafe { libc::waitpid(self.pid, &mut status, 0) } < 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
            {}
            Ok(Some(Some((stage, errno))))
        }

        fn release(&mut self) {
            if self.data.take().is_some() {
                close(self.err_r);
                self.err_r = -1;
            }
        }
    }

    #[pymethods]
    impl Spawn {
        /// The error pipe's fd (to watch for readability), or -1 once resolved.
        #[getter]
        fn fd(&self) -> i32 {
            self.err_r
        }

        /// `None` while the child has neither exec'd nor failed (with `block=True`: waits);
        /// `0` once it exec'd; `(stage, errno)` if it failed (1: setting up, 2: exec), the child
        /// reaped. Raises RuntimeError once resolved.
        #[pyo3(signature = (block = false))]
        fn result<'py>(
            &mut self,
            py: Python<'py>,
            block: bool,
        ) -> PyResult<Option<Bound<'py, PyAny>>> {
            if self.data.is_none() {
                return Err(PyRuntimeError::new_err("spawn already resolved"));
            }
            match self.poll(block).map_err(os_error)? {
                None => Ok(None),
                Some(None) => Ok(Some(0i32.into_pyobject(py)?.into_any())),
                Some(Some(report)) => Ok(Some(report.into_pyobject(py)?.into_any())),
            }
        }
    }

    impl Drop for Spawn {
        fn drop(&mut self) {
            if self.data.is_some() && self.forked() {
                // A forked copy: the child runs on the parent's data, not on this copy.
                self.release();
            } else if self.data.is_some() {
                // The child may still run on our data: wait until it exec'd or exits.
                if self.poll(true).is_err() {
                    // The pipe cannot tell (its fd was closed behind our back, and that
                    // number may be another file's now: not closed here): the child may still
                    // be running on the data, so it is leaked rather than freed.
                    if let Some(data) = self.data.take() {
                        std::mem::forget(data);
                    }
                    self.err_r = -1;
                }
                self.release();
            }
        }
    }

    /// Starts `paths[0]` (then the next path while exec fails, as Popen's PATH search does)
    /// with `argv` and `envp` (`None`: a copy of the process's environment). `stdio` holds,
    /// for fds 0, 1 and 2: -1 inherit, -2 a new pipe, -3 /dev/null, -4 (stderr) stdout's, or
    /// an fd to dup. Returns `(Spawn, pid, fd0, fd1, fd2)`: the parent's pipe ends (-1 where
    /// none), non-blocking and close-on-exec. The caller waits for `Spawn.fd` to be readable
    /// and asks `Spawn.result()` whether the exec succeeded.
    #[pyfunction]
    #[pyo3(signature = (
        paths, argv, envp, cwd, stdio, close_fds, restore_signals, setsid, ignore_internal
    ))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn spawn(
        paths: &Bound<'_, PyList>,
        argv: &Bound<'_, PyList>,
        envp: Option<&Bound<'_, PyList>>,
        cwd: Option<&Bound<'_, PyBytes>>,
        stdio: (i32, i32, i32),
        close_fds: bool,
        restore_signals: bool,
        setsid: bool,
        ignore_internal: bool,
    ) -> PyResult<(Spawn, i32, i32, i32, i32)> {
        let paths = cstrings(paths)?;
        let argv = cstrings(argv)?;
        let envp = match envp {
            Some(e) => cstrings(e)?,
            None => environment(),
        };
        let cwd = cwd
            .map(|c| CString::new(c.as_bytes()))
            .transpose()
            .map_err(|_| PyValueError::new_err("embedded null byte"))?;
        if close_fds && !features().1 {
            return Err(PyValueError::new_err("close_range is not available"));
        }
        if stdio.2 == SAME_AS_STDOUT && stdio.1 == INHERIT {
            return Err(PyValueError::new_err(
                "stderr=STDOUT needs a redirected stdout",
            ));
        }
        let mut data = Box::new(ChildData {
            stack: [0; STACK_SIZE],
            path_ptrs: pointers(&paths),
            paths,
            argv_ptrs: pointers(&argv),
            argv,
            envp_ptrs: pointers(&envp),
            envp,
            cwd,
            sources: [stdio.0, stdio.1, stdio.2],
            close_fds,
            restore_signals,
            setsid,
            ignore_internal,
            mask: 0,
            err_w: -1,
        });
        start(&mut data)
            .map_err(os_error)
            .map(|(spawn_fd, pid, ends)| {
                (
                    Spawn {
                        data: Some(data),
                        err_r: spawn_fd,
                        pid,
                        // SAFETY: getpid has no preconditions.
                        owner: unsafe { libc::getpid() },
                    },
                    pid,
                    ends[0],
                    ends[1],
                    ends[2],
                )
            })
    }

    /// Makes the pipes and clones the child; on success the parent's ends are returned and
    /// `data` must outlive the child's use of it (see [`Spawn`]).
    fn start(data: &mut Box<ChildData>) -> std::io::Result<(i32, i32, [i32; 3])> {
        // Every fd is in `parent` or `child`: the child's are closed however this ends, the
        // parent's only if it fails.
        let mut parent = Fds(Vec::with_capacity(4));
        let mut child = Fds(Vec::with_capacity(4));
        let mut ends = [-1; 3];
        // A closed fd given for stdio must fail as Popen's does, not pick up a pipe made here.
        for &source in &data.sources {
            if source >= 0 {
                ferroloop_core::sys::check_fd(source)?;
            }
        }
        for (target, (source, end)) in data.sources.iter_mut().zip(ends.iter_mut()).enumerate() {
            if *source != PIPE {
                continue;
            }
            let (r, w) = pipe()?;
            let (ours, theirs) = if target == 0 { (w, r) } else { (r, w) };
            parent.0.push(ours);
            child.0.push(theirs);
            if ours < 3 || theirs < 3 {
                // fds 0-2 are closed in this process: the dup2s could clobber each other.
                return Err(std::io::Error::from_raw_os_error(libc::EBADF));
            }
            set_nonblocking(ours)?;
            *end = ours;
            *source = theirs;
        }
        let (err_r, err_w) = pipe()?;
        parent.0.push(err_r);
        child.0.push(err_w);
        if err_r < 3 || err_w < 3 {
            return Err(std::io::Error::from_raw_os_error(libc::EBADF));
        }
        set_nonblocking(err_r)?;
        data.err_w = err_w;

        // Block every signal until the child has reset the handlers it inherits (it shares
        // our memory: a handler of ours must never run in it).
        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigfillset initialises `all`; pthread_sigmask writes `old`.
        unsafe {
            libc::sigfillset(all.as_mut_ptr());
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, all.as_ptr(), old.as_mut_ptr());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            // The kernel's mask is the first 64 bits of glibc's sigset_t.
            data.mask = *(old.as_ptr() as *const u64);
        }
        let top = data.stack.as_mut_ptr_range().end as usize & !15;
        let arg = &mut **data as *mut ChildData as *mut c_void;
        // SAFETY: `child_main` runs on `data.stack` (16-byte aligned top) and reads only
        // `data`, which stays alive and unchanged until the error pipe reports. CLONE_VM
        // without CLONE_VFORK: this thread goes on at once; SIGCHLD makes it an ordinary child.
        let pid = unsafe {
            libc::clone(
                child_main,
                top as *mut c_void,
                libc::CLONE_VM | libc::SIGCHLD,
                arg,
            )
        };
        let clone_err = std::io::Error::last_os_error();
        // SAFETY: `old` was written by the pthread_sigmask above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), ptr::null_mut()) };
        if pid < 0 {
            return Err(clone_err);
        }
        // `child` (our copies of the child's pipe ends and the error pipe's write end) closes
        // on return; the child has its own.
        parent.0.clear();
        Ok((err_r, pid, ends))
    }
}
