"""Comprehensions and generator expressions over results: list/dict/set comprehensions, filters,
nested comprehensions, genexprs consumed by builtins."""

import pydron

from .registry import case
from .tasks import add, double, label, maybe_none, square, total


@case([1, 2, 3, 4, 5, 6])
@pydron.schedule
def listcomp_of_calls(xs):
    return [square(x) for x in xs]


@case([1, 2, 3, 4, 5, 6])
@pydron.schedule
def listcomp_filter_on_result(xs):
    rs = [square(x) for x in xs]
    return [r for r in rs if r % 2 == 0]


@case([3, 1, 2])
@pydron.schedule
def dictcomp_results_as_values(xs):
    return {x: double(x) for x in xs}


@case([1, 2, 3, 4, 5])
@pydron.schedule
def dictcomp_results_as_keys(xs):
    rs = [label(x % 3) for x in xs]
    return {r: i for i, r in enumerate(rs)}


@case([1, 2, 3, 4, 5, 6, 7])
@pydron.schedule
def setcomp_over_results(xs):
    rs = [square(x) for x in xs]
    return {r % 5 for r in rs}


@case([1, 2, 3, 4])
@pydron.schedule
def genexpr_into_sum(xs):
    return sum(square(x) for x in xs)


@case([1, 2, 3, 4, 5])
@pydron.schedule
def genexpr_filtered_over_results(xs):
    rs = [double(x) for x in xs]
    return tuple(r for r in rs if r > 4), any(r == 6 for r in rs), all(r > 0 for r in rs)


@case(3, 4)
@pydron.schedule
def nested_listcomp(n, m):
    return [[add(i, j) for j in range(m)] for i in range(n)]


@case([1, 2, 3, 4, 5, 6])
@pydron.schedule
def comprehension_condition_calls(xs):
    return [x for x in xs if square(x) > 10]


@case([1, 2, 3, 4])
@pydron.schedule
def comprehension_feeding_task(xs):
    return total([double(x) for x in xs])


@case([1, 2, 3, 4])
@pydron.schedule
def comprehension_with_walrus(xs):
    return [(x, y) for x in xs if (y := square(x)) % 2 == 1]


@case([0, 1, 2, 3, 4, 5])
@pydron.schedule
def comprehension_none_filter(xs):
    rs = [maybe_none(x) for x in xs]
    return [r for r in rs if r is not None], [r is None for r in rs]


@case(["a", "b"], [1, 2, 3])
@pydron.schedule
def comprehension_two_fors(keys, values):
    return {(k, v): label(v) for k in keys for v in values if v != 2}
