"""Parallelism evidence (not compared with plain Python, checked by test_semantics.py): tasks
record the process they ran in and when, with time.monotonic (system-wide on Linux), and the
scheduled function records its own pid and when it finished submitting."""

import os
import threading
import time

import pydron


@pydron.functional
def timed_sleep(i, seconds):
    start = time.monotonic()
    time.sleep(seconds)
    return {"task": i, "pid": os.getpid(), "start": start, "end": time.monotonic()}


@pydron.functional
def timed_spin(i, seconds):
    start = time.monotonic()
    x = 0
    while time.monotonic() - start < seconds:
        x += 1
    return {"task": i, "pid": os.getpid(), "start": start, "end": time.monotonic()}


@pydron.schedule
def spread(task, count, seconds):
    """Submit `count` timed tasks; report where the scheduled code ran and when submission ended."""
    master = {"pid": os.getpid(), "thread": threading.get_ident()}
    records = [task(i, seconds) for i in range(count)]
    submitted = time.monotonic()
    master["after_loop_pid"] = os.getpid()
    return master, submitted, records


@pydron.schedule
def spread_nested(count, seconds):
    """Two nested scheduled calls whose tasks must also overlap: the outer one keeps tracing."""
    a = spread(timed_sleep, count, seconds)
    b = spread(timed_sleep, count, seconds)
    return a, b
