"""Results moved into containers that plain code reaches by routes the call site does not show:
a list held in an object's attribute and read by the object's plain method, an instance
__dict__ filled through vars(), a class attribute, a closure cell of a plain callback, a module
global read by a plain function. Plain code must see values there, never a pending result: each
plain reader reports the type names it sees, compared with plain Python's."""

import pydron

from .registry import case
from .tasks import square

# The pure-Python reference runtime does not walk objects, globals and closures at plain calls
# yet (pydron/_reference.py is being brought in line with the C dispatcher): these routes are
# known differences there, strict, so the day it follows them the tests say so.
REFERENCE_LAGS = dict.fromkeys(
    ("reference", "reference-threads"),
    "the reference runtime forces only a plain callee's arguments' exact containers")


class Collector:
    """A scientist's own class: results appended to self.items, read by a plain method."""

    def __init__(self):
        self.items = []

    def report(self):
        return [type(v).__name__ for v in self.items], sum(self.items)


class Slotted:
    __slots__ = ("items",)

    def __init__(self):
        self.items = []


class Registry:
    cache = []                  # a class attribute, filled by scheduled code


def read_slots(s):
    return [type(v).__name__ for v in s.items]


def read_registry():
    out = [type(v).__name__ for v in Registry.cache]
    Registry.cache.clear()
    return out


RESULTS = []                    # a module global, filled by scheduled code


def summarize_results():
    out = [type(v).__name__ for v in RESULTS], sum(RESULTS)
    RESULTS.clear()
    return out


def attribute_types(obj):
    return sorted((k, type(v).__name__) for k, v in vars(obj).items())


@case([1, 2, 3], known_differences=REFERENCE_LAGS)
@pydron.schedule
def list_in_an_attribute_read_by_a_plain_method(xs):
    c = Collector()
    for x in xs:
        c.items.append(square(x))
    return c.report()


@case([1, 2, 3], known_differences=REFERENCE_LAGS)
@pydron.schedule
def list_in_slots_read_by_a_plain_function(xs):
    s = Slotted()
    for x in xs:
        s.items.append(square(x))
    return read_slots(s)


@case(4, known_differences=REFERENCE_LAGS)
@pydron.schedule
def instance_dict_through_vars(x):
    c = Collector()
    vars(c)["extra"] = square(x)
    c.__dict__["other"] = square(x + 1)
    return attribute_types(c)


@case([2, 5], known_differences=REFERENCE_LAGS)
@pydron.schedule
def class_attribute_read_plainly(xs):
    for x in xs:
        Registry.cache.append(square(x))
    return read_registry()


@case([3, 4], known_differences=REFERENCE_LAGS)
@pydron.schedule
def module_global_read_by_a_plain_function(xs):
    for x in xs:
        RESULTS.append(square(x))
    return summarize_results()


def make_reporter(acc):
    def report():
        return [type(v).__name__ for v in acc]
    return report


@case([1, 6], known_differences=REFERENCE_LAGS)
@pydron.schedule
def closure_cell_of_a_plain_callback(xs):
    acc = []
    report = make_reporter(acc)          # a plain closure over acc, made outside the trace
    for x in xs:
        acc.append(square(x))
    return report()


@case(3)
@pydron.schedule
def nested_objects_reached_through_an_argument(x):
    outer = Collector()
    inner = Collector()
    outer.items.append(inner)
    inner.items.append(square(x))
    return [type(v).__name__ for v in inner.items], attribute_types(outer)[0][0]
