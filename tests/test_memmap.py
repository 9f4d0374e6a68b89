"""numpy.memmap arguments (issue 9): a read-only memmap, or any view of one, crosses to a worker as
its file, byte range and layout, and the worker maps the same pages (nothing copied); the task
sees the memmap plain Python's callee would see (type, filename, offset, mode, values). Writable
and copy-on-write memmaps, and files replaced since they were mapped, cross as copies, with plain
Python's meaning. Each case is compared with plain Python's run of the same code."""

import os
import time

import numpy as np
import pytest

import pydron

from helpers import module_pool

pool, plain = module_pool(workers=2)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "frames.f8"
    w = np.memmap(path, dtype="f8", mode="w+", shape=(300, 50))
    w[:] = np.arange(w.size, dtype="f8").reshape(w.shape) * 0.5
    w.flush()
    del w
    return str(path)


@pydron.functional
def describe(a):
    """What the task sees, and whether it reads a mapping of its own (not a copy)."""
    return (type(a).__name__, a.filename, a.offset, a.mode, a.flags.writeable, a.shape,
            a.strides, float(a.sum()), repr(a[:2].tolist()),
            getattr(a, "_mmap", None) is not None and os.getpid())


@pydron.functional
def identity(a):
    return a


@pydron.schedule
def describe_views(m):
    return [describe(m), describe(m[::-3, 7:40:5]), describe(m.T), describe(m[100:101, ::-1])]


def _same_except_worker(ours, theirs):
    """Plain Python's callee maps in this process; pydron's in a worker (another pid)."""
    assert [o[:-1] for o in ours] == [t[:-1] for t in theirs]


def test_read_only_views_cross_by_their_file(data_file):
    m = np.memmap(data_file, dtype="f8", mode="r", shape=(200, 50), offset=800)
    ours, theirs = describe_views(m), plain(describe_views, m)
    _same_except_worker(ours, theirs)
    workers = {o[-1] for o in ours}
    assert os.getpid() not in workers and all(workers), \
        "each task reads its own mapping of the file, in a worker"


def test_a_result_that_is_a_read_only_memmap_comes_back_by_its_file(data_file):
    m = np.memmap(data_file, dtype="f8", mode="r", shape=(200, 50), offset=800)

    @pydron.schedule
    def back(x):
        return identity(x[10:20, ::2])

    got = back(m)
    assert type(got) is np.memmap and got._mmap is not None and got.mode == "r"
    assert np.array_equal(got, plain(back, m)) and got.strides == m[10:20, ::2].strides


@pydron.functional
def slow_total(a):
    time.sleep(0.3)
    return float(a.sum())


@pydron.schedule
def total_then_write(m):
    t = slow_total(m)
    m[:] = -1.0                            # after the call: the task must not see it
    m.flush()
    return t


@pytest.mark.parametrize("mode", ["r+", "c"])
def test_writable_memmaps_are_seen_as_at_the_call(data_file, mode):
    ours = total_then_write(np.memmap(data_file, dtype="f8", mode=mode, shape=(300, 50)))
    # the file is -1 everywhere now for r+: rewrite it for the plain run
    w = np.memmap(data_file, dtype="f8", mode="r+", shape=(300, 50))
    w[:] = np.arange(w.size, dtype="f8").reshape(w.shape) * 0.5
    w.flush()
    theirs = plain(total_then_write, np.memmap(data_file, dtype="f8", mode=mode, shape=(300, 50)))
    assert ours == theirs == float((np.arange(15000) * 0.5).sum())


def test_a_deleted_file_still_reads_as_mapped(data_file):
    """Plain Python's mapping outlives the file's name; the worker cannot open it by name, so the
    array crosses as a copy."""
    m = np.memmap(data_file, dtype="f8", mode="r", shape=(300, 50))
    os.unlink(data_file)
    ours, theirs = describe_views(m), plain(describe_views, m)
    assert [o[:-2] for o in ours] == [t[:-2] for t in theirs]
    assert not any(o[-1] for o in ours), "copied: the file cannot be mapped by its name"


def test_a_replaced_file_is_not_read_in_its_place(data_file, tmp_path):
    m = np.memmap(data_file, dtype="f8", mode="r", shape=(300, 50))
    other = tmp_path / "other.f8"
    np.full((300, 50), 7.0).tofile(other)
    os.replace(other, data_file)           # same name, another file
    ours, theirs = describe_views(m), plain(describe_views, m)
    assert [o[:-2] for o in ours] == [t[:-2] for t in theirs]
    assert ours[0][7] == float((np.arange(15000) * 0.5).sum())
