"""Functional helpers shared by the semantics cases: small side-effect-free functions whose calls
become tasks under pydron. Exceptions and classes they use are defined here so that workers and
the master agree on them."""

from __future__ import annotations

import dataclasses

import pydron


class TaskError(Exception):
    """A user-defined exception raised inside tasks."""


class SubTaskError(TaskError):
    """A subclass, to check that handlers for the parent class catch it."""


class OtherError(Exception):
    """Unrelated to TaskError: a handler for it must not catch a TaskError."""


@dataclasses.dataclass
class Point:
    x: float
    y: float

    def norm2(self) -> float:
        return self.x * self.x + self.y * self.y


class Box:
    """A plain class (no __eq__): compared by type and attributes."""

    def __init__(self, label, items):
        self.label = label
        self.items = items

    def __repr__(self):
        return f"Box({self.label!r}, {self.items!r})"


@pydron.functional
def inc(x):
    return x + 1


@pydron.functional
def double(x):
    return 2 * x


@pydron.functional
def square(x):
    return x * x


@pydron.functional
def add(a, b):
    return a + b


@pydron.functional
def mul(a, b):
    return a * b


@pydron.functional
def identity(x):
    return x


@pydron.functional
def nothing(x):
    """Returns None, for `r is None` checks."""
    return None


@pydron.functional
def maybe_none(x):
    return None if x % 2 else x


@pydron.functional
def total(values):
    """Takes a container that may hold results of other tasks."""
    return sum(values)


@pydron.functional
def pair(a, b):
    return (a, b)


@pydron.functional
def make_list(n):
    return list(range(n))


@pydron.functional
def make_dict(k, v):
    return {k: v, "n": v * 2}


@pydron.functional
def label(x):
    return f"item-{x}"


@pydron.functional
def halve(x):
    return x / 2


@pydron.functional
def split_words(text):
    return text.split()


@pydron.functional
def make_point(x, y):
    return Point(x, y)


@pydron.functional
def make_box(label, items):
    return Box(label, list(items))


@pydron.functional
def fail(x, message="task failed"):
    raise TaskError(f"{message}: {x}")


@pydron.functional
def fail_sub(x):
    raise SubTaskError(f"sub failure {x}")


@pydron.functional
def fail_if(x, bad):
    if x == bad:
        raise TaskError(f"bad value {x}")
    return x * 10


@pydron.functional
def fail_key(key):
    return {"a": 1}[key]


@pydron.functional
def divide(a, b):
    return a / b


@pydron.functional
def scale(x, factor=2, *, offset=0):
    return x * factor + offset


@pydron.functional
def gather(*args, **kwargs):
    return (args, sorted(kwargs.items()))


@pydron.functional
def qr(a, b):
    return divmod(a, b)


@pydron.functional(executor="threads")
def thread_square(x):
    return x * x


class Geometry:
    """A functional staticmethod, called as Geometry.dist2(...) from scheduled code."""

    @staticmethod
    @pydron.functional
    def dist2(ax, ay, bx, by):
        return (ax - bx) ** 2 + (ay - by) ** 2


@pydron.functional
def slow_fail(x, seconds):
    import time
    time.sleep(seconds)
    raise TaskError(f"slow failure {x}")


@pydron.functional
def make_adder(n):
    """Returns a closure: shipped back by value."""
    def adder(v):
        return v + n
    return adder


@pydron.functional
def to_bytes(x):
    return x.to_bytes(4, "little")


class RichError(Exception):
    """An exception whose __init__ does not take its message: plain pickling cannot rebuild it
    from args alone."""

    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@pydron.functional
def fail_rich(code):
    err = RichError(code, "rich detail")
    err.add_note("a note added in the task")
    raise err


@pydron.functional
def fail_with_cause(x):
    try:
        {}["missing"]
    except KeyError as inner:
        raise TaskError(f"outer {x}") from inner


@pydron.functional
def make_tracked(name):
    from .cases_exceptions import Tracked
    return Tracked(name)


@pydron.functional
def pick_function(name):
    return {"double": double, "square": square}[name]


@pydron.functional
def task_exits(code):
    raise SystemExit(code)


@pydron.functional
def task_interrupts(x):
    raise KeyboardInterrupt(f"interrupt {x}")


# --- for cases_constructs.py and cases_regions.py ---------------------------------------------------

@pydron.functional
def fail_on_3(x):
    """Fails for 3 only, with a builtin exception class."""
    if x == 3:
        raise ValueError("bad %r" % (x,))
    return x


@pydron.functional
def raise_key(message="boom"):
    raise KeyError(message)


@pydron.functional
def succ_pair(x):
    return (x, x + 1)


@pydron.functional
def triple(a, b=2, *, c=3):
    return (a, b, c)


@pydron.functional
def xy_dict(x):
    return {"x": x, "y": [x, x]}
