"""`pydron bench`: run the workloads on every system side by side and compare.

Each system runs in a process of its own (child.py), one after the other, on the same
inputs; the sequential system always runs first and is the reference every other result
is checked against. Output: a table, a JSON file with every raw figure and the machine
description, and optionally a chart.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .peers import CLUSTER_SYSTEMS, OPT_IN, PEERS, SYSTEMS, availability
from .catalog import WORKLOADS

SCHEMA = "pydron-bench/1"


class BenchUsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BenchUsageError(f"pydron bench: {message}")


def _names(values, accepted, what):
    if not values:
        return list(accepted)
    out = []
    for v in values:
        for name in (x.strip() for x in v.split(",")):
            if not name:
                continue
            if name == "all":
                out.extend(n for n in accepted if n not in out)
                continue
            if name not in accepted:
                raise BenchUsageError(f"pydron bench: unknown {what} {name!r} "
                                      f"(accepted: {', '.join(accepted)})")
            if name not in out:
                out.append(name)
    return out


def _positive(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def parse_args(argv):
    p = _Parser(prog="pydron bench", description="Compare pydron with sequential Python "
                "and with other parallel systems on this machine.")
    p.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    p.add_argument("--workloads", action="append", metavar="W,...",
                   help=f"workloads to run ({', '.join(WORKLOADS)})")
    p.add_argument("--systems", action="append", metavar="S,...",
                   help=f"systems to compare ({', '.join(SYSTEMS)}); sequential "
                        "always runs, as the reference")
    p.add_argument("--workers", type=_positive, default=None,
                   help="workers per system (default: usable cores)")
    p.add_argument("--repeat", type=_positive, default=None,
                   help="timed repeats (default 3, --quick 2)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write every raw figure here (default: none written)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write a chart")
    p.add_argument("--timeline", default=None, metavar="FILE",
                   help="write pydron's Chrome trace-event timeline of its runs")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="skip scale sizes expected to take longer than this")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up on a system after this long")
    p.add_argument("--table", choices=("rich", "plain", "markdown"), default="rich",
                   help="table style (rich when installed, else plain)")
    p.add_argument("--list", action="store_true", help="list workloads and systems")
    p.add_argument("--backend", choices=("local", "cluster"), default="local",
                   help="where pydron's tasks run: local processes, or a Dask cluster of "
                        "--workers single-threaded workers on this machine (peers: Dask's "
                        "client.submit per task and client.map on the same kind of cluster)")
    ns = p.parse_args(argv)
    if ns.backend == "cluster":
        ns.workloads = ns.workloads or ["tiny,cpu,tree"]
        ns.systems = ns.systems or [",".join(CLUSTER_SYSTEMS)]
    ns.workloads = _names(ns.workloads, list(WORKLOADS), "workload")
    ns.systems = (_names(ns.systems, list(SYSTEMS), "system") if ns.systems else
                  [s for s in SYSTEMS if s not in OPT_IN])
    if "sequential" not in ns.systems:
        ns.systems.insert(0, "sequential")
    ns.systems.sort(key=SYSTEMS.index)
    if ns.workers is None:          # PYDRON_WORKERS, a config file, or the usable cores
        from .. import config
        try:
            ns.workers = config.resolve().workers
        except config.ConfigError as exc:
            raise BenchUsageError(f"pydron bench: {exc}") from None
    if ns.repeat is None:
        ns.repeat = 2 if ns.quick else 3
    if ns.budget is None:
        ns.budget = 8.0 if ns.quick else 60.0
    if ns.timeout is None:
        ns.timeout = 120.0 if ns.quick else 900.0
    if ns.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchUsageError("pydron bench: --plot needs matplotlib "
                                  "(pip install matplotlib)") from None
    return ns


def machine() -> dict:
    info = {"hostname": socket.gethostname(), "platform": platform.platform(),
            "machine": platform.machine(), "python": sys.version.split()[0],
            "implementation": platform.python_implementation(),
            "cpu_count": os.cpu_count()}
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_bytes"] = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    versions = {}
    for mod in ("numpy", "joblib", "dask", "distributed", "ray", "cloudpickle"):
        try:
            from importlib.metadata import version
            versions[mod] = version(mod)
        except Exception:
            pass
    info["versions"] = versions        # the pydron child adds the core's own
    return info


def run_system(system, ns, log) -> tuple[dict, list[dict]]:
    """Run one system's child process; its system record and result records."""
    out = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    out.close()
    spec = {"system": system, "workloads": ns.workloads, "quick": ns.quick,
            "repeat": ns.repeat, "workers": ns.workers, "out": out.name,
            "budget_s": ns.budget,
            "timeline": ns.timeline if system == "pydron" else None,
            "backend": ns.backend}
    env = dict(os.environ)
    env.pop("PYDRON_DISABLE", None)
    if system == "sequential":
        env["PYDRON_DISABLE"] = "1"
    env["PYDRON_PROGRESS"] = "0"
    t0 = time.perf_counter()
    # stderr to a file, not a pipe: a peer's stray worker processes may hold a pipe open
    # long after the child itself is gone.
    with tempfile.TemporaryFile() as errfile:
        proc = subprocess.Popen([sys.executable, "-m", "pydron.bench.child", json.dumps(spec)],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=errfile, start_new_session=True)
        try:
            proc.wait(timeout=ns.timeout)
            failure = (None if proc.returncode == 0
                       else f"exited with status {proc.returncode}")
        except subprocess.TimeoutExpired:
            failure = f"timed out after {ns.timeout:g} s"
        try:                        # the child and whatever it left behind in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        errfile.seek(0)
        err = errfile.read()
    records = []
    with open(out.name) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    os.unlink(out.name)
    sysrec = next((r for r in records if r.get("event") == "system"),
                  {"system": system, "status": "failed", "error": failure})
    sysrec["wall_s"] = time.perf_counter() - t0
    results = [r for r in records if r.get("event") == "result"]
    msg = sysrec.get("error") or failure
    if failure:
        tail = (err or b"").decode(errors="replace").strip().splitlines()[-1:]
        msg = failure + (f": {tail[0][:200]}" if tail else "")
        sysrec["status"], sysrec["error"] = "failed", msg
    done = {r["workload"] for r in results}
    for name in ns.workloads:
        if name not in done:
            results.append({"event": "result", "workload": name, "system": system,
                            "status": "failed", "error": msg or "no result",
                            "times_s": [], "params": {}, "tasks": None})
    return sysrec, results


def summarise(results: list[dict]) -> None:
    """Fill in medians, checks against sequential, speed-ups and ratios, in place."""
    def key(r):
        return (r["workload"], r.get("params", {}).get("n") if WORKLOADS[r["workload"]].sizes
                else None)

    reference = {key(r): r for r in results
                 if r["system"] == "sequential" and r["status"] == "ok"}
    for r in results:
        times = r.get("times_s") or []
        if r["status"] == "ok":
            ref = reference.get(key(r))
            if ref is None:
                r["status"], r["error"] = "unchecked", "no sequential result to compare"
            elif r["digest"] != ref["digest"]:
                r["status"] = "wrong"
                r["error"] = "result differs from the sequential result"
        if r["status"] in ("ok", "unchecked") and times:
            med = statistics.median(times)
            r["median_s"], r["min_s"], r["max_s"] = med, min(times), max(times)
            r["spread"] = (max(times) - min(times)) / 2 / med if med else 0.0
            r["us_per_task"] = med / r["tasks"] * 1e6 if r.get("tasks") else None
            if r.get("master_bytes"):
                r["master_bytes_per_task"] = min(r["master_bytes"]) / r["tasks"]
        else:
            for k in ("median_s", "min_s", "max_s", "spread", "us_per_task"):
                r[k] = None
    for k in {key(r) for r in results}:
        group = [r for r in results if key(r) == k]
        seq = reference.get(k)
        peers = [r["median_s"] for r in group
                 if r["system"] in PEERS and r["status"] == "ok"]
        best = min(peers) if peers else None
        for r in group:
            ok = r["status"] == "ok" and r["median_s"]
            r["speedup_vs_sequential"] = (seq["median_s"] / r["median_s"]
                                          if ok and seq and seq.get("median_s") else None)
            r["ratio_vs_best_peer"] = r["median_s"] / best if ok and best else None


def _label(r):
    w = WORKLOADS[r["workload"]]
    n = r.get("params", {}).get("n")
    if w.sizes and n:
        return f"scale {_si(n)}"
    return r["workload"]


def _si(n):
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def _fmt_time(s):
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def table_rows(results, notes=None):
    """The table's header and rows; reasons for failed/skipped rows go to `notes`
    (numbered) when given, else into the row."""
    header = ["workload", "system", "median", "spread", "µs/task", "vs seq", "vs best peer",
              "master B/task"]
    rows = []
    for r in results:
        if r["status"] in ("ok", "unchecked"):
            cells = [_fmt_time(r["median_s"]), f"±{r['spread'] * 100:.0f}%",
                     f"{r['us_per_task']:.1f}" if r.get("us_per_task") is not None else "-",
                     f"{r['speedup_vs_sequential']:.2f}×"
                     if r.get("speedup_vs_sequential") else "-",
                     f"{r['ratio_vs_best_peer']:.2f}×" if r.get("ratio_vs_best_peer")
                     else "-",
                     f"{r['master_bytes_per_task']:.0f}"
                     if WORKLOADS[r["workload"]].sizes and
                     r.get("master_bytes_per_task") is not None else ""]
            if r["status"] == "unchecked":
                cells[0] += " (unchecked)"
        else:
            reason = r.get("error") or ""
            status = (r["status"].upper() if r["status"] in ("wrong", "failed")
                      else r["status"])
            if notes is not None and reason:
                if reason not in notes:
                    notes.append(reason)
                status, reason = f"{status} [{notes.index(reason) + 1}]", ""
            cells = [status, reason[:40], "", "", "", ""]
        rows.append([_label(r), r["system"]] + cells)
    return header, rows


LEGEND = """\
median: wall time of one run of the workload (median of the repeats); spread: half the range
  of the repeats, relative to the median.  µs/task: median / number of tasks.
vs seq: sequential time / this system's time: > 1 is faster than plain Python, < 1 slower.
vs best peer: this system's time / the fastest other parallel system's (not pydron, not
  sequential): > 1 means slower than that peer, < 1 faster.
master B/task: memory the calling process added during the run, per task (peak RSS); shown
  for the scale workload only, where it measures what the graph costs per task; empty for
  the others, whose inputs and results dominate it."""


def print_table(results, systems, file=sys.stdout, style="rich"):
    notes: list[str] = []
    absent = {s["system"] for s in systems if s["status"] == "skipped"}
    header, rows = table_rows([r for r in results if r["system"] not in absent], notes)
    Console = None
    if style == "rich":
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
    if style == "markdown":
        print("| " + " | ".join(header) + " |", file=file)
        print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
              file=file)
        for row in rows:
            print("| " + " | ".join(row) + " |", file=file)
    elif Console is not None:
        t = Table(title="pydron bench", show_lines=False)
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i < 2 else "right",
                         overflow="fold")
        last = None
        for row in rows:
            if last is not None and row[0] != last:
                t.add_section()
            last = row[0]
            style = "bold" if row[1] == "pydron" else None
            if row[2].startswith(("WRONG", "FAILED")):
                style = "red"
            t.add_row(*row, style=style)
        Console(file=file, width=150).print(t)
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
        print(line, file=file)
        print("-" * len(line), file=file)
        for row in rows:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)), file=file)
    for i, note in enumerate(notes, 1):
        print(f"[{i}] {note}", file=file)
    print(LEGEND, file=file)
    skipped = [(s["system"], s.get("error")) for s in systems if s["status"] == "skipped"]
    for name, why in skipped:
        print(f"{name}: {why}", file=file)


def print_client_bytes(results, file=sys.stdout):
    """What the client process received over TCP in each timed run (results, and everything
    else Dask sent it), and for pydron how many task results it fetched: a workload whose
    intermediate results stay on the workers shows only its final result here."""
    rows = [r for r in results if r.get("client_rx_bytes")]
    if not rows:
        return
    print("client side (cluster runs): bytes received over TCP per run (min), results fetched",
          file=file)
    for r in rows:
        fetched = r.get("fetched_results")
        extra = f", {min(fetched)} results fetched" if fetched else ""
        print(f"  {_label(r):<10} {r['system']:<16} {min(r['client_rx_bytes']):>10} B"
              f" ({min(r['client_rx_bytes']) / r['tasks']:.1f} B/task){extra}", file=file)


def main(argv=None) -> int:
    try:
        ns = parse_args(sys.argv[1:] if argv is None else argv)
    except BenchUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ns.list:
        for name, w in WORKLOADS.items():
            print(f"workload {name:<12} {w.description}")
        for name in SYSTEMS:
            ok, ver = availability(name)
            print(f"system   {name:<16} {'installed ' + (ver or '') if ok else 'not installed'}")
        return 0
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"pydron bench: {', '.join(ns.workloads)} on {', '.join(ns.systems)}; "
          f"{ns.workers} workers, {ns.repeat} repeats{' (quick)' if ns.quick else ''}",
          file=sys.stderr)
    systems, results = [], []
    for system in ns.systems:
        installed, version = availability(system)
        if not installed:
            systems.append({"system": system, "status": "skipped",
                            "error": f"skipped: {REQUIRES_TEXT.get(system, system)} "
                                     f"is not installed", "version": None})
            for name in ns.workloads:
                results.append({"workload": name, "system": system, "status": "skipped",
                                "error": "not installed", "times_s": [], "params": {},
                                "tasks": None})
            continue
        print(f"  {system} ...", end="", file=sys.stderr, flush=True)
        sysrec, recs = run_system(system, ns, None)
        sysrec["version"] = version
        systems.append(sysrec)
        results.extend(recs)
        print(f" {sysrec['wall_s']:.1f} s" + ("" if sysrec["status"] == "ok"
                                              else f" ({sysrec.get('error')})"),
              file=sys.stderr)
    machine_info = machine()
    for s in systems:
        for k, v in (s.get("versions") or {}).items():
            machine_info["versions"][f"pydron core: {k}"] = v
    order = {n: i for i, n in enumerate(ns.workloads)}
    def sort_key(r):
        n = r.get("params", {}).get("n") if WORKLOADS[r["workload"]].sizes else 0
        return (order[r["workload"]], float("inf") if n is None else n,
                SYSTEMS.index(r["system"]))
    results.sort(key=sort_key)
    summarise(results)
    print_table(results, systems, style=ns.table)
    if ns.backend == "cluster":
        print_client_bytes(results)
    doc = {"schema": SCHEMA, "created": started.isoformat(timespec="seconds"),
           "command": ["pydron", "bench"] + list(sys.argv[1:] if argv is None else argv),
           "quick": ns.quick, "repeat": ns.repeat, "workers": ns.workers,
           "machine": machine_info,
           "workloads": {n: {"description": WORKLOADS[n].description,
                             "params": WORKLOADS[n].quick if ns.quick
                             else WORKLOADS[n].params}
                         for n in ns.workloads},
           "systems": systems, "results": results}
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(doc, indent=1, default=str))
        print(f"raw figures: {ns.json}", file=sys.stderr)
    if ns.plot:
        from .plot import plot
        plot(doc, ns.plot)
        print(f"chart: {ns.plot}", file=sys.stderr)
    return 0


REQUIRES_TEXT = {"joblib": "joblib", "dask-threads": "dask", "dask-processes": "dask",
                 "dask-distributed": "dask.distributed", "ray": "ray"}
