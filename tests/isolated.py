"""Running a scenario script in its own interpreter, for tests of faults and lifecycles: a crash
fails one test, and every process the scenario started must be gone once it is (they are found by
a tag in their environment, which survives any reparenting)."""

import os
import subprocess
import sys
import textwrap
import time
import uuid

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A module scenarios import their tasks from (files={"incs.py": INCS}): inc, a functional, and
# incs(n), a scheduled function making n calls of it.
INCS = """
import pydron

@pydron.functional
def inc(x):
    return x + 1

@pydron.schedule
def incs(n):
    return [inc(i) for i in range(n)]
"""


def tagged(tag):
    """Processes whose environment carries tag (the scenario and everything it forked)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                if tag.encode() in f.read():
                    if p.status() != psutil.STATUS_ZOMBIE:
                        found.append(p.pid)
        except (OSError, psutil.Error):
            continue
    return found


def run(body, tmp_path, files=None, timeout=60, args=(), env=None):
    """Run body as a script (files: extra modules next to it); returns the CompletedProcess.
    Asserts that nothing it started outlives it."""
    tag = f"PYDRON_TEST_TAG={uuid.uuid4().hex}"
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    script = tmp_path / "scenario.py"
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, str(tmp_path)) if p),
               PYDRON_TEST_TAG=tag.split("=", 1)[1], **(env or {}))
    proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    deadline = time.monotonic() + 10
    while (left := tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"left behind: {left}\n{proc.stdout}\n{proc.stderr}"
    return proc


