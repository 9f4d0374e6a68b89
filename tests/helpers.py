"""Set-up shared by test modules: a pool for a whole module with plain Python's run of the same
code beside it, and the /dev/shm check of the fault tests."""

import os
import time

import pytest

import pydron


def module_pool(**options):
    """(pool, plain) for a test module to bind at its top level as `pool, plain = module_pool(...)`:
    pool is an autouse fixture that enables pydron with these options for the module's tests and
    disables it after the last; plain(fn, *args) is fn(*args) run with pydron disabled (plain
    Python's result), after which pydron is enabled again with the same options."""

    @pytest.fixture(scope="module", autouse=True)
    def pool():
        pydron.enable(**options)
        yield
        pydron.disable()

    def plain(fn, *args):
        pydron.disable()
        try:
            return fn(*args)
        finally:
            pydron.enable(**options)

    return pool, plain


SHM = "/dev/shm"


def shm_entries():
    """The names in /dev/shm now."""
    try:
        return set(os.listdir(SHM))
    except FileNotFoundError:
        return set()


def _in_use_by_anyone(path):
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                if any(path in line for line in f):
                    return True
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(path):
                    return True
        except OSError:
            continue
    return False


def leaked_shm(before):
    """Entries of /dev/shm that are new since `before` and that no process maps or holds open:
    what a scenario left behind. pydron's shared memory is anonymous, so anything here is a
    leak; entries other programs on the machine are using at the moment are not, and one that
    is about to be used or removed gets a second look a second later. multiprocessing's
    semaphores (sem.mp-*) are not looked at: pydron's runtime never imports multiprocessing,
    and processes other programs start with spawn or forkserver (Dask's nannies) leave theirs
    until their resource tracker removes them, or for good when they are killed."""
    def unused():
        return sorted(n for n in shm_entries() - before
                      if not n.startswith("sem.mp-")
                      and not _in_use_by_anyone(os.path.join(SHM, n)))
    leaked = unused()
    if leaked:
        time.sleep(1.0)
        leaked = unused()
    return leaked
