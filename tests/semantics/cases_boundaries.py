"""Where scheduled code meets plain code: generators and closures made by a scheduled function and
used after it returned, plain functions between scheduled ones (scheduled -> plain -> scheduled),
scheduled functions called repeatedly from plain loops, callbacks into plain code. The entry point
of some cases is itself plain: it is what a user's script does."""

import functools

import pydron

from .registry import case
from .tasks import add, double, inc, square, total


@pydron.schedule
def make_generator(xs):
    def squares():
        for x in xs:
            yield square(x)
    return squares()


@case([1, 2, 3])
def generator_escapes_scheduled_call(xs):
    gen = make_generator(xs)
    first = next(gen)
    return first, list(gen)


@pydron.schedule
def make_closure(x):
    r = double(x)

    def later(v):
        return add(r, v)
    return later


@case(5)
def closure_escapes_scheduled_call(x):
    fn = make_closure(x)
    return fn(1), fn(10)


def plain_middle(values):
    """Undecorated: called from scheduled code, calls scheduled code."""
    doubled = [v * 2 for v in values]
    return inner_total(doubled), len(doubled)


@pydron.schedule
def inner_total(values):
    return total([square(v) for v in values])


@case([1, 2, 3])
@pydron.schedule
def scheduled_plain_scheduled(xs):
    rs = [inc(x) for x in xs]
    return plain_middle(rs), plain_middle(xs)


@case(20)
def scheduled_called_in_plain_loop(n):
    out = []
    for i in range(n):
        out.append(inner_total([i, i + 1]))
    return out


@case([3, 1, 2])
@pydron.schedule
def results_to_plain_callbacks(xs):
    rs = [square(x) for x in xs]
    keyed = sorted(rs, key=functools.cmp_to_key(lambda a, b: b - a))
    mapped = list(map(lambda r: r + 1, rs))
    reduced = functools.reduce(lambda acc, r: acc + r, rs, 0)
    return keyed, mapped, reduced, functools.partial(add, 1)(rs[0])


@case([1, 2])
@pydron.schedule
def partial_of_functional(xs):
    add_ten = functools.partial(add, 10)
    return [add_ten(x) for x in xs], [double(add_ten(x)) for x in xs]


@case([1, 2, 3, 4])
@pydron.schedule
def results_used_from_other_threads(xs):
    import threading
    from concurrent.futures import ThreadPoolExecutor
    rs = [square(x) for x in xs]
    seen = []
    t = threading.Thread(target=lambda: seen.append(sum(rs)))
    t.start()
    t.join()
    more = [double(x) for x in xs]
    with ThreadPoolExecutor(2) as ex:
        bumped = list(ex.map(lambda r: r + 1, more))
        summed = ex.submit(lambda: sum(more) + rs[0]).result()
    return seen, bumped, summed, rs
