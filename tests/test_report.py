"""The wait report (issue 12.6): per scheduled function, the tasks, how parallel they ran, and
the lines where it waited, how often and how long, with the hint that moves the wait after the
loop; at the end of `pydron run`, or at exit with PYDRON_REPORT=1."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.nosan

SCRIPT = textwrap.dedent("""
    import time, numpy as np
    import pydron

    @pydron.functional
    def calibrate(i):
        time.sleep(0.01)
        return np.full(4, float(i))

    @pydron.schedule
    def reduce_frames(n):
        out = np.zeros((n, 4))
        for i in range(n):
            frame = calibrate(i)
            out[i] = frame
        return out

    @pydron.schedule
    def parallel(n):
        frames = [calibrate(i) for i in range(n)]
        return np.stack(frames)

    print(reduce_frames(12).sum(), parallel(12).sum())
""")


def run(args, tmp_path, env_extra=None, script=SCRIPT):
    path = tmp_path / "ccd.py"
    path.write_text(script)
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, *args, str(path)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)


def test_pydron_run_prints_the_wait_report(tmp_path):
    proc = run(["-m", "pydron", "run", "--workers", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["264.0", "264.0"]
    err = proc.stderr
    assert "reduce_frames: 1 call(s), 12 task(s)" in err and "parallel: 1 call(s), 12 task(s)" in err
    # The serial loop waited 12 times at the store into the array, and gets the hint.
    assert "waited 12 time(s) at ccd.py:15" in err and "out[i] = frame" in err
    assert "store them after the loop" in err
    # The parallel version waited once at most, at the stack, and gets no hint.
    section = err.split("parallel:")[1]
    assert "hint" not in section


def test_report_at_exit_with_the_environment_variable(tmp_path):
    script = SCRIPT.replace("import pydron\n", "import pydron\npydron.enable(workers=2)\n")
    proc = run([], tmp_path, {"PYDRON_REPORT": "1"}, script)
    assert proc.returncode == 0, proc.stderr
    assert "pydron report" in proc.stderr and "reduce_frames" in proc.stderr
    quiet = run([], tmp_path, {"PYDRON_REPORT": "0"}, script)
    assert "pydron report" not in quiet.stderr
