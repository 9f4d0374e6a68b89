"""Cold paths of the executor (exec/ in C), clearer in Python: error messages that describe
calls and values, exception pickling across processes, shipping functions by value.

Nothing here runs per task on the fast path. The C side imports this module once, in the master
before the fork server is forked, so workers inherit it already imported; it must not import
pydron._core at module level (it is imported while _core initialises).
"""
from __future__ import annotations

import io
import pickle
import traceback
import types


def qualname(fn) -> str:
    mod = getattr(fn, "__module__", None)
    q = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    return f"{mod}.{q}" if mod and mod != "builtins" else q


def typename(x) -> str:
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class DepUnpickler(pickle.Unpickler):
    """Unpickler resolving persistent ids (dependencies of a task) through `deps`.

    persistent_load cannot be set on an Unpickler instance on 3.13: a subclass forwards it."""

    def __init__(self, file, deps, **kwargs):
        super().__init__(file, **kwargs)
        self.deps = deps

    def persistent_load(self, pid):
        if not isinstance(pid, int) or not 0 <= pid < len(self.deps):
            raise pickle.UnpicklingError(f"pydron: task refers to dependency {pid!r} it was "
                                         f"not given ({len(self.deps)} given)")
        return self.deps[pid]


def _rebuild_memoryview(buffer, fmt, shape, readonly):
    view = memoryview(buffer)
    if view.format != fmt or view.shape != tuple(shape):
        view = view.cast("B").cast(fmt, shape) if shape else view.cast("B").cast(fmt)
    return view.toreadonly() if readonly else view


def _reduce_memoryview(view):
    """A memoryview crosses as a memoryview (format, shape and read-only flag kept), its bytes
    out of band when large; plain pickle refuses it, and cloudpickle turned it into bytes."""
    data = view if view.c_contiguous else memoryview(bytearray(view.tobytes())).cast(view.format, view.shape)
    return _rebuild_memoryview, (pickle.PickleBuffer(data), view.format, view.shape,
                                 view.readonly)


def dispatch_table() -> dict:
    """Reducers the codec's picklers use beyond copyreg's (see pickle.Pickler.dispatch_table)."""
    import copyreg
    table = copyreg.dispatch_table.copy()
    table[memoryview] = _reduce_memoryview
    return table


class _Dep:
    """Stands for the result of another task when describing a call's arguments."""


def describe(x) -> str:
    t = type(x)
    if isinstance(x, _Dep):
        return "<result of a task>"
    if t.__name__ == "ndarray" and hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"ndarray({x.dtype}, {'x'.join(map(str, x.shape)) or 'scalar'})"
    if isinstance(x, (list, tuple, dict, set, frozenset, str, bytes)):
        return f"{t.__name__}[{len(x)}]"
    return typename(x)


def describe_call(data, buffers) -> str:
    """'(ndarray(float64, 100x100), int, <result of a task>)' for an encoded call."""

    class ShapesOnly(pickle.Unpickler):
        def persistent_load(self, pid):
            return _Dep()

    args, kwargs = ShapesOnly(io.BytesIO(data), buffers=buffers).load()
    parts = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in (kwargs or {}).items()]
    return "(" + ", ".join(parts) + ")"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def memory_available() -> tuple[int, str]:
    """(bytes, what) of the tightest memory bound on this process: a cgroup limit or RAM."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit() and int(text) < 2**60:
                limits.append((int(text), "the cgroup's memory limit"))
        except OSError:
            pass
    try:
        import os
        limits.append((os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
                       "this machine's memory"))
    except (ValueError, OSError):
        pass
    return min(limits) if limits else (0, "")


def worker_lost(fn, how, kills, data, buffers, peak_rss=0, sigkill=False):
    from pydron._core import WorkerLostError
    try:
        shapes = describe_call(data, buffers)
    except Exception as e:
        shapes = f"(<arguments not decodable: {e!r}>)"
    detail = how
    if peak_rss:
        detail += f", peak memory {_gib(peak_rss)}"
        limit, what = memory_available()
        # Nobody else sends SIGKILL to a worker that grew to most of the memory there is.
        if sigkill and limit and peak_rss > 0.5 * limit:
            detail += (f": probably the kernel's out-of-memory killer ({what} is {_gib(limit)}; "
                       f"see @pydron.functional(memory_limit=...))")
    return WorkerLostError(f"pydron: task {qualname(fn)}{shapes} killed its worker process "
                           f"{kills} times (last: {detail}); giving up on it")


def task_timed_out(fn, seconds):
    return TimeoutError(f"pydron: task {qualname(fn)}() ran longer than its timeout of "
                        f"{seconds:g} s and was stopped")


def task_over_memory(fn, limit, used):
    return MemoryError(f"pydron: task {qualname(fn)}() used {_gib(used)} of memory, over its "
                       f"limit of {_gib(limit)}, and was stopped")


def warn(message: str) -> None:
    import logging
    logging.getLogger("pydron").warning(message)


def workers_die_at_start():
    from pydron._core import WorkerLostError
    return WorkerLostError("pydron: worker processes die as soon as they start; cannot run tasks")


def bad_argument(fn, where, arg, err):
    if isinstance(where, int):
        code = getattr(fn, "__code__", None)
        if code is not None and where < code.co_argcount:
            where = f"argument {where} ({code.co_varnames[where]!r})"
        else:
            where = f"argument {where}"
    e = TypeError(f"pydron: cannot send {where} of {qualname(fn)}() to a worker process: "
                  f"{typename(arg)} object cannot be pickled ({type(err).__name__}: {err})")
    e.__cause__ = err
    return e


def bad_result(fn, result, err):
    return TypeError(f"pydron: the result of {qualname(fn)}() cannot be sent back from the "
                     f"worker process: {typename(result)} object cannot be pickled "
                     f"({type(err).__name__}: {err})")


def undecodable_result(fn, err):
    """The master could not unpickle a task's result (a class only the worker has, a __reduce__
    whose output the master cannot load)."""
    e = TypeError(f"pydron: the result of {qualname(fn)}() came back from its worker process but "
                  f"could not be rebuilt here: {type(err).__name__}: {err}")
    e.__cause__ = err
    return e


def undecodable_arguments(fn, err):
    e = TypeError(f"pydron: the arguments of {qualname(fn)}() could not be rebuilt in the worker "
                  f"process: {type(err).__name__}: {err}")
    e.__cause__ = err
    return e


def bad_function(fn, err):
    e = TypeError(f"pydron: cannot send function {qualname(fn)} to a worker process "
                  f"(by reference or by value with cloudpickle): {type(err).__name__}: {err}")
    e.__cause__ = err
    return e


def bad_record(what, detail):
    return RuntimeError(f"pydron: a worker process wrote a malformed {what} ({detail}); "
                        f"the worker was replaced")


# Modules that were still being imported when the fork server was forked (a module that calls
# pydron.enable() at import time and defines its functions after that): the workers hold them
# half-executed, so their functions cannot be found there by name and travel by value.
_half_imported: frozenset = frozenset()


# The modules the fork server has (the master's when it was forked, plus those it was asked to
# import since): what it still lacks is what the master imported after.
_server_modules: set = set()


def before_fork() -> None:
    """Called by exec_start just before the fork server is forked."""
    global _half_imported, _server_modules
    import sys
    _half_imported = frozenset(
        name for name, m in list(sys.modules.items())
        if getattr(getattr(m, "__spec__", None), "_initializing", False))
    _server_modules = set(sys.modules)


def imports_since_fork() -> bytes:
    """Newline-separated names of modules the master imported since the fork server was forked
    and that a fresh process could import by name (top-level packages first, each name once);
    the fork server imports them before it forks workers."""
    import sys
    names = []
    for name, m in list(sys.modules.items()):
        if name in _server_modules or name == "__main__" or name in _half_imported:
            continue
        spec = getattr(m, "__spec__", None)
        if spec is None or getattr(spec, "_initializing", False) or spec.origin in (None, "frozen"):
            continue
        names.append(name)
    _server_modules.update(names)
    return "\n".join(names).encode()


def pickle_function(fn) -> bytes:
    import sys
    import cloudpickle
    code = getattr(fn, "__code__", None)
    shipped = (fn, getattr(code, "co_filename", None))
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if module is None or module.__name__ not in _half_imported or module.__name__ == "__main__":
        return cloudpickle.dumps(shipped, protocol=5)
    cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(shipped, protocol=5)
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def unpack_function(shipped):
    """cloudpickle ships code by value with co_filename '<dynamic-code>': put the real file back,
    so worker tracebacks name it (and the master can show its source lines)."""
    fn, filename = shipped
    code = getattr(fn, "__code__", None)
    if filename and code is not None and code.co_filename != filename:
        def fix(c):
            consts = tuple(fix(k) if isinstance(k, types.CodeType) else k for k in c.co_consts)
            return c.replace(co_filename=filename, co_consts=consts)
        try:
            fn.__code__ = fix(code)
        except Exception:
            pass
    return fn


def pickle_exception(exc, fn) -> bytes:
    try:
        from tblib import pickling_support
        pickling_support.install(exc)
    except Exception:
        pass
    import cloudpickle
    # By reference first; classes the worker got by value (defined in __main__, or after
    # enable()) go back by value with cloudpickle, which maps them to the master's own class.
    for dumps in (pickle.dumps, cloudpickle.dumps):
        try:
            data = dumps(exc, protocol=5)
            if type(pickle.loads(data)) is type(exc):
                return data
        except Exception:
            pass
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    err = RuntimeError(f"{typename(exc)}: {exc}\n(raised in {qualname(fn)}() on a pydron worker; "
                       f"the exception could not be pickled back)\n\nWorker traceback:\n{tb}")
    try:
        return pickle.dumps(err, protocol=5)
    except Exception:
        return pickle.dumps(RuntimeError(f"{typename(exc)} raised in a pydron worker"), protocol=5)


def restore_builtin_state(exc):
    """tblib rebuilds exceptions that carry attributes with __new__, skipping __init__: the
    builtin classes that derive state from their arguments (SystemExit.code, OSError.errno,
    StopIteration.value) get it back by running their own __init__ again."""
    for cls in type(exc).__mro__:
        if cls.__module__ == "builtins" and cls.__init__ is not BaseException.__init__ \
                and cls is not object and "__init__" in cls.__dict__:
            try:
                cls.__init__(exc, *exc.args)
            except Exception:
                pass
            break
    return exc


def undecodable_error(err):
    return RuntimeError(f"pydron: a task failed in a worker process, and its exception could not "
                        f"be rebuilt here: {type(err).__name__}: {err}")


class ChunkRunner:
    """A map's chunk for executors that call functions themselves (the cluster): fn(*args) for
    each args of the list it is called with, in order; ("ok", results), or at the first failure
    ("err", index, pickled exception), as exec/worker.c run_chunk answers."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, calls):
        results = []
        for i, args in enumerate(calls):
            try:
                results.append(self.fn(*args))
            except BaseException as exc:  # noqa: BLE001 — the element's failure, raised later
                return ("err", i, pickle_exception(exc, self.fn))
        return ("ok", results)

    def __eq__(self, other):
        return type(other) is ChunkRunner and other.fn is self.fn

    def __hash__(self):
        return hash(("chunk", id(self.fn)))


_chunk_runners: dict = {}


def chunk_runner(fn):
    """One ChunkRunner per function (executors register functions once)."""
    runner = _chunk_runners.get(id(fn))
    if runner is None or runner.fn is not fn:
        runner = _chunk_runners[id(fn)] = ChunkRunner(fn)
    return runner
