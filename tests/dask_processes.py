"""Real `dask scheduler` and `dask worker` processes on loopback, for the cluster backend's tests.

Each process is started by the tests (never found by name), in a session of its own, and
stopped by its own handle; `close()` then checks that none of them is left and that the
scheduler's port is free again. TLS certificates are made with the openssl command: a CA and one
certificate for 127.0.0.1 that the scheduler, the workers and the client all present.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_certificates(directory: Path) -> dict:
    """A CA and a certificate for 127.0.0.1 / localhost signed by it: paths of the PEM files."""
    d = Path(directory)
    run = lambda *args: subprocess.run(["openssl", *args], check=True, cwd=d,  # noqa: E731
                                       capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=pydron-test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                               "extendedKeyUsage=serverAuth,clientAuth\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "node.key",
        "-out", "node.csr")
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "node.pem")
    return {"ca": str(d / "ca.pem"), "cert": str(d / "node.pem"), "key": str(d / "node.key")}


def security_for(certs: dict):
    from distributed.security import Security
    return Security(tls_ca_file=certs["ca"], tls_client_cert=certs["cert"],
                    tls_client_key=certs["key"], require_encryption=True)


class DaskProcesses:
    """A scheduler and workers (each `--no-nanny`: a killed worker stays dead, as a lost
    machine would)."""

    def __init__(self, workers: int = 2, nthreads: int = 1, certs: dict | None = None,
                 cwd: str | None = None):
        self.tmp = tempfile.TemporaryDirectory(prefix="pydron-dask-")
        self.certs = certs
        self.cwd = cwd or self.tmp.name
        self.scheduler = None
        self.workers: list[subprocess.Popen] = []
        self.address = None
        self._logs = []
        try:
            self._start_scheduler()
            for _ in range(workers):
                self.add_worker(nthreads=nthreads)
            if workers:
                self.wait_for_workers(workers)
        except BaseException:
            self.close()             # nothing of a half-started cluster stays behind
            raise

    # -- starting ----------------------------------------------------------------------------

    def _tls_args(self):
        if not self.certs:
            return []
        return ["--tls-ca-file", self.certs["ca"], "--tls-cert", self.certs["cert"],
                "--tls-key", self.certs["key"]]

    def _spawn(self, args, name, env=None):
        log = open(os.path.join(self.tmp.name, f"{name}.log"), "wb")
        self._logs.append(log)
        full_env = dict(os.environ)
        full_env.pop("PYDRON_CLUSTER", None)
        full_env.update(env or {})
        return subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, cwd=self.cwd, env=full_env,
                                start_new_session=True)

    def _start_scheduler(self):
        self.scheduler_file = os.path.join(self.tmp.name, "scheduler.json")
        self.scheduler = self._spawn(
            ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--no-dashboard", "--scheduler-file", self.scheduler_file,
             "--protocol", "tls" if self.certs else "tcp", *self._tls_args()], "scheduler")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.scheduler.poll() is not None:
                raise RuntimeError(f"dask scheduler exited:\n{self.log('scheduler')}")
            try:
                self.address = json.loads(Path(self.scheduler_file).read_text())["address"]
                return
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
        raise RuntimeError(f"dask scheduler did not start:\n{self.log('scheduler')}")

    def add_worker(self, nthreads: int = 1, env: dict | None = None,
                   preload: str | None = None) -> subprocess.Popen:
        args = ["distributed.cli.dask_worker", "--scheduler-file", self.scheduler_file,
                "--host", "127.0.0.1", "--nthreads", str(nthreads), "--no-nanny",
                "--no-dashboard", "--death-timeout", "30", *self._tls_args()]
        if preload:
            args += ["--preload", preload]
        w = self._spawn(args, f"worker{len(self.workers)}", env)
        self.workers.append(w)
        return w

    def client(self, **kwargs):
        from distributed import Client
        sec = security_for(self.certs) if self.certs else None
        return Client(self.address, security=sec, set_as_default=False, timeout=30, **kwargs)

    def wait_for_workers(self, n: int, timeout: float = 60) -> None:
        with self.client() as c:
            c.wait_for_workers(n, timeout=timeout)

    def log(self, name: str) -> str:
        try:
            return Path(self.tmp.name, f"{name}.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- stopping ----------------------------------------------------------------------------

    def kill_worker(self, i: int) -> None:
        self.workers[i].kill()
        self.workers[i].wait()

    def kill_scheduler(self) -> None:
        self.scheduler.kill()
        self.scheduler.wait()

    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def close(self) -> None:
        procs = [w for w in self.workers] + ([self.scheduler] if self.scheduler else [])
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self._logs:
            log.close()
        self.tmp.cleanup()

    def leftovers(self) -> list[str]:
        """What is still there after close(): processes alive, the scheduler's port taken."""
        out = [f"pid {p.pid} ({' '.join(p.args[2:4])})" for p in self.workers + [self.scheduler]
               if p is not None and p.poll() is None]
        if self.address:
            with socket.socket() as s:
                s.settimeout(2)
                if s.connect_ex(("127.0.0.1", self.port())) == 0:
                    out.append(f"port {self.port()} still listening")
        return out
