"""A task sees an array as it was at the call, whatever the caller does to it afterwards and by
whatever route (issue: arrays cross at the memory limit): the master's own large arrays and
results forwarded to other tasks cross by reference, and writes that come after the call go to a
copy made at the first write (write protection, copy on write). Each case is compared with plain
Python's run of the same code."""

import ctypes
import os
import textwrap
import threading
import time

import numpy as np
import pytest

import pydron
from pydron import _core

from helpers import module_pool
from isolated import run

pytestmark = pytest.mark.nosan      # SIGSEGV-driven copy on write: ASan owns that signal

pool, plain = module_pool(workers=2)


N = 1 << 18          # 2 MiB of float64: in the arena


@pydron.functional
def make(n):
    return np.zeros(n)


@pydron.functional
def slow_sum(a):
    time.sleep(0.2)
    return float(a.sum())


@pydron.functional
def slow_sum_twice(a, b):
    time.sleep(0.2)
    return float(a.sum()) + 1000 * float(b.sum())


def inplace(a):
    a += 1


def view_write(a):
    v = a[::2]
    v[:] = 7


def slice_assign(a):
    a[: len(a) // 2] = 3


def ufunc_out(a):
    np.add(a, 2, out=a)


def c_extension(a):
    ctypes.memset(a.ctypes.data, 0x40, a.nbytes)   # like any C code writing the buffer


def other_thread(a):
    t = threading.Thread(target=np.multiply, args=(a + 1, 4), kwargs={"out": a})
    t.start()
    t.join()


ROUTES = [inplace, view_write, slice_assign, ufunc_out, c_extension, other_thread]


@pydron.schedule
def forwarded_result_written(route, n):
    a = make(n)                 # a worker's result, forwarded to slow_sum by reference
    b = slow_sum(a)
    route(a)                    # the master reads a and writes it while slow_sum may run
    c = slow_sum(a)             # a later call sees the write
    return b, c, float(a.sum())


@pydron.schedule
def own_array_written(route, a):
    b = slow_sum(a)             # the master's own array, passed by reference
    route(a)
    c = slow_sum_twice(a, a[:10])
    return b, c, float(a.sum())


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.__name__)
def test_forwarded_result_is_read_as_at_the_call(route):
    assert forwarded_result_written(route, N) == plain(forwarded_result_written, route, N)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.__name__)
def test_own_array_is_read_as_at_the_call(route):
    a, b = np.zeros(N), np.zeros(N)
    got = own_array_written(route, a)
    want = plain(own_array_written, route, b)
    assert got == want
    np.testing.assert_array_equal(a, b)            # the caller's array has the writes, as plain


def test_writes_copy_only_while_lent_and_merge_back():
    info = _core._exec_info
    a = np.zeros(N)
    before = info()
    assert own_array_written(inplace, a) == plain(own_array_written, inplace, np.zeros(N))
    after = info()
    assert after["guard_copies"] > before["guard_copies"]      # the write made a copy...
    assert after["guard_merges"] > before["guard_merges"]      # ...merged back once read
    a += 1                                                     # nothing lent: no copy now
    assert info()["guard_copies"] == after["guard_copies"]
    assert float(a.sum()) == 2.0 * N


@pydron.functional
def writes_its_argument(a):
    a[:] = 99                   # not side-effect free: its write must not reach anyone
    return float(a.sum())


@pydron.schedule
def argument_written_by_a_task(a):
    x = writes_its_argument(a)
    y = slow_sum(a)
    return x, y


def test_a_tasks_writes_to_its_argument_stay_its_own():
    a = np.zeros(N)
    x, y = argument_written_by_a_task(a)
    assert x == 99.0 * N and y == 0.0
    assert float(a.sum()) == 0.0


@pydron.schedule
def freed_while_in_flight(n):
    a = np.arange(float(n))
    b = slow_sum(a)
    del a                       # the caller drops it; the task still reads it
    return b


def test_array_freed_while_a_task_reads_it():
    pages = _core._exec_info()["arena_used_pages"]
    assert freed_while_in_flight(N) == float(np.arange(float(N)).sum())
    assert _core._exec_info()["arena_used_pages"] == pages


def test_passing_an_array_does_not_copy_it():
    """Master RSS does not grow by the arrays it passes: they are in the arena already."""
    a = np.ones(1 << 23)                                       # 64 MiB
    pages = _core._exec_info()["arena_used_pages"]

    @pydron.schedule
    def sums(x):
        return [slow_sum(x) for _ in range(4)]

    assert sums(a) == [float(1 << 23)] * 4
    # No new block was allocated for the four calls (the argument crossed by reference).
    assert _core._exec_info()["arena_used_pages"] == pages


def test_fork_of_the_user_process(tmp_path):
    proc = run(textwrap.dedent("""
        import os, time, numpy as np, pydron
        pydron.enable(workers=2)

        @pydron.functional
        def total(a):
            return float(a.sum())

        @pydron.schedule
        def f(a):
            return total(a)

        a = np.ones(1 << 20)                    # in the shared arena
        assert f(a) == float(1 << 20)
        pid = os.fork()
        if pid == 0:
            a[:] = 5                            # the child's write stays in the child
            b = np.ones(1 << 20)                # and it keeps working with arrays
            ok = float(a.sum()) == 5.0 * (1 << 20) and f(b) == float(1 << 20)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0, status
        assert float(a.sum()) == float(1 << 20), a[:4]
        assert f(a) == float(1 << 20)
        print("ok")
    """), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_a_task_crashing_while_it_reads_a_protected_block(tmp_path):
    proc = run(textwrap.dedent("""
        import os, signal, time, numpy as np, pydron
        pydron.enable(workers=2)

        @pydron.functional
        def crash(a):
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)

        @pydron.functional
        def total(a):
            return float(a.sum())

        @pydron.schedule
        def f(a):
            x = crash(a)
            a += 1                              # written while the crashing task reads it
            return total(a), x

        a = np.zeros(1 << 20)
        try:
            f(a)
        except pydron.WorkerLostError:
            pass
        print(float(a.sum()), f.__name__)
        a += 1
        print(float(a.sum()))
    """), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{float(1 << 20)} f", f"{2.0 * (1 << 20)}"]
