"""The figures of issue 11 (real scripts), each measured in a process of its own, with plain
Python's run of the same code in the same run:

  forcing   a scheduled call hands plain code an object graph of 10,000 instances of a user
            class (results were moved into lists they hold): the extra master time of the walk
            that forces them, against the same call whose graph holds no moved results, and
            against plain Python
  deps      total([inc(i) for i in range(n)]): one task depending on n results, n = 3,000,
            100,000 and 1,000,000: time and master memory (peak RSS growth) per dependency

    python bench/script_figures.py [--repeat 5] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FORCING = textwrap.dedent("""
    import json, sys, time, pydron
    mode, repeat = sys.argv[1], int(sys.argv[2])
    if mode != "plain":
        pydron.enable(workers=2)

    @pydron.functional
    def inc(x):
        return x + 1

    class Node:
        def __init__(self, i):
            self.i = i
            self.items = []

    def audit(nodes):                    # plain code: reads every node's items
        return sum(len(n.items) + n.i for n in nodes)

    @pydron.schedule
    def run(n, moved):
        nodes = [Node(i) for i in range(n)]
        if moved:
            nodes[-1].items.append(inc(1))      # a result moved into the last node's list
        else:
            nodes[-1].items.append(2)
        return audit(nodes)

    run(10_000, True)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        run(10_000, mode != "unmoved")
        times.append(time.perf_counter() - t)
    print(json.dumps(times))
""")

DEPS = textwrap.dedent("""
    import json, resource, sys, time, pydron
    mode, n = sys.argv[1], int(sys.argv[2])
    if mode != "plain":
        pydron.enable(workers=2)

    @pydron.functional
    def inc(x):
        return x + 1

    @pydron.functional
    def total(values):
        return sum(values)

    @pydron.schedule
    def run(n):
        return total([inc(i) for i in range(n)])

    run(100)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    value = run(n)
    took = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert value == n * (n + 1) // 2, value
    print(json.dumps({"s": took, "rss_kib": after - before}))
""")


def child(code, *args):
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                         text=True, cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smaller sizes (not the figures)")
    a = p.parse_args()
    figures = {}
    med = {}
    for mode in ("plain", "unmoved", "moved"):
        med[mode] = statistics.median(child(FORCING, mode, a.repeat))
    figures["forcing"] = med
    print("forcing: a 10,000-object graph handed to plain code (median ms per call)")
    print(f"  plain Python {med['plain'] * 1e3:8.2f}   pydron, nothing moved "
          f"{med['unmoved'] * 1e3:8.2f}   pydron, a result moved in {med['moved'] * 1e3:8.2f}"
          f"   -> the walk costs {(med['moved'] - med['unmoved']) * 1e6 / 10_000:.3f} µs/object")
    sizes = [3_000, 20_000] if a.quick else [3_000, 100_000, 1_000_000]
    figures["deps"] = {}
    print("deps: one task depending on n results (time per dependency, master peak RSS growth)")
    for n in sizes:
        runs = [child(DEPS, "pydron", n) for _ in range(3 if n >= 1_000_000 else a.repeat)]
        plain = [child(DEPS, "plain", n) for _ in range(3 if n >= 1_000_000 else a.repeat)]
        s = statistics.median(r["s"] for r in runs)
        kib = statistics.median(r["rss_kib"] for r in runs)
        ps = statistics.median(r["s"] for r in plain)
        pkib = statistics.median(r["rss_kib"] for r in plain)
        figures["deps"][n] = {"pydron_s": s, "pydron_rss_kib": kib, "plain_s": ps,
                              "plain_rss_kib": pkib}
        print(f"  n={n:>9,}  pydron {s * 1e6 / n:6.2f} µs/dep {kib * 1024 / n:7.1f} B/dep   "
              f"plain {ps * 1e6 / n:6.2f} µs/dep {pkib * 1024 / n:7.1f} B/dep")
    out = ROOT / "bench" / "results" / "script_figures.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
