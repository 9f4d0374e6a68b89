"""Errors that name the problem: a result the master cannot rebuild, a worker killed (its peak
memory, and the likely OOM killer), and values that must keep their type across processes
(memoryview), each compared with what plain Python does."""

import os
import signal
import textwrap

import pytest

import pydron
from pydron import _exec_helpers

from helpers import module_pool
from isolated import run

pool, _ = module_pool(workers=2)


@pydron.functional
def describe(view):
    return (type(view).__name__, view.readonly, view.format, view.shape, view.tobytes()[:8])


@pydron.schedule
def describe_all(views):
    return [describe(v) for v in views]


def test_memoryview_arguments_stay_memoryviews():
    import numpy as np
    a = np.arange(100_000, dtype=np.int32)
    views = [memoryview(b"abcdef"), memoryview(bytearray(b"xyz")), memoryview(a),
             memoryview(a.reshape(100, 1000))[::2], memoryview(a).toreadonly()]
    pydron.disable()
    try:
        plain = describe_all(views)
    finally:
        pydron.enable(workers=2)
    assert describe_all(views) == plain


def test_result_that_cannot_be_rebuilt_here_names_the_function(tmp_path):
    proc = run("""
        import os, pydron
        pydron.enable(workers=2)
        MASTER = os.getpid()

        def only_in_a_worker():
            if os.getpid() == MASTER:
                raise ValueError("cannot be built in the master")
            return 1

        class Odd:
            def __reduce__(self):
                return only_in_a_worker, ()

        @pydron.functional
        def make():
            return Odd()

        @pydron.schedule
        def f():
            return make()

        try:
            f()
        except TypeError as e:
            print(e)
            print(repr(e.__cause__))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "pydron: the result of __main__.make() came back from its worker process but could not "
        "be rebuilt here: ValueError: cannot be built in the master",
        "ValueError('cannot be built in the master')"]


@pytest.mark.nosan
def test_killed_worker_reports_peak_memory(tmp_path):
    proc = run("""
        import os, signal, pydron, numpy as np
        pydron.enable(workers=2)

        @pydron.functional
        def grow_and_die(n):
            a = np.ones(n)
            os.kill(os.getpid(), signal.SIGKILL)

        @pydron.schedule
        def f():
            return grow_and_die(40_000_000)        # 320 MB resident, then killed

        try:
            f()
        except pydron.WorkerLostError as e:
            print(e)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip()
    assert "grow_and_die(int)" in message and "killed by SIGKILL" in message, message
    peak = float(message.split("peak memory ")[1].split(" ")[0])
    assert 300 <= peak < 2000, message                 # MiB: the arrays were counted


def test_oom_killer_is_named_when_the_peak_is_near_the_limit():
    limit, what = _exec_helpers.memory_available()
    assert limit > 0 and what
    big = _exec_helpers.worker_lost(describe, "killed by SIGKILL", 3, b"", (), int(limit * 0.9),
                                    True)
    assert "out-of-memory killer" in str(big) and "memory_limit" in str(big)
    small = _exec_helpers.worker_lost(describe, "killed by SIGKILL", 3, b"", (), 10 << 20, True)
    assert "out-of-memory" not in str(small) and "peak memory 10 MiB" in str(small)


TRACEBACK_SCRIPT = """
    import pydron
    pydron.enable(workers=2)

    def helper(a, b):
        return a / b + 1

    @pydron.functional
    def check(x):
        y = x - 3
        return helper(10, y) * 2

    @pydron.schedule
    def main(n):
        rs = [check(i) for i in range(n)]
        total = 0
        for r in rs:
            total += r
        return total

    @pydron.schedule
    def direct(n):
        r = check(n)
        s = check(n + 1)
        return r + s

    import sys
    fn = {"main": main, "direct": direct}[sys.argv[1]]
    fn(0)
    fn(1)                  # a later call: through the graph
    fn(4 if fn is main else 2)   # fails: the graph gives up to the trace, which raises
"""


@pytest.mark.parametrize("which", ["main", "direct"])
def test_a_task_failure_shows_plain_pythons_traceback(tmp_path, which):
    """The scheduled function's frame at the line and columns of the failing call (not where
    its result was read), the comprehension's frame, and the worker's frames with plain
    Python's carets: the whole printed traceback is plain Python's."""
    import subprocess
    import sys
    script = tmp_path / "tb.py"
    script.write_text(textwrap.dedent(TRACEBACK_SCRIPT))
    runs = {}
    for mode, env in (("plain", {"PYDRON_DISABLE": "1"}), ("pydron", {})):
        out = subprocess.run([sys.executable, str(script), which], capture_output=True,
                             text=True, timeout=120, env={**os.environ, **env})
        assert out.returncode == 1
        runs[mode] = out.stderr[out.stderr.index("Traceback"):]
    assert runs["pydron"] == runs["plain"]
    assert "ZeroDivisionError" in runs["plain"]
