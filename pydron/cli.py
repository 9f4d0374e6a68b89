"""The `pydron` command: `pydron run script.py`, `pydron bench`, `pydron info`.

Bad input is one line on stderr and exit status 2, before anything is started.
"""
from __future__ import annotations

import argparse
import ast
import builtins
import importlib
import json
import logging
import os
import platform
import sys
import traceback
import types
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Callable

from . import config as _config

log = logging.getLogger("pydron")

SUBCOMMANDS = ("run", "bench", "info", "check", "cache")


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage block) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


# ---------------------------------------------------------------------------------------
# Naming functions from outside the script (--functional / --schedule / config file)

class NamePlan:
    """Which functions to decorate, split into the script's own and other modules'."""

    def __init__(self, functional: list[str], schedule: list[str], script: Path,
                 tree: ast.Module | None):
        self.script = script
        self.script_names: dict[str, str] = {}      # "func" or "Class.meth" -> kind
        self.module_names: dict[str, str] = {}      # "pkg.mod.func" -> kind
        self.defined = _toplevel_definitions(tree) if tree is not None else set()
        for kind, names in (("functional", functional), ("schedule", schedule)):
            for name in names:
                local = self._local(name)
                table, key = ((self.script_names, local) if local is not None
                              else (self.module_names, name))
                if table.get(key, kind) != kind:
                    raise UsageError(f"pydron run: {name} is named both functional "
                                     f"and schedule")
                table[key] = kind

    def _local(self, name: str) -> str | None:
        """The part of `name` inside the script, or None if it names another module."""
        head, _, rest = name.partition(".")
        if not rest or head in self.defined:
            return name
        if head in ("__main__", self.script.stem):
            return rest
        return None

    def check_script(self) -> None:
        """Every name for the script must be something the script can define."""
        for name, kind in self.script_names.items():
            if name not in self.defined:
                accepted = ", ".join(sorted(self.defined)) or "none"
                raise UsageError(f"pydron run: --{kind} {name}: {self.script.name} "
                                 f"defines no such name (defined: {accepted})")

    def resolve_modules(self) -> list[tuple[Any, str, Any, str]]:
        """Import other modules' named functions: (owner, attribute, function, kind)."""
        found = []
        for name, kind in self.module_names.items():
            try:
                owner, attr, fn = _resolve_dotted(name)
            except UsageError as exc:
                raise UsageError(f"pydron run: --{kind} {exc}") from None
            if not callable(fn):
                raise UsageError(f"pydron run: --{kind} {name}: "
                                 f"{type(fn).__name__} is not a function")
            found.append((owner, attr, fn, kind))
        return found


def _toplevel_definitions(tree: ast.Module) -> set[str]:
    """Names a script binds at module level (through if/try/with/for blocks), and
    `Class.method` for the methods of its module-level classes."""
    names: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.ClassDef):
                names.add(node.name)
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(f"{node.name}.{item.name}")
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            names.add(n.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    names.add((alias.asname or alias.name).split(".")[0])
            for field in ("body", "orelse", "finalbody", "handlers"):
                sub = getattr(node, field, None)
                if isinstance(sub, list) and not isinstance(
                        node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(sub)

    visit(tree.body)
    return names


def _resolve_dotted(name: str) -> tuple[Any, str, Any]:
    """Import the longest module prefix of `name` and walk the rest as attributes."""
    parts = name.split(".")
    if len(parts) < 2:
        raise UsageError(f"{name}: not of the form module.function")
    for i in range(len(parts) - 1, 0, -1):
        modname = ".".join(parts[:i])
        try:
            obj = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name and (modname == exc.name or modname.startswith(exc.name + ".")):
                continue
            raise UsageError(f"cannot import {modname} for {name}: {exc}") from None
        except Exception as exc:  # the user's module failed while importing
            raise UsageError(f"cannot import {modname} for {name}: "
                             f"{type(exc).__name__}: {exc}") from None
        owner = obj
        for attr in parts[i:]:
            owner, obj = obj, getattr(obj, attr, _MISSING)
            if obj is _MISSING:
                public = [a for a in dir(owner) if not a.startswith("_")
                          and callable(getattr(owner, a, None))]
                raise UsageError(f"{name}: {getattr(owner, '__name__', owner)!s} has no "
                                 f"attribute {attr!r} (callables: "
                                 f"{', '.join(public[:20]) or 'none'})")
        return owner, parts[-1], obj
    raise UsageError(f"{name}: no module named {parts[0]!r}")


_MISSING = object()
_BUILTINS = vars(builtins)


class _NamingNamespace(MutableMapping):
    """Module-level locals for the script: writes through to the module's dict, and
    decorates a named function (or a named class's methods) when the script binds it.

    Only the script's top-level statements see this mapping (STORE_NAME/LOAD_NAME);
    functions defined in it keep the module's real dict as their globals, so they run
    at full speed and `global` statements behave as in plain Python."""

    def __init__(self, module_dict: dict, names: dict[str, str],
                 decorators: dict[str, Callable]):
        self._d = module_dict
        self._names = names
        self._decorators = decorators

    def __getitem__(self, key):
        # LOAD_NAME looks here, then in globals (the same dict), then in builtins: answer
        # for builtins at once rather than raise a KeyError per module-level builtin use.
        try:
            return self._d[key]
        except KeyError:
            return _BUILTINS[key]

    def __setitem__(self, key, value):
        # type(), not isinstance(): with the top level scheduled, value may be a pending
        # result, which isinstance() would wait for (through its __class__)
        kind = self._names.get(key)
        if kind is not None and type(value) is types.FunctionType:
            value = self._decorators[kind](value)
            log.debug("decorated __main__.%s as %s", key, kind)
        elif issubclass(type(value), type):
            for qual, kind in self._names.items():
                cls, _, meth = qual.partition(".")
                if cls == key and meth:
                    fn = value.__dict__.get(meth)
                    if isinstance(fn, types.FunctionType):
                        setattr(value, meth, self._decorators[kind](fn))
                        log.debug("decorated __main__.%s as %s", qual, kind)
        self._d[key] = value

    def __delitem__(self, key):
        del self._d[key]

    def __contains__(self, key):
        return key in self._d

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)

    def keys(self):
        return self._d.keys()


# ---------------------------------------------------------------------------------------
# pydron run

def _run_parser() -> _Parser:
    p = _Parser(prog="pydron run", description="Run a script with pydron enabled from "
                "its first line.")
    p.add_argument("--workers", type=str, default=None, help="worker processes")
    p.add_argument("--backend", default=None, help="where tasks run (local, cluster)")
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="run tasks on this Dask cluster (tls://host:8786, local:4)")
    p.add_argument("--functional", action="append", default=[], metavar="MOD.FUNC",
                   help="treat this function as @pydron.functional (repeatable)")
    p.add_argument("--schedule", action="append", default=[], metavar="MOD.FUNC",
                   help="treat this function as @pydron.schedule (repeatable); __main__ "
                        "schedules the script's top-level code, the default when functional "
                        "functions are named and no scheduled one is")
    p.add_argument("--disable", action="store_true", default=None,
                   help="run as plain Python")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    p.add_argument("--timeline", default=None, metavar="FILE",
                   help="write a Chrome trace-event timeline of the run")
    p.add_argument("script", help="the script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    return p


def _print_report(cfg) -> None:
    if cfg.disable:
        return
    from pydron import report
    try:
        report.print_report(sys.stderr, cfg.workers)
    except Exception as exc:      # the report never fails the run
        log.debug("pydron: no wait report: %s", exc)


def _trim_traceback(exc: BaseException) -> None:
    """Print the script's traceback as plain Python would: without pydron's own frames (this
    file's, and those of _toplevel's helpers when the top level was scheduled)."""
    here = os.path.dirname(os.path.abspath(__file__))
    ours = {os.path.join(here, "cli.py"), os.path.join(here, "_toplevel.py")}
    report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    for part in _chain(report):
        part.stack = traceback.StackSummary.from_list(
            [frame for frame in part.stack if os.path.abspath(frame.filename) not in ours])
    sys.stderr.write("".join(report.format()))


def _chain(report: traceback.TracebackException):
    """The report and those of its causes and contexts."""
    seen = []
    while report is not None and report not in seen:
        seen.append(report)
        report = report.__cause__ or (None if report.__suppress_context__ else report.__context__)
    return seen


def cmd_run(argv: list[str]) -> int:
    ns = _run_parser().parse_args(argv)
    script = Path(ns.script)
    if not script.is_file():
        raise UsageError(f"pydron run: script not found: {ns.script}")
    try:
        cfg = _config.resolve(
            {"workers": ns.workers, "backend": ns.backend, "cluster": ns.cluster,
             "disable": ns.disable, "progress": ns.progress, "timeline": ns.timeline,
             "functional": ns.functional, "schedule": ns.schedule},
            search_dirs=[script.resolve().parent, Path.cwd()])
    except _config.ConfigError as exc:
        raise UsageError(f"pydron run: {exc}") from None
    try:
        source = script.read_bytes()
    except OSError as exc:
        raise UsageError(f"pydron run: cannot read {script}: {exc.strerror}") from None

    # `--schedule __main__` names the script's top level; so does naming functional functions
    # and no scheduled one.
    schedule_top = "__main__" in cfg.schedule or bool(cfg.functional and not cfg.schedule)
    schedule_functions = [name for name in cfg.schedule if name != "__main__"]
    named = bool(cfg.functional or schedule_functions)
    try:
        code = compile(source, os.path.abspath(script), "exec", dont_inherit=True)
        tree = ast.parse(source, str(script)) if named else None
    except SyntaxError as exc:
        traceback.print_exception(type(exc), exc, None)
        return 1

    # The script sees the same sys.argv and sys.path[0] as under `python script.py`.
    sys.argv[:] = [str(script)] + list(ns.args)
    sys.path[0] = str(script.resolve().parent)
    plan = NamePlan(cfg.functional, schedule_functions, script, tree)
    plan.check_script()
    module_targets = plan.resolve_modules()

    # Scripts that call pydron.enable() themselves see the same settings.
    os.environ.update(_config.exported_environment(cfg))
    _config.apply_log_level(cfg.log)
    import pydron
    for needed in ("functional", "schedule", "enable"):
        if not hasattr(pydron, needed):
            raise UsageError(f"pydron run: the pydron package has no {needed}() "
                             f"(is pydron/__init__.py installed?)")
    decorators = {"functional": pydron.functional, "schedule": pydron.schedule}
    for owner, attr, fn, kind in module_targets:
        setattr(owner, attr, decorators[kind](fn))
        log.debug("decorated %s.%s as %s", getattr(owner, "__name__", owner), attr, kind)
    if not cfg.disable:
        pydron.enable(workers=cfg.workers, progress=cfg.progress, timeline=cfg.timeline,
                      blas_threads=cfg.blas_threads, cluster=_config.cluster_address(cfg))
        from pydron import report
        report.start()
    log.debug("running %s with %s", script, cfg.as_dict())

    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=os.path.abspath(script), __builtins__=builtins,
                         __cached__=None, __loader__=None, __spec__=None)
    sys.modules["__main__"] = main
    namespace = (_NamingNamespace(main.__dict__, plan.script_names, decorators)
                 if plan.script_names else None)
    reported = False
    try:
        if schedule_top and pydron.is_enabled():
            from . import _toplevel
            _toplevel.run_scheduled_module(code, main.__dict__, namespace)
        else:
            exec(code, main.__dict__, namespace)
    except SystemExit:
        raise
    except KeyboardInterrupt as exc:
        _trim_traceback(exc)
        return 130
    except BaseException as exc:  # the script's own failure, reported as Python would
        sys.stdout.flush()
        _print_report(cfg)        # before the traceback, which stays the last thing printed
        _trim_traceback(exc)
        reported = True
        return 1
    finally:
        sys.stdout.flush()
        if not cfg.disable and hasattr(pydron, "stats"):
            try:
                stats = pydron.stats()
                if not reported:
                    _print_report(cfg)
            except Exception:
                stats = None
            if stats is not None:
                log.info("tasks of %s: %s", script.name, stats)
                if cfg.functional and stats.get("submitted") == 0:
                    log.warning("pydron: the run scheduled nothing: %s named functional, but "
                                "no scheduled code called %s (name the function that calls "
                                "%s with --schedule)", ", ".join(cfg.functional),
                                "it" if len(cfg.functional) == 1 else "them",
                                "it" if len(cfg.functional) == 1 else "them")
    return 0


# ---------------------------------------------------------------------------------------
# pydron info

def _versions() -> dict[str, str]:
    out = {"CPython": platform.python_version()}
    names = {"llvm": "LLVM", "libffi": "libffi", "xxhash": "xxHash", "python": None,
             "cpython": None}
    try:
        from pydron import _core
        got = _core.versions()
        for k, v in dict(got).items():
            name = names.get(str(k).lower(), str(k))
            if name:
                out[name] = str(v)
    except Exception as exc:  # the core may not be built yet
        out["core"] = f"unavailable ({type(exc).__name__}: {exc})"
    return out


def cmd_info(argv: list[str]) -> int:
    p = _Parser(prog="pydron info", description="Show the resolved configuration, the "
                "versions in use and the workers.")
    p.add_argument("--workers", default=None)
    p.add_argument("--backend", default=None)
    p.add_argument("--cluster", default=None, metavar="ADDRESS")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("script", nargs="?", help="look for config files beside this script")
    ns = p.parse_args(argv)
    dirs = [Path.cwd()]
    if ns.script:
        if not Path(ns.script).is_file():
            raise UsageError(f"pydron info: script not found: {ns.script}")
        dirs.insert(0, Path(ns.script).resolve().parent)
    try:
        cfg = _config.resolve({"workers": ns.workers, "backend": ns.backend,
                               "cluster": ns.cluster}, search_dirs=dirs)
    except _config.ConfigError as exc:
        raise UsageError(f"pydron info: {exc}") from None
    versions = _versions()
    try:
        import pydron
        pkg = getattr(pydron, "__version__", None) or _dist_version()
        location = str(Path(pydron.__path__[0]).resolve())
    except Exception:
        pkg, location = _dist_version(), "?"
    workers = {"backend": cfg.backend, "count": 0 if cfg.disable else cfg.workers,
               "usable_cores": _config.default_workers(), "cpu_count": os.cpu_count(),
               "blas_threads_per_worker": cfg.blas_threads}
    cluster = _cluster_info(cfg)
    if cluster is not None:
        workers["cluster"] = cluster
    if ns.json:
        print(json.dumps({"pydron": pkg, "location": location,
                          "config_file": str(cfg.file) if cfg.file else None,
                          "config": {k: {"value": s.value, "source": s.source}
                                     for k, s in cfg.settings.items()},
                          "variables": {var: k for k, (_, var, _) in _config.KEYS.items()
                                        if var},
                          "versions": versions, "workers": workers,
                          "graph_cache": _graph_cache_stats(cfg)}, indent=2))
        return 0
    print(f"pydron {pkg} ({location})")
    print(f"config file: {cfg.file or 'none found'}")
    print("configuration:")
    width = max(len(k) for k in cfg.settings)
    for key, s in cfg.settings.items():
        value = ", ".join(s.value) if isinstance(s.value, list) else s.value
        var = _config.KEYS[key][1] or ""
        print(f"  {key:<{width}}  {str(value) if value not in ('', None) else '-':<12} "
              f"{'(' + s.source + ')':<36} {var}")
    print("versions:")
    for k, v in versions.items():
        print(f"  {k:<{width}}  {v}")
    state = "none (disabled)" if cfg.disable else (
        f"{cfg.workers} local processes, {cfg.blas_threads} BLAS/OpenMP "
        f"thread{'s' * (cfg.blas_threads != 1)} each")
    if cluster is not None and not cfg.disable:
        state = _cluster_text(cluster)
    print(f"workers: {state}; {workers['usable_cores']} usable cores")
    from . import _graph_cache
    _graph_cache.configure(cfg.cache_dir)
    print(_cache_text(_graph_cache.stats()))
    return 0


def cmd_cache(argv: list[str]) -> int:
    p = _Parser(prog="pydron cache", description="The graphs of scheduled functions kept "
                "between runs (PYDRON_CACHE_DIR): list them, count what they saved, clear them.")
    p.add_argument("action", choices=("list", "stats", "clear"))
    p.add_argument("--json", action="store_true", help="print JSON")
    ns = p.parse_args(argv)
    try:
        cfg = _config.resolve({})
    except _config.ConfigError as exc:
        raise UsageError(f"pydron cache: {exc}") from None
    from . import _graph_cache
    _graph_cache.configure(cfg.cache_dir)
    if ns.action == "clear":
        n = _graph_cache.clear()
        print(f"removed {n} cached graph file(s) from {_graph_cache.directory() or '(no cache)'}")
        return 0
    if ns.action == "stats":
        st = _graph_cache.stats()
        if ns.json:
            print(json.dumps(st, indent=2))
        else:
            print(_cache_text(st))
        return 0
    entries = _graph_cache.entries()
    if ns.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print(f"no cached graphs in {_graph_cache.directory() or '(no cache: off)'}")
    for e in entries:
        if e["kind"] == "graph":
            what = f"{e['function']} ({e['file']}), {e['instructions']} instructions"
        elif e["kind"] == "no graph":
            what = f"no graph: {e['reason']}"
        else:
            what = f"unreadable, ignored: {e['problem']}"
        print(f"{e['key']}  {e['bytes']:>7} B  {what}")
    return 0


def _graph_cache_stats(cfg) -> dict:
    from . import _graph_cache
    _graph_cache.configure(cfg.cache_dir)
    return _graph_cache.stats()


def _cache_text(st: dict) -> str:
    if st.get("directory") is None:
        return "graph cache: off"
    return (f"graph cache: {st['directory']}: {st['graphs']} graph(s), {st['bytes']} bytes; "
            f"over {st.get('processes', 0)} process(es): {st.get('replay_hits', 0)} replayed "
            f"call(s), {st.get('replay_misses', 0)} traced, {st.get('lifts', 0)} graph(s) made "
            f"lifted, {st.get('loads', 0)} loaded from disk, {st.get('mispredicts', 0)} "
            f"misprediction(s), {st.get('bails', 0)} replay(s) given up, "
            f"{st.get('rejected', 0)} file(s) rejected; compiled tier: "
            f"{st.get('objects', 0)} object file(s), {st.get('object_bytes', 0)} bytes; "
            f"{st.get('jit_compiles', 0)} graph(s) compiled, {st.get('jit_object_hits', 0)} "
            f"linked from an object file, {st.get('object_rejected', 0)} object file(s) "
            f"rejected")


def _cluster_info(cfg) -> dict | None:
    """The cluster `cfg` names: its address and, for a running scheduler, its workers, threads
    and dashboard (asked with a short timeout); a local:N cluster is only described."""
    address = _config.cluster_address(cfg)
    if address is None:
        return None
    info: dict[str, Any] = {"address": address}
    from . import _cluster
    n = _cluster.parse_local(address)
    if n is not None:
        info.update(workers=n or _config.default_workers(), threads=1,
                    note="started by pydron.enable(), stopped at exit")
        return info
    try:
        security = _cluster.check_security(address, None, cfg.cluster_insecure)
        from distributed import Client
        with Client(address, security=security, timeout=5, set_as_default=False) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"]
            info.update(workers=len(workers),
                        threads=sum(w.get("nthreads", 0) for w in workers.values()),
                        dashboard=_cluster._dashboard(client))
    except Exception as exc:
        info["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return info


def _cluster_text(info: dict) -> str:
    if "error" in info:
        return f"Dask cluster {info['address']}: not reachable ({info['error']})"
    text = (f"Dask cluster {info['address']}: {info['workers']} workers, {info['threads']} "
            f"threads")
    if info.get("note"):
        text += f" ({info['note']})"
    if info.get("dashboard"):
        text += f"; dashboard {info['dashboard']}"
    return text


def _dist_version() -> str:
    try:
        from importlib.metadata import version
        return version("pydron")
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------

def _usage() -> str:
    return ("usage: pydron {run,bench,info} ...\n"
            "  pydron run [--workers N] [--cluster ADDRESS] [--functional MOD.FUNC] "
            "[--schedule MOD.FUNC] script.py [args]\n"
            "  pydron bench [--quick] [--workloads W,..] [--systems S,..] [--workers N] "
            "[--repeat R] [--json FILE] [--plot FILE] [--timeline FILE]\n"
            "  pydron info [--json] [script.py]\n"
            "  pydron check [--functional NAME] [--json] script.py\n"
            "  pydron cache list|stats|clear [--json]\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:        # PYDRON_LOG: the `pydron` logger only, from the start of the command
        _config.apply_log_level(_config.resolve_log_level())
    except _config.ConfigError as exc:
        print(f"error: pydron: {exc}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage())
        return 0 if argv else 2
    # `python -m pydron script.py` means `pydron run script.py`.
    if argv[0] not in SUBCOMMANDS and not argv[0].startswith("-") and \
            (argv[0].endswith(".py") or Path(argv[0]).is_file()):
        argv.insert(0, "run")
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "run":
            return cmd_run(rest)
        if cmd == "info":
            return cmd_info(rest)
        if cmd == "bench":
            from .bench import harness
            return harness.main(rest)
        if cmd == "check":
            from . import check
            return check.main(rest)
        if cmd == "cache":
            return cmd_cache(rest)
        raise UsageError(f"pydron: unknown command {cmd!r} "
                         f"(accepted: {', '.join(SUBCOMMANDS)})")
    except UsageError as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
