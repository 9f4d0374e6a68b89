"""Programs the cluster tests run in a process of their own: `python script.py MODE ADDRESS
[CERTDIR]`; prints one JSON line with what happened."""
import json
import os
import sys
import time

import pydron


class TaskFailure(Exception):
    pass


@pydron.functional
def where(i):
    return i * i, os.getpid()


@pydron.schedule
def squares(xs):
    return [where(x) for x in xs]


@pydron.functional
def slow_inc(i, seconds, marks):
    time.sleep(seconds)
    with open(os.path.join(marks, f"{i}-{os.getpid()}"), "w"):
        pass
    return i + 1


@pydron.functional
def sleeper(i, marks):
    with open(os.path.join(marks, f"start-{i}"), "w"):
        pass
    time.sleep(30)
    return i


@pydron.schedule
def sleepers(n, marks):
    return [sleeper(i, marks) for i in range(n)]


def batches_on_scheduler(address, prefix):
    """This client's batch keys the scheduler still knows (functions excepted)."""
    from distributed import Client
    with Client(address, set_as_default=False, timeout=10) as c:
        keys = c.run_on_scheduler(lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks])
    return [k for k in keys if k.startswith(prefix + "-")]


@pydron.functional
def plus(a, b):
    return a + b


@pydron.functional
def fail_on(i, bad):
    if i == bad:
        raise TaskFailure(f"task {i} failed")
    return i


@pydron.schedule
def spread(n):
    return [where(i) for i in range(n)]


@pydron.functional
def napping(i, seconds):
    time.sleep(seconds)
    return i * i, os.getpid()


@pydron.schedule
def naps(n, seconds):
    return [napping(i, seconds) for i in range(n)]


@pydron.functional
def in_turn(i, seconds, marks):
    """Appends i to the marks file when it runs: the order the worker ran the tasks in."""
    time.sleep(seconds)
    fd = os.open(os.path.join(marks, "order"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{i}\n".encode())
    finally:
        os.close(fd)
    return i


@pydron.schedule
def turns(n, seconds, marks):
    return [in_turn(i, seconds, marks) for i in range(n)]


@pydron.functional
def fail_on_any(i, bad):
    if i in bad:
        raise TaskFailure(f"task {i} failed")
    return i


@pydron.schedule
def first_failure(n, bad):
    try:
        return sum([fail_on_any(i, bad) for i in range(n)])
    except TaskFailure as e:
        return f"caught {type(e).__name__}: {e}"


@pydron.schedule
def two_stages(n, seconds, marks):
    firsts = [slow_inc(i, seconds, marks) for i in range(n)]
    return [plus(x, 1000) for x in firsts]


@pydron.schedule
def catches(n, bad):
    try:
        r = [fail_on(i, bad) for i in range(n)]
        return sum(r)
    except TaskFailure as e:
        return f"caught {type(e).__name__}: {e}"


def security(certdir):
    from distributed.security import Security
    return Security(tls_ca_file=os.path.join(certdir, "ca.pem"),
                    tls_client_cert=os.path.join(certdir, "node.pem"),
                    tls_client_key=os.path.join(certdir, "node.key"), require_encryption=True)


def main():
    mode, address = sys.argv[1], sys.argv[2]
    out = {}
    sec = security(sys.argv[3]) if len(sys.argv) > 3 else None
    if os.environ.get("UNORDERED"):
        # As on a Dask whose client cannot order a graph's tasks nor mark root tasks (its
        # private Client._graph_to_futures changed): graphs go through Client.get.
        from pydron import _cluster
        _cluster._orders_known = False
    pydron.enable(cluster=address, security=sec, progress=False,
                  timeline=os.environ.get("TIMELINE"))
    if mode == "spread":
        out["result"] = spread(200)
        from pydron import _cluster
        out["stats"] = dict(_cluster.current().stats)
        out["ordered"] = _cluster._dask_orders()
    elif mode == "catches":
        out["result"] = catches(50, 17)
    elif mode == "small-flush":
        # The first call teaches the adapter that napping is quick; the second's tasks are
        # long: its flush looks small (a batch per worker thread) but takes a while.
        naps(8, 0.0)
        out["result"] = naps(4, float(os.environ.get("SECONDS", "0.5")))
    elif mode == "order":
        marks = os.environ["MARKS"]
        turns(4, 0.005, marks)              # run times known from here on
        os.unlink(os.path.join(marks, "order"))
        from pydron import _cluster
        before = _cluster.current().stats["batches"]
        out["result"] = turns(int(os.environ["TASKS"]), 0.005, marks)
        out["batches"] = _cluster.current().stats["batches"] - before
        with open(os.path.join(marks, "order")) as f:
            out["order"] = [int(line) for line in f]
    elif mode == "map-chunks":
        # A map straight from graph/ (as a replayed comprehension makes one): its chunks are
        # spread over the cluster's worker threads, not over the local pool's workers.
        from pydron import _cluster, _core
        adapter = _cluster.current()
        before = adapter.stats["tasks"]
        out["result"] = [r[0] for r in _core._map(where, [(i,) for i in range(32)])]
        out["chunks"] = adapter.stats["tasks"] - before
        out["slots"] = adapter.slots
        # The same as a replayed comprehension of a one-argument function, whose chunks carry
        # the values without a tuple each (graph_submit_map flat).
        out["replayed"] = [[r[0] for r in squares(list(range(32)))] for _ in range(8)]
        out["replay_hits"] = _core._replay_state(squares)["hits"]
    elif mode == "failures":
        bad = tuple(int(x) for x in os.environ["BAD"].split(","))
        n = int(os.environ["TASKS"])
        first_failure(n, ())                # run times known: several tasks per batch
        out["result"] = first_failure(n, bad)
        out["clean"] = first_failure(n, ())
        from pydron import _cluster
        out["stats"] = dict(_cluster.current().stats)
    elif mode == "kill-worker":
        n = int(os.environ["TASKS"])
        out["result"] = two_stages(n, float(os.environ["SECONDS"]), os.environ["MARKS"])
    elif mode == "kill-scheduler":
        n = int(os.environ["TASKS"])
        try:
            two_stages(n, float(os.environ["SECONDS"]), os.environ["MARKS"])
            out["first"] = "returned"
        except pydron.ClusterLostError as e:
            out["first"] = f"ClusterLostError: {e}"
        out["second"] = spread(4)
        out["master"] = os.getpid()
        out["attached"] = pydron._api._core._remote_stats()["attached"]
    elif mode == "ctrl-c":
        from pydron import _cluster
        prefix = _cluster.current().prefix
        t0 = time.monotonic()
        try:
            sleepers(2, os.environ["MARKS"])
            out["first"] = "returned"
        except KeyboardInterrupt:
            out["first"] = "KeyboardInterrupt"
        out["seconds"] = time.monotonic() - t0
        left = batches_on_scheduler(address, prefix)
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = batches_on_scheduler(address, prefix)
        out["left"] = left
        out["outstanding"] = pydron._api._core._remote_stats()["outstanding"]
    pydron.disable()
    out["master"] = os.getpid()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
