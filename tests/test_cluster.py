"""The cluster backend on real `dask scheduler` / `dask worker` processes (tests/dask_processes.py):
tasks run in the workers, in batches; a worker killed mid-run loses nothing; TLS with generated
certificates; a worker of another version is refused by name; a killed scheduler is a clear error
after which the program goes on locally; nothing is left running afterwards. The programs run in
a process of their own (tests/cluster/script.py), so that a crash fails one test."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dask_processes import DaskProcesses, make_certificates

pytest.importorskip("distributed")

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "cluster" / "script.py"


def run_script(mode, address, *extra, env=None, timeout=120, wait=True):
    full_env = dict(os.environ, PYDRON_PROGRESS="0")
    full_env.pop("PYDRON_CLUSTER", None)
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, str(SCRIPT), mode, address, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=str(HERE))
    if not wait:
        return proc
    return finish(proc, timeout)


def finish(proc, timeout=120):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the script hung; stderr:\n{err[-4000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr:\n{err[-4000:]}"
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.fixture
def cluster():
    c = DaskProcesses(workers=2)
    yield c
    c.close()
    assert not c.leftovers(), c.leftovers()


def worker_pids(c):
    with c.client() as client:
        return set(client.run(os.getpid).values())


def test_tasks_run_in_the_dask_workers_in_batches(cluster):
    out, _ = run_script("spread", cluster.address)
    squares = [r[0] for r in out["result"]]
    assert squares == [i * i for i in range(200)]
    pids = {r[1] for r in out["result"]}
    assert pids <= worker_pids(cluster), pids
    assert out["master"] not in pids
    stats = out["stats"]
    assert stats["tasks"] == 200
    assert stats["batches"] < stats["tasks"], stats      # tiny tasks share Dask tasks


def test_a_small_flush_spreads_over_every_worker(cluster):
    """A flush cut into one batch per worker thread (its run time learnt from quick calls, its
    tasks long) runs on both workers: Dask queues batches that read no other batch's result
    and hands each to a free worker thread, instead of placing them all by where their
    function is (they all went to one worker, and the other idled)."""
    out, _ = run_script("small-flush", cluster.address)
    assert [r[0] for r in out["result"]] == [0, 1, 4, 9]
    assert {r[1] for r in out["result"]} == worker_pids(cluster)


def test_batches_run_in_the_order_the_tasks_were_made(tmp_path):
    """On one single-threaded worker the batches run in submission order: the largest first,
    as factoring means, and the program's first results first (Dask's own order ran a flush's
    batches backwards)."""
    c = DaskProcesses(workers=1)
    try:
        out, _ = run_script("order", c.address, env={"TASKS": "40", "MARKS": str(tmp_path)})
    finally:
        c.close()
    assert out["result"] == list(range(40))
    assert out["batches"] >= 2, out        # a map's 2 chunks at least, or the rounds of a flush
    assert out["order"] == list(range(40))
    assert not c.leftovers(), c.leftovers()


def test_a_map_spreads_its_chunks_over_the_cluster_threads():
    """With one local worker and a cluster of 2 workers x 2 threads, a map of 32 calls is cut
    into at least a chunk per cluster thread (it was cut for the one local worker: 2 chunks,
    2 of the 4 threads busy)."""
    c = DaskProcesses(workers=2, nthreads=2)
    try:
        out, _ = run_script("map-chunks", c.address, env={"PYDRON_WORKERS": "1"})
    finally:
        c.close()
    assert out["result"] == [i * i for i in range(32)]
    assert out["slots"] == 4
    assert out["chunks"] >= 4, out
    assert out["replayed"] == [[i * i for i in range(32)]] * 8
    assert out["replay_hits"] >= 1, out
    assert not c.leftovers(), c.leftovers()


def test_failures_in_batches_surface_in_program_order(cluster):
    """Tasks fail in the middle of multi-task batches: the failure raised is the first in
    program order (as plain Python raises it), with its class and message; the same program
    without failures gives plain Python's sum."""
    out, _ = run_script("failures", cluster.address, env={"TASKS": "60", "BAD": "41,7,12"})
    assert out["result"] == "caught TaskFailure: task 7 failed"
    assert out["clean"] == sum(range(60))
    assert out["stats"]["batches"] < out["stats"]["tasks"], out["stats"]


def test_a_dask_without_ordered_graphs_runs_the_same(cluster):
    """pydron orders a flush's batches through Dask's private Client._graph_to_futures; on a
    Dask without it, graphs go through the public Client.get: the same results, the same
    first failure. (How tasks are cut into batches does not depend on it: plan_batches; with
    no run time known yet, a flush may send every task alone, ordered or not.)"""
    out, _ = run_script("spread", cluster.address, env={"UNORDERED": "1"})
    assert out["ordered"] is False
    assert [r[0] for r in out["result"]] == [i * i for i in range(200)]
    assert out["stats"]["tasks"] == 200, out["stats"]
    out, _ = run_script("failures", cluster.address,
                        env={"UNORDERED": "1", "TASKS": "60", "BAD": "41,7,12"})
    assert out["result"] == "caught TaskFailure: task 7 failed"
    assert out["clean"] == sum(range(60))


def test_user_exception_caught_by_the_same_except(cluster):
    out, _ = run_script("catches", cluster.address)
    assert out["result"] == "caught TaskFailure: task 17 failed"


def test_worker_killed_mid_run_loses_nothing(cluster, tmp_path):
    """One of two workers is killed while the first stage runs: its running tasks and the
    results it held (needed by the second stage) are computed again by the other worker."""
    n = 24
    env = {"TASKS": str(n), "SECONDS": "0.15", "MARKS": str(tmp_path)}
    proc = run_script("kill-worker", cluster.address, env=env, wait=False)
    victim = cluster.workers[0].pid
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ran_there = [m for m in os.listdir(tmp_path) if m.endswith(f"-{victim}")]
        if len(ran_there) >= 2:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("no task ran on the worker to be killed")
    cluster.kill_worker(0)
    out, _ = finish(proc)
    assert out["result"] == [i + 1 + 1000 for i in range(n)]
    survivor = cluster.workers[1].pid
    assert any(m.endswith(f"-{survivor}") for m in os.listdir(tmp_path))


def test_scheduler_killed_is_a_clear_error_then_tasks_run_locally(cluster, tmp_path):
    env = {"TASKS": "8", "SECONDS": "3", "MARKS": str(tmp_path)}
    proc = run_script("kill-scheduler", cluster.address, env=env, wait=False)
    deadline = time.monotonic() + 60
    while not os.listdir(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    cluster.kill_scheduler()
    out, _ = finish(proc, timeout=180)
    assert out["first"].startswith("ClusterLostError: pydron:"), out
    assert "scheduler" in out["first"] and "run on this machine" in out["first"], out
    assert [r[0] for r in out["second"]] == [0, 1, 4, 9]
    # Afterwards the local pool ran them: worker processes of this machine, not Dask's.
    assert not {r[1] for r in out["second"]} & worker_pids_alive(cluster)
    assert out["attached"] is False


def test_ctrl_c_cancels_this_clients_tasks_on_the_cluster(cluster, tmp_path):
    import signal
    proc = run_script("ctrl-c", cluster.address, env={"MARKS": str(tmp_path)}, wait=False)
    deadline = time.monotonic() + 60
    while len(os.listdir(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(os.listdir(tmp_path)) == 2, "the tasks did not start"
    proc.send_signal(signal.SIGINT)
    out, _ = finish(proc)
    assert out["first"] == "KeyboardInterrupt"
    assert out["seconds"] < 25, out                # not waiting for the 30 s tasks
    assert out["left"] == [], out                  # the scheduler forgot the batches
    assert out["outstanding"] == 0


def worker_pids_alive(c):
    return {w.pid for w in c.workers if w.poll() is None}


def test_tls_with_generated_certificates(tmp_path):
    certs = make_certificates(tmp_path)
    c = DaskProcesses(workers=1, certs=certs)
    try:
        assert c.address.startswith("tls://")
        out, _ = run_script("spread", c.address, str(tmp_path))
        assert [r[0] for r in out["result"]] == [i * i for i in range(200)]
    finally:
        c.close()
    assert not c.leftovers(), c.leftovers()


def test_version_mismatch_names_the_worker_and_the_versions():
    c = DaskProcesses(workers=0)
    try:
        c.add_worker(preload=str(HERE / "cluster" / "fake_versions.py"))
        c.wait_for_workers(1)
        proc = run_script("spread", c.address, wait=False)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert "VersionMismatchError" in err, err[-3000:]
        assert "cloudpickle 3" in err and "0.0.0-fake on the worker" in err, err[-3000:]
        assert "tcp://127.0.0.1:" in err.split("VersionMismatchError")[-1], err[-3000:]
    finally:
        c.close()
    assert not c.leftovers(), c.leftovers()


def test_timeline_has_one_lane_per_dask_worker(cluster, tmp_path):
    path = tmp_path / "run.json"
    run_script("spread", cluster.address, env={"TIMELINE": str(path)})
    events = json.loads(path.read_text())["traceEvents"]
    lanes = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    dask_lanes = {name for name in lanes if name.startswith("dask tcp://127.0.0.1:")}
    assert 1 <= len(dask_lanes) <= 2, lanes
    slices = [e for e in events if e.get("ph") == "X"]
    assert len(slices) == 200
    assert all(e["tid"] >= 1 and e["dur"] >= 0 for e in slices)


# ---- cutting a flush into batches, no cluster needed ----------------------------------------------

class PlannedTask:
    """What plan_batches reads of a task."""

    def __init__(self, i, fn_key="f", timeout=0.0):
        self.i, self.fn_key, self.timeout = i, fn_key, timeout

    def __repr__(self):
        return f"T{self.i}"


def planned(n, fn_key="f", start=0, timeout=0.0):
    return [PlannedTask(start + i, fn_key, timeout) for i in range(n)]


def check_plan(tasks, groups, run_time):
    """Every task once, in order; no empty batch; a timed task alone; known and unknown run
    times never share a batch."""
    assert [t for g in groups for t in g] == tasks
    for g in groups:
        assert g
        if any(t.timeout for t in g):
            assert len(g) == 1
        assert len({t.fn_key in run_time for t in g}) == 1


def test_plan_cuts_by_factoring():
    from pydron._cluster import plan_batches
    tasks, run_time = planned(32), {"f": 0.015}
    groups = plan_batches(tasks, run_time, 2)
    check_plan(tasks, groups, run_time)
    # Rounds of 2 batches, each a quarter of the work left, down to BATCH_SECONDS (20 ms).
    assert [len(g) for g in groups] == [8, 8, 4, 4, 2, 2, 1, 1, 1, 1]
    groups = plan_batches(tasks, run_time, 4)
    assert [len(g) for g in groups] == [4] * 4 + [2] * 4 + [1] * 8


def test_plan_shares_a_small_flush_between_the_threads():
    from pydron._cluster import plan_batches
    tasks, run_time = planned(12), {"f": 0.001}
    assert [len(g) for g in plan_batches(tasks, run_time, 2)] == [6, 6]
    assert [len(g) for g in plan_batches(tasks, run_time, 3)] == [4, 4, 4]
    # A run time learnt from quick calls: still a part for every thread.
    tasks, run_time = planned(4), {"f": 1e-6}
    assert [len(g) for g in plan_batches(tasks, run_time, 4)] == [1, 1, 1, 1]
    assert [len(g) for g in plan_batches(planned(1), run_time, 4)] == [1]


def test_plan_keeps_batches_within_their_limits():
    from pydron import _cluster
    tasks, run_time = planned(2000), {"f": 0.5}
    groups = _cluster.plan_batches(tasks, run_time, 2)
    check_plan(tasks, groups, run_time)
    assert max(len(g) for g in groups) * 0.5 <= _cluster.BATCH_MAX_SECONDS
    tasks, run_time = planned(50_000), {"f": 1e-7}
    groups = _cluster.plan_batches(tasks, run_time, 2)
    check_plan(tasks, groups, run_time)
    assert max(len(g) for g in groups) <= _cluster.BATCH_MAX_TASKS
    assert len(groups) == 50_000 // _cluster.BATCH_MAX_TASKS + 1


def test_plan_unknown_run_times_and_timeouts():
    from pydron import _cluster
    run_time = {"f": 0.001}
    tasks = (planned(3, "new") + planned(10, start=3) + planned(2, timeout=1.0, start=13) +
             planned(200, "new", start=15) + planned(5, start=215))
    groups = _cluster.plan_batches(tasks, run_time, 2)
    check_plan(tasks, groups, run_time)
    unknown = [g for g in groups if g[0].fn_key == "new"]
    # 203 tasks of unknown run time: at most UNKNOWN_BATCHES_MAX batches' worth, 4 a batch.
    assert [len(g) for g in unknown] == [3] + [4] * 50
    assert [g for g in groups if g[0].timeout] == [[tasks[13]], [tasks[14]]]


def test_plan_of_mixed_run_times_keeps_every_task_in_order():
    import random
    from pydron._cluster import plan_batches
    rng = random.Random(7)
    run_time = {f"f{k}": rng.choice([1e-6, 1e-4, 0.003, 0.05, 0.4]) for k in range(5)}
    for trial in range(200):
        tasks = [PlannedTask(i, rng.choice(list(run_time) + ["unknown"]),
                             timeout=1.0 if rng.random() < 0.05 else 0.0)
                 for i in range(rng.randrange(1, 300))]
        slots = rng.randrange(1, 9)
        groups = plan_batches(tasks, run_time, slots)
        check_plan(tasks, groups, run_time)
        assert len(groups) >= min(len(tasks), slots)


# ---- addresses and security, no cluster needed ---------------------------------------------------

def test_plain_tcp_off_this_machine_is_refused_without_insecure():
    from pydron import _cluster
    with pytest.raises(_cluster.ClusterError, match="not on this machine.*insecure=True"):
        _cluster.check_security("tcp://192.0.2.7:8786", None, insecure=False)


def test_insecure_is_allowed_with_a_warning(caplog):
    from pydron import _cluster
    with caplog.at_level(logging.WARNING, logger="pydron"):
        _cluster.check_security("tcp://192.0.2.7:8786", None, insecure=True)
    assert "without TLS" in caplog.text


def test_tls_without_certificates_says_what_is_missing():
    from pydron import _cluster
    with pytest.raises(_cluster.ClusterError, match="no certificates are given"):
        _cluster.check_security("tls://192.0.2.7:8786", None, insecure=False)


def test_loopback_tcp_needs_no_tls():
    from pydron import _cluster
    _cluster.check_security("tcp://127.0.0.1:8786", None, insecure=False)
    _cluster.check_security("localhost:8786", None, insecure=False)


def test_cluster_address_in_configuration(monkeypatch, tmp_path):
    from pydron import config
    monkeypatch.setenv("PYDRON_CLUSTER", "tls://sched.example:8786")
    cfg = config.resolve(search_dirs=[tmp_path])
    assert (cfg.backend, config.cluster_address(cfg)) == ("cluster", "tls://sched.example:8786")
    assert cfg.source("cluster") == "environment PYDRON_CLUSTER"
    monkeypatch.delenv("PYDRON_CLUSTER")
    (tmp_path / "pyproject.toml").write_text('[tool.pydron]\ncluster = "local:3"\n')
    cfg = config.resolve(search_dirs=[tmp_path])
    assert config.cluster_address(cfg) == "local:3"
    with pytest.raises(config.ConfigError, match="cluster must be an address"):
        config.resolve({"cluster": "local:0"}, search_dirs=[tmp_path])
    with pytest.raises(config.ConfigError, match="contradicts"):
        config.resolve({"backend": "local", "cluster": "local:2"}, search_dirs=[tmp_path])
    cfg = config.resolve({"backend": "cluster", "workers": "3"}, search_dirs=[tmp_path / "x"])
    assert config.cluster_address(cfg) == "local:3"
