"""The graph cache on disk (pydron/_graph_cache.py): a fresh process replays its first call from
it; a file that is truncated, corrupt, foreign-owned or world-writable is never loaded, and is
rebuilt; processes share one directory; `pydron cache` lists, counts and clears."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

from pydron import _core, _graph_cache

def program(condition):
    """The head of the scripts below: a scheduled function with a map, then a loop whose `if`
    (condition) reads each result."""
    return textwrap.dedent("""
        import json, sys
        import pydron
        from pydron import _core

        @pydron.functional
        def inc(x):
            return x + 1

        @pydron.schedule
        def work(xs, k):
            out = [inc(x) for x in xs]
            total = 0
            for r in out:
                if CONDITION:
                    total += r
            return out, total
    """).replace("CONDITION", condition)


SCRIPT = program("r > k") + textwrap.dedent("""
    pydron.enable(workers=2)
    results = [work(list(range(20)), 5) for _ in range(int(sys.argv[1]))]
    assert all(r == (list(range(1, 21)), sum(range(6, 21))) for r in results), results
    print(json.dumps(_core._replay_stats()))
""")


def run(tmp_path, cache, calls=1, extra_env=None):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYDRON_CACHE_DIR": str(cache), **(extra_env or {})}
    out = subprocess.run([sys.executable, str(script), str(calls)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def graph_files(cache):
    return sorted((cache / "graphs").glob("*.graph"))


def test_a_fresh_process_replays_its_first_call_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first, _ = run(tmp_path, cache, calls=2)
    assert first["disk_hits"] == 0 and first["lifts"] == 1 and first["hits"] == 1
    assert len(graph_files(cache)) == 1
    second, _ = run(tmp_path, cache, calls=1)
    assert second["disk_hits"] == 1 and second["lifts"] == 0
    assert second["hits"] == 1 and second["misses"] == 0, "the first call replayed"


def test_cache_directory_and_files_are_private(tmp_path):
    cache = tmp_path / "cache"
    run(tmp_path, cache, calls=2)
    assert oct(os.stat(cache).st_mode & 0o777) == oct(0o700)
    for f in graph_files(cache):
        assert os.stat(f).st_mode & 0o077 == 0
    assert not list((cache / "graphs").glob(".tmp-*")), "a temporary file was left behind"


class Opens:
    """Pickles as a call of open(path, "w")."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "foreign", "world-writable",
                                    "symlink", "empty", "shape", "constant", "global"])
def test_a_damaged_or_untrusted_file_is_ignored_and_rebuilt(tmp_path, damage):
    cache = tmp_path / "cache"
    run(tmp_path, cache, calls=2)
    path, = graph_files(cache)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        i = len(data) - 10
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:])
    elif damage == "header":
        path.write_bytes(b"pydron-graph 99 0000000000000000\n" + data.partition(b"\n")[2])
    elif damage == "foreign":
        if os.getuid() != 0:
            pytest.skip("changing a file's owner needs root")   # the check itself is covered
        os.chown(path, 65534, 65534)
    elif damage == "world-writable":
        os.chmod(path, 0o666)
    elif damage == "symlink":
        target = tmp_path / "elsewhere.graph"
        target.write_bytes(data)
        path.unlink()
        path.symlink_to(target)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage in ("shape", "constant", "global"):     # well hashed, but not a graph's data
        program = _graph_cache.decode(data)
        payload = {
            "shape": pickle.dumps({"graph": program}),
            "constant": pickle.dumps(program[:4] + ((bytearray(b"x"),),) + program[5:], protocol=5),
            # unpickling this would create a file: a graph file may name no callable
            "global": pickle.dumps(Opens(str(tmp_path / "opened"))),
        }[damage]
        path.write_bytes(b"pydron-graph %d %016x\n" % (_graph_cache.FORMAT, _core._xxh3(payload))
                         + payload)
    stats, _ = run(tmp_path, cache, calls=2)
    assert stats["disk_hits"] == 0, f"a {damage} file was loaded"
    assert not (tmp_path / "opened").exists(), "unpickling a graph file called a global"
    assert stats["lifts"] == 1, "the graph was made again"
    # rebuilt: the next process loads the new file
    path, = graph_files(cache)
    assert not path.is_symlink()
    again, _ = run(tmp_path, cache, calls=1)
    assert again["disk_hits"] == 1


def test_an_unsafe_directory_turns_the_cache_off_with_a_warning(tmp_path):
    cache = tmp_path / "cache"
    (cache / "graphs").mkdir(parents=True)
    os.chmod(cache, 0o777)
    stats, err = run(tmp_path, cache, calls=2, extra_env={"PYDRON_LOG": "warning"})
    assert "graph cache is off" in err and "others may write" in err
    assert stats["hits"] == 1 and not graph_files(cache)


def test_off_turns_the_cache_off(tmp_path):
    stats, _ = run(tmp_path, "off", calls=2)
    assert stats["hits"] == 1 and stats["disk_hits"] == 0


def test_two_processes_share_one_cache(tmp_path):
    cache = tmp_path / "cache"
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYDRON_CACHE_DIR": str(cache)}
    procs = [subprocess.Popen([sys.executable, str(script), "3"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    path, = graph_files(cache)
    assert _graph_cache.decode(path.read_bytes())[0] == "work"
    assert not list((cache / "graphs").glob(".tmp-*"))
    stats = json.loads((cache / "stats.json").read_text())
    # each process replays at least once (its other calls may be traced: the first one when it
    # came before any graph was stored, and one while the graph is compared with its trace)
    assert stats["processes"] == 3 and stats["replay_hits"] >= 3


def test_decode_refuses_what_is_not_a_graphs_data(tmp_path):
    program = ("f", 0, 1, ((0, 0, 0, 0, 0, 1),), (1, "a"), (), 0, (), "f.py")
    assert _graph_cache.decode(_graph_cache.encode(program)) == program

    def file_of(payload):
        return b"pydron-graph %d %016x\n" % (_graph_cache.FORMAT, _core._xxh3(payload)) + payload
    target = tmp_path / "opened"
    with pytest.raises(ValueError, match="names io.open"):
        _graph_cache.decode(file_of(pickle.dumps(Opens(str(target)))))
    assert not target.exists()
    with pytest.raises(ValueError, match="a constant of a type"):
        _graph_cache.decode(file_of(pickle.dumps(program[:4] + ([1],) + program[5:])))
    with pytest.raises(ValueError, match="not a program"):
        _graph_cache.decode(file_of(pickle.dumps({"graph": program})))
    with pytest.raises(ValueError, match="malformed graph file"):
        _graph_cache.decode(file_of(pickle.dumps(program)[:-5]))
    with pytest.raises(TypeError, match="not cached"):
        _graph_cache.encode(program[:4] + ((object(),),) + program[5:])


def test_constants_round_trip():
    value = ("f", 2, 5, ((0, 1, 2, 3, 4, 7),), (None, True, 1.5, float("inf"), -0.0, 2 ** 80,
                                              1 + 2j, b"\x00\xff", "é", (1, (2,)),
                                              frozenset({1}), ...), ("x",), 0, ("a",), "f.py")
    back = _graph_cache.decode(_graph_cache.encode(value))
    assert back == value and repr(back) == repr(value)


def test_pydron_cache_commands(tmp_path):
    cache = tmp_path / "cache"
    run(tmp_path, cache, calls=2)
    env = {**os.environ, "PYDRON_CACHE_DIR": str(cache)}

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "pydron", "cache", *args],
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    listing = cli("list")
    assert "work (" in listing and "instructions" in listing
    stats = json.loads(cli("stats", "--json"))
    assert stats["graphs"] == 1 and stats["replay_hits"] == 1 and stats["lifts"] == 1
    assert "graph cache:" in subprocess.run([sys.executable, "-m", "pydron", "info"],
                                            capture_output=True, text=True, env=env).stdout
    assert "removed 1" in cli("clear")
    assert not graph_files(cache)
    bad = subprocess.run([sys.executable, "-m", "pydron", "cache", "shred"], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and "shred" in bad.stderr


HELD_OR_LOADED = program("r % k") + textwrap.dedent("""
    pydron.enable(workers=2)
    first = work(list(range(30)), 3)
    after_first = sorted(m for m in sys.modules if m.startswith(("pydron._rewrite", "bytecode")))
    _core._replay_configure(compare=0)
    runs = []
    for forget in (False, True, False, True):
        if forget:
            _core._replay_forget(work)
        before = _core._replay_stats()
        result = work(list(range(30)), 3)
        after = _core._replay_stats()
        state = _core._replay_state(work)
        runs.append({"forget": forget, "result": result,
                     "delta": {k: after[k] - before[k] for k in after},
                     "state": {k: state[k] for k in ("state", "instructions", "bails")},
                     "sites": len(state["sites"])})
    print(json.dumps({"first": first, "rewriter_after_first": after_first, "runs": runs}))
""")


def test_a_graph_loaded_from_disk_replays_as_the_graph_held(tmp_path):
    """A call whose graph was just read from the disk cache (by the C loader) returns what a
    replay of the graph the process holds returns, counted the same but for the disk hit; and
    a fresh process's first call that replays from the cache neither rewrites the function's
    bytecode nor imports the rewriter."""
    cache = tmp_path / "cache"
    run(tmp_path, cache, calls=2)                       # another function: the cache is made
    script = tmp_path / "held.py"
    script.write_text(HELD_OR_LOADED)
    env = {**os.environ, "PYDRON_CACHE_DIR": str(cache)}

    def go():
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])
    go()                                                # traced, then lifted and stored
    fresh = go()
    expected = [list(range(1, 31)), sum(r for r in range(1, 31) if r % 3)]
    assert fresh["first"] == expected
    assert fresh["rewriter_after_first"] == [], "the first call rewrote although it replayed"
    held, loaded = [r for r in fresh["runs"] if not r["forget"]], \
                   [r for r in fresh["runs"] if r["forget"]]
    for h, ld in zip(held, loaded):
        assert ld["result"] == h["result"] == expected
        assert ld["state"] == h["state"] and ld["state"]["state"] == "ready"
        assert ld["sites"] == h["sites"]
        assert ld["delta"] == {**h["delta"], "disk_hits": 1}, (ld["delta"], h["delta"])
        assert h["delta"]["hits"] == 1 and h["delta"]["misses"] == 0


def test_the_c_decoder_reads_what_encode_writes_and_leaves_the_rest():
    """_core._graph_decode_payload (trace/replay_disk.c) gives back what pickle wrote for a
    graph's data, and None for any payload it does not read itself (complex, Ellipsis, a large
    int, a global, a truncated one): those go to _DataOnly."""
    values = [("f", 2, 5, ((0, 1, 2, 3, 4, 7),),
               (None, True, False, 1.5, float("inf"), -0.0, 0, 255, 256, 65535, 65536,
                2 ** 31 - 1, -2 ** 31, -1, 2 ** 62, -2 ** 63, b"\x00\xff", b"x" * 300, "é",
                "\ud800", "y" * 300, (1, (2,)), frozenset({1, "a"}), (), ""),
               ("x", "x"), 1, ("a",), "f.py"),
              "no graph: a refusal"]
    for v in values:
        payload = _graph_cache.encode(v).partition(b"\n")[2]
        back = _core._graph_decode_payload(payload)
        assert back == v and repr(back) == repr(v)
    for v in [(1 + 2j,), (...,), (2 ** 80,), Opens("/nonexistent")]:
        assert _core._graph_decode_payload(pickle.dumps(v, protocol=5)) is None
    good = pickle.dumps(values[0], protocol=5)
    for cut in (1, len(good) // 2, len(good) - 1):
        assert _core._graph_decode_payload(good[:cut]) is None
    assert _core._graph_decode_payload(good + b"N") is None


def test_the_c_decoder_on_damaged_payloads_agrees_with_the_data_only_unpickler():
    """Thousands of damaged graph payloads (bytes flipped, cut, inserted, a piece repeated;
    the same seed each run): the C decoder never reads out of bounds (the ASan run of the
    suite checks that), and whatever it accepts, the data-only unpickler the Python loader
    uses reads as the same value. What it declines goes to that unpickler anyway."""
    import io
    import random
    rng = random.Random(20261208)
    value = ("f", 2, 5, ((0, 1, 2, 3, 4, 7),), (None, True, 1.5, -2 ** 31, b"\x00\xff",
             "é", (1, (2,)), frozenset({1, "a"}), (), "", 2 ** 62), ("x", "x"), 1, ("a",),
             "f.py")
    good = _graph_cache.encode(value).partition(b"\n")[2]
    # A graph's data over 64 KB is written in several frames: read whole, as pickle reads it.
    big = ("f", 2, 5, tuple((i, "x" * (i % 50)) for i in range(8000)), (), ("x",), 1, (), "f")
    assert _core._graph_decode_payload(_graph_cache.encode(big).partition(b"\n")[2]) == big
    accepted = 0
    for _ in range(4000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            kind = rng.randrange(4)
            at = rng.randrange(len(data))
            if kind == 0:
                data[at] = rng.randrange(256)
            elif kind == 1:
                del data[at:at + rng.randint(1, 16)]
            elif kind == 2:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif data:
                end = min(len(data), at + rng.randint(1, 32))
                data[at:at] = data[at:end]
        data = bytes(data)
        back = _core._graph_decode_payload(data)
        if back is None:
            continue
        accepted += 1
        reference = _graph_cache._DataOnly(io.BytesIO(data)).load()
        assert back == reference and repr(back) == repr(reference), data
    assert accepted > 0          # some damage leaves a valid pickle: both readers compared


def test_the_key_follows_the_code():
    """The key (trace/replay_disk.c, for the C loader and store alike) is the same for the
    same code compiled twice, and another for a change in a constant, in a nested code object
    or in a name."""
    def compiled(src):
        ns = {}
        exec(compile(src, "k.py", "exec"), ns)
        return ns["f"]
    base = "def f(xs):\n    return [x + 1 for x in xs]\n"
    assert _graph_cache.key(compiled(base)) == _graph_cache.key(compiled(base))
    for other in (base.replace("x + 1", "x + 2"), base.replace("xs]", "xs if x]"),
                  base.replace("xs", "ys")):
        assert _graph_cache.key(compiled(other)) != _graph_cache.key(compiled(base))
