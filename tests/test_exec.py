"""The process pool (exec/) through its private test helpers: results equal plain Python, large
arrays cross through the shared arena without copies, functions travel by reference or by value,
errors name what went wrong, dependencies are forwarded as encoded blobs."""

import pickle
import threading
import traceback

import numpy as np
import pytest

from pydron import _core


class MyError(ValueError):
    pass


def inc(x):
    return x + 1


def add(a, b=0, *, c=0):
    return a + b + c


def upper(s):
    return s.upper()


def identity(x):
    return x


def negate(a):
    return -a


def total(a):
    return float(a.sum())


def data_address(a):
    return a.__array_interface__["data"][0]


def make_array(n, value):
    return np.full(n, value, dtype=np.float64)


def raise_my_error(msg):
    helper_that_raises(msg)


def helper_that_raises(msg):
    raise MyError(msg)


class Unpicklable:
    def __init__(self):
        self.lock = threading.Lock()


class UnpicklableError(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def raise_unpicklable(msg):
    raise UnpicklableError(msg)


def return_unpicklable():
    return Unpicklable()


def in_worker():
    return _core._exec_in_worker()


def mutate_and_return(lst):
    return list(lst)


@pytest.fixture(scope="module", autouse=True)
def pool():
    _core._exec_start(2)
    yield
    assert _core._exec_info()["outstanding"] == 0


def array_owner(a):
    """The object at the bottom of an array's .base chain."""
    while isinstance(a, np.ndarray):
        a = a.base
    return a


def test_ints_equal_plain_python():
    args = [(i,) for i in range(1000)]
    assert _core._exec_map(inc, args) == [inc(*a) for a in args]


def test_runs_in_worker_processes():
    assert _core._exec_in_worker() is False
    assert _core._exec_map(in_worker, [()] * 4) == [True] * 4
    info = _core._exec_info()
    assert info["running"] and info["nworkers"] == 2
    assert all(p > 0 for p in info["workers"])


def test_strings_and_containers():
    values = ["abc", "", "ünïcødé", "x" * 100000]
    assert _core._exec_map(upper, [(v,) for v in values]) == [v.upper() for v in values]
    objs = [None, 1.5, b"bytes", (1, "a"), [1, [2, [3]]], {"k": {1, 2}}, frozenset({3}), 2**100]
    assert _core._exec_map(identity, [(o,) for o in objs]) == objs


def test_kwargs():
    got = _core._exec_map(add, [(1,), (1, 2), (1,), (1,)],
                          [None, {"c": 3}, {"b": 5, "c": 7}, {}])
    assert got == [1, 6, 13, 1]


def test_large_array_zero_copy():
    a = np.arange(1 << 21, dtype=np.float64).reshape(1024, 2048)   # 16 MiB
    (r,) = _core._exec_map(negate, [(a,)])
    assert r.dtype == a.dtype and r.shape == a.shape
    np.testing.assert_array_equal(r, -a)
    assert type(array_owner(r)) is _core.ArenaBuffer
    r[0, 0] = 42.0                                      # writable, like plain Python's result
    assert r[0, 0] == 42.0


def test_small_array_in_band():
    a = np.arange(10, dtype=np.int32)
    (r,) = _core._exec_map(negate, [(a,)])
    np.testing.assert_array_equal(r, -a)
    assert type(array_owner(r)) is not _core.ArenaBuffer


def test_result_array_forwarded_by_reference():
    (r,) = _core._exec_map(make_array, [(1 << 20, 3.0)])
    assert type(array_owner(r)) is _core.ArenaBuffer
    # Same mapping address in every process: the worker sees the very same bytes.
    assert _core._exec_map(data_address, [(r,)]) == [data_address(r)]
    assert _core._exec_map(total, [(r,), (r[1:],)]) == [3.0 * (1 << 20), 3.0 * ((1 << 20) - 1)]


def test_arena_blocks_freed():
    before = _core._exec_info()["arena_used_pages"]
    a = np.ones(1 << 20)                 # the master's large arrays live in the arena too
    results = _core._exec_map(negate, [(a,)] * 4)
    assert _core._exec_info()["arena_used_pages"] >= before + 5 * 128
    del results
    assert _core._exec_info()["arena_used_pages"] == before + 128
    del a
    assert _core._exec_info()["arena_used_pages"] == before


def test_functions_defined_after_start_lambdas_closures():
    offset = 10

    def local_add(x):
        return x + offset

    assert _core._exec_map(local_add, [(1,), (2,)]) == [11, 12]
    assert _core._exec_map(lambda x, y: x * y, [(3, 4), (5, 6)]) == [12, 30]
    scale = np.arange(3.0)
    closure = lambda v: (v * scale).tolist()      # noqa: E731 - closure over an array
    assert _core._exec_map(closure, [(2.0,)]) == [[0.0, 2.0, 4.0]]


def test_builtin_and_library_functions():
    assert _core._exec_map(abs, [(-3,), (4,)]) == [3, 4]
    (r,) = _core._exec_map(np.negative, [(np.arange(4.0),)])
    np.testing.assert_array_equal(r, -np.arange(4.0))


def test_snapshot_at_call_time():
    lst = [1, 2, 3]
    h = _core._exec_submit(mutate_and_return, (lst,))
    lst.append(4)
    assert _core._exec_wait(h) == [1, 2, 3]


def test_exception_class_message_and_worker_traceback():
    with pytest.raises(MyError) as info:
        _core._exec_map(raise_my_error, [("boom 42",)])
    e = info.value
    assert type(e) is MyError and str(e) == "boom 42"
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    assert "raise_my_error" in text and "helper_that_raises" in text
    assert "test_exec.py" in text


def test_return_exceptions_keeps_order():
    got = _core._exec_map(raise_my_error, [("a",), ("b",)], return_exceptions=True)
    assert [type(g) for g in got] == [MyError, MyError] and [str(g) for g in got] == ["a", "b"]


def test_unpicklable_exception_becomes_runtime_error():
    with pytest.raises(RuntimeError) as info:
        _core._exec_map(raise_unpicklable, [("the message",)])
    msg = str(info.value)
    assert "UnpicklableError" in msg and "the message" in msg
    assert "raise_unpicklable" in msg          # the worker traceback text


def test_unpicklable_argument_named():
    with pytest.raises(TypeError) as info:
        _core._exec_map(add, [(1, Unpicklable())])
    msg = str(info.value)
    assert "add" in msg and "argument 1" in msg and "Unpicklable" in msg
    with pytest.raises(TypeError) as info:
        _core._exec_map(add, [(1,)], [{"c": threading.Lock()}])
    msg = str(info.value)
    assert "add" in msg and "'c'" in msg and "lock" in msg
    assert _core._exec_info()["outstanding"] == 0


def test_unpicklable_result_named():
    with pytest.raises(TypeError) as info:
        _core._exec_map(return_unpicklable, [()])
    msg = str(info.value)
    assert "return_unpicklable" in msg and "Unpicklable" in msg


def test_unpicklable_function_named():
    class Callable:
        def __init__(self):
            self.lock = threading.Lock()

        def __call__(self, x):
            return x

    with pytest.raises(TypeError) as info:
        _core._exec_map(Callable(), [(1,)])
    assert "Callable" in str(info.value)


def test_dependency_forwarding():
    h1 = _core._exec_submit(make_array, (1 << 18, 2.0))
    h2 = _core._exec_submit(add, (10, 5))
    # h1 and h2 are replaced in the worker by their results (persistent ids), even nested.
    h3 = _core._exec_submit(total, (h1,))
    h4 = _core._exec_submit(identity, ([h2, (h2, h1.__class__.__name__)],))
    h5 = _core._exec_submit(add, (h2,), {"b": h2})
    assert _core._exec_wait(h3) == 2.0 * (1 << 18)
    assert _core._exec_wait(h4) == [15, (15, "_ExecHandle")]
    assert _core._exec_wait(h5) == 30
    r1 = _core._exec_wait(h1)
    assert type(array_owner(r1)) is _core.ArenaBuffer and r1.shape == (1 << 18,)


def test_dependency_chain():
    h = _core._exec_submit(inc, (0,))
    for _ in range(50):
        h = _core._exec_submit(inc, (h,))
    assert _core._exec_wait(h) == 51


def test_many_tiny_tasks_in_order():
    n = 20000
    assert _core._exec_map(inc, [(i,) for i in range(n)]) == list(range(1, n + 1))


def test_pickle_roundtrip_of_result_array_in_master():
    (r,) = _core._exec_map(make_array, [(1 << 17, 1.5)])
    back = pickle.loads(pickle.dumps(r, protocol=5))
    np.testing.assert_array_equal(back, r)


def make_adder(n):
    def adder(x):
        return x + n
    return adder


def apply(f, x):
    return f(x)


def test_local_functions_as_results_and_arguments():
    (adder,) = _core._exec_map(make_adder, [(5,)])     # a closure comes back by value
    assert adder(1) == 6
    assert _core._exec_map(apply, [(adder, 2), (lambda v: v * 10, 3)]) == [7, 30]
    h = _core._exec_submit(make_adder, (100,))
    assert _core._exec_wait(_core._exec_submit(apply, (h, 1))) == 101


def count_items(*parts):
    return sum(len(p) for p in parts)


def make_list(n):
    return list(range(n))


def test_many_medium_dependencies_spill_to_arena():
    # 40 dependencies of ~10 KiB pickles each are too much for one ring record inline: they are
    # moved into the arena and sent by reference.
    hs = [_core._exec_submit(make_list, (3000,)) for _ in range(40)]
    assert _core._exec_wait(_core._exec_submit(count_items, tuple(hs))) == 40 * 3000
    big = [list(range(20000))] * 3                   # inline pickles over the inline maximum
    assert _core._exec_map(count_items, [tuple(big)]) == [60000]


def make_array_with_address(n):
    a = np.arange(n, dtype=np.float64)
    return a, a.__array_interface__["data"][0]


def zeros_grow_and_sum(n):
    z = np.zeros(n)                       # calloc path
    z.resize(2 * n, refcheck=False)       # realloc path
    z[n:] = 1.0
    return float(z.sum()), z


def test_worker_arrays_allocated_in_arena_sent_without_copy():
    ((r, address),) = _core._exec_map(make_array_with_address, [(1 << 20,)])
    assert type(array_owner(r)) is _core.ArenaBuffer
    assert r.__array_interface__["data"][0] == address          # the worker's own buffer
    np.testing.assert_array_equal(r, np.arange(1 << 20, dtype=np.float64))
    ((total, z),) = _core._exec_map(zeros_grow_and_sum, [(1 << 18,)])
    assert total == float(1 << 18) and z.shape == (1 << 19,) and z[: 1 << 18].sum() == 0.0
    before = _core._exec_info()["arena_used_pages"]
    del r, z
    assert _core._exec_info()["arena_used_pages"] < before
