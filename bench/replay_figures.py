"""The figures of issue 8 (graphs replayed), each against its baseline measured in the same run:

1. replayed calls of a scheduled function making 10,000 tiny calls (`x + 1`): µs per task end to
   end, against the traced call and against batched ProcessPoolExecutor.map / Pool.starmap;
2. what entering and leaving a replayed call costs (its "guard"), against a plain call;
3. master-side cost per replayed node on a 1,000-node graph without tasks, interpreted and
   compiled (jit/jit.c; the two alternate round by round), and the compile time of that graph;
4. a loop whose `if` reads each ~2 ms result: guessing against waiting (their calls interleaved),
   when guesses hold and when every guess would fail;
5. a fresh process's first call with a warm disk cache (and calls whose graph is loaded from disk
   again, alternating with replays), against a replayed call and against a
   first call with a cold cache.

    .venv/bin/python bench/replay_figures.py [--workers 2] [--repeat 9] [--only guard_and_nodes]

Medians over --repeat runs; prints one table (markdown).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tiny(workers, repeat, n=10_000):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import pydron
    from pydron import _core
    from pydron.bench.workloads import inc, tiny_program
    pydron.enable(workers=workers, progress=False)
    for _ in range(8):                  # the first calls compare the graph with the trace
        tiny_program(n)
    replayed = median_time(lambda: tiny_program(n), repeat)
    assert _core._replay_state(tiny_program)["hits"] >= repeat
    _core._replay_configure(mode="off")
    traced = median_time(lambda: tiny_program(n), repeat)
    _core._replay_configure(mode="on")
    pydron.disable()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(inc, range(100)))
        chunk = max(1, n // (4 * workers))
        ppe = median_time(lambda: list(pool.map(inc, range(n), chunksize=chunk)), repeat)
    with multiprocessing.Pool(workers) as pool:
        calls = [(x,) for x in range(n)]
        pool.starmap(inc, calls[:100])
        mp = median_time(lambda: pool.starmap(inc, [(x,) for x in range(n)]), repeat)
    us = lambda s: f"{s / n * 1e6:.3f} µs/task"     # noqa: E731
    return [("10,000 tiny tasks, replayed call", us(replayed),
             f"traced call {us(traced)}; ProcessPoolExecutor.map (chunksize {chunk}) {us(ppe)}; "
             f"Pool.starmap {us(mp)}", "≤ 0.3 µs/task, level with the batched maps")]


def guard_and_nodes(workers, repeat):
    import pydron
    from pydron import _core, _graph_cache
    pydron.enable(workers=workers, progress=False)
    cache = tempfile.mkdtemp(prefix="pydron-bench-cache-")   # its object files, controlled here
    _graph_cache.configure(cache)
    ns = {}
    exec(textwrap.dedent("""
        import pydron

        @pydron.schedule
        def ident(x, y):
            return x

        def plain_ident(x, y):
            return x
    """), ns)
    # a 1,000-node graph: 250 statements of 4 instructions each, no task
    body = "\n".join(f"    a = a + {i}\n    b = b * 1 if a > b else b" for i in range(125))
    src = f"import pydron\n@pydron.schedule\ndef nodes(a, b):\n{body}\n    return a, b\n"
    path = os.path.join(tempfile.mkdtemp(), "nodes_graph.py")
    with open(path, "w") as f:
        f.write(src)
    code = compile(src, path, "exec")
    import linecache
    linecache.cache[path] = (len(src), None, src.splitlines(True), path)
    exec(code, ns)
    ident, plain_ident, nodes = ns["ident"], ns["plain_ident"], ns["nodes"]
    from pydron import _replay
    program = _replay.lift(nodes)
    # measured as replayed, whatever the comparison says; interpreted unless said otherwise
    _core._replay_configure(compare=0, jit="off")
    ident(1, 2)
    ident(1, 2)
    nodes(1, 2)
    nodes(1, 2)
    loops = 20_000

    def many(f):
        def run():
            for _ in range(loops):
                f(1, 2)
        return run
    replayed_call = median_time(many(ident), repeat) / loops
    plain_call = median_time(many(plain_ident), repeat) / loops
    node_loops = 200
    graph_calls = lambda: [nodes(1, 2) for _ in range(node_loops)]     # noqa: E731
    per_graph = median_time(graph_calls, repeat) / node_loops
    # the compiled tier against the interpreter, alternating so that both see the same load
    _core._replay_configure(jit="always")
    nodes(1, 2)
    assert _core._replay_state(nodes)["compiled"]
    interpreted, compiled = [], []
    for _ in range(repeat):
        _core._replay_configure(jit="off")
        interpreted.append(median_time(graph_calls, 1) / node_loops)
        _core._replay_configure(jit="always")
        compiled.append(median_time(graph_calls, 1) / node_loops)
    interpreted, compiled = statistics.median(interpreted), statistics.median(compiled)
    # compiling (no object file) alternating with linking the object file the compile left
    compile_ms, load_ms, compile_call, load_call = [], [], [], []
    after = _core._replay_configure(after=0)["after"]
    objects = os.path.join(cache, "graphs")
    before = _core._jit_info()
    for _ in range(repeat):
        for f in os.listdir(objects):
            if f.endswith(".object"):
                os.unlink(os.path.join(objects, f))
        for ms, call in ((compile_ms, compile_call), (load_ms, load_call)):
            _core._replay_forget(nodes)
            t0 = time.perf_counter()
            nodes(1, 2)                 # replayed at once, its code made first (waiting for it)
            call.append((time.perf_counter() - t0) * 1e3)
            ms.append(_core._replay_state(nodes)["compile_ms"])
    info = _core._jit_info()
    assert info["compiled"] - before["compiled"] == repeat, info
    assert info["object_hits"] - before["object_hits"] == repeat, info
    setup_ms = info["setup_ms"]
    _core._replay_configure(jit="off", after=after)
    _core._replay_configure(mode="off")
    traced_graph = median_time(lambda: [nodes(1, 2) for _ in range(node_loops)],
                               repeat) / node_loops
    _core._replay_configure(mode="on", compare=1)
    assert _core._replay_state(nodes)["hits"] > 0
    pydron.disable()
    n = len(program.code)
    node_us = lambda per_call: (per_call - replayed_call) / n * 1e6     # noqa: E731
    gain = (node_us(interpreted) - node_us(compiled)) / node_us(interpreted)
    return [("entering and leaving a replayed call (the guard)",
             f"{(replayed_call - plain_call) * 1e6:.3f} µs",
             f"a replayed call {replayed_call * 1e6:.3f} µs, a plain call "
             f"{plain_call * 1e6:.3f} µs", "≤ 1 µs"),
            (f"master cost per replayed node ({n}-instruction graph, no task)",
             f"{(per_graph - replayed_call) / n * 1e6:.3f} µs/node",
             f"the same call traced: {traced_graph * 1e6:.1f} µs per call, replayed "
             f"{per_graph * 1e6:.1f} µs", "interpreted ≤ 0.2 µs"),
            (f"the same, compiled ({n} instructions)", f"{node_us(compiled):.4f} µs/node",
             f"interpreted {node_us(interpreted):.4f} µs/node, alternating with it: compiled "
             f"{'faster' if gain > 0 else 'slower'} by {abs(gain):.0%}", "compiled ≤ 0.1 µs"),
            (f"compiling that graph ({n} instructions, compile thread)",
             f"{statistics.median(compile_ms):.1f} ms",
             f"min {min(compile_ms):.1f} ms, max {max(compile_ms):.1f} ms over {repeat}; "
             f"once per process before the first compile, making the LLJIT: {setup_ms:.1f} ms",
             "≤ 10 ms per graph, off the calling thread"),
            (f"linking its object file instead ({n} instructions, compile thread)",
             f"{statistics.median(load_ms):.2f} ms",
             f"min {min(load_ms):.2f} ms, max {max(load_ms):.2f} ms over {repeat}, alternating "
             f"with the compiles; the whole first call (graph from the disk cache, its code, the "
             f"run): {statistics.median(load_call):.2f} ms linking the object, "
             f"{statistics.median(compile_call):.2f} ms compiling", "below the compile")]


def alternating(fn, repeat):
    """fn() guessing against fn() waiting, the calls interleaved in pairs (guess, wait, then
    wait, guess, ...) so that a change in the machine's load falls on both alike: the median
    seconds of each, and the median over the pairs of guessing's time / waiting's."""
    from pydron import _core
    times = {1: [], 0: []}
    for k in range(repeat):
        for guess in ((1, 0) if k % 2 == 0 else (0, 1)):
            _core._replay_configure(guess=guess)
            t0 = time.perf_counter()
            fn()
            times[guess].append(time.perf_counter() - t0)
    _core._replay_configure(guess=1)
    ratio = statistics.median(g / w for g, w in zip(times[1], times[0]))
    return statistics.median(times[1]), statistics.median(times[0]), ratio


def speculation(workers, repeat):
    import pydron
    from pydron import _core
    from pydron.bench.workloads import branch_program
    pydron.enable(workers=workers, progress=False)
    rows = []
    branch_program(4, 100, 1)
    for modulus, what in ((1, "guesses hold"), (2, "every guess would fail")):
        for _ in range(7):              # past the comparison with the trace
            branch_program(48, 20_000, modulus)
        guess, wait, ratio = alternating(lambda: branch_program(48, 20_000, modulus), repeat)
        rows.append((f"loop whose if reads each ~2 ms result, {what}",
                     f"{guess * 1e3:.1f} ms guessing",
                     f"{wait * 1e3:.1f} ms waiting; guessing / waiting, median over "
                     f"{repeat} interleaved pairs: {ratio:.3f} (" +
                     (f"{1 / ratio:.2f}× faster)" if ratio < 1 else f"{ratio - 1:+.1%} slower)"),
                     "≥ 1.5× faster" if modulus == 1 else "≤ 5% slower"))
    pydron.disable()
    return rows


FIRST_CALL = textwrap.dedent("""
    import json, sys, time
    import pydron
    from pydron import _core
    from pydron.bench.workloads import inc

    @pydron.schedule
    def work(xs):
        out = [inc(x) for x in xs]
        total = 0
        for r in out:
            if r % 3:
                total += r
        return total

    pydron.enable(workers=int(sys.argv[1]), progress=False)
    work(list(range(50)))                       # workers up, estimates made
    if sys.argv[3] == "forget":                 # the first call loads the graph from disk
        _core._replay_forget(work)
    _core._replay_configure(compare=0)          # every call replayed: what a replay costs
    # Each timed call comes after the same pause, so the workers are as idle before the first
    # call as before every replay (back-to-back calls find them still spinning).
    xs = list(range(2000))

    def timed():
        time.sleep(0.01)
        t0 = time.perf_counter(); work(xs); return time.perf_counter() - t0

    first = timed()
    # Then, alternating: the graph dropped and loaded from the disk cache again, and a replay.
    reloaded, replayed = [], []
    for _ in range(int(sys.argv[2])):
        _core._replay_forget(work)
        reloaded.append(timed())
        replayed.append(timed())
    print(json.dumps({"first": first, "reloaded": reloaded, "replayed": replayed,
                      "stats": _core._replay_stats()}))
""")


def warm_cache(workers, repeat):
    cache = tempfile.mkdtemp(prefix="pydron-figures-cache-")
    script = os.path.join(tempfile.mkdtemp(), "first_call.py")
    with open(script, "w") as f:
        f.write(FIRST_CALL)

    def run(env, rounds, forget="forget"):
        out = subprocess.run([sys.executable, script, str(workers), str(rounds), forget],
                             capture_output=True, text=True, env={**os.environ, **env},
                             check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    cold, warm, kept = [], [], []
    for _ in range(max(3, repeat)):
        subprocess.run(["rm", "-rf", cache], check=True)
        cold.append(run({"PYDRON_CACHE_DIR": cache}, 3))     # its later calls store the graph
        warm.append(run({"PYDRON_CACHE_DIR": cache}, 15))
        kept.append(run({"PYDRON_CACHE_DIR": cache}, 0, "keep"))
    assert all(w["stats"]["disk_hits"] >= 1 + 15 for w in warm), [w["stats"] for w in warm]
    med = statistics.median
    first = med(w["first"] for w in warm)
    first_kept = med(k["first"] for k in kept)
    reloaded = med(t for w in warm for t in w["reloaded"])
    replayed = med(t for w in warm for t in w["replayed"])
    return [("a fresh process's first 2,000-task call, its graph loaded from the disk cache",
             f"{first * 1e3:.2f} ms",
             f"the same call replaying the graph the process already holds (loaded by an earlier "
             f"small call) {first_kept * 1e3:.2f} ms: {first / first_kept - 1:+.1%}; a later "
             f"replay {replayed * 1e3:.2f} ms; the first call with a cold cache (traced) "
             f"{med(c['first'] for c in cold) * 1e3:.2f} ms", "what a replay costs"),
            ("a call whose graph is loaded from the disk cache (in a warm process, "
             "alternating with replays)", f"{reloaded * 1e3:.2f} ms",
             f"a replayed call {replayed * 1e3:.2f} ms: {reloaded / replayed - 1:+.1%}",
             "what a replay costs")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=9)
    parts = {f.__name__: f for f in (tiny, guard_and_nodes, speculation, warm_cache)}
    p.add_argument("--only", choices=parts, action="append",
                   help="measure only this part (again for more than one)")
    ns = p.parse_args()
    rows = []
    for name in ns.only or parts:
        rows += parts[name](ns.workers, ns.repeat)
    print(f"| figure | pydron | baselines in the same run | target |")
    print("| --- | ---: | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
