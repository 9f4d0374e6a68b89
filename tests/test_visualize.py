"""pydron.visualize writes the traced task graph: a node per task named by function and line, an
edge per data dependency, the sync points; and the progress bar of long scheduled calls."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

import pydron


@pydron.functional
def leaf(x):
    return x * 2


@pydron.functional
def combine(a, b):
    time.sleep(0.05)       # still running when the scheduled code reads the total: a real wait
    return a + b


@pydron.schedule
def reduction(xs):
    parts = [leaf(x) for x in xs]
    while len(parts) > 1:
        parts = [combine(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    total = parts[0]
    if total > 0:          # a sync point: the scheduled code reads a result
        return total
    return -total


@pytest.fixture(scope="module", autouse=True)
def enabled():
    pydron.enable(workers=2)
    yield
    pydron.disable()


def test_visualize_writes_dot_with_tasks_edges_and_sync(tmp_path):
    out = tmp_path / "graph.dot"
    assert pydron.visualize(reduction, [1, 2, 3, 4], filename=str(out)) == 20
    text = out.read_text()
    assert text.count('label="data"') == 6          # 3 combines, 2 inputs each
    assert text.count("leaf\\ntest_visualize.py:") == 4
    assert text.count("combine\\ntest_visualize.py:") == 3
    assert "sync\\ntest_visualize.py:" in text
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_visualize_svg_through_graphviz(tmp_path):
    out = tmp_path / "graph.svg"
    pydron.visualize(reduction, [1, 2], filename=str(out))
    svg = out.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "combine" in svg


def test_visualize_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="must end in .svg, .png, .pdf or .dot"):
        pydron.visualize(reduction, [1], filename=str(tmp_path / "graph.txt"))
    with pytest.raises(TypeError, match="is not a @pydron.schedule function"):
        pydron.visualize(leaf, 1, filename=str(tmp_path / "g.dot"))


def test_progress_bar_on_a_terminal_only():
    script = textwrap.dedent("""
        import time, pydron
        @pydron.functional
        def slow(x):
            time.sleep(0.3)
            return x
        @pydron.schedule
        def run(n):
            return sum([slow(i) for i in range(n)])
        pydron.enable(workers=2)
        print(run(8))
    """)
    # Not a terminal: no progress output at all.
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "28" and "tasks" not in proc.stderr
    # On a pseudo-terminal: a bar reaching 8/8.
    import pty
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-c", script])
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    assert "8/8 tasks" in text and "28" in text


def test_timeline_is_a_chrome_trace_with_a_lane_per_worker(tmp_path):
    import json
    path = tmp_path / "run.json"
    script = textwrap.dedent(f"""
        import time, pydron
        @pydron.functional
        def slow(x):
            time.sleep(0.05)
            if x == 5:
                raise ValueError("five")
            return x
        @pydron.schedule
        def run(n):
            try:
                return [slow(i) for i in range(n)]
            except ValueError:
                return "caught"
        pydron.enable(workers=2, timeline={str(path)!r})
        print(run(6))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    trace = json.loads(path.read_text())      # written at exit
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert proc.stdout.strip() == "caught"
    assert sorted(e["name"] for e in slices) == ["slow"] * 6
    assert {e["tid"] for e in slices} == {1, 2}          # both worker lanes were used
    assert all(e["dur"] >= 45_000 for e in slices if e["cat"] == "task")  # µs: 50 ms sleeps
    assert [e["cat"] for e in slices].count("failed") == 1
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names[1] == "worker 1" and names[2] == "worker 2"


def test_timeline_bad_directory_is_named(tmp_path):
    with pytest.raises(ValueError, match="timeline directory does not exist"):
        pydron.enable(workers=2, timeline=str(tmp_path / "missing" / "run.json"))
