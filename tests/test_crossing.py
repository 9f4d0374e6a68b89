"""What crosses between the master and its workers (issue 11.1, 11.5, 11.6; pydron/_ship.py):
classes and functions of the script cross by value on every version, in `pydron run`, in
exec()'d code; what workers can import crosses by name, module attributes included (numpy's
global generator stays numpy's); every worker draws its own random numbers; a worker's
traceback names the script's file and lines. Each scenario runs in its own interpreter twice,
plainly (PYDRON_DISABLE=1) and under pydron, and must print the same; the pydron run also
proves its tasks ran in worker processes."""

import re
import sys

import pytest

from isolated import run

pytestmark = pytest.mark.nosan

# Appended to every scenario: under pydron, the tasks it made ran in workers.
PROOF = """
import sys as _sys, pydron as _pydron
if _pydron.is_enabled():
    _sys.stderr.write(f"submitted={_pydron.stats()['submitted']}\\n")
"""


def both(body, tmp_path, files=None, min_tasks=1, env=None):
    """Run body plainly and under pydron: same stdout, exit 0, tasks submitted under pydron."""
    plain = run(body + PROOF, tmp_path, files=files, env=dict(env or {}, PYDRON_DISABLE="1"))
    assert plain.returncode == 0, plain.stderr
    par = run(body + PROOF, tmp_path, files=files, env=env)
    assert par.returncode == 0, par.stderr
    assert par.stdout == plain.stdout, f"plain:\n{plain.stdout}\npydron:\n{par.stdout}\n{par.stderr}"
    submitted = re.search(r"submitted=(\d+)", par.stderr)
    assert submitted and int(submitted.group(1)) >= min_tasks, par.stderr
    return par


SCRIPT_CLASSES = """
import dataclasses, os, pydron
MASTER = os.getpid()
pydron.enable(workers=2)

@dataclasses.dataclass
class Params:
    gain: float = 1.5
    offset: int = 2

    @pydron.functional
    def apply(self, x):
        return x * self.gain + self.offset

class Result:
    def __init__(self, value, where):
        self.value, self.where = value, where
    def __repr__(self):
        return f"Result({self.value!r})"

def double(x):
    return 2 * x

@pydron.functional
def calibrate(p, x, fn):
    assert type(p) is Params and isinstance(p, Params)
    return Result(fn(p.apply(x)), os.getpid())

@pydron.schedule
def pipeline(p):
    direct = [p.apply(i) for i in range(4)]
    wrapped = [calibrate(p, i, double) for i in range(4)]
    lam = [calibrate(p, i, lambda v: v - 1) for i in range(3)]
    return direct, wrapped, lam

direct, wrapped, lam = pipeline(Params())
print(direct)
print(wrapped, lam)
print(all(type(r) is Result for r in wrapped + lam))
if pydron.is_enabled():
    assert all(r.where != MASTER for r in wrapped), "tasks ran in the master"
"""


def test_script_classes_cross_by_value(tmp_path):
    """A @dataclass defined after enable(), a functional method of it, instances as results,
    functions and lambdas of the script as arguments."""
    both(SCRIPT_CLASSES, tmp_path, min_tasks=11)


def test_script_classes_under_pydron_run(tmp_path):
    """Under `pydron run`, __main__ is the user's script made after the fork server: nothing of
    it can be found by name in a worker."""
    user = SCRIPT_CLASSES.replace("pydron.enable(workers=2)", "")
    plain = run("import runpy; runpy.run_path('user.py', run_name='__main__')", tmp_path,
                files={"user.py": user})
    assert plain.returncode == 0, plain.stderr
    par = run("import sys\nfrom pydron.cli import main\nsys.exit(main(['run', '--workers', '2', "
              "'user.py']))", tmp_path, files={"user.py": user + PROOF})
    assert par.returncode == 0, par.stderr
    assert par.stdout == plain.stdout
    assert int(re.search(r"submitted=(\d+)", par.stderr).group(1)) >= 11


def test_classes_in_exec_code(tmp_path):
    """Notebooks run cells through exec(): classes there have no importable module at all
    (without __name__ in the namespace their __module__ is 'builtins')."""
    both('''
import pydron
pydron.enable(workers=2)
CELL = """
import dataclasses

@dataclasses.dataclass
class Point:
    x: float
    y: float

    def norm(self):
        return (self.x ** 2 + self.y ** 2) ** 0.5

@pydron.functional
def norm_of(p):
    return Point(p.norm(), 0.0)

@pydron.schedule
def norms(n):
    return [norm_of(Point(i, i + 1)) for i in range(n)]

print(norms(4))
"""
exec(CELL, {"pydron": pydron})
exec(CELL, {"pydron": pydron, "__name__": "__main__"})
''', tmp_path, min_tasks=8)


def test_class_changed_between_calls_crosses_again(tmp_path):
    """A by-value class is sent once while unchanged; a method replaced or a global it names
    rebound makes it travel again."""
    both("""
import pydron
pydron.enable(workers=2)
SCALE = 2
OFFSET = 0.25

class Box:
    def __init__(self, v):
        self.v = v
    def value(self):
        return self.v * SCALE + OFFSET

@pydron.functional
def read(b):
    return b.value()

@pydron.schedule
def reads(n):
    return [read(Box(i)) for i in range(n)]

print(reads(3))
Box.value = lambda self: -self.v
print(reads(3))
del Box.value
Box.value = lambda self: self.v * SCALE + OFFSET
SCALE = 10
print(reads(3))
for offset in (0.5, 0.75, 1.5):   # floats: a freed one's address is soon another's
    OFFSET = offset * 3
    print(reads(2))
""", tmp_path, min_tasks=9)


def test_what_cannot_cross_names_function_argument_and_why(tmp_path):
    """A class of the script holding a lock crosses by value and fails there: the error names
    the function, the argument, the class and why it travels by value."""
    proc = run("""
import threading, pydron
pydron.enable(workers=2)

class Holder:
    lock = threading.Lock()

@pydron.functional
def use(h):
    return 1

@pydron.schedule
def go():
    return use(Holder())

try:
    go()
except TypeError as e:
    print(e)
""", tmp_path)
    assert proc.returncode == 0, proc.stderr
    msg = proc.stdout
    assert "__main__.use()" in msg and "argument 0 ('h')" in msg, msg
    assert "class __main__.Holder travels by value" in msg, msg
    assert "defined in the script" in msg and "lock" in msg, msg


def test_module_attributes_stay_the_modules(tmp_path):
    """`from numpy.random import rand` in the script: rand is numpy's global generator's method
    in the worker too, so seeding inside the task reaches it (plain Python's numbers); the same
    for random.random and for a sentinel of an imported module."""
    both("""
import pydron, numpy as np, random
from numpy.random import rand
from random import random as rnd
from lib import MISSING, is_missing, REGISTRY
lookup = REGISTRY.lookup          # a method of a module-level object, bound in the script
pydron.enable(workers=2)

@pydron.functional
def draw(seed):
    np.random.seed(seed)
    random.seed(seed)
    return round(float(rand()), 12), round(rnd(), 12), is_missing(MISSING), lookup()

@pydron.schedule
def draws():
    return [draw(s) for s in range(4)]

print(draws())
""", tmp_path, files={"lib.py": """
MISSING = object()
def is_missing(x):
    return x is MISSING
class Registry:
    def lookup(self):
        return self is REGISTRY
REGISTRY = Registry()
"""}, min_tasks=4)


def test_unseeded_draws_differ_across_workers(tmp_path):
    """Workers are forks: without a reseed they share one numpy generator state. Each worker's
    first unseeded draws (numpy's and random's) differ from the other's and from the master's."""
    proc = run("""
import os, time, random, pydron, numpy as np
np.random.rand(); random.random()     # the master's generators are in use before the fork
pydron.enable(workers=2)

@pydron.functional
def draw(i):
    time.sleep(0.2)                    # both workers get tasks
    return os.getpid(), float(np.random.rand()), random.random()

@pydron.schedule
def draws():
    return [draw(i) for i in range(4)]

first = {}
for pid, a, b in draws():
    first.setdefault(pid, (a, b))
print(len(first))
master = (float(np.random.rand()), random.random())
values = list(first.values()) + [master]
print(len({v[0] for v in values}) == len(values), len({v[1] for v in values}) == len(values))
""", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "True", "True"], proc.stdout


def test_worker_traceback_names_script_file_and_lines(tmp_path):
    """A plain helper of the script called from a functional task: its frame shows the
    script's file, line and source text, as in plain Python (not <dynamic-code>)."""
    body = """
import pydron
pydron.enable(workers=2)

def check(x):
    if x > 1:
        raise ValueError(f"bad value {x}")
    return x

@pydron.functional
def task(x):
    return check(x) + 1

@pydron.schedule
def go():
    return [task(i) for i in range(3)]

go()
"""
    plain = run(body, tmp_path, env={"PYDRON_DISABLE": "1"})
    par = run(body, tmp_path)
    assert par.returncode == plain.returncode == 1

    def frames(text):
        lines = text.splitlines()
        out = []
        for i, line in enumerate(lines):
            m = re.match(r'\s*File "([^"]+)", line (\d+), in (task|check)$', line)
            if m:
                out.append((m.group(1), m.group(2), m.group(3), lines[i + 1].strip()))
        return out

    assert "<dynamic-code>" not in par.stderr, par.stderr
    expected = frames(plain.stderr)
    assert [f[2] for f in expected] == ["task", "check"]
    got = frames(par.stderr)
    for frame in expected:
        assert frame in got, f"{frame} not in\n{par.stderr}"
    assert "ValueError: bad value 2" in par.stderr


def test_open_file_argument_is_warned_once(tmp_path):
    """An open file given to a functional function crosses as a copy: two readline() tasks both
    read line 1 under pydron. pydron says so once per function, naming it."""
    proc = run("""
import logging, pydron
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
pydron.enable(workers=2)

@pydron.functional
def first_line(f):
    return f.readline()

@pydron.schedule
def go(f):
    return [first_line(f) for _ in range(3)]

with open("data.txt") as f:
    print(go(f))
""", tmp_path, files={"data.txt": "one\ntwo\nthree\n"})
    assert proc.returncode == 0, proc.stderr
    warnings = [l for l in proc.stderr.splitlines() if "open file or stream" in l]
    assert len(warnings) == 1, proc.stderr
    assert "__main__.first_line()" in warnings[0] and "TextIOWrapper" in warnings[0]


def test_classes_coming_back_stay_the_scripts(tmp_path):
    """An instance of a script class comes back from a worker by value: the master's class is
    its own (identity, methods reading the script's current globals), not a copy."""
    both("""
import pydron
pydron.enable(workers=2)
SCALE = 2

class Meter:
    def __init__(self, v):
        self.v = v
    def reading(self):
        return self.v * SCALE

@pydron.functional
def measure(v):
    return Meter(v)

@pydron.schedule
def measures(n):
    return [measure(i) for i in range(n)]

before = Meter.reading
got = measures(3)
print([type(m) is Meter for m in got], Meter.reading is before)
SCALE = 7
print([m.reading() for m in got])
""", tmp_path, min_tasks=3)
