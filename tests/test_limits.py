"""Tasks that never end or grow without bound: @pydron.functional(timeout=...) stops a task and
raises TimeoutError naming the function, in program order; a memory_limit stops a task whose
worker grows past it; a thread task that never returns does not keep the interpreter from
exiting. Each scenario runs in its own interpreter."""

import textwrap

import pytest

from isolated import run

pytestmark = pytest.mark.nosan

PRELUDE = """
    import time, threading, pydron
    import numpy as np
    pydron.enable(workers=2)

    class Unlucky(Exception):
        pass

    @pydron.functional
    def inc(x):
        return x + 1

    @pydron.functional
    def fails(x):
        raise Unlucky(f"unlucky {x}")

    @pydron.functional(timeout=0.5)
    def forever(x):
        while True:
            time.sleep(0.01)

    @pydron.functional(executor="threads", timeout=0.3)
    def forever_on_a_thread(x):
        while True:
            time.sleep(0.01)
"""


def scenario(body, tmp_path, **kw):
    return run(textwrap.dedent(PRELUDE) + textwrap.dedent(body), tmp_path, **kw)


def test_timeout_stops_the_task_and_raises_where_plain_python_would(tmp_path):
    proc = scenario("""
        @pydron.schedule
        def order(first_fails):
            a = fails(1) if first_fails else inc(1)
            b = forever(2)                   # stopped after 0.5 s
            c = inc(3)
            return a, b, c

        t = time.monotonic()
        try:
            order(False)
        except TimeoutError as e:
            print("timeout:", e)
        print(time.monotonic() - t < 5)
        try:
            order(True)                       # the earlier failure wins, as in plain Python
        except Unlucky as e:
            print("unlucky:", e)

        @pydron.schedule
        def after(n):
            return [inc(i) for i in range(n)]
        print(after(20) == list(range(1, 21)))    # the pool replaced the stopped worker
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == ("timeout: pydron: task __main__.forever() ran longer than its timeout "
                        "of 0.5 s and was stopped")
    assert lines[1:] == ["True", "unlucky: unlucky 1", "True"]


def test_thread_task_timeout_and_exit_with_a_task_that_never_returns(tmp_path):
    proc = scenario("""
        import ctypes, logging
        logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")

        @pydron.schedule
        def on_thread():
            return forever_on_a_thread(1)

        try:
            on_thread()
        except TimeoutError as e:
            print("timeout:", e)

        # A native call that never returns, with no timeout: exit must still complete.
        libc = ctypes.CDLL(None)
        pause = libc.pause
        pause.argtypes, pause.restype = [], ctypes.c_int
        never = pydron.functional(pause, executor="threads")

        @pydron.schedule
        def start_and_leave():
            never()                           # result never read; the call returns at once
            return "left"
        print(start_and_leave.__name__)
        t = threading.Thread(target=start_and_leave, daemon=True)
        t.start()
        time.sleep(0.3)
        print("exiting")
    """, tmp_path, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "timeout: pydron: task __main__.forever_on_a_thread() ran longer than its timeout of "
        "0.3 s and was stopped", "start_and_leave", "exiting"]
    assert "thread task(s) still running at exit were abandoned" in proc.stderr


def test_memory_limit_stops_a_task_that_grows_past_it(tmp_path):
    proc = scenario("""
        @pydron.functional(memory_limit="200M")
        def hog(n):
            a = np.ones(n // 8)               # touched: resident
            time.sleep(2)
            return float(a.sum())

        @pydron.schedule
        def grow(n):
            return hog(n)

        print(grow(8 * 1000))                 # small: fine
        try:
            grow(600 * 2**20)
        except MemoryError as e:
            print("memory:", str(e).split(" used ")[0], "limit" in str(e))
        print(grow(8 * 10))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["1000.0", "memory: pydron: task __main__.hog() True",
                                        "10.0"]
def test_default_timeout_from_the_configuration(tmp_path):
    proc = scenario("""
        @pydron.functional
        def sleeps(s):
            time.sleep(s)
            return s

        @pydron.schedule
        def naps(s):
            return [sleeps(s) for _ in range(2)]

        print(naps(0.01))
        try:
            naps(30)
        except TimeoutError as e:
            print("timeout:", e)
    """, tmp_path, env={"PYDRON_TASK_TIMEOUT": "0.5"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "[0.01, 0.01]",
        "timeout: pydron: task __main__.sleeps() ran longer than its timeout of 0.5 s and was "
        "stopped"]


