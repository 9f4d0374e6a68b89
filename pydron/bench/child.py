"""Runs the workloads for one system, in a process of its own (started by harness.py).

Each system gets a fresh interpreter, so pools, hooks and memory figures do not leak from
one system into the next. Results go out as one JSON line per measurement.
"""
from __future__ import annotations

import array
import hashlib
import json
import os
import sys
import threading
import time
import traceback

import numpy as np


def digest(obj) -> str:
    """A hash of a result that two runs share exactly when their results are equal
    (same types, shapes, dtypes and bits)."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj):
    if isinstance(obj, np.ndarray):
        h.update(b"nd" + obj.dtype.str.encode() + repr(obj.shape).encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, list) and obj and type(obj[0]) is int:
        try:
            if all(type(x) is int for x in obj):
                h.update(b"intlist%d" % len(obj))
                h.update(array.array("q", obj).tobytes())
                return
        except OverflowError:
            pass
        _feed_seq(h, b"list", obj)
    elif isinstance(obj, (list, tuple)):
        _feed_seq(h, type(obj).__name__.encode(), obj)
    elif isinstance(obj, dict):
        _feed_seq(h, b"dict", sorted(obj.items(), key=repr))
    else:
        h.update(type(obj).__name__.encode() + b":" + repr(obj).encode())


def _feed_seq(h, tag, seq):
    h.update(tag + b"%d[" % len(seq))
    for x in seq:
        _feed(h, x)
    h.update(b"]")


class PeakRss:
    """The peak resident memory of this process while the block runs, sampled every
    2 ms, relative to the start (so: what the run itself added)."""

    def __enter__(self):
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.start = self._rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.added = self.peak - self.start


def tcp_bytes_received() -> int:
    """Bytes this process has received on its open TCP sockets (the kernel's tcp_info
    bytes_received, summed over /proc/self/fd): what reached the client of a cluster."""
    import socket
    import struct
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        with s:
            if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET,
                                                                 socket.AF_INET6):
                continue
            try:
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            except OSError:
                continue
            if len(info) >= _TCPI_BYTES_RECEIVED + 8:
                total += struct.unpack_from("Q", info, _TCPI_BYTES_RECEIVED)[0]
    return total


# Offset of tcpi_bytes_received in Linux's struct tcp_info (linux/tcp.h, since 4.1).
_TCPI_BYTES_RECEIVED = 128


def _runner(system, workers, timeline, backend="local"):
    """A function (workload, args) -> result for this system, and a closer."""
    from .peers import PYDRON_VARIANTS
    if system in ("sequential", "pydron") or system in PYDRON_VARIANTS:
        if system != "sequential":
            import pydron
            if not hasattr(pydron, "enable"):
                raise RuntimeError("pydron.enable is missing (core not installed)")
            variant = PYDRON_VARIANTS.get(system, {})
            pydron.enable(workers=workers, progress=False, timeline=timeline,
                          cluster=f"local:{workers}" if backend == "cluster" else None,
                          replay=variant.get("replay"))
            if "guess" in variant:
                from pydron import _core
                _core._replay_configure(guess=variant["guess"])
            if hasattr(pydron, "is_enabled") and not pydron.is_enabled():
                raise RuntimeError("pydron.enable() did not enable pydron "
                                   "(PYDRON_DISABLE set?)")
            return (lambda w, args: w.functions()[0](*args)), pydron.disable
        return (lambda w, args: w.functions()[0](*args)), (lambda: None)
    from .peers import start_peer
    peer = start_peer(system, workers)
    return (lambda w, args: w.functions()[1](peer, *args)), peer.close


def _error_text(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" at {os.path.basename(last[0].filename)}:{last[0].lineno}" if last else ""
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg}{where}"[:300]


def run(spec: dict, emit) -> None:
    from .catalog import WORKLOADS
    system, workers, repeat = spec["system"], spec["workers"], spec["repeat"]
    t0 = time.perf_counter()
    try:
        call, close = _runner(system, workers, spec.get("timeline"),
                              spec.get("backend", "local"))
    except Exception as exc:
        emit({"event": "system", "system": system, "status": "failed",
              "error": _error_text(exc)})
        return
    record = {"event": "system", "system": system, "status": "ok",
              "startup_s": time.perf_counter() - t0}
    if system == "pydron":
        try:
            from pydron import _core
            record["versions"] = {str(k): str(v) for k, v in _core.versions().items()}
        except Exception:
            pass
    emit(record)
    budget = spec.get("budget_s")
    try:
        for name in spec["workloads"]:
            w = WORKLOADS[name]
            params = w.quick if spec["quick"] else w.params
            if w.sizes:
                sizes = w.quick_sizes if spec["quick"] else w.sizes
                cases = [dict(params, n=n) for n in sizes]
            else:
                cases = [params]
            per_task = None
            for i, case in enumerate(cases):
                record = {"event": "result", "workload": name, "system": system,
                          "params": case, "tasks": w.tasks(**case), "times_s": [],
                          "digest": None, "error": None}
                if (budget and per_task and system != "sequential"
                        and per_task * record["tasks"] > budget):
                    record["status"] = "skipped"
                    record["error"] = (f"over the time budget ({budget:g} s): "
                                       f"~{per_task * record['tasks']:.0f} s expected")
                    emit(record)
                    continue
                try:
                    _measure(w, case, call, repeat, record, warm=(i == 0),
                             on_cluster=spec.get("backend") == "cluster" and
                             system != "sequential")
                    record["status"] = "ok"
                    per_task = min(record["times_s"]) / record["tasks"]
                except Exception as exc:
                    record["status"] = "failed"
                    record["error"] = _error_text(exc)
                emit(record)
    finally:
        try:
            close()
        except Exception:
            pass


def _fetched_results() -> int | None:
    cluster = sys.modules.get("pydron._cluster")
    adapter = cluster.current() if cluster is not None else None
    return adapter.stats["fetched_results"] if adapter is not None else None


def _measure(w, case, call, repeat, record, warm, on_cluster=False):
    args = w.args(case)
    if warm:
        call(w, w.args(w.warm) if w.warm is not None else args)
    reps = repeat if record["tasks"] < 100_000 else 1
    digests = []
    for _ in range(reps):
        rx0 = tcp_bytes_received() if on_cluster else 0
        fetched0 = _fetched_results() if on_cluster else None
        with PeakRss() as mem:
            t0 = time.perf_counter()
            result = call(w, args)
            elapsed = time.perf_counter() - t0
        if on_cluster:
            record.setdefault("client_rx_bytes", []).append(tcp_bytes_received() - rx0)
            if fetched0 is not None:
                record.setdefault("fetched_results", []).append(_fetched_results() - fetched0)
        record["times_s"].append(elapsed)
        record.setdefault("master_bytes", []).append(mem.added)
        digests.append(digest(result))
        del result
    record["digest"] = digests[0]
    if len(set(digests)) > 1:
        raise RuntimeError("results differ between repeats")


def main() -> int:
    spec = json.loads(sys.argv[1])
    out = open(spec["out"], "a", buffering=1)

    def emit(record):
        out.write(json.dumps(record) + "\n")
        out.flush()

    run(spec, emit)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
