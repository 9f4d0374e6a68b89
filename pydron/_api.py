"""The public API's implementation: decorators, enable/disable, and the glue between the C core
(pydron._core) and the bytecode rewrite (pydron._rewrite)."""
from __future__ import annotations

import atexit
import logging
import os
import types
import weakref

from pydron import check as _check
from pydron import config as _config

log = logging.getLogger("pydron")
_config.apply_log_level_from_env()    # PYDRON_LOG shows what the decorators log, too

_EXECUTORS = ("processes", "threads")


def _killed() -> bool:
    """PYDRON_DISABLE=1 (or true/yes/on) is the kill switch: pydron changes nothing."""
    return _config.killed()


try:
    from pydron import _core
except ImportError as exc:  # pragma: no cover - only when the extension was not built
    _core = None
    _core_error = exc

    class WorkerLostError(RuntimeError):
        """A task killed the worker processes that ran it (3 times)."""
else:
    WorkerLostError = _core.WorkerLostError

_FUNCTIONAL, _SCHEDULED = 1, 2
_atexit_registered = False
_scheduled: "weakref.WeakSet[types.FunctionType]" = weakref.WeakSet()
_enabled_hook = False   # PYDRON_INTERCEPT=hook: enter scheduled code through the PEP 523 hook


def _require_core():
    if _core is None:
        raise ImportError(f"pydron's C core is not built: {_core_error}")
    return _core


def _target(fn, decorator: str):
    """The plain function behind fn (staticmethod/classmethod/bound method)."""
    inner = fn
    if isinstance(inner, (staticmethod, classmethod)):
        inner = inner.__func__
    if isinstance(inner, types.MethodType):
        inner = inner.__func__
    if not isinstance(inner, types.FunctionType):
        raise TypeError(f"@pydron.{decorator} expects a Python function, got "
                        f"{type(fn).__name__} {fn!r}")
    return inner


def _parse_size(value, what: str) -> int:
    """Bytes from an int or a string like "512M", "2G", "1.5GiB"."""
    if isinstance(value, bool):
        raise ValueError(f"@pydron.functional: {what} must be a size in bytes or like '2G', "
                         f"got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"@pydron.functional: {what} must be positive, got {value!r}")
        return value
    if isinstance(value, str):
        import re
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", value)
        if m:
            scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
            n = int(float(m.group(1)) * scale)
            if n > 0:
                return n
    raise ValueError(f"@pydron.functional: {what} must be a size in bytes or like '2G', "
                     f"got {value!r}")


def functional(fn=None, *, executor: str = "processes", timeout: float | None = None,
               memory_limit: int | str | None = None):
    """Mark fn as side-effect free: called from a scheduled function it becomes a task that may
    run anywhere, at any time, more than once. ``executor="threads"`` runs it on a thread of
    this process instead (for native work that releases the GIL).

    ``timeout`` (seconds; default: the ``task_timeout`` setting, none unless set): a task
    running longer is stopped and raises TimeoutError naming the function, where plain Python
    would have raised. ``memory_limit`` (bytes, or like ``"2G"``): a task whose worker process
    grows past it is stopped and raises MemoryError (``resource.setrlimit`` inside a task does
    not bound arrays in pydron's shared arena; this does). A thread task past its timeout fails
    the same way, but its thread cannot be stopped: it is abandoned to finish on its own."""
    if executor not in _EXECUTORS:
        raise ValueError(f"@pydron.functional: executor must be one of {_EXECUTORS}, "
                         f"got {executor!r}")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"@pydron.functional: timeout must be a positive number of "
                             f"seconds, got {timeout!r}")
    limit = 0 if memory_limit is None else _parse_size(memory_limit, "memory_limit")
    if limit and executor == "threads":
        raise ValueError("@pydron.functional: memory_limit applies to worker processes, not to "
                         "executor=\"threads\" (threads share this process's memory)")

    def mark(f):
        if _is_ctypes_pointer(f):
            if executor != "threads":
                raise ValueError("@pydron.functional: a ctypes function pointer runs on threads "
                                 "(executor=\"threads\"), through libffi with the GIL released")
            if not _killed() and _core is not None:
                _core._mark_native(f)
            return f
        inner = _target(f, "functional")
        if not _killed() and _core is not None:
            _check.warn_side_effects(inner)
            _core._mark(inner, _FUNCTIONAL, executor == "threads", float(timeout or 0), limit)
            inner.__pydron_kind__ = "functional"   # read by the pure-Python reference runtime
        return f

    return mark if fn is None else mark(fn)


def _is_ctypes_pointer(obj) -> bool:
    import sys
    ctypes = sys.modules.get("ctypes")
    return ctypes is not None and isinstance(obj, ctypes._CFuncPtr)


def schedule(fn):
    """Mark fn to be analysed and run in parallel where its data allows."""
    inner = _target(fn, "schedule")
    if not _killed() and _core is not None:
        _core._mark(inner, _SCHEDULED)
        inner.__pydron_kind__ = "scheduled"
        _scheduled.add(inner)
        if _core._is_enabled() and not _enabled_hook:
            _core._intercept(inner, True)
    return fn


def _rewrite_code(code: types.CodeType):
    """Called by the C core the first time a scheduled code object runs: the rewritten code,
    or None to run it plainly (with the reason logged)."""
    from pydron import _rewrite

    if _rewrite.is_rewritten(code):    # e.g. a scheduled function defined in scheduled code
        return code
    ok, reason = _rewrite.is_rewritable(code)
    if not ok:
        log.warning("pydron: %s runs plainly: %s", code.co_qualname, reason)
        return None
    return _rewrite.rewrite(code, _core)


def enable(workers: int | None = None, progress: bool | None = None,
           timeline: str | None = None, *, blas_threads: int | str | None = None,
           cluster: str | None = None, security=None, insecure: bool | None = None,
           replay: str | bool | None = None):
    """Install the frame hook and start the local executor (its fork server now, workers on
    first use). Arguments left out come from pydron/config.py (PYDRON_* variables, then
    pydron.toml / [tool.pydron], then defaults: one worker per usable core, BLAS threads
    per worker = cores // workers); `pydron info` shows them.

    ``cluster="tls://host:8786"`` (or ``"local:4"``, a cluster of 4 worker processes on this
    machine) runs the tasks on a Dask distributed cluster instead; ``security`` is its
    ``distributed.security.Security`` (certificates), ``insecure=True`` allows an unencrypted
    address off this machine. The local pool stays ready: if the scheduler is lost, tasks
    submitted afterwards run here."""
    global _atexit_registered
    if _killed():
        log.info("pydron: PYDRON_DISABLE is set; running plain Python")
        return
    cfg = _config.resolve_for_enable({"workers": workers, "progress": progress,
                                      "timeline": timeline, "blas_threads": blas_threads,
                                      "cluster": cluster, "cluster_insecure": insecure,
                                      "replay": replay})
    _config.apply_log_level(cfg.log)
    if cfg.disable:
        log.info("pydron: disabled by %s; running plain Python", cfg.source("disable"))
        return
    core = _require_core()
    global _enabled_hook
    mode = cfg.intercept
    if core._is_enabled():
        disable()
    # Options the C core and the workers read: set before the fork server forks.
    core._configure({"thread_workers": cfg.threads, "arena_arrays": int(cfg.arena_arrays),
                     "task_timeout": cfg.task_timeout, "check": int(cfg.check)})
    from pydron import _worker_setup
    _worker_setup.plan(cfg.blas_threads)
    core._replay_configure(mode=cfg.replay, jit=cfg.jit)
    from pydron import _graph_cache
    _graph_cache.configure(cfg.cache_dir)
    _graph_cache.directory()       # checked now, not at the first scheduled call
    core._set_rewrite(_rewrite_code)
    core._enable(cfg.workers, mode == "hook")
    _configure_progress(cfg.progress)
    _configure_timeline(cfg.timeline)
    log.debug("pydron: enabled: %s", {k: v for k, v in cfg.as_dict().items()
                                      if k not in ("functional", "schedule")})
    _enabled_hook = mode == "hook"
    if not _enabled_hook:
        for f in list(_scheduled):
            core._intercept(f, True)
    _start_import_sync(core)
    _warm_first_call(core)
    if cfg.report:
        from pydron import report
        report.start()
        atexit.register(report.print_report, None, cfg.workers)
    if not _atexit_registered:
        atexit.register(core._shutdown)
        atexit.register(_note_cache_session)
        _atexit_registered = True
    address = _config.cluster_address(cfg)
    if address is not None:
        from pydron import _cluster
        try:
            _cluster.connect(address, security=security, insecure=cfg.cluster_insecure)
        except BaseException:
            disable()
            raise


def _warm_first_call(core) -> None:
    """What the first scheduled call would otherwise make on its way, made now, so that it costs
    what a later call costs (bench/replay_figures.py warm_cache): the replay interpreter's Python
    helpers and tables of pure callees (pydron._replay), and cloudpickle, which shipping the first
    task of a function consults (pydron/_ship.py). Then the young generations are collected:
    what enable() and the imports made lives as long as the process, and left young it was
    walked by the first collection that a call's own allocations set off (0.3-0.7 ms inside the
    first 2,000-task call, against ~1 ms here, once)."""
    import gc
    core._replay_warm()
    try:
        import cloudpickle.cloudpickle  # noqa: F401
    except ImportError:                 # another cloudpickle: _ship copes at the first task
        pass
    gc.collect(1)


def _note_cache_session() -> None:
    """At exit: this process's replay counters go to the disk cache's stats (pydron info)."""
    try:
        from pydron import _graph_cache
        _graph_cache.note_session(_core._replay_stats(), _core._jit_info())
    except Exception as exc:        # never an error at exit
        log.debug("pydron: graph cache counters not saved: %s", exc)


def _start_import_sync(core) -> None:
    """While no worker exists yet, the fork server imports what the script imports, a little
    behind it (on another core), so the first scheduled call does not pay for it: `pydron run`
    enables pydron before the script's first line."""
    import threading

    def follow():
        while core._is_enabled():
            try:
                if not core._sync_imports():
                    return
            except Exception:        # the pool went away: nothing more to follow
                return
            time.sleep(0.05)

    import time
    threading.Thread(target=follow, name="pydron-import-sync", daemon=True).start()


def disable():
    """Remove the frame hook: every decorated function runs as plain Python again (and a
    cluster given to enable() is let go)."""
    _write_timeline()
    import sys
    if "pydron._cluster" in sys.modules:
        sys.modules["pydron._cluster"].disconnect()
    if _core is not None:
        if _core._is_enabled() and not _enabled_hook:
            for f in list(_scheduled):
                _core._intercept(f, False)
        _core._disable()


def is_enabled() -> bool:
    return _core is not None and _core._is_enabled()


def stats() -> dict:
    """Task counters of this process (submitted, finished, in flight, live pending values), and
    the replay's (replay_hits: calls that ran their graph, replay_misses: calls traced,
    replay_bails: graphs that gave up to the trace, replay_guesses / replay_mispredicts: branches
    guessed past a pending result and guesses that were wrong, replay_speculative_tasks: tasks
    submitted while a guess was open, replay_dropped_tasks / replay_reused_tasks: tasks a wrong
    guess dropped, or took back for the right path to make again, replay_sites_stopped /
    replay_sites_resumed: branch sites that stopped guessing, and that guessed again later,
    replay_maps: comprehensions sent as chunk tasks, replay_disk_hits: graphs found in the disk
    cache)."""
    core = _require_core()
    out = core._stats()
    out.update({f"replay_{k}": v for k, v in core._replay_stats().items()})
    return out


# ---- seeing what ran ----------------------------------------------------------------------------

class _ProgressBar:
    """tasks done / known on stderr for scheduled calls that run longer than a second; only on a
    terminal."""

    width = 30

    def __init__(self, stream):
        self.stream = stream

    def __call__(self, done: int, known: int, final: bool) -> None:
        filled = self.width * done // known if known else self.width
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\rpydron [{bar}] {done}/{known} tasks")
        if final:
            self.stream.write("\n")
        self.stream.flush()


def _configure_progress(progress: bool) -> None:
    import sys
    stream = sys.stderr
    on = progress and hasattr(stream, "isatty") and stream.isatty()
    _core._set_progress(_ProgressBar(stream) if on else None, 1.0)


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def graph_to_dot(events, title: str = "pydron") -> str:
    """The DOT text of recorded events: one node per task (function and line of the call), an
    edge per data dependency, and the sync points where the scheduled code waited."""
    lines = [f"digraph {_dot_quote(title)} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fillcolor="#e8f0fe", fontname="Helvetica"];']
    waits = 0
    for event in events:
        if event[0] == "task":
            _, tid, qualname, filename, line, deps = event
            where = f"{os.path.basename(filename)}:{line}" if isinstance(filename, str) else ""
            label = _dot_quote(qualname + "\n" + where)
            lines.append(f"  t{tid} [label={label}];")
            for dep in deps:
                lines.append(f'  t{dep} -> t{tid} [label="data"];')
        elif event[0] == "wait":
            _, tid, filename, line = event
            waits += 1
            where = f"{os.path.basename(filename)}:{line}" if isinstance(filename, str) else "?"
            label = _dot_quote("sync\n" + where)
            lines.append(f'  w{waits} [shape=octagon, fillcolor="#fde2e2", label={label}];')
            lines.append(f"  t{tid} -> w{waits} [style=dashed];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def visualize(fn, *args, filename: str = "graph.svg", **kwargs):
    """Run the scheduled call fn(*args, **kwargs) and write the task graph it traced to filename
    (.svg, .png, .pdf through graphviz's `dot`, or .dot for the text). Returns fn's result."""
    import shutil
    import subprocess
    import tempfile

    core = _require_core()
    if _core._kind(fn) != _SCHEDULED:
        raise TypeError(f"pydron.visualize: {getattr(fn, '__qualname__', fn)!r} is not a "
                        "@pydron.schedule function")
    fmt = os.path.splitext(filename)[1].lstrip(".").lower()
    if fmt not in ("svg", "png", "pdf", "dot"):
        raise ValueError(f"pydron.visualize: filename must end in .svg, .png, .pdf or .dot, "
                         f"got {filename!r}")
    dot = shutil.which("dot")
    if fmt != "dot" and dot is None:
        raise RuntimeError("pydron.visualize: graphviz's `dot` is not installed "
                           "(apt-get install graphviz), or write a .dot file")
    started_here = not is_enabled()
    if started_here:
        enable()
    core._record(True)
    try:
        result = fn(*args, **kwargs)
    finally:
        events = core._record(False)
        if started_here:
            disable()
    text = graph_to_dot(events, title=getattr(fn, "__qualname__", "pydron"))
    directory = os.path.dirname(os.path.abspath(filename))
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as tmp:
        tmp_name = tmp.name
        if fmt == "dot":
            tmp.write(text)
    try:
        if fmt != "dot":
            subprocess.run([dot, f"-T{fmt}", "-o", tmp_name], input=text, text=True,
                           check=True, capture_output=True)
        os.replace(tmp_name, filename)   # never a half-written file
    except BaseException:
        os.unlink(tmp_name)
        raise
    return result


_timeline_path: str | None = None
_timeline_origin = 0.0


def _configure_timeline(path) -> None:
    """pydron.enable(timeline="run.json"): record every task; the Chrome trace-event file is
    written at disable() and at exit."""
    global _timeline_path, _timeline_origin, _timeline_atexit
    if path is None:
        return
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"pydron.enable: timeline directory does not exist: {directory!r}")
    _write_timeline()   # a previous timeline is finished first
    _timeline_path = path
    _timeline_origin = _core._clock()
    _core._timeline(True)
    if not _timeline_atexit:
        atexit.register(_write_timeline)
        _timeline_atexit = True


_timeline_atexit = False


def timeline_events(records, origin: float, workers: int, lane_names=None) -> dict:
    """Chrome trace-event JSON (Perfetto, chrome://tracing) for timeline records: one lane per
    worker process (or per Dask worker, named by lane_names), one for the thread pool, a slice
    per task."""
    lanes = {0: "threads / unknown"}
    lanes.update({w: f"worker {w}" for w in range(1, workers + 1)})
    lanes.update(lane_names or {})
    events = [{"ph": "M", "name": "process_name", "pid": 1, "tid": 0,
               "args": {"name": "pydron"}}]
    for qualname, worker, submitted, started, finished, failed in records:
        lanes.setdefault(worker, f"worker {worker}")
        events.append({
            "name": qualname, "cat": "failed" if failed else "task", "ph": "X", "pid": 1,
            "tid": worker, "ts": round((started - origin) * 1e6, 3),
            "dur": round(max(finished - started, 0.0) * 1e6, 3),
            "args": {"queued_us": round(max(started - submitted, 0.0) * 1e6, 3),
                     "failed": bool(failed)},
        })
    for tid, name in sorted(lanes.items()):
        events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid,
                       "args": {"name": name}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _write_timeline() -> None:
    global _timeline_path
    if _timeline_path is None or _core is None:
        return
    import json
    import tempfile
    path, _timeline_path = _timeline_path, None
    records = _core._timeline(False)
    import sys
    cluster = sys.modules.get("pydron._cluster")
    adapter = cluster.current() if cluster is not None else None
    data = timeline_events(records, _timeline_origin, os.cpu_count() or 1,
                           adapter.lane_names() if adapter is not None else None)
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as tmp:
        json.dump(data, tmp)
    os.replace(tmp.name, path)   # never a half-written file
