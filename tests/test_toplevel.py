"""`pydron run` scheduling a script's top-level code (pydron/_toplevel.py): unedited scripts with
their loop at the top level, run as `pydron run --functional mod.f script.py`, must print what
plain `python script.py` prints, with their functional calls run as tasks in parallel workers;
plain functions, class bodies and imports at the top level see plain values; a run that
schedules nothing says so."""
import ast
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from pydron import _rewrite
from pydron._toplevel import ModuleRuntime

PY = sys.executable


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def run(*args, cwd, env=None, timeout=120):
    full_env = dict(os.environ)
    for name in ("PYDRON_DISABLE", "PYDRON_WORKERS", "PYDRON_LOG"):
        full_env.pop(name, None)
    full_env["PYDRON_PROGRESS"] = "0"
    full_env.update(env or {})
    return subprocess.run([str(a) for a in args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def plain(script, cwd, env=None):
    out = run(PY, script, cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def pydron_run(*args, cwd, env=None):
    return run(PY, "-m", "pydron", "run", "--workers", "2", *args, cwd=cwd, env=env)


def tasks_submitted(stderr: str) -> int:
    """With PYDRON_LOG=info, `pydron run` logs its task counters at the end."""
    line = next(ln for ln in stderr.splitlines() if "tasks of" in ln)
    return ast.literal_eval(line.split(": ", 3)[-1])["submitted"]


LOOP = """
    import json
    import os
    import time

    def measure(i):
        # functional: the time it runs and where are kept for the test, beside the script
        start = time.monotonic()
        time.sleep(0.3)
        record = {"i": i, "pid": os.getpid(), "start": start, "end": time.monotonic()}
        with open(os.path.join(os.environ["RECORDS"], "%d.json" % i), "w") as f:
            json.dump(record, f)
        return i * i

    results = []
    for i in range(6):
        results.append(measure(i))
    total = sum(results)
    print("master", os.getpid() == int(os.environ.get("MASTER_PID", os.getpid())))
    print(results, total)
"""


def test_unedited_loop_at_top_level_runs_tasks_in_parallel(tmp_path):
    script = write(tmp_path / "loop.py", LOOP)
    (tmp_path / "plain").mkdir()
    (tmp_path / "pydron").mkdir()
    expected = plain(script, tmp_path, env={"RECORDS": str(tmp_path / "plain")})
    out = pydron_run("--functional", "loop.measure", script, cwd=tmp_path,
                     env={"RECORDS": str(tmp_path / "pydron"), "PYDRON_LOG": "info"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected
    assert tasks_submitted(out.stderr) == 6
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "pydron").iterdir())]
    assert sorted(r["i"] for r in records) == list(range(6))
    pids = {r["pid"] for r in records}
    assert len(pids) == 2, f"the tasks ran in {pids}"
    overlapping = [(a["i"], b["i"]) for a in records for b in records
                   if a["pid"] != b["pid"] and a["start"] < b["end"] and b["start"] < a["end"]]
    assert overlapping, f"no two tasks in different workers overlapped: {records}"
    # plainly, everything ran in one process, one call after the other
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "plain").iterdir())]
    assert len({r["pid"] for r in records}) == 1


GLOBALS = """
    import json
    from collections import namedtuple
    from math import sqrt

    Point = namedtuple("Point", "x y")

    def square(x):
        return x * x

    def kinds():
        # a plain function that reads the script's globals, never passed them
        return [type(v).__name__ for v in (single, listed[0], table["k"], pair[1], walked)]

    single = square(3)
    listed = []
    listed.append(square(4))
    table = {}
    table["k"] = square(5)
    pair = (square(6), square(7))
    for walked in [square(i) for i in range(3)]:
        pass
    print(kinds())

    class Holder:
        seen = type(single).__name__
        doubled = single * 2

    print(Holder.seen, Holder.doubled, Point.__module__, Point(1, 2))
    print(sorted(name for name in globals() if not name.startswith("__")))
    print(sorted(name for name in dir() if not name.startswith("__")) == sorted(
        name for name in globals() if not name.startswith("__")))
    print(json.dumps(table), sqrt(single), sum(square(i) for i in range(4)))
    listed.extend([square(8), square(9)])
    print(kinds(), listed)
"""


def test_plain_code_at_top_level_sees_plain_values(tmp_path):
    """Plain functions reading globals (a name, a list filled by append, a dict by a subscript
    store, a tuple, a loop variable), a class body, namedtuple's caller lookup, globals() and
    dir() without pydron's hidden names, a generator expression: as plain Python."""
    script = write(tmp_path / "globals_seen.py", GLOBALS)
    out = pydron_run("--functional", "square", script, cwd=tmp_path, env={"PYDRON_LOG": "info"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == plain(script, tmp_path)
    assert tasks_submitted(out.stderr) >= 12


REGIONS = """
    import sys

    def check(x):
        if x == 3:
            raise ValueError("bad %d" % x)
        return x + 1

    value = "unset"
    try:
        value = check(3)
    except ValueError as e:
        print("caught", e, value)
    finally:
        print("finally")
    collected = []
    try:
        for i in range(5):
            collected.append(check(i))
    except ValueError as e:
        print("stopped", e, collected)
    with open(__file__) as f:
        first = check(len(f.readline()))
    print("first", first)
    last = check(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print("never printed when it fails", last)
"""


CONSTRUCTS = """
    import math
    from math import *
    import collections as col

    def f(x):
        return x * 3 + 1

    def g(a, b=2, *, c=3):
        return (a, b, c)

    a, b = f(1), f(2)
    total = 0
    for i in range(5):
        total += f(i)
    n = 0
    while n < f(1):
        n += 1
    x: int = f(7)
    print(a, b, total, n, x, __annotations__)
    squares = {i: f(i) for i in range(4)}
    uniq = {f(i) % 3 for i in range(6)}
    nested = [[f(i + j) for j in range(2)] for i in range(3)]
    print(squares, sorted(uniq), nested)
    print(f"{a} and {f(3):>5} {g(f(1), c=f(2))}", "%d-%s" % (f(2), g(1)))
    del a
    try:
        print(a)
    except NameError as e:
        print("deleted", e)
    if (w := f(4)) > 10:
        print("walrus", w)
    match g(f(0), f(1)):
        case (1, b2, 3):
            print("matched", b2)
        case _:
            print("no match")
    assert f(0) == 1, "f(0)"
    results = [f(i) for i in range(6)]
    print(*results, sep=",")
    print(sorted(results, key=lambda v: -v), max(results), sqrt(f(8)))
    counter = col.Counter(v % 2 for v in results)
    print(dict(counter))
    class Acc:
        scale = f(2)
        def __init__(self):
            self.items = []
        def add(self, v):
            self.items.append(v * self.scale)
    acc = Acc()
    for r in results:
        acc.add(r)
    print(acc.items)
    def uses_global():
        global total
        total = total + f(100)
        return total
    print(uses_global(), total)
    with open(__file__) as fh:
        head = f(len(fh.readline()))
    print(head)
    table = {}
    for i in range(3):
        table[i] = f(i)
        table.setdefault("k", []).append(f(i))
    print(table)
    t = tuple(f(i) for i in range(3))
    print(t, type(t[0]).__name__, len(t))
    if __name__ == "__main__":
        out = []
        for i in range(4):
            out.append(g(f(i)))
        print(out)
    gen = (f(i) for i in range(3))
    print(next(gen), list(gen))
    print(sorted(k for k in globals() if not k.startswith("__") and k not in dir(math)))
    exec("zz = f(5)")
    print(zz, sorted(k for k in locals() if k.startswith(".")), eval("f(2) + zz"))
"""


def test_top_level_constructs_as_plain_python(tmp_path):
    """Tuple assignment, augmented assignment, while, annotations, comprehensions (3.12: inlined
    in module code), f-strings, del, walrus, match, assert, star arguments, lambdas, generator
    expressions, `from m import *`, a class using a result in its body, a plain function with
    `global`, with, subscript stores, `if __name__ == "__main__":`, exec/eval/locals(): the
    script prints what plain Python prints, and its functional calls were tasks."""
    script = write(tmp_path / "constructs.py", CONSTRUCTS)
    out = pydron_run("--functional", "f", "--functional", "g", script, cwd=tmp_path,
                     env={"PYDRON_LOG": "info"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == plain(script, tmp_path)
    assert tasks_submitted(out.stderr) >= 60


def test_try_regions_and_failures_at_top_level(tmp_path):
    script = write(tmp_path / "regions.py", REGIONS)
    assert pydron_run("--functional", "check", script, cwd=tmp_path).stdout == plain(
        script, tmp_path)
    expected = run(PY, script, "3", cwd=tmp_path)
    out = pydron_run("--functional", "check", script, "3", cwd=tmp_path)
    assert expected.returncode == 1
    assert (out.returncode, out.stdout) == (expected.returncode, expected.stdout)
    assert out.stderr.splitlines()[-1] == expected.stderr.splitlines()[-1] == "ValueError: bad 3"
    assert "_toplevel.py" not in out.stderr and "cli.py" not in out.stderr, out.stderr


def test_schedule_main_explicitly_and_with_a_scheduled_function(tmp_path):
    script = write(tmp_path / "both.py", """
        def square(x):
            return x * x

        def total(xs):
            return sum(square(x) for x in xs)

        parts = [total(range(i)) for i in range(5)]
        print(parts, [square(p) for p in parts])
    """)
    expected = plain(script, tmp_path)
    for names in (["--schedule", "__main__"], ["--schedule", "__main__", "--schedule", "total"]):
        out = pydron_run("--functional", "square", *names, script, cwd=tmp_path,
                         env={"PYDRON_LOG": "info"})
        assert out.returncode == 0, out.stderr
        assert out.stdout == expected
        assert tasks_submitted(out.stderr) > 0, names
    # a scheduled function named without __main__: the top level stays plain, total() schedules
    out = pydron_run("--functional", "square", "--schedule", "total", script, cwd=tmp_path,
                     env={"PYDRON_LOG": "info"})
    assert out.stdout == expected and tasks_submitted(out.stderr) == 10


def test_a_run_that_schedules_nothing_says_so(tmp_path):
    script = write(tmp_path / "inside_main.py", """
        def square(x):
            return x * x

        def main():
            return [square(i) for i in range(4)]

        if __name__ == "__main__":
            print(main())
    """)
    out = pydron_run("--functional", "square", script, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == plain(script, tmp_path)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "scheduled nothing" in lines[0] and "square" in lines[0] and "--schedule" in lines[0]
    # once main is scheduled, the same run does not warn: it prints the wait report only
    out = pydron_run("--functional", "square", "--schedule", "main", script, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "scheduled nothing" not in out.stderr
    assert out.stderr.startswith("pydron report (per scheduled function):\n  main: 1 call(s), "
                                 "4 task(s)"), out.stderr


# --- the rewrite of module code -------------------------------------------------------------------

_HELPERS = ("call", "call_ex", "force", "force_deep", "store_subscr", "mark", "force_since",
            "force_before", "enter_handler", "handler_guard", "undo", "log_store")


def _fake_core():
    """Enough of a runtime for rewriting: its helpers are only constants of the code."""
    core = types.SimpleNamespace(**{name: types.SimpleNamespace(helper=name)
                                    for name in _HELPERS})
    core.Pending, core.FUNCTIONAL = type("Pending", (), {}), 1
    return core


def test_module_role_needs_module_code_and_a_module_runtime():
    module_code = compile("x = f(1)\nprint(x)\n", "<script>", "exec")
    rt = ModuleRuntime(_fake_core(), {})
    new = _rewrite.rewrite(module_code, rt, role="module")
    assert rt.logged_types in new.co_consts and rt.pending_names in new.co_consts
    assert rt.before_call in new.co_consts
    with pytest.raises(_rewrite.RewriteError, match="module runtime"):
        _rewrite.rewrite(module_code, _fake_core(), role="module")
    with pytest.raises(_rewrite.RewriteError, match="module's code"):
        _rewrite.rewrite(test_module_role_needs_module_code_and_a_module_runtime.__code__, rt,
                         role="module")
    _rewrite.forget(rt)


def test_module_code_keeps_its_functions_and_classes_plain():
    source = ("def f(x):\n    return [x for _ in range(2)]\n"
              "class C:\n    def m(self):\n        return 1\n"
              "g = lambda: 2\nsquares = [f(i) for i in range(3)]\n"
              "total = sum(f(i)[0] for i in range(3))\n")
    module_code = compile(source, "<script>", "exec")
    rt = ModuleRuntime(_fake_core(), {})
    new = _rewrite.rewrite(module_code, rt, role="module")
    before = {c.co_name: c for c in module_code.co_consts if isinstance(c, types.CodeType)}
    after = {c.co_name: c for c in new.co_consts if isinstance(c, types.CodeType)}
    for name in ("f", "C", "<lambda>"):
        assert after[name] is before[name], name           # plain Python, untouched
    assert after["<genexpr>"] is not before["<genexpr>"]   # an expression: rewritten
    assert rt.call in after["<genexpr>"].co_consts
    _rewrite.forget(rt)
