"""Calls of any size cross: a task depending on thousands to a million results, and results or
arguments made of thousands of out-of-band buffers (records larger than a ring travel through
the arena). Each compared with plain Python's run of the same code."""

import numpy as np
import pytest

import pydron

from helpers import module_pool

pytestmark = pytest.mark.nosan      # big: run without the sanitizer's overhead

# The traced path's records are what this file measures: a replayed call would send a
# comprehension of tasks as a few chunks (tests/test_replay.py covers that).
pool, _ = module_pool(workers=2, replay="off")


@pydron.functional
def inc(x):
    return x + 1


@pydron.functional
def total(xs):
    return sum(xs)


@pydron.functional
def nested_total(tree):
    return sum(tree["left"]) + sum(x for pair in tree["right"] for x in pair)


@pydron.functional
def arrays(n):
    return [np.full(8192, i, dtype=np.float64) for i in range(n)]     # 64 KiB each: out of band


@pydron.functional
def array_sum(arrs):
    return float(sum(a.sum() for a in arrs))


@pydron.schedule
def many_deps(n):
    return total([inc(i) for i in range(n)])


@pydron.schedule
def deps_in_structures(n):
    left = [inc(i) for i in range(n)]
    right = tuple((inc(i), inc(-i)) for i in range(n))
    return nested_total({"left": left, "right": right})


@pydron.schedule
def many_buffers(n):
    a = arrays(n)
    return array_sum(a), a


@pydron.schedule
def buffers_as_argument(arrs):
    return array_sum(arrs)



def _plain_run(fn, *args):
    pydron.disable()
    try:
        return fn(*args)
    finally:
        pydron.enable(workers=2)


@pytest.mark.parametrize("n", [3000, 100_000])
def test_any_number_of_dependencies(n):
    before = pydron.stats()["submitted"]
    assert many_deps(n) == _plain_run(many_deps, n)
    assert pydron.stats()["submitted"] - before == n + 1      # really tasks, one per call


def test_a_million_dependencies():
    assert many_deps(1_000_000) == sum(range(1, 1_000_001))


def test_dependencies_inside_nested_structures():
    assert deps_in_structures(2000) == _plain_run(deps_in_structures, 2000)


def test_thousands_of_buffers_in_a_result_and_an_argument():
    s, a = many_buffers(5500)
    ps, pa = _plain_run(many_buffers, 5500)
    assert s == ps and len(a) == len(pa) == 5500
    assert all(np.array_equal(x, y) for x, y in zip(a, pa))
    big = [np.full(8192, i, dtype=np.float64) for i in range(5500)]
    assert buffers_as_argument(big) == _plain_run(buffers_as_argument, big)
