"""Functions inside and around scheduled code: closures and nonlocal, default and keyword
arguments, *args/**kwargs to functional and scheduled callees, nested and recursive scheduled
functions, generators and lambdas defined inside, scheduled methods with super(), locals() and
sys._getframe(), a functional staticmethod, the thread executor."""

import functools
import sys

import pydron

from .registry import case
from .tasks import (Geometry, add, double, gather, identity, inc, scale, square, thread_square,
                    total)


@case([1, 2, 3])
@pydron.schedule
def closure_reads_result(xs):
    base = square(xs[0])

    def shifted(v):
        return add(v, base)

    return [shifted(x) for x in xs]


@case([1, 2, 3, 4])
@pydron.schedule
def nonlocal_accumulator(xs):
    acc = 0
    count = 0

    def push(v):
        nonlocal acc, count
        acc = add(acc, v)
        count += 1

    for x in xs:
        push(square(x))
    return acc, count


@case(5)
@pydron.schedule
def closure_cell_holds_pending(x):
    r = double(x)

    def later():
        return r + 1

    r = add(r, 1)
    return later(), r


@case(3)
@pydron.schedule
def default_and_keyword_arguments(x):
    a = scale(x)
    b = scale(x, 3)
    c = scale(x, factor=4)
    d = scale(x, offset=100)
    e = scale(factor=5, x=x, offset=1)
    return [a, b, c, d, e]


@case([1, 2, 3])
@pydron.schedule
def star_args_to_functional(xs):
    rs = [double(x) for x in xs]
    opts = {"sep": "-", "flag": inc(0)}
    return gather(*rs), gather(*rs, **opts), gather(0, *rs, last=rs[-1], **opts)


@pydron.schedule
def scheduled_callee(a, b=10, *rest, scale_by=1, **extra):
    s = add(a, b)
    for r in rest:
        s = add(s, r)
    return scale(s, scale_by), sorted(extra)


@case(2)
@pydron.schedule
def star_args_to_scheduled(x):
    parts = [double(x), square(x)]
    kws = {"scale_by": 3, "tag": "t"}
    return [
        scheduled_callee(x),
        scheduled_callee(x, 5),
        scheduled_callee(*parts),
        scheduled_callee(x, 1, *parts, **kws),
        scheduled_callee(b=inc(x), a=x, other=1),
    ]


@pydron.schedule
def inner_scheduled(xs):
    rs = [square(x) for x in xs]
    return rs, total(rs)


@case([1, 2, 3, 4])
@pydron.schedule
def nested_scheduled(xs):
    first, s1 = inner_scheduled(xs[:2])
    second, s2 = inner_scheduled(xs[2:])
    return first + second, add(s1, s2)


@case([1, 2, 3, 4])
@pydron.schedule
def nested_scheduled_results_flow_in(xs):
    rs = [double(x) for x in xs]
    inner, s = inner_scheduled(rs)
    return inner, s, rs


@pydron.schedule
def tree_sum(xs):
    if len(xs) == 1:
        return square(xs[0])
    mid = len(xs) // 2
    return add(tree_sum(xs[:mid]), tree_sum(xs[mid:]))


@case(list(range(1, 12)))
@pydron.schedule
def recursive_scheduled(xs):
    return tree_sum(xs), tree_sum(xs[:3])


@pydron.schedule
def fib_tasks(n):
    if n < 2:
        return identity(n)
    return add(fib_tasks(n - 1), fib_tasks(n - 2))


@case(8)
@pydron.schedule
def recursive_fib(n):
    return fib_tasks(n)


@case([1, 2, 3, 4])
@pydron.schedule
def generator_defined_inside(xs):
    def squares():
        for x in xs:
            yield square(x)

    def evens(values):
        for v in values:
            if v % 2 == 0:
                yield v

    return list(squares()), list(evens(squares())), sum(squares())


@case(4)
@pydron.schedule
def generator_send_and_return(n):
    def averager():
        count = 0
        s = 0
        while True:
            value = yield (s / count if count else None)
            if value is None:
                return s
            s = add(s, value)
            count += 1

    gen = averager()
    out = [next(gen)]
    for i in range(n):
        out.append(gen.send(double(i)))
    try:
        gen.send(None)
    except StopIteration as stop:
        out.append(stop.value)
    return out


@case([3, -1, 2, -5])
@pydron.schedule
def lambdas_inside(xs):
    rs = [double(x) for x in xs]
    f = lambda v: square(v)
    by_abs = sorted(rs, key=lambda r: abs(r))
    return list(map(f, xs)), by_abs, max(rs, key=lambda r: -r)


@case(4)
@pydron.schedule
def function_chosen_at_run_time(x):
    out = []
    for i in range(x):
        fn = square if i % 2 else double
        out.append(fn(i))
    other = len if x > 10 else (lambda v: v)
    out.append(other(inc(x)))
    return out


@case(3)
@pydron.schedule
def frame_introspection(x):
    r = square(x)
    frame = sys._getframe()
    names = sorted(locals())
    return frame.f_code.co_name, names, frame.f_lineno - frame_introspection.__code__.co_firstlineno, r


@pydron.schedule
def inner_reports_caller(x):
    r = square(x)
    return sys._getframe(1).f_code.co_name, r


@case(2, known_differences=dict.fromkeys(
    ("reference", "reference-threads"),
    "the reference runtime's dispatcher is Python: it is the nested call's caller"))
@pydron.schedule
def caller_frame_seen_by_nested(x):
    return inner_reports_caller(x)


@case(4)
@pydron.schedule
def locals_values_after_tasks(x):
    a = double(x)
    b = add(a, 1)
    snapshot = dict(locals())
    return {k: v for k, v in snapshot.items() if k in ("a", "b", "x")}


class Base:
    def __init__(self, factor):
        self.factor = factor

    def describe(self, values):
        return f"{type(self).__name__}x{self.factor}:{values}"


class Derived(Base):
    @pydron.schedule
    def process(self, xs):
        rs = [scale(x, self.factor) for x in xs]
        self.last = total(rs)
        return super().describe(rs), self.last

    @pydron.schedule
    def chained(self, xs):
        head, last = self.process(xs)
        return head, add(last, 1)


@case(Derived(3), [1, 2, 3], name="scheduled_method_with_super")
@pydron.schedule
def call_scheduled_method(obj, xs):
    return obj.process(xs), obj.last


@case(Derived(2), [4, 5])
@pydron.schedule
def call_scheduled_method_chain(obj, xs):
    return obj.chained(xs)


case(Derived(5), [1, 2], name="scheduled_method_called_directly")(Derived.process)


@case([(0, 0), (3, 4), (1, 1)])
@pydron.schedule
def functional_staticmethod(points):
    ds = [Geometry.dist2(x, y, 0, 0) for x, y in points]
    g = Geometry()
    return ds, g.dist2(1, 2, 3, 4)


@case([1, 2, 3, 4])
@pydron.schedule
def thread_executor(xs):
    rs = [thread_square(x) for x in xs]
    return rs, add(rs[0], thread_square(rs[1]))


@case(3)
@pydron.schedule
def call_undecorated_helper(x):
    def helper(v):
        return v * 100

    r = square(x)
    return helper(r), helper(x)


class Scaler:
    """A functional instance method: `self` travels with the task, as it was at the call."""

    def __init__(self, factor):
        self.factor = factor

    @pydron.functional
    def apply(self, x):
        return x * self.factor

    @classmethod
    @pydron.schedule
    def build_and_apply(cls, factor, xs):
        s = cls(factor)
        return [s.apply(x) for x in xs]


@case([1, 2, 3])
@pydron.schedule
def functional_bound_method(xs):
    s = Scaler(10)
    first = [s.apply(x) for x in xs]
    s.factor = 100                      # after the calls: they saw factor 10
    second = s.apply(xs[0])
    return first, second, Scaler.build_and_apply(3, xs)


def logged(fn):
    """A user decorator around a scheduled function."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        print("calling", fn.__name__)
        result = fn(*args, **kwargs)
        print("done", fn.__name__)
        return result
    return wrapper


@logged
@pydron.schedule
def wrapped_scheduled(xs):
    return [square(x) for x in xs]


@case([1, 2, 3], known_differences=dict.fromkeys(
    ("reference", "reference-threads"),
    "the reference runtime has no frame hook: a scheduled function reached through plain code "
    "(the decorator's wrapper) runs plainly, so no task is submitted"))
@pydron.schedule
def user_decorator_around_scheduled(xs):
    return wrapped_scheduled(xs), wrapped_scheduled(xs[:1]), wrapped_scheduled.__name__


@functools.lru_cache(maxsize=None)
def cached_plain(x):
    return x * 7


@case([1, 2, 1])
@pydron.schedule
def cached_plain_helper_on_results(xs):
    rs = [square(x) for x in xs]
    return [cached_plain(r) for r in rs], [cached_plain(x) for x in xs]
