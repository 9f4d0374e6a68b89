"""The public API's implementation: decorators, enable/disable, and the glue between the C core
(pydron._core) and the bytecode rewrite (pydron._rewrite)."""
from __future__ import annotations

import atexit
import logging
import os
import types
import weakref

log = logging.getLogger("pydron")

_EXECUTORS = ("processes", "threads")


def _killed() -> bool:
    """PYDRON_DISABLE=1 (or true/yes/on) is the kill switch: pydron changes nothing."""
    return os.environ.get("PYDRON_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


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
_produced: "weakref.WeakSet[types.CodeType]" = weakref.WeakSet()
_scheduled: "weakref.WeakSet[types.FunctionType]" = weakref.WeakSet()
_enabled_hook = False   # PYDRON_INTERCEPT=hook: enter scheduled code through the PEP 523 hook


def _intercept_mode() -> str:
    mode = os.environ.get("PYDRON_INTERCEPT", "vectorcall").strip().lower() or "vectorcall"
    if mode not in ("vectorcall", "hook"):
        raise ValueError(f"PYDRON_INTERCEPT must be 'vectorcall' or 'hook', got {mode!r}")
    return mode


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


def functional(fn=None, *, executor: str = "processes"):
    """Mark fn as side-effect free: called from a scheduled function it becomes a task that may
    run anywhere, at any time, more than once. ``executor="threads"`` runs it on a thread of
    this process instead (for native work that releases the GIL)."""
    if executor not in _EXECUTORS:
        raise ValueError(f"@pydron.functional: executor must be one of {_EXECUTORS}, "
                         f"got {executor!r}")

    def mark(f):
        inner = _target(f, "functional")
        if not _killed() and _core is not None:
            _core._mark(inner, _FUNCTIONAL, executor == "threads")
        return f

    return mark if fn is None else mark(fn)


def schedule(fn):
    """Mark fn to be analysed and run in parallel where its data allows."""
    inner = _target(fn, "schedule")
    if not _killed() and _core is not None:
        _core._mark(inner, _SCHEDULED)
        _scheduled.add(inner)
        if _core._is_enabled() and not _enabled_hook:
            _core._intercept(inner, True)
    return fn


def _rewrite_code(code: types.CodeType):
    """Called by the C core the first time a scheduled code object runs: the rewritten code,
    or None to run it plainly (with the reason logged)."""
    if code in _produced:
        return code
    from pydron import _rewrite

    ok, reason = _rewrite.is_rewritable(code)
    if not ok:
        log.warning("pydron: %s runs plainly: %s", code.co_qualname, reason)
        return None
    new = _rewrite.rewrite(code, _core)
    stack = [new]
    while stack:
        c = stack.pop()
        _produced.add(c)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return new


def enable(workers: int | None = None, progress: bool = True, timeline: str | None = None):
    """Install the frame hook and start the local executor (its fork server now, workers on
    first use). ``workers`` defaults to $PYDRON_WORKERS or one per core."""
    global _atexit_registered
    if _killed():
        log.info("pydron: PYDRON_DISABLE is set; running plain Python")
        return
    core = _require_core()
    if workers is None:
        env = os.environ.get("PYDRON_WORKERS")
        if env:
            try:
                workers = int(env)
            except ValueError:
                raise ValueError(f"PYDRON_WORKERS must be a whole number, got {env!r}") from None
        else:
            workers = os.cpu_count() or 1
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"pydron.enable: workers must be a positive integer, got {workers!r}")
    global _enabled_hook
    mode = _intercept_mode()
    if core._is_enabled():
        disable()
    core._set_rewrite(_rewrite_code)
    core._enable(workers, mode == "hook")
    _enabled_hook = mode == "hook"
    if not _enabled_hook:
        for f in list(_scheduled):
            core._intercept(f, True)
    if not _atexit_registered:
        atexit.register(core._shutdown)
        _atexit_registered = True


def disable():
    """Remove the frame hook: every decorated function runs as plain Python again."""
    if _core is not None:
        if _core._is_enabled() and not _enabled_hook:
            for f in list(_scheduled):
                _core._intercept(f, False)
        _core._disable()


def is_enabled() -> bool:
    return _core is not None and _core._is_enabled()


def stats() -> dict:
    """Task counters of this process (submitted, finished, in flight, live pending values)."""
    return _require_core()._stats()
