"""Shared pytest set-up: the `nosan` marker, and the tests directory on the import path of this
process and of any process it starts, so workers can import the semantics corpus by name."""

import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)

if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (TESTS_DIR, os.environ.get("PYTHONPATH"), REPO_DIR) if p)

SANITIZED = bool(os.environ.get("PYDRON_SANITIZED"))

# The graph cache of this test run, empty at its start, for this process and the ones it starts:
# never the user's, and nothing left from an earlier run decides what a test sees.
if "PYDRON_TEST_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["PYDRON_TEST_CACHE_DIR"] = tempfile.mkdtemp(prefix="pydron-test-cache-")
    os.environ["PYDRON_CACHE_DIR"] = os.environ["PYDRON_TEST_CACHE_DIR"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "nosan: cannot run under ASan/UBSan (make asan deselects it): signals that the "
        "sanitizer intercepts, RSS measurements, timing-sensitive process behaviour")


def pytest_collection_modifyitems(config, items):
    # Also skip nosan tests when the sanitized build is run without `-m "not nosan"`.
    if not SANITIZED:
        return
    skip = pytest.mark.skip(reason="not meaningful under ASan/UBSan (PYDRON_SANITIZED=1)")
    for item in items:
        if "nosan" in item.keywords:
            item.add_marker(skip)
