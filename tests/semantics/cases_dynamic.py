"""Functions made at run time: functional closures and lambdas defined inside a scheduled function
(shipped to workers by value), a scheduled function defined inside another, closures returned by
tasks and called by the master, scheduled calls with keyword arguments, empty and large fan-outs."""

import pydron

from .registry import case
from .tasks import add, double, identity, inc, make_adder, square, to_bytes, total


@case([1, 2, 3], 10)
@pydron.schedule
def functional_closure_defined_inside(xs, k):
    @pydron.functional
    def scaled(v):
        return v * k

    return [scaled(x) for x in xs], scaled(square(2))


@case([1, 2, 3])
@pydron.schedule
def functional_lambda_defined_inside(xs):
    shift = pydron.functional(lambda v, by=100: v + by)
    return [shift(x) for x in xs], shift(double(1), by=1)


@case([1, 2, 3, 4])
@pydron.schedule
def scheduled_defined_inside(xs):
    @pydron.schedule
    def half_sums(part):
        return total([square(p) for p in part])

    return add(half_sums(xs[:2]), half_sums(xs[2:]))


@case(3, 4)
@pydron.schedule
def closure_returned_by_task(n, v):
    adder = make_adder(n)
    adders = [make_adder(i) for i in range(3)]
    return adder(v), [f(v) for f in adders], adder(double(v))


@case(kwargs={"xs": [1, 2, 3], "factor": 3, "offset": 1})
@pydron.schedule
def called_with_keywords(xs, factor=2, **kwargs):
    return [add(double(x) * factor, kwargs["offset"]) for x in xs]


@case(5, submits_tasks=False)
@pydron.schedule
def no_tasks_at_all(n):
    out = [i * i for i in range(n)]
    print("plain work only", out)
    return out


@case(200)
@pydron.schedule
def large_fan_out(n):
    rs = [inc(i) for i in range(n)]
    return sum(rs), rs[::50]


@case(150)
@pydron.schedule
def long_dependency_chain(n):
    x = 0
    for _ in range(n):
        x = inc(x)
    return x


@case([7, 300, 2 ** 40])
@pydron.schedule
def bytes_and_big_ints(xs):
    bs = [to_bytes(x % (2 ** 32)) for x in xs]
    big = identity(2 ** 100 + 1)
    return b"".join(bs), big * 3, [len(b) for b in bs], int.from_bytes(bs[1], "little")


@case([1, 2, 3, 4])
@pydron.schedule
def augmented_assignment_on_results(xs):
    acc = 0
    text = ""
    items = []
    for x in xs:
        acc += square(x)
        text += str(double(x))
        items += [inc(x)]
    acc -= identity(1)
    acc *= 2
    return acc, text, items


@case([10, 20, 30, 40, 50])
@pydron.schedule
def results_as_indices_and_bounds(values):
    i = identity(1)
    j = add(i, 2)
    n = inc(2)
    return values[i], values[i:j], [values[k] for k in range(n)], list(range(j)), values[-i]


@case([(1, 2), (3, 4), (5, 6)])
@pydron.schedule
def star_over_results(pairs):
    rs = [(double(a), square(b)) for a, b in pairs]
    firsts, seconds = zip(*rs)
    return list(firsts), list(seconds), max(*[r[1] for r in rs]), dict(rs)
