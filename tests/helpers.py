"""Set-up shared by the test modules that run their cases in one pool for the whole module, and
compare each with plain Python's run of the same code."""

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
