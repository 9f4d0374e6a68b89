"""One configuration source: every PYDRON_* variable is read by pydron/config.py, shown by
`pydron info` with where its value came from, rejected with one error naming it when bad, and
used by pydron.enable() (keywords override), by the C core (through _core._configure) and by
the workers (BLAS/OpenMP threads). Each run is a subprocess: the options act when the pool
starts."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pydron import config

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

# A valid value other than the default for each variable, and what config makes of it.
GOOD = {
    "PYDRON_WORKERS": ("3", 3),
    "PYDRON_BACKEND": ("cluster", "cluster"),
    "PYDRON_CLUSTER": ("local:2", "local:2"),
    "PYDRON_CLUSTER_INSECURE": ("1", True),
    "PYDRON_DISABLE": ("1", True),
    "PYDRON_PROGRESS": ("0", False),
    "PYDRON_TIMELINE": ("run.json", "run.json"),
    "PYDRON_INTERCEPT": ("hook", "hook"),
    "PYDRON_THREADS": ("5", 5),
    "PYDRON_BLAS_THREADS": ("4", 4),
    "PYDRON_ARENA_ARRAYS": ("0", False),
    "PYDRON_TASK_TIMEOUT": ("2.5", 2.5),
    "PYDRON_REPORT": ("1", True),
    "PYDRON_CHECK": ("1", True),
    "PYDRON_REPLAY": ("reference", "reference"),
    "PYDRON_JIT": ("always", "always"),
    "PYDRON_CACHE_DIR": ("/tmp/graphs", "/tmp/graphs"),
    "PYDRON_LOG": ("warning", "warning"),
}
BAD = {
    "PYDRON_WORKERS": "many",
    "PYDRON_BACKEND": "mars",
    "PYDRON_DISABLE": "maybe",
    "PYDRON_PROGRESS": "2",
    "PYDRON_INTERCEPT": "magic",
    "PYDRON_THREADS": "-1",
    "PYDRON_BLAS_THREADS": "lots",
    "PYDRON_ARENA_ARRAYS": "sometimes",
    "PYDRON_TASK_TIMEOUT": "-3",
    "PYDRON_REPORT": "often",
    "PYDRON_CHECK": "sometimes",
    "PYDRON_REPLAY": "sometimes",
    "PYDRON_JIT": "later",
    "PYDRON_LOG": "loud",
    "PYDRON_CLUSTER": "local:0",
    "PYDRON_CLUSTER_INSECURE": "perhaps",
}


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDRON_")}
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
    env["PYDRON_PROGRESS"] = "0"
    env.update(extra)
    return env


def run_py(code, cwd, **env):
    return subprocess.run([PY, "-c", textwrap.dedent(code)], cwd=cwd, env=clean_env(**env),
                          capture_output=True, text=True, timeout=120)


def info(cwd, *args, **env):
    full = clean_env()
    del full["PYDRON_PROGRESS"]             # every key at its default unless given here
    full.update(env)
    return subprocess.run([PY, "-m", "pydron", "info", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=60)


def test_config_lists_a_variable_for_every_key_read_from_the_environment():
    variables = {var for _, var, _ in config.KEYS.values() if var}
    assert variables == set(GOOD)
    assert set(BAD) == variables - {"PYDRON_TIMELINE", "PYDRON_CACHE_DIR"}   # any path will do


def test_no_other_module_reads_a_pydron_variable():
    """config.py is the one reader: no os.environ.get/getenv of PYDRON_* anywhere else
    (writing one for a child process is fine)."""
    read = re.compile(r"""(environ\.get\(\s*["']PYDRON_|getenv\(\s*["']PYDRON_|"""
                      r"""environ\[\s*["']PYDRON_\w+["']\s*\](?!\s*=))""")
    offenders = []
    for path in list((REPO / "pydron").rglob("*.py")) + list(REPO.glob("bench/*.py")) + \
            [p for d in ("trace", "graph", "exec", "jit") for p in (REPO / d).glob("*.[ch]")]:
        if path.name == "config.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if read.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []


def test_every_variable_shown_by_info_with_its_source(tmp_path):
    out = info(tmp_path, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["variables"] == {var: key for key, (_, var, _) in config.KEYS.items() if var}
    for key, entry in doc["config"].items():
        assert entry["source"] == "default", (key, entry)
    assert doc["config"]["threads"]["value"] == config.default_workers()
    assert doc["config"]["blas_threads"]["value"] == \
        max(1, config.default_workers() // doc["config"]["workers"]["value"])
    assert doc["workers"]["blas_threads_per_worker"] == doc["config"]["blas_threads"]["value"]
    env = {var: text for var, (text, _) in GOOD.items()}
    doc = json.loads(info(tmp_path, "--json", **env).stdout)
    for var, (_, value) in GOOD.items():
        key = doc["variables"][var]
        assert doc["config"][key] == {"value": value, "source": f"environment {var}"}, var


def test_auto_means_the_default_and_the_file_and_command_line_rank_as_documented(tmp_path):
    (tmp_path / "pydron.toml").write_text('workers = 1\nblas_threads = 0\nthreads = "auto"\n'
                                          'intercept = "hook"\nlog = "info"\n')
    doc = json.loads(info(tmp_path, "--json").stdout)
    cfg = doc["config"]
    where = str(tmp_path / "pydron.toml")
    assert cfg["workers"] == {"value": 1, "source": where}
    assert cfg["blas_threads"] == {"value": config.default_workers(), "source": where}
    assert cfg["threads"] == {"value": config.default_workers(), "source": where}
    assert cfg["intercept"] == {"value": "hook", "source": where}
    doc = json.loads(info(tmp_path, "--json", "--workers", "2",
                          PYDRON_BLAS_THREADS="auto", PYDRON_INTERCEPT="vectorcall").stdout)
    cfg = doc["config"]
    assert cfg["workers"] == {"value": 2, "source": "command line --workers"}
    assert cfg["blas_threads"] == {"value": max(1, config.default_workers() // 2),
                                   "source": "environment PYDRON_BLAS_THREADS"}
    assert cfg["intercept"]["source"] == "environment PYDRON_INTERCEPT"


@pytest.mark.parametrize("var", sorted(BAD))
def test_bad_value_is_one_error_naming_the_variable(tmp_path, var):
    out = info(tmp_path, **{var: BAD[var]})
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert var in lines[0] and repr(BAD[var]) in lines[0], lines[0]
    assert out.stdout == ""


@pytest.mark.parametrize("var", ["PYDRON_WORKERS", "PYDRON_INTERCEPT", "PYDRON_THREADS",
                                 "PYDRON_BLAS_THREADS", "PYDRON_ARENA_ARRAYS", "PYDRON_LOG"])
def test_enable_reports_a_bad_value_naming_the_variable(tmp_path, var):
    out = run_py("""
        import pydron
        try:
            pydron.enable()
        except ValueError as exc:
            print(type(exc).__name__, exc)
        else:
            print("enabled")
    """, tmp_path, **{var: BAD[var]})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ConfigError environment " + var), out.stdout
    assert "\n" not in out.stdout.strip()


def test_the_kill_switch_rejects_a_value_it_does_not_understand(tmp_path):
    out = run_py("import pydron\n@pydron.functional\ndef f(x): return x\n", tmp_path,
                 PYDRON_DISABLE="maybe")
    assert out.returncode == 1
    assert "environment PYDRON_DISABLE: disable must be a boolean" in out.stderr


ENABLE_WORKERS = """
    import json, pydron
    from pydron import _core
    pydron.enable(**json.loads({kwargs!r}))
    print(json.dumps({{"workers": _core._exec_info()["nworkers"],
                      "threads": _core._threads_stats()["max_threads"]}}))
"""


def enabled(tmp_path, kwargs="{}", **env):
    out = run_py(ENABLE_WORKERS.format(kwargs=kwargs), tmp_path, **env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_enable_resolves_its_defaults_through_config(tmp_path):
    assert enabled(tmp_path) == {"workers": config.default_workers(),
                                 "threads": config.default_workers()}
    assert enabled(tmp_path, PYDRON_WORKERS="1", PYDRON_THREADS="3") == \
        {"workers": 1, "threads": 3}
    assert enabled(tmp_path, '{"workers": 2}', PYDRON_WORKERS="1")["workers"] == 2
    (tmp_path / "pydron.toml").write_text("workers = 1\nthreads = 5\n")
    assert enabled(tmp_path) == {"workers": 1, "threads": 5}
    assert enabled(tmp_path, PYDRON_WORKERS="2")["workers"] == 2


def test_enable_keyword_errors_name_the_keyword(tmp_path):
    out = run_py("""
        import pydron
        for kw in ({"workers": 0}, {"workers": "4"}, {"blas_threads": -2}):
            try:
                pydron.enable(**kw)
            except ValueError as exc:
                print(exc)
    """, tmp_path)
    assert out.stdout.splitlines() == [
        "pydron.enable(workers=): workers must be a positive integer, got 0",
        "pydron.enable(workers=): workers must be a positive integer, got '4'",
        "pydron.enable(blas_threads=): blas_threads must be a whole number from 1 to 1024, "
        "or 0 or \"auto\" for the default, got -2",
    ], out.stderr


ARENA_SCRIPT = """
    import numpy as np, pydron
    from pydron import _core

    def make(n):
        a = np.arange(n, dtype=np.float64)
        return a, a.__array_interface__["data"][0]

    pydron.enable(workers=1)
    ((a, address),) = _core._exec_map(make, [(1 << 20,)])
    assert a.sum() == float((1 << 20) * ((1 << 20) - 1) // 2)
    # the worker's own buffer (made in the arena) or a copy of it
    print("same buffer" if a.__array_interface__["data"][0] == address else "copied")
"""


def test_arena_arrays_option_reaches_the_workers(tmp_path):
    out = run_py(ARENA_SCRIPT, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "same buffer"
    out = run_py(ARENA_SCRIPT, tmp_path, PYDRON_ARENA_ARRAYS="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "copied"


def test_configure_rejects_unknown_options_and_out_of_range_values():
    from pydron import _core
    with pytest.raises(ValueError, match="unknown option 'thread_count'"):
        _core._configure({"thread_count": 2})
    with pytest.raises(ValueError, match="thread_workers must be from 0 to 1024, got 5000"):
        _core._configure({"thread_workers": 5000})
    with pytest.raises(TypeError, match="expects a dict"):
        _core._configure([("arena_arrays", 1)])


# ---- BLAS / OpenMP threads in the workers -------------------------------------------------

BLAS_SCRIPT = """
    import json, os, sys
    {master_import}
    import threadpoolctl
    import pydron

    def pools():
        return sorted((i["internal_api"], i["num_threads"])
                      for i in threadpoolctl.threadpool_info())

    @pydron.functional
    def worker_view():
        import numpy        # loaded here when the master has not loaded it
        import os, threadpoolctl
        return (sorted((i["internal_api"], i["num_threads"])
                       for i in threadpoolctl.threadpool_info()),
                {{v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                "MKL_NUM_THREADS")}}, os.getpid())

    @pydron.schedule
    def views(n):
        return [worker_view() for _ in range(n)]

    before = pools()
    pydron.enable(workers=2, **json.loads(sys.argv[1]))
    got = views(6)
    print(json.dumps({{"before": before, "after": pools(), "workers": got,
                      "master_env": os.environ.get("OMP_NUM_THREADS"), "pid": os.getpid()}}))
"""


def blas_run(tmp_path, kwargs="{}", master_numpy=True, **env):
    code = BLAS_SCRIPT.format(master_import="import numpy" if master_numpy else "")
    out = subprocess.run([PY, "-c", textwrap.dedent(code), kwargs], cwd=tmp_path,
                         env=clean_env(**env), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def master_threads():
    """What numpy's BLAS uses in a fresh plain process here (its own default)."""
    out = subprocess.run([PY, "-c", "import numpy, threadpoolctl, json; print(json.dumps("
                          "[(i['internal_api'], i['num_threads']) for i in "
                          "threadpoolctl.threadpool_info()]))"], env=clean_env(),
                         capture_output=True, text=True, timeout=60)
    return [tuple(x) for x in json.loads(out.stdout)]


def test_workers_limit_blas_threads_while_the_master_keeps_its_own(tmp_path):
    pytest.importorskip("threadpoolctl")
    doc = blas_run(tmp_path)
    limit = max(1, config.default_workers() // 2)
    assert doc["before"] and doc["before"] == doc["after"]           # the master: untouched
    assert [tuple(p) for p in doc["before"]] == master_threads()
    assert doc["master_env"] is None
    for pools, env, pid in doc["workers"]:
        assert pid != doc["pid"]
        assert pools and all(n == limit for _, n in pools), pools
        assert env == {v: str(limit) for v in env}


def test_libraries_a_task_loads_later_see_the_limit_too(tmp_path):
    pytest.importorskip("threadpoolctl")
    doc = blas_run(tmp_path, master_numpy=False)
    limit = max(1, config.default_workers() // 2)
    assert doc["before"] == doc["after"] == []                       # no BLAS in the master
    for pools, env, _ in doc["workers"]:
        assert pools and all(n == limit for _, n in pools), pools


def test_blas_threads_is_configurable(tmp_path):
    pytest.importorskip("threadpoolctl")
    master = dict(master_threads())["openblas"] if dict(master_threads()).get("openblas") \
        else None
    chosen = 3 if master != 3 else 2                # a value the master does not have
    for doc in (blas_run(tmp_path, json.dumps({"blas_threads": chosen})),
                blas_run(tmp_path, PYDRON_BLAS_THREADS=str(chosen))):
        assert doc["before"] == doc["after"]
        for pools, env, _ in doc["workers"]:
            assert all(n == chosen for _, n in pools), pools
            assert env["OMP_NUM_THREADS"] == str(chosen)
    (tmp_path / "pydron.toml").write_text(f"blas_threads = {chosen}\n")
    script = tmp_path / "blas.py"
    script.write_text(textwrap.dedent(BLAS_SCRIPT.format(master_import="import numpy"))
                      .replace("**json.loads(sys.argv[1])", ""))
    out = subprocess.run([PY, "-m", "pydron", "run", str(script)], cwd=tmp_path,
                         env=clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for pools, env, _ in json.loads(out.stdout)["workers"]:
        assert env["OMP_NUM_THREADS"] == str(chosen)


# ---- PYDRON_LOG: the pydron logger only -----------------------------------------------------

LOG_SCRIPT = """
    import logging, sys
    import pydron

    @pydron.functional
    def square(x):
        return x * x

    @pydron.schedule
    def main(n):
        return sum(square(i) for i in range(n))

    {enable}
    logging.getLogger("matplotlib").debug("noise from another library")
    logging.getLogger("PIL").info("more noise")
    print(main(5), logging.getLogger().level, logging.getLogger("pydron").level)
"""


def test_log_debug_sets_the_pydron_logger_only_with_enable(tmp_path):
    out = run_py(LOG_SCRIPT.format(enable="pydron.enable()"), tmp_path, PYDRON_LOG="debug")
    assert out.returncode == 0, out.stderr
    # the sum; the root logger still at WARNING (30); the pydron logger at DEBUG (10)
    assert out.stdout.split() == ["30", "30", "10"]
    assert "noise" not in out.stderr
    assert "pydron: DEBUG: enabled" in out.stderr, out.stderr


def test_log_debug_with_pydron_run(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent(LOG_SCRIPT.format(enable="")))
    out = subprocess.run([PY, "-m", "pydron", "run", str(script)], cwd=tmp_path,
                         env=clean_env(PYDRON_LOG="debug"), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["30", "30", "10"]
    assert "noise" not in out.stderr
    assert "pydron: INFO: tasks of s.py" in out.stderr, out.stderr
