"""Valgrind smoke run of the C core (make valgrind): scheduled calls with tasks, dependencies and a
try region, in the master and a worker; tools/valgrind-check.py keeps the errors in pydron's frames."""
import pydron
@pydron.functional
def inc(x): return x + 1
@pydron.functional
def add(a, b): return a + b
@pydron.schedule
def run(n):
    xs = [inc(i) for i in range(n)]
    try:
        s = add(xs[0], xs[1])
    except ValueError:
        s = None
    return xs, s
pydron.enable(workers=1)
for k in range(20):
    r = run(50)
assert r[1] == 3
pydron.disable()
print("ok")
