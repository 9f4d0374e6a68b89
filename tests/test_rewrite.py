"""The bytecode rewrite (pydron._rewrite) itself, run by the pure-Python reference runtime
(pydron._reference): the parallel structure it leaves (nothing waits before a result is read),
how often it forces, tracebacks, the structure of rewritten code, refusals, rewrite time, the
standard library run as scheduled code, and random programs against plain Python.

What rewritten code computes, construct by construct, is the semantics corpus's business
(tests/semantics, run in every mode by test_semantics.py)."""

import io
import sys
import time
import traceback
import types

import numpy as np
import pytest
import re._parser as re_parser

from pydron import _rewrite
from pydron._reference import Pending, ReferenceRuntime
from semantics import cases_constructs, cases_regions
from semantics.registry import load_all


def functional(f):
    f.__pydron_kind__ = "functional"
    return f


def scheduled(f):
    f.__pydron_kind__ = "scheduled"
    return f


@functional
def sq(x):
    return x * x


@functional
def add(a, b):
    return a + b


@functional
def fail(x):
    if x == 3:
        raise ValueError("bad %r" % (x,))
    return x


def _same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b) and a.dtype == b.dtype
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.generic):
        return a == b
    return a == b


def _no_pending(v, seen=None):
    seen = set() if seen is None else seen
    if id(v) in seen:
        return True
    seen.add(id(v))
    if type(v) is Pending:
        return False
    if isinstance(v, (list, tuple)):
        return all(_no_pending(x, seen) for x in v)
    if isinstance(v, dict):
        return all(_no_pending(x, seen) for x in v.values())
    return True


# ---------------------------------------------------------------------------------------
# parallelism structure and forcing cost
# ---------------------------------------------------------------------------------------

def p_fanout():
    r = [sq(x) for x in range(8)]
    return sum(r)


def p_fanout_loop():
    r = []
    for x in range(8):
        r.append(sq(x))
        n = len(r)
    return r, n


def p_dict_fanout():
    d = {}
    for x in range(6):
        d[x] = sq(x)
    return d


def p_chain_then_fan():
    a = [sq(x) for x in range(4)]
    b = [add(v, 1) for v in a]  # dependencies, still no waiting
    return b


def p_try_region():
    try:
        r = [sq(x) for x in range(5)]
    except ValueError:
        r = []
    return r


def p_while_in_try():
    i = 0
    r = []
    try:
        while i < 6:
            r.append(sq(i))
            i += 1
    except ValueError:
        pass
    return r


def p_for_in_try():
    r = []
    try:
        for x in range(7):
            r.append(sq(x))
    finally:
        pass
    return r


def p_try_in_loop():
    r = []
    for x in range(5):
        try:
            r.append(sq(x))
        except ValueError:
            pass
    return r


def p_concat():
    a = [sq(x) for x in range(3)]
    b = [sq(x) for x in range(3, 5)]
    c = a + b
    c += [sq(5)]
    c += (sq(6),)
    t = (sq(7),) + (sq(8),)
    return c, t


def test_fanout_outstanding():
    for fn, n in ((p_fanout, 8), (p_fanout_loop, 8), (p_dict_fanout, 6), (p_chain_then_fan, 8),
                  (p_try_region, 5), (p_while_in_try, 6), (p_for_in_try, 7), (p_concat, 9)):
        rt = ReferenceRuntime()
        assert _same(rt.run(fn), fn())
        assert rt.submitted == n, fn
        assert rt.outstanding_at_force[0] == n, (fn, rt.outstanding_at_force)


class CountingRuntime(ReferenceRuntime):
    def __init__(self):
        super().__init__()
        self.calls = {"force": 0, "force_deep": 0, "call": 0}

    def force(self, x):
        if sys._getframe(1).f_code.co_filename == __file__:  # from rewritten code only
            self.calls["force"] += 1
        return super().force(x)

    def force_deep(self, x):
        if sys._getframe(1).f_code.co_filename == __file__:
            self.calls["force_deep"] += 1
        return super().force_deep(x)


def k_arith_loop(n):
    t = 0
    for i in range(n):
        t = t + i * 2 - i
    return t


def k_while_loop(n):
    i = 0
    t = 0
    while i < n:
        t += i
        i += 1
    return t


def test_loop_force_cost():
    """Values proved not pending are not forced: a few helper calls per iteration at most."""
    for fn, per_iter in ((k_arith_loop, 2), (k_while_loop, 2)):
        rt = CountingRuntime()
        n = 1000
        assert rt.run(fn, n) == fn(n)
        helpers = rt.calls["force"] + rt.calls["force_deep"]
        assert helpers <= per_iter * n + 10, (fn.__name__, rt.calls)
        print(fn.__name__, "helper calls per iteration: %.2f" % (helpers / n))


def k_len_loop(n):
    r = []
    for x in range(n):
        r.append(sq(x))
        if len(r) > n:
            break
    return r


_spans = []  # (start, end) of each slow() task


@functional
def slow(x):
    start = time.perf_counter()
    time.sleep(0.2)
    _spans.append((start, time.perf_counter()))
    return x


def p_slow_fanout(n):
    return sum([slow(x) for x in range(n)])


def test_tasks_really_overlap():
    """The list comprehension submits all four tasks before the sum reads any: on a pool of
    four threads they run at the same time."""
    _spans.clear()
    rt = ReferenceRuntime(threads=4)
    try:
        assert rt.run(p_slow_fanout, 4) == 6
    finally:
        rt.close()
    assert len(_spans) == 4
    overlapping = [(a, b) for i, a in enumerate(_spans) for b in _spans[i + 1:]
                   if a[0] < b[1] and b[0] < a[1]]
    assert overlapping, _spans


def test_try_in_loop_waits_per_iteration():
    """A try region is awaited before it is left: one outstanding task at each exit."""
    rt = ReferenceRuntime()
    assert rt.run(p_try_in_loop) == p_try_in_loop()
    assert rt.outstanding_at_force == [1] * 5


def test_len_of_pendings_does_not_force():
    rt = CountingRuntime()
    rt.run(k_len_loop, 50)
    assert rt.outstanding_at_force[0] == 50


# ---------------------------------------------------------------------------------------
# tracebacks, refusals, structure of the rewritten code
# ---------------------------------------------------------------------------------------

def t_traceback(x):
    a = fail(x)
    b = [1, 2]
    return a + b[0]  # the failure surfaces here  # TRACE-LINE


def test_traceback_points_at_user_line():
    rt = ReferenceRuntime()
    with pytest.raises(ValueError) as info:
        rt.run(t_traceback, 3)
    frames = traceback.extract_tb(info.value.__traceback__)
    names = [f.name for f in frames]
    assert "t_traceback" in names and "fail" in names  # user frame and worker frame
    user = [f for f in frames if f.name == "t_traceback"][0]
    assert "TRACE-LINE" in user.line
    worker = [f for f in frames if f.name == "fail"][0]
    assert "raise ValueError" in worker.line


def test_rewritten_code_keeps_identity():
    rt = ReferenceRuntime()
    for fn in (cases_constructs.closure, cases_regions.try_in_loop, cases_constructs.defaults,
               cases_constructs.starargs, cases_regions.with_statement):
        code = fn.__code__
        new = _rewrite.rewrite(code, rt)
        assert new.co_name == code.co_name and new.co_qualname == code.co_qualname
        assert new.co_argcount == code.co_argcount
        assert new.co_posonlyargcount == code.co_posonlyargcount
        assert new.co_kwonlyargcount == code.co_kwonlyargcount
        assert new.co_flags == code.co_flags
        assert new.co_varnames[:len(code.co_varnames)] == code.co_varnames
        assert all(v.startswith(".pydron_") for v in new.co_varnames[len(code.co_varnames):])
        assert new.co_freevars == code.co_freevars and new.co_cellvars == code.co_cellvars
        assert new.co_filename == code.co_filename
        assert new.co_firstlineno == code.co_firstlineno
        old_lines = {l for _, _, l in code.co_lines() if l is not None}
        new_lines = {l for _, _, l in new.co_lines() if l is not None}
        assert new_lines <= old_lines | {code.co_firstlineno}
        assert _rewrite.rewrite(code, rt) is new  # cached


def test_nested_code_rewritten_by_role():
    rt = ReferenceRuntime()
    class_inside = cases_constructs.class_inside
    new = _rewrite.rewrite(class_inside.__code__, rt)
    consts = [c for c in new.co_consts if isinstance(c, types.CodeType)]
    body = [c for c in consts if c.co_name == "Local"][0]
    assert body is [c for c in class_inside.__code__.co_consts
                    if isinstance(c, types.CodeType) and c.co_name == "Local"][0]
    new = _rewrite.rewrite(cases_constructs.lambdas.__code__, rt)
    inner = [c for c in new.co_consts if isinstance(c, types.CodeType)][0]
    assert rt.call in inner.co_consts and rt.force_deep in inner.co_consts


async def _coro():
    return 1


def _gen():
    yield 1


async def _agen():
    yield 1


def test_is_rewritable_refusals():
    assert _rewrite.is_rewritable(cases_constructs.listcomp.__code__) == (True, "")
    for f, word in ((_coro, "coroutine"), (_gen, "generator"), (_agen, "async generator")):
        ok, reason = _rewrite.is_rewritable(f.__code__)
        assert not ok and word in reason
    with pytest.raises(_rewrite.RewriteError):
        _rewrite.rewrite(_gen.__code__, ReferenceRuntime())
    rt = ReferenceRuntime()
    assert rt.run(_gen) is not None  # refused: runs plainly


def test_refusal_message_says_its_point_once(caplog):
    """The warning for a scheduled generator: what runs plainly and why, each said once."""
    from pydron import _api
    with caplog.at_level("WARNING", logger="pydron"):
        assert _api._rewrite_code(_gen.__code__) is None
    (message,) = [r.getMessage() for r in caplog.records if r.name == "pydron"]
    assert "_gen runs plainly" in message and "generators" in message, message
    assert message.count("plainly") == 1, message


def test_rewrite_time(capsys):
    """Every scheduled function of the semantics corpus is rewritten (none refused); the time
    per code object is printed, not asserted (the machine is shared)."""
    rt = ReferenceRuntime()
    times = []
    seen = set()
    for case in load_all():
        code = case.fn.__code__
        if code in seen:
            continue
        seen.add(code)
        _rewrite._cache.clear()
        t0 = time.perf_counter()
        _rewrite.rewrite(code, rt)   # a RewriteError fails the test
        dt = time.perf_counter() - t0
        n_codes = 1 + sum(isinstance(c, types.CodeType) for c in code.co_consts)
        times.append((dt / n_codes, len(code.co_code) // 2, code.co_qualname))
    per_code = sorted(t for t, _, _ in times)
    slowest = max(times)
    with capsys.disabled():
        print("\nrewrite time per code object: median %.2f ms, max %.2f ms (%s, %d instrs),"
              " over %d functions" % (per_code[len(per_code) // 2] * 1e3, slowest[0] * 1e3,
                                      slowest[2], slowest[1], len(times)))
    assert len(times) >= 250, len(times)


# ---------------------------------------------------------------------------------------
# every Python function scheduled: stdlib code run through the rewriter gives plain results
# ---------------------------------------------------------------------------------------

def _everything_scheduled(f):
    if isinstance(f, types.MethodType):
        f = f.__func__
    return isinstance(f, types.FunctionType) and _rewrite.is_rewritable(f.__code__)[0]


def _stdlib_work():
    import ast
    import calendar
    import colorsys
    import copy
    import csv
    import dataclasses
    import decimal
    import difflib
    import email.utils
    import fractions
    import io
    import ipaddress
    import json.encoder
    import os.path
    import pprint
    import shlex
    import statistics
    import string
    import textwrap
    import tokenize
    import urllib.parse
    return [
        lambda: list(difflib.unified_diff("abc\ndef\nghi".splitlines(),
                                          "abc\nxyz\nghi".splitlines())),
        lambda: difflib.SequenceMatcher(None, "kitten sitting", "sitting kitten").ratio(),
        lambda: textwrap.fill("hello world " * 20, width=30),
        lambda: pprint.pformat({"a": [1, 2, {"b": (3, 4)}], "c": set(range(5))}),
        lambda: (statistics.median([5, 1, 4, 2, 3]), statistics.stdev([1.0, 2.5, 3.5, 7.0])),
        lambda: str(fractions.Fraction(3, 4) + fractions.Fraction(5, 6) * 2),
        lambda: string.Template("$a and ${b}").substitute(a=1, b="x"),
        lambda: ast.literal_eval("{'a': [1, 2.5, (3, None)], 'b': -4}"),
        lambda: json.encoder.JSONEncoder(indent=2).encode({"a": [1, 2, {"b": None}]}),
        lambda: shlex.split("a 'b c' \"d e\" f\\ g"),
        lambda: (urllib.parse.urlparse("http://u:p@host:80/p/a?q=1#f")._asdict(),
                 urllib.parse.parse_qs("a=1&b=2&a=3")),
        lambda: [str(h) for h in ipaddress.ip_network("10.0.0.0/29").hosts()],
        lambda: (calendar.monthrange(2024, 2), colorsys.rgb_to_hls(0.2, 0.4, 0.6)),
        lambda: copy.deepcopy({"a": [1, {"b": 2}], "c": (3,)}),
        lambda: email.utils.parseaddr("Foo Bar <foo@bar.com>"),
        lambda: str(decimal.Decimal("1.1") + decimal.Decimal("2.2")),
        lambda: list(csv.reader(io.StringIO('a,b\n1,"2,3"\n'))),
        lambda: dataclasses.asdict(dataclasses.make_dataclass("P", ["x", "y"])(1, [2, 3])),
        lambda: tokenize.untokenize(list(tokenize.generate_tokens(
            io.StringIO("x = 1 + 2\n").readline))),
        lambda: os.path.join("a", "b", "/c", "d"),
        _argparse_work, _json_py_decoder, _pickle_py, _configparser_work, _email_work,
        lambda: repr(re_parser.parse(r"(?P<x>a|b)+\d{2,3}[^c-e]*?(?=z)(?:q|r)")),
        _dataclass_enum_work, _html_parser_work,
    ]


def _argparse_work():
    import argparse
    import contextlib
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--n", type=int, default=3)
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("go").add_argument("-v", action="count", default=0)
    a = p.parse_args(["--n", "5", "go", "-v"])
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            p.parse_args(["--n", "zz"])
        except SystemExit as e:
            code = e.code
    return vars(a), p.format_help(), code


def _json_py_decoder():
    import json.decoder
    import json.scanner
    d = json.decoder.JSONDecoder()
    d.parse_string = json.decoder.py_scanstring
    d.scan_once = json.scanner.py_make_scanner(d)
    return d.decode('{"a": [1, 2.5, "x\\u00e9", {"b": null, "c": true}], "d": -3e2}')


def _pickle_py():
    import pickle
    b = io.BytesIO()
    pickle._Pickler(b, 2).dump({"a": [1, (2, 3)], "b": "x" * 3, "c": {4, 5}})
    return pickle._loads(b.getvalue())


def _configparser_work():
    import configparser
    c = configparser.ConfigParser()
    c.read_string("[a]\nx = 1\ny = %(x)s2\n[b]\nz: 3\n")
    return {sec: dict(c[sec]) for sec in c.sections()}


def _email_work():
    import email.parser
    m = email.parser.Parser().parsestr("From: a@b\nTo: c@d\nSubject: hi\n\nbody\n")
    return m["Subject"], m.get_payload()


def _dataclass_enum_work():
    import dataclasses
    import enum

    @dataclasses.dataclass(order=True)
    class P:
        x: int
        y: list = dataclasses.field(default_factory=list)

    class Color(enum.Enum):
        RED = 1
        GREEN = 2

    return repr(sorted([P(2), P(1, [3])])), dataclasses.astuple(P(1, [2])), Color(2).name


def _html_parser_work():
    import html.parser
    out = []

    class Collect(html.parser.HTMLParser):
        def handle_starttag(self, tag, attrs):
            out.append((tag, attrs))

        def handle_data(self, data):
            out.append(data)

    Collect().feed("<p class='x'>hi<b>there</b></p>")
    return out


@pytest.mark.parametrize("index", range(len(_stdlib_work())))
def test_stdlib_everything_scheduled(index):
    work = _stdlib_work()[index]
    expected = work()
    rt = ReferenceRuntime(is_scheduled=_everything_scheduled)
    try:
        assert rt.run(work) == expected
    finally:
        rt.close()


# ---------------------------------------------------------------------------------------
# random programs: try/except/finally nests around calls that may fail, against plain Python
# ---------------------------------------------------------------------------------------

@functional
def f_add(a, b):
    if (a + b) % 7 == 3:
        raise ValueError("add %d %d" % (a, b))
    return (a + b) % 50


@functional
def f_key(a):
    if a % 5 == 4:
        raise KeyError("key %d" % a)
    return (a * 3) % 50


class Suppress:
    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        return et is KeyError


class _ProgramGen:
    """Random scheduled functions. Inside try bodies only calls are assigned or appended (so
    that plain Python and pydron agree exactly; other statements after a failing call may run
    under pydron, the documented difference); outside, results are also consumed."""

    def __init__(self, rng):
        self.rng = rng
        self.nvars = 4
        self.lines = []

    def var(self):
        return "v%d" % self.rng.randrange(self.nvars)

    def arg(self):
        return self.var() if self.rng.random() < 0.6 else str(self.rng.randrange(10))

    def call(self):
        if self.rng.random() < 0.7:
            return "f_add(%s, %s)" % (self.arg(), self.arg())
        return "f_key(%s)" % self.arg()

    def emit(self, depth, line):
        self.lines.append("    " * depth + line)

    def block(self, depth, in_try, budget):
        for n in range(self.rng.randint(1, 3)):
            if budget <= 0 and n:
                break
            budget -= 1
            r = self.rng.random() if budget > 0 else 0.0
            if r < 0.35:
                self.emit(depth, "%s = %s" % (self.var(), self.call()))
            elif r < 0.5:
                self.emit(depth, "out.append(%s)" % self.call())
            elif r < 0.65 and depth < 5:
                self.try_stmt(depth, budget, in_try)
            elif r < 0.72 and depth < 5:
                self.emit(depth, "for i in range(%d):" % self.rng.randint(1, 3))
                self.emit(depth + 1, "%s = f_add(%s, i)" % (self.var(), self.arg()))
                if self.rng.random() < 0.5:
                    self.emit(depth + 1, "out.append(f_key(i))")
                if self.rng.random() < 0.3:
                    self.emit(depth + 1, self.rng.choice(["break", "continue"]))
            elif r < 0.77 and depth < 5:
                self.emit(depth, "with Suppress():")
                self.block(depth + 1, True, budget - 1)
            elif r < 0.79 and in_try:
                self.emit(depth, "return out, %s" % ", ".join("v%d" % k for k in range(self.nvars)))
                return
            elif not in_try and r < 0.87:
                self.emit(depth, "%s = (%s + %s) %% 50" % (self.var(), self.var(), self.arg()))
            elif not in_try and depth < 5:
                self.emit(depth, "if %s > %d:" % (self.var(), self.rng.randrange(40)))
                self.block(depth + 1, in_try, budget - 1)
                self.emit(depth, "else:")
                self.emit(depth + 1, "out.append(%d)" % self.rng.randrange(100))
            else:
                self.emit(depth, "%s = %s" % (self.var(), self.call()))

    def try_stmt(self, depth, budget, in_try):
        # inside a try body, handlers and finally blocks only call (their effects are undone
        # if the enclosing region was aborted earlier); outside, they also append
        self.emit(depth, "try:")
        self.block(depth + 1, True, budget - 1)
        kinds = self.rng.sample(["ValueError", "KeyError", "Exception", None], 2)
        handled = False
        for k in kinds:
            if k is None:
                continue
            handled = True
            self.emit(depth, "except %s as e:" % k)
            v = self.var()
            if in_try:
                self.emit(depth + 1, "%s = f_add(%s, %d)" % (v, v, len(k)))
            else:
                self.emit(depth + 1, "out.append(%r + str(e))" % k[0])
                if self.rng.random() < 0.3:
                    self.emit(depth + 1, "%s = %d" % (v, self.rng.randrange(10)))
        if not handled or self.rng.random() < 0.3:
            self.emit(depth, "finally:")
            v = self.var()
            self.emit(depth + 1, "%s = f_key(%s)" % (v, v) if in_try else "out.append('f')")

    def program(self, name):
        self.lines = []
        self.emit(0, "def %s(a):" % name)
        self.emit(1, "out = []")
        for k in range(self.nvars):
            self.emit(1, "v%d = a + %d" % (k, k))
        self.block(1, False, 12)
        self.emit(1, "return out, %s" % ", ".join("v%d" % k for k in range(self.nvars)))
        return "\n".join(self.lines) + "\n"


def _run_outcome(thunk):
    try:
        return ("value", thunk())
    except Exception as e:  # noqa: BLE001
        return ("raised", type(e).__name__, str(e))


@pytest.mark.parametrize("seed", range(8))
def test_random_try_programs(seed):
    import random
    rng = random.Random(seed)
    gen = _ProgramGen(rng)
    for k in range(40):
        src = gen.program("prog")
        ns = {"f_add": f_add, "f_key": f_key, "Suppress": Suppress}
        exec(compile(src, "<prog %d/%d>" % (seed, k), "exec"), ns)
        fn = ns["prog"]
        plain = {a: _run_outcome(lambda: fn(a)) for a in (0, 1, 2)}
        for threads in (0, 2):
            rt = ReferenceRuntime(threads=threads)
            try:
                for a in (0, 1, 2):
                    ours = _run_outcome(lambda: rt.run(fn, a))
                    assert ours == plain[a], "a=%d threads=%d\n%s" % (a, threads, src)
            finally:
                rt.close()


# ---------------------------------------------------------------------------------------
# random programs: results moved through containers and consumed in every way
# ---------------------------------------------------------------------------------------

@functional
def f_sq(x):
    return (x * x + 1) % 97


class _ConsumerGen:
    """Random scheduled functions over ints (i*), lists (l*) and dicts (d*) of call results:
    whatever is not forced where it must be shows up as a Pending or a wrong value."""

    def __init__(self, rng):
        self.rng = rng
        self.lines = []

    def i(self):
        return "i%d" % self.rng.randrange(3)

    def l(self):
        return "l%d" % self.rng.randrange(2)

    def emit(self, depth, line):
        self.lines.append("    " * depth + line)

    def stmt(self, depth):
        rng, i, l = self.rng, self.i, self.l
        choices = [
            lambda: "%s = f_sq(%s)" % (i(), i()),
            lambda: "%s = [f_sq(x) for x in range(%d)]" % (l(), rng.randint(1, 4)),
            lambda: "%s.append(f_sq(%s))" % (l(), i()),
            lambda: "d0[%s %% 5] = f_sq(%s)" % (i(), i()),
            lambda: "%s = (%s[%s %% len(%s)] + %s) %% 97 if %s else %s" % (
                i(), *(lambda a: (a, i(), a, i(), a, i()))(l())),
            lambda: "%s = len(%s) + len(d0)" % (i(), l()),
            lambda: "t = (%s, f_sq(%s)); %s, %s = t" % (i(), i(), i(), i()),
            lambda: "%s = sum(%s) %% 97" % (i(), l()),
            lambda: "%s = f'{%s}-{%s}'" % ("s0", i(), l()),
            lambda: "%s = max(d0.values(), default=0)" % i(),
            lambda: "%s = %s + [%s]" % (l(), l(), i()),
            lambda: "%s += [f_sq(%d)]" % (l(), rng.randrange(9)),
            lambda: "%s = d0.get(%s %% 5, 0) + 1" % (i(), i()),
            lambda: "%s = %s in %s" % ("b0", i(), l()),
            lambda: "%s = sorted(%s, key=lambda q: -q)" % (l(), l()),
            lambda: "%s = [v * 2 for v in %s if v %% 2]" % (l(), l()),
            lambda: "%s = {k: f_sq(v) for k, v in d0.items()}.get(0, %s)" % (i(), i()),
            lambda: "%s = %s[:2] + %s[-1:]" % (l(), l(), l()),
            lambda: "%s = %s == %s" % ("b0", l(), l()),
            lambda: "%s = str(d0)" % "s0",
        ]
        r = rng.random()
        if r < 0.1 and depth < 3:
            self.emit(depth, "if %s > %d:" % (i(), rng.randrange(97)))
            self.stmt(depth + 1)
            self.emit(depth, "else:")
            self.stmt(depth + 1)
        elif r < 0.18 and depth < 3:
            self.emit(depth, "for x in %s[:3]:" % l())
            self.emit(depth + 1, "%s = (%s + x) %% 97" % (i(), i()))
            self.stmt(depth + 1)
        elif r < 0.22 and depth < 3:
            self.emit(depth, "n = 0")
            self.emit(depth, "while %s < 60 and n < 4:" % i())
            self.emit(depth + 1, "n += 1")
            v = i()
            self.emit(depth + 1, "%s = f_sq(%s) + 1" % (v, v))
        else:
            self.emit(depth, rng.choice(choices)())

    def program(self):
        self.lines = []
        self.emit(0, "def prog(a):")
        self.emit(1, "i0, i1, i2 = a, f_sq(a), 3")
        self.emit(1, "l0, l1 = [f_sq(a + 1)], [1, f_sq(2)]")
        self.emit(1, "d0, s0, b0 = {0: f_sq(a)}, '', False")
        for _ in range(self.rng.randint(4, 12)):
            self.stmt(1)
        self.emit(1, "return i0, i1, i2, l0, l1, d0, s0, b0")
        return "\n".join(self.lines) + "\n"


@pytest.mark.parametrize("seed", range(6))
def test_random_consumer_programs(seed):
    import random
    gen = _ConsumerGen(random.Random(seed))
    for k in range(40):
        src = gen.program()
        ns = {"f_sq": f_sq}
        exec(compile(src, "<consumer %d/%d>" % (seed, k), "exec"), ns)
        fn = ns["prog"]
        plain = {a: _run_outcome(lambda: fn(a)) for a in (0, 5)}
        for threads in (0, 2):
            rt = ReferenceRuntime(threads=threads)
            try:
                for a in (0, 5):
                    ours = _run_outcome(lambda: rt.run(fn, a))
                    assert ours == plain[a], "a=%d threads=%d\n%s" % (a, threads, src)
                    assert _no_pending(ours)
            finally:
                rt.close()


@scheduled
def s_helper(xs):
    return [sq(x) for x in xs]


def calls_s_helper(xs):
    r = s_helper(xs)
    return sum(r), r


def test_refused_rewrite_runs_plainly(monkeypatch):
    real = _rewrite.translate

    def refuse(code, rt, role):
        if code is s_helper.__code__:
            raise _rewrite.RewriteError("refused for the test")
        return real(code, rt, role)

    monkeypatch.setattr(_rewrite, "translate", refuse)
    rt = ReferenceRuntime()
    try:
        with pytest.warns(RuntimeWarning, match="s_helper runs plainly"):
            assert rt.run(calls_s_helper, [1, 2, 3]) == calls_s_helper([1, 2, 3])
        with pytest.warns(RuntimeWarning, match="refused for the test"):
            assert ReferenceRuntime().run(s_helper, [2]) == [4]
    finally:
        rt.close()
