"""add_reader / remove_reader / add_writer / remove_writer."""

import asyncio
import errno
import os
import socket

import pytest

from conftest import run_for, run_once


def closed_fd_number():
    """A descriptor number that is certainly not open right now."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return r


class FileLike:
    def __init__(self, fd):
        self._fd = fd

    def fileno(self):
        return self._fd


# -- readers ----------------------------------------------------------------


def test_add_reader_fires_when_data_arrives(loop, sockpair):
    a, b = sockpair
    got = []

    def on_readable():
        got.append(a.recv(100))
        loop.stop()

    loop.add_reader(a.fileno(), on_readable)
    loop.call_later(0.01, b.send, b"hello")
    loop.call_later(5, loop.stop)  # safety net
    loop.run_forever()
    assert got == [b"hello"]
    assert loop.remove_reader(a.fileno()) is True


def test_add_reader_does_not_fire_without_data(loop, sockpair):
    a, _ = sockpair
    calls = []
    loop.add_reader(a.fileno(), calls.append, "readable")
    run_for(loop, 0.02)
    assert calls == []
    loop.remove_reader(a.fileno())


def test_add_reader_passes_args_and_runs_with_running_loop(loop, sockpair):
    a, b = sockpair
    seen = []

    def on_readable(x, y):
        seen.append((x, y, asyncio.get_running_loop(), loop.is_running()))
        a.recv(100)
        loop.remove_reader(a)

    b.send(b"x")
    loop.add_reader(a, on_readable, "x", 2)
    run_for(loop, 0.01)
    assert seen == [("x", 2, loop, True)]


def test_add_reader_is_level_triggered_until_drained(loop, sockpair):
    a, b = sockpair
    calls = []

    def on_readable():
        calls.append(1)  # deliberately does not read
        if len(calls) == 5:
            loop.stop()

    b.send(b"data")
    loop.add_reader(a, on_readable)
    safety = loop.call_later(5, loop.stop)
    loop.run_forever()
    safety.cancel()
    assert len(calls) == 5  # fired on 5 consecutive iterations

    # once drained, the callback stops firing
    assert a.recv(100) == b"data"
    calls.clear()
    run_for(loop, 0.02)
    assert calls == []
    # and fires again when new data arrives
    b.send(b"more")
    run_once(loop)
    assert len(calls) == 1
    assert loop.remove_reader(a) is True


def test_reader_fires_once_per_iteration(loop, sockpair):
    a, b = sockpair
    order = []
    ticks = 0

    def tick():
        nonlocal ticks
        ticks += 1
        order.append(f"tick{ticks}")
        if ticks < 3:
            loop.call_soon(tick)
        else:
            loop.stop()

    b.send(b"x")
    loop.add_reader(a, order.append, "read")
    loop.call_soon(tick)
    loop.run_forever()
    loop.remove_reader(a)
    # the reader is queued once per poll, i.e. once per iteration
    assert order == ["tick1", "read", "tick2", "read", "tick3", "read"]


def test_reader_fires_when_peer_closes(loop):
    a, b = socket.socketpair()
    with a:
        got = []

        def on_readable():
            got.append(a.recv(100))
            loop.remove_reader(a)
            loop.stop()

        loop.add_reader(a, on_readable)
        loop.call_soon(b.close)
        loop.call_later(5, loop.stop)  # safety net
        loop.run_forever()
        assert got == [b""]


def test_add_reader_on_a_pipe(loop):
    r, w = os.pipe()
    try:
        got = []

        def on_readable():
            got.append(os.read(r, 100))
            loop.remove_reader(r)
            loop.stop()

        loop.add_reader(r, on_readable)
        loop.call_soon(os.write, w, b"through a pipe")
        loop.call_later(5, loop.stop)  # safety net
        loop.run_forever()
        assert got == [b"through a pipe"]
    finally:
        os.close(r)
        os.close(w)


def test_remove_reader_returns_true_if_registered_else_false(loop, sockpair):
    a, _ = sockpair
    assert loop.remove_reader(a.fileno()) is False
    loop.add_reader(a.fileno(), lambda: None)
    assert loop.remove_reader(a.fileno()) is True
    assert loop.remove_reader(a.fileno()) is False


def test_removed_reader_no_longer_fires(loop, sockpair):
    a, b = sockpair
    calls = []
    loop.add_reader(a, calls.append, 1)
    assert loop.remove_reader(a) is True
    b.send(b"x")
    run_for(loop, 0.02)
    assert calls == []


def test_reader_removed_by_earlier_callback_of_same_iteration_does_not_fire(loop, sockpair):
    # The first iteration's poll finds ``a`` readable and queues its reader
    # behind ``remover``; removing the reader cancels that queued callback.
    a, b = sockpair
    calls = []

    def remover():
        calls.append("remover")
        assert loop.remove_reader(a) is True

    b.send(b"x")
    loop.add_reader(a, calls.append, "reader")
    loop.call_soon(remover)
    run_for(loop, 0.02)
    assert calls == ["remover"]


def test_add_reader_replaces_the_existing_reader(loop, sockpair):
    a, b = sockpair
    calls = []
    loop.add_reader(a, calls.append, "old")
    loop.add_reader(a, calls.append, "new")
    b.send(b"x")
    run_once(loop)
    assert calls == ["new"]
    assert loop.remove_reader(a) is True
    assert loop.remove_reader(a) is False


def test_add_reader_accepts_object_with_fileno(loop, sockpair):
    a, b = sockpair
    obj = FileLike(a.fileno())
    calls = []
    loop.add_reader(obj, calls.append, "obj")
    b.send(b"x")
    run_once(loop)
    assert calls == ["obj"]
    assert loop.remove_reader(obj) is True


def test_reader_registered_by_object_can_be_removed_by_fd_number(loop, sockpair):
    a, _ = sockpair
    loop.add_reader(a, lambda: None)
    assert loop.remove_reader(a.fileno()) is True
    loop.add_reader(a.fileno(), lambda: None)
    assert loop.remove_reader(FileLike(a.fileno())) is True


def test_reader_exception_goes_to_exception_handler_and_loop_continues(loop, sockpair):
    a, b = sockpair
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    def on_readable():
        loop.remove_reader(a)
        raise RuntimeError("reader failed")

    b.send(b"x")
    loop.add_reader(a, on_readable)
    after = []
    loop.call_later(0.005, after.append, "timer")
    run_for(loop, 0.02)
    assert after == ["timer"]
    assert len(contexts) == 1
    assert isinstance(contexts[0]["exception"], RuntimeError)
    assert "handle" in contexts[0]


# -- writers ----------------------------------------------------------------


def test_add_writer_fires_when_writable(loop, sockpair):
    a, _ = sockpair
    calls = []

    def on_writable(tag):
        calls.append((tag, asyncio.get_running_loop()))
        loop.remove_writer(a)
        loop.stop()

    loop.add_writer(a.fileno(), on_writable, "w")
    loop.call_later(5, loop.stop)  # safety net
    loop.run_forever()
    assert calls == [("w", loop)]


def test_add_writer_does_not_fire_while_buffer_full_and_fires_after_drain(loop, sockpair):
    a, b = sockpair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        while True:
            a.send(b"x" * 65536)
    except BlockingIOError:
        pass
    calls = []
    loop.add_writer(a, calls.append, "writable")
    run_for(loop, 0.02)
    assert calls == []

    def drain():
        try:
            while b.recv(1 << 20):
                pass
        except BlockingIOError:
            pass

    loop.call_soon(drain)
    run_for(loop, 0.05)
    assert calls, "writer did not fire after the peer drained the buffer"
    assert loop.remove_writer(a) is True


def test_remove_writer_returns_true_if_registered_else_false(loop, sockpair):
    a, _ = sockpair
    assert loop.remove_writer(a) is False
    loop.add_writer(a, lambda: None)
    assert loop.remove_writer(a) is True
    assert loop.remove_writer(a) is False


def test_add_writer_replaces_the_existing_writer(loop, sockpair):
    a, _ = sockpair
    calls = []
    loop.add_writer(a, calls.append, "old")
    loop.add_writer(a, calls.append, "new")
    run_once(loop)
    assert calls == ["new"]
    assert loop.remove_writer(a) is True


def test_reader_and_writer_on_the_same_fd_are_independent(loop, sockpair):
    a, b = sockpair
    calls = []
    loop.add_reader(a, calls.append, "r")
    loop.add_writer(a, calls.append, "w")
    run_once(loop)
    assert calls == ["w"]  # writable, not readable yet
    b.send(b"x")
    calls.clear()
    run_once(loop)
    assert calls == ["r", "w"]  # an fd's reader is queued before its writer
    assert loop.remove_writer(a) is True
    calls.clear()
    run_once(loop)
    assert calls == ["r"]
    assert loop.remove_reader(a) is True
    assert loop.remove_writer(a) is False
    calls.clear()
    run_once(loop)
    assert calls == []


def test_many_fds_can_be_watched(loop):
    pairs = [socket.socketpair() for _ in range(50)]
    try:
        got = set()
        for i, (a, b) in enumerate(pairs):
            def on_readable(i=i, a=a):
                a.recv(10)
                got.add(i)
                loop.remove_reader(a)
            loop.add_reader(a, on_readable)
        for _, b in pairs[::2]:
            b.send(b"x")
        run_for(loop, 0.02)
        assert got == set(range(0, 50, 2))
        for a, _ in pairs:
            loop.remove_reader(a)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_fd_number_can_be_watched_again_after_close_and_reuse(loop):
    # Remove the watcher, close the fd, get the same number again from the
    # kernel, and watch it once more.
    a, b = socket.socketpair()
    fd = a.fileno()
    loop.add_reader(fd, lambda: None)
    assert loop.remove_reader(fd) is True
    a.close()
    b.close()
    c, d = socket.socketpair()
    with c, d:
        calls = []
        loop.add_reader(c, calls.append, "new")
        d.send(b"x")
        run_once(loop)
        assert calls == ["new"]
        assert loop.remove_reader(c) is True


def _reuse_number_closed_under_its_reader(loop, keep_a_dup):
    """Watch a socket, close it under its reader (a dup of it kept or not) while it holds
    unread data, get its number again for a new socket and watch that: returns the calls of
    both readers over 0.3 s, and the CPU time the loop used meanwhile."""
    import time

    a, b = socket.socketpair()
    fd = a.fileno()
    old, new = [], []
    copy = a.dup() if keep_a_dup else None
    try:
        a.setblocking(False)
        loop.add_reader(fd, old.append, "old")
        b.send(b"never read")  # the old file stays readable
        a.close()
        c, d = socket.socketpair()
        with c, d:
            if c.fileno() != fd:
                pytest.skip("the number was not reused")
            c.setblocking(False)
            loop.add_reader(c, lambda: new.append(c.recv(100)))
            d.send(b"for the new one")
            cpu = time.process_time()
            run_for(loop, 0.3)
            cpu = time.process_time() - cpu
            loop.remove_reader(c)
    finally:
        b.close()
        if copy is not None:
            copy.close()
    return old, new, cpu


def test_a_number_closed_under_its_reader_and_reused_can_be_watched_again(loop_impl, loop):
    if loop_impl.name == "asyncio":
        pytest.skip("CPython's loop keeps the old key: the new socket is never polled")
    old, new, _ = _reuse_number_closed_under_its_reader(loop, keep_a_dup=False)
    assert (old, new) == ([], [b"for the new one"])


def test_a_dup_of_a_number_closed_under_its_reader_neither_wakes_nor_spins_its_next_reader(
    loop_impl, loop
):
    # The dup keeps the old file registered (level-triggered, and readable), under a token no
    # remove can reach: its readiness is not the new socket's, and the loop does not spin on it.
    if loop_impl.name == "asyncio":
        pytest.skip("CPython's loop runs the new reader for the old file, on every iteration")
    old, new, cpu = _reuse_number_closed_under_its_reader(loop, keep_a_dup=True)
    assert (old, new) == ([], [b"for the new one"])
    assert cpu < 0.1


# -- bad input --------------------------------------------------------------


@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_add_watcher_with_fd_minus_one_raises_value_error(loop, method):
    with pytest.raises(ValueError):
        getattr(loop, method)(-1, lambda: None)


@pytest.mark.parametrize("method", ["remove_reader", "remove_writer"])
def test_remove_watcher_with_fd_minus_one_raises_value_error(loop, method):
    with pytest.raises(ValueError):
        getattr(loop, method)(-1)


@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_add_watcher_with_closed_fd_raises_oserror_ebadf(loop, method):
    fd = closed_fd_number()
    with pytest.raises(OSError) as excinfo:
        getattr(loop, method)(fd, lambda: None)
    assert excinfo.value.errno == errno.EBADF
    # nothing stays registered for that fd
    assert getattr(loop, method.replace("add", "remove"))(fd) is False


@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_add_watcher_with_never_opened_fd_raises_oserror_ebadf(loop, method):
    fd = 1_000_000  # far above any fd this process has
    with pytest.raises(OSError) as excinfo:
        getattr(loop, method)(fd, lambda: None)
    assert excinfo.value.errno == errno.EBADF


@pytest.mark.parametrize("method", ["remove_reader", "remove_writer"])
def test_remove_watcher_of_never_registered_fd_returns_false(loop, method):
    assert getattr(loop, method)(closed_fd_number()) is False
    assert getattr(loop, method)(1_000_000) is False


def test_loop_keeps_working_after_failed_add_reader(loop, sockpair):
    with pytest.raises(OSError):
        loop.add_reader(closed_fd_number(), lambda: None)
    a, b = sockpair
    calls = []
    loop.add_reader(a, calls.append, 1)
    b.send(b"x")
    run_once(loop)
    assert calls == [1]
    loop.remove_reader(a)


@pytest.mark.parametrize(
    "bad",
    [object(), "3", 1.5, None, FileLike("not an int")],
    ids=["object", "str", "float", "None", "fileno-returns-str"],
)
@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_add_watcher_with_non_fd_object_raises_value_error(loop, method, bad):
    with pytest.raises(ValueError):
        getattr(loop, method)(bad, lambda: None)


@pytest.mark.parametrize("method", ["remove_reader", "remove_writer"])
def test_remove_watcher_with_non_fd_object_raises_value_error(loop, method):
    with pytest.raises(ValueError):
        getattr(loop, method)(object())


def test_add_reader_with_closed_socket_object_raises_value_error(loop):
    a, b = socket.socketpair()
    a.close()
    b.close()
    with pytest.raises(ValueError):
        loop.add_reader(a, lambda: None)
    with pytest.raises(ValueError):
        loop.add_writer(a, lambda: None)


def test_add_reader_propagates_the_exception_raised_by_fileno(loop):
    class Broken:
        def fileno(self):
            raise OSError(errno.EBADF, "broken fileno")

    with pytest.raises(OSError, match="broken fileno"):
        loop.add_reader(Broken(), lambda: None)
    with pytest.raises(OSError, match="broken fileno"):
        loop.add_writer(Broken(), lambda: None)


@pytest.mark.parametrize("method", ["remove_reader", "remove_writer"])
def test_remove_watcher_on_closed_loop_returns_false(loop, sockpair, method):
    a, _ = sockpair
    loop.close()
    assert getattr(loop, method)(a) is False


class _Payload:
    pass


def test_removed_reader_releases_its_callback_args(loop, sockpair):
    import gc
    import weakref

    a, _ = sockpair
    payload = _Payload()
    ref = weakref.ref(payload)
    loop.add_reader(a, lambda p: None, payload)
    loop.add_writer(a, lambda p: None, payload)
    del payload
    assert loop.remove_reader(a) is True
    assert loop.remove_writer(a) is True
    run_once(loop)
    gc.collect()
    assert ref() is None


def test_keyboard_interrupt_in_reader_callback_propagates_and_loop_recovers(loop, sockpair):
    a, b = sockpair

    def on_readable():
        a.recv(100)
        raise KeyboardInterrupt

    b.send(b"x")
    loop.add_reader(a, on_readable)
    with pytest.raises(KeyboardInterrupt):
        loop.run_forever()
    assert loop.is_running() is False
    assert loop.remove_reader(a) is True
    calls = []
    loop.add_reader(a, calls.append, "again")
    b.send(b"y")
    run_once(loop)
    assert calls == ["again"]
    loop.remove_reader(a)


@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_add_watcher_on_regular_file_raises_permission_error(loop, method, tmp_path):
    # epoll cannot watch regular files: CPython lets EPERM propagate.
    with open(tmp_path / "regular.txt", "wb") as f:
        with pytest.raises(PermissionError) as excinfo:
            getattr(loop, method)(f, lambda: None)
        assert excinfo.value.errno == errno.EPERM
        assert getattr(loop, method.replace("add", "remove"))(f) is False


def test_writer_removed_by_reader_of_same_iteration_does_not_fire(loop):
    a, b = socket.socketpair()
    with b:
        calls = []

        def on_readable():
            calls.append("reader")
            loop.remove_reader(a)
            loop.remove_writer(a)
            a.close()

        b.send(b"x")
        # a is both readable and writable in the first poll
        loop.add_reader(a, on_readable)
        loop.add_writer(a, calls.append, "writer")
        run_for(loop, 0.02)
        # CPython queues an fd's reader before its writer; the writer was
        # removed before its turn, so it must not run.
        assert calls == ["reader"]


def test_reader_replaced_from_its_own_callback_fires_new_callback_next_time(loop, sockpair):
    a, b = sockpair
    calls = []

    def first():
        calls.append("first")
        loop.add_reader(a, second)

    def second():
        calls.append("second")
        a.recv(100)
        loop.remove_reader(a)

    b.send(b"x")
    loop.add_reader(a, first)
    run_for(loop, 0.02)
    assert calls == ["first", "second"]


@pytest.mark.parametrize("method", ["remove_reader", "remove_writer"])
def test_remove_watcher_by_socket_object_closed_after_registration(loop, method):
    # CPython's selector finds the registration by the object itself when
    # fileno() no longer works, so removal still succeeds.
    a, b = socket.socketpair()
    with b:
        getattr(loop, method.replace("remove", "add"))(a, lambda: None)
        a.close()
        assert getattr(loop, method)(a) is True
        # once unregistered, the closed object is just an invalid fd again
        with pytest.raises(ValueError):
            getattr(loop, method)(a)


@pytest.mark.parametrize("fd", [2**31, 2**64], ids=["2**31", "2**64"])
@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_add_watcher_with_fd_beyond_c_int_raises_overflow_error(loop, method, fd):
    with pytest.raises(OverflowError):
        getattr(loop, method)(fd, lambda: None)


@pytest.mark.parametrize("fd", [2**31, 2**64], ids=["2**31", "2**64"])
@pytest.mark.parametrize("method", ["remove_reader", "remove_writer"])
def test_remove_watcher_with_fd_beyond_c_int_returns_false(loop, method, fd):
    assert getattr(loop, method)(fd) is False


def test_add_reader_with_int_subclass_fd(loop, sockpair):
    class MyInt(int):
        pass

    a, b = sockpair
    calls = []
    loop.add_reader(MyInt(a.fileno()), calls.append, "int-subclass")
    b.send(b"x")
    run_once(loop)
    assert calls == ["int-subclass"]
    assert loop.remove_reader(a.fileno()) is True


def test_failed_remove_of_one_side_of_a_closed_fd_forgets_the_whole_fd(loop):
    """`selectors` drops an fd whose epoll modify failed (the fd was closed while both a
    reader and a writer watched it): remove_reader raises OSError, then nothing is left."""
    a, b = socket.socketpair()
    fd = a.fileno()
    try:
        loop.add_reader(fd, lambda: None)
        loop.add_writer(fd, lambda: None)
        a.close()
        with pytest.raises(OSError):
            loop.remove_reader(fd)
        assert loop.remove_writer(fd) is False
        assert loop.remove_reader(fd) is False
    finally:
        a.close()
        b.close()
