"""The wait report: per scheduled function, how many tasks it made, how parallel they ran, and
the lines where it waited for a result, how often and how long, with the change that moves the
wait after the loop. Printed at the end of `pydron run`, or at exit with PYDRON_REPORT=1
(the C core records it: pydron._core._report, graph/observe.c)."""
from __future__ import annotations

import linecache
import os
import sys

from pydron import _core

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# A line waited at more often than this, in one call on average, is a wait inside a loop.
_LOOP_WAITS = 3


def start() -> None:
    """Start recording (a fresh report)."""
    _core._report(True)


def collect(keep_going: bool = True) -> dict:
    """What was recorded since start(): {qualname: {calls, tasks, wall, busy, waits}}."""
    return _core._report(bool(keep_going))


def _hint(line_text: str) -> str:
    text = line_text.strip()
    if text.startswith("print(") or ".write(" in text:
        return ("it prints or writes each result as it comes: collect the results in a list "
                "and print or write them after the loop")
    if "]" in text.split("=")[0] and "=" in text:
        return ("it stores each result into an array or an object: store them after the loop "
                "(build a list in the loop, fill the array from it afterwards)")
    if text.startswith(("if ", "elif ", "while ")):
        return ("a branch reads each result: if the loop does not depend on it, compute the "
                "results first and decide afterwards")
    return ("it reads each result inside the loop: make the calls first (a list), read the "
            "results after the loop")


def format_report(data: dict, workers: int | None = None) -> str:
    """The report as text; empty when no task was made (functions that made none are left
    out)."""
    data = {name: e for name, e in data.items() if e["tasks"]}
    if not data:
        return ""
    workers = workers or os.cpu_count() or 1
    lines = ["pydron report (per scheduled function):"]
    for name, e in sorted(data.items(), key=lambda kv: -kv[1]["wall"]):
        wall, busy = e["wall"], e["busy"]
        parallel = busy / wall if wall > 0 else 0.0
        lines.append(f"  {name}: {e['calls']} call(s), {e['tasks']} task(s), "
                     f"{wall:.3f} s, tasks busy {busy:.3f} s: {parallel:.2f} of {workers} "
                     f"worker(s) used")
        # Waits inside pydron's own Python (the scheduled top level's namespace) are not the
        # user's lines.
        waits = sorted(((k, v) for k, v in e["waits"].items()
                        if not (isinstance(k[0], str) and
                                os.path.dirname(os.path.abspath(k[0])) == _PACKAGE_DIR)),
                       key=lambda kv: -kv[1][1])
        for (filename, line), (count, seconds) in waits[:5]:
            where = f"{os.path.basename(filename)}:{line}" if isinstance(filename, str) else "?"
            text = linecache.getline(filename, line).strip() if isinstance(filename, str) else ""
            lines.append(f"    waited {count} time(s) at {where} ({seconds:.3f} s): {text}")
            if count >= _LOOP_WAITS * max(1, e["calls"]):
                lines.append(f"      hint: {_hint(text)}")
        if len(waits) > 5:
            lines.append(f"    ... and {len(waits) - 5} more line(s)")
    return "\n".join(lines) + "\n"


def print_report(stream=None, workers: int | None = None) -> None:
    text = format_report(collect(False), workers)
    if text:
        (stream or sys.stderr).write(text)
