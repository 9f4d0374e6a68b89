"""The `pydron` command, driven in subprocesses as a user would: `pydron run` on decorated
and undecorated scripts (output must equal plain `python script.py`), `pydron info`, and
bad input (one line on stderr, exit status 2)."""
import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PY = sys.executable
CONSOLE = Path(sys.executable).parent / "pydron"

DECORATED = """
    import sys
    import pydron
    from pydron import functional, schedule

    @functional
    def square(x):
        return x * x

    @schedule
    def main(n):
        squares = [square(i) for i in range(n)]
        big = [s for s in squares if s > 10]
        return sum(big), len(squares), type(squares[0]).__name__

    pydron.enable()
    print("args", sys.argv[1:])
    print("result", main(int(sys.argv[1])))
    sys.stderr.write(f"enabled={pydron.is_enabled()}\\n")
"""

UNDECORATED = """
    import sys

    def inc(x):
        return x + 1

    class Scaler:
        def scale(self, x):
            return 3 * x

    def main(n):
        values = [inc(i) for i in range(n)]
        return sum(values), ",".join(str(v) for v in values[:5])

    counter = 0

    def bump():
        global counter
        counter += 1

    total = 0
    for i in range(4):
        total += i
        bump()
    if __name__ == "__main__":
        print("result", main(int(sys.argv[1]) if len(sys.argv) > 1 else 10), total)
        print("scaled", Scaler().scale(7), inc.__name__, __name__, counter,
              sorted(k for k in globals() if not k.startswith("__")))
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def run(*args, cwd=None, env=None, timeout=60):
    full_env = dict(os.environ)
    full_env.pop("PYDRON_DISABLE", None)
    full_env.pop("PYDRON_WORKERS", None)
    full_env["PYDRON_PROGRESS"] = "0"
    full_env.update(env or {})
    return subprocess.run([str(a) for a in args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def pydron(*args, **kw):
    return run(PY, "-m", "pydron", *args, **kw)


def plain(script, *args, cwd):
    out = run(PY, script, *args, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return out.stdout


def one_line_error(out, *words):
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# --- pydron run ------------------------------------------------------------------------

def test_run_decorated_script_matches_plain_python(tmp_path):
    script = write(tmp_path / "decorated.py", DECORATED)
    expected = plain(script, "12", cwd=tmp_path)
    out = pydron("run", "--workers", "2", script, "12", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected
    assert "enabled=True" in out.stderr
    # `python -m pydron script.py` is the same as `pydron run script.py`
    out = pydron(script, "12", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected


def test_run_disabled_runs_plain_python(tmp_path):
    script = write(tmp_path / "decorated.py", DECORATED)
    out = pydron("run", script, "5", cwd=tmp_path, env={"PYDRON_DISABLE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == plain(script, "5", cwd=tmp_path)
    assert "enabled=False" in out.stderr


def test_run_undecorated_script_named_on_command_line(tmp_path):
    script = write(tmp_path / "undecorated.py", UNDECORATED)
    expected = plain(script, "20", cwd=tmp_path)
    out = pydron("run", "--functional", "inc", "--functional", "Scaler.scale",
                 "--schedule", "undecorated.main", script, "20", cwd=tmp_path,
                 env={"PYDRON_LOG": "debug"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected
    assert "decorated __main__.inc as functional" in out.stderr
    assert "decorated __main__.main as schedule" in out.stderr
    assert "decorated __main__.Scaler.scale as functional" in out.stderr
    assert_tasks_ran(out.stderr)


def assert_tasks_ran(stderr):
    """With PYDRON_LOG=debug, `pydron run` logs the task counters at the end."""
    line = next((ln for ln in stderr.splitlines() if "tasks of" in ln), None)
    assert line is not None, stderr
    counters = ast.literal_eval(line.split(": ", 3)[-1])
    assert isinstance(counters, dict), line
    if "submitted" in counters:
        assert counters["submitted"] > 0, counters


def test_run_names_a_function_of_another_module(tmp_path):
    write(tmp_path / "helpers.py", "def double(x):\n    return 2 * x\n")
    script = write(tmp_path / "uses_helpers.py", """
        from helpers import double
        print([double(i) for i in range(5)], double.__name__)
    """)
    out = pydron("run", "--functional", "helpers.double", script, cwd=tmp_path,
                 env={"PYDRON_LOG": "debug"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == plain(script, cwd=tmp_path)
    assert "decorated helpers.double as functional" in out.stderr


@pytest.mark.parametrize("config", ["pydron.toml", "pyproject.toml"])
def test_run_undecorated_script_named_in_config_file(tmp_path, config):
    script = write(tmp_path / "undecorated.py", UNDECORATED)
    body = 'workers = 2\nfunctional = ["inc"]\nschedule = ["main"]\n'
    if config == "pyproject.toml":
        body = '[project]\nname = "x"\n\n[tool.pydron]\n' + body
    (tmp_path / config).write_text(body)
    expected = plain(script, "7", cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the config file is found beside the script, from another working directory too
    out = pydron("run", script, "7", cwd=elsewhere, env={"PYDRON_LOG": "debug"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected
    assert "decorated __main__.inc as functional" in out.stderr
    assert "decorated __main__.main as schedule" in out.stderr
    assert_tasks_ran(out.stderr)


def test_run_exit_status_and_traceback_as_plain_python(tmp_path):
    exits = write(tmp_path / "exits.py", "import sys\nprint('bye')\nsys.exit(3)\n")
    out = pydron("run", exits, cwd=tmp_path)
    assert (out.returncode, out.stdout) == (3, "bye\n")
    fails = write(tmp_path / "fails.py", """
        def broken():
            raise ValueError("bad value")
        broken()
    """)
    out = pydron("run", fails, cwd=tmp_path)
    assert out.returncode == 1
    assert "ValueError: bad value" in out.stderr
    assert 'fails.py", line 3, in broken' in out.stderr
    assert "cli.py" not in out.stderr


def test_run_bad_input_is_one_line_and_status_2(tmp_path):
    script = write(tmp_path / "undecorated.py", UNDECORATED)
    one_line_error(pydron("run", tmp_path / "missing.py", cwd=tmp_path),
                   "script not found", "missing.py")
    one_line_error(pydron("run", "--functional", "nosuch", script, cwd=tmp_path),
                   "nosuch", "defined:", "inc", "main")
    one_line_error(pydron("run", "--functional", "json.nosuch", script, cwd=tmp_path),
                   "json.nosuch", "nosuch")
    one_line_error(pydron("run", "--schedule", "nosuchmodule.f", script, cwd=tmp_path),
                   "nosuchmodule")
    one_line_error(pydron("run", "--workers", "zero", script, cwd=tmp_path), "workers")
    one_line_error(pydron("run", "--backend", "cloud", script, cwd=tmp_path),
                   "cloud", "local")
    one_line_error(pydron("run", script, cwd=tmp_path, env={"PYDRON_WORKERS": "-1"}),
                   "PYDRON_WORKERS")
    (tmp_path / "pydron.toml").write_text("workers = [\n")
    one_line_error(pydron("run", script, cwd=tmp_path), "cannot parse", "pydron.toml")
    (tmp_path / "pydron.toml").write_text('wrokers = 2\n')
    one_line_error(pydron("run", script, cwd=tmp_path), "wrokers", "accepted", "workers")
    one_line_error(pydron("frobnicate", cwd=tmp_path), "frobnicate", "run, bench, info")


def test_run_starts_nothing_on_bad_names(tmp_path):
    marker = tmp_path / "ran"
    script = write(tmp_path / "s.py", f"open({str(marker)!r}, 'w').close()\n")
    one_line_error(pydron("run", "--functional", "missing_fn", script, cwd=tmp_path))
    assert not marker.exists()


# --- pydron info -----------------------------------------------------------------------

def test_info_precedence_and_sources(tmp_path):
    (tmp_path / "pydron.toml").write_text('workers = 3\nprogress = false\n')
    out = pydron("info", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["config"]["workers"] == {"value": 3, "source": str(tmp_path / "pydron.toml")}
    assert info["config"]["progress"]["value"] is False
    assert info["versions"]["CPython"] == ".".join(map(str, sys.version_info[:3]))
    info = json.loads(pydron("info", "--json", cwd=tmp_path,
                             env={"PYDRON_WORKERS": "2"}).stdout)
    assert info["config"]["workers"] == {"value": 2, "source": "environment PYDRON_WORKERS"}
    info = json.loads(pydron("info", "--json", "--workers", "1", cwd=tmp_path,
                             env={"PYDRON_WORKERS": "2"}).stdout)
    assert info["config"]["workers"] == {"value": 1, "source": "command line --workers"}
    assert info["workers"]["count"] == 1


def test_info_text_shows_versions_and_workers(tmp_path):
    out = pydron("info", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for word in ("configuration:", "workers", "(default)", "versions:", "CPython"):
        assert word in text
    info = json.loads(pydron("info", "--json", cwd=tmp_path).stdout)
    versions = info["versions"]
    # The C core is built in every environment the tests run in: its libraries are named, and
    # a core that fails to import makes this fail rather than pass.
    for lib in ("LLVM", "libffi", "xxHash"):
        assert any(lib.lower() in k.lower() for k in versions), versions


def test_console_script(tmp_path):
    if not CONSOLE.exists():
        pytest.skip("the `pydron` console script is not installed in this environment")
    out = run(CONSOLE, "info", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "CPython" in out.stdout
    out = run(CONSOLE, "bench", "--workloads", "nope", cwd=tmp_path)
    one_line_error(out, "nope")


# --- configuration resolution, in process ------------------------------------------------

def test_config_precedence_and_file_search(tmp_path):
    from pydron import config
    script_dir, cwd = tmp_path / "scripts", tmp_path / "cwd"
    script_dir.mkdir()
    cwd.mkdir()
    (script_dir / "pyproject.toml").write_text('[project]\nname = "x"\n')   # no [tool.pydron]
    (cwd / "pydron.toml").write_text('workers = 4\ndisable = true\nschedule = ["m.main"]\n')
    cfg = config.resolve({}, search_dirs=[script_dir, cwd], environ={})
    assert cfg.file == cwd / "pydron.toml"
    assert (cfg.workers, cfg.disable, cfg.schedule) == (4, True, ["m.main"])
    assert cfg.source("progress") == "default"
    cfg = config.resolve({"workers": "3"}, search_dirs=[script_dir, cwd],
                         environ={"PYDRON_WORKERS": "2", "PYDRON_DISABLE": "0"})
    assert (cfg.workers, cfg.source("workers")) == (3, "command line --workers")
    assert (cfg.disable, cfg.source("disable")) == (False, "environment PYDRON_DISABLE")
    (script_dir / "pyproject.toml").write_text('[tool.pydron]\nfunctional = ["f"]\n')
    cfg = config.resolve({}, search_dirs=[script_dir, cwd], environ={})
    assert cfg.functional == ["f"] and cfg.workers == config.default_workers()
    for bad in ({"PYDRON_PROGRESS": "maybe"}, {"PYDRON_WORKERS": "1.5"},
                {"PYDRON_BACKEND": "mars"}):
        with pytest.raises(config.ConfigError) as err:
            config.resolve({}, search_dirs=[cwd], environ=bad)
        assert "\n" not in str(err.value) and next(iter(bad)) in str(err.value)
    (cwd / "pydron.toml").write_text('functional = "f, g"\n')
    assert config.resolve({}, search_dirs=[cwd], environ={}).functional == ["f", "g"]
    (cwd / "pydron.toml").write_text('functional = [1, 2]\n')
    with pytest.raises(config.ConfigError, match="functional"):
        config.resolve({}, search_dirs=[cwd], environ={})
