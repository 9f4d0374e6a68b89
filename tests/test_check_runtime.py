"""PYDRON_CHECK=1 (issue 12.5, runtime part): workers hash each task's arguments before and
after it runs; a function that changed one is named once, with the argument, through the
`pydron` logger in the master. Functions that change nothing are not named, and without the
setting nothing is hashed."""

import pytest

from isolated import run

pytestmark = pytest.mark.nosan

SCENARIO = """
import logging, pydron, numpy as np
from lib import bump
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
pydron.enable(workers=2)

@pydron.functional
def step(config, beta):
    bump(config)                 # the write is in another module: no static warning for it
    return beta

@pydron.functional
def energy(config, beta):
    return float(config.sum()) * beta

@pydron.functional
def grow(items, *, extra):
    extra.append(1)
    return len(items)

@pydron.schedule
def run():
    small = np.zeros(3)
    large = np.zeros(300000)     # out of band, through the arena
    a = [step(small, b) for b in range(3)] + [step(large, b) for b in range(2)]
    e = [energy(small, b) for b in range(3)]
    g = [grow([1, 2], extra=[]) for _ in range(2)]
    return a, e, g

print(run())
"""
LIB = {"lib.py": """
def bump(a):
    a[0] += 5
"""}


def check_lines(stderr):
    return [l for l in stderr.splitlines() if "PYDRON_CHECK" in l]


def test_check_names_the_function_and_argument_once(tmp_path):
    proc = run(SCENARIO, tmp_path, files=LIB, env={"PYDRON_CHECK": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = check_lines(proc.stderr)
    step = [l for l in lines if "__main__.step()" in l]
    grow = [l for l in lines if "__main__.grow()" in l]
    assert len(step) == 1, proc.stderr
    assert "argument 0 ('config')" in step[0]
    assert len(grow) == 1 and "argument 'extra'" in grow[0], proc.stderr
    assert not [l for l in lines if "energy" in l], proc.stderr
    assert len(lines) == 2


def test_no_check_without_the_setting(tmp_path):
    proc = run(SCENARIO, tmp_path, files=LIB)
    assert proc.returncode == 0, proc.stderr
    assert check_lines(proc.stderr) == []


def test_check_setting_is_in_the_configuration():
    from pydron import config
    assert config.KEYS["check"][1] == "PYDRON_CHECK"
    assert config.resolve({}).check is False
    assert config.resolve({"check": "1"}).check is True
