"""The figures of the core issue, measured in one run against ProcessPoolExecutor,
multiprocessing.Pool and sequential Python, each system in a process of its own:

  tiny     10,000 tasks (x + 1) in one scheduled call: µs per task      (target <= 5 µs)
  cpu      32 CPU-bound tasks of ~15 ms: speed-up over sequential       (target >= 1.9x)
  numpy    8 tasks taking and returning a 64 MB float64 array:
           ratio to ProcessPoolExecutor (target >= 5x faster) and to sequential (<= 2x)
  tree     4096-leaf pairwise tree reduction: µs per task               (target <= 10 µs)
  fib      undecorated recursive fib, enabled vs disabled: overhead     (target <= 5%)

Medians over repeats; a table on stdout and every raw figure in JSON.

    python bench/core_figures.py [--repeat 5] [--workers N] [--json FILE] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydron.bench import harness  # noqa: E402

SYSTEMS = ["sequential", "pydron", "processpool", "mp-pool"]
WORKLOADS = ["tiny", "cpu", "numpy-large", "tree"]

# The same 10,000 tiny tasks submitted one by one (no batching): what a user of futures
# writes when each call is a task of its own, as pydron makes it.
PER_TASK = textwrap.dedent("""
    import json, sys, time
    from pydron.bench.workloads import inc
    kind, n, workers, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    if kind == "processpool":
        from concurrent.futures import ProcessPoolExecutor
        pool = ProcessPoolExecutor(workers)
        run = lambda: [f.result() for f in [pool.submit(inc, x) for x in range(n)]]
    else:
        import multiprocessing
        pool = multiprocessing.Pool(workers)
        run = lambda: [r.get() for r in [pool.apply_async(inc, (x,)) for x in range(n)]]
    run()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter(); out = run(); times.append(time.perf_counter() - t0)
        assert out == [x + 1 for x in range(n)]
    print(json.dumps(times))
""")

FIB = textwrap.dedent("""
    import json, sys, time
    enabled = sys.argv[1] == "1"
    import pydron
    if enabled:
        pydron.enable(progress=False)
        assert pydron.is_enabled()
    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)
    fib(20)
    times = []
    for _ in range(int(sys.argv[2])):
        t0 = time.perf_counter(); fib(int(sys.argv[3])); times.append(time.perf_counter() - t0)
    print(json.dumps(min(times)))
""")


def run_child(code, args, env=None, timeout=600):
    env = dict(os.environ, **(env or {}))
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError((out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description="pydron's core figures against its peers")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" /
                                         "core_figures.json"))
    p.add_argument("--quick", action="store_true", help="smaller sizes (not the figures)")
    args = p.parse_args()

    bench_args = ["--workloads", ",".join(WORKLOADS), "--systems", ",".join(SYSTEMS),
                  "--repeat", str(args.repeat), "--json", os.devnull]
    if args.workers:
        bench_args += ["--workers", str(args.workers)]
    if args.quick:
        bench_args.append("--quick")
    ns = harness.parse_args(bench_args)
    results, systems = [], []
    for system in SYSTEMS:
        print(f"  {system} ...", file=sys.stderr, flush=True)
        sysrec, recs = harness.run_system(system, ns, None)
        systems.append(sysrec)
        results.extend(recs)
    harness.summarise(results)
    fig = {(r["workload"], r["system"]): r for r in results}

    from pydron.bench.catalog import WORKLOADS as W
    params = {w: (W[w].quick if args.quick else W[w].params) for w in WORKLOADS}
    n_tiny = params["tiny"]["n"]
    big = f"{params['numpy-large']['count']}x{params['numpy-large']['mb']}MB"
    leaves = params["tree"]["n"]
    per_task = {}
    for kind in ("processpool", "mp-pool"):
        try:
            times = run_child(PER_TASK, [kind, n_tiny, ns.workers, args.repeat])
            per_task[kind] = {"times_s": times, "us_per_task":
                              statistics.median(times) / n_tiny * 1e6}
        except Exception as exc:
            per_task[kind] = {"error": str(exc)}

    fib_n, fib_reps = (22, 3) if args.quick else (27, 5)
    fib = {"on": [], "off": [], "error": None}
    try:
        for _ in range(3 if args.quick else 5):             # alternate, fresh processes
            fib["off"].append(run_child(FIB, ["0", fib_reps, fib_n]))
            fib["on"].append(run_child(FIB, ["1", fib_reps, fib_n]))
        fib["overhead"] = statistics.median(fib["on"]) / statistics.median(fib["off"]) - 1
    except Exception as exc:
        fib["error"] = str(exc)

    def get(w, s, key):
        r = fig.get((w, s))
        return r.get(key) if r and r.get("status") == "ok" else None

    def fmt(x, spec, unit=""):
        return "n/a" if x is None else format(x, spec) + unit

    def status(w, s):
        r = fig.get((w, s))
        if r is None:
            return "not run"
        return r["status"] if r["status"] != "ok" else None

    rows = []

    def row(name, value, target, ok, note=""):
        if value == "n/a":
            ok = None
        rows.append({"figure": name, "value": value, "target": target,
                     "met": None if ok is None else bool(ok), "note": note})

    us = get("tiny", "pydron", "us_per_task")
    row(f"tiny: pydron µs/task ({n_tiny} tasks)", fmt(us, ".2f", " µs"), "<= 5 µs",
        None if us is None else us <= 5, status("tiny", "pydron") or "")
    for s in ("sequential", "processpool", "mp-pool"):
        row(f"tiny: {s} µs/task (batched map)", fmt(get("tiny", s, "us_per_task"), ".2f",
                                                    " µs"), "", None, status("tiny", s) or "")
    for s, v in per_task.items():
        row(f"tiny: {s} µs/task (one submit per task)",
            fmt(v.get("us_per_task"), ".2f", " µs"), "", None, v.get("error", ""))

    for s in ("pydron", "processpool", "mp-pool"):
        sp = get("cpu", s, "speedup_vs_sequential")
        row(f"cpu: {s} speed-up vs sequential", fmt(sp, ".2f", "x"),
            ">= 1.9x" if s == "pydron" else "", (sp is not None and sp >= 1.9)
            if s == "pydron" else None, status("cpu", s) or "")

    t_py = get("numpy-large", "pydron", "median_s")
    t_ppe = get("numpy-large", "processpool", "median_s")
    t_seq = get("numpy-large", "sequential", "median_s")
    t_mp = get("numpy-large", "mp-pool", "median_s")
    ratio_ppe = t_ppe / t_py if t_py and t_ppe else None
    ratio_seq = t_py / t_seq if t_py and t_seq else None
    row(f"numpy {big}: ProcessPoolExecutor time / pydron time", fmt(ratio_ppe, ".2f", "x"),
        ">= 5x", None if ratio_ppe is None else ratio_ppe >= 5,
        status("numpy-large", "pydron") or "")
    row(f"numpy {big}: pydron time / sequential time", fmt(ratio_seq, ".2f", "x"), "<= 2x",
        None if ratio_seq is None else ratio_seq <= 2)
    row(f"numpy {big}: mp.Pool time / pydron time",
        fmt(t_mp / t_py if t_py and t_mp else None, ".2f", "x"), "", None)
    for s in ("sequential", "pydron", "processpool", "mp-pool"):
        row(f"numpy {big}: {s} median", fmt(get("numpy-large", s, "median_s"), ".3f", " s"),
            "", None, status("numpy-large", s) or "")

    for s in ("pydron", "sequential", "processpool", "mp-pool"):
        v = get("tree", s, "us_per_task")
        row(f"tree {leaves} leaves: {s} µs/task ({2 * leaves - 1} tasks)", fmt(v, ".2f", " µs"),
            "<= 10 µs" if s == "pydron" else "",
            (v is not None and v <= 10) if s == "pydron" else None, status("tree", s) or "")

    ov = fib.get("overhead")
    row(f"fib({fib_n}) undecorated, enabled vs disabled", fmt(None if ov is None
                                                             else ov * 100, "+.1f", "%"),
        "<= 5%", None if ov is None else ov <= 0.05, fib.get("error") or "")

    width = max(len(r["figure"]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>12}  {'target':>9}  met")
    print("-" * (width + 32))
    for r in rows:
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        print(f"{r['figure']:<{width}}  {r['value']:>12}  {r['target']:>9}  {met}"
              f"{'  ' + r['note'] if r['note'] else ''}")
    doc = {"schema": "pydron-core-figures/1", "quick": args.quick, "repeat": args.repeat,
           "workers": ns.workers, "machine": harness.machine(), "figures": rows,
           "systems": systems, "results": results, "per_task_submit": per_task,
           "fib": fib, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    print(f"raw figures: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
