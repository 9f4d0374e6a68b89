"""numpy: arrays into and out of tasks (small and large enough for an out-of-band buffer),
numpy.array(results), array operations on results, dtypes, arrays inside containers."""

import numpy as np

import pydron

from .registry import case
from .tasks import add, halve, square


@pydron.functional
def calibrate(img, dark, flat):
    return (img - dark) / flat


@pydron.functional
def image_stats(img):
    return float(img.mean()), float(img.std()), img.shape


@pydron.functional
def ramp(n, dtype):
    return (np.arange(n) % 3).astype(dtype)


@pydron.functional
def stack(images):
    return np.stack(images)


@pydron.functional
def sigma_clip_mean(cube, sigma):
    med = np.median(cube, axis=0)
    dev = np.abs(cube - med)
    mask = dev <= sigma * cube.std(axis=0) + 1e-12
    return np.where(mask, cube, 0).sum(axis=0) / np.maximum(mask.sum(axis=0), 1)


def _images(count, shape, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(100.0, 5.0, size=shape) for _ in range(count)]


@case(_images(4, (8, 8), 1), np.full((8, 8), 3.0), np.full((8, 8), 2.0))
@pydron.schedule
def calibration_pipeline(images, dark, flat):
    cal = [calibrate(im, dark, flat) for im in images]
    stats = [image_stats(c) for c in cal]
    good = [c for c, (mean, _, _) in zip(cal, stats) if mean > 40.0]
    return sigma_clip_mean(stack(good), 2.0), stats


@case(_images(3, (256, 256), 2), np.zeros((256, 256)), np.ones((256, 256)))
@pydron.schedule
def large_arrays_in_and_out(images, dark, flat):
    cal = [calibrate(im, dark, flat) for im in images]
    return cal, sum(c.sum() for c in cal)


@case([1, 2, 3, 4])
@pydron.schedule
def numpy_array_of_results(xs):
    rs = [square(x) for x in xs]
    hs = [halve(x) for x in xs]
    return np.array(rs), np.array([rs, rs]), np.asarray(hs), np.array(rs, dtype=np.int16)


@case(5)
@pydron.schedule
def dtypes_preserved(n):
    out = {}
    for dt in ("int8", "int64", "float32", "float64", "complex64", "bool", "uint16"):
        out[dt] = ramp(n, dt)
    return out, [a.dtype.name for a in out.values()]


@case(6)
@pydron.schedule
def array_operations_on_results(n):
    a = ramp(n, "float64")
    b = ramp(n, "int32")
    c = add(a, b)
    return (c, a * 2 + 1, a @ a, c[1:3], c.reshape(2, 3).T, c.sum(), c.mean(), a > 2, np.sqrt(a),
            np.concatenate([a, c]), c.tolist(), float(c[-1]))


@case(4)
@pydron.schedule
def numpy_scalars_from_tasks(n):
    a = ramp(n, "float32")
    s = a.sum()
    m = a.max()
    return type(s).__name__, s, m, s > m, f"{s:.2f}", int(m), np.float64(square(3))


@case(3)
@pydron.schedule
def arrays_in_containers(n):
    arrays = {"a": ramp(n, "int64"), "b": [ramp(n + 1, "float64"), (ramp(1, "int8"),)]}
    shared = ramp(2, "int64")
    pair_ = [shared, shared]
    return arrays, pair_, pair_[0] is pair_[1], len(arrays["b"][0])


@case(np.arange(12.0).reshape(3, 4))
@pydron.schedule
def array_argument_views(arr):
    rows = [halve(arr[i]) for i in range(arr.shape[0])]
    cols = [halve(arr[:, j]) for j in range(arr.shape[1])]
    return np.vstack(rows), np.column_stack(cols), add(arr.T, 1)


@pydron.functional
def big_ramp(n, offset):
    return np.arange(n, dtype=np.float64) + offset


@pydron.functional
def passthrough_array(a):
    return a


@pydron.functional
def describe_array(a):
    # Not the layout flags: a view's strides cannot cross to another process (the task gets a
    # contiguous copy), an inherent difference, not one a user's result may depend on.
    return a.shape, a.dtype.str, a.tolist() if a.size < 50 else float(a.sum())


@case(200_000)
@pydron.schedule
def result_arrays_stay_valid_and_writeable(n):
    # Results may live in shared memory: later tasks must not overwrite them, and the master may
    # write into them as into any array it got back from a function.
    first = big_ramp(n, 0.0)
    kept = first[:3].copy()
    later = [big_ramp(n, float(k)) for k in range(1, 6)]
    sums = [float(a.sum()) for a in later]
    first[0] = -1.0
    first *= 2
    unchanged = bool(np.array_equal(first[1:3], kept[1:3] * 2))
    return first[:4], unchanged, sums, first.flags.writeable, later[2][:2]


@case(np.arange(24.0).reshape(4, 6))
@pydron.schedule
def unusual_array_layouts(base):
    layouts = [
        base[:, ::2],                              # non-contiguous view
        np.asfortranarray(base),                   # Fortran order
        base.astype(">f8"),                        # big-endian
        np.zeros(0),                               # empty
        np.array(3.5),                             # 0-d
        np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "i4"), ("b", "f8")]),   # structured
        np.array([1, "two", None], dtype=object),  # object array: cannot go out of band
        base > 10,                                 # bool
        base.T,                                    # transposed view
    ]
    described = [describe_array(a) for a in layouts]
    echoed = [passthrough_array(a) for a in layouts]
    return described, echoed, [e.dtype.str for e in echoed], bool(np.isfortran(echoed[1]))
