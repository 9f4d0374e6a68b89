"""The part of pydron's cluster backend that runs inside Dask workers: a batch of pydron tasks
is one Dask task (`run_batch`), so that the scheduler's cost per task is paid once per batch.

The client (pydron/_cluster.py) sends each batch as one pickled payload plus the Dask keys it
reads: the functions (pickled once per cluster, kept here unpickled), the results of earlier
batches (lists, moved worker to worker by Dask) and large constants scattered once. A batch's
result stays on the worker as a list with one value per task. When a task fails, the batch
raises `BatchFailed` carrying every task's outcome, so the client learns of failures without
asking, and the values of the tasks that did succeed are not lost.

A worker runs functional functions plainly: pydron is disabled in the worker's process at its
first batch, before any user module is imported there (a module that calls pydron.enable() at import time must not start
a pool or connect to a cluster from inside a worker).
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import sys
import time

from pydron import _exec_helpers

# Immutable values a task may share with other tasks as they are; anything else reaches each
# task as its own copy, as it would through a worker process of the local pool.
_SHARED_AS_IS = (int, float, complex, str, bytes, bool, type(None), range)

_functions: dict = {}           # function key -> function, unpickled once per worker process
_checked_versions: set = set()  # client version tuples already found equal to this worker's
_FUNCTIONS_KEPT = 4096


def versions() -> dict:
    """What must match between the client and its workers (see `compare_versions`)."""
    import cloudpickle
    import platform
    try:
        import numpy
        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    import pydron
    return {"python": platform.python_version(), "pydron": pydron.__version__,
            "cloudpickle": cloudpickle.__version__, "numpy": numpy_version}


def _significant(name: str, version):
    """The part of a version that must be equal: Python and numpy by major.minor (their pickles
    and code objects agree within one), pydron and cloudpickle exactly."""
    if version is None or name in ("pydron", "cloudpickle"):
        return version
    return ".".join(str(version).split(".")[:2])


def compare_versions(client: dict, worker: dict) -> list[str]:
    """'numpy 2.4.6 here, 1.26.4 there' for each package whose versions do not match."""
    out = []
    for name in ("python", "pydron", "cloudpickle", "numpy"):
        a, b = client.get(name), worker.get(name)
        if _significant(name, a) != _significant(name, b):
            out.append(f"{name} {a or 'missing'} on the client, {b or 'missing'} on the worker")
    return out


class VersionMismatch(RuntimeError):
    """This worker's Python, pydron, cloudpickle or numpy differs from the client's."""


def can_import(module: str) -> bool:
    """Whether `module` can be imported in this worker (then its functions travel by name)."""
    import importlib.util
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _disable_pydron_here() -> None:
    # Only when this process is not itself a pydron client (a cluster running in the client's
    # own process, for instance): there the decorators must keep working.
    if "PYDRON_DISABLE" in os.environ:
        return
    api = sys.modules.get("pydron._api")
    core = getattr(api, "_core", None)
    if core is not None and core._is_enabled():
        return
    os.environ["PYDRON_DISABLE"] = "1"


class _QuietTaskFailures(logging.Filter):
    """Dask logs every failed task as an error of the worker ("Compute Failed"); a pydron task
    that raised is the user's exception, reported to the client where plain Python raises it,
    not a fault of the worker."""

    def filter(self, record):
        try:
            return "BatchFailed(" not in record.getMessage()
        except Exception:
            return True


_prepared = False


def _prepare_worker() -> None:
    """Once per worker process, at its first batch (not at import: the client imports this
    module too)."""
    global _prepared
    if _prepared:
        return
    _prepared = True
    _disable_pydron_here()
    logging.getLogger("distributed.worker").addFilter(_QuietTaskFailures())


class BatchFailed(Exception):
    """Some tasks of a batch raised. `outcomes[i]` is (True, value) or (False, pickled exception)
    for task i; the message stays short (Dask truncates long ones)."""

    def __init__(self, outcomes, failed):
        super().__init__(f"{failed} of {len(outcomes)} pydron tasks failed")
        self.outcomes = outcomes
        self.failed = failed

    def __reduce__(self):
        return BatchFailed, (self.outcomes, self.failed)


def _function(key: str, shipped: bytes):
    fn = _functions.get(key)
    if fn is None:
        fn = _exec_helpers.unpack_function(pickle.loads(shipped))
        if len(_functions) >= _FUNCTIONS_KEPT:
            _functions.clear()
        _functions[key] = fn
    return fn


_tables: dict = {}          # key -> {(module, qualname): class or function}, shipped by value


def _table(key, shipped):
    table = _tables.get(key)
    if table is None:
        table = _tables[key] = pickle.loads(shipped)
    return table


class _ArgumentUnpickler(_exec_helpers.DepUnpickler):
    """Classes and functions the client's pickle names by module (defined in its __main__ or in
    a module the workers cannot import) come from the table the client shipped by value."""

    def __init__(self, file, deps, table, **kwargs):
        super().__init__(file, deps, **kwargs)
        self.table = table

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            found = self.table.get((module, name))
            if found is None:
                raise
            return found


def _own_copy(value):
    """The task's own copy of another task's result, as a worker of the local pool would get it
    (a pickle round trip): a task that writes to its argument changes nothing shared."""
    if type(value) in _SHARED_AS_IS:
        return value
    buffers = []
    try:
        data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception:        # a class that came by value: only cloudpickle can name it again
        import cloudpickle
        buffers = []
        data = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=[bytearray(b.raw()) for b in buffers])


def _buffers(spec, inputs):
    # Writable copies: arrays rebuilt over them are writable, as in plain Python, and a task's
    # writes stay its own.
    return [bytearray(inputs[b] if isinstance(b, int) else b) for b in spec]


def _dependency(spec, inputs):
    if spec[0] == "r":                       # ("r", input, item): a result of another batch
        return _own_copy(inputs[spec[1]][spec[2]])
    _, data, bufs = spec                     # ("v", pickle, buffers): a value shipped by value
    return pickle.loads(data, buffers=_buffers(bufs, inputs))


def _check_versions(client_versions: tuple) -> None:
    if client_versions in _checked_versions:
        return
    problems = compare_versions(dict(client_versions), versions())
    if problems:
        try:
            from distributed import get_worker
            where = get_worker().address
        except Exception:
            where = f"pid {os.getpid()}"
        raise VersionMismatch(f"pydron: Dask worker {where} cannot run this client's tasks: "
                              + "; ".join(problems))
    _checked_versions.add(client_versions)


def run_batch(payload: bytes, *inputs):
    """Run the tasks of one batch in order; their results as a list (stays on this worker)."""
    _prepare_worker()
    key, topic, client_versions, fn_keys, table_input, tasks = pickle.loads(payload)
    _check_versions(client_versions)
    table = {} if table_input is None else _table(fn_keys[table_input], inputs[table_input])
    results, outcomes, times = [], [], []
    failed = 0
    for fn_input, data, bufs, deps in tasks:
        started = time.time()
        fn = None
        try:
            fn = _function(fn_keys[fn_input], inputs[fn_input])
            resolved = [_dependency(d, inputs) for d in deps]
            args, kwargs = _ArgumentUnpickler(io.BytesIO(data), resolved, table,
                                              buffers=_buffers(bufs, inputs)).load()
            value = fn(*args, **(kwargs or {}))
            results.append(value)
            outcomes.append((True, value))
        except BaseException as exc:  # noqa: BLE001 — the task's exception is its outcome
            failed += 1
            results.append(None)
            outcomes.append((False, _exec_helpers.pickle_exception(exc, fn)))
        finally:
            times.append((started, time.time()))
    _report(topic, key, times, results)
    if failed:
        raise BatchFailed(outcomes, failed)
    return results


def _report(topic, key, times, results) -> None:
    """Where and when each task ran, and the size of the results, for the client's timeline and
    batching (best effort: a lost report costs a lane in the timeline, nothing else)."""
    try:
        from dask.sizeof import sizeof
        from distributed import get_worker
        worker = get_worker()
        worker.log_event(topic, {"key": key, "worker": worker.address, "times": times,
                                 "nbytes": int(sizeof(results))})
    except Exception:
        pass
