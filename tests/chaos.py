"""Chaos: rounds of scheduled calls of thousands of tasks while pydron's own processes (workers
and the fork server) are SIGKILLed at random moments. Every result must be right, nothing may
hang, the pool must come back to full size, and no process, descriptor or arena page may be left
behind. Run by tests/test_chaos.py (short) and `make chaos` (long):

    python tests/chaos.py --seconds 120 --tasks 2000 --kill-every 0.02 0.2
"""
import argparse
import json
import os
import random
import signal
import sys
import threading
import time

import numpy as np
import psutil

import pydron
from pydron import _core


@pydron.functional
def work(x, payload):
    # Some tasks carry an out-of-band array (arena references in flight when a worker dies).
    s = x * x
    if payload is not None:
        s += int(payload[0])
    if x % 97 == 0:
        time.sleep(0.002)
    return s


@pydron.schedule
def one_round(n, payload):
    out = []
    for i in range(n):
        out.append(work(i, payload if i % 50 == 0 else None))
    return out


def expected(n, payload):
    return [i * i + (int(payload[0]) if i % 50 == 0 else 0) for i in range(n)]


class Killer(threading.Thread):
    """SIGKILLs a random pydron process (a worker, or now and then the fork server)."""

    def __init__(self, every, fork_server_share, seed):
        super().__init__(daemon=True)
        self.every = every
        self.share = fork_server_share
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.kills = {"worker": 0, "forkserver": 0}

    def run(self):
        while not self.stop.wait(self.rng.uniform(*self.every)):
            info = _core._exec_info()
            workers = [p for p in info["workers"] if p > 0]
            if self.rng.random() < self.share and info["forkserver"] > 0:
                victim, kind = info["forkserver"], "forkserver"
            elif workers:
                victim, kind = self.rng.choice(workers), "worker"
            else:
                continue
            try:
                os.kill(victim, signal.SIGKILL)
                self.kills[kind] += 1
            except ProcessLookupError:
                pass


def wait_full(nworkers, timeout=20.0):
    """Until the pool has nworkers live workers again (running a round spawns them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        one_round(4, None)
        workers = _core._exec_info()["workers"]
        if len(workers) == nworkers and all(p > 0 and psutil.pid_exists(p) for p in workers):
            return workers
        time.sleep(0.05)
    raise AssertionError(f"the pool did not come back to {nworkers} workers: {workers}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0, help="keep going this long")
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--kill-every", type=float, nargs=2, default=(0.05, 0.3))
    ap.add_argument("--fork-server-share", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    pydron.enable(workers=args.workers)
    payload = np.full(1 << 14, 7.0)                   # 128 KiB: crosses out of band
    me = psutil.Process()
    wait_full(args.workers)
    fds_before = me.num_fds()
    pages_before = _core._exec_info()["arena_used_pages"]

    killer = Killer(tuple(args.kill_every), args.fork_server_share, args.seed)
    killer.start()
    started = time.monotonic()
    rounds = 0
    while time.monotonic() - started < args.seconds:
        got = one_round(args.tasks, payload)
        assert got == expected(args.tasks, payload), f"round {rounds}: wrong results"
        rounds += 1
    killer.stop.set()
    killer.join()
    elapsed = time.monotonic() - started

    workers = wait_full(args.workers)
    deadline = time.monotonic() + 20
    while _core._exec_info()["arena_used_pages"] != pages_before and time.monotonic() < deadline:
        one_round(4, None)
        time.sleep(0.05)
    report = {
        "rounds": rounds, "tasks": rounds * args.tasks, "seconds": round(elapsed, 2),
        "kills": killer.kills, "workers": workers,
        "fds_delta": me.num_fds() - fds_before,
        "arena_pages_delta": _core._exec_info()["arena_used_pages"] - pages_before,
        "stats": pydron.stats(),
    }
    _core._exec_shutdown()
    left = [p.pid for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    report["processes_left"] = left
    print("CHAOS " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
