"""Faults, end to end through the public API, each scenario in its own Python process (so a crash
fails one test): workers that die, unpicklable data, exceptions, Ctrl-C, exit with tasks in flight.
After each: no process left from the scenario's process tree and no new entry in /dev/shm."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

psutil = pytest.importorskip("psutil")

from helpers import SHM, leaked_shm, shm_entries     # noqa: E402  (after the psutil check)
from isolated import INCS, run                       # noqa: E402

PRELUDE = r'''
import atexit, json, os, signal, sys, threading, time
import psutil
import pydron
pydron.enable(workers=2)

def _shm_in_use(procs):
    found = set()
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/maps") as f:
                found.update(line.split(None, 5)[5].strip().removesuffix(" (deleted)")
                             for line in f if "/dev/shm/" in line)
            for fd in os.listdir(f"/proc/{p.pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{p.pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("/dev/shm/"):
                    found.add(target.removesuffix(" (deleted)"))
        except (OSError, IndexError):
            continue
    return sorted(found)

REPORT = {}

def report(**fields):
    """Record results plus this process tree and its /dev/shm use (called before exit)."""
    me = psutil.Process()
    kids = me.children(recursive=True)
    REPORT.update(fields)
    REPORT["children"] = [(p.pid, p.create_time()) for p in kids]
    REPORT["shm"] = _shm_in_use([me] + kids)
    print("REPORT " + json.dumps(REPORT), flush=True)
''' + INCS


class Scenario:
    """One script run in a fresh process group, with the leftover checks done afterwards."""

    def __init__(self, body, tmp_path, timeout=60, extra_args=()):
        self.script = PRELUDE + textwrap.dedent(body)
        self.tmp_path = tmp_path
        self.timeout = timeout
        self.shm_before = shm_entries()
        # A file rather than -c, so tracebacks can show source lines of the tasks.
        path = tmp_path / "scenario.py"
        path.write_text(self.script)
        # Output goes to files, not pipes: a leftover process holding a pipe open would make the
        # wait look like a hang instead of showing up as a leftover.
        self.stdout_path = tmp_path / "stdout.txt"
        self.stderr_path = tmp_path / "stderr.txt"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(path), str(tmp_path), *extra_args], cwd=tmp_path, text=True,
                stdout=out, stderr=err, start_new_session=True)
        self.seen_children = []

    def remember_children(self):
        """Record the tree as it is now (for scenarios that kill the script itself)."""
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen_children.append((p.pid, p.create_time()))
        except psutil.NoSuchProcess:
            pass

    def wait_for_files(self, pattern_prefix, count=1, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len([f for f in os.listdir(self.tmp_path) if f.startswith(pattern_prefix)]) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.remember_children()
        _kill_tree(self.proc.pid, self.seen_children)
        self.proc.kill()
        out, err = self._collect()
        pytest.fail(f"tasks never started ({pattern_prefix}*):\n{out}\n{err[-5000:]}")

    def _collect(self):
        self.proc.wait()
        return self.stdout_path.read_text(), self.stderr_path.read_text()

    def finish(self):
        try:
            self.proc.wait(timeout=self.timeout)
            out, err = self._collect()
        except subprocess.TimeoutExpired:
            self.remember_children()
            _kill_tree(self.proc.pid, self.seen_children)
            self.proc.kill()
            out, err = self._collect()
            pytest.fail(f"scenario did not finish in {self.timeout}s\nstdout:\n{out}\n"
                        f"stderr:\n{err[-5000:]}")
        self.out, self.err = out, err
        return out, err

    @property
    def report(self):
        lines = [ln for ln in self.out.splitlines() if ln.startswith("REPORT ")]
        assert lines, f"no report (exit {self.proc.returncode})\nstdout:\n{self.out}\n" \
                      f"stderr:\n{self.err[-5000:]}"
        return json.loads(lines[-1][len("REPORT "):])

    def run(self, expect_returncode=0):
        self.finish()
        assert self.proc.returncode == expect_returncode, \
            f"exit {self.proc.returncode}\nstdout:\n{self.out}\nstderr:\n{self.err[-5000:]}"
        report = self.report
        self.check_leftovers(report)
        return report

    def check_leftovers(self, report, check_shm=True):
        children = [tuple(c) for c in report.get("children", [])] + self.seen_children
        alive = _wait_gone(self.proc.pid, children, timeout=10)
        if alive:
            described = [_describe(p) for p in alive]
            _kill_tree(self.proc.pid, children)
            pytest.fail(f"processes left behind by the scenario: {described}")
        if not check_shm:
            return
        stale = [path for path in report.get("shm", []) if os.path.exists(path)]
        assert not stale, f"shared memory the scenario used is still there: {stale}"
        leaked = leaked_shm(self.shm_before)
        assert not leaked, f"new entries in {SHM} that no process uses: {leaked}"


def _describe(p):
    try:
        return f"{p.pid} {p.name()} {p.cmdline()[:4]}"
    except psutil.Error:
        return f"{p.pid} (gone while being described)"


def _survivors(session_id, children):
    """Live (non-zombie) processes from the scenario: recorded descendants or same session."""
    alive = {}
    for pid, created in children:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 0.05 and p.status() != psutil.STATUS_ZOMBIE:
                alive[pid] = p
        except psutil.NoSuchProcess:
            pass
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == session_id and p.status() != psutil.STATUS_ZOMBIE:
                alive[p.pid] = p
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    alive.pop(os.getpid(), None)
    return list(alive.values())


def _wait_gone(session_id, children, timeout):
    deadline = time.monotonic() + timeout
    while True:
        alive = _survivors(session_id, children)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _kill_tree(session_id, children):
    """Clean-up of processes this test started (by pid), so a failure does not leak them."""
    for p in _survivors(session_id, children):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


# --- workers that die ------------------------------------------------------------------------------

def test_worker_killed_mid_task_is_replaced_and_task_rerun(tmp_path):
    report = Scenario(r'''
        marker = os.path.join(sys.argv[1], "killed-once")

        @pydron.functional
        def work(i, marker):
            time.sleep(0.2)
            if i == 3 and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return i * i

        @pydron.schedule
        def run(n):
            return sum([work(i, marker) for i in range(n)]), [work(i, marker) for i in range(2)]

        first = run(6)
        again = incs(4)
        report(first=first, again=again, killed=os.path.exists(marker))
    ''', tmp_path).run()
    assert report["killed"], "the task never killed its worker"
    assert report["first"] == [55, [0, 1]]
    assert report["again"] == [1, 2, 3, 4]


def test_worker_killed_from_outside(tmp_path):
    """As the OOM killer would: SIGKILL to a worker in the middle of a task it did not cause."""
    scenario = Scenario(r'''
        started = sys.argv[1]

        @pydron.functional
        def steady(i, started):
            open(os.path.join(started, f"started-{i}-{os.getpid()}"), "w").close()
            time.sleep(1.5)
            return i * 3

        @pydron.schedule
        def run(n):
            return [steady(i, started) for i in range(n)]

        report(first=run(4), again=incs(3))
    ''', tmp_path, timeout=60)
    scenario.wait_for_files("started-", count=1)
    victim = int(next(f for f in os.listdir(tmp_path) if f.startswith("started-")).split("-")[2])
    os.kill(victim, signal.SIGKILL)
    report = scenario.run()
    assert report["first"] == [0, 3, 6, 9]
    assert report["again"] == [1, 2, 3]


DEATHS = {
    "exit3": ("os._exit(3)", r"\b3\b"),
    "sigkill": ("os.kill(os.getpid(), signal.SIGKILL)", r"SIGKILL|signal 9\b"),
    "sigsegv": ("import ctypes; ctypes.string_at(0)", r"SIGSEGV|signal 11\b"),
}


@pytest.mark.parametrize("death", [
    "exit3", "sigkill", pytest.param("sigsegv", marks=pytest.mark.nosan)])
def test_task_that_always_kills_its_worker(tmp_path, death):
    how, pattern = DEATHS[death]
    report = Scenario(rf'''
        attempts = os.path.join(sys.argv[1], "attempts")

        import numpy as np

        @pydron.functional
        def doomed_task(x, grid, attempts):
            with open(attempts, "a") as f:
                f.write("attempt\n")
            {how}
            return x

        @pydron.schedule
        def run(x):
            ok = inc(x)
            return ok, doomed_task(ok, np.zeros((3, 4)), attempts)

        try:
            run(1)
            outcome = ("returned", "", "")
        except Exception as exc:
            outcome = (type(exc).__module__, type(exc).__name__, str(exc))
            is_lost = isinstance(exc, pydron.WorkerLostError)
        with open(attempts) as f:
            n = len(f.readlines())
        report(outcome=outcome, is_lost=is_lost, attempts=n, again=incs(3))
    ''', tmp_path, timeout=120).run()
    module, name, message = report["outcome"]
    assert report["is_lost"], f"expected pydron.WorkerLostError, got {module}.{name}: {message}"
    assert "doomed_task" in message, message
    import re
    assert re.search(pattern, message), f"the message does not name how the worker died: {message}"
    assert re.search(r"3\s*[x×,]\s*4", message), f"the message does not give argument shapes: {message}"
    assert report["attempts"] == 3, "a task is retried until it has killed 3 workers"
    assert report["again"] == [1, 2, 3], "the pool is usable afterwards"


# --- data that cannot cross to a worker -------------------------------------------------------------

UNPICKLABLE = {
    "lock": ("[1, threading.Lock()]", "lock"),
    "generator": ("[(i for i in range(3)), 2]", "generator"),
    "lambda_in_local_class": ("[LocalThing()]", "localthing"),
}


@pytest.mark.parametrize("kind", sorted(UNPICKLABLE))
def test_unpicklable_argument_raises_type_error(tmp_path, kind):
    value, type_word = UNPICKLABLE[kind]
    report = Scenario(rf'''
        class LocalThing:
            def __reduce__(self):
                raise TypeError("LocalThing refuses to be pickled")

        @pydron.functional
        def consume_payload(payload):
            return len(payload)

        @pydron.schedule
        def run():
            first = inc(1)
            return first, consume_payload({value})

        try:
            run()
            outcome = ("returned", "")
        except Exception as exc:
            outcome = (type(exc).__name__, str(exc))
        report(outcome=outcome, again=incs(3))
    ''', tmp_path).run()
    name, message = report["outcome"]
    assert name == "TypeError", report["outcome"]
    assert "consume_payload" in message, message
    import re
    assert (re.search(r"\bpayload\b", message) or re.search(r"argument (0|#0|1st)\b", message)
            or type_word in message.lower()), f"the message does not name the argument: {message}"
    assert "SystemError" not in message, f"an error was left set inside the core: {message}"
    assert report["again"] == [1, 2, 3]


def test_unpicklable_result_raises_type_error(tmp_path):
    report = Scenario(r'''
        @pydron.functional
        def make_lock(x):
            return [x, threading.Lock()]

        @pydron.schedule
        def run():
            return make_lock(1)

        try:
            run()
            outcome = ("returned", "")
        except Exception as exc:
            outcome = (type(exc).__name__, str(exc))
        report(outcome=outcome, again=incs(3))
    ''', tmp_path).run()
    name, message = report["outcome"]
    assert name == "TypeError" and "make_lock" in message, report["outcome"]
    assert "SystemError" not in message, f"an error was left set inside the core: {message}"
    assert report["again"] == [1, 2, 3]


# --- exceptions ------------------------------------------------------------------------------------

def test_exception_inside_try_except(tmp_path):
    report = Scenario(r'''
        import traceback

        class CalibrationError(ValueError):
            pass

        @pydron.functional
        def calibrate_frame(i):
            if i == 2:
                raise CalibrationError(f"frame {i} is saturated")
            return i * 10

        @pydron.schedule
        def run(n):
            good, bad = [], []
            for i in range(n):
                try:
                    good.append(calibrate_frame(i))
                except CalibrationError as e:
                    bad.append(str(e))
            return good, bad

        @pydron.schedule
        def run_uncaught(n):
            return [calibrate_frame(i) for i in range(n)]

        caught = run(4)
        try:
            run_uncaught(4)
            uncaught = None
        except ValueError as exc:
            uncaught = [type(exc).__name__, str(exc), "".join(traceback.format_exception(exc))]
        report(caught=caught, uncaught=uncaught, again=incs(2))
    ''', tmp_path).run()
    assert report["caught"] == [[0, 10, 30], ["frame 2 is saturated"]]
    name, message, tb = report["uncaught"]
    assert (name, message) == ("CalibrationError", "frame 2 is saturated")
    frame_lines = [ln for ln in tb.splitlines() if ln.strip().endswith("in calibrate_frame")]
    assert frame_lines, f"the worker-side traceback is not shown:\n{tb}"
    assert any("scenario.py" in ln for ln in frame_lines), \
        f"the task's frame does not name the file it was defined in:\n{tb}"
    assert report["again"] == [1, 2]


# --- Ctrl-C ----------------------------------------------------------------------------------------

CTRL_C = r'''
    started = sys.argv[1]

    spin = sys.argv[2] == "spin"

    @pydron.functional
    def slow_task(i, started):
        open(os.path.join(started, f"started-{i}"), "w").close()
        if spin:                    # CPU-bound, never blocking: cancellation must still stop it
            end = time.monotonic() + 60
            while time.monotonic() < end:
                pass
        else:
            time.sleep(60)
        return i

    @pydron.schedule
    def long_run():
        return sum([slow_task(i, started) for i in range(4)])

    try:
        long_run()
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "interrupted"
    report(outcome=outcome, again=incs(5))
'''


@pytest.mark.parametrize("tasks", ["sleep", "spin"])
@pytest.mark.parametrize("target", ["process", "process-group"])
def test_ctrl_c_cancels_tasks_and_pool_stays_usable(tmp_path, target, tasks):
    """SIGINT while a scheduled call waits on 60 s tasks: KeyboardInterrupt reaches the script,
    the tasks are cancelled (the next call, needing the workers, finishes well within the
    timeout), and nothing is left behind. A terminal's Ctrl-C signals the whole group."""
    scenario = Scenario(CTRL_C, tmp_path, timeout=40, extra_args=[tasks])
    scenario.wait_for_files("started-", count=2)
    if target == "process":
        os.kill(scenario.proc.pid, signal.SIGINT)
    else:
        os.killpg(scenario.proc.pid, signal.SIGINT)
    report = scenario.run()
    assert report["outcome"] == "interrupted"
    assert report["again"] == [1, 2, 3, 4, 5]


def test_ctrl_c_while_submitting(tmp_path):
    """SIGINT lands while the scheduled function is busy submitting thousands of tiny tasks
    (possibly inside pydron's own code): KeyboardInterrupt, then a usable pool, nothing left."""
    scenario = Scenario(r'''
        started = sys.argv[1]

        @pydron.schedule
        def flood():
            rs = []
            for i in range(10 ** 7):
                rs.append(inc(i))
                if i == 2000:
                    open(os.path.join(started, "started-flood"), "w").close()
            return len(rs)

        try:
            flood()
            outcome = "finished"
        except KeyboardInterrupt:
            outcome = "interrupted"
        report(outcome=outcome, again=incs(5))
    ''', tmp_path, timeout=60)
    scenario.wait_for_files("started-", count=1)
    time.sleep(0.2)
    os.killpg(scenario.proc.pid, signal.SIGINT)
    report = scenario.run()
    assert report["outcome"] == "interrupted"
    assert report["again"] == [1, 2, 3, 4, 5]


# --- exit with tasks in flight -------------------------------------------------------------------

# Tasks still running when the interpreter exits. (Not: sys.exit inside the scheduled function
# itself — pydron must then wait for its outstanding tasks, since one of them might fail and plain
# Python would have raised that failure before reaching sys.exit.)
EXIT_SCENARIOS = {
    # The first task fails at once; its siblings are still running when the script ends. Separate
    # statements, so that no over-eager forcing (allowed, it only costs parallelism) waits for them.
    "failure_leaves_siblings_running": r'''
        @pydron.functional
        def fails_now(x):
            raise RuntimeError(f"broken {x}")

        @pydron.schedule
        def run():
            bad = fails_now(0)
            rs = [slow_task(i, started) for i in range(4)]
            wait_started(2)
            return [bad, rs]

        try:
            run()
        except RuntimeError as exc:
            atexit.register(report, outcome=str(exc))
    ''',
    # A daemon thread is inside a scheduled call when the main thread returns.
    "daemon_thread_mid_call": r'''
        @pydron.schedule
        def run():
            return sum([slow_task(i, started) for i in range(4)])

        threading.Thread(target=run, daemon=True).start()
        wait_started(2)
        atexit.register(report, outcome="main done")
    ''',
    # The same, leaving through sys.exit with a status.
    "daemon_thread_mid_call_sys_exit": r'''
        @pydron.schedule
        def run():
            return sum([slow_task(i, started) for i in range(4)])

        threading.Thread(target=run, daemon=True).start()
        wait_started(2)
        atexit.register(report, outcome="sys.exit")
        sys.exit(3)
    ''',
}

EXIT_PRELUDE = r'''
    started = sys.argv[1]

    @pydron.functional
    def slow_task(i, started):
        open(os.path.join(started, f"started-{i}"), "w").close()
        time.sleep(60)
        return i

    def wait_started(n):
        while len([f for f in os.listdir(started) if f.startswith("started-")]) < n:
            time.sleep(0.02)
'''


@pytest.mark.parametrize("scenario", sorted(EXIT_SCENARIOS))
def test_exit_with_tasks_in_flight(tmp_path, scenario):
    """The interpreter exits promptly (no waiting for 60 s tasks) and leaves nothing behind."""
    body = textwrap.dedent(EXIT_PRELUDE) + textwrap.dedent(EXIT_SCENARIOS[scenario])
    report = Scenario(body, tmp_path, timeout=40).run(expect_returncode=3 if "sys_exit" in scenario
                                                      else 0)
    assert report["outcome"] in ("broken 0", "main done", "sys.exit")


def test_master_killed_leaves_no_workers(tmp_path):
    """Not an orderly exit: SIGKILL of the master while tasks run. Workers must notice and go."""
    scenario = Scenario(textwrap.dedent(EXIT_PRELUDE) + textwrap.dedent(r'''
        @pydron.schedule
        def run():
            return sum([slow_task(i, started) for i in range(4)])
        run()
    '''), tmp_path, timeout=40)
    scenario.wait_for_files("started-", count=2)
    scenario.remember_children()
    assert scenario.seen_children, "no worker processes were seen"
    os.kill(scenario.proc.pid, signal.SIGKILL)
    scenario.finish()
    scenario.check_leftovers({}, check_shm=False)


def test_the_runtime_never_imports_multiprocessing(tmp_path):
    """What lets the /dev/shm checks leave multiprocessing's semaphores (sem.mp-*) aside: a
    scheduled call, its tasks, the pool and its shutdown use no multiprocessing."""
    proc = run("""
        import sys
        import pydron
        from incs import incs
        pydron.enable(workers=2)
        assert incs(50) == incs(50) == list(range(1, 51))
        pydron.disable()
        print(sorted(m for m in sys.modules if m.split(".")[0] == "multiprocessing"))
    """, tmp_path, files={"incs.py": INCS})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
