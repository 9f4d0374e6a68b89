"""The decorators and enable/disable: marking changes nothing a user can observe about a function
(identity, signature, name, pickling, plain behaviour), the kill switch, and clear errors."""
import copy
import inspect
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

import pydron
from pydron import _core


def double(x):
    return 2 * x


def pipeline(xs, *, scale=1):
    return [double(x) * scale for x in xs]


def test_from_pydron_import_spelling():
    from pydron import functional, schedule  # the original Pydron's spelling
    assert functional is pydron.functional and schedule is pydron.schedule


def test_decorators_keep_identity_signature_name_and_pickling():
    sig_f, sig_p = inspect.signature(double), inspect.signature(pipeline)
    code_f, code_p = double.__code__, pipeline.__code__
    assert pydron.functional(double) is double
    assert pydron.schedule(pipeline) is pipeline
    assert double.__code__ is code_f and pipeline.__code__ is code_p
    assert inspect.signature(double) == sig_f and inspect.signature(pipeline) == sig_p
    assert (double.__name__, pipeline.__name__) == ("double", "pipeline")
    assert _core._kind(double) == _core.FUNCTIONAL and _core._kind(pipeline) == _core.SCHEDULED
    pydron.enable(workers=2)
    try:
        # while enabled, scheduled functions still pickle and copy as the functions they are
        assert pickle.loads(pickle.dumps(pipeline)) is pipeline
        assert pickle.loads(pickle.dumps(double)) is double
        assert copy.deepcopy(pipeline) is pipeline
        assert isinstance(pipeline, type(double))
        assert inspect.isfunction(pipeline)
        assert pipeline([1, 2], scale=3) == [6, 12]
    finally:
        pydron.disable()
    assert type(pipeline) is type(double)
    assert pipeline([1, 2], scale=3) == [6, 12]


def test_functional_executor_is_checked():
    with pytest.raises(ValueError, match="executor must be one of"):
        pydron.functional(executor="gpu")
    with pytest.raises(TypeError, match="expects a Python function"):
        pydron.functional(len)
    with pytest.raises(TypeError, match="expects a Python function"):
        pydron.schedule(42)


def test_enable_rejects_bad_worker_counts():
    for bad in (0, -1, 2.5, "4", True):
        with pytest.raises(ValueError, match="workers must be a positive integer"):
            pydron.enable(workers=bad)


def test_methods_static_and_class_methods_can_be_marked():
    class Calib:
        @pydron.functional
        @staticmethod
        def scale(x):
            return x * 3

        @pydron.schedule
        def run(self, xs):
            return [self.scale(x) for x in xs]

    assert _core._kind(Calib.scale) == _core.FUNCTIONAL
    assert Calib().run([1, 2]) == [3, 6]


def _run(code, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env=full_env)


def test_kill_switch_changes_nothing():
    proc = _run("""
        import pydron
        @pydron.functional
        def f(x): return x + 1
        @pydron.schedule
        def g(xs): return [f(x) for x in xs]
        pydron.enable()
        from pydron import _core
        print(pydron.is_enabled(), _core._kind(f), _core._kind(g), type(g).__name__, g([1, 2]))
    """, env={"PYDRON_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "0", "0", "function", "[2,", "3]"]


def test_bad_intercept_mode_is_named():
    proc = _run("import pydron; pydron.enable()", env={"PYDRON_INTERCEPT": "magic"})
    assert proc.returncode != 0
    assert "environment PYDRON_INTERCEPT: intercept must be 'vectorcall' or 'hook', got 'magic'" \
        in proc.stderr


def test_llvm_jit_compiles_and_runs():
    assert _core._jit_add(40, 2) == 42
    versions = _core.versions()
    assert set(versions) == {"python", "llvm", "libffi", "xxhash"}
    assert versions["llvm"][0].isdigit() and versions["xxhash"].count(".") == 2


def test_ctypes_function_pointer_is_a_functional_thread_task():
    proc = _run("""
        import ctypes, ctypes.util, math, pydron
        libm = ctypes.CDLL(ctypes.util.find_library("m"))
        cos = libm.cos
        cos.argtypes = [ctypes.c_double]
        cos.restype = ctypes.c_double
        assert pydron.functional(cos, executor="threads") is cos
        try:
            pydron.functional(libm.sin, executor="processes")
        except ValueError as exc:
            assert "runs on threads" in str(exc)
        else:
            raise AssertionError("processes accepted for a ctypes pointer")
        @pydron.schedule
        def run(xs):
            return [cos(x) for x in xs]
        pydron.enable(workers=2)
        before = pydron.stats()["submitted"]
        got = run([0.0, 1.0, 2.0])
        assert got == [math.cos(0.0), math.cos(1.0), math.cos(2.0)], got
        print(pydron.stats()["submitted"] - before)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"     # each call ran as a task
