"""Resolved configuration of a pydron run, and where each value came from.

This is the one place that reads PYDRON_* variables: `pydron run`, `pydron info`,
`pydron bench`, `pydron.enable()` and the decorators' kill switch all ask here, and the C
core gets its options from `pydron.enable()` (`_core._configure`), never from getenv.

Precedence, highest first: command line or `pydron.enable()` keywords, environment
(PYDRON_*), a config file (`pydron.toml`, or `[tool.pydron]` in `pyproject.toml`), defaults.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "Config", "Setting", "KEYS", "find_config_file", "resolve",
           "cluster_address",
           "default_workers", "resolve_for_enable", "killed", "blas_threads_for", "apply_log_level",
           "apply_log_level_from_env", "resolve_log_level", "exported_environment"]

# key -> (kind, environment variable or None, help text). Every PYDRON_* variable pydron
# reads is listed here, with its one default in _defaults().
KEYS: dict[str, tuple[str, str | None, str]] = {
    "workers": ("int", "PYDRON_WORKERS", "worker processes (default: usable cores)"),
    "backend": ("backend", "PYDRON_BACKEND",
                "where tasks run: local, or cluster (the `cluster` address, else local:workers)"),
    "cluster": ("cluster", "PYDRON_CLUSTER",
                "run tasks on this Dask cluster: tls://host:port, tcp://host:port or local:N"),
    "cluster_insecure": ("bool", "PYDRON_CLUSTER_INSECURE",
                         "allow a cluster address off this machine without TLS (logged)"),
    "disable": ("bool", "PYDRON_DISABLE", "run as plain Python, decorators change nothing"),
    "progress": ("bool", "PYDRON_PROGRESS", "progress bar for long scheduled calls"),
    "timeline": ("path", "PYDRON_TIMELINE", "write a Chrome trace-event timeline here"),
    "intercept": ("intercept", "PYDRON_INTERCEPT",
                  "how scheduled functions are entered: vectorcall or hook (PEP 523)"),
    "threads": ("auto", "PYDRON_THREADS",
                "threads for executor=\"threads\" tasks (0 or auto: usable cores)"),
    "blas_threads": ("auto", "PYDRON_BLAS_THREADS",
                     "BLAS/OpenMP threads per worker (0 or auto: cores // workers, at least 1)"),
    "arena_arrays": ("bool", "PYDRON_ARENA_ARRAYS",
                     "large numpy arrays made in workers live in the shared arena"),
    "report": ("bool", "PYDRON_REPORT",
               "print the wait report at exit (tasks, parallelism, where scheduled code "
               "waited); pydron run prints it anyway"),
    "check": ("bool", "PYDRON_CHECK",
              "workers hash each task's arguments before and after it runs and warn about "
              "the function that changed them (slower; for finding side effects)"),
    "task_timeout": ("seconds", "PYDRON_TASK_TIMEOUT",
                     "default timeout of every task in seconds (0 or off: none)"),
    "cache_dir": ("path", "PYDRON_CACHE_DIR",
                  "where graphs of scheduled functions are kept between runs "
                  "(default: ~/.cache/pydron; off: no disk cache)"),
    "replay": ("replay", "PYDRON_REPLAY",
               "later calls of a scheduled function replay its graph instead of tracing it: "
               "on, off, or reference (the Python interpreter, for tests)"),
    "jit": ("jit", "PYDRON_JIT",
            "the compiled tier of replay: a graph replayed often is compiled by LLVM on a "
            "background thread: on, off, or always (at the first call, waiting: tests)"),
    "log": ("log", "PYDRON_LOG", "level of the `pydron` logger on stderr "
                                 "(debug, info, warning, error; default: not set)"),
    "functional": ("names", None, "functions to run as functional tasks (mod.func)"),
    "schedule": ("names", None, "functions to schedule (mod.func)"),
}
BACKENDS = ("local", "cluster")
INTERCEPTS = ("vectorcall", "hook")
REPLAYS = ("on", "off", "reference")
JITS = ("on", "off", "always")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
MAX_THREADS = 1024          # the thread pool's limit (exec/threads.c)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message is one line."""


@dataclasses.dataclass
class Setting:
    value: Any
    source: str


@dataclasses.dataclass
class Config:
    settings: dict[str, Setting]
    file: Path | None

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["settings"][key].value
        except KeyError:
            raise AttributeError(key) from None

    def source(self, key: str) -> str:
        return self.settings[key].source

    def as_dict(self) -> dict[str, Any]:
        return {k: s.value for k, s in self.settings.items()}


def default_workers() -> int:
    """Usable cores: the CPU affinity mask (a container or `taskset` may give fewer than
    os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def blas_threads_for(workers: int, cores: int | None = None) -> int:
    """The default BLAS/OpenMP threads of one worker: the cores shared out among the
    workers (as loky does), so that workers x threads does not oversubscribe the cores."""
    cores = default_workers() if cores is None else cores
    return max(1, cores // max(1, workers))


def _defaults() -> dict[str, Any]:
    # "auto" values (threads, blas_threads) are 0 here and worked out at the end of
    # resolve(), once the worker count is known.
    return {"workers": default_workers(), "backend": "local", "cluster": None,
            "cluster_insecure": False, "disable": False,
            "progress": True, "timeline": None, "intercept": "vectorcall", "threads": 0,
            "blas_threads": 0, "arena_arrays": True, "task_timeout": 0.0, "log": None,
            "report": False, "check": False, "replay": "on", "jit": "off",
            "cache_dir": None,
            "functional": [], "schedule": []}



def _switch(value, where: str, name: str, allowed: tuple) -> str:
    """A setting that is on, off or one of a few words: booleans and their spellings become
    "on"/"off"; anything else must be in `allowed`."""
    text = value.strip().lower() if isinstance(value, str) else value
    if text is True or text in _TRUE:
        return "on"
    if text is False or text in _FALSE:
        return "off"
    if text not in allowed:
        raise ConfigError(f"{where}: {name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, "
                          f"got {value!r}")
    return text

def _convert(key: str, value: Any, where: str, parse: bool = True) -> Any:
    """Check and normalise one value; strings (environment, command line) are parsed, unless
    `parse` is false (Python callers pass numbers as numbers)."""
    kind = KEYS[key][0]
    if kind == "int":
        if isinstance(value, str) and parse:
            try:
                value = int(value.strip())
            except ValueError:
                raise ConfigError(f"{where}: {key} must be a positive integer, "
                                  f"got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
        return value
    if kind == "auto":                   # a count, or 0 / "auto" for the default
        given = value
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("auto", "", "0"):
                return 0
            try:
                value = int(text)
            except ValueError:
                value = text
        if isinstance(value, bool) or not isinstance(value, int) or \
                not 0 <= value <= MAX_THREADS:
            raise ConfigError(f"{where}: {key} must be a whole number from 1 to "
                              f"{MAX_THREADS}, or 0 or \"auto\" for the default, "
                              f"got {given!r}")
        return value
    if kind == "bool":
        if isinstance(value, str):
            low = value.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
        elif isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be a boolean (1/0, true/false), got {value!r}")
    if kind == "backend":
        if value not in BACKENDS:
            raise ConfigError(f"{where}: unknown backend {value!r} "
                              f"(accepted: {', '.join(BACKENDS)})")
        return value
    if kind == "cluster":
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{where}: cluster must be an address like tls://host:8786 or "
                              f"local:4, got {value!r}")
        text = value.strip()
        if text.lower() in ("", "none", "off"):
            return None
        if not _cluster_address_ok(text):
            raise ConfigError(f"{where}: cluster must be an address like tls://host:8786, "
                              f"tcp://host:8786 or local:4, got {value!r}")
        return text
    if kind == "intercept":
        text = value.strip().lower() if isinstance(value, str) else value
        if text == "":
            return "vectorcall"
        if text not in INTERCEPTS:
            raise ConfigError(f"{where}: intercept must be 'vectorcall' or 'hook', "
                              f"got {value!r}")
        return text
    if kind in ("replay", "jit"):
        return _switch(value, where, kind, REPLAYS if kind == "replay" else JITS)
    if kind == "seconds":
        given = value
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("", "0", "off", "none"):
                return 0.0
            try:
                value = float(text)
            except ValueError:
                value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                or value != value or value == float("inf"):
            raise ConfigError(f"{where}: {key} must be a number of seconds (0 or off: none), "
                              f"got {given!r}")
        return float(value)
    if kind == "log":
        if value is None:
            return None
        text = value.strip().lower() if isinstance(value, str) else value
        if text in ("", "0", "off", "none"):
            return None
        if text not in LOG_LEVELS:
            raise ConfigError(f"{where}: log must be one of {', '.join(LOG_LEVELS)} "
                              f"(or off), got {value!r}")
        return text
    if kind == "path":
        if value is None or value == "":
            return None
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{where}: {key} must be a file name, got {value!r}")
        return os.fspath(value)
    if kind == "names":
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.split(",")) if v]
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: {key} must be a list of names like "
                              f"\"module.function\", got {value!r}")
        return list(value)
    raise AssertionError(kind)


def _cluster_address_ok(text: str) -> bool:
    """local, local:N, [scheme://]host:port (the check that needs no network)."""
    import re
    if text == "local" or text.startswith("local:"):
        return re.fullmatch(r"local(:[1-9][0-9]*)?", text) is not None
    return re.fullmatch(r"([a-z]+://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+)(:[0-9]{1,5})?/?",
                        text) is not None


def cluster_address(cfg: "Config") -> str | None:
    """The cluster tasks run on under `cfg`: its `cluster` address; with backend=cluster and
    no address, a local cluster of `workers` workers; None for the local pool."""
    if cfg.cluster:
        return cfg.cluster
    if cfg.backend == "cluster":
        return f"local:{cfg.workers}"
    return None


def find_config_file(dirs: list[Path]) -> tuple[Path | None, dict[str, Any]]:
    """First `pydron.toml`, or `pyproject.toml` with a [tool.pydron] table, in `dirs`."""
    seen = set()
    for d in dirs:
        d = d.resolve()
        if d in seen:
            continue
        seen.add(d)
        for name in ("pydron.toml", "pyproject.toml"):
            path = d / name
            if not path.is_file():
                continue
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ConfigError(f"cannot parse {path}: {msg}") from None
            except OSError as exc:
                raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
            if name == "pyproject.toml":
                table = data.get("tool", {}).get("pydron")
                if table is None:
                    continue
            else:
                table = data.get("tool", {}).get("pydron", data)
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: [tool.pydron] must be a table")
            return path, table
    return None, {}


def _given_label(caller: str, key: str) -> str:
    """Where an explicitly given value came from, as `pydron info` shows it."""
    if caller == "enable":
        return f"pydron.enable({key}=)"
    return f"{caller} --{key.replace('_', '-')}"


def resolve(cli: dict[str, Any] | None = None, *, search_dirs: list[Path] | None = None,
            environ: dict[str, str] | None = None, caller: str = "command line") -> Config:
    """Merge defaults < config file < environment < explicit values (`cli`: the command
    line, or with caller="enable" the keywords of pydron.enable(); values that are None
    are not given)."""
    environ = os.environ if environ is None else environ
    cli = {k: v for k, v in (cli or {}).items() if v is not None and v != []}
    settings = {k: Setting(v, "default") for k, v in _defaults().items()}
    if search_dirs is None:
        search_dirs = [Path.cwd()]
    path, table = find_config_file(search_dirs)
    if path is not None:
        where = (f"{path} [tool.pydron]" if path.name == "pyproject.toml" else str(path))
        for key, value in table.items():
            if key not in KEYS:
                raise ConfigError(f"{where}: unknown key {key!r} "
                                  f"(accepted: {', '.join(KEYS)})")
            settings[key] = Setting(_convert(key, value, where), where)
    for key, (_, var, _) in KEYS.items():
        if var and var in environ:
            settings[key] = Setting(_convert(key, environ[var], f"environment {var}"),
                                    f"environment {var}")
    for key, value in cli.items():
        if key not in KEYS:
            raise ConfigError(f"unknown option {key!r}")
        label = _given_label(caller, key)
        settings[key] = Setting(_convert(key, value, label, parse=caller != "enable"), label)
    # A cluster address given anywhere means the cluster backend, unless the backend itself
    # was given (backend=local with an address is a contradiction said once, here).
    if settings["cluster"].value and settings["backend"].source == "default":
        settings["backend"] = Setting("cluster", settings["cluster"].source)
    elif settings["cluster"].value and settings["backend"].value == "local":
        raise ConfigError(f"backend=local ({settings['backend'].source}) contradicts cluster="
                          f"{settings['cluster'].value!r} ({settings['cluster'].source})")
    # "auto" means: worked out from the cores and the workers actually used.
    if settings["threads"].value == 0:
        settings["threads"].value = default_workers()
    if settings["blas_threads"].value == 0:
        settings["blas_threads"].value = blas_threads_for(settings["workers"].value)
    return Config(settings, path)


def resolve_for_enable(given: dict[str, Any]) -> Config:
    """The configuration pydron.enable() uses: its keywords (`given`, None = not given) over
    the environment, over the config file beside the main script or in the working
    directory, over the defaults."""
    dirs = []
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if isinstance(main_file, str) and main_file:
        dirs.append(Path(main_file).resolve().parent)
    dirs.append(Path.cwd())
    return resolve(given, search_dirs=dirs, caller="enable")


def killed(environ: dict[str, str] | None = None) -> bool:
    """PYDRON_DISABLE: the kill switch the decorators read at each decoration (so only the
    environment, not config files: decorating stays cheap)."""
    environ = os.environ if environ is None else environ
    value = environ.get("PYDRON_DISABLE")
    if value is None:
        return False
    return _convert("disable", value, "environment PYDRON_DISABLE")


def exported_environment(cfg: Config) -> dict[str, str]:
    """The PYDRON_* variables that carry `cfg` to a script run by `pydron run`, so that a
    pydron.enable() inside it sees the same settings (what was not set stays unset). Not the
    timeline: `pydron run` records it, and a second recorder would overwrite its file."""
    env = {}
    for key, (kind, var, _) in KEYS.items():
        setting = cfg.settings[key]
        if var is None or setting.source == "default" or key == "timeline":
            continue
        value = setting.value
        if kind == "bool":
            env[var] = "1" if value else "0"
        elif value is None:
            env[var] = "" if kind != "log" else "off"
        else:
            env[var] = str(value)
    return env


# ---- logging -----------------------------------------------------------------------------

_log_handler: logging.Handler | None = None


class _Formatter(logging.Formatter):
    """`pydron: WARNING: message`, once: most messages already begin with "pydron: " (they
    read well through logging's last-resort handler, which prints the bare message)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if text.startswith("pydron: "):
            text = text[len("pydron: "):]
        return f"{record.name}: {record.levelname}: {text}"


def apply_log_level(level: str | None) -> None:
    """PYDRON_LOG / `log`: show the `pydron` logger's records at this level on stderr. Only
    that logger: the root logger and other libraries' loggers (matplotlib, PIL) keep their
    settings. None leaves logging as the application configured it."""
    global _log_handler
    if level is None:
        return
    logger = logging.getLogger("pydron")
    logger.setLevel(level.upper())
    if _log_handler is None:
        _log_handler = logging.StreamHandler(sys.stderr)
        _log_handler.setFormatter(_Formatter())
        logger.addHandler(_log_handler)
        # The records go to stderr once, here, not again through the root's handlers.
        logger.propagate = False


def resolve_log_level(environ: dict[str, str] | None = None) -> str | None:
    """PYDRON_LOG from the environment (None: not set); ConfigError naming it if bad."""
    environ = os.environ if environ is None else environ
    return _convert("log", environ.get("PYDRON_LOG"), "environment PYDRON_LOG")


def apply_log_level_from_env() -> None:
    """At `import pydron`: PYDRON_LOG from the environment, so that what the decorators log
    shows too. A bad value is left for pydron.enable() / the `pydron` command to report (an
    import should not fail on it)."""
    try:
        level = resolve_log_level()
    except ConfigError:
        return
    apply_log_level(level)
