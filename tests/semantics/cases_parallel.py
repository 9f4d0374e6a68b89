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


@pydron.functional
def after(record, seconds):
    """Depends on another timed task's result."""
    start = time.monotonic()
    time.sleep(seconds)
    return {"task": record["task"] + 100, "pid": os.getpid(), "start": start,
            "end": time.monotonic()}


@pydron.schedule
def passthrough(value):
    return value


@pydron.schedule
def moves_do_not_wait(seconds):
    """Every statement between the call and `moved` only moves the pending result: none of them
    may wait for it. Returns when the moves were done, and the task's own record."""
    r = timed_sleep(0, seconds)
    alias = r
    lst = [r]
    lst.append(alias)
    lst.extend([r, r])
    lst.insert(0, r)
    d = {"k": r}
    d["j"] = lst
    t = (r, d, lst)
    n = len(lst)
    dependent = after(r, 0.0)
    nested = passthrough(t)
    cell = [None]

    def keep():                 # never called: it makes r a cell variable (loads are LOAD_DEREF)
        cell[0] = r
    moved = time.monotonic()
    return moved, n, r, nested[0], dependent, lst[0] is lst[-1]


@pydron.schedule
def consumption_waits(seconds):
    """The first consumption waits, right there."""
    r = timed_sleep(0, seconds)
    before = time.monotonic()
    pid = r["pid"]
    consumed = time.monotonic()
    return before, consumed, r, pid


def concurrent_callers(threads, calls):
    """Plain code: several threads calling scheduled functions at the same time."""
    from .cases_functions import tree_sum
    results = {}

    def caller(k):
        results[k] = [tree_sum(list(range(k, k + 5 + i % 3))) for i in range(calls)]

    workers = [threading.Thread(target=caller, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [results[k] for k in range(threads)]
