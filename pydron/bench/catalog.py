"""The catalog of `pydron bench` workloads: names, sizes, task counts. Light to import
(no pydron, no peers), so the harness can check names and print help without loading
anything; the programs themselves are in workloads.py, loaded by each system's child.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np


def lcg(seed, iters):
    """The arithmetic of the CPU-bound tasks: a linear congruential generator."""
    acc = seed
    for _ in range(iters):
        acc = (acc * 1103515245 + 12345) & 0x7FFFFFFF
    return acc


@dataclasses.dataclass
class Workload:
    name: str
    description: str
    program: str                    # names in workloads.py
    peer: str
    params: dict[str, Any]          # default run
    quick: dict[str, Any]           # --quick run
    warm: dict[str, Any] | None     # a small run first: starts pools, fills caches
                                    # (None: a full-size run, where allocation matters)
    tasks: Callable[..., int]       # number of tasks for the given parameters
    make_args: Callable[..., tuple] = None   # parameters -> arguments (untimed)
    sizes: tuple = ()               # scale only: graph sizes (default, quick)
    quick_sizes: tuple = ()

    def args(self, params):
        return self.make_args(**params) if self.make_args else tuple(params.values())

    def functions(self):
        """(program, peer): the functions themselves, from workloads.py."""
        from . import workloads
        return getattr(workloads, self.program), getattr(workloads, self.peer)


def _arrays(count, mb):
    n = int(mb * 1024 * 1024 // 8)
    return ([np.random.default_rng(i).standard_normal(n) for i in range(count)],)


def _pipeline_tasks(n, iters):
    kept = sum(1 for seed in range(n) if lcg(seed, iters) % 7 != 0)
    return n + kept + 1


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("tiny", "tiny tasks (x + 1): pure overhead", "tiny_program", "tiny_peer",
             {"n": 10_000}, {"n": 2_000}, {"n": 200}, lambda n: n),
    Workload("cpu", "CPU-bound pure-Python tasks of ~15 ms", "cpu_program", "cpu_peer",
             {"n": 32, "iters": 160_000}, {"n": 8, "iters": 120_000},
             {"n": 2, "iters": 1000}, lambda n, iters: n),
    Workload("numpy-large", "large float64 arrays in and out", "numpy_program", "numpy_peer",
             {"count": 8, "mb": 64}, {"count": 4, "mb": 16}, None,
             lambda count, mb: count, make_args=_arrays),
    Workload("tree", "pairwise tree reduction (leaves + combines)", "tree_program",
             "tree_peer", {"n": 4096}, {"n": 1024}, {"n": 16}, lambda n: 2 * n - 1),
    Workload("pipeline", "wide-then-narrow: map, filter on results, map, reduce",
             "pipeline_program", "pipeline_peer", {"n": 256, "iters": 20_000},
             {"n": 64, "iters": 10_000}, {"n": 4, "iters": 100}, _pipeline_tasks),
    Workload("image", "image calibration, sigma-clipped statistics and stack",
             "image_program", "image_peer", {"n": 16, "size": 512}, {"n": 8, "size": 256},
             {"n": 2, "size": 32}, lambda n, size: 3 * n + 1),
    Workload("blas", "SVD of 350x350 matrices, numpy's default BLAS threads",
             "blas_program", "blas_peer", {"n": 24, "size": 350}, {"n": 12, "size": 350},
             {"n": 2, "size": 50}, lambda n, size: n),
    Workload("branch-hold", "a loop whose `if` reads each ~2 ms result; guesses hold",
             "branch_program", "branch_peer", {"n": 48, "iters": 20_000, "modulus": 1},
             {"n": 24, "iters": 20_000, "modulus": 1}, {"n": 4, "iters": 100, "modulus": 1},
             lambda n, iters, modulus: 2 * n),
    Workload("branch-miss", "the same loop, its `if` flipping every time: guesses fail",
             "branch_program", "branch_peer", {"n": 48, "iters": 20_000, "modulus": 2},
             {"n": 24, "iters": 20_000, "modulus": 2}, {"n": 4, "iters": 100, "modulus": 2},
             lambda n, iters, modulus: n + (n + 1) // 2),
    Workload("scale", "graph of many tiny tasks: per-task time and master memory",
             "scale_program", "scale_peer", {"n": 1_000_000}, {"n": 10_000}, {"n": 100},
             lambda n: n, sizes=(1_000, 10_000, 100_000, 1_000_000),
             quick_sizes=(1_000, 10_000)),
]}
