"""Issue 12 item 4, cold start: the first scheduled call of a script that imports its libraries
(numpy with its linalg, fft and polynomial modules, decimal, fractions), when pydron starts before the script's first line
(`pydron run`) against `pydron.enable()` placed after the imports, the best placement. Each run
is a fresh process; the script prints its first call's wall time.

    python bench/first_call.py [--repeat 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

BODY = textwrap.dedent("""
    import time
    import numpy as np
    import numpy.fft, numpy.linalg, numpy.polynomial.polynomial as poly
    import decimal, fractions, statistics
    {enable}
    @pydron.functional
    def fit(seed):
        rng = np.random.default_rng(seed)
        x = np.linspace(0, 1, 200)
        y = 2.0 * x + 1.0 + rng.normal(0, 0.1, x.size)
        smooth = np.real(np.fft.ifft(np.fft.fft(y) * (np.abs(np.fft.fftfreq(x.size)) < 0.1)))
        return float(poly.polyfit(x, smooth, 1)[1]) + float(np.linalg.norm(smooth)) * 0

    @pydron.schedule
    def run(n):
        return sum([fit(s) for s in range(n)])

    t = time.perf_counter()
    run(8)
    print("FIRST", time.perf_counter() - t)
""")


def first_call(argv, script):
    out = subprocess.run(argv + [script], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return float(next(l for l in out.stdout.splitlines() if l.startswith("FIRST")).split()[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=7)
    a = p.parse_args()
    d = tempfile.mkdtemp()
    under_run = os.path.join(d, "under_run.py")
    after_imports = os.path.join(d, "after_imports.py")
    with open(under_run, "w") as f:
        f.write("import pydron\n" + BODY.format(enable=""))
    with open(after_imports, "w") as f:
        f.write("import pydron\n" + BODY.format(enable="pydron.enable()"))
    run_t, after_t = [], []
    for _ in range(a.repeat):            # alternating, so drift hits both alike
        run_t.append(first_call([sys.executable, "-m", "pydron", "run"], under_run))
        after_t.append(first_call([sys.executable], after_imports))
    r, e = statistics.median(run_t), statistics.median(after_t)
    print(f"first call under `pydron run`: median {r * 1e3:.1f} ms "
          f"(min {min(run_t) * 1e3:.1f}, max {max(run_t) * 1e3:.1f})")
    print(f"first call, enable() after the imports: median {e * 1e3:.1f} ms "
          f"(min {min(after_t) * 1e3:.1f}, max {max(after_t) * 1e3:.1f})")
    print(f"ratio: {r / e:.2f}x (target <= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
