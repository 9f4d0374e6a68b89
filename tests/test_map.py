"""Maps (graph/bulk.c): one functional over many argument tuples as a few chunk tasks run as a
loop in a worker, and a join that gathers their results in order. Each compared with plain
Python's list comprehension over the same calls."""

import pytest

import pydron
from pydron import _core

from helpers import module_pool

pool, _ = module_pool(workers=2)


@pydron.functional
def inc(x):
    return x + 1


@pydron.functional
def scaled(x, factor=2):
    return [x] * factor


@pydron.functional
def fails_at(x, bad):
    if x in bad:
        raise ValueError("bad element %d" % x)
    return x


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 100, 5000])
def test_results_in_order(n):
    calls = [(i,) for i in range(n)]
    assert list(_core._map(inc, calls)) == [i + 1 for i in range(n)]


def test_several_arguments():
    calls = [(i, 3) for i in range(50)]
    assert list(_core._map(scaled, calls)) == [[i] * 3 for i in range(50)]


@pytest.mark.parametrize("bad", [{0}, {37}, {999}, {10, 600}, {400, 20}])
def test_the_earliest_failure_is_raised(bad):
    calls = [(i, frozenset(bad)) for i in range(1000)]
    with pytest.raises(ValueError) as info:
        list(_core._map(fails_at, calls))
    assert str(info.value) == "bad element %d" % min(bad)


def test_a_failing_map_leaves_the_pool_usable():
    with pytest.raises(ValueError):
        list(_core._map(fails_at, [(i, frozenset({5})) for i in range(100)]))
    assert list(_core._map(inc, [(i,) for i in range(100)])) == list(range(1, 101))


def test_calls_must_be_a_list_of_tuples():
    with pytest.raises(TypeError, match="list"):
        _core._map(inc, ((1,),))
    with pytest.raises(TypeError, match="not a tuple"):
        list(_core._map(inc, [1, 2]))


def test_a_map_feeds_a_task():
    @pydron.schedule
    def total(n):
        return sum(_core._map(inc, [(i,) for i in range(n)]))

    assert total(1000) == sum(range(1, 1001))
