"""Ctrl-C cancels what the interrupted call owns, and nothing else: scheduled calls running in
other threads go on and succeed, a task that raises KeyboardInterrupt itself is an ordinary
failure of that call, and the pool stays usable. Each scenario in its own interpreter."""

import textwrap

import pytest

from isolated import run

pytestmark = pytest.mark.nosan

PRELUDE = """
    import _thread, threading, time, pydron
    pydron.enable(workers=2)

    @pydron.functional
    def slow(x):
        time.sleep(0.005)
        return x

    @pydron.functional
    def interrupts(x):
        raise KeyboardInterrupt(f"raised by the task {x}")

    @pydron.schedule
    def many(n):
        return [slow(i) for i in range(n)]

    @pydron.schedule
    def task_interrupts():
        a = slow(1)
        return a + interrupts(2)
"""


def test_ctrl_c_in_main_thread_leaves_other_threads_calls_alone(tmp_path):
    proc = run(textwrap.dedent(PRELUDE) + textwrap.dedent("""
        ok, errors = [], []
        def other():
            for _ in range(80):
                try:
                    ok.append(many(6) == list(range(6)))
                except BaseException as e:
                    errors.append(repr(e))

        t = threading.Thread(target=other)
        t.start()
        threading.Timer(0.3, _thread.interrupt_main).start()   # Ctrl-C from another thread
        try:
            many(2000)
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted")
        t.join()
        print(len(ok), sum(ok), errors)
        print(many(10) == list(range(10)))
    """), tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "interrupted"
    assert lines[1] == "80 80 []"          # before: 79 of 80 later calls of the other thread failed
    assert lines[2] == "True"


def test_task_raising_keyboard_interrupt_is_its_calls_failure(tmp_path):
    proc = run(textwrap.dedent(PRELUDE) + textwrap.dedent("""
        ok, errors = [], []
        stop = threading.Event()
        def other():
            while not stop.is_set():
                try:
                    ok.append(many(4) == list(range(4)))
                except BaseException as e:
                    errors.append(repr(e))

        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.1)
        for _ in range(5):
            try:
                task_interrupts()
            except KeyboardInterrupt as e:
                print("caught:", e)
        stop.set()
        t.join()
        print(all(ok), len(ok) > 0, errors)
        print(many(10) == list(range(10)))
    """), tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:5] == ["caught: raised by the task 2"] * 5
    assert lines[5] == "True True []"
    assert lines[6] == "True"


def test_ctrl_c_while_a_graph_is_read_or_made_is_the_calls(tmp_path):
    """A Ctrl-C that lands while pydron reads a graph from the disk cache or lifts one (Python
    code, where signals are handled) interrupts the call, and the next call goes on as if it had
    not happened. It used to be swallowed: the call ran on to its end, and a graph interrupted
    while being lifted was refused for good."""
    proc = run("""
        import pydron
        from pydron import _core, _replay
        pydron.enable(workers=2)

        def interrupted_once(real, what):
            calls = []
            def helper(fn):
                calls.append(fn)
                if len(calls) == 1:
                    raise KeyboardInterrupt(what)
                return real(fn)
            return helper

        _replay.cached_for_core = interrupted_once(_replay.cached_for_core, "reading the cache")
        _replay.lift_for_core = interrupted_once(_replay.lift_for_core, "lifting")

        @pydron.functional
        def inc(x):
            return x + 1

        @pydron.schedule
        def work(n):
            return [inc(i) for i in range(n)]

        outcomes = []
        for _ in range(5):
            try:
                outcomes.append(work(3))
            except KeyboardInterrupt as exc:
                outcomes.append(f"interrupted while {exc}")
        print(outcomes)
        print(_core._replay_state(work)["state"], _core._replay_stats()["hits"])
    """, tmp_path, env={"PYDRON_CACHE_DIR": "off"})
    assert proc.returncode == 0, proc.stderr
    outcomes, state = proc.stdout.splitlines()
    assert outcomes == str(["interrupted while reading the cache", [1, 2, 3],
                            "interrupted while lifting", [1, 2, 3], [1, 2, 3]])
    assert state.split()[0] == "ready" and int(state.split()[1]) >= 1, state
