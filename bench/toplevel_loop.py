"""An unedited CPU-bound script with its loop at the top level, as gallery examples and notebooks
write them: no pydron import, no decorator, no main(). Figure of issue 12 item 3:

    farm-bench -n 5 --vs "python bench/toplevel_loop.py" -- pydron run --functional simulate bench/toplevel_loop.py

`pydron run --functional simulate` schedules the top level (the default when only functional
functions are named), so each simulate() call of the loop is a task on a worker."""
import math


def simulate(seed, steps=1_000_000):
    """A random walk with a linear congruential generator: pure Python, CPU-bound."""
    x, state = 0.0, seed * 2654435761 % 2**32
    for _ in range(steps):
        state = (1103515245 * state + 12345) % 2**31
        x += math.cos(state / 2**31 * math.tau)
    return x


results = []
for seed in range(16):
    results.append(simulate(seed))

print(len(results), "walks, mean end point %.6f" % (sum(results) / len(results)))
