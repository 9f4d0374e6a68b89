"""Arrays arrive as they were (issue 11.4; pydron/_ship.py reduce_array): strided views, negative
strides, broadcasts, Fortran order, non-native byte order and read-only arrays keep their
strides, order, dtype and writeable flag, in both directions, small (in band) and large (out of
band, through the arena), so what a task computes is bit-identical to plain Python's. The
scenario runs plainly and under pydron; both print the same."""

import re

import pytest

from isolated import run

pytestmark = pytest.mark.nosan

SCENARIO = """
import hashlib, os, pydron, numpy as np
pydron.enable(workers=2)

def describe(a):
    return (a.dtype.str, a.shape, a.strides, a.flags.writeable, a.flags.c_contiguous,
            a.flags.f_contiguous, float(a.mean()).hex(), float(a.sum(axis=0).sum()).hex(),
            hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:12])

def alignment(a):
    # Where the first element sits modulo 64 (SIMD loops peel by it): kept for the arrays
    # pydron reduces itself; writable contiguous ones take numpy's own pickling. Compared
    # between the master and the worker of one run (allocators differ between runs).
    if a.flags.writeable and (a.flags.c_contiguous or a.flags.f_contiguous):
        return None
    return a.__array_interface__["data"][0] % 64

@pydron.functional
def look(a):
    return describe(a), alignment(a), os.getpid()

@pydron.functional
def view_of(n, how):
    rng = np.random.default_rng(n)
    base = rng.standard_normal((n, n))
    if how == "strided":
        return base[::3, ::3]
    if how == "reversed":
        return base[::-2, 1::2]
    if how == "fortran":
        return np.asfortranarray(base)
    if how == "readonly":
        base.flags.writeable = False
        return base
    if how == "bigendian":
        return base.astype(">f8")

@pydron.schedule
def arguments(arrays):
    return [look(a) for a in arrays]

@pydron.schedule
def results(n):
    return [view_of(n, how) for how in ("strided", "reversed", "fortran", "readonly",
                                         "bigendian")]

MASTER = os.getpid()
for n in (60, 900):                     # 28 KiB: in band; 6.2 MiB: out of band
    rng = np.random.default_rng(n)
    base = rng.standard_normal((n, n)) * 1e3 + rng.standard_normal((n, n)) * 1e-3
    ro = base.copy(); ro.flags.writeable = False
    arrays = [base[::3, ::3], base[1::2, ::-3], base[::-1], np.asfortranarray(base),
              base.astype(">f8"), ro, ro[::2, ::2], np.broadcast_to(base[0], (n, n)),
              base.T, base[:, 5], base.astype(np.float32)[2:, 1:]]
    for a, (got, align, pid) in zip(arrays, arguments(arrays)):
        print(got, align == alignment(a))
        assert not pydron.is_enabled() or pid != MASTER
    for a in results(n):
        print(describe(a))
"""


def test_arrays_keep_their_layout(tmp_path):
    plain = run(SCENARIO, tmp_path, env={"PYDRON_DISABLE": "1"})
    assert plain.returncode == 0, plain.stderr
    par = run(SCENARIO, tmp_path)
    assert par.returncode == 0, par.stderr
    plain_lines, par_lines = plain.stdout.splitlines(), par.stdout.splitlines()
    assert len(par_lines) == len(plain_lines) == 32
    for want, got in zip(plain_lines, par_lines):
        assert got == want


def test_strided_mean_is_bit_identical(tmp_path):
    """The scikit-image case: the mean of a strided view summed in another order differed from
    plain Python's in the last bits for 8 of 20 images."""
    body = """
import pydron, numpy as np
pydron.enable(workers=2)

@pydron.functional
def mean(a):
    return float(a.mean()).hex()

@pydron.schedule
def means(images):
    return [mean(im[::3, ::3]) for im in images]

rng = np.random.default_rng(7)
images = [rng.random((512, 512)) * 255 for _ in range(20)]
print(means(images))
"""
    plain = run(body, tmp_path, env={"PYDRON_DISABLE": "1"})
    par = run(body, tmp_path)
    assert plain.returncode == 0 and par.returncode == 0, par.stderr
    assert par.stdout == plain.stdout
