"""Resolved configuration of a pydron run, and where each value came from.

Precedence, highest first: command line, environment (PYDRON_*), a config file
(`pydron.toml`, or `[tool.pydron]` in `pyproject.toml`), defaults.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "Config", "Setting", "KEYS", "find_config_file", "resolve",
           "default_workers"]

# key -> (kind, environment variable or None, help text)
KEYS: dict[str, tuple[str, str | None, str]] = {
    "workers": ("int", "PYDRON_WORKERS", "worker processes (default: usable cores)"),
    "backend": ("backend", "PYDRON_BACKEND", "where tasks run: local"),
    "disable": ("bool", "PYDRON_DISABLE", "run as plain Python, decorators change nothing"),
    "progress": ("bool", "PYDRON_PROGRESS", "progress bar for long scheduled calls"),
    "timeline": ("path", "PYDRON_TIMELINE", "write a Chrome trace-event timeline here"),
    "functional": ("names", None, "functions to run as functional tasks (mod.func)"),
    "schedule": ("names", None, "functions to schedule (mod.func)"),
}
BACKENDS = ("local",)
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
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _defaults() -> dict[str, Any]:
    return {"workers": default_workers(), "backend": "local", "disable": False,
            "progress": True, "timeline": None, "functional": [], "schedule": []}


def _convert(key: str, value: Any, where: str) -> Any:
    """Check and normalise one value; strings (environment, command line) are parsed."""
    kind = KEYS[key][0]
    if kind == "int":
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ConfigError(f"{where}: workers must be a positive integer, "
                                  f"got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: workers must be a positive integer, got {value!r}")
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
    if kind == "path":
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a file name, got {value!r}")
        return value
    if kind == "names":
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.split(",")) if v]
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: {key} must be a list of names like "
                              f"\"module.function\", got {value!r}")
        return list(value)
    raise AssertionError(kind)


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


def resolve(cli: dict[str, Any] | None = None, *, search_dirs: list[Path] | None = None,
            environ: dict[str, str] | None = None) -> Config:
    """Merge defaults < config file < environment < command line (values that are None
    on the command line are not given)."""
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
        opt = "--" + key
        settings[key] = Setting(_convert(key, value, f"command line {opt}"),
                                f"command line {opt}")
    return Config(settings, path)
