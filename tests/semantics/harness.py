"""Runs semantics cases plainly, under pydron, and through the pure-Python reference runtime, and
compares what each run returned, raised and printed.

`cd tests && python -m semantics.harness [--mode MODE ...] [-k SUBSTRING]` runs the corpus outside
pytest, in this process (no crash or hang isolation: test_semantics.py has that), and exits 1 on
any difference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import logging
import traceback
import types
from typing import Any, Callable

import numpy as np

import pydron

from .registry import Case, load_all

WORKERS = 2
# "pydron-cluster": pydron with its tasks on a Dask cluster (CLUSTER, the scheduler's address;
# tests/test_semantics.py starts one). "pydron-replay(-reference)": the case's call through its
# graph (trace/replay.c, or the Python reference interpreter).
MODES = ("plain", "reference", "reference-threads", "pydron", "pydron-1worker", "pydron-cluster",
         "pydron-replay", "pydron-replay-guess", "pydron-replay-compiled",
         "pydron-replay-reference")
CLUSTER: str | None = None


@dataclasses.dataclass
class Outcome:
    """What one run of a case did. `exception` and `traceback_text` are kept for diagnostics and
    the traceback checks; equality is decided by `compare`."""
    value: Any = None
    exc_type: type | None = None
    exc_message: str | None = None
    exc_args: tuple = ()
    exc_cause: tuple | None = None          # (class, message) of the exception's __cause__
    stdout: str = ""
    exception: BaseException | None = None
    traceback_text: str = ""
    tasks_submitted: int | None = None      # pydron mode: tasks this run submitted
    pydron_warnings: list = dataclasses.field(default_factory=list)
    replayed: bool | None = None            # replay modes: the graph ran to the end

    def describe(self) -> str:
        if self.exc_type is not None:
            return f"raised {self.exc_type.__qualname__}({self.exc_message!r})"
        return f"returned {self.value!r}"


def capture(call: Callable[[], Any]) -> Outcome:
    """Run `call`, recording its return value or exception and everything it printed."""
    out = io.StringIO()
    outcome = Outcome()
    with contextlib.redirect_stdout(out):
        try:
            outcome.value = call()
        except Exception as exc:  # noqa: BLE001 — the exception is the outcome being compared
            outcome.exc_type = type(exc)
            outcome.exc_message = str(exc)
            outcome.exc_args = exc.args
            if exc.__cause__ is not None:
                outcome.exc_cause = (type(exc.__cause__), str(exc.__cause__))
            outcome.exception = exc
            outcome.traceback_text = "".join(traceback.format_exception(exc))
    outcome.stdout = out.getvalue()
    return outcome


# --- pydron state: plain runs need it off, pydron runs need it on -------------------------------

@contextlib.contextmanager
def pydron_disabled():
    """Plain Python for the duration, restoring the previous state afterwards."""
    was_enabled = pydron.is_enabled()
    if was_enabled:
        pydron.disable()
    try:
        yield
    finally:
        if was_enabled and not pydron.is_enabled():
            pydron.enable(workers=WORKERS, cluster=CLUSTER)


def ensure_enabled() -> None:
    if not pydron.is_enabled():
        pydron.enable(workers=WORKERS, cluster=CLUSTER)


def reference_available() -> bool:
    try:
        return importlib.util.find_spec("pydron._reference") is not None
    except ModuleNotFoundError:
        return False


# --- running one case ----------------------------------------------------------------------------

def run_plain(case: Case) -> Outcome:
    args, kwargs = case.fresh_arguments()
    with pydron_disabled():
        return capture(lambda: case.fn(*args, **kwargs))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _submitted() -> int | None:
    stats = getattr(pydron, "stats", None)
    return stats().get("submitted") if stats else None


def run_pydron(case: Case) -> Outcome:
    """Under pydron, also noting how many tasks were submitted and what pydron warned about (a
    scheduled function it declines to rewrite runs plainly, with a warning: that must not pass
    for a success)."""
    args, kwargs = case.fresh_arguments()
    ensure_enabled()
    collect = _Collect()
    logger = logging.getLogger("pydron")
    logger.addHandler(collect)
    try:
        before = _submitted()
        outcome = capture(lambda: case.fn(*args, **kwargs))
        after = _submitted()
    finally:
        logger.removeHandler(collect)
    if before is not None and after is not None:
        outcome.tasks_submitted = after - before
    # "the result of @functional f is never read" is about the user's contract (the corpus
    # calls functional functions as statements on purpose, to test unread failures), not a
    # sign that pydron ran the case otherwise than it should; tests/test_check.py covers it.
    outcome.pydron_warnings = [m for m in collect.messages if "is never read" not in m]
    return outcome


# interpreter -> {case name: (replayed, graph state, reason, guesses, compiled runs, own hits)}:
# what the replay modes did ("replayed": some graph ran to the end during the case, maybe a nested
# callee's, which depends on what ran before; "own hits": the case's own graph did)
# in this process (test_semantics checks that the graphs really ran).
REPLAY_LOG: dict[str, dict[str, tuple]] = {}


def run_replayed(case: Case, interpreter: str, guess: int = 1, jit: str = "off") -> Outcome:
    """Under pydron, the case's call through its graph from the first call (trace/replay.c, or
    the Python reference interpreter): the graph is made afresh, and when it gives up the call
    is traced, as in production. `outcome.replayed` says whether the graph ran to the end.
    guess=2: every branch on a task's result guesses, even when the result is in (so that the
    checkpoints, checks, rollbacks and reuse run on every case). jit="always": through the
    graph's compiled code (jit/jit.c), compiled at the first call."""
    from pydron import _core
    fn = getattr(case.fn, "__func__", case.fn)
    ensure_enabled()
    previous = _core._replay_configure(mode=interpreter, after=0, guess=guess, jit=jit)
    _core._replay_forget(fn)
    try:
        outcome = run_pydron(case)
        state = _core._replay_state(fn)
        # The case's own graph ran (not merely a nested scheduled call's, whose graph may
        # survive from an earlier mode's run: the order of the modes must not matter).
        outcome.replayed = state.get("hits", 0) > 0
        key = interpreter + ("-guess" if guess != 1 else "") + ("-compiled" if jit != "off" else "")
        REPLAY_LOG.setdefault(key, {})[case.name] = (
            outcome.replayed, state["state"], state.get("reason"), state.get("guesses", 0),
            state.get("compiled_runs", 0), state.get("hits", 0))
    finally:
        _core._replay_configure(mode=previous["mode"], after=previous["after"],
                                guess=previous["guess"], jit=previous["jit"])
        _core._replay_forget(fn)
    return outcome


def _kind_of(fn) -> int:
    """0 plain, 1 functional, 2 scheduled: the mark pydron's decorators left on fn's code."""
    from pydron import _core
    if isinstance(fn, types.MethodType):
        fn = fn.__func__
    if not isinstance(fn, types.FunctionType):
        return 0
    try:
        return _core._kind(fn)
    except Exception:  # noqa: BLE001 — anything _kind refuses is not marked
        return 0


def reference_marks_known() -> bool:
    """The reference runtime learns which calls are functional from the C core's marks."""
    try:
        from pydron import _core
    except ImportError:
        return False
    return hasattr(_core, "_kind")


def run_reference(case: Case, threads: int = 0) -> Outcome:
    """Through pydron._reference: the same rewrite, Python helpers, tasks deferred until forced
    (threads=0) or run on a thread pool."""
    from pydron._reference import ReferenceRuntime
    args, kwargs = case.fresh_arguments()
    with pydron_disabled():
        runtime = ReferenceRuntime(is_functional=lambda f: _kind_of(f) == 1,
                                   is_scheduled=lambda f: _kind_of(f) == 2, threads=threads)
        try:
            outcome = capture(lambda: runtime.run(case.fn, *args, **kwargs))
            outcome.tasks_submitted = runtime.mark()
        finally:
            runtime.close()
    return outcome


# "pydron-1worker" is run_pydron in a process that enabled pydron with one worker (the case
# server does that): a task must never wait for one queued behind it.
RUNNERS = {"plain": run_plain, "pydron": run_pydron, "pydron-1worker": run_pydron,
           "pydron-cluster": run_pydron,
           "pydron-replay": lambda case: run_replayed(case, "on"),
           "pydron-replay-guess": lambda case: run_replayed(case, "on", guess=2),
           "pydron-replay-compiled": lambda case: run_replayed(case, "on", jit="always"),
           "pydron-replay-reference": lambda case: run_replayed(case, "reference"),
           "reference": run_reference,
           "reference-threads": lambda case: run_reference(case, threads=WORKERS)}


# --- comparing outcomes --------------------------------------------------------------------------

_SCALARS = (int, float, complex, str, bytes, bool, type(None), range, type)
# Containers whose sharing must match: pydron replaces pendings in place, so aliasing and identity
# stay as plain Python had them. Immutable values are left out: a task's constant result is one
# object in plain Python and a fresh unpickled one per task under pydron.
_SHARED_KINDS = (list, dict, set, bytearray, np.ndarray, types.SimpleNamespace)


def value_differences(expected: Any, actual: Any, path: str = "value",
                      memo: tuple[dict, dict] | None = None) -> list[str]:
    """Every place where `actual` differs from `expected`: types (exactly, recursively), values,
    numpy dtypes/shapes/contents, dict key order, and which mutable objects are shared."""
    if memo is None:
        memo = ({}, {})
    if type(expected) is not type(actual):
        return [f"{path}: type {type(expected).__qualname__} != {type(actual).__qualname__} "
                f"({expected!r} vs {actual!r})"]
    if isinstance(expected, _SHARED_KINDS) or _has_attributes(expected):
        seen_e, seen_a = memo
        ke, ka = seen_e.get(id(expected)), seen_a.get(id(actual))
        if ke is not None or ka is not None:
            if ke != ka:
                return [f"{path}: aliasing differs (shared with {ke} vs {ka})"]
            return []
        seen_e[id(expected)] = path
        seen_a[id(actual)] = path
    if isinstance(expected, np.ndarray):
        if expected.dtype != actual.dtype or expected.shape != actual.shape:
            return [f"{path}: array {expected.dtype}{expected.shape} != "
                    f"{actual.dtype}{actual.shape}"]
        if expected.dtype.kind == "O":
            return value_differences(expected.tolist(), actual.tolist(), path, memo)
        if not np.array_equal(expected, actual, equal_nan=expected.dtype.kind in "fc"):
            return [f"{path}: array contents differ"]
        if expected.flags.writeable != actual.flags.writeable:
            return [f"{path}: writeable {expected.flags.writeable} != {actual.flags.writeable}"]
        return []
    if isinstance(expected, np.generic):
        same = (expected == actual) or (expected != expected and actual != actual)
        return [] if same else [f"{path}: {expected!r} != {actual!r}"]
    if isinstance(expected, float):
        same = expected == actual or (expected != expected and actual != actual)
        return [] if same else [f"{path}: {expected!r} != {actual!r}"]
    if isinstance(expected, _SCALARS):
        return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]
    if isinstance(expected, (list, tuple)):
        if len(expected) != len(actual):
            return [f"{path}: length {len(expected)} != {len(actual)} "
                    f"({expected!r} vs {actual!r})"]
        out = []
        for i, (e, a) in enumerate(zip(expected, actual)):
            out += value_differences(e, a, f"{path}[{i}]", memo)
        return out
    if isinstance(expected, dict):
        if list(expected) != list(actual):
            keys_differ = value_differences(list(expected), list(actual), f"{path}.keys()", memo)
            return keys_differ or [f"{path}: key order {list(expected)!r} != {list(actual)!r}"]
        out = []
        for (k, e), a in zip(expected.items(), actual.values()):
            out += value_differences(e, a, f"{path}[{k!r}]", memo)
        return out
    if isinstance(expected, (set, frozenset)):
        return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]
    if isinstance(expected, BaseException):
        return value_differences((expected.args, str(expected)), (actual.args, str(actual)),
                                 f"{path}(exception)", memo)
    if _has_attributes(expected):
        return value_differences(vars(expected), vars(actual), f"{path}.__dict__", memo)
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


def _has_attributes(obj: Any) -> bool:
    return hasattr(obj, "__dict__") and not isinstance(obj, (type, types.FunctionType,
                                                             types.ModuleType))


def outcome_differences(expected: Outcome, actual: Outcome) -> list[str]:
    """Differences in what was returned, raised (class, message, args, cause) and printed."""
    out = []
    if expected.exc_type is not actual.exc_type:
        out.append(f"exception: expected {expected.describe()}, got {actual.describe()}")
    elif expected.exc_type is not None:
        if expected.exc_message != actual.exc_message:
            out.append(f"exception message: {expected.exc_message!r} != {actual.exc_message!r}")
        out += value_differences(expected.exc_args, actual.exc_args, "exception.args")
        if expected.exc_cause != actual.exc_cause:
            out.append(f"exception cause: {expected.exc_cause!r} != {actual.exc_cause!r}")
    else:
        out += value_differences(expected.value, actual.value)
    if expected.stdout != actual.stdout:
        out.append(f"stdout: expected {expected.stdout!r}, got {actual.stdout!r}")
    return out


def check_declared(case: Case, outcome: Outcome) -> list[str]:
    """The case's own declaration (raises= or not) against what plain Python did."""
    if case.raises is None and outcome.exc_type is not None:
        return [f"{case.name} is declared to return but {outcome.describe()}:\n"
                f"{outcome.traceback_text}"]
    if case.raises is not None and outcome.exc_type is not case.raises:
        return [f"{case.name} is declared to raise {case.raises.__qualname__} but "
                f"{outcome.describe()}"]
    return []


def check(case: Case, mode: str, expected: Outcome | None = None) -> list[str]:
    """Run `case` in `mode` and return the differences from the plain run (empty: identical)."""
    expected = expected or run_plain(case)
    if mode == "plain":
        problems = check_declared(case, expected)
        again = run_plain(case)
        problems += [f"plain run is not deterministic: {d}"
                     for d in outcome_differences(expected, again)]
        return problems
    actual = RUNNERS[mode](case)
    problems = outcome_differences(expected, actual)
    problems += [f"pydron warned: {w}" for w in actual.pydron_warnings]
    if case.submits_tasks and actual.tasks_submitted == 0:
        problems.append(f"no task was submitted: the case ran plainly in mode {mode}")
    if problems and actual.traceback_text and expected.exc_type is not actual.exc_type:
        problems.append(f"{mode} traceback:\n{actual.traceback_text}")
    return problems


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", action="append", choices=MODES)
    parser.add_argument("-k", dest="keyword", default="")
    parser.add_argument("--cluster", default=None, help="scheduler address for pydron-cluster")
    options = parser.parse_args(argv)
    modes = options.mode or list(MODES)
    global CLUSTER
    CLUSTER = options.cluster
    if "pydron-cluster" in modes and CLUSTER is None:
        print("no --cluster address: skipping mode pydron-cluster")
        modes.remove("pydron-cluster")
    if CLUSTER is not None and modes != ["pydron-cluster"]:
        print("--cluster runs only mode pydron-cluster here (one enable per process)")
        modes = ["pydron-cluster"]
    for mode in ("reference", "reference-threads"):
        if mode in modes and not (reference_available() and reference_marks_known()):
            print(f"pydron._reference or pydron._core._kind is missing: skipping mode {mode}")
            modes.remove(mode)
    cases = [c for c in load_all() if options.keyword in c.name]
    with pydron_disabled():
        expected = {c.name: run_plain(c) for c in cases}
    failures = 0
    for mode in modes:
        for c in cases:
            problems = check(c, mode, expected[c.name])
            failures += bool(problems)
            status = "ok" if not problems else "FAIL"
            print(f"{status:4} {mode:17} {c.name}", flush=True)
            for p in problems:
                print("      " + p.replace("\n", "\n      "))
    if pydron.is_enabled():
        pydron.disable()
    print(f"{len(cases)} cases x {len(modes)} modes: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
