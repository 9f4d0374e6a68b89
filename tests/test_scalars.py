"""The C fast path for small values (exec/scalars.c): what it writes is ordinary pickle that
pickle.loads reads back to an equal value of the same type, it declines what it does not write
exactly as pickle would (a second list, whose sharing with the first pickle would keep), and
its reader agrees with pickle.loads."""

import math
import pickle

import pytest

from pydron import _core

VALUES = [
    None, True, False, 0, 1, -1, 255, 256, 65535, 65536, -65536, 2**31 - 1, -2**31, 2**31,
    -2**31 - 1, 2**63 - 1, -2**63, 127, 128, -128, -129, 32767, -32768, 2**40, -2**40,
    0.0, -0.0, 1.5, -2.25e300, 5e-324, math.inf, -math.inf, "", "a", "é", "😀", "x" * 255,
    "x" * 256, "y" * 4096, b"", b"\x00\xff", b"z" * 255, b"z" * 300, (), (1,), (1, "a"),
    (1, 2.0, None), (1, 2, 3, 4, 5), ((1, 2), ("a",)), tuple(range(64)),
    [], [1, 2], [(i,) for i in range(2500)], ("ok", [(1, "a"), 2.5, None]),
    [(i, -i, str(i)) for i in range(999)], list(range(1000)), list(range(1001)),
    list(range(8192)),
]
SHARED = [0]
DECLINED = [2**63, -2**63 - 1, 10**30, "x" * 4097, b"z" * 5000, {"a": 1},
            ((((1,),),),), tuple(range(65)), "\udc80", 1 + 2j, bytearray(b"ab"),
            [1, [2]], ([1], [2]), (SHARED, SHARED), [1, {"a": 1}], list(range(8193)),
            [1, 2, 2**70]]


def same(a, b):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, float):
        return type(b) is float and a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, (tuple, list)):
        return type(b) is type(a) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("value", VALUES + [math.nan], ids=repr)
def test_written_values_read_back_by_pickle(value):
    data = _core._exec_scalars_dump(value)
    assert data is not None
    assert same(pickle.loads(data), value)
    fast = _core._exec_scalars_load(data)
    if fast is not NotImplemented:
        assert same(fast, value)


@pytest.mark.parametrize("value", DECLINED, ids=repr)
def test_values_it_leaves_to_pickle(value):
    assert _core._exec_scalars_dump(value) is None


def test_calls():
    for args in [(), (1,), (1, 2), (1, 2, 3), (1, "a", 2.5, None, b"x"), tuple(range(10))]:
        data = _core._exec_scalars_dump_call(args)
        assert data is not None and pickle.loads(data) == (args, None)
    # A map's chunk: one list of argument tuples.
    chunk = ([(i,) for i in range(300)],)
    assert pickle.loads(_core._exec_scalars_dump_call(chunk)) == (chunk, None)
    # The same list twice is one object on the other side too: left to pickle, which keeps that.
    shared = [1]
    assert _core._exec_scalars_dump_call((shared, shared)) is None
    assert _core._exec_scalars_dump_call(([1], [1])) is None
    assert _core._exec_scalars_dump_call(([[1]],)) is None


def test_reader_declines_other_pickles():
    for value in [[1], {"a": 1}, 2**70, "x" * 300]:
        assert _core._exec_scalars_load(pickle.dumps(value, 5)) is NotImplemented
    assert _core._exec_scalars_load(b"") is NotImplemented
    assert _core._exec_scalars_load(b"\x80\x05K") is NotImplemented      # truncated
