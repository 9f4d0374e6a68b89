"""The systems `pydron bench` compares, each driven as its own documentation recommends.

A peer implements the small API the workloads' `*_peer` functions use:
  map(fn, argtuples)  many independent small calls -> list of results (batched)
  submit(fn, *args)   one task -> a handle; args may be handles, or lists of handles
  persist(handles)    keep these results where they are for later tasks
  gather(handles)     -> list of values
`sequential` and `pydron` do not use it: they run the workload's program itself.
"""
from __future__ import annotations

import importlib.util

SYSTEMS = ("sequential", "pydron", "pydron-trace", "pydron-wait", "processpool", "mp-pool",
           "joblib", "dask-threads", "dask-processes", "dask-distributed", "dask-submit",
           "dask-map", "ray")
# pydron itself with parts of the replay off, to show what each part gains (named with
# --systems, not run by default): every call traced (no graph), or graphs replayed without
# guessing past branches on pending results (every such branch waits).
PYDRON_VARIANTS = {"pydron-trace": {"replay": "off"}, "pydron-wait": {"guess": False}}
OPT_IN = tuple(PYDRON_VARIANTS)
# `pydron bench --backend cluster`: pydron on a Dask cluster against Dask itself on the same
# kind of cluster (a scheduler and --workers single-threaded workers, each a subprocess).
CLUSTER_SYSTEMS = ("sequential", "pydron", "dask-submit", "dask-map")
PEERS = tuple(s for s in SYSTEMS[2:] if s not in PYDRON_VARIANTS)

# system -> module that must be importable (else the system is "skipped")
REQUIRES = {"joblib": "joblib", "dask-threads": "dask", "dask-processes": "dask",
            "dask-distributed": "distributed", "dask-submit": "distributed",
            "dask-map": "distributed", "ray": "ray"}


def availability(system: str) -> tuple[bool, str | None]:
    """(installed, version) without importing heavy modules when avoidable."""
    mod = REQUIRES.get(system)
    if mod is None:
        return True, None
    if importlib.util.find_spec(mod) is None:
        return False, None
    try:
        from importlib.metadata import version
        return True, version(mod)
    except Exception:
        return True, None


def _apply_chunk(fn, chunk):
    return [fn(*args) for args in chunk]


def _chunks(items, count):
    size = max(1, -(-len(items) // count))
    return [items[i:i + size] for i in range(0, len(items), size)]


def _map_nested(obj, fn):
    if isinstance(obj, list):
        return [_map_nested(x, fn) for x in obj]
    if isinstance(obj, tuple):
        return tuple(_map_nested(x, fn) for x in obj)
    return fn(obj)


class ProcessPoolPeer:
    """concurrent.futures.ProcessPoolExecutor: `map` with a chunksize for many small
    calls, `submit` and futures for dependencies (resolved in the caller, as PPE's
    futures cannot be passed to other tasks)."""

    def __init__(self, workers):
        from concurrent.futures import ProcessPoolExecutor
        self.workers = workers
        self.pool = ProcessPoolExecutor(workers)

    def map(self, fn, args):
        chunksize = max(1, len(args) // (4 * self.workers))
        return list(self.pool.map(fn, *zip(*args), chunksize=chunksize)) if args else []

    def _value(self, x):
        from concurrent.futures import Future
        return x.result() if isinstance(x, Future) else x

    def submit(self, fn, *args):
        return self.pool.submit(fn, *[_map_nested(a, self._value) for a in args])

    def persist(self, handles):
        return handles

    def gather(self, handles):
        return [self._value(h) for h in handles]

    def close(self):
        self.pool.shutdown()


class MultiprocessingPeer:
    """multiprocessing.Pool: `starmap` (default chunksize) for maps, `apply_async` for
    single tasks."""

    def __init__(self, workers):
        import multiprocessing
        self.pool = multiprocessing.Pool(workers)

    def map(self, fn, args):
        return self.pool.starmap(fn, args)

    def _value(self, x):
        from multiprocessing.pool import AsyncResult
        return x.get() if isinstance(x, AsyncResult) else x

    def submit(self, fn, *args):
        return self.pool.apply_async(fn, tuple(_map_nested(a, self._value) for a in args))

    def persist(self, handles):
        return handles

    def gather(self, handles):
        return [self._value(h) for h in handles]

    def close(self):
        self.pool.close()
        self.pool.join()


class _Lazy:
    __slots__ = ("fn", "args", "value", "done")

    def __init__(self, fn, args):
        self.fn, self.args, self.done = fn, args, False


class JoblibPeer:
    """joblib.Parallel (loky, batch_size="auto"), one reusable Parallel object. joblib has
    no futures: dependent tasks run level by level, one Parallel call per level."""

    def __init__(self, workers):
        import joblib
        self.joblib = joblib
        self.parallel = joblib.Parallel(n_jobs=workers)
        self.parallel.__enter__()
        self.pending: list[_Lazy] = []

    def map(self, fn, args):
        delayed = self.joblib.delayed(fn)
        return self.parallel(delayed(*a) for a in args)

    @staticmethod
    def _ready(x):
        return all(not isinstance(y, _Lazy) or y.done
                   for a in x.args for y in _flatten(a))

    def _flush(self):
        while self.pending:
            ready = [t for t in self.pending if self._ready(t)]
            self.pending = [t for t in self.pending if not self._ready(t)]
            args = [tuple(_map_nested(a, _lazy_value) for a in t.args) for t in ready]
            values = self.parallel(self.joblib.delayed(t.fn)(*a) for t, a in zip(ready, args))
            for t, v in zip(ready, values):
                t.value, t.done = v, True

    def submit(self, fn, *args):
        task = _Lazy(fn, args)
        if not self._ready(task):
            self._flush()
        self.pending.append(task)
        return task

    def persist(self, handles):
        self._flush()
        return handles

    def gather(self, handles):
        self._flush()
        return [_lazy_value(h) for h in handles]

    def close(self):
        self.parallel.__exit__(None, None, None)


def _flatten(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flatten(y)
    else:
        yield x


def _lazy_value(x):
    return x.value if isinstance(x, _Lazy) else x


class DaskLocalPeer:
    """dask.delayed for task graphs and dask.bag for maps, computed by the threads or
    the processes scheduler; `dask.persist` keeps intermediate results."""

    def __init__(self, workers, scheduler):
        import dask
        import dask.bag
        self.dask, self.bag = dask, dask.bag
        self.workers = workers
        self.kwargs = {"scheduler": scheduler, "num_workers": workers}
        if scheduler == "processes":
            from concurrent.futures import ProcessPoolExecutor
            self.pool = ProcessPoolExecutor(workers)
            self.kwargs = {"scheduler": scheduler, "pool": self.pool}
        else:
            self.pool = None

    def map(self, fn, args):
        if not args:
            return []
        b = self.bag.from_sequence(args, npartitions=min(len(args), 4 * self.workers))
        return b.starmap(fn).compute(**self.kwargs)

    def submit(self, fn, *args):
        return self.dask.delayed(fn, pure=True)(*args)

    def persist(self, handles):
        return list(self.dask.persist(*handles, **self.kwargs))

    def gather(self, handles):
        return list(self.dask.compute(*handles, **self.kwargs))

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


class DaskDistributedPeer:
    """dask.distributed on a LocalCluster of processes (loopback only): client.submit
    with futures as arguments, dask.bag for maps, large arrays scattered first."""

    def __init__(self, workers):
        import dask.bag
        from distributed import Client, LocalCluster
        self.bag = dask.bag
        self.workers = workers
        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                    host="127.0.0.1", dashboard_address=None,
                                    silence_logs=50)
        self.client = Client(self.cluster)
        self.scattered = {}             # id(array) -> (array, future): each sent once


    def map(self, fn, args):
        if not args:
            return []
        b = self.bag.from_sequence(args, npartitions=min(len(args), 4 * self.workers))
        return b.starmap(fn).compute(scheduler=self.client)

    def _scatter_large(self, x):
        if getattr(x, "nbytes", 0) <= (1 << 20):
            return x
        hit = self.scattered.get(id(x))
        if hit is None or hit[0] is not x:
            # hash=False: a fresh key each time; re-scattering equal data under one
            # hashed key races with its release and cancels dependent tasks.
            hit = self.scattered[id(x)] = (x, self.client.scatter(x, hash=False))
        return hit[1]

    def submit(self, fn, *args):
        args = [_map_nested(a, self._scatter_large) for a in args]
        return self.client.submit(fn, *args, pure=False)

    def persist(self, handles):
        return handles

    def gather(self, handles):
        values = self.client.gather(handles)
        self.scattered.clear()
        return values

    def close(self):
        self.client.close()
        self.cluster.close()


class DaskClusterPeer(DaskDistributedPeer):
    """Dask on the cluster pydron's cluster backend uses in the bench (a scheduler and
    single-threaded workers, each a subprocess): futures as arguments for dependencies, and
    many small calls either one client.submit each (per_task=True) or one client.map."""

    def __init__(self, workers, per_task):
        from distributed import Client
        from pydron import _cluster
        self.workers = workers
        self.per_task = per_task
        self.cluster = _cluster._start_local(workers)
        self.client = Client(self.cluster, set_as_default=False)
        self.client.wait_for_workers(workers)
        self.scattered = {}

    def map(self, fn, args):
        if self.per_task:
            futures = [self.client.submit(fn, *a, pure=False) for a in args]
        else:
            futures = self.client.map(fn, *zip(*args), pure=False) if args else []
        return self.client.gather(futures)


def _ray_call(fn, spec, *flat):
    """Rebuild list arguments from refs passed at top level (so Ray resolves them)."""
    it = iter(flat)
    args = [[next(it) for _ in range(n)] if n >= 0 else next(it) for n in spec]
    return fn(*args)


class RayPeer:
    """Ray tasks: ObjectRefs passed as top-level arguments for dependencies, batched
    tasks for many small calls (Ray's advice against too fine-grained tasks)."""

    def __init__(self, workers):
        import ray
        self.ray = ray
        self.workers = workers
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
        self.call = ray.remote(_ray_call)
        self.chunk = ray.remote(_apply_chunk)

    def map(self, fn, args):
        refs = [self.chunk.remote(fn, c) for c in _chunks(args, 4 * self.workers)]
        return [x for part in self.ray.get(refs) for x in part]

    def submit(self, fn, *args):
        spec, flat = [], []
        for a in args:
            if isinstance(a, list):
                spec.append(len(a))
                flat.extend(a)
            else:
                spec.append(-1)
                flat.append(a)
        return self.call.remote(fn, spec, *flat)

    def persist(self, handles):
        return handles

    def gather(self, handles):
        return self.ray.get(list(handles))

    def close(self):
        self.ray.shutdown()


def start_peer(system: str, workers: int):
    if system == "processpool":
        return ProcessPoolPeer(workers)
    if system == "mp-pool":
        return MultiprocessingPeer(workers)
    if system == "joblib":
        return JoblibPeer(workers)
    if system == "dask-threads":
        return DaskLocalPeer(workers, "threads")
    if system == "dask-processes":
        return DaskLocalPeer(workers, "processes")
    if system == "dask-distributed":
        return DaskDistributedPeer(workers)
    if system == "dask-submit":
        return DaskClusterPeer(workers, per_task=True)
    if system == "dask-map":
        return DaskClusterPeer(workers, per_task=False)
    if system == "ray":
        return RayPeer(workers)
    raise ValueError(f"unknown peer {system!r}")

