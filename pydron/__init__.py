"""pydron: run sequential scientific Python in parallel.

Mark side-effect-free functions with ``@pydron.functional`` and the function to parallelize with
``@pydron.schedule``, call ``pydron.enable()`` once, and calls to functional functions made by a
scheduled function run as tasks on all cores, with the result plain Python would compute.
Without ``enable()``, or with ``PYDRON_DISABLE=1``, the decorators change nothing.
"""
from pydron._api import (
    WorkerLostError,
    disable,
    enable,
    functional,
    is_enabled,
    schedule,
    stats,
    visualize,
)

from pydron._cluster import ClusterError, ClusterLostError, VersionMismatchError
from pydron._replay import explain

__all__ = ["enable", "disable", "is_enabled", "functional", "schedule", "WorkerLostError",
           "stats", "explain",
           "visualize", "ClusterError", "ClusterLostError", "VersionMismatchError"]
__version__ = "0.1.0"
