"""A script's top-level code run as scheduled code: `pydron run --schedule __main__`, the default
when functional functions are named and no scheduled one is. A loop at the top of an unedited
script then submits its functional calls as tasks, as the body of a scheduled function would.

The module's code object is rewritten with the role "module" (pydron/_rewrite/__init__.py) and
run by the C core in a trace session (`_core._run_scheduled_module`). Its names are moved, not
forced: `r = f(x)` stores the pending result in the module's namespace. Plain code must never see
one, and plain functions read the module's globals, so the names a pending, or a list, tuple or
dict (which may hold pendings), is stored into are logged (`pending_names`, by code the rewrite
inserts before the store), and so are the names of the objects whose methods are called or
items stored by name (`results.append(f(x))`, `table[k] = f(x)`). Before any callee that is not
functional runs, the logged names are forced in place and the log emptied (`before_call`,
`flush_names`), and again at the end of the run. The log holds each name once, so the cost of a
flush is bounded by the number of names logged since the last one, not by the number of stores.

A container reached otherwise than by a name (`data["k"].append(f(x))`) is not logged: as in
scheduled functions, its pendings are forced when something reads them, and when the run ends.
Names stored inside a try region are waited for at the store: plain Python leaves them unassigned
when the region is aborted, and only locals are given back.
"""
from __future__ import annotations

import logging
import types

log = logging.getLogger("pydron")

_BuiltinMethod = type([].append)
_LIST_MOVES = frozenset({"append", "extend", "insert"})


class PendingNames(dict):
    """The logged names (keys; values unused). A dict subclass so that rewritten code can hold it
    as a constant and test it with one jump: its truth is its length, computed in C."""


class ModuleRuntime:
    """The helpers of a module's rewritten code: the C core's, plus the name log."""

    def __init__(self, core, namespace):
        for name in ("call", "call_ex", "force", "force_deep", "store_subscr", "mark",
                     "force_since", "force_before", "enter_handler", "handler_guard", "undo",
                     "log_store"):
            setattr(self, name, getattr(core, name))
        self._core = core
        self._pending_type = core.Pending
        self._functional = core.FUNCTIONAL
        self.namespace = namespace      # where the module's code stores its names
        self.pending_names = PendingNames()
        # the types of the values whose names are logged: what may be or hold a pending
        self.logged_types = frozenset({core.Pending, list, tuple, dict})

    def before_call(self, fn):
        """At a call site while names are logged: a functional callee only receives what it is
        passed (and list.append/extend/insert and len() read nothing else); any other callee
        may read the module's globals, so the logged names are forced first."""
        if self._core._kind(fn) == self._functional or fn is len:
            return
        if (type(fn) is _BuiltinMethod and type(fn.__self__) is list
                and fn.__name__ in _LIST_MOVES):
            return
        self.flush_names()

    def flush_names(self):
        """Force the logged names in place: a pending is replaced by its value in the namespace,
        a list, tuple or dict has its pendings replaced (force_deep). A failure is raised here,
        at the call site that needed the value; the names not reached stay logged."""
        names, namespace = self.pending_names, self.namespace
        while names:
            name = next(iter(names))
            try:
                value = namespace[name]
            except KeyError:            # deleted since
                del names[name]
                continue
            if type(value) is self._pending_type:
                namespace[name] = self.force(value)
            else:
                self.force_deep(value)
            del names[name]

    def hide_locals(self):
        """Take the rewrite's hidden locals (.pydron_*) out of the namespace, where 3.11 and 3.12
        copy a module frame's fast locals for `from m import *`, locals(), exec() and the like."""
        namespace = self.namespace
        for name in [k for k in namespace.keys() if type(k) is str and k.startswith(".pydron_")]:
            del namespace[name]

    def flush_names_quietly(self):
        """At the end of a run that raised: as much as can be forced, without raising again."""
        while self.pending_names:
            try:
                self.flush_names()
            except Exception:  # noqa: BLE001 - the run's own exception is the one reported
                self.pending_names.pop(next(iter(self.pending_names)), None)


def run_scheduled_module(code: types.CodeType, globals_: dict, locals_=None) -> None:
    """Run a module's code object (as `exec(code, globals_, locals_)` would) as scheduled code.
    If the rewrite refuses the code, it runs plainly, with a warning saying why."""
    from pydron import _core, _rewrite

    namespace = globals_ if locals_ is None else locals_
    rt = ModuleRuntime(_core, namespace)
    try:
        rewritten = _rewrite.rewrite(code, rt, role="module")
    except _rewrite.RewriteError as exc:
        log.warning("pydron: the top level of %s runs plainly: %s", code.co_filename, exc)
        exec(code, globals_, locals_)
        return
    try:
        _core._run_scheduled_module(rewritten, globals_, locals_)
    except BaseException:
        rt.flush_names_quietly()
        raise
    else:
        rt.flush_names()
    finally:
        _rewrite.forget(rt)
