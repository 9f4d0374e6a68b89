"""The in-process thread pool (exec/threads.c) through its test helper _core._threads_map: Python
callables give what plain Python gives, exceptions come back as the user's own, ctypes function
pointers go through libffi with the GIL released (and anything ctypes would treat differently falls
back to ctypes itself, with identical results), nothing leaks, and a forked child starts afresh."""

import ctypes
import gc
import math
import operator
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import tracemalloc

import pytest

from pydron import _core

import numpy as np

libc = ctypes.CDLL(None)
libm = ctypes.CDLL("libm.so.6")

NATIVE_SOURCE = r"""
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

extern int PyGILState_Check(void);

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

long sleep_then_return(long usec, long value) { usleep((useconds_t)usec); return value; }

/* Records when it ran: stamps[2*slot] = start, stamps[2*slot+1] = end. */
long timed_sleep(double *stamps, long slot, long usec)
{
    stamps[2 * slot] = now();
    usleep((useconds_t)usec);
    stamps[2 * slot + 1] = now();
    return slot;
}

int gil_held(void) { return PyGILState_Check(); }

double sum_doubles(const double *xs, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += xs[i];
    return s;
}
void scale(double *xs, size_t n, double k) { for (size_t i = 0; i < n; i++) xs[i] *= k; }
double *advance(double *p, long k) { return p + k; }
float add_float(float a, float b) { return a + b; }
signed char add_i8(signed char a, signed char b) { return (signed char)(a + b); }
unsigned short add_u16(unsigned short a, unsigned short b) { return (unsigned short)(a + b); }
unsigned long long add_u64(unsigned long long a, unsigned long long b) { return a + b; }
int negate_bool(_Bool b) { return !b; }
_Bool is_positive(double x) { return x > 0; }
char next_char(char c) { return (char)(c + 1); }
size_t length(const char *s) { return s ? strlen(s) : (size_t)-1; }
const char *greeting(int which) { return which ? "hello" : NULL; }
void *identity_ptr(void *p) { return p; }
long double half_ld(long double x) { return x / 2; }
short first_short(const short *xs) { return xs[0]; }

/* More arguments than registers, mixed classes: some travel on the stack. */
double mix(int a, double b, long c, float d, char e, double f, short g, double h, long long i,
           double j, double k, double l, int m, unsigned char n, double o)
{
    return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h + 9 * i + 10 * j + 11 * k
           + 12 * l + 13 * m + 14 * n + 15 * o;
}

#define IDENTITY(name, T) T id_##name(T x) { return x; }
IDENTITY(byte, signed char) IDENTITY(ubyte, unsigned char) IDENTITY(short, short)
IDENTITY(ushort, unsigned short) IDENTITY(int, int) IDENTITY(uint, unsigned int)
IDENTITY(long, long) IDENTITY(ulong, unsigned long) IDENTITY(longlong, long long)
IDENTITY(ulonglong, unsigned long long) IDENTITY(float, float) IDENTITY(double, double)
IDENTITY(longdouble, long double) IDENTITY(bool, _Bool) IDENTITY(char, char)
IDENTITY(ptr, void *)
"""


@pytest.fixture(scope="session")
def native_lib(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    assert gcc is not None, "the thread tests build a native library: install gcc"
    d = tmp_path_factory.mktemp("native")
    src = d / "native.c"
    src.write_text(NATIVE_SOURCE)
    so = d / "libpydron_threads_test.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-o", str(so), str(src)], check=True)
    return str(so)


@pytest.fixture
def lib(native_lib):
    # A fresh CDLL per test: argtypes set on its functions never leak into another test.
    return ctypes.CDLL(native_lib)


def declare(fn, argtypes, restype):
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


def ffi_calls():
    return _core._threads_stats()["ffi_calls"]


def pool_map(fn, arglist, **kw):
    return _core._threads_map(fn, arglist, **kw)


def check_same_as_ctypes(fn, arglist, fast=True):
    """fn(*args) through the pool equals the direct ctypes call, value and type; `fast`: every
    call went through libffi (else every call fell back to ctypes)."""
    expected = [fn(*a) for a in arglist]
    before = ffi_calls()
    got = pool_map(fn, arglist)
    assert [type(g) for g in got] == [type(e) for e in expected]
    assert got == expected
    assert ffi_calls() - before == (len(arglist) if fast else 0)
    return got


# ------------------------------------------------------------------ Python callables

def square_plus(x, y=0):
    return x * x + y


def test_python_results_equal_plain_python():
    args = [(i,) for i in range(500)]
    assert pool_map(square_plus, args) == [square_plus(i) for i in range(500)]
    assert pool_map(square_plus, args, kwargs={"y": 3}) == [square_plus(i, y=3) for i in range(500)]
    # A non-tuple item is one argument.
    assert pool_map(str.upper, ["ab", "cd"]) == ["AB", "CD"]
    assert pool_map(sorted, [[3, 1, 2], "cba"]) == [[1, 2, 3], ["a", "b", "c"]]
    values = [{"a": 1}, (1, 2), None, 1.5, "s", b"b"]
    assert pool_map(lambda v: v, [(v,) for v in values]) == values


def test_python_numpy_call_releases_gil_and_is_correct():
    arrays = [np.arange(200_000, dtype=np.float64) * k for k in range(8)]
    got = pool_map(np.sum, arrays)
    assert got == [np.sum(a) for a in arrays]
    assert all(type(g) is np.float64 for g in got)


def test_empty_map_and_stats():
    assert pool_map(square_plus, []) == []
    stats = _core._threads_stats()
    assert stats["outstanding"] == 0 and stats["queued"] == 0
    assert stats["max_threads"] >= 1


class CalibrationError(Exception):
    pass


def failing_calibration(x):
    if x % 2:
        raise CalibrationError(f"sensor {x} out of range")
    return x


def slow_then_fail(delay, message):
    time.sleep(delay)
    raise CalibrationError(message)


def test_exceptions_are_the_users_class_with_message_and_traceback():
    got = pool_map(failing_calibration, [0, 1, 2, 3], return_exceptions=True)
    assert got[0] == 0 and got[2] == 2
    for i in (1, 3):
        assert type(got[i]) is CalibrationError
        assert str(got[i]) == f"sensor {i} out of range"
        text = "".join(traceback.format_exception(got[i]))
        assert "failing_calibration" in text
    with pytest.raises(CalibrationError, match="sensor 1 out of range") as info:
        pool_map(failing_calibration, [0, 1, 2, 3])
    assert any(entry.name == "failing_calibration" for entry in info.traceback)


def test_first_failure_in_submission_order_wins():
    # The second task fails first in time; the first task's exception is the one raised.
    with pytest.raises(CalibrationError, match="first"):
        pool_map(slow_then_fail, [(0.2, "first"), (0.0, "second")])


def test_base_exceptions_and_system_exit_come_back_as_values():
    def leave():
        raise SystemExit(3)

    got = pool_map(leave, [()], return_exceptions=True)
    assert type(got[0]) is SystemExit and got[0].code == 3


# ------------------------------------------------------------------ ctypes through libffi

def test_libm_and_libc_functions():
    cos = declare(libm.cos, [ctypes.c_double], ctypes.c_double)
    check_same_as_ctypes(cos, [(x / 7,) for x in range(-20, 20)])
    check_same_as_ctypes(cos, [(3,), (True,), (np.float64(0.5),)])   # int, bool, float subclass
    pow_ = declare(libm.pow, [ctypes.c_double, ctypes.c_double], ctypes.c_double)
    check_same_as_ctypes(pow_, [(2.0, 10), (1.5, -2.5), (9, 0.5)])
    labs = declare(libc.labs, [ctypes.c_long], ctypes.c_long)
    check_same_as_ctypes(labs, [(-5,), (7,), (-(2**63) + 1,), (2**64 + 5,), (np.int64(-3),)])
    assert _core._threads_stats()["cif_cache"] >= 3


def test_ctypes_argument_errors_match_plain_ctypes():
    labs = declare(libc.labs, [ctypes.c_long], ctypes.c_long)
    for bad in [("x",), (1.5,), ()]:
        with pytest.raises(Exception) as direct:
            labs(*bad)
        got = pool_map(labs, [bad], return_exceptions=True)[0]
        assert type(got) is type(direct.value)
        assert str(got) == str(direct.value)


def test_integer_masking_and_small_types(lib):
    add_i8 = declare(lib.add_i8, [ctypes.c_int8, ctypes.c_int8], ctypes.c_int8)
    check_same_as_ctypes(add_i8, [(100, 100), (-128, -1), (300, 1), (ctypes.c_int8(5), 2)])
    add_u16 = declare(lib.add_u16, [ctypes.c_uint16, ctypes.c_uint16], ctypes.c_uint16)
    check_same_as_ctypes(add_u16, [(65535, 2), (-1, 0), (np.int32(7), 8)])
    add_u64 = declare(lib.add_u64, [ctypes.c_uint64, ctypes.c_uint64], ctypes.c_uint64)
    check_same_as_ctypes(add_u64, [(2**64 - 1, 2), (-1, 0), (2**70 + 3, 1)])
    add_float = declare(lib.add_float, [ctypes.c_float, ctypes.c_float], ctypes.c_float)
    check_same_as_ctypes(add_float, [(0.1, 0.2), (1e30, 1e30), (3, 4)])
    negate = declare(lib.negate_bool, [ctypes.c_bool], ctypes.c_int)
    check_same_as_ctypes(negate, [(True,), (False,), (0,), (5,), (None,), (0.0,)])
    positive = declare(lib.is_positive, [ctypes.c_double], ctypes.c_bool)
    check_same_as_ctypes(positive, [(1.0,), (-1.0,)])
    next_char = declare(lib.next_char, [ctypes.c_char], ctypes.c_char)
    check_same_as_ctypes(next_char, [(b"a",), (65,)])
    half = declare(lib.half_ld, [ctypes.c_longdouble], ctypes.c_longdouble)
    check_same_as_ctypes(half, [(3.0,), (1e300,)])
    sleep = declare(lib.sleep_then_return, [ctypes.c_long, ctypes.c_long], ctypes.c_long)
    check_same_as_ctypes(sleep, [(1000, i) for i in range(20)])


def test_stack_arguments(lib):
    c = ctypes
    mix = declare(lib.mix, [c.c_int, c.c_double, c.c_long, c.c_float, c.c_char, c.c_double,
                            c.c_short, c.c_double, c.c_longlong, c.c_double, c.c_double,
                            c.c_double, c.c_int, c.c_ubyte, c.c_double], c.c_double)
    rows = [(k, 1.5 * k, -k, 0.25, b"a", 2.0, 3, 4.0, 2**40 + k, 5.0, 6.0, 7.0, -k, 200, 0.125)
            for k in range(8)]
    check_same_as_ctypes(mix, rows)


def test_strings_and_void_pointers(lib):
    length = declare(lib.length, [ctypes.c_char_p], ctypes.c_size_t)
    buf = ctypes.create_string_buffer(b"buffer!")
    check_same_as_ctypes(length, [(b"hello",), (b"",), (None,), (ctypes.c_char_p(b"abc"),), (buf,)])
    with pytest.raises(ctypes.ArgumentError) as direct:
        length("text")
    got = pool_map(length, [("text",)], return_exceptions=True)[0]
    assert type(got) is ctypes.ArgumentError and str(got) == str(direct.value)
    greeting = declare(lib.greeting, [ctypes.c_int], ctypes.c_char_p)
    check_same_as_ctypes(greeting, [(1,), (0,)])
    ident = declare(lib.identity_ptr, [ctypes.c_void_p], ctypes.c_void_p)
    arr = (ctypes.c_int * 4)()
    check_same_as_ctypes(ident, [(None,), (0,), (12345,), (ctypes.c_void_p(99),), (arr,),
                                 (ctypes.pointer(ctypes.c_int(1)),)])
    # A c_void_p subclass as argtype takes its own instances, not plain c_void_p ones.
    class Handle(ctypes.c_void_p):
        pass
    ident_h = declare(lib.identity_ptr, [Handle], ctypes.c_void_p)
    check_same_as_ctypes(ident_h, [(Handle(7),), (9,), (None,), (ctypes.c_char_p(b"x"),)])
    with pytest.raises(ctypes.ArgumentError) as direct:
        ident_h(ctypes.c_void_p(5))
    got = pool_map(ident_h, [(ctypes.c_void_p(5),)], return_exceptions=True)[0]
    assert type(got) is ctypes.ArgumentError and str(got) == str(direct.value)
    # bytes pass a pointer to their data, exactly as ctypes does.
    data = b"xyz"
    assert pool_map(ident, [(data,)]) == [ident(data)]


def test_pointers_and_numpy_buffers(lib):
    dp = ctypes.POINTER(ctypes.c_double)
    sum_doubles = declare(lib.sum_doubles, [dp, ctypes.c_size_t], ctypes.c_double)
    a = np.arange(10, dtype=np.float64)
    carr = (ctypes.c_double * 3)(1.0, 2.0, 3.5)
    one = ctypes.c_double(4.25)
    check_same_as_ctypes(sum_doubles, [(a.ctypes.data_as(dp), a.size), (carr, 3), (one, 1),
                                       (ctypes.pointer(one), 1)])
    # byref and wrong pointee types are left to ctypes (same results and errors).
    check_same_as_ctypes(sum_doubles, [(ctypes.byref(one), 1)], fast=False)
    wrong = pool_map(sum_doubles, [((ctypes.c_int * 2)(), 2)], return_exceptions=True)[0]
    assert type(wrong) is ctypes.ArgumentError

    nd = np.ctypeslib.ndpointer(dtype=np.float64, flags="C_CONTIGUOUS")
    scale = declare(lib.scale, [nd, ctypes.c_size_t, ctypes.c_double], None)
    arrays = [np.arange(1000, dtype=np.float64) for _ in range(6)]
    before = ffi_calls()
    assert pool_map(scale, [(x, x.size, float(k)) for k, x in enumerate(arrays)]) == [None] * 6
    assert ffi_calls() - before == 6
    for k, x in enumerate(arrays):
        np.testing.assert_array_equal(x, np.arange(1000, dtype=np.float64) * k)
    bad = pool_map(scale, [(np.zeros(3, dtype=np.int32), 3, 1.0)], return_exceptions=True)[0]
    assert type(bad) is ctypes.ArgumentError

    advance = declare(lib.advance, [dp, ctypes.c_long], dp)
    got = pool_map(advance, [(carr, 2)])[0]
    assert type(got) is dp and got[0] == 3.5
    shorts = np.array([-7, 8], dtype=np.int16)
    first = declare(lib.first_short, [ctypes.POINTER(ctypes.c_short)], ctypes.c_short)
    check_same_as_ctypes(first, [(shorts.ctypes.data_as(ctypes.POINTER(ctypes.c_short)),)])


IDENTITY_TYPES = {
    "byte": ctypes.c_byte, "ubyte": ctypes.c_ubyte, "short": ctypes.c_short,
    "ushort": ctypes.c_ushort, "int": ctypes.c_int, "uint": ctypes.c_uint, "long": ctypes.c_long,
    "ulong": ctypes.c_ulong, "longlong": ctypes.c_longlong, "ulonglong": ctypes.c_ulonglong,
    "float": ctypes.c_float, "double": ctypes.c_double, "longdouble": ctypes.c_longdouble,
    "bool": ctypes.c_bool, "char": ctypes.c_char,
}


def test_every_type_and_value_agrees_with_ctypes(lib):
    """Every simple and pointer argtype against a zoo of values: the pool gives what ctypes
    gives, value or error (type and message), whichever of its two paths it takes."""
    keep = [ctypes.c_int(3), ctypes.c_double(1.5), (ctypes.c_int * 2)(4, 5),
            (ctypes.c_double * 2)(), ctypes.create_string_buffer(b"buf"), ctypes.c_char(b"q")]
    values = [0, 1, -1, 127, 128, 255, 256, -129, 2**31, -(2**31) - 1, 2**63, 2**64 + 1, -(2**70),
              True, False, 0.0, -2.5, 1e300, float("nan"), None, b"", b"x", b"long bytes", "s",
              np.int16(-3), np.uint64(2**63 + 5), np.float32(0.25), np.float64(7.5),
              ctypes.c_int(9), ctypes.c_long(-9), ctypes.c_double(2.25), ctypes.c_float(0.5),
              ctypes.c_bool(True), ctypes.c_void_p(1234), ctypes.c_void_p(None),
              ctypes.c_char_p(b"cp"), ctypes.pointer(keep[0]), ctypes.pointer(keep[1]),
              ctypes.byref(keep[0]), object(), [1], *keep]
    pointer_types = {"void*": ctypes.c_void_p, "char*": ctypes.c_char_p,
                     "int*": ctypes.POINTER(ctypes.c_int), "double*": ctypes.POINTER(ctypes.c_double),
                     "char[]": ctypes.POINTER(ctypes.c_char)}
    cases = [(getattr(lib, "id_" + name), t, t) for name, t in IDENTITY_TYPES.items()]
    # Pointers come back as addresses, so the same object must give the same address.
    cases += [(lib.id_ptr, t, ctypes.c_void_p) for t in pointer_types.values()]
    mismatches, fast, accepted = [], 0, 0
    for fn, argtype, restype in cases:
        declare(fn, [argtype], restype)
        expected = []
        for v in values:
            try:
                expected.append(("ok", fn(v)))
            except Exception as exc:  # noqa: BLE001 - the error is part of what must agree
                expected.append(("error", type(exc), str(exc)))
        before = ffi_calls()
        got = []
        for g in pool_map(fn, [(v,) for v in values], return_exceptions=True):
            got.append(("error", type(g), str(g)) if isinstance(g, BaseException) else ("ok", g))
        fast += ffi_calls() - before
        accepted += sum(e[0] == "ok" for e in expected)
        for v, e, g in zip(values, expected, got):
            same = e == g or (e[0] == g[0] == "ok" and e[1] != e[1] and g[1] != g[1])   # nan
            if not same or (e[0] == "ok" and type(e[1]) is not type(g[1])):
                mismatches.append((argtype.__name__, repr(v), e, g))
    assert not mismatches, mismatches
    print(f"{accepted} calls accepted by ctypes, {fast} through libffi")
    assert fast >= accepted * 0.9    # what ctypes accepts nearly all takes the libffi path


def test_signatures_ctypes_must_handle_fall_back(lib):
    # No argtypes: ctypes converts by the values' types.
    labs = ctypes.CDLL(None).labs
    labs.restype = ctypes.c_long
    check_same_as_ctypes(labs, [(-4,), (6,)], fast=False)
    # errcheck is honoured.
    length = declare(lib.length, [ctypes.c_char_p], ctypes.c_size_t)
    length.errcheck = lambda result, func, args: result * 10
    assert check_same_as_ctypes(length, [(b"abcd",)], fast=False) == [40]
    # A restype that is a subclass of a simple type is returned as an instance by ctypes.
    class Handle(ctypes.c_void_p):
        pass
    ident = declare(lib.identity_ptr, [ctypes.c_void_p], Handle)
    got = pool_map(ident, [(5,)])[0]
    assert type(got) is Handle and got.value == 5
    # use_errno functions keep ctypes' errno swapping.
    errno_lib = ctypes.CDLL(lib._name, use_errno=True)
    sleep = declare(errno_lib.sleep_then_return, [ctypes.c_long, ctypes.c_long], ctypes.c_long)
    check_same_as_ctypes(sleep, [(0, 3)], fast=False)


def test_native_calls_run_without_the_gil(lib, native_lib):
    gil_held = declare(lib.gil_held, [], ctypes.c_int)
    assert pool_map(gil_held, [()] * 4) == [0] * 4
    # The same function through PyDLL must hold the GIL: it is called as Python.
    py_gil_held = declare(ctypes.PyDLL(native_lib).gil_held, [], ctypes.c_int)
    before = ffi_calls()
    assert pool_map(py_gil_held, [()]) == [1]
    assert ffi_calls() == before


OVERLAP_SCRIPT = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    from pydron import _core
    lib = ctypes.CDLL(sys.argv[1])
    f = lib.timed_sleep
    f.argtypes = [ctypes.POINTER(ctypes.c_double), ctypes.c_long, ctypes.c_long]
    f.restype = ctypes.c_long
    stamps = np.zeros(4)
    p = stamps.ctypes.data_as(ctypes.POINTER(ctypes.c_double))
    before = _core._threads_stats()["ffi_calls"]
    assert _core._threads_map(f, [(p, 0, 300000), (p, 1, 300000)]) == [0, 1]
    assert _core._threads_stats()["ffi_calls"] - before == 2
    starts, ends = stamps[0::2], stamps[1::2]
    assert (ends > starts).all(), stamps
    # Both calls were inside their C code at the same time.
    assert starts.max() < ends.min(), stamps
    print("overlap ok")
""")


def run_python(script, *args, env_extra=None):
    env = dict(os.environ)
    # The child imports the same pydron this process imported.
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(_core.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_two_native_calls_overlap_in_time(native_lib):
    proc = run_python(OVERLAP_SCRIPT, native_lib, env_extra={"PYDRON_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "overlap ok" in proc.stdout


# ------------------------------------------------------------------ leaks

def measure(fn, arglist, rounds=1, **kw):
    for _ in range(rounds):
        pool_map(fn, arglist, **kw)


def assert_no_growth(fn, make_args, n=10_000, **kw):
    """10,000 calls leave the live object count and traced memory as they were, and the
    arguments' reference counts come back. Memory is compared between the ends of two traced
    runs: the first one refills CPython's free lists (2,000 tuples per size, floats, lists) with
    traced blocks, which a per-call leak (a job is over 100 bytes) would dwarf."""
    measure(fn, make_args(100), **kw)
    gc.collect()
    tracemalloc.start()
    try:
        sample = make_args(1)[0]
        refs = [sys.getrefcount(a) for a in sample]
        objects = len(gc.get_objects())
        measure(fn, make_args(n), **kw)
        gc.collect()
        mem_before = tracemalloc.get_traced_memory()[0]
        measure(fn, make_args(n), **kw)
        gc.collect()
        mem_after = tracemalloc.get_traced_memory()[0]
        assert [sys.getrefcount(a) for a in sample] == refs
        assert len(gc.get_objects()) - objects < 50
        assert mem_after - mem_before < 32 * 1024, (mem_before, mem_after)
    finally:
        tracemalloc.stop()


PAYLOAD = b"some bytes that travel"
BIG = 123456789012345678901234567890


def test_no_leak_ffi_path(lib):
    length = declare(lib.length, [ctypes.c_char_p], ctypes.c_size_t)
    assert_no_growth(length, lambda n: [(PAYLOAD,)] * n)
    greeting = declare(lib.greeting, [ctypes.c_int], ctypes.c_char_p)
    assert_no_growth(greeting, lambda n: [(1,)] * n)
    a = np.arange(8, dtype=np.float64)
    nd = np.ctypeslib.ndpointer(dtype=np.float64)
    summ = declare(lib.sum_doubles, [nd, ctypes.c_size_t], ctypes.c_double)
    assert_no_growth(summ, lambda n: [(a, 8)] * n)


def test_no_leak_python_path():
    assert_no_growth(square_plus, lambda n: [(BIG,)] * n, kwargs={"y": BIG})
    assert_no_growth(failing_calibration, lambda n: [(BIG,)] * n, return_exceptions=True)


# ------------------------------------------------------------------ lifecycle

def test_shutdown_twice_then_reuse():
    assert pool_map(math.sqrt, [4.0]) == [2.0]
    _core._threads_shutdown()
    _core._threads_shutdown()
    assert _core._threads_stats()["threads"] == 0
    assert pool_map(math.sqrt, [9.0, 16.0]) == [3.0, 4.0]
    assert _core._threads_stats()["threads"] >= 1


def wait_finished(n, timeout=60.0):
    """Until n finished tasks wait in the completion list (not drained yet)."""
    deadline = time.monotonic() + timeout
    while _core._threads_stats()["finished"] < n:
        assert time.monotonic() < deadline, _core._threads_stats()
        time.sleep(0.001)


def drain_until(task_ids, timeout=60.0):
    """Poll _threads_drain (as exec_poll does) until every id in task_ids came back."""
    got = {}
    deadline = time.monotonic() + timeout
    while set(got) != set(task_ids):
        for task_id, failed, obj in _core._threads_drain():
            got[task_id] = (failed, obj)
        assert time.monotonic() < deadline, got
        time.sleep(0.001)
    return got


def test_submit_and_drain_interface(lib):
    sleep = declare(lib.sleep_then_return, [ctypes.c_long, ctypes.c_long], ctypes.c_long)
    _core._threads_submit(11, sleep, (2000, 42))
    _core._threads_submit(12, square_plus, (3,), {"y": 1})
    _core._threads_submit(13, failing_calibration, (5,))
    _core._threads_submit(14, math.sqrt)   # no arguments: TypeError from the call itself
    assert _core._threads_stats()["outstanding"] >= 1
    got = drain_until([11, 12, 13, 14])
    assert got[11] == (False, 42) and got[12] == (False, 10)
    assert got[13][0] is True and type(got[13][1]) is CalibrationError
    assert got[14][0] is True and type(got[14][1]) is TypeError
    assert _core._threads_stats()["outstanding"] == 0
    with pytest.raises(TypeError):
        _core._threads_submit(15, square_plus, [1])   # args must be a tuple


def test_cancel_all_forgets_queued_and_running(lib):
    sleep = declare(lib.sleep_then_return, [ctypes.c_long, ctypes.c_long], ctypes.c_long)
    n = _core._threads_stats()["max_threads"] + 3
    for i in range(n):
        _core._threads_submit(100 + i, sleep, (100000, i))
    _core._threads_cancel_all()
    assert _core._threads_stats()["outstanding"] == 0
    time.sleep(0.3)   # the running ones finish; they must not be reported
    assert _core._threads_drain() == []
    _core._threads_submit(200, sleep, (0, 9))
    assert drain_until([200]) == {200: (False, 9)}
    assert _core._threads_drain() == []


def test_completions_are_handed_out_after_exec_returns(lib):
    """Results come out of one completion queue: the caller acts on them (submits dependents,
    shuts the pool down) after exec_poll returned, never from inside it."""
    sleep = declare(lib.sleep_then_return, [ctypes.c_long, ctypes.c_long], ctypes.c_long)
    seen = {}
    for i in range(6):
        _core._threads_submit(300 + i, sleep, (1000, i))
    deadline = time.monotonic() + 60
    while len(seen) < 12:
        for task_id, failed, obj in _core._threads_drain():
            assert not failed
            seen[task_id] = obj
            if task_id < 310:                    # each first-generation result submits a child
                _core._threads_submit(task_id + 100, sleep, (0, obj * 10))
        assert time.monotonic() < deadline, seen
        time.sleep(0.001)
    assert seen == {**{300 + i: i for i in range(6)}, **{400 + i: 10 * i for i in range(6)}}
    assert _core._threads_stats()["outstanding"] == 0

    # A shutdown between two drains: finished, undrained results are dropped, not reported.
    for i in range(6):
        _core._threads_submit(500 + i, sleep, (0, i))
    wait_finished(6)
    _core._threads_shutdown()
    assert _core._threads_drain() == []
    assert _core._threads_stats()["outstanding"] == 0
    assert pool_map(sleep, [(0, 1)]) == [1]


def test_cancel_by_id_drops_only_those(lib):
    """exec_cancel forgets the tasks named, queued, running or finished but not collected; the
    others are handed over as usual."""
    sleep = declare(lib.sleep_then_return, [ctypes.c_long, ctypes.c_long], ctypes.c_long)
    n = _core._threads_stats()["max_threads"] + 4
    for i in range(n):
        _core._threads_submit(800 + i, sleep, (20000, i))
    cancelled = {800 + i for i in range(0, n, 2)}
    _core._threads_cancel(sorted(cancelled))
    kept = {800 + i for i in range(1, n, 2)}
    got = drain_until(kept)
    assert set(got) == kept and all(got[t] == (False, t - 800) for t in kept)
    time.sleep(0.2)                              # running cancelled ones finish: never reported
    assert _core._threads_drain() == []
    assert _core._threads_stats()["outstanding"] == 0
    # Cancelling after they finished, before they were collected, also drops them.
    _core._threads_submit(900, sleep, (0, 9))
    wait_finished(1)
    _core._threads_cancel([900, 12345])          # an unknown id is ignored
    assert _core._threads_drain() == []
    assert _core._threads_stats()["outstanding"] == 0


def test_concurrent_shutdowns(lib):
    sleep = declare(lib.sleep_then_return, [ctypes.c_long, ctypes.c_long], ctypes.c_long)
    for i in range(4):
        _core._threads_submit(700 + i, sleep, (50000, i))
    threads = [threading.Thread(target=_core._threads_shutdown) for _ in range(4)]
    for t in threads:
        t.start()
    _core._threads_shutdown()
    for t in threads:
        t.join()
    _core._threads_shutdown()
    assert _core._threads_stats()["threads"] == 0
    assert pool_map(sleep, [(0, 3)]) == [3]


FORK_SCRIPT = textwrap.dedent("""
    import ctypes, math, os, sys, time
    from pydron import _core
    lib = ctypes.CDLL(sys.argv[1])
    sleep = lib.sleep_then_return
    sleep.argtypes = [ctypes.c_long, ctypes.c_long]
    sleep.restype = ctypes.c_long
    assert _core._threads_map(math.sqrt, [4.0]) == [2.0]
    # Fork while the parent's threads are busy: the child must not wait for, or see, them.
    t0 = time.monotonic()
    import threading
    results = []
    runner = threading.Thread(target=lambda: results.append(
        _core._threads_map(sleep, [(400000, 7), (400000, 8)])))
    runner.start()
    time.sleep(0.1)
    pid = os.fork()
    if pid == 0:
        ok = _core._threads_stats()["threads"] == 0 and _core._threads_stats()["outstanding"] == 0
        ok = ok and _core._threads_map(math.sqrt, [9.0, 16.0]) == [3.0, 4.0]
        ok = ok and _core._threads_map(sleep, [(1000, 5)]) == [5]
        _core._threads_shutdown()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    runner.join()
    assert results == [[7, 8]], results
    _core._threads_shutdown()
    print("fork ok")
""")


def test_forked_child_gets_its_own_threads(native_lib):
    proc = run_python(FORK_SCRIPT, native_lib)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fork ok" in proc.stdout


EXIT_SCRIPT = textwrap.dedent("""
    import atexit, ctypes, sys, threading, time

    def submit_late():
        # Registered before pydron's import, so it runs after the pool's atexit hook (LIFO):
        # submitting then is refused (a new worker would start during finalization).
        try:
            _core._threads_submit(1, sleep, (0, 1))
        except RuntimeError as exc:
            print("late submit refused:", exc, flush=True)

    atexit.register(submit_late)
    from pydron import _core
    lib = ctypes.CDLL(sys.argv[1])
    sleep = lib.sleep_then_return
    sleep.argtypes = [ctypes.c_long, ctypes.c_long]
    sleep.restype = ctypes.c_long

    def busy(x):
        time.sleep(0.05)
        return x

    assert _core._threads_map(busy, list(range(8))) == list(range(8))
    assert _core._threads_map(sleep, [(1000, 1)]) == [1]
    # Exit while a daemon thread waits for a native call still running: the atexit hook joins
    # the workers, and the waiting thread dies with the interpreter.
    threading.Thread(target=_core._threads_map, args=(sleep, [(300000, 2)]), daemon=True).start()
    time.sleep(0.05)
    print("exit ok", flush=True)
""")


def test_interpreter_exit_with_live_pool(native_lib):
    proc = run_python(EXIT_SCRIPT, native_lib)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exit ok" in proc.stdout
    assert "late submit refused: pydron: cannot run thread tasks after interpreter shutdown" \
        in proc.stdout, proc.stdout + proc.stderr


FUNCTIONAL_SCRIPT = textwrap.dedent("""
    import ctypes, sys, threading
    import pydron
    lib = ctypes.CDLL(sys.argv[1])
    sleep = lib.sleep_then_return
    sleep.argtypes = [ctypes.c_long, ctypes.c_long]
    sleep.restype = ctypes.c_long

    @pydron.functional(executor="threads")
    def native_square(i):
        return sleep(20000, i) ** 2

    @pydron.functional(executor="threads")
    def python_text(i, sep="-"):
        return sep.join(str(k) for k in range(i))

    @pydron.schedule
    def pipeline(n):
        squares = [native_square(i) for i in range(n)]
        texts = []
        for i in range(n):
            texts.append(python_text(i, sep="+"))
        return sum(squares), texts

    pydron.enable()
    print(repr(pipeline(12)))
    if pydron.is_enabled():
        from pydron import _core
        print("pool calls:", _core._threads_stats()["python_calls"], file=sys.stderr)
""")


def test_functional_threads_executor_equals_plain_python(native_lib):
    plain = run_python(FUNCTIONAL_SCRIPT, native_lib, env_extra={"PYDRON_DISABLE": "1"})
    assert plain.returncode == 0, plain.stdout + plain.stderr
    traced = run_python(FUNCTIONAL_SCRIPT, native_lib)
    assert traced.returncode == 0, traced.stdout + traced.stderr
    assert traced.stdout == plain.stdout
    assert "pool calls: 24" in traced.stderr, traced.stderr


MIXED_SCRIPT = textwrap.dedent("""
    import pydron

    @pydron.functional(executor="threads")
    def thread_square(x):
        return x * x

    @pydron.functional
    def process_add(a, b):
        return a + b

    @pydron.schedule
    def mixed(xs):
        rs = [thread_square(x) for x in xs]
        return rs, process_add(rs[0], thread_square(rs[1]))

    pydron.enable()
    print(repr(mixed([1, 2, 3, 4])))
""")


def test_process_task_reading_a_thread_task_result():
    plain = run_python(MIXED_SCRIPT, env_extra={"PYDRON_DISABLE": "1"})
    assert plain.returncode == 0, plain.stdout + plain.stderr
    traced = run_python(MIXED_SCRIPT)
    assert traced.returncode == 0, traced.stdout + traced.stderr
    assert traced.stdout == plain.stdout


def test_ffi_version_matches_pkg_config():
    version = _core._threads_ffi_version()
    assert version and version != "unknown"
    pkg_config = shutil.which("pkg-config")
    if pkg_config:
        proc = subprocess.run([pkg_config, "--modversion", "libffi"], capture_output=True,
                              text=True)
        if proc.returncode == 0:
            assert version == proc.stdout.strip()


def test_one_task_at_a_time_needs_one_thread():
    """A task submitted while the only thread is still waking the master for its previous result
    is taken by that thread when it comes back: sequential use never starts a second thread (it
    did, and a 10,000-call run ended with one thread more than it began with). The test helper
    holds the thread in that window so the master's next submit always lands in it."""
    _core._threads_shutdown()
    assert _core._threads_stats()["max_threads"] >= 2, "a second thread must be allowed to start"
    _core._threads_set_post_pause(2000)
    try:
        for task_id in range(20):
            _core._threads_submit(task_id, operator.neg, (task_id,))
            got = []
            while not got:                 # the master's poll, taking the result at once
                got = _core._threads_drain()
            assert got == [(task_id, False, -task_id)]
        assert _core._threads_stats()["threads"] == 1
    finally:
        _core._threads_set_post_pause(0)
