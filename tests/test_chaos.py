"""The short chaos run of the default test suite (`make chaos` runs a long one): scheduled calls
of thousands of tasks while workers and the fork server are SIGKILLed at random; every result
right, no hang, the pool back to full size, nothing left behind (tests/chaos.py)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import leaked_shm, shm_entries

pytestmark = pytest.mark.nosan

HERE = os.path.dirname(os.path.abspath(__file__))


def test_chaos_short(tmp_path):
    shm_before = shm_entries()
    proc = subprocess.run([sys.executable, os.path.join(HERE, "chaos.py"), "--seconds", "6",
                           "--tasks", "2000", "--kill-every", "0.02", "0.2"],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("CHAOS "))
    r = json.loads(line[len("CHAOS "):])
    assert r["rounds"] >= 5 and r["kills"]["worker"] >= 10 and r["kills"]["forkserver"] >= 1, r
    assert r["fds_delta"] == 0 and r["arena_pages_delta"] == 0, r
    assert r["processes_left"] == [] and r["stats"]["inflight"] == 0, r
    assert leaked_shm(shm_before) == []
