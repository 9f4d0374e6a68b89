"""The semantics corpus, every case in every mode: plain Python (the case is deterministic and
raises what it declares), the pure-Python reference runtime, and pydron with 2 workers — each
must return, raise and print exactly what plain Python did. Plus the evidence that pydron really
ran tasks in parallel, in worker processes, while the scheduled code stayed in the master.

Pydron-mode runs happen in a case server process (semantics/server.py): a crash of the C core
fails the case that caused it, and the next case gets a fresh process."""

import os
import pickle
import subprocess
import sys
import threading

import pytest

import pydron
from semantics import harness
from semantics.registry import load_all
from semantics.server import CaseServer

CASES = load_all()
PARAMS = [pytest.param(mode, case, id=f"{mode}-{case.name}", marks=[
              pytest.mark.xfail(reason=case.known_differences[mode], strict=True)
          ] if mode in case.known_differences else [])
          for mode in harness.MODES for case in CASES]


@pytest.fixture(scope="session")
def expected_outcomes():
    """Plain outcomes of every case, computed once with pydron disabled."""
    with harness.pydron_disabled():
        return {case.name: harness.run_plain(case) for case in CASES}


@pytest.fixture(scope="session", autouse=True)
def _disable_at_end():
    yield
    if pydron.is_enabled():
        pydron.disable()


@pytest.fixture(scope="session")
def case_server():
    """Where pydron-mode cases run (pydron enabled, 2 workers)."""
    server = CaseServer(timeout=60, workers=2)
    yield server
    server.close()


@pytest.fixture(scope="session")
def one_worker_server():
    """Pydron with a single worker: no task may wait for another queued behind it."""
    server = CaseServer(timeout=60, workers=1)
    yield server
    server.close()


@pytest.fixture(scope="session")
def reference_server():
    """Where the reference runtime's cases run: its thread mode can deadlock, which must fail the
    case, not hang the run. The cases are tiny, so a short timeout suffices."""
    server = CaseServer(timeout=30, workers=0)
    yield server
    server.close()


@pytest.fixture(scope="session")
def dask_cluster():
    """A real `dask scheduler` and two single-threaded `dask worker` processes on loopback,
    started in a directory where the cases' modules cannot be imported (so their functions and
    classes travel by value); gone again, processes and port, at the end."""
    from dask_processes import DaskProcesses
    cluster = DaskProcesses(workers=2)
    yield cluster
    cluster.close()
    assert not cluster.leftovers(), cluster.leftovers()


@pytest.fixture(scope="session")
def cluster_case_server(dask_cluster):
    """Pydron with its tasks on the Dask cluster."""
    server = CaseServer(timeout=60, workers=2, cluster=dask_cluster.address)
    yield server
    server.close()


def _server_for(mode, request):
    fixture = {"pydron": "case_server", "pydron-1worker": "one_worker_server",
               "pydron-cluster": "cluster_case_server", "pydron-replay": "case_server",
               "pydron-replay-guess": "case_server", "pydron-replay-compiled": "case_server",
               "pydron-replay-reference": "case_server"}.get(mode, "reference_server")
    return request.getfixturevalue(fixture)


def test_corpus_size():
    assert len(CASES) >= 70, len(CASES)


def _skip_if_no_reference(mode):
    if not mode.startswith("reference"):
        return
    if not harness.reference_available():
        pytest.skip("pydron._reference does not exist yet")
    if not harness.reference_marks_known():
        pytest.skip("pydron._core is not built for this interpreter: which calls are functional "
                    "is unknown to the reference runtime")


@pytest.mark.parametrize("mode, case", PARAMS)
def test_case(mode, case, expected_outcomes, request):
    _skip_if_no_reference(mode)
    if mode == "plain":
        problems = harness.check(case, mode, expected_outcomes[case.name])
    else:
        problems = _server_for(mode, request).request("check", (mode, case.name))
    assert not problems, f"{case.name} ({mode}):\n" + "\n".join(problems)


# --- the replay modes really replayed --------------------------------------------------------------

@pytest.mark.parametrize("interpreter, mode", [("on", "pydron-replay"),
                                               ("on-guess", "pydron-replay-guess"),
                                               ("on-compiled", "pydron-replay-compiled"),
                                               ("reference", "pydron-replay-reference")])
def test_replay_modes_ran_graphs(interpreter, mode, case_server, expected_outcomes):
    """The replay modes are not the trace under another name: most cases that return ran their
    graph to the end, both interpreters took the same cases, and guesses were made."""
    log = case_server.request("replay_log", interpreter)
    for case in CASES:
        if case.name not in log and mode not in case.known_differences:
            assert not case_server.request("check", (mode, case.name))
    log = case_server.request("replay_log", interpreter)
    returning = [c.name for c in CASES if expected_outcomes[c.name].exc_type is None]
    replayed = [n for n in returning if log[n][0]]
    assert len(replayed) >= len(returning) // 3, (
        f"{len(replayed)} of {len(returning)} returning cases replayed; the others: " +
        "; ".join(f"{n}: {log[n][1]} {log[n][2]}" for n in returning if not log[n][0]))


def test_guessing_mode_guessed(case_server):
    """In mode pydron-replay-guess, branches on results really guessed (and some wrong)."""
    log = case_server.request("replay_log", "on-guess")
    for case in CASES:
        if case.name not in log and "pydron-replay-guess" not in case.known_differences:
            assert not case_server.request("check", ("pydron-replay-guess", case.name))
    log = case_server.request("replay_log", "on-guess")
    guessing = [n for n, v in log.items() if v[3] > 0]
    assert len(guessing) >= 15, guessing


def test_both_interpreters_replay_the_same_cases(case_server):
    c_log = case_server.request("replay_log", "on")
    py_log = case_server.request("replay_log", "reference")
    assert c_log and py_log
    # the cases' own graphs: whether a nested callee's graph ran depends on the calls before
    differ = {n: (c_log[n][:3], py_log[n][:3]) for n in c_log
              if n in py_log and (c_log[n][5] > 0) != (py_log[n][5] > 0)}
    assert not differ, differ


# --- tracebacks: the functional function's frames appear when the exception is printed ----------

TRACEBACK_CASES = {
    "exceptions.uncaught_propagates": "fail",
    "exceptions.unread_failure_raised_at_return": "fail",
    "exceptions.first_failure_in_program_order_wins": "fail",
    "exceptions.finally_runs_on_propagation": "fail",
}


@pytest.mark.parametrize("mode", ["reference", "reference-threads", "pydron"])
@pytest.mark.parametrize("name", sorted(TRACEBACK_CASES))
def test_worker_traceback_visible(name, mode, request):
    _skip_if_no_reference(mode)
    exc_name, text, described = _server_for(mode, request).request("outcome", (mode, name))
    assert exc_name == "TaskError", described
    assert f"in {TRACEBACK_CASES[name]}\n" in text, text
    assert "raise TaskError(" in text, text   # the source line of the task's raise


# --- parallelism evidence -----------------------------------------------------------------------

def _overlapping_pairs(records):
    return [(a, b) for i, a in enumerate(records) for b in records[i + 1:]
            if a["pid"] != b["pid"] and a["start"] < b["end"] and b["start"] < a["end"]]


def _check_spread(result, count, master_pid, master_thread):
    master, submitted, records = result
    assert master == {"pid": master_pid, "thread": master_thread,
                      "after_loop_pid": master_pid}, "scheduled code left the master"
    assert [r["task"] for r in records] == list(range(count))
    pids = {r["pid"] for r in records}
    assert master_pid not in pids, "tasks ran in the master process"
    assert len(pids) >= 2, f"all tasks ran in one process: {pids}"
    assert _overlapping_pairs(records), f"no two tasks in different workers overlapped: {records}"
    # Submitting never waited: the scheduled code was past its loop before any task finished.
    assert submitted < min(r["end"] for r in records), (submitted, records)


@pytest.mark.parametrize("task_name", ["timed_sleep", "timed_spin"])
def test_tasks_run_in_parallel_workers(task_name, case_server):
    from semantics import cases_parallel
    pid, thread, result = case_server.request(
        "call", ("semantics.cases_parallel", "spread", (getattr(cases_parallel, task_name), 4, 0.4)))
    _check_spread(result, 4, pid, thread)


def test_nested_scheduled_tasks_overlap(case_server):
    """Two nested scheduled calls of one task each: the outer function keeps tracing while the
    first inner call's task runs, so the second inner call's task runs at the same time on the
    other worker."""
    pid, thread, (a, b) = case_server.request(
        "call", ("semantics.cases_parallel", "spread_nested", (1, 0.4)))
    for master, submitted, records in (a, b):
        assert master == {"pid": pid, "thread": thread, "after_loop_pid": pid}
        assert len(records) == 1 and records[0]["pid"] != pid
    (x,), (y,) = a[2], b[2]
    assert x["pid"] != y["pid"], f"both inner calls' tasks ran in one worker: {a}, {b}"
    assert x["start"] < y["end"] and y["start"] < x["end"], f"the inner calls ran one after the " \
        f"other: {x}, {y}"
    assert b[1] < x["end"], "the outer function waited for the first inner call's task"


def test_moves_do_not_wait(case_server):
    """Locals, lists (append/extend/insert), dicts, tuples, len(), functional and scheduled calls
    only move a pending result: the scheduled code gets past all of them while the task runs."""
    pid, thread, result = case_server.request(
        "call", ("semantics.cases_parallel", "moves_do_not_wait", (0.5,)))
    moved, n, record, same_record, dependent, aliased = result
    assert n == 5 and aliased and same_record == record
    assert record["pid"] != pid and dependent["pid"] != pid
    assert dependent["start"] >= record["end"], "a dependent task started before its input"
    assert moved < record["end"], "a move waited for the task to finish"


def test_consumption_waits_there(case_server):
    pid, thread, (before, consumed, record, task_pid) = case_server.request(
        "call", ("semantics.cases_parallel", "consumption_waits", (0.3,)))
    assert task_pid == record["pid"] != pid
    assert before < record["end"] <= consumed


def test_scheduled_calls_from_several_threads(case_server):
    from semantics import cases_parallel
    with harness.pydron_disabled():
        expected = cases_parallel.concurrent_callers(4, 10)
    pid, thread, result = case_server.request(
        "call", ("semantics.cases_parallel", "concurrent_callers", (4, 10)))
    assert result == expected


def test_parallel_cases_are_sequential_when_disabled():
    """The same functions plainly: everything in this process, one after the other."""
    from semantics import cases_parallel
    with harness.pydron_disabled():
        master, submitted, records = cases_parallel.spread(cases_parallel.timed_sleep, 2, 0.01)
    assert {r["pid"] for r in records} == {os.getpid()}
    assert master["thread"] == threading.get_ident()
    assert not _overlapping_pairs(records) and submitted >= records[-1]["end"]


# --- the reference runtime against the C dispatcher ----------------------------------------------

def _reference_run(fn, *args):
    """fn(*args) through the deferred reference runtime: (result, tasks submitted)."""
    from pydron._reference import ReferenceRuntime
    with harness.pydron_disabled():
        runtime = ReferenceRuntime(is_functional=lambda f: harness._kind_of(f) == 1,
                                   is_scheduled=lambda f: harness._kind_of(f) == 2)
        try:
            return runtime.run(fn, *args), runtime.submitted
        finally:
            runtime.close()


def test_reference_moves_what_the_dispatcher_moves(case_server):
    """Each kind of call site, in both runtimes: moved (no wait) or forced (waits) alike."""
    from semantics import dispatch_probes as probes
    expected = {probe.__name__: waits for probe, waits in probes.PROBES.items()}
    reference = {probe.__name__: probes.waited(_reference_run(probe, 0.0)[0])
                 for probe in probes.PROBES}
    pid, thread, native = case_server.request(
        "call", ("semantics.dispatch_probes", "run_probes", (0.5,)))
    assert native == expected, "the C dispatcher"
    assert reference == expected, "the reference runtime"


def _difference_native_functional(probes, server):
    """Compared: the values, and whether the calls became tasks."""
    plain = probes.native_functional(1.0), False
    value, submitted = _reference_run(probes.native_functional, 1.0)
    native, native_submitted = server(
        "call", ("semantics.dispatch_probes", "submitted_by", (probes.native_functional, 1.0)))[2]
    return plain, (value, submitted > 0), (native, native_submitted > 0)


def test_reference_difference(case_server):
    """The difference between the reference runtime and the C core that pydron/_reference.py
    lists: a ctypes pointer marked functional is a thread task in the C core only."""
    from semantics import dispatch_probes as probes
    with harness.pydron_disabled():
        plain, reference, native = _difference_native_functional(probes, case_server.request)
    assert reference == (plain[0], False), "the reference runs it plainly"
    assert native == (plain[0], True), "the C core makes the calls thread tasks"


def test_class_body_reads_values_from_the_scheduled_codes_cells(case_server):
    """A class body defined in scheduled code is plain code reading the scheduled code's cells:
    the pendings there are forced before it runs, in both runtimes, as plain Python sees them."""
    from semantics import dispatch_probes as probes
    with harness.pydron_disabled():
        plain = probes.class_body_cell(3)
        reference = _reference_run(probes.class_body_cell, 3)[0]
    native = case_server.request("call", ("semantics.dispatch_probes", "class_body_cell", (3,)))[2]
    assert plain == reference == native == "int"


def test_pendings_inside_tuples_moved_into_objects_are_values_after_the_call(case_server):
    """A tuple (or dict, or nested containers) holding a pending, moved into a list or dict that
    only an object reaches: after the scheduled call returns, plain code finds values there."""
    from semantics import dispatch_probes as probes
    with harness.pydron_disabled():
        plain = probes.moved_into_log(2)
        box = _reference_run(probes.tuple_moved_into_object_list, 2)[0]
        reference = type(box.items[0][0]).__name__, type(box.table["k"][0]).__name__
        assert {type(box.items[i][0]).__name__ for i in (0, 2)} == {"int"}
    native = case_server.request("call", ("semantics.dispatch_probes", "moved_into_log", (2,)))[2]
    assert plain == reference == native == ("int", "int")


@pytest.mark.parametrize("depth", [3, 250, 900])
def test_deep_nesting_forced_at_any_depth(depth, case_server):
    """A pending value `depth` lists deep, handed to repr (plain code): the C core forces it in
    place at any depth, as the reference runtime and plain Python see it."""
    from semantics import dispatch_probes as probes
    with harness.pydron_disabled():
        plain = probes.deep_nesting(depth)
        reference = _reference_run(probes.deep_nesting, depth)[0]
    native = case_server.request("call", ("semantics.dispatch_probes", "deep_nesting", (depth,)))[2]
    assert plain is True and reference == plain and native == plain


# --- the kill switch (`make test-versions` runs this file under the other interpreters) -----------

KILL_SWITCH_SCRIPT = r"""
import pickle, sys
import pydron
pydron.enable(workers=2)
from semantics import harness
from semantics.registry import load_all
out = {}
for case in load_all():
    args, kwargs = case.fresh_arguments()
    o = harness.capture(lambda: case.fn(*args, **kwargs))
    out[case.name] = (o.value, o.exc_type, o.exc_message, o.exc_cause, o.stdout,
                      pydron.is_enabled())
sys.stdout.buffer.write(pickle.dumps(out, protocol=5))  # 4 makes arrays native-endian
"""


def test_kill_switch_runs_corpus_plainly(expected_outcomes):
    """With PYDRON_DISABLE=1, enable() changes nothing: every case behaves as plain Python."""
    env = dict(os.environ, PYDRON_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", KILL_SWITCH_SCRIPT], env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()

    results = pickle.loads(proc.stdout)
    assert set(results) == set(expected_outcomes)
    problems = []
    assert not any(enabled for *_, enabled in results.values()), "enabled despite PYDRON_DISABLE"
    for name, (value, exc_type, message, cause, stdout, _) in results.items():
        got = harness.Outcome(value=value, exc_type=exc_type, exc_message=message,
                              exc_cause=cause, stdout=stdout)
        expected = expected_outcomes[name]
        expected = harness.Outcome(value=expected.value, exc_type=expected.exc_type,
                                   exc_message=expected.exc_message,
                                   exc_cause=expected.exc_cause, stdout=expected.stdout)
        problems += [f"{name}: {p}" for p in harness.outcome_differences(expected, got)]
    assert not problems, "\n".join(problems)


def test_outcome_differences_compare_the_cause():
    """`raise ... from e` in plain Python: the run compared with it must have the same cause."""
    def wrapping(cause):
        def run():
            try:
                raise cause
            except Exception as e:
                raise RuntimeError("wrapped") from e
        return run

    plain = harness.capture(wrapping(ValueError("v")))
    assert plain.exc_cause == (ValueError, "v")
    assert harness.outcome_differences(plain, harness.capture(wrapping(ValueError("v")))) == []
    other = harness.capture(wrapping(KeyError("v")))
    assert any("cause" in d for d in harness.outcome_differences(plain, other))


def test_compiled_replay_takes_the_cases_the_interpreter_takes(case_server):
    """Mode pydron-replay-compiled ran compiled code (jit/jit.c), and to the end on the same
    cases as the interpreter: the two tiers call the same operations."""
    for case in CASES:
        if "pydron-replay-compiled" not in case.known_differences:
            assert not case_server.request("check", ("pydron-replay-compiled", case.name))
    c_log = case_server.request("replay_log", "on")
    compiled_log = case_server.request("replay_log", "on-compiled")
    assert c_log and compiled_log
    differ = {n: (c_log[n][:3], compiled_log[n][:3]) for n in c_log
              if n in compiled_log and (c_log[n][5] > 0) != (compiled_log[n][5] > 0)}
    assert not differ, differ
    # every run of a case's own graph to the end was compiled (at its first call: "always")
    not_compiled = {n: v for n, v in compiled_log.items() if v[4] != v[5]}
    assert not not_compiled, not_compiled
    assert sum(v[5] > 0 for v in compiled_log.values()) >= len(compiled_log) // 4
