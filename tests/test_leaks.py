"""Leak check: 10,000 scheduled calls, each submitting a couple of tiny tasks (some failing, some
carrying a numpy buffer, some through a nested scheduled call and a thread-executor task), leave the object count, refcounts, open file descriptors, threads and
RSS of the master and the workers flat. Measured after a warm-up of 10,000 calls; run in a subprocess so nothing else pollutes it."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("psutil")   # the measuring script uses it

SCRIPT = r'''
import gc, json, sys
import numpy as np
import psutil
import pydron

pydron.enable(workers=2)

class Shared:
    """An argument object shared by every call: its refcount must not move."""
    def __init__(self):
        self.offset = 2

shared = Shared()
offsets = [2.0, 3.0]
buffer = np.arange(16384, dtype=np.float64)      # 128 KiB: large enough to go out of band

@pydron.functional
def inc(x):
    if x % 10 == 7:
        raise ValueError(f"unlucky {x}")
    return x + 1

@pydron.functional
def add(a, b):
    return a + b

@pydron.functional
def buffer_sum(arr, k):
    return float(arr[k])

@pydron.functional(executor="threads")
def thread_neg(x):
    return -x

@pydron.schedule
def nested(b):
    return add(thread_neg(b), b)            # adds 0, through a thread task and a nested call

@pydron.schedule
def step(i, shared, offsets, buffer):
    a = inc(i)
    b = add(a, offsets[0])
    if i % 10 == 3:
        b = add(b, buffer_sum(buffer, i % 100))
    if i % 5 == 1:
        b = add(b, nested(b))
    return add(b, shared.offset)

def expected(i):
    r = i + 1 + offsets[0]
    if i % 10 == 3:
        r += float(buffer[i % 100])
    if i % 5 == 1:
        r += 0
    return r + shared.offset

def calls(start, n):
    for i in range(start, start + n):
        try:
            r = step(i, shared, offsets, buffer)
        except ValueError as exc:
            assert i % 10 == 7 and str(exc) == f"unlucky {i}", (i, exc)
            continue
        assert r == expected(i), (i, r, expected(i))

def rss(p):
    return p.memory_info().rss

def measure():
    gc.collect()
    me = psutil.Process()
    workers = {p.pid: rss(p) for p in me.children(recursive=True)}
    return {
        "objects": len(gc.get_objects()),
        "fds": me.num_fds(),
        "threads": me.num_threads(),
        "worker_fds": {p.pid: p.num_fds() for p in me.children(recursive=True)},
        "rss": rss(me),
        "workers": workers,
        "refcounts": [sys.getrefcount(o) for o in (shared, offsets, buffer, step, inc, add,
                                                    buffer_sum, Shared, nested, thread_neg)],
        "stats": pydron.stats() if hasattr(pydron, "stats") else {},
    }

# Warm-up: the shared-memory arena touches new pages until its free list covers the working set
# of blocks in flight (RSS counts touched shared pages); that plateau is reached within ~10,000
# calls and is not a leak. Growth is measured after it.
calls(0, 10000)
before = measure()
calls(10000, 10000)
after = measure()
print("REPORT " + json.dumps({"before": before, "after": after}, default=str))
'''

MB = 1 << 20


@pytest.mark.nosan
def test_ten_thousand_scheduled_calls_leave_no_leak(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])
    before, after = report["before"], report["after"]

    assert after["refcounts"] == before["refcounts"], \
        "refcounts of (shared arg, list arg, array arg, step, inc, add, buffer_sum, class, " \
        "nested, thread_neg) moved"
    growth = after["objects"] - before["objects"]
    assert growth < 300, f"gc-tracked objects grew by {growth} over 10,000 calls"
    assert after["fds"] == before["fds"], f"open fds went {before['fds']} -> {after['fds']}"
    assert after["threads"] == before["threads"], \
        f"threads went {before['threads']} -> {after['threads']}"
    for pid, fds in before["worker_fds"].items():
        if pid in after["worker_fds"]:
            assert after["worker_fds"][pid] == fds, f"worker {pid} fds {fds} -> {after['worker_fds'][pid]}"
    rss_growth = after["rss"] - before["rss"]
    assert rss_growth < 4 * MB, f"master RSS grew by {rss_growth / MB:.1f} MB"
    for pid, rss_before in before["workers"].items():
        if pid in after["workers"]:
            worker_growth = after["workers"][pid] - rss_before
            assert worker_growth < 4 * MB, \
                f"worker {pid} RSS grew by {worker_growth / MB:.1f} MB"
    for key, value in after["stats"].items():
        if "flight" in key or "live" in key or "pending" in key:
            assert value == 0, f"pydron.stats()[{key!r}] = {value} after all calls returned"
