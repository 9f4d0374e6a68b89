"""The main job of `make demo`: an astronomy reduction pipeline, run plainly and under pydron.

32 raw frames of 1024x1024 float64 are "read" (made deterministically from their index),
dark- and flat-calibrated, measured (sigma-clipped sky level and noise), the frames whose
sky is off are rejected, and the good ones are combined into a sigma-clipped stack. The
pipeline is plain sequential Python with the two decorators. It runs once as plain Python
(in a child process with PYDRON_DISABLE=1, the kill switch) and once under pydron; both
times are printed, and the results must be identical (exit status 1 if not).

    python bench/pipeline_demo.py [--images 32] [--size 1024] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import pydron
from pydron import config

# --- the pipeline: plain Python, two decorators ---------------------------------------


@pydron.functional
def read_frame(index, size):
    """Stands in for reading raw frame `index`: sky, stars, read noise, a dark current."""
    rng = np.random.default_rng(index)
    sky = 200.0 + (60.0 if index % 9 == 4 else 0.0)      # every ninth frame: clouds
    frame = rng.normal(sky, 8.0, (size, size))
    y, x = rng.integers(0, size, (2, size // 4))
    frame[y, x] += rng.uniform(1e3, 2e4, size // 4)     # stars and cosmic rays
    return frame + master_dark(size)


def master_dark(size):
    return np.random.default_rng(10_000).normal(12.0, 0.5, (size, size))


def master_flat(size):
    yy, xx = np.mgrid[0:size, 0:size] / size
    return 1.0 - 0.1 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)  # vignetting


@pydron.functional
def calibrate(frame, dark, flat):
    return (frame - dark) / flat


@pydron.functional
def sky_statistics(image, sigma=3.0, iterations=5):
    """Sigma-clipped mean and standard deviation of the image."""
    data = image.ravel()
    for _ in range(iterations):
        mean, std = data.mean(), data.std()
        data = data[np.abs(data - mean) < sigma * std]
    return float(data.mean()), float(data.std())


@pydron.functional
def stack_rows(frames, skies, start, stop, sigma=3.0):
    """Rows start:stop of the sigma-clipped mean stack (each frame sky-subtracted)."""
    cube = np.stack([f[start:stop] - s for f, s in zip(frames, skies)])
    centre = np.median(cube, axis=0)
    spread = cube.std(axis=0)
    keep = np.abs(cube - centre) <= sigma * spread
    return (cube * keep).sum(axis=0) / np.maximum(keep.sum(axis=0), 1)


@pydron.schedule
def reduce_night(count, size, bands):
    dark, flat = master_dark(size), master_flat(size)
    images = [calibrate(read_frame(i, size), dark, flat) for i in range(count)]
    stats = [sky_statistics(image) for image in images]
    skies = sorted(mean for mean, _ in stats)
    typical = skies[len(skies) // 2]
    good = [i for i, (mean, std) in enumerate(stats) if abs(mean - typical) < 20.0]
    frames = [images[i] for i in good]
    levels = [stats[i][0] for i in good]
    step = -(-size // bands)
    rows = [stack_rows(frames, levels, r, min(r + step, size)) for r in range(0, size, step)]
    return np.vstack(rows), good, stats


# --- the demo around it ---------------------------------------------------------------


def expectation(workers: int, size: int) -> str:
    """What speed-up to expect here. The per-frame steps (read, calibrate, measure) and the
    stack's row bands run in parallel; what stays on the master does not (Amdahl's law), and
    other programs running on the cores take their share."""
    cores = config.default_workers()
    used = min(workers, cores)
    best = 1.0 / (SERIAL_SHARE + (1.0 - SERIAL_SHARE) / used)
    text = (f"expect : at most about {best:.1f}x with {workers} worker{'s' * (workers != 1)} "
            f"on {cores} usable core{'s' * (cores != 1)} ({SERIAL_SHARE:.0%} of the work stays "
            f"on the master; moving {size * size * 8 / 2**20:g} MB frames between processes and sharing the memory "
            f"bandwidth take a part of the rest)")
    busy = os.getloadavg()[0]
    if busy >= 0.5:
        text += (f"; other programs keep about {busy:.1f} of the {cores} cores busy now "
                 f"(load average), so expect less")
    return text


# The share of a plain run that pydron cannot run in parallel here (the master dark and flat,
# choosing the frames, joining the bands): 1-5% when each step of the plain run is timed on
# its own (5% in a cold process, 1% warm).
SERIAL_SHARE = 0.05


def timed(count, size, bands, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = reduce_night(count, size, bands)
        times.append(time.perf_counter() - t0)
    return result, times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--runs", type=int, default=2, help="timed runs of each (best shown)")
    p.add_argument("--bands", type=int, default=None,
                   help="row bands the stack is split into (default: one per worker)")
    p.add_argument("--plain-out", help=argparse.SUPPRESS)   # the child's side
    args = p.parse_args()

    workers = args.workers or config.resolve().workers
    bands = args.bands or workers
    if args.plain_out:                       # the plain-Python run, in the child
        (stacked, good, stats), times = timed(args.images, args.size, bands, args.runs)
        np.savez(args.plain_out, stacked=stacked, good=np.array(good),
                 stats=np.array(stats), times=np.array(times))
        return 0

    pydron.enable(workers=args.workers, progress=False)
    print(f"pipeline: {args.images} frames of {args.size}x{args.size} float64 "
          f"({args.images * args.size * args.size * 8 / 2**20:.0f} MB raw): "
          f"dark/flat calibration, sigma-clipped sky statistics, rejection, "
          f"sigma-clipped stack", flush=True)
    print(expectation(workers, args.size), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plain.npz")
        env = dict(os.environ, PYDRON_DISABLE="1")
        plain_run = subprocess.run([sys.executable, os.path.abspath(__file__), "--images",
                                    str(args.images), "--size", str(args.size), "--runs",
                                    str(args.runs), "--bands", str(bands), "--plain-out",
                                    out], env=env)
        if plain_run.returncode != 0:
            print(f"the plain-Python run failed (exit status {plain_run.returncode})",
                  file=sys.stderr)
            return 1
        plain = np.load(out)
        plain_stacked, plain_good = plain["stacked"], plain["good"]
        plain_stats, plain_times = plain["stats"], list(plain["times"])

    (stacked, good, stats), times = timed(args.images, args.size, bands, args.runs)
    best_plain, best_pydron = min(plain_times), min(times)
    print(f"plain Python : {best_plain:7.3f} s   (runs: "
          f"{', '.join(f'{t:.3f}' for t in plain_times)})")
    print(f"pydron       : {best_pydron:7.3f} s   (runs: "
          f"{', '.join(f'{t:.3f}' for t in times)}; {workers} workers; the first run "
          f"includes starting them)")
    print(f"speed-up     : {best_plain / best_pydron:7.2f}x")
    same = (np.array_equal(stacked, plain_stacked) and stacked.dtype == plain_stacked.dtype
            and list(good) == list(plain_good)
            and np.array_equal(np.array(stats), plain_stats))
    print(f"kept {len(good)} of {args.images} frames; stack mean {stacked.mean():.4f}")
    if not same:
        print("results DIFFER between plain Python and pydron", file=sys.stderr)
        return 1
    print("results identical (numpy.array_equal on the stack, same frames kept, "
          "same statistics)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
