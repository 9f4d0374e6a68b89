"""Pending results in operand positions that need their value: as *args/**kwargs iterables, as a
callable, as a context manager, as a format spec, as the right side of % and |=, in augmented
assignments to subscripts and attributes, iterated directly; and exceptions that are hard to
send back (custom __init__, notes, __cause__)."""

import types

import pydron

from .registry import case
from .tasks import (RichError, TaskError, add, double, fail_rich, fail_with_cause, gather,
                    identity, label, make_dict, make_list, make_tracked, pair, pick_function,
                    square)


@case(3)
@pydron.schedule
def pending_as_star_arguments(x):
    p = pair(x, x + 1)
    d = make_dict("k", x)
    return add(*p), gather(*p, **d), gather(*make_list(x), **make_dict("z", 1)), max(*p)


@case(4)
@pydron.schedule
def pending_as_callable(x):
    fn = pick_function("square")
    other = pick_function("double")
    return fn(x), other(fn(x)), [pick_function(n)(x) for n in ("double", "square")]


@case(2)
@pydron.schedule
def pending_as_context_manager(x):
    with make_tracked(label(x)) as t:
        r = square(x)
    return t.name, r


@case(7)
@pydron.schedule
def pending_as_format_spec_and_percent_operand(x):
    width = add(x, 3)
    precision = identity(2)
    value = square(x)
    return (f"[{value:>{width}}]", f"{value / 3:.{precision}f}", "%s-%s" % pair(x, value),
            "%(k)s/%(n)s" % make_dict("k", x), "{:{}}".format(value, width))


@case(3)
@pydron.schedule
def augmented_assignment_targets(x):
    d = {"k": 1}
    d["k"] += square(x)
    lst = [10, 20]
    lst[0] += double(x)
    lst[-1] -= identity(1)
    ns = types.SimpleNamespace(count=0)
    ns.count += square(x)
    merged = {"a": 1}
    merged |= make_dict("b", x)
    s = {1}
    s |= {double(x)}
    return d, lst, ns, merged, s


@case(4)
@pydron.schedule
def iterate_pending_directly(n):
    out = []
    for v in make_list(n):
        out.append(v * 10)
    a, b, *rest = make_list(n)
    total_ = 0
    for k, v in make_dict("key", n).items():
        total_ += v
    return out, a, b, rest, total_, [c for c in label(n)]


@case(5)
@pydron.schedule
def exception_with_custom_init_and_notes(x):
    try:
        fail_rich(x)
    except RichError as e:
        return type(e).__name__, str(e), e.code, e.detail, e.args, getattr(e, "__notes__", None)
    return None


@case(6)
@pydron.schedule
def exception_cause_preserved(x):
    try:
        return fail_with_cause(x)
    except TaskError as e:
        cause = e.__cause__
        return str(e), type(cause).__name__, str(cause), e.__suppress_context__


@case(5, raises=RichError)
@pydron.schedule
def custom_exception_propagates(x):
    r = fail_rich(x)
    return r


@pydron.schedule
def deep(n):
    if n == 0:
        return identity(0)
    return add(deep(n - 1), 1)


@case(200)
@pydron.schedule
def deep_scheduled_recursion(n):
    return deep(n)


@case(1, 2, kwargs={"c": 3})
@pydron.schedule
def positional_and_keyword_only(a, /, b, *, c):
    def inner(p, /, q=10, *, r):
        return add(p, q), r
    return inner(a, r=double(c)), add(b, c)
