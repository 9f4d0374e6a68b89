"""Runs pydron-mode semantics checks in a separate process, so that a crash or hang of the C core
fails the one test that caused it instead of the whole run.

The client (`CaseServer`) starts `python -m semantics.server RFD WFD WORKERS` and exchanges
length-prefixed pickles over two dedicated pipes (stdout stays free for what the cases print). The
server computes every case's plain outcome once with pydron disabled, then (WORKERS > 0) enables
pydron with that many workers, and answers requests until its input closes. The reference
runtime's modes use a server that never enables pydron (WORKERS = 0): a deadlock there must not
hang the run either. If a server dies, the client reports how, with the tail of its stderr
(faulthandler's stack dump), and the next request starts a fresh server.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

_HEADER = struct.Struct("<Q")


def _write(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=5)   # below 5, numpy arrays come back native-endian
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    chunks = []
    while n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read(fd: int, deadline: float | None = None):
    header = _read_exact(fd, _HEADER.size, deadline)
    if header is None:
        return None
    data = _read_exact(fd, _HEADER.unpack(header)[0], deadline)
    return None if data is None else pickle.loads(data)


# --- server side -----------------------------------------------------------------------------------

def _handle(kind: str, arg, expected: dict, cases: dict):
    from semantics import harness
    if kind == "check":                       # (mode, case name) -> list of problems
        mode, name = arg
        return harness.check(cases[name], mode, expected[name])
    if kind == "replay_log":                  # interpreter -> {case: (replayed, state, ...)}
        return harness.REPLAY_LOG.get(arg, {})
    if kind == "outcome":                     # (mode, case name) -> (exc type name, traceback)
        mode, name = arg
        outcome = harness.RUNNERS[mode](cases[name])
        return (outcome.exc_type and outcome.exc_type.__name__, outcome.traceback_text,
                outcome.describe())
    if kind == "call":                        # (module, function, args) -> (pid, thread, result)
        module, function, args = arg
        harness.ensure_enabled()
        fn = getattr(importlib.import_module(module), function)
        return os.getpid(), threading.get_ident(), fn(*args)
    raise ValueError(f"unknown request {kind!r}")


def serve(rfd: int, wfd: int, workers: int, cluster: str | None = None) -> None:
    """workers=0: pydron stays disabled (reference modes); otherwise enabled with that many, and
    with its tasks on the Dask cluster at `cluster` when given."""
    faulthandler.enable()
    from semantics import harness
    from semantics.registry import load_all
    if workers:
        harness.WORKERS = workers
    harness.CLUSTER = cluster
    cases = {c.name: c for c in load_all()}
    with harness.pydron_disabled():
        expected = {name: harness.run_plain(c) for name, c in cases.items()}
    if workers:
        harness.ensure_enabled()
    while True:
        request = _read(rfd)
        if request is None:
            break
        try:
            reply = ("ok", _handle(*request, expected, cases))
        except BaseException as exc:  # noqa: BLE001 — reported to the client, which fails the test
            reply = ("error", "".join(traceback.format_exception(exc)))
        try:
            _write(wfd, reply)
        except (TypeError, pickle.PicklingError) as exc:
            _write(wfd, ("error", f"unpicklable reply: {exc}"))
    import pydron
    if pydron.is_enabled():
        pydron.disable()


# --- client side -----------------------------------------------------------------------------------

class ServerCrashed(Exception):
    pass


class CaseServer:
    """One server process at a time; restarted after a crash or a timeout."""

    MAX_HANGS_IN_A_ROW = 3

    def __init__(self, timeout: float = 120.0, workers: int = 2, cluster: str | None = None):
        self.timeout = timeout
        self.workers = workers
        self.cluster = cluster
        self.proc = None
        self.answered = False        # has the current server answered anything yet?
        self.broken = None           # why a server could not even start (then: fail fast)
        self.hangs_in_a_row = 0      # after MAX_HANGS_IN_A_ROW, fail fast too: keeps runs short

    def _start(self) -> None:
        to_server_r, self._to_server = os.pipe()
        self._from_server, from_server_w = os.pipe()
        self._stderr = tempfile.TemporaryFile()
        tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "semantics.server", str(to_server_r), str(from_server_w),
             str(self.workers)] + ([self.cluster] if self.cluster else []),
            pass_fds=(to_server_r, from_server_w), cwd=tests_dir, stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            # No graph from the disk cache: in mode "pydron" a case's call is traced, as a
            # first call is; the replay modes make their graphs afresh.
            env={**os.environ, "PYDRON_CACHE_DIR": "off"})
        os.close(to_server_r)
        os.close(from_server_w)

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-6000:]

    def _kill_server_tree(self) -> None:
        """The server and the pool it started (workers of a hung core may not notice its death);
        all of them processes this client started, found through the server's children."""
        try:
            import psutil
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except Exception:  # noqa: BLE001 — without psutil, or if it is gone: the server only
            children = []
        self.proc.kill()
        self.proc.wait()
        for child in children:
            try:
                child.kill()
            except Exception:  # noqa: BLE001 — already gone
                pass

    def _discard(self) -> None:
        for fd in (self._to_server, self._from_server):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()              # the server we started, by its own handle
        self.proc.wait()
        self.proc = None

    def request(self, kind: str, arg, timeout: float | None = None):
        if self.broken:
            raise ServerCrashed(f"the case server cannot start (first attempt):\n{self.broken}")
        if self.proc is None:
            self._start()
            self.answered = False
        startup = 60.0                    # the first request also waits for the plain outcomes
        deadline = time.monotonic() + (timeout or self.timeout) + startup
        try:
            _write(self._to_server, (kind, arg))
            reply = _read(self._from_server, deadline)
        except TimeoutError:
            self._kill_server_tree()
            tail = self._stderr_tail()
            self._discard()
            self.hangs_in_a_row += 1
            message = f"no answer within {timeout or self.timeout:.0f}s; stderr:\n{tail}"
            if self.hangs_in_a_row >= self.MAX_HANGS_IN_A_ROW:
                self.broken = f"{self.hangs_in_a_row} cases in a row hung; the last one: {message}"
            raise ServerCrashed(message) from None
        except BrokenPipeError:
            reply = None
        if reply is None:
            code = self.proc.wait()
            tail = self._stderr_tail()
            self._discard()
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
            if not self.answered and code > 0:
                self.broken = tail          # e.g. the C core does not import: same every time
            raise ServerCrashed(f"the process running the case died ({how}); stderr:\n{tail}")
        self.answered = True
        self.hangs_in_a_row = 0
        status, value = reply
        if status == "error":
            raise ServerCrashed(f"the case server raised:\n{value}")
        return value

    def close(self) -> None:
        if self.proc is not None:
            try:
                os.close(self._to_server)     # EOF: the server disables pydron and exits
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._discard()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
          sys.argv[4] if len(sys.argv) > 4 else None)
