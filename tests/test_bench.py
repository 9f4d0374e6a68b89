"""`pydron bench` driven in subprocesses (tiny sizes): bad input, the JSON schema of its
output, the chart, peers that are not installed; and the harness's checking of results
against the sequential ones."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pydron.bench import harness
from pydron.bench.peers import SYSTEMS
from pydron.bench.catalog import WORKLOADS

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent


def bench(*args, cwd, timeout=120):
    env = dict(os.environ)
    env.pop("PYDRON_DISABLE", None)
    return subprocess.run([PY, "-m", "pydron", "bench", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, words", [
    (["--workloads", "tiny,nope"], ["unknown workload 'nope'", "tiny", "scale"]),
    (["--systems", "dask-thread"], ["unknown system 'dask-thread'", "dask-threads", "ray"]),
    (["--workers", "0"], ["--workers"]),
    (["--repeat", "x"], ["--repeat"]),
    (["--frobnicate"], ["--frobnicate"]),
])
def test_bad_input_one_line_status_2_nothing_started(tmp_path, args, words):
    t0 = time.monotonic()
    out = bench(*args, "--json", tmp_path / "out.json", cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for w in words:
        assert w in lines[0]
    assert not (tmp_path / "out.json").exists()
    assert out.stdout == ""
    assert time.monotonic() - t0 < 20


@pytest.mark.nosan
def test_small_run_json_schema_and_png(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    out = bench("--quick", "--workloads", "tiny,tree", "--systems", "pydron,mp-pool,ray",
                "--repeat", "2", "--workers", "2", "--json", out_json, "--plot", out_png,
                "--timeline", tmp_path / "timeline.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == harness.SCHEMA
    assert doc["workers"] == 2 and doc["repeat"] == 2 and doc["quick"] is True
    for key in ("cpu_count", "platform", "python", "versions"):
        assert key in doc["machine"]
    assert set(doc["workloads"]) == {"tiny", "tree"}
    systems = {s["system"]: s for s in doc["systems"]}
    assert set(systems) == {"sequential", "pydron", "mp-pool", "ray"}
    results = {(r["workload"], r["system"]): r for r in doc["results"]}
    for w in ("tiny", "tree"):
        seq = results[(w, "sequential")]
        assert seq["status"] == "ok" and seq["speedup_vs_sequential"] == 1.0
        mp = results[(w, "mp-pool")]
        assert mp["status"] == "ok", mp
        assert len(mp["times_s"]) == 2 and mp["min_s"] <= mp["median_s"] <= mp["max_s"]
        assert mp["digest"] == seq["digest"]
        assert mp["us_per_task"] == pytest.approx(mp["median_s"] / mp["tasks"] * 1e6)
        assert mp["ratio_vs_best_peer"] == pytest.approx(1.0)
        py = results[(w, "pydron")]
        assert py["status"] in ("ok", "failed", "wrong")
        if py["status"] != "ok":                    # shown as such, never as a time
            assert py["median_s"] is None and py["error"]
    assert results[("tiny", "sequential")]["tasks"] == WORKLOADS["tiny"].quick["n"]
    ray = results[("tiny", "ray")]
    try:
        import ray  # noqa: F401
    except ImportError:
        assert ray["status"] == "skipped" and systems["ray"]["status"] == "skipped"
        assert "skipped" in out.stdout
    # the table names every system and workload
    for name in ("sequential", "pydron", "mp-pool", "tiny", "tree"):
        assert name in out.stdout
    import matplotlib.image
    img = matplotlib.image.imread(out_png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_scale_reports_memory_per_task(tmp_path):
    out_json = tmp_path / "bench.json"
    out = bench("--quick", "--workloads", "scale", "--systems", "sequential", "--repeat", "1",
                "--json", out_json, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out_json.read_text())
    sizes = sorted(r["tasks"] for r in doc["results"] if r["system"] == "sequential")
    assert sizes == list(WORKLOADS["scale"].quick_sizes)
    for r in doc["results"]:
        assert r["status"] == "ok" and r["master_bytes_per_task"] >= 0
    assert "scale 10k" in out.stdout


def test_list(tmp_path):
    out = bench("--list", cwd=tmp_path)
    assert out.returncode == 0
    for name in list(WORKLOADS) + list(SYSTEMS):
        assert name in out.stdout


def _record(system, digest, times=(1.0, 2.0, 3.0), status="ok"):
    return {"workload": "tiny", "system": system, "status": status, "digest": digest,
            "times_s": list(times), "tasks": 10, "params": {"n": 10}, "error": None}


def test_wrong_results_are_shown_as_wrong_never_as_a_time():
    results = [_record("sequential", "a", (4.0, 4.0, 4.0)), _record("pydron", "a"),
               _record("processpool", "b"), _record("mp-pool", "a", (8.0, 8.0, 8.0)),
               _record("joblib", None, (), status="failed")]
    harness.summarise(results)
    seq, py, ppe, mp, jl = results
    assert py["status"] == "ok" and py["median_s"] == 2.0
    assert py["speedup_vs_sequential"] == 2.0
    assert py["ratio_vs_best_peer"] == 0.25          # the best correct peer: mp-pool
    assert py["spread"] == pytest.approx(0.5)
    assert ppe["status"] == "wrong" and ppe["median_s"] is None
    assert ppe["speedup_vs_sequential"] is None
    assert jl["median_s"] is None
    _, rows = harness.table_rows(results)
    shown = {row[1]: row for row in rows}
    assert shown["processpool"][2] == "WRONG"
    assert shown["joblib"][2] == "FAILED"
    assert all(c == "" for c in shown["processpool"][4:])


def test_digest_tells_types_shapes_and_values_apart():
    import numpy as np
    from pydron.bench.child import digest
    a = np.arange(6.0)
    assert digest([1, 2, 3]) == digest([1, 2, 3])
    assert digest([1, 2, 3]) != digest([1, 2, 4])
    assert digest([1, 2, 3]) != digest((1, 2, 3))
    assert digest(a) == digest(a.copy())
    assert digest(a) != digest(a.reshape(2, 3))
    assert digest(a) != digest(a.astype(np.float32))
    assert digest(1) != digest(1.0)


@pytest.mark.nosan
def test_pipeline_demo_small(tmp_path):
    env = dict(os.environ)
    env.pop("PYDRON_DISABLE", None)
    out = subprocess.run([PY, REPO / "bench" / "pipeline_demo.py", "--images", "4", "--size",
                          "64", "--runs", "1", "--workers", "2"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "results identical" in out.stdout
    assert "speed-up" in out.stdout
    expect = next(ln for ln in out.stdout.splitlines() if ln.startswith("expect"))
    from pydron.config import default_workers
    cores = default_workers()
    best = 1 / (0.05 + 0.95 / min(2, cores))             # Amdahl, 5% serial
    assert f"at most about {best:.1f}x with 2 workers on {cores} usable core" in expect, expect
    assert "0.03125 MB frames" in expect


def test_no_json_unless_asked_and_the_table_has_a_legend(tmp_path):
    out = bench("--quick", "--workloads", "tiny", "--systems", "sequential", "--repeat", "1",
                "--table", "plain", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []              # nothing written into the folder
    assert "raw figures" not in out.stderr
    for words in ("vs seq: sequential time / this system's time: > 1 is faster",
                  "vs best peer: this system's time / the fastest other parallel system's",
                  "> 1 means slower", "master B/task: memory the calling process added",
                  "empty for the others"):
        assert words in " ".join(out.stdout.split()), words


@pytest.mark.nosan
def test_blas_workload_runs_and_agrees_with_sequential(tmp_path):
    """The linear-algebra workload (numpy's default BLAS threads) on pydron and the two peers
    the figures compare it with; their results must equal the sequential ones."""
    out_json = tmp_path / "bench.json"
    out = bench("--quick", "--workloads", "blas", "--systems", "pydron,processpool,joblib",
                "--repeat", "1", "--workers", "2", "--json", out_json, cwd=tmp_path,
                timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out_json.read_text())
    results = {r["system"]: r for r in doc["results"]}
    assert results["sequential"]["status"] == "ok"
    assert results["sequential"]["tasks"] == WORKLOADS["blas"].quick["n"]
    for system in ("pydron", "processpool", "joblib"):
        assert results[system]["status"] == "ok", results[system]
        assert results[system]["digest"] == results["sequential"]["digest"]
