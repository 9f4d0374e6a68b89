"""The life of the pool around the user's own processes, threads and descriptors (issue: nothing
wrong, nothing lost, nothing hung): enable() from a thread that ends, enable() at import time in a
module that defines its functions afterwards, a child forked by the user, descriptors the user
closes, the fork server killed. Each scenario runs in its own interpreter; every process it
started (found by a tag in its environment) must be gone when it is."""

import textwrap

import pytest

pytestmark = pytest.mark.nosan

from isolated import INCS, run


def test_enable_from_a_thread_that_ends(tmp_path):
    """The pool outlives the thread that called enable() (the fork server no longer dies with
    the thread that forked it)."""
    proc = run("""
        import threading, time, pydron

        @pydron.functional
        def square(x):
            return x * x

        @pydron.schedule
        def squares(n):
            return [square(i) for i in range(n)]

        t = threading.Thread(target=pydron.enable, kwargs={"workers": 2})
        t.start(); t.join()
        time.sleep(0.3)          # the thread is gone well before the first task
        assert squares(20) == [i * i for i in range(20)]
        assert pydron.stats()["submitted"] == 20
        print("ok")
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_enable_at_import_functions_defined_after(tmp_path):
    """A module that enables pydron at import time and defines its functions afterwards: the fork
    server holds it half-imported, so its functions travel by value."""
    proc = run("""
        import pydron, lib
        print(lib.pipeline(10))
    """, tmp_path, files={"lib.py": """
        import pydron
        pydron.enable(workers=2)

        SCALE = 3

        @pydron.functional
        def scale(x):
            return helper(x) * SCALE

        def helper(x):
            return x + 1

        @pydron.schedule
        def pipeline(n):
            return [scale(i) for i in range(n)]
    """})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str([(i + 1) * 3 for i in range(10)])


def test_child_forked_by_the_user_runs_plainly(tmp_path):
    """A child forked after enable() does not own the parent's pool: its scheduled calls run as
    plain Python (never 'executor is not running'), and the parent's pool is untouched."""
    proc = run("""
        import os, pydron, multiprocessing as mp
        from incs import incs
        pydron.enable(workers=2)

        assert incs(5) == [1, 2, 3, 4, 5]
        pid = os.fork()
        if pid == 0:
            ok = incs(5) == [1, 2, 3, 4, 5] and not pydron.is_enabled()
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0, status
        with mp.get_context("fork").Pool(2) as pool:
            assert pool.map(incs, [3, 4]) == [[1, 2, 3], [1, 2, 3, 4]]
        assert incs(100) == list(range(1, 101))      # the parent's pool still works
        print("ok")
    """, tmp_path, files={"incs.py": INCS})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_closed_socket_is_not_held_by_pydron_processes(tmp_path):
    """A listening socket opened before enable() and closed by the user afterwards is closed for
    real: the fork server and the workers do not keep it in LISTEN."""
    proc = run("""
        import socket, sys, time, pydron, psutil
        s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); port = s.getsockname()[1]
        from incs import incs
        pydron.enable(workers=2)

        assert incs(4) == [1, 2, 3, 4]                 # workers exist
        s.close()
        me = psutil.Process()
        tree = [me] + me.children(recursive=True)
        assert len(tree) >= 4, tree                    # this process, the fork server, 2 workers
        holders = [p.pid for p in tree
                   if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                          for c in p.net_connections(kind="tcp"))]
        print(len(holders), port)
    """, tmp_path, files={"incs.py": INCS})
    assert proc.returncode == 0, proc.stderr
    count, port = proc.stdout.split()
    assert count == "0", f"port {port} still listened on"


def test_fork_server_killed_is_restarted(tmp_path):
    """Killing the fork server (and with it the workers) is survived: it is started again, the
    call that was running completes with the right result, and later calls work."""
    proc = run("""
        import os, signal, threading, time, pydron
        from pydron import _core
        pydron.enable(workers=2)

        @pydron.functional
        def slow(x):
            time.sleep(0.02)
            return x * 2

        @pydron.schedule
        def run(n):
            return [slow(i) for i in range(n)]

        assert run(4) == [0, 2, 4, 6]
        fs = _core._exec_info()["forkserver"]
        threading.Timer(0.2, os.kill, (fs, signal.SIGKILL)).start()
        assert run(100) == [2 * i for i in range(100)]
        info = _core._exec_info()
        assert info["forkserver"] not in (0, fs), info
        assert run(10) == [2 * i for i in range(10)]
        print("ok", info["nworkers"])
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok 2"


def test_workers_start_with_the_scripts_modules_imported(tmp_path):
    """pydron run enables pydron before the script's first line; the script's libraries are
    imported into the fork server as the script imports them, so workers do not import them
    again on their first task (the module was imported by another process than the worker)."""
    (tmp_path / "heavy.py").write_text("import os, time\nIMPORTED_BY = os.getpid()\n")
    (tmp_path / "script.py").write_text(textwrap.dedent("""
        import os, time
        import heavy
        import pydron

        @pydron.functional
        def where(x):
            return os.getpid(), heavy.IMPORTED_BY

        @pydron.schedule
        def run(n):
            return [where(i) for i in range(n)]

        time.sleep(0.3)              # the script's own work between its imports and the call
        pairs = run(4)
        print(all(pid != by and by != os.getpid() for pid, by in pairs))
    """))
    proc = run(f"""
        import runpy, sys
        sys.argv = ["pydron", "run", "--workers", "2", r"{tmp_path / 'script.py'}"]
        from pydron.cli import main
        sys.exit(main(sys.argv[1:]))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "True"
