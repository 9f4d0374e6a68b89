"""Where the time goes when `pydron bench --backend cluster` runs its cpu workload (32 calls of
~15 ms, pure Python): pydron on a local cluster of single-threaded Dask workers, each timed run
paired with the same arithmetic run plainly in this process just before it (so both see the same
machine load). Per run: the Dask tasks pydron made, when the first task started, the time the
workers sat idle between tasks and at the end, and the CPU each process of the cluster used
(this client, the scheduler, the nannies, the workers), from the workers' own reports of when
each task ran. Medians over the repeats, with the load average: on a shared machine the
wall-clock ratio is noisy, the task counts and CPU figures much less.

    python bench/cluster_cpu.py [--workers 2] [--repeat 7] [--calls 32] [--iters 160000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def process_cpu(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def role(proc) -> str:
    text = " ".join(proc.cmdline())
    if "distributed.Scheduler" in text:
        return "scheduler"
    if "distributed.Nanny" in text:
        return "nanny"
    if "multiprocessing-fork" in text and "spawn_main" in text:
        return "worker"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--calls", type=int, default=32)
    p.add_argument("--iters", type=int, default=160_000)
    ns = p.parse_args()

    import psutil
    import pydron
    from pydron import _cluster
    from pydron.bench import workloads
    from pydron.bench.catalog import lcg

    pydron.enable(workers=ns.workers, progress=False, cluster=f"local:{ns.workers}")
    adapter = _cluster.current()
    reports = []
    on_report = adapter._on_report

    def keep(event):
        reports.append(event[1])
        on_report(event)

    adapter.client.subscribe_topic(adapter.topic, keep)
    for _ in range(7):                  # the bench's warm-up of pydron (child.py)
        workloads.cpu_program(2, 1000)
    workloads.cpu_program(ns.calls, ns.iters)
    me = psutil.Process()
    procs = [("client", me)] + [(role(c), c) for c in me.children(recursive=True)]
    rows = []
    for _ in range(ns.repeat):
        t0 = time.perf_counter()
        expected = [lcg(seed, ns.iters) for seed in range(ns.calls)]
        seq = time.perf_counter() - t0
        reports.clear()
        batches = adapter.stats["batches"]
        cpu0 = [process_cpu(pr) for _, pr in procs]
        wall0 = time.time()
        t0 = time.perf_counter()
        result = workloads.cpu_program(ns.calls, ns.iters)
        wall = time.perf_counter() - t0
        cpu = {}
        for (name, pr), before in zip(procs, cpu0):
            cpu[name] = cpu.get(name, 0.0) + process_cpu(pr) - before
        assert result == expected
        deadline = time.monotonic() + 2
        while sum(len(r["times"]) for r in reports) < ns.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        lanes = {}
        for r in reports:
            lanes.setdefault(r["worker"], []).extend(r["times"])
        idle, first = 0.0, min(s for ts in lanes.values() for s, _ in ts) - wall0
        for ts in lanes.values():
            ts.sort()
            idle += sum(b[0] - a[1] for a, b in zip(ts, ts[1:]))     # between tasks
            idle += wall - (ts[-1][1] - wall0)                         # after its last one
        idle += (ns.workers - len(lanes)) * wall                       # never used
        rows.append({"seq": seq, "wall": wall, "ratio": seq / wall, "first": first,
                     "dask_tasks": adapter.stats["batches"] - batches, "idle": idle,
                     "workers_used": len(lanes), **{f"cpu {k}": v for k, v in cpu.items()}})
    pydron.disable()
    print(f"cpu workload on the cluster backend: {ns.calls} calls, {ns.workers} workers, "
          f"{ns.repeat} runs; load average {os.getloadavg()[0]:.2f}")
    for key in rows[0]:
        values = [r[key] for r in rows]
        med = statistics.median(values)
        unit = "" if key in ("ratio", "dask_tasks", "workers_used") else " ms"
        scale = 1 if unit == "" else 1e3
        print(f"  {key:<16} median {med * scale:9.2f}{unit}   "
              f"[{min(values) * scale:.2f} .. {max(values) * scale:.2f}]")


if __name__ == "__main__":
    main()
