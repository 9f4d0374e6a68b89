"""The graph cache on disk: lifted graphs of scheduled functions, kept between processes so that
the first call of a fresh process replays at once.

Also the compiled tier's object files (jit/jit.c), so that a later process links a hot graph's
code instead of compiling it.

Where: the `cache_dir` setting (PYDRON_CACHE_DIR, pydron/config.py), else $XDG_CACHE_HOME/pydron, else
~/.cache/pydron; `off` turns the cache off. Layout: <dir>/graphs/<key>.graph, one file per graph,
<dir>/graphs/<key>.object, one file per compiled graph, and <dir>/stats.json (counters summed over
the processes that used the cache).

What is trusted: nothing that could have been written by someone else, or half-written.
  - the directory is made with mode 0700; a directory (or file) that is not owned by this user
    or that others may write is not used: the cache is off for this process, with one warning;
  - a file is written to a temporary name in the same directory and renamed into place, so
    readers see a whole file or none, and processes share the directory safely;
  - every file starts with a header line holding the XXH3 hash of the rest; a file whose hash,
    format or owner does not check out is ignored (and replaced by the next store), never
    parsed further; the payload is a pickle that decodes to data only (_DataOnly);
  - a first call's graph is read by trace/replay_disk.c, which takes only a file that passes
    every check here and holds a graph's data (unpickled by _DataOnly); any other file, and a
    cache that is off or not yet checked, is load()'s, which says why it refuses it;
  - the key covers the code object (bytecode, constants, names, line table, file, qualified
    name), the Python version, pydron's version and the graph format: a change to any of them is
    another key;
  - an object file's key covers its code's key (jit_graph_key: the graph's operations, the
    instruction size, the number of operations), the environment the code was made for (LLVM
    version, target triple, CPU name and features, Python version: jit_environment), pydron's
    version and the object format; the environment and pydron's version are also written in the
    file, after the hash, and a file that names another is not used.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import pickle
import stat
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("pydron")

FORMAT = 2                    # 1: JSON payloads (decoded in Python, slower to load)
MAGIC = "pydron-graph"
OBJECT_FORMAT = 1
OBJECT_MAGIC = "pydron-object"
_STATS_KEYS = ("stores", "loads", "rejected", "replay_hits", "replay_misses", "lifts",
               "mispredicts", "bails", "object_stores", "object_loads", "object_rejected",
               "jit_compiles", "jit_object_hits")

_UNSET = object()
_configured = _UNSET                     # what enable() said: a path, "off", or None (default)
_unusable: set[str] = set()              # directories found unsafe in this process (warned once)
_session = dict.fromkeys(_STATS_KEYS, 0)


def configure(value) -> None:
    """The `cache_dir` setting of pydron.enable(): a directory, "off", or None for the default."""
    global _configured
    _configured = None if value in (None, "") else os.fspath(value)
    _checked.clear()
    from pydron import _core
    _core._disk_cache_use(None)         # the C loader waits for directory() to check it


_checked: dict = {}          # setting -> the directory found usable (checked once per process)


def directory() -> Path | None:
    """The cache directory in use (made if missing), or None when the cache is off or unsafe."""
    if _configured is _UNSET:
        from pydron import config
        configure(config.resolve_for_enable({}).cache_dir)
    if _configured in _checked:
        return _checked[_configured]
    _checked[_configured] = found = _directory(_configured)
    _hand_to_core(found)
    return found


def _hand_to_core(found: Path | None) -> None:
    """Tell the C loader (trace/replay_disk.c) where graphs are read from, and how: it takes the
    ordinary case, a whole file of this format, and hands everything else to load()."""
    from pydron import _core
    if found is None:
        _core._disk_cache_use(None)
    else:
        _core._disk_cache_use(str(found / "graphs"), b"%s %d " % (MAGIC.encode(), FORMAT),
                              _key_prefix(), _DataOnly, io.BytesIO)


def _directory(value) -> Path | None:
    if value and value.strip().lower() == "off":
        return None
    if value:
        base = Path(value).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "pydron"
    if str(base) in _unusable:
        return None
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        base.mkdir(mode=0o700, exist_ok=True)
        (base / "graphs").mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        return _give_up(base, f"cannot be made ({exc.strerror})")
    for d in (base, base / "graphs"):
        problem = _unsafe(d)
        if problem:
            return _give_up(base, problem)
    return base


def _unsafe(path: Path) -> str | None:
    """Why path may not be trusted, or None."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if st.st_uid != os.getuid():
        return f"{path} belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"others may write to {path} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _give_up(base: Path, why: str) -> None:
    if str(base) not in _unusable:
        _unusable.add(str(base))
        log.warning("pydron: the graph cache is off for this process: %s", why)
    return None


def _key_prefix() -> bytes:
    """What every key hashes before the code object: the file format and the versions."""
    from pydron import __version__
    return "\x1f".join([MAGIC, str(FORMAT), __version__, sys.version]).encode(
        "utf-8", "surrogatepass")


def key(fn) -> str:
    """The cache key of scheduled function fn's graph: hex XXH3 over what decides it, the
    prefix then the code object's file, qualified name, first line, bytecode, constants (nested
    code objects, such as 3.11's comprehension bodies, by their own fields: their repr holds an
    address), names, variable and free variable names and line table (trace/replay_disk.c,
    which the C loader uses too)."""
    from pydron import _core
    return _core._graph_key(fn.__code__, _key_prefix())


def _path(base: Path, k: str) -> Path:
    return base / "graphs" / f"{k}.graph"


# ---- encoding (pickle restricted to data: decoding runs no code) -------------------------------

# What a graph's constants may be: exact built-in types (nothing else can be unpickled here).
_ATOMS = frozenset({type(None), bool, int, float, complex, bytes, str, type(Ellipsis)})
# The only globals a graph file may name: what pickle needs for complex numbers and Ellipsis.
_GLOBALS = {("builtins", "complex"): complex, ("builtins", "Ellipsis"): Ellipsis}


def _is_constant(v) -> bool:
    t = type(v)
    if t is tuple or t is frozenset:
        return all(_is_constant(x) for x in v)
    return t in _ATOMS


class _DataOnly(pickle.Unpickler):
    """An unpickler that makes data and nothing else: a graph file naming any global other than
    complex or Ellipsis (a function to call, a class to build) is refused before it is used."""

    def find_class(self, module, name):
        try:
            return _GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"names {module}.{name}, which a graph may not") from None


def _check_program(value) -> str | None:
    """Why value is not a program tuple or refusal str as lift_for_core makes them (the
    interpreter checks the instructions, registers and names itself when it loads one), or
    None."""
    if type(value) is str:
        return None
    if type(value) is not tuple or len(value) != 9:
        return "not a program"
    if type(value[4]) is not tuple or not _is_constant(value[4]):
        return "a constant of a type a graph cannot hold"
    return None


def encode(program) -> bytes:
    """A program tuple (or a refusal reason, a str) as the bytes of a cache file; TypeError for
    a constant the file cannot hold."""
    if not _is_constant(program):
        raise TypeError("a graph constant of a type other than None, bool, int, float, complex, "
                        "bytes, str, tuple, frozenset or Ellipsis is not cached")
    return _with_header(MAGIC, FORMAT, pickle.dumps(program, protocol=5))


def _with_header(magic: str, fmt: int, payload: bytes) -> bytes:
    """payload behind the header line that says what it is and holds its XXH3 hash."""
    from pydron import _core
    return b"%s %d %016x\n" % (magic.encode(), fmt, _core._xxh3(payload)) + payload


def _payload(data: bytes, magic: str, fmt: int, what: str) -> bytes:
    """What follows the header of a file's bytes once the header and the hash check out;
    ValueError if they do not."""
    from pydron import _core
    head, sep, payload = data.partition(b"\n")
    fields = head.split(b" ")
    if not sep or len(fields) != 3 or fields[0] != magic.encode() or fields[1] != b"%d" % fmt:
        raise ValueError(f"not a pydron {what} file of this format")
    if fields[2] != b"%016x" % _core._xxh3(payload):
        raise ValueError("the hash does not match (truncated or corrupt)")
    return payload


def decode(data: bytes):
    """The program tuple (or refusal str) of a cache file's bytes; ValueError if anything is
    off (header, hash, a global, shape)."""
    payload = _payload(data, MAGIC, FORMAT, "graph")
    try:
        value = _DataOnly(io.BytesIO(payload)).load()
    except Exception as exc:     # any malformed pickle: refused, whatever the unpickler raised
        raise ValueError(f"malformed graph file ({exc})") from None
    problem = _check_program(value)
    if problem:
        raise ValueError(f"malformed graph file ({problem})")
    return value


# ---- load and store ---------------------------------------------------------------------------

def load(fn):
    """fn's graph from the cache (a program tuple, or a str: why it has none), or None."""
    base = directory()
    if base is None:
        return None
    path = _path(base, key(fn))
    data = _read_trusted(path)
    if data is None:
        return None
    try:
        value = decode(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        _reject(path, str(exc))
        return None
    return value


def _read_trusted(path, counter="rejected") -> bytes | None:
    """The bytes of the file at path if it is a regular file of this user's that others may not
    write, else None (a missing file quietly; any other is counted in counter and logged)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        _reject(path, f"cannot be opened ({exc.strerror})", counter)
        return None
    try:
        st = os.fstat(fd)
        problem = _unsafe_file(st, path)
        if problem:
            _reject(path, problem, counter)
            return None
        return _read_all(fd, st.st_size)
    except OSError as exc:
        _reject(path, f"cannot be read ({exc.strerror})", counter)
        return None
    finally:
        os.close(fd)


def _read_all(fd: int, size: int) -> bytes:
    """The whole file (size is what fstat said; a file that grew is read to its end too)."""
    parts = []
    while chunk := os.read(fd, max(size + 1, 1 << 16)):
        parts.append(chunk)
    return b"".join(parts)


def _unsafe_file(st, path) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.getuid():
        return f"belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"others may write to it (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _reject(path, why: str, counter="rejected") -> None:
    """A file that is not loaded: said once at debug level, left for the next store to
    replace."""
    _session[counter] += 1
    log.debug("pydron: graph cache file %s ignored: %s", path, why)


def store(fn, program) -> bool:
    """Write fn's graph (program tuple or refusal str): to a temporary file, then renamed into
    place. False when the cache is off or the write failed (never an error for the caller)."""
    base = directory()
    if base is None:
        return False
    try:
        data = encode(program)
    except TypeError as exc:
        log.debug("pydron: graph of %s not cached: %s", fn.__qualname__, exc)
        return False
    try:
        _write_private(_path(base, key(fn)), data)
    except OSError as exc:
        log.debug("pydron: graph of %s not cached: %s", fn.__qualname__, exc)
        return False
    _session["stores"] += 1
    return True


def _write_private(path: Path, data: bytes, sync: bool = True) -> None:
    """data as the file at path, mode 0600: written to a temporary file in the same directory
    (flushed to the disk first unless not sync), then renamed into place, so that readers see a
    whole file or none. OSError."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# ---- object files of the compiled tier (called by trace/replay_tier.c, GIL held) ---------------

def _object_environment(environment: str) -> bytes:
    """The line an object file starts with (after its header): what its code was made for."""
    from pydron import __version__
    return f"pydron {__version__}; {environment}".encode("utf-8", "surrogatepass")


def object_path(base: Path, code_key: str, environment: str) -> Path:
    """Where the object file of code_key, made for environment, is kept."""
    from pydron import _core
    parts = b"\x1f".join([OBJECT_MAGIC.encode(), b"%d" % OBJECT_FORMAT, sys.version.encode(),
                          _object_environment(environment), code_key.encode()])
    return base / "graphs" / ("%016x.object" % _core._xxh3(parts))


def encode_object(environment: str, obj: bytes) -> bytes:
    return _with_header(OBJECT_MAGIC, OBJECT_FORMAT,
                        _object_environment(environment) + b"\n" + obj)


def decode_object(data: bytes, environment: str) -> bytes:
    """The object file in a cache file's bytes; ValueError if the header, the hash or the
    environment it was made for is not this process's."""
    payload = _payload(data, OBJECT_MAGIC, OBJECT_FORMAT, "object")
    made_for, sep, obj = payload.partition(b"\n")
    if not sep or made_for != _object_environment(environment):
        raise ValueError("made for another environment (%s)"
                         % made_for[:200].decode("utf-8", "replace"))
    return obj


def load_object(code_key: str, environment: str) -> bytes | None:
    """The object file kept for code_key (jit_graph_key) made for environment
    (jit_environment), or None: none, or not to be trusted (ignored; the next store replaces
    it)."""
    base = directory()
    if base is None:
        return None
    path = object_path(base, code_key, environment)
    data = _read_trusted(path, "object_rejected")
    if data is None:
        return None
    try:
        obj = decode_object(data, environment)
    except ValueError as exc:
        _reject(path, str(exc), "object_rejected")
        return None
    _session["object_loads"] += 1
    return obj


def store_object(code_key: str, environment: str, obj: bytes) -> bool:
    """Keep the object file a compile of code_key emitted, for later processes. False when the
    cache is off or the write failed (never an error for the caller)."""
    base = directory()
    if base is None:
        return False
    try:
        # not synced: this runs in the call that first uses the code (an fsync cost it
        # milliseconds), and a file a crash leaves torn fails its hash and is compiled again
        _write_private(object_path(base, code_key, environment),
                       encode_object(environment, obj), sync=False)
    except OSError as exc:
        log.debug("pydron: object of code %s not cached: %s", code_key, exc)
        return False
    _session["object_stores"] += 1
    return True


# ---- counters, listing, clearing (pydron cache, pydron info) ------------------------------------

def note_session(replay_stats: dict, jit_info: dict | None = None) -> None:
    """Add this process's counters to <dir>/stats.json (under a lock: processes share it):
    replay's (_replay_stats), and the compiled tier's (_jit_info: graphs compiled, graphs whose
    code was linked from an object file instead)."""
    base = directory()
    if base is None:
        return
    counts = dict(_session)
    # every graph loaded (by the C loader or load()) is a disk hit of the core's
    for ours, theirs in (("loads", "disk_hits"), ("replay_hits", "hits"),
                         ("replay_misses", "misses"), ("lifts", "lifts"),
                         ("mispredicts", "mispredicts"), ("bails", "bails")):
        counts[ours] = replay_stats.get(theirs, 0)
    for ours, theirs in (("jit_compiles", "compiled"), ("jit_object_hits", "object_hits")):
        counts[ours] = (jit_info or {}).get(theirs, 0)
    if not any(counts.values()):
        return
    path = base / "stats.json"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return
    with os.fdopen(fd, "r+") as f:
        if _unsafe_file(os.fstat(f.fileno()), path):
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            old = json.loads(f.read() or "{}")
            if not isinstance(old, dict):
                old = {}
        except ValueError:
            old = {}
        merged = {k: int(old.get(k, 0)) + counts.get(k, 0) for k in _STATS_KEYS}
        merged["processes"] = int(old.get("processes", 0)) + 1
        merged["updated"] = time.time()
        f.seek(0)
        f.truncate()
        f.write(json.dumps(merged))
    for k in _session:
        _session[k] = 0


def stats() -> dict:
    """What the cache holds and the counters of the processes that used it."""
    base = directory()
    if base is None:
        return {"directory": None}
    files = list((base / "graphs").glob("*.graph"))
    objects = list((base / "graphs").glob("*.object"))
    out = {"directory": str(base), "graphs": len(files),
           "bytes": sum(f.stat().st_size for f in files),
           "objects": len(objects), "object_bytes": sum(f.stat().st_size for f in objects)}
    try:
        with open(base / "stats.json") as f:
            counters = json.load(f)
        if isinstance(counters, dict):
            out.update({k: counters.get(k, 0) for k in _STATS_KEYS + ("processes",)})
    except (OSError, ValueError):
        out.update(dict.fromkeys(_STATS_KEYS + ("processes",), 0))
    return out


def entries() -> list[dict]:
    """One dict per cached graph: key, function, file, line, size, kind (graph or refusal),
    age, and whether it loads."""
    base = directory()
    if base is None:
        return []
    out = []
    for path in sorted((base / "graphs").glob("*.graph")):
        entry = {"key": path.stem, "bytes": path.stat().st_size,
                 "age_s": time.time() - path.stat().st_mtime}
        try:
            value = decode(path.read_bytes())
        except (ValueError, OSError) as exc:
            entry.update(kind="unreadable", problem=str(exc))
        else:
            if isinstance(value, str):
                entry.update(kind="no graph", reason=value)
            else:
                entry.update(kind="graph", function=value[0], file=value[8],
                             instructions=len(value[3]))
        out.append(entry)
    return out


def clear() -> int:
    """Remove every cached graph and object file and the counters; the number of files
    removed."""
    base = directory()
    if base is None:
        return 0
    n = 0
    for path in list((base / "graphs").iterdir()):
        if path.suffix in (".graph", ".object") or path.name.startswith(".tmp-"):
            with contextlib.suppress(OSError):
                path.unlink()
                n += 1
    with contextlib.suppress(OSError):
        (base / "stats.json").unlink()
    return n
