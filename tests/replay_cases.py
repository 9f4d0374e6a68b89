"""Functional and scheduled functions that both the replay tests (test_replay.py) and the tests of
its compiled tier (test_jit.py) run: each module compares them with plain Python (or the trace),
and forgets their graphs before it replays them."""

import time

import pydron


@pydron.functional
def inc(x):
    return x + 1


@pydron.functional
def slow_square(x):
    time.sleep(0.02)
    return x * x


@pydron.functional
def fails_on(x, bad):
    if x in bad:
        raise ValueError(f"bad element {x}")
    return x


@pydron.schedule
def branch_on_results(xs):
    out = []
    for x in xs:
        r = slow_square(x)
        if r > 10:
            out.append(inc(r))
        else:
            out.append(-1)
    return out


@pydron.schedule
def divides(xs, d):
    out = []
    for x in xs:
        out.append(inc(x) // d)
    return out


side_effects = []


def plain_helper(x):
    """Not functional: a scheduled function calling it must leave the call to the trace."""
    side_effects.append(x)
    return x


@pydron.schedule
def calls_plain_helper(x):
    r = inc(x)
    return plain_helper(r)


@pydron.schedule
def inner(x):
    return inc(x) * 2


@pydron.schedule
def loop_and_branch(xs, k):
    out = []
    for x in xs:
        if x % 2:
            out.append(inc(x) + k)
        else:
            out.append(x * k)
    total = 0
    for r in out:
        total += r
    return total, out
