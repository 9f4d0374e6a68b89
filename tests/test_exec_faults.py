"""Faults in the process pool, each scenario in its own Python subprocess (a crash fails one
test): workers killed mid-task, tasks that always kill their worker, Ctrl-C, exit with tasks in
flight. After each, no process started by the subprocess is left and /dev/shm has nothing new."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from helpers import leaked_shm, shm_entries

pytestmark = pytest.mark.nosan

PRELUDE = textwrap.dedent("""
    import json, os, signal, sys, time
    import numpy as np
    import psutil
    from pydron import _core

    def report(**kw):
        print(json.dumps(kw), flush=True)

    def descendants():
        return [p.pid for p in psutil.Process().children(recursive=True)]

    def check_clean_after_shutdown():
        _core._exec_shutdown()
        left = [p for p in psutil.Process().children(recursive=True) if p.status() != "zombie"]
        assert not left, left
""")


def wait_gone(pids, timeout=10.0):
    """pids that still exist (not zombies) after waiting up to timeout."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def run_scenario(body, tmp_path, timeout=120, interrupt_after_line=None):
    """Run PRELUDE + body in a fresh interpreter; returns (returncode, JSON reports, stderr)."""
    script = tmp_path / "scenario.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    shm_before = shm_entries()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in [os.environ.get("PYTHONPATH"), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] if p))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(tmp_path), env=env)
    reports, lines = [], []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("{"):
                reports.append(json.loads(line))
                if interrupt_after_line and reports[-1].get("event") == interrupt_after_line:
                    time.sleep(0.5)
                    proc.send_signal(signal.SIGINT)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    # Whatever the subprocess started must be gone once it is.
    pids = {p for r in reports for p in r.get("pids", [])}
    assert wait_gone(pids) == [], f"left behind: {pids}\n{err}"
    assert leaked_shm(shm_before) == []
    return proc.returncode, reports, err


def test_worker_killed_once_task_rerun(tmp_path):
    rc, reports, err = run_scenario("""
        def work(x, marker):
            if x == 3 and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)     # the first try dies mid-task
            time.sleep(0.01)
            return x * x

        _core._exec_start(2)
        marker = os.path.abspath("marker")
        _core._exec_map(work, [(i, marker) for i in (0, 1)])   # both workers exist now
        before = _core._exec_info()
        assert all(p > 0 for p in before["workers"]), before
        got = _core._exec_map(work, [(i, marker) for i in range(8)])
        after = _core._exec_info()
        report(got=got, pids=descendants(), workers_before=before["workers"],
               workers_after=after["workers"])
        check_clean_after_shutdown()
        report(event="clean")
    """, tmp_path)
    assert rc == 0, err
    assert reports[0]["got"] == [i * i for i in range(8)]
    # The worker that died was replaced: exactly one of the pids changed.
    before, after = reports[0]["workers_before"], reports[0]["workers_after"]
    assert len(set(before) - set(after)) == 1 and all(p > 0 for p in after), (before, after)
    assert reports[-1]["event"] == "clean"


def test_task_that_always_kills_its_worker(tmp_path):
    rc, reports, err = run_scenario("""
        import ctypes

        def segfault(a, items, n):
            ctypes.string_at(0)                          # SIGSEGV

        def exits(a):
            os._exit(3)

        def inc(x):
            return x + 1

        _core._exec_start(2)
        for fn, args in [(segfault, (np.zeros((512, 512)), [1, 2, 3], 7)), (exits, (np.zeros(4, np.int32),))]:
            try:
                _core._exec_map(fn, [args])
            except _core.WorkerLostError as e:
                report(fn=fn.__name__, error=str(e), is_runtime=isinstance(e, RuntimeError))
            else:
                report(fn=fn.__name__, error=None)
        # The pool is still usable afterwards.
        report(after=_core._exec_map(inc, [(i,) for i in range(10)]), pids=descendants())
        check_clean_after_shutdown()
        report(event="clean")
    """, tmp_path)
    assert rc == 0, err
    seg, ex, after, clean = reports
    assert seg["is_runtime"] and "segfault" in seg["error"] and "SIGSEGV" in seg["error"]
    assert "ndarray(float64, 512x512)" in seg["error"] and "list[3]" in seg["error"]
    assert "int" in seg["error"] and "3 times" in seg["error"]
    assert "exits" in ex["error"] and "exit status 3" in ex["error"]
    assert "ndarray(int32, 4)" in ex["error"]
    assert after["after"] == list(range(1, 11))
    assert clean["event"] == "clean"


def test_ctrl_c_cancels_and_pool_stays_usable(tmp_path):
    rc, reports, err = run_scenario("""
        def slow(x):
            open(f"running-{os.getpid()}", "w").close()
            time.sleep(30)
            return x

        def inc(x):
            return x + 1

        _core._exec_start(2)
        report(event="started", pids=descendants() + _core._exec_info()["workers"])
        try:
            _core._exec_map(slow, [(i,) for i in range(20)])
        except KeyboardInterrupt:
            report(event="interrupted", outstanding=_core._exec_info()["outstanding"])
        else:
            report(event="not interrupted")
        got = _core._exec_map(inc, [(i,) for i in range(100)])
        ran_slow = [int(f.split("-")[1]) for f in os.listdir(".") if f.startswith("running-")]
        alive = [p for p in ran_slow if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        report(event="after", ok=got == list(range(1, 101)), ran_slow=ran_slow, alive=alive,
               pids=descendants())
        check_clean_after_shutdown()
        report(event="clean")
    """, tmp_path, interrupt_after_line="started")
    assert rc == 0, err
    events = [r["event"] for r in reports]
    assert events == ["started", "interrupted", "after", "clean"], (events, err)
    assert reports[1]["outstanding"] == 0
    assert reports[2]["ok"]
    # The workers running the slow tasks were killed (and replaced), not waited for.
    assert reports[2]["ran_slow"] and reports[2]["alive"] == []


@pytest.mark.parametrize("how", ["return", "sys.exit", "os._exit"])
def test_exit_with_tasks_in_flight(tmp_path, how):
    rc, reports, err = run_scenario(f"""
        def slow(x):
            time.sleep(60)
            return x

        _core._exec_start(2)
        handles = [_core._exec_submit(slow, (i,)) for i in range(6)]
        time.sleep(0.3)
        info = _core._exec_info()
        report(pids=descendants(), workers=info["workers"], forkserver=info["forkserver"])
        how = {how!r}
        if how == "sys.exit":
            sys.exit(0)
        elif how == "os._exit":
            os._exit(0)
    """, tmp_path, timeout=30)
    assert rc == 0, err
    (r,) = reports
    assert r["forkserver"] in r["pids"] and all(w in r["pids"] for w in r["workers"])
    assert len(r["pids"]) == 3


def test_main_module_classes_and_tracebacks(tmp_path):
    """Functions, exception classes and result classes of __main__, defined after the pool
    started, travel by value and come back as the master's own classes; the worker traceback
    names the script and line."""
    rc, reports, err = run_scenario("""
        import traceback
        _core._exec_start(2)

        class CalibrationError(Exception):
            pass

        class Point:
            def __init__(self, x):
                self.x = x

        def calibrate(i):
            if i == 2:
                raise CalibrationError(f"frame {i} is saturated")
            return Point(i)

        r = _core._exec_map(calibrate, [(0,), (1,)])
        try:
            _core._exec_map(calibrate, [(2,)])
        except CalibrationError as e:
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            report(points=[type(p) is Point and p.x for p in r], caught=str(e), tb=tb,
                   pids=descendants())
        check_clean_after_shutdown()
    """, tmp_path)
    assert rc == 0, err
    (r,) = reports
    assert r["points"] == [0, 1] and r["caught"] == "frame 2 is saturated"
    assert "scenario.py" in r["tb"] and "in calibrate" in r["tb"]
    assert 'raise CalibrationError(f"frame {i} is saturated")' in r["tb"]


def test_dead_workers_arrays_are_released(tmp_path):
    """A worker killed while its task holds arena arrays (its arguments) does not leak them: the
    master drops the dead worker's references. Ctrl-C style cancellation too."""
    rc, reports, err = run_scenario("""
        def hold_and_die(a, marker):
            if not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return float(a[0])

        def hold_forever(a):
            time.sleep(60)

        _core._exec_start(2)
        _core._exec_map(abs, [(1,), (2,)])         # both workers up (each holds its held table)
        a = np.ones(1 << 21)                       # 16 MiB, 256 pages (the master's, in the arena)
        base = _core._exec_info()["arena_used_pages"]
        got = _core._exec_map(hold_and_die, [(a, os.path.abspath("m"))])
        deadline = time.time() + 10                # the replacement worker starts meanwhile
        while time.time() < deadline and _core._exec_info()["arena_used_pages"] != base:
            _core._exec_map(abs, [(1,), (2,)])
            time.sleep(0.05)
        after_death = _core._exec_info()["arena_used_pages"]
        hs = [_core._exec_submit(hold_forever, (a,)) for _ in range(2)]
        time.sleep(0.5)
        _core._exec_cancel_all()
        del hs
        deadline = time.time() + 10
        while time.time() < deadline and _core._exec_info()["arena_used_pages"] != base:
            _core._exec_map(abs, [(1,)])           # lets the master see the deaths
            time.sleep(0.05)
        report(got=got, base=base, after_death=after_death,
               after_cancel=_core._exec_info()["arena_used_pages"], pids=descendants())
        check_clean_after_shutdown()
    """, tmp_path)
    assert rc == 0, err
    (r,) = reports
    assert r["got"] == [1.0]
    assert r["after_death"] == r["base"] and r["after_cancel"] == r["base"]


def test_worker_prints_reach_stdout(tmp_path):
    """Output printed by tasks is flushed when the worker goes idle, not lost in its buffer when
    the worker is killed at shutdown."""
    script = tmp_path / "prints.py"
    script.write_text(textwrap.dedent("""
        from pydron import _core
        def shout(i):
            print(f"task says {i}")
            return i
        _core._exec_start(2)
        assert _core._exec_map(shout, [(i,) for i in range(5)]) == list(range(5))
        import time; time.sleep(0.3)
        _core._exec_shutdown()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             p for p in [os.environ.get("PYTHONPATH"), os.path.dirname(os.path.dirname(
                                 os.path.abspath(__file__)))] if p)))
    assert out.returncode == 0, out.stderr
    # Two workers share the pipe: lines may interleave, but every one is there.
    assert all(out.stdout.count(f"task says {i}") == 1 for i in range(5)), out.stdout


def test_user_fork_leaves_the_pool_alone(tmp_path):
    """A child forked by user code (os.fork, multiprocessing) inherits arrays viewing the arena
    and the pool's state; its exit must neither stop the parent's pool nor free the parent's
    blocks, and it can start a pool of its own."""
    rc, reports, err = run_scenario("""
        def double(a):
            return a * 2

        _core._exec_start(2)
        (r,) = _core._exec_map(double, [(np.ones(1 << 18),)])
        used = _core._exec_info()["arena_used_pages"]
        pid = os.fork()
        if pid == 0:
            ok = float(r.sum()) == 2.0 * (1 << 18)
            del r                                   # must not free the parent's block
            import gc; gc.collect()
            child_was_running = _core._exec_info()["running"]
            _core._exec_start(1)                    # a pool of its own
            child_pool = _core._exec_map(abs, [(-5,)]) == [5] and not child_was_running
            _core._exec_shutdown()
            os._exit(0 if ok and child_pool else 1)
        _, status = os.waitpid(pid, 0)
        report(child_status=status, used_same=_core._exec_info()["arena_used_pages"] == used,
               still_correct=float(r.sum()) == 2.0 * (1 << 18),
               pool_works=_core._exec_map(double, [(3,)]) == [6], pids=descendants())
        check_clean_after_shutdown()
    """, tmp_path)
    assert rc == 0, err
    (r,) = reports
    assert r == dict(r, child_status=0, used_same=True, still_correct=True, pool_works=True)


SCRIBBLE = """
    import ctypes, struct

    def scribble(how):
        # What a crashed or buggy extension in the worker could do to its result ring.
        r = _core._exec_worker_ring()
        base, cap = r["address"], r["capacity"]
        head = ctypes.c_uint64.from_address(base + r["head"])
        data = base + r["data"]
        pos = head.value % cap
        if how == "header":          # a record header longer than the whole ring
            ctypes.memmove(data + pos, struct.pack("<II", cap * 4, 3), 8)
            head.value += 16
        elif how == "buffers":       # a result whose out-of-band buffer is outside the arena
            blob = struct.pack("<QQQII", 0, 2**64 - 1, 0, 1, 0) + struct.pack("<QQQ", 12345, 12345, 1 << 40)
            payload = struct.pack("<QQ", 0, 0) + blob
            ctypes.memmove(data + pos, struct.pack("<II", len(payload), 3) + payload, 8 + len(payload))
            head.value += 8 + len(payload)
        elif how == "nbufs":         # a buffer count whose size overflows (malloc(24 * n))
            blob = struct.pack("<QQQII", 0, 2**64 - 1, 0, 2**32 - 1, 0)
            payload = struct.pack("<QQ", 0, 0) + blob
            ctypes.memmove(data + pos, struct.pack("<II", len(payload), 3) + payload, 8 + len(payload))
            head.value += 8 + len(payload)
        time.sleep(1)                # the master reads it while this task still runs
        return "unreachable"

    def double(x):
        return 2 * x
"""


@pytest.mark.parametrize("how", ["header", "buffers", "nbufs"])
def test_malformed_record_fails_task_and_replaces_worker(tmp_path, how):
    """The master validates every record a worker writes: a malformed one fails the task it was
    for with an error naming the problem, the worker is replaced, and the master lives on."""
    rc, reports, err = run_scenario(textwrap.dedent(SCRIBBLE) + textwrap.dedent(f"""
        _core._exec_start(2)
        _core._exec_map(double, [(i,) for i in range(4)])     # both workers up
        before = _core._exec_info()["workers"]
        got = _core._exec_map(scribble, [("{how}",)], return_exceptions=True)
        e = got[0]
        after = _core._exec_map(double, [(i,) for i in range(50)])
        deadline = time.monotonic() + 10          # the replacement is forked meanwhile
        while (set(_core._exec_info()["workers"]) == set(before) or 0 in _core._exec_info()["workers"]) \
                and time.monotonic() < deadline:
            _core._exec_map(double, [(1,)])
            time.sleep(0.01)
        report(type=type(e).__name__, message=str(e), after=after, before=before,
               workers=_core._exec_info()["workers"], pids=descendants())
        check_clean_after_shutdown()
        report(event="clean")
    """), tmp_path)
    assert rc == 0, err
    r = reports[0]
    assert r["type"] == "RuntimeError", r
    assert "malformed" in r["message"] and "worker was replaced" in r["message"], r
    assert r["after"] == [2 * i for i in range(50)]
    assert len(set(r["before"]) - set(r["workers"])) == 1, r
    assert reports[-1]["event"] == "clean"


def test_worker_dying_with_thousands_of_arena_references_leaks_none(tmp_path):
    """A worker that dies holding more arena references than any fixed table holds (3,000 arrays
    of 256 KiB, 750 MiB) has every one of them released: the arena is back where it was."""
    rc, reports, err = run_scenario("""
        def hoard_and_die(n, marker):
            arrays = [np.ones(32768) for _ in range(n)]      # 256 KiB each: in the arena
            if not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return len(arrays)

        _core._exec_start(2)
        _core._exec_map(abs, [(1,), (2,)])
        base = _core._exec_info()["arena_used_pages"]
        got = _core._exec_map(hoard_and_die, [(3000, os.path.abspath("m"))])
        deadline = time.time() + 20
        while time.time() < deadline and _core._exec_info()["arena_used_pages"] != base:
            _core._exec_map(abs, [(1,), (2,)])
            time.sleep(0.05)
        report(got=got, base=base, after=_core._exec_info()["arena_used_pages"], pids=descendants())
        check_clean_after_shutdown()
    """, tmp_path)
    assert rc == 0, err
    (r,) = reports
    assert r["got"] == [3000]
    assert r["after"] == r["base"], r
