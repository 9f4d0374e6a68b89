"""The workloads of `pydron bench`, each a small realistic program.

Each workload is written once as plain sequential Python with the two decorators (the
`program`, run as is by the sequential system and by pydron), and once more against a
small peer API (`peer`) for the other systems, which have no way to run sequential code
in parallel: there each peer is driven the way its documentation recommends (batched maps
for many small independent calls, futures or delayed objects where tasks depend on
tasks). Inputs are made deterministically from the parameters, outside the timed region.
The list of workloads, their sizes and task counts is in catalog.py.
"""
from __future__ import annotations

import numpy as np

import pydron

from .catalog import lcg

# ---------------------------------------------------------------------------------------
# Functional functions: module level, so every peer's workers can import them.


@pydron.functional
def inc(x):
    return x + 1


@pydron.functional
def burn(seed, iters):
    """Pure-Python CPU work (holds the GIL): a linear congruential generator."""
    return lcg(seed, iters)


@pydron.functional
def transform(a, k):
    """A large array in, a large array out."""
    return a * k + 1.0


@pydron.functional
def leaf(i):
    return i * i + 1


@pydron.functional
def combine(a, b):
    return a + b


@pydron.functional
def measure(seed, iters):
    """The wide stage of the pipeline: some work, then a small record."""
    value = burn(seed, iters)
    return (seed, value, value % 7)


@pydron.functional
def refine(record, iters):
    seed, value, _ = record
    return burn(value, iters) % 1000003


@pydron.functional
def total(values):
    return sum(values)


@pydron.functional
def load_image(index, size):
    """Stands in for reading a raw frame: sky + stars + noise, deterministic per index."""
    rng = np.random.default_rng(1000 + index)
    img = rng.normal(100.0, 5.0, (size, size))
    y, x = rng.integers(0, size, (2, 20))
    img[y, x] += rng.uniform(500, 3000, 20)
    img += 40.0 * ((index * 7919) % 11 == 0)          # a few frames with a bright sky
    return img


@pydron.functional
def calibrate(img, dark, flat):
    return (img - dark) / flat


@pydron.functional
def frame_stats(img):
    """Sigma-clipped mean and standard deviation (3 iterations at 3 sigma)."""
    data = img.ravel()
    for _ in range(3):
        m, s = data.mean(), data.std()
        data = data[np.abs(data - m) < 3.0 * s]
    return float(data.mean()), float(data.std())


@pydron.functional
def stack(frames):
    """Sigma-clipped mean stack of the frames, pixel by pixel."""
    cube = np.stack(frames)
    med = np.median(cube, axis=0)
    std = cube.std(axis=0)
    mask = np.abs(cube - med) < 3.0 * std + 1e-12
    return (cube * mask).sum(axis=0) / np.maximum(mask.sum(axis=0), 1)


@pydron.functional
def svd_top(seed, size):
    """Full SVD of a random size x size matrix (LAPACK through numpy's BLAS, with whatever
    threads it is given); the four largest singular values, rounded: BLAS with 1 or 2 threads
    differs in the last bits, and every system must give the sequential result."""
    a = np.random.default_rng(seed).standard_normal((size, size))
    u, s, vt = np.linalg.svd(a)
    return [round(float(x), 6) for x in s[:4]]


def calibration_frames(size):
    rng = np.random.default_rng(7)
    dark = rng.normal(10.0, 1.0, (size, size))
    flat = 1.0 + 0.05 * rng.standard_normal((size, size))
    return dark, flat


# ---------------------------------------------------------------------------------------
# The programs: plain sequential Python with the decorators.


@pydron.schedule
def tiny_program(n):
    return [inc(x) for x in range(n)]


@pydron.schedule
def cpu_program(n, iters):
    return [burn(seed, iters) for seed in range(n)]


@pydron.schedule
def numpy_program(arrays):
    return [transform(a, 0.5 + i) for i, a in enumerate(arrays)]


@pydron.schedule
def tree_program(n):
    level = [leaf(i) for i in range(n)]
    while len(level) > 1:
        level = [combine(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


@pydron.schedule
def pipeline_program(n, iters):
    records = [measure(seed, iters) for seed in range(n)]       # wide
    kept = [r for r in records if r[2] != 0]                     # filter on results
    refined = [refine(r, iters) for r in kept]
    return total(refined)                                        # narrow


@pydron.schedule
def image_program(n, size):
    dark, flat = calibration_frames(size)
    frames = [calibrate(load_image(i, size), dark, flat) for i in range(n)]
    stats = [frame_stats(f) for f in frames]
    median_sky = sorted(m for m, _ in stats)[len(stats) // 2]
    good = [frames[i] for i, (m, s) in enumerate(stats) if abs(m - median_sky) < 20.0]
    return stack(good)


@pydron.schedule
def blas_program(n, size):
    return [svd_top(seed, size) for seed in range(n)]


@pydron.functional
def probe(seed, iters):
    """Some work, then the seed back: what the loop's branch reads."""
    burn(seed, iters)
    return seed


@pydron.schedule
def branch_program(n, iters, modulus):
    """A loop whose `if` reads each result as it comes (the way scripts are written). With
    modulus 1 the branch always goes the same way (a guess holds), with 2 it flips every time
    (every guess would fail)."""
    out = []
    for seed in range(n):
        r = probe(seed, iters)
        if r % modulus == 0:
            out.append(inc(r))
        else:
            out.append(-r)
    return out


@pydron.schedule
def scale_program(n):
    return [inc(i) for i in range(n)]


# ---------------------------------------------------------------------------------------
# The same programs against the peer API (see peers.py).


def branch_peer(api, n, iters, modulus):
    """The same, restructured the way the peers need it: all probes first, then decide."""
    rs = api.map(probe, [(seed, iters) for seed in range(n)])
    keep = [r % modulus == 0 for r in rs]
    incs = iter(api.map(inc, [(r,) for r, k in zip(rs, keep) if k]))
    return [next(incs) if k else -r for r, k in zip(rs, keep)]


def tiny_peer(api, n):
    return api.map(inc, [(x,) for x in range(n)])


def cpu_peer(api, n, iters):
    return api.map(burn, [(seed, iters) for seed in range(n)])


def numpy_peer(api, arrays):
    futures = [api.submit(transform, a, 0.5 + i) for i, a in enumerate(arrays)]
    return api.gather(futures)


def tree_peer(api, n):
    level = [api.submit(leaf, i) for i in range(n)]
    while len(level) > 1:
        level = [api.submit(combine, level[i], level[i + 1])
                 for i in range(0, len(level), 2)]
    return api.gather(level)[0]


def pipeline_peer(api, n, iters):
    records = api.map(measure, [(seed, iters) for seed in range(n)])
    kept = [r for r in records if r[2] != 0]
    refined = [api.submit(refine, r, iters) for r in kept]
    return api.gather([api.submit(total, refined)])[0]


def image_peer(api, n, size):
    dark, flat = calibration_frames(size)
    frames = api.persist([api.submit(calibrate, api.submit(load_image, i, size), dark, flat)
                          for i in range(n)])
    stats = api.gather([api.submit(frame_stats, f) for f in frames])
    median_sky = sorted(m for m, _ in stats)[len(stats) // 2]
    good = [frames[i] for i, (m, s) in enumerate(stats) if abs(m - median_sky) < 20.0]
    return api.gather([api.submit(stack, good)])[0]


def blas_peer(api, n, size):
    return api.map(svd_top, [(seed, size) for seed in range(n)])


def scale_peer(api, n):
    return api.map(inc, [(i,) for i in range(n)])


# ---------------------------------------------------------------------------------------
