"""One object, many tasks (issue 12.7): a large buffer outside the arena (arrays made before
enable()) passed to many tasks of one call is copied into the arena once, and still each task
sees it as it was at its call: written between two calls, the later tasks see the new bytes
(plain Python's results), and a new copy is made for them."""

import re

import pytest

from isolated import run

pytestmark = pytest.mark.nosan

SCENARIO = """
import sys, pydron, numpy as np
N = 700                                   # 3.9 MB each, made before enable(): not in the arena
frames = {"flat": np.arange(N * N, dtype=float).reshape(N, N),
          "dark": np.ones((N, N)) * 0.5}
pydron.enable(workers=2)

@pydron.functional
def reduce(i, frames):
    return float(frames["flat"][i].sum() - frames["dark"][i].sum())

@pydron.schedule
def run(frames):
    first = [reduce(i, frames) for i in range(20)]
    frames["flat"][3] = -1.0              # written by the caller: later tasks must see it
    second = [reduce(i, frames) for i in range(20)]
    frames["dark"] = np.zeros((N, N))     # another array in the dict
    third = [reduce(i, frames) for i in range(20)]
    return first, second, third

print(run(frames))
if pydron.is_enabled():
    from pydron import _core
    m = _core._exec_copy_memo()
    sys.stderr.write(f"memo copies={m['copies']} hits={m['hits']}\\n")
"""


def test_large_buffer_copied_once_per_call_and_as_at_each_call(tmp_path):
    plain = run(SCENARIO, tmp_path, env={"PYDRON_DISABLE": "1"})
    assert plain.returncode == 0, plain.stderr
    par = run(SCENARIO, tmp_path)
    assert par.returncode == 0, par.stderr
    assert par.stdout == plain.stdout
    m = re.search(r"memo copies=(\d+) hits=(\d+)", par.stderr)
    copies, hits = int(m.group(1)), int(m.group(2))
    # Without the memo: 100 copies (the 60 tasks take flat, the first 40 also the old dark;
    # the new dark is made after enable(), in the arena: sent by reference, never copied).
    # With it: flat and dark once, flat again after the write; every other task reuses a copy,
    # however fast the tasks finish (the memo lives as long as the scheduled call).
    assert copies == 3, par.stderr
    assert copies + hits == 100, par.stderr
