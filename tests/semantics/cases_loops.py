"""Loops: for and while (including conditions that read results), break/continue, early return,
dependency chains and tree reductions."""

import pydron

from .registry import case
from .tasks import add, double, inc, square, total


@case([1, 2, 3, 4, 5])
@pydron.schedule
def for_accumulate(xs):
    out = []
    for x in xs:
        out.append(double(x))
    return out


@case([3, 1, 4, 1, 5, 9])
@pydron.schedule
def for_running_sum(xs):
    acc = 0
    for x in xs:
        acc = add(acc, square(x))
    return acc


@case(4, 3)
@pydron.schedule
def nested_for(n, m):
    grid = []
    for i in range(n):
        row = []
        for j in range(m):
            row.append(add(i * 10, j))
        grid.append(row)
    return grid


@case(1, 100)
@pydron.schedule
def while_condition_reads_result(start, limit):
    value = start
    steps = 0
    while value < limit:
        value = double(value)
        steps += 1
    return value, steps


@case(7)
@pydron.schedule
def while_collatz(n):
    seen = [n]
    while n != 1:
        n = add(n // 2, 0) if n % 2 == 0 else inc(3 * n)
        seen.append(n)
    return seen


@case(5)
@pydron.schedule
def while_true_break(n):
    i = 0
    out = []
    while True:
        r = square(i)
        if r > n * n:
            break
        out.append(r)
        i += 1
    return out


@case(list(range(12)))
@pydron.schedule
def break_and_continue(xs):
    out = []
    for x in xs:
        r = square(x)
        if r % 3 == 0:
            continue
        if r > 60:
            break
        out.append(r)
    return out


@case([2, 4, 6, 8, 10], 36)
@pydron.schedule
def early_return_in_loop(xs, target):
    results = []
    for x in xs:
        r = square(x)
        results.append(r)
        if r == target:
            return x, results
    return None, results


@case([2, 4, 6], 1000)
@pydron.schedule
def early_return_not_taken(xs, target):
    for x in xs:
        if square(x) == target:
            return x
    return -1


@case([1, 2, 3], [10, 20, 30])
@pydron.schedule
def for_else(xs, ys):
    out = []
    for x, y in zip(xs, ys):
        out.append(add(x, y))
    else:
        out.append(total(out))
    return out


@case(6)
@pydron.schedule
def dependency_chain(n):
    x = 0
    chain = []
    for _ in range(n):
        x = inc(x)
        chain.append(x)
    return x, chain


@case(list(range(1, 14)))
@pydron.schedule
def tree_reduction(xs):
    level = [square(x) for x in xs]
    while len(level) > 1:
        nxt = [add(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


@case([5, 3, 8])
@pydron.schedule
def enumerate_and_range(xs):
    out = {}
    for i, x in enumerate(xs):
        out[i] = [add(i, k) for k in range(x % 4)]
    return out


@case([1, 2, 3, 4])
@pydron.schedule
def loop_over_results(xs):
    rs = [double(x) for x in xs]
    acc = []
    for r in rs:
        acc.append(r + 1)
    for i in range(len(rs)):
        acc.append(rs[i] * 10)
    return acc


@case(3)
@pydron.schedule
def loop_variable_after_loop(n):
    r = None
    for i in range(n):
        r = square(i)
    return i, r
