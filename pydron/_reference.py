"""Pure-Python reference runtime for rewritten scheduled code (the helpers named in
pydron/_rewrite/__init__.py).

The C core `pydron._core` provides the same helpers; this module is what it is tested against,
and what the rewriter is tested with. Functional calls become tasks (run deferred, or on a
thread pool), whose results are `Pending` objects until forced.

At a call site it moves what the C dispatcher (trace/dispatch.c, trace/force.c) moves, and
forces what it forces:
  moved   functional calls (a pending argument is a dependency), scheduled calls (pendings flow
          in and out), list.append/extend/insert on an exact list, c[k] = v into an exact list or
          an exact dict that is not a module's namespace, len() (only its argument is forced,
          shallow), a pending callable (forced, then dispatched as its value);
  forced  everything else: the arguments of any other callee deep (exact lists, tuples and dicts,
          in place), and the exact list, dict or tuple a builtin method is bound to (list.pop,
          list.copy, dict.get, dict.setdefault, ... read their container); list.extend(pending)
          reads its argument, so it is forced like any other call, list included; the index of
          insert() and the key of c[k] = v deep, the container of c[k] = v shallow.
tests/test_semantics.py::test_reference_moves_what_the_dispatcher_moves checks each of these in
both runtimes.

The one difference from the C core, shown by tests/test_semantics.py::test_reference_difference:
  native_functional: a ctypes function pointer marked functional(executor="threads") is a
     thread task in the C core; `pydron.functional` leaves no mark on it that this runtime can
     read, so here it is called plainly, its arguments forced.
"""

from __future__ import annotations

import builtins
import copy
import ctypes
import types
import warnings
from concurrent.futures import ThreadPoolExecutor

from . import _rewrite

__all__ = ["ReferenceRuntime", "Pending"]

_BuiltinMethod = type([].append)
_TUPLE_ITEMS = tuple.__basicsize__
_PTR = ctypes.sizeof(ctypes.c_void_p)

# The methods of exact lists that move values instead of reading them (trace/dispatch.c).
_LIST_MOVES = frozenset({"append", "extend", "insert"})
_NOT_A_MOVE = object()
_IMMUTABLE = frozenset({int, float, complex, str, bytes, bool, type(None), range, frozenset})


class Pending:
    """The result of a functional call that has not been forced yet."""

    __slots__ = ("seq", "fn", "args", "kwargs", "future", "state", "value", "exc", "tb",
                 "reported", "undone", "prev")

    def __init__(self, seq, fn, args, kwargs):
        self.seq, self.fn, self.args, self.kwargs = seq, fn, args, kwargs
        self.future = None
        self.state = 0  # 0 outstanding, 1 value, 2 failed
        self.value = self.exc = self.tb = None
        self.reported = False
        self.undone = False  # a call plain Python never completed (its region was aborted)
        self.prev = None  # local name -> the value that local held before this was stored

    def __repr__(self):
        return "<pydron Pending #%d %s>" % (self.seq, getattr(self.fn, "__qualname__", self.fn))


def _default_kind(kind):
    def predicate(obj):
        try:
            return getattr(obj, "__pydron_kind__", None) == kind
        except Exception:
            return False
    return predicate


def _set_tuple_item(t, i, value):
    """Replace item i of tuple t in place (the pending it held is released)."""
    addr = id(t) + _TUPLE_ITEMS + i * _PTR
    slot = ctypes.c_void_p.from_address(addr)
    old = t[i]
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(value))
    slot.value = id(value)
    ctypes.pythonapi.Py_DecRef(ctypes.py_object(old))


class ReferenceRuntime:
    """Helpers for rewritten code (call, call_ex, force, force_deep, store_subscr, mark,
    force_since, force_before, handler_guard, enter_handler, log_store, undo) and
    `run(fn, *args, **kwargs)` for a scheduled function. `threads=0` runs each task when it
    is first needed; `threads=n` runs tasks on a pool of n threads as soon as submitted."""

    def __init__(self, is_functional=None, is_scheduled=None, threads=0):
        self.is_functional = is_functional or _default_kind("functional")
        self.is_scheduled = is_scheduled or _default_kind("scheduled")
        self._executor = ThreadPoolExecutor(threads) if threads else None
        self._tasks = []
        self._resolved_upto = 0  # every task before this index is resolved and reported
        self._functions = {}
        self._moved = []  # containers a pending was moved into by a helper
        self._raised = {}  # id(exception) -> (exception, seq of the first task that raised it)
        self._horizon = {}  # id(exception) -> (exception, submission count when first handled)
        #: number of outstanding tasks each time a pending is forced for the first time
        self.outstanding_at_force = []
        self.submitted = 0

    # -- tasks ------------------------------------------------------------------------
    @classmethod
    def _snapshot(cls, v):
        """A task sees its arguments as they were at the call: copy exact containers (the
        pendings inside stay, they are filled in when the task runs)."""
        t = type(v)
        if t is list:
            return [cls._snapshot(x) for x in v]
        if t is tuple:
            return tuple(cls._snapshot(x) for x in v)
        if t is dict:
            return {k: cls._snapshot(x) for k, x in v.items()}
        if t is Pending or t in _IMMUTABLE:
            return v
        # other objects too, as the C core pickles arguments at the call
        try:
            return copy.deepcopy(v)
        except Exception:  # noqa: BLE001 - what cannot be copied is passed as it is
            return v

    def _submit(self, fn, args, kwargs):
        args = [self._snapshot(a) for a in args]
        kwargs = {k: self._snapshot(a) for k, a in kwargs.items()}
        p = Pending(len(self._tasks), fn, args, kwargs)
        self._tasks.append(p)
        self.submitted += 1
        if self._executor is not None:
            p.future = self._executor.submit(self._execute, p)
        return p

    @classmethod
    def _task_value(cls, v):
        """A task argument with its dependencies' values in place of pendings (copied, so
        that a worker never writes into the scheduled code's containers)."""
        t = type(v)
        if t is Pending:
            if v.state == 0:
                if v.future is not None:
                    v.future.result()
                else:
                    cls._execute(v)
            if v.state == 2:
                raise v.exc.with_traceback(v.tb)
            return v.value
        if t is list:
            return [cls._task_value(x) for x in v]
        if t is tuple:
            return tuple(cls._task_value(x) for x in v)
        if t is dict:
            return {k: cls._task_value(x) for k, x in v.items()}
        return v

    @classmethod
    def _execute(cls, p):
        try:
            args = [cls._task_value(a) for a in p.args]
            kwargs = {k: cls._task_value(a) for k, a in p.kwargs.items()}
            p.value = p.fn(*args, **kwargs)
            p.state = 1
        except BaseException as e:  # noqa: BLE001 - re-raised in the scheduled frame
            p.exc, p.tb, p.state = e, e.__traceback__, 2
        p.fn = p.args = p.kwargs = None

    def _outstanding(self):
        return sum(1 for t in self._tasks[self._resolved_upto:] if t.state == 0)

    def _resolve(self, p):
        if p.state == 0:
            self.outstanding_at_force.append(self._outstanding())
            if p.future is not None:
                p.future.result()
            else:
                self._execute(p)
        return p

    def _failed_task_seq(self, exc):
        """Submission index of the task whose failure `exc` is, else the current mark."""
        raised = self._raised.get(id(exc))
        if raised is not None and raised[0] is exc:
            return raised[1]
        return self.mark()

    def _raise(self, p):
        p.reported = True
        self._raised.setdefault(id(p.exc), (p.exc, p.seq))
        raise p.exc.with_traceback(p.tb)

    # -- helpers called by rewritten code ------------------------------------------------
    def force(self, x):
        if type(x) is not Pending:
            return x
        p = self._resolve(x)
        if p.state == 2:
            self.force_before(p.seq)  # an earlier failure is the one plain Python raises
            self._raise(p)
        return p.value

    def force_deep(self, x):
        x = self.force(x)
        t = type(x)
        if t is list or t is tuple or t is dict:
            self._force_inside(x, set())
        return x

    def _force_inside(self, c, seen):
        if id(c) in seen:
            return
        seen.add(id(c))
        t = type(c)
        if t is list:
            for i, v in enumerate(c):
                if type(v) is Pending:
                    v = c[i] = self.force(v)
                if type(v) in (list, tuple, dict):
                    self._force_inside(v, seen)
        elif t is tuple:
            for i, v in enumerate(c):
                if type(v) is Pending:
                    nv = self.force(v)
                    _set_tuple_item(c, i, nv)
                    v = nv
                if type(v) in (list, tuple, dict):
                    self._force_inside(v, seen)
        elif t is dict:
            for k, v in c.items():
                if type(v) is Pending:
                    v = self.force(v)
                    c[k] = v
                if type(v) in (list, tuple, dict):
                    self._force_inside(v, seen)

    def mark(self):
        return len(self._tasks)

    def force_since(self, mark):
        tasks = self._tasks
        for k in range(max(mark, self._resolved_upto), len(tasks)):
            p = self._resolve(tasks[k])
            if p.state == 2 and not p.reported:
                self.force_before(p.seq)
                self._raise(p)

    def force_before(self, mark):
        tasks = self._tasks
        k = self._resolved_upto
        while k < mark and k < len(tasks):
            p = self._resolve(tasks[k])
            k += 1
            if p.state == 2 and not p.reported:
                self._resolved_upto = k
                self._raise(p)
        if k > self._resolved_upto:
            self._resolved_upto = k

    def _note_move(self, container):
        moved = self._moved
        if not moved or moved[-1] is not container:
            moved.append(container)

    def _undo_moves(self, cut, horizon):
        """Take back the pendings of tasks from `cut` on out of the containers they were moved
        into: plain Python never made those calls, so never stored their results."""
        def undone(v):
            return type(v) is Pending and cut <= v.seq < horizon
        seen = set()
        for c in self._moved:
            if id(c) in seen:
                continue
            seen.add(id(c))
            if type(c) is list:
                if any(undone(v) for v in c):
                    c[:] = [v for v in c if not undone(v)]
            elif type(c) is dict:
                for k in [k for k, v in c.items() if undone(v)]:
                    del c[k]

    def handler_guard(self, exc, mark):
        """At a handler's entry, for each enclosing region (outermost first) in the context
        of its try statement: a failure of a task submitted before `mark` belongs there."""
        raised = self._raised.get(id(exc))
        if raised is not None and raised[0] is exc and raised[1] < mark:
            raise exc.with_traceback(self._tasks[raised[1]].tb)
        self.force_before(mark)

    def enter_handler(self, exc, mark):
        """At the entry of the handler of a try/with region entered at `mark`, reached with
        `exc`: the region stopped at its first failure, so return the failure of the first
        task since `mark` that failed before `exc` was raised (or `exc`), and cancel the
        tasks submitted after that point (plain Python never ran them)."""
        tasks = self._tasks
        # the calls made before the exception first reached a handler are the ones plain
        # Python may not have made; handlers and finally blocks on its way made theirs
        seen = self._horizon.get(id(exc))
        horizon = seen[1] if seen is not None and seen[0] is exc else len(tasks)
        cut = horizon
        raised = self._raised.get(id(exc))
        if raised is not None and raised[0] is exc:
            k = raised[1]
            if k < mark:  # failed before the region began: not this handler's business
                raise exc.with_traceback(tasks[k].tb)
            cut = min(k, horizon)
        result = exc
        for k in range(max(mark, self._resolved_upto), cut):
            p = self._resolve(tasks[k])
            if p.state == 2 and not p.reported:
                p.reported = True
                self._raised.setdefault(id(p.exc), (p.exc, p.seq))
                result = p.exc.with_traceback(p.tb)
                cut = k
                break
        for k in range(cut + 1, horizon):
            tasks[k].reported = True  # cancelled: a failure of theirs is never raised
        for k in range(cut, horizon):
            tasks[k].undone = True
        self._undo_moves(cut, horizon)
        self._horizon[id(exc)] = (exc, horizon)
        self._horizon[id(result)] = (result, horizon)
        return result

    def log_store(self, new, old, name):
        if type(new) is Pending:
            if new.prev is None:
                new.prev = {}
            new.prev[name] = old
        return new

    def undo(self, current, saved, name):
        """At a handler: a local assigned in the aborted region gets back the value it held
        before the calls plain Python never completed (following log_store's record, else
        `saved`, its value at the region's entry); a container built there that directly
        holds such a call gives way to `saved` too."""
        while type(current) is Pending and current.undone:
            prev = current.prev
            if prev is None or name not in prev:
                return saved
            current = prev[name]
        t = type(current)
        if t is Pending:
            return current
        if (t is list or t is tuple) and current is not saved:
            if any(type(v) is Pending and v.undone for v in current):
                return saved
        elif t is dict and current is not saved:
            if any(type(v) is Pending and v.undone for v in current.values()):
                return saved
        return current

    def store_subscr(self, value, container, key):
        key = self.force_deep(key)
        container = self.force(container)
        t = type(container)
        if t is list or (t is dict and "__builtins__" not in container):
            container[key] = value
            self._note_move(container)
        else:
            container[key] = self.force_deep(value)

    def call(self, fn, args, kwnames):
        if kwnames:
            npos = len(args) - len(kwnames)
            kwargs = dict(zip(kwnames, args[npos:]))
            args = args[:npos]
        else:
            kwargs = {}
        return self._dispatch(self.force(fn), args, kwargs)

    def call_ex(self, fn, args, kwargs):
        args = tuple(self.force(args))
        kwargs = dict(self.force(kwargs)) if kwargs is not None else {}
        return self._dispatch(self.force(fn), args, kwargs)

    def _dispatch(self, fn, args, kwargs):
        if self.is_functional(fn):
            if isinstance(fn, types.MethodType):
                # the bound instance is an argument too: snapshot it at call time
                args = (fn.__self__,) + tuple(args)
                fn = fn.__func__
            return self._submit(fn, args, kwargs)
        if self.is_scheduled(fn):
            if isinstance(fn, types.MethodType):
                args = (fn.__self__,) + tuple(args)
                fn = fn.__func__
            if isinstance(fn, types.FunctionType) and _rewrite.is_rewritable(fn.__code__)[0]:
                f = self._rewritten(fn)
                if f is not fn:
                    return f(*args, **kwargs)
        if fn is builtins.__build_class__ and args and isinstance(args[0], types.FunctionType):
            # a class body (not rewritten) reads the scheduled code's cells as they are
            for cell in args[0].__closure__ or ():
                try:
                    v = cell.cell_contents
                except ValueError:
                    continue
                if type(v) in (Pending, list, tuple, dict):
                    cell.cell_contents = self.force_deep(v)
        if type(fn) is _BuiltinMethod:
            owner = fn.__self__
            if type(owner) is list and fn.__name__ in _LIST_MOVES and not kwargs:
                moved = self._list_move(fn, owner, args)
                if moved is not _NOT_A_MOVE:
                    return moved
            if fn is len and len(args) == 1 and not kwargs:
                # only the container is read: the pendings inside stay where they are
                return len(self.force(args[0]))
            if owner is not None and not isinstance(owner, types.ModuleType):
                self.force_deep(owner)   # a builtin method reads its list, dict or tuple
        args = [self.force_deep(a) for a in args]
        for k in kwargs:
            kwargs[k] = self.force_deep(kwargs[k])
        return fn(*args, **kwargs)

    def _list_move(self, method, owner, args):
        """list.append/extend/insert as the C dispatcher runs them: the value is moved into the
        list, not read; _NOT_A_MOVE when the call must be forced like any other."""
        name = method.__name__
        if name == "insert":
            if len(args) != 2:
                return _NOT_A_MOVE
            args = [self.force_deep(args[0]), args[1]]
        elif name == "extend" and len(args) == 1 and type(args[0]) is Pending:
            return _NOT_A_MOVE   # extend() iterates its argument: a read
        self._note_move(owner)
        return method(*args)

    # -- running a scheduled function ------------------------------------------------------
    def _rewritten(self, fn):
        """fn with rewritten code; fn itself if the rewriter refused it (it then runs plainly,
        its arguments forced like any other callee's)."""
        f = self._functions.get(fn)
        if f is None:
            try:
                code = _rewrite.rewrite(fn.__code__, self)
            except _rewrite.RewriteError as e:
                warnings.warn("pydron: %s runs plainly: %s" % (fn.__qualname__, e),
                              RuntimeWarning, stacklevel=2)
                self._functions[fn] = fn
                return fn
            f = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__,
                                   fn.__closure__)
            f.__kwdefaults__ = fn.__kwdefaults__
            f.__qualname__ = fn.__qualname__
            f.__dict__.update(fn.__dict__)
            self._functions[fn] = f
        return f

    def run(self, fn, *args, **kwargs):
        """Call scheduled `fn` through its rewritten code; on return force every outstanding
        task in submission order (the first failure is raised), deep-force the result."""
        if isinstance(fn, types.MethodType):
            args = (fn.__self__,) + args
            fn = fn.__func__
        ok, _ = _rewrite.is_rewritable(getattr(fn, "__code__", None))
        if not ok:
            return fn(*args, **kwargs)
        start, moved = self.mark(), len(self._moved)
        try:
            try:
                result = self._rewritten(fn)(*args, **kwargs)
            except BaseException as e:
                # plain Python would have raised an earlier task's failure before this one
                self.force_before(self._failed_task_seq(e))
                raise
            self.force_since(start)
            self.force_before(self.mark())
            # pendings moved into containers reachable from objects (box.items.append(f(x)))
            # get their values too: no pending outlives the run
            for c in self._moved[moved:]:
                self.force_deep(c)
            return self.force_deep(result)
        finally:
            del self._moved[moved:]
            # tasks left over by a run that raised are abandoned: never raised by a later run
            for p in self._tasks[start:]:
                p.reported = True
            self._resolved_upto = max(self._resolved_upto, len(self._tasks))

    def close(self):
        if self._executor is not None:
            self._executor.shutdown()
        _rewrite.forget(self)
        self._functions.clear()
