"""Cold paths of the executor (exec/ in C), clearer in Python: error messages that describe
calls and values, exception pickling across processes, shipping functions by value.

Nothing here runs per task on the fast path. The C side imports this module once, in the master
before the fork server is forked, so workers inherit it already imported; it must not import
pydron._core at module level (it is imported while _core initialises).
"""
from __future__ import annotations

import io
import pickle
import sys
import traceback

from pydron import _ship


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


def before_fork() -> None:
    """Called by exec_start just before the fork server is forked."""
    _ship.before_fork()


def imports_since_fork() -> bytes:
    """Newline-separated names of modules the master imported since the fork server was forked
    and that a fresh process could import by name (top-level packages first, each name once);
    the fork server imports them before it forks workers."""
    import sys
    names = []
    for name, m in list(sys.modules.items()):
        if name in _ship.server_modules or name == "__main__" or name in _ship.half_imported:
            continue
        spec = getattr(m, "__spec__", None)
        if spec is None or getattr(spec, "_initializing", False) or spec.origin in (None, "frozen"):
            continue
        names.append(name)
    _ship.server_modules.update(names)
    return "\n".join(names).encode()


def pickle_function(fn) -> bytes:
    """A task's function for the workers: by reference when they can import it as it is, else
    by value (pydron/_ship.py decides, as for functions passed as arguments)."""
    code = getattr(fn, "__code__", None)
    return _ship.dumps((fn, getattr(code, "co_filename", None)))


def unpack_function(shipped):
    fn, _filename = shipped       # the code kept its file name (_ship._reduce_code)
    return fn


def fast_pickler_class():
    return _ship.FastPickler


def ship_pickler_class():
    return _ship.ship_pickler_class()


def better_error(first, second):
    return _ship.better_error(first, second)


def reduce_class(cls):
    return _ship.reduce_class(cls)


def reduce_function(fn):
    return _ship.reduce_function(fn)


def reduce_method(method):
    return _ship.reduce_method(method)


def reduce_array(a):
    return _ship.reduce_array(a)


def reduce_memmap(a):
    return _ship.reduce_memmap(a)


def streams_seen() -> list:
    return _ship.streams_seen


_warned_streams: set = set()


def note_streams(fn) -> None:
    """An open file or stream was among fn's arguments: it crossed as a copy (cloudpickle reads
    a text file's content), so what the task reads does not move the caller's position and two
    tasks reading "the next line" both read the same one. Said once per function."""
    seen = list(dict.fromkeys(_ship.streams_seen))
    _ship.streams_seen.clear()
    key = qualname(fn)
    if key in _warned_streams:
        return
    _warned_streams.add(key)
    kinds = ", ".join(sorted({typename_of_class(c) for c in seen}))
    warn(f"pydron: {key}() was given an open file or stream ({kinds}) as an argument: each task "
         f"gets its own copy, so reads in a task do not advance the caller's file (two tasks "
         f"calling readline() both read the same line). Read the data in the caller and pass "
         f"it, or pass the file name and open it in the task.")


def typename_of_class(cls) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _frame_positions(exc) -> list:
    """(line, end_line, column, end_column) of the instruction each frame of exc's traceback was
    at, or None: what plain Python's traceback underlines with carets."""
    out = []
    tb = exc.__traceback__
    while tb is not None:
        pos = None
        if tb.tb_lasti >= 0:
            try:
                pos = list(tb.tb_frame.f_code.co_positions())[tb.tb_lasti // 2]
            except (IndexError, ValueError, AttributeError):
                pos = None
        out.append(pos if pos is not None and None not in pos else None)
        tb = tb.tb_next
    return out


def _with_positions(exc):
    """Rebuild the worker frames of exc's traceback (tblib's, which point every frame at column
    0 of a stub) so that each one's instruction spans the columns it spanned in the worker: the
    carets fall where plain Python puts them. Each frame is a stub compiled with its file name,
    placing an undefined name of the right width at the right line and column."""
    positions = exc.__dict__.pop("__pydron_positions__", None)
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append((code.co_filename, code.co_name, tb.tb_lineno))
        tb = tb.tb_next
    if not positions or len(positions) != len(frames):
        return exc
    first = last = None
    for (filename, name, lineno), pos in zip(frames, positions):
        new = stub_entry(filename, name, lineno, pos)
        if new is None:
            return exc
        if last is None:
            first = new
        else:
            last.tb_next = new
        last = new
    return exc.with_traceback(first)


def stub_entry(filename, name, lineno, pos):
    """A traceback entry of a stub frame named `name` in `filename`, at line lineno and the
    columns of pos (line, end_line, column, end_column), or None."""
    if pos is None or pos[0] != lineno or pos[1] != lineno or pos[3] <= pos[2]:
        pos = (lineno, lineno, 0, 1)         # one column: a whole line is never underlined
    line, _, col, end_col = pos
    # an undefined name at its columns, in parentheses, which allow any indentation
    name_at = ("(" + " " * (col - 1) if col else "") + "_" * (end_col - col)
    source = "\n" * (line - 1) + name_at + (")" if col else "")
    try:
        stub = compile(source, filename, "exec").replace(co_name=name)
        exec(stub, {"__builtins__": {}})     # NameError at exactly those columns
    except NameError:
        return sys.exc_info()[2].tb_next
    except Exception:                # noqa: BLE001 — no entry rather than a failure
        return None
    return None


def site_entry(code, lasti):
    """A traceback entry for a frame that has finished since it made a call (a comprehension's
    on 3.11): its file, name, line and the call's columns."""
    try:
        pos = list(code.co_positions())[lasti]
    except (IndexError, ValueError):
        return None
    if pos[0] is None:
        return None
    return stub_entry(code.co_filename, code.co_name, pos[0],
                      None if None in pos else pos)


def pickle_exception(exc, fn) -> bytes:
    try:
        exc.__pydron_positions__ = _frame_positions(exc)
    except Exception:               # noqa: BLE001 — an exception that takes no attributes
        pass
    try:
        from tblib import pickling_support
        pickling_support.install(exc)
    except Exception:
        pass
    # By reference first; classes the worker got by value (defined in __main__, or after
    # enable()) go back by value with cloudpickle, which maps them to the master's own class.
    for dumps in (pickle.dumps, lambda obj, protocol: _ship.dumps(obj)):
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
    StopIteration.value) get it back by running their own __init__ again. The worker frames
    get their columns back (_with_positions)."""
    if isinstance(getattr(exc, "__dict__", None), dict) and "__pydron_positions__" in exc.__dict__:
        exc = _with_positions(exc)
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


# ---- PYDRON_CHECK: arguments a task changed --------------------------------------------------

def _digest(value):
    """A digest of value's pickled state (its out-of-band buffers included), or None when it
    cannot be pickled here."""
    import hashlib
    h = hashlib.blake2b(digest_size=16)

    def out_of_band(buffer):
        h.update(buffer.raw())
        return False

    try:
        data = pickle.dumps(value, protocol=5, buffer_callback=out_of_band)
    except Exception:
        h = hashlib.blake2b(digest_size=16)
        try:
            data = _ship.dumps(value)
        except Exception:
            return None
    h.update(data)
    return h.digest()


def argument_digests(call, chunk=False):
    """Worker side, before the task runs: [(where, digest)] of each argument (of each call,
    for a chunk of a map: call is (([args tuple, ...],), None), or (([value, ...], 1), None)
    when each call takes one argument)."""
    if chunk:
        calls = call[0][0] if len(call[0]) == 1 else [(v,) for v in call[0][0]]
    else:
        calls = [call[0]]
    kwargs = None if chunk else call[1]
    out = []
    for args in calls:
        where = [(i, a) for i, a in enumerate(args)] + list((kwargs or {}).items())
        out += [(w, _digest(v)) for w, v in where]
    return out


def _argument_label(fn, where) -> str:
    if isinstance(where, int):
        code = getattr(fn, "__code__", None)
        if code is not None and where < code.co_argcount:
            return f"argument {where} ({code.co_varnames[where]!r})"
        return f"argument {where}"
    return f"argument {where!r}"


def changed_arguments(fn, call, before, chunk=False):
    """Worker side, after the task ran: the pickled (key, message) note naming the function
    and the arguments it changed, or None."""
    after = argument_digests(call, chunk)
    changed = list(dict.fromkeys(w for (w, d0), (_, d1) in zip(before, after)
                                 if d0 is not None and d1 is not None and d0 != d1))
    if not changed:
        return None
    name = qualname(fn)
    labels = ", ".join(_argument_label(fn, w) for w in changed)
    message = (f"pydron: {name}() changed its {labels} while it ran (PYDRON_CHECK): a functional "
               f"function must not write to its arguments; under pydron the change stays in the "
               f"worker and the caller never sees it (plain Python would). Return the new value "
               f"instead, or do not mark {name} functional.")
    return pickle.dumps(((name, tuple(changed)), message), protocol=5)


_noted: set = set()


def worker_note(note) -> None:
    """Master side: a worker's note (PYDRON_CHECK), logged once per key."""
    key, message = note
    if key in _noted:
        return
    _noted.add(key)
    warn(message)


class ChunkRunner:
    """A map's chunk for executors that call functions themselves (the cluster): fn(*args) for
    each args of the list it is called with (fn(value) for each value when flat), in order;
    ("ok", results), or at the first failure ("err", index, pickled exception), as
    exec/worker.c run_chunk answers."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, calls, flat=0):
        results = []
        for i, args in enumerate(calls):
            try:
                results.append(self.fn(args) if flat else self.fn(*args))
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
