"""Probes of the call-site dispatch (not compared with plain Python, checked by test_semantics.py):
one scheduled function per kind of call site, each reporting whether the scheduled code waited
there for a task's result; and one per difference between the reference runtime and the C core
that pydron/_reference.py's docstring lists.

A probe submits `timed_sleep(0, seconds)`, puts the pending result where the call site under test
finds it, and notes the time right after that call site. It waited there if the task had ended by
then. Under the C core the task runs in a worker at once (so a probe that does not wait notes its
time well before the task ends); under the deferred reference runtime a task runs only when
forced (so it ends before the noted time only if the call site forced it)."""

import ctypes
import ctypes.util
import time

import pydron

from .cases_parallel import passthrough, timed_sleep
from .tasks import add, make_list, square


class Box:
    def __init__(self):
        self.items = []
        self.table = {}


@pydron.schedule
def probe_append(seconds):
    r = timed_sleep(0, seconds)
    lst = []
    lst.append(r)
    return time.monotonic(), r


@pydron.schedule
def probe_extend_with_list(seconds):
    r = timed_sleep(0, seconds)
    lst = [1]
    lst.extend([r, r])
    return time.monotonic(), r


@pydron.schedule
def probe_insert(seconds):
    r = timed_sleep(0, seconds)
    lst = [1, 2]
    lst.insert(square(1), r)
    return time.monotonic(), r


@pydron.schedule
def probe_store_into_list(seconds):
    r = timed_sleep(0, seconds)
    lst = [None]
    lst[0] = r
    return time.monotonic(), r


@pydron.schedule
def probe_store_into_dict(seconds):
    r = timed_sleep(0, seconds)
    d = {}
    d["k"] = r
    return time.monotonic(), r


@pydron.schedule
def probe_len(seconds):
    r = timed_sleep(0, seconds)
    n = len([r, r])
    return time.monotonic(), r, n


@pydron.schedule
def probe_functional_call(seconds):
    r = timed_sleep(0, seconds)
    both = add([r], [0])    # r is an argument of a second task: a dependency, not a wait
    return time.monotonic(), r, both


@pydron.schedule
def probe_scheduled_call(seconds):
    r = timed_sleep(0, seconds)
    back = passthrough(r)
    return time.monotonic(), back


@pydron.schedule
def probe_extend_with_pending(seconds):
    r = timed_sleep(0, seconds)
    lst = [r]
    lst.extend(make_list(2))
    return time.monotonic(), r


@pydron.schedule
def probe_list_pop(seconds):
    r = timed_sleep(0, seconds)
    lst = [r, 1]
    lst.pop()
    return time.monotonic(), r


@pydron.schedule
def probe_list_copy(seconds):
    r = timed_sleep(0, seconds)
    lst = [r]
    lst.copy()
    return time.monotonic(), r


@pydron.schedule
def probe_dict_get(seconds):
    r = timed_sleep(0, seconds)
    d = {"a": r, "b": 1}
    d.get("b")
    return time.monotonic(), r


@pydron.schedule
def probe_dict_setdefault(seconds):
    r = timed_sleep(0, seconds)
    d = {"a": r}
    d.setdefault("b", 2)
    return time.monotonic(), r


@pydron.schedule
def probe_store_into_module_dict(seconds):
    r = timed_sleep(0, seconds)
    globals()["_stored"] = r
    return time.monotonic(), r


@pydron.schedule
def probe_plain_callee(seconds):
    r = timed_sleep(0, seconds)
    str([r])
    return time.monotonic(), r


#: probe -> whether the scheduled code waits at its call site (in both runtimes)
PROBES = {
    probe_append: False, probe_extend_with_list: False, probe_insert: False,
    probe_store_into_list: False, probe_store_into_dict: False, probe_len: False,
    probe_functional_call: False, probe_scheduled_call: False,
    probe_extend_with_pending: True, probe_list_pop: True, probe_list_copy: True,
    probe_dict_get: True, probe_dict_setdefault: True, probe_store_into_module_dict: True,
    probe_plain_callee: True,
}


def waited(result) -> bool:
    """From a probe's result: had its task ended when the scheduled code passed the call site?"""
    passed, record = result[0], result[1]
    return passed >= record["end"]


def run_probes(seconds):
    """Plain code: every probe under whatever runtime is active -> {probe name: waited}."""
    return {probe.__name__: waited(probe(seconds)) for probe in PROBES}


# --- routes that were differences between the runtimes (closed), and the one that is -----------

@pydron.schedule
def class_body_cell(x):
    """A class body reads a result through a cell of the scheduled code."""
    y = square(x)

    class Seen:
        kind = type(y).__name__
    return Seen.kind


@pydron.schedule
def tuple_moved_into_object_list(x):
    """Pendings inside a tuple (and nested), moved into a list and a dict only an object
    reaches: append, extend, insert and c[k] = v."""
    box = Box()
    box.items.append((square(x),))
    box.table["k"] = (square(x + 1),)
    box.items.extend(((square(x + 2),), [{"a": (square(x + 3),)}]))
    box.items.insert(1, ((square(x + 4),),))
    return box


def moved_into_log(x):
    """Plain code after the scheduled call returned: the types it finds inside the object."""
    box = tuple_moved_into_object_list(x)
    kinds = {type(box.items[0][0]).__name__, type(box.items[1][0][0]).__name__,
             type(box.items[2][0]).__name__, type(box.items[3][0]["a"][0]).__name__}
    return "/".join(sorted(kinds)), type(box.table["k"][0]).__name__


@pydron.schedule
def deep_nesting(depth):
    """A result `depth` lists deep, handed to a non-functional callee (repr)."""
    inner = [square(4)]
    outer = inner
    for _ in range(depth):
        outer = [outer]
    return "16" in repr(outer)


_libm = ctypes.CDLL(ctypes.util.find_library("m"))
native_cos = _libm.cos
native_cos.argtypes = [ctypes.c_double]
native_cos.restype = ctypes.c_double
pydron.functional(native_cos, executor="threads")


@pydron.schedule
def native_functional(x):
    """The difference: a ctypes function pointer marked functional, called from scheduled code."""
    return [native_cos(x + k) for k in range(3)]


def submitted_by(function, *args):
    """Plain code: (result, tasks submitted) of a call, from pydron.stats()."""
    before = pydron.stats()["submitted"]
    result = function(*args)
    return result, pydron.stats()["submitted"] - before
