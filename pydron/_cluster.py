"""The cluster backend's client side: pydron's tasks on a Dask distributed cluster.

remote/ (C) attaches an `Adapter` as the executor of kind EXEC_REMOTE and calls its methods
(see remote/internal.h for the protocol). How a task travels:

- `submit` (the master thread, per task) only queues the task: its encoded arguments stay lent
  (a BlobHold) so later writes by the caller cannot change them.
- `_flush` (Dask's event-loop thread) sends what was queued as one Dask graph: tasks are cut into
  batches (one Dask task each, a few to thousands of pydron tasks depending on how long their
  function is known to run), with deterministic keys (`pydron-<client>-<n>`). A batch reads its
  inputs as Dask dependencies: the functions (pickled once, a key per function), the results of
  earlier batches (data moves worker to worker, never through this process) and large constant
  buffers (scattered once, recognised by their place in pydron's arena). It is flushed when the
  master is about to wait (remote/ calls `flush`), a few milliseconds after the first task was
  queued, or when many are queued.
- A batch that finished hands its tasks over as references (`RemoteRef`): results stay on the
  workers; `fetch` brings one here only when the scheduled code reads it. A batch in which some
  tasks raised comes back as `BatchFailed` with every task's outcome.
- Workers report where and when each task ran through a Dask event topic (the timeline's lanes,
  and run times that size the next batches).

Faults: Dask recomputes lost results from their lineage; a batch that killed workers 3 times is
split and its tasks retried alone, and a task that alone kills 3 workers fails with
WorkerLostError. A lost scheduler fails the outstanding tasks with ClusterLostError, and remote/
detaches the adapter: later tasks run on the local pool.
"""
from __future__ import annotations

import collections
import hashlib
import ipaddress
import logging
import os
import pickle
import socket
import sys
import threading
import time
import uuid
import weakref
from urllib.parse import urlsplit

from pydron import _cluster_worker, _exec_helpers

log = logging.getLogger("pydron")

# How a flush is cut into batches (`plan_batches`): in rounds of one batch per worker thread, each
# batch 1/(2 x threads) of the known work not yet cut (factoring, a guided self-scheduling): few
# Dask tasks while much is left, small ones at the end so that the workers finish together.
# A batch holds at least BATCH_SECONDS of work, long enough to amortise what a Dask task costs
# (a scheduler round trip and a few process wake-ups: 1-10 ms on a busy machine), and at most
# BATCH_MAX_SECONDS, so that results still stream back and a lost worker loses little.
BATCH_SECONDS = 0.02
BATCH_MAX_SECONDS = 2.0
BATCH_MAX_TASKS = 4096
# A task whose function has no known run time yet is sized as one batch of its own, but a flush
# makes at most this many such batches (a first flush of a few thousand tiny tasks).
UNKNOWN_BATCHES_MAX = 64
# Tasks queued this long are sent even if the master keeps submitting.
FLUSH_DELAY_S = 0.002
FLUSH_AT_TASKS = 8192
# Buffers this large are scattered once (and reused while their arena block is unchanged);
# smaller ones travel inside the batch.
SCATTER_MIN_BYTES = 1 << 20
CONSTANTS_KEPT = 64
CONSTANTS_MAX_BYTES = 4 << 30
# A batch result up to this size is fetched whole the first time one of its values is read (the
# next reads are free); a larger one value by value.
FETCH_WHOLE_MAX_BYTES = 4 << 20
CONNECT_TIMEOUT_S = 30.0
# The worker threads are counted again at a flush when the last count is older than this.
SLOTS_REFRESH_S = 1.0
# The client stays disconnected from the scheduler this long before the cluster counts as lost.
RECONNECT_GRACE_S = 5.0

REMOTE_DONE, REMOTE_VALUE, REMOTE_FAILED = 0, 1, 2


class ClusterError(RuntimeError):
    """The cluster cannot be used as given: address, security, versions, no workers."""


class ClusterLostError(ClusterError):
    """The connection to the Dask scheduler was lost; the tasks it held are lost with it.
    Tasks submitted afterwards run on this machine."""


class VersionMismatchError(ClusterError):
    """A worker's Python, pydron, cloudpickle or numpy differs from this process's."""


# ---- addresses and security -------------------------------------------------------------------

def parse_local(address: str) -> int | None:
    """'local' or 'local:N' -> N workers (0: one per usable core); None for other addresses."""
    if address == "local":
        return 0
    if address.startswith("local:"):
        text = address[len("local:"):]
        if text.isdigit() and int(text) > 0:
            return int(text)
        raise ClusterError(f"pydron: cluster address {address!r}: expected local:N with N a "
                           f"positive number of workers")
    return None


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_security(address: str, security, insecure: bool):
    """The Security to connect with: a non-loopback address needs tls:// and certificates unless
    insecure=True (then a warning is logged). Raises ClusterError naming what is missing."""
    from distributed.security import Security
    url = address if "://" in address else f"tcp://{address}"
    parts = urlsplit(url)
    scheme, host = parts.scheme, parts.hostname or ""
    if isinstance(security, dict):
        security = Security(**security)
    elif security is not None and not isinstance(security, Security):
        raise ClusterError(f"pydron: security must be a distributed.security.Security (or a "
                           f"dict of its keywords), got {type(security).__name__}")
    if security is None:
        security = Security()      # Dask's own configuration: distributed.comm.tls.*
    has_tls = bool(security.tls_ca_file and security.tls_client_cert)
    if scheme == "tls":
        if not has_tls:
            raise ClusterError(
                f"pydron: {address} is a tls:// address but no certificates are given: pass "
                f"security=distributed.security.Security(tls_ca_file=..., tls_client_cert=..., "
                f"tls_client_key=..., require_encryption=True), or set Dask's "
                f"distributed.comm.tls.ca-file / client.cert / client.key configuration")
        return security
    if scheme not in ("tcp", "inproc", "ucx", "ws", "wss"):
        raise ClusterError(f"pydron: cluster address {address!r}: unknown protocol {scheme!r} "
                           f"(use tls://host:port, tcp://host:port or local:N)")
    if scheme in ("tcp", "ws", "ucx") and not _is_loopback(host):
        if not insecure:
            raise ClusterError(
                f"pydron: {address} is not on this machine, and {scheme}:// is not encrypted: "
                f"anyone who can reach it can run code in your workers and read your data. "
                f"Use tls:// with certificates (security=...), or pass insecure=True "
                f"(PYDRON_CLUSTER_INSECURE=1) on a network you trust")
        log.warning("pydron: connecting to %s without TLS (insecure=True): the tasks, their "
                    "code and their data travel unencrypted and unauthenticated", address)
    return security


# ---- references to results on the cluster ----------------------------------------------------

class Batch:
    """One Dask task running some pydron tasks; its result (a list) stays on a worker."""

    __slots__ = ("key", "future", "tasks", "inputs", "payload", "nbytes", "values", "fetched",
                 "live", "cancelled", "lane", "siblings", "__weakref__")

    def __init__(self, key, tasks):
        self.key = key
        self.future = None
        self.tasks = tasks          # the _Task records, until the batch is done
        self.inputs = ()            # what keeps the input keys alive while it may run again
        self.payload = None         # (pickled payload, input keys), to run it again split
        self.nbytes = None          # size of the result list, from the worker's report
        self.values = None          # the result list, once fetched whole
        self.fetched = 0
        self.live = len(tasks)      # tasks not cancelled
        self.cancelled = False
        self.lane = 0
        self.siblings = None        # weak references to the batches sent in the same flush


class RemoteRef:
    """A finished task's result: item `index` of a batch's result list, on a worker."""

    __slots__ = ("batch", "index")

    def __init__(self, batch, index):
        self.batch = batch
        self.index = index

    def __repr__(self):
        return f"<pydron result {self.batch.key}[{self.index}]>"


class _Task:
    __slots__ = ("id", "fn", "fn_key", "hold", "deps", "timeout", "cancelled", "batch",
                 "spec", "inputs")

    def __init__(self, task_id, fn, fn_key, hold, deps, timeout):
        self.id = task_id
        self.fn = fn
        self.fn_key = fn_key
        self.hold = hold
        self.deps = deps
        self.timeout = timeout
        self.cancelled = False
        self.batch = None
        self.spec = None            # (data, buffer specs, dependency specs) once exported
        self.inputs = None          # the keys the spec's indexes name


# ---- cutting a flush into batches -----------------------------------------------------------------

def plan_batches(tasks, run_time: dict, slots: int) -> list[list]:
    """Cut `tasks` (in submission order, which is kept) into batches for `slots` worker threads.

    A task with a timeout is a batch of its own (its timer is the batch's). Tasks whose function
    has no known run time (`run_time` maps a task's fn_key to seconds) go alone, at most
    UNKNOWN_BATCHES_MAX batches of them per flush. The others are cut by factoring: in rounds
    of `slots` batches, each about 1/(2 x slots) of the known work not yet cut, at least
    BATCH_SECONDS (or an equal share of a smaller flush) and at most BATCH_MAX_SECONDS and
    BATCH_MAX_TASKS. Dask hands batches that read nothing but functions to the next free
    worker thread in this order, so the large batches run first and the small last ones even
    out the finish (batches that read results or constants are placed by Dask where those
    are). Every worker thread gets a part of a flush of at least `slots` tasks."""
    slots = max(1, slots)
    unknown = sum(1 for t in tasks if t.fn_key not in run_time)
    unknown_per_batch = max(1, -(-unknown // UNKNOWN_BATCHES_MAX))
    left = sum(run_time[t.fn_key] for t in tasks if t.fn_key in run_time and not t.timeout)
    floor = max(min(BATCH_SECONDS, left / slots), 1e-7)
    groups, current, work, current_known = [], [], 0.0, False
    share, round_left = 0.0, 0
    for t in tasks:
        est = run_time.get(t.fn_key)
        known = est is not None
        if t.timeout:
            if current:
                groups.append(current)
                current, work = [], 0.0
            groups.append([t])
            continue
        if current and (known != current_known or
                        (not known and len(current) >= unknown_per_batch) or
                        (known and (work + est > share * (1 + 1e-9) or
                                    len(current) >= BATCH_MAX_TASKS))):
            groups.append(current)
            current, work = [], 0.0
        if not current and known:
            if round_left == 0:        # a new round: its batches' share of the work left
                share = min(max(floor, left / (2 * slots)), BATCH_MAX_SECONDS)
                round_left = slots
            round_left -= 1
        current_known = known
        current.append(t)
        if known:
            work += est
            left -= est
    if current:
        groups.append(current)
    # A run time learnt from smaller calls of the same function (a warm-up) must not put a
    # whole flush on one worker.
    while len(groups) < min(len(tasks), slots):
        largest = max(range(len(groups)), key=lambda i: len(groups[i]))
        g = groups[largest]
        if len(g) < 2:
            break
        half = len(g) // 2
        groups[largest:largest + 1] = [g[:half], g[half:]]
    return groups


# ---- the adapter --------------------------------------------------------------------------------

class Adapter:
    """The Dask client side of remote/ (see the module's docstring)."""

    def __init__(self, client, cluster=None, address=""):
        from pydron import _core
        self._core = _core
        self.client = client
        self.cluster = cluster             # a local cluster this adapter started, or None
        self.address = address
        self.prefix = f"pydron-{uuid.uuid4().hex[:12]}"
        self.topic = self.prefix
        self.versions = tuple(sorted(_cluster_worker.versions().items()))
        self._lock = threading.Lock()
        self._queued: list[_Task] = []     # submitted, not yet sent
        self._tasks: dict[int, _Task] = {} # submitted, not yet handed over or cancelled
        self._done: collections.deque = collections.deque()
        self._batches: dict[str, Batch] = {}
        self._seq = 0
        self._timer_armed = False
        self._flushing = False
        self._flush_again = False
        self._functions: dict = {}         # function -> key
        self._function_data: dict = {}     # key -> pickled function, until sent
        self._function_futures: dict = {}  # key -> Future keeping it on the cluster
        self._importable: dict[str, bool] = {}
        self._table_state = None
        self._table_key = None
        self._constants: collections.OrderedDict = collections.OrderedDict()
        self._constant_bytes = 0
        self._run_time: dict[str, float] = {}   # function key -> seconds per task (average)
        self._reports: dict[str, dict] = {}
        self._lanes: dict[str, int] = {}
        self._clock_offset = _core._clock() - time.time()
        self._lost: BaseException | None = None
        self._disconnected_since = None
        self._closed = False
        self.stats = collections.Counter()
        self.slots = 1
        self._slots_asked = 0.0
        self._refresh_slots()
        client.subscribe_topic(self.topic, self._on_report)

    # -- called by remote/ (C), master thread ----------------------------------------------------

    def submit(self, task_id, fn, hold, deps, timeout):
        if self._lost is not None:
            # remote/ detaches this adapter and runs the task locally; first the outstanding
            # tasks fail with the loss (each exactly once).
            self._fail_outstanding()
            self._close_in_background()
            _forget(self)
            return False
        key = self._functions.get(fn)
        if key is None:
            key = self._register_function(fn)
        task = _Task(task_id, fn, key, hold, deps, timeout)
        with self._lock:
            self._queued.append(task)
            self._tasks[task_id] = task
            n = len(self._queued)
            arm = not self._timer_armed
            self._timer_armed = True
        if n >= FLUSH_AT_TASKS:
            self.flush()
        elif arm:
            self.client.loop.add_callback(self._arm_timer)

    def flush(self):
        self.client.loop.add_callback(self._flush)

    def collect(self):
        out = []
        tasks = self._tasks
        with self._lock:
            while self._done:
                item = self._done.popleft()
                if tasks.pop(item[0], None) is not None:    # else: cancelled meanwhile
                    out.append(item)
        return out

    def check(self):
        """False once the cluster is gone (then every outstanding task has been queued as
        failed); called while the master waits, every 50 ms at most."""
        if self._lost is None:
            status = self.client.status
            if status == "running":
                self._disconnected_since = None
            else:
                now = time.monotonic()
                since = self._disconnected_since = self._disconnected_since or now
                if status in ("closed", "closing", "failed") or now - since > RECONNECT_GRACE_S:
                    self._declare_lost(f"the connection to the Dask scheduler at "
                                       f"{self.address} was lost ({status})")
        if self._lost is None:
            return True
        self._fail_outstanding()
        self._close_in_background()
        _forget(self)
        return False

    def cancel(self, ids):
        known, futures = 0, []
        with self._lock:
            for task_id in ids:
                task = self._tasks.pop(task_id, None)
                if task is None:
                    continue
                known += 1
                task.cancelled = True
                batch = task.batch
                if batch is not None:
                    batch.live -= 1
                    if batch.live == 0 and batch.future is not None and not batch.cancelled:
                        batch.cancelled = True
                        futures.append(batch.future)
        if futures and self._lost is None:
            self.stats["batches_cancelled"] += len(futures)
            try:
                self.client.cancel(futures, force=True, reason="pydron: cancelled (Ctrl-C)")
            except Exception as exc:   # the tasks are forgotten here all the same
                log.debug("pydron: cancelling %d batches failed: %r", len(futures), exc)
        return known

    def fetch(self, ref):
        batch = ref.batch
        if batch.values is not None:
            return self._take(batch, ref.index)
        if self._lost is not None:
            raise ClusterLostError(f"pydron: a result on the cluster cannot be read: {self._lost}")
        try:
            whole = batch.nbytes is not None and batch.nbytes <= FETCH_WHOLE_MAX_BYTES
            if whole or self._batch_size(batch) == 1:
                # Reading one result of a flush announces reading the others (a list of
                # results): the finished, small ones come in the same round trip.
                group = [batch] + self._finished_siblings(batch)
                lists = self.client.gather([b.future for b in group])
                self.stats["fetches"] += 1
                for b, values in zip(group, lists):
                    self.stats["fetched_results"] += len(values)
                    b.values = values
                return self._take(batch, ref.index)
            import operator
            pick = self.client.submit(operator.getitem, batch.future, ref.index,
                                      key=f"{batch.key}-item-{ref.index}", pure=False)
            try:
                self.stats["fetches"] += 1
                self.stats["fetched_results"] += 1
                return pick.result()
            finally:
                pick.release()
        except Exception as exc:
            if self._lost is not None or _is_cancelled(exc):
                raise ClusterLostError(f"pydron: a result on the cluster cannot be read "
                                       f"({batch.key}): {self._lost or exc}") from None
            raise

    def close(self):
        """Interpreter exit or pydron.disable(): outstanding tasks fail, the client closes (and
        the local cluster this adapter started stops)."""
        if self._closed:
            return
        if self._lost is None:
            self._declare_lost("the cluster was detached (pydron.disable() or exit)", quiet=True)
        self._fail_outstanding()
        self._closed = True
        try:
            self.client.unsubscribe_topic(self.topic)
        except Exception:
            pass
        try:
            self.client.close(timeout=5)
        except Exception as exc:
            log.debug("pydron: closing the Dask client: %r", exc)
        if self.cluster is not None:
            try:
                self.cluster.close(timeout=10)
            except Exception as exc:
                log.debug("pydron: closing the local cluster: %r", exc)

    # -- functions ---------------------------------------------------------------------------------

    def _register_function(self, fn):
        """Pickle fn once: by reference when its module can be imported on the workers, else by
        value (cloudpickle); its key names the pickled bytes, so equal code is sent once."""
        module = sys.modules.get(getattr(fn, "__module__", None) or "")
        by_value = module is not None and module.__name__ != "__main__" and \
            not self._module_importable(module.__name__)
        try:
            if by_value:
                import cloudpickle
                cloudpickle.register_pickle_by_value(module)
                try:
                    data = _exec_helpers.pickle_function(fn)
                finally:
                    cloudpickle.unregister_pickle_by_value(module)
            else:
                data = _exec_helpers.pickle_function(fn)
        except Exception as exc:
            raise _exec_helpers.bad_function(fn, exc) from None
        key = f"pydron-fn-{hashlib.blake2b(data, digest_size=12).hexdigest()}"
        with self._lock:
            if key not in self._function_futures:
                self._function_data[key] = data
        self._functions[fn] = key
        return key

    def _class_table(self):
        """The key of the classes and functions defined in __main__ and in modules the workers
        cannot import, pickled by value: the arguments' pickles name them by module, and the
        workers' unpickler finds them there. Made again when such a module gains names."""
        modules = [m for m in (sys.modules.get("__main__"),) if m is not None]
        modules += [sys.modules[n] for n, ok in self._importable.items()
                    if not ok and n in sys.modules]
        state = tuple((m.__name__, len(vars(m))) for m in modules)
        if state == self._table_state:
            return self._table_key
        import cloudpickle
        import types as _types
        table = {}
        for m in modules:
            for name, obj in list(vars(m).items()):
                if isinstance(obj, (type, _types.FunctionType)) and \
                        getattr(obj, "__module__", None) == m.__name__ and \
                        getattr(obj, "__qualname__", None) == name:
                    table[(m.__name__, name)] = obj
        by_value = [m for m in modules if m.__name__ != "__main__"]
        for m in by_value:
            cloudpickle.register_pickle_by_value(m)
        try:
            data = cloudpickle.dumps(table, protocol=5)
        except Exception as exc:     # something unpicklable there: name it, ship the rest
            log.debug("pydron: the class table cannot be pickled whole: %r", exc)
            kept = {}
            for k, v in table.items():
                try:
                    cloudpickle.dumps(v, protocol=5)
                    kept[k] = v
                except Exception:
                    pass
            data = cloudpickle.dumps(kept, protocol=5)
        finally:
            for m in by_value:
                cloudpickle.unregister_pickle_by_value(m)
        key = f"pydron-defs-{hashlib.blake2b(data, digest_size=12).hexdigest()}"
        with self._lock:
            if key not in self._function_futures:
                self._function_data[key] = data
        self._table_state, self._table_key = state, key
        return key

    def _module_importable(self, name: str) -> bool:
        """Asked of every worker once per module (a round trip, then remembered)."""
        top = name.partition(".")[0]
        known = self._importable.get(name)
        if known is None:
            if top in sys.stdlib_module_names:
                known = True
            else:
                try:
                    answers = self.client.run(_cluster_worker.can_import, name)
                    known = bool(answers) and all(answers.values())
                except Exception as exc:
                    log.debug("pydron: asking the workers for module %s: %r", name, exc)
                    known = False
            self._importable[name] = known
            log.debug("pydron: functions of %s travel %s", name,
                      "by name" if known else "by value")
        return known

    # -- sending (Dask's event-loop thread) --------------------------------------------------------

    def _arm_timer(self):
        self.client.loop.call_later(FLUSH_DELAY_S, self._flush)

    async def _flush(self):
        if self._flushing:
            self._flush_again = True
            return
        self._flushing = True
        try:
            while True:
                self._flush_again = False
                with self._lock:
                    tasks, self._queued = self._queued, []
                    self._timer_armed = False
                tasks = [t for t in tasks if not t.cancelled]
                if tasks and self._lost is None:
                    self._ask_slots()
                    try:
                        await self._send(tasks)
                    except Exception as exc:     # fail these tasks, not the event loop
                        self._fail_tasks(tasks, exc)
                if not self._flush_again:
                    break
        finally:
            self._flushing = False

    async def _send(self, tasks):
        from dask._task_spec import DataNode, Task, TaskRef
        groups = plan_batches(tasks, self._run_time, self.slots)
        table_key = self._class_table()
        dsk, keys, batches = {}, [], []
        new_functions = []
        scatter = {}
        for group in groups:
            key = f"{self.prefix}-{self._seq}"
            self._seq += 1
            batch = Batch(key, group)
            inputs, index = [], {}

            def input_of(k, keep):
                i = index.get(k)
                if i is None:
                    i = index[k] = len(inputs)
                    inputs.append((k, keep))
                return i

            specs, fn_keys = [], {}
            table_input = None
            if table_key is not None:
                table_input = input_of(table_key, None)
                fn_keys[table_input] = table_key
            for t in group:
                t.batch = batch
                fn_input = input_of(t.fn_key, None)
                fn_keys[fn_input] = t.fn_key
                data, bufs = self._export(t.hold, input_of, scatter)
                deps = []
                for d in t.deps:
                    if isinstance(d, RemoteRef):
                        deps.append(("r", input_of(d.batch.key, d.batch), d.index))
                    else:
                        ddata, dbufs = self._export(d, input_of, scatter)
                        deps.append(("v", ddata, dbufs))
                t.hold = None
                t.deps = tuple(d for d in t.deps if isinstance(d, RemoteRef))
                specs.append((fn_input, data, tuple(bufs), tuple(deps)))
            payload = pickle.dumps((key, self.topic, self.versions, fn_keys, table_input, specs),
                                   protocol=5)
            input_keys = [k for k, _ in inputs]
            batch.inputs = [keep for _, keep in inputs if keep is not None]
            batch.payload = (payload, input_keys)
            # A batch that reads nothing but functions (no other batch's result, no scattered
            # constant) is a root task: Dask queues it and gives it to the next free worker
            # thread, in `keys` order. Placed by where its inputs are, the batches of a small
            # flush all went to the worker holding the function, and the other workers idled.
            root = {"_data_producer": all(keep is None for _, keep in inputs)} \
                if _dask_orders() else {}
            dsk[key] = Task(key, _cluster_worker.run_batch, payload,
                            *[TaskRef(k) for k in input_keys], **root)
            keys.append(key)
            batches.append(batch)
            for k in input_keys:
                if k in self._function_data and k not in new_functions:
                    new_functions.append(k)
        if scatter:
            await self._scatter(scatter)
        for k in new_functions:
            dsk[k] = DataNode(k, self._function_data[k])
        submitted = self._submit_graph(dsk, new_functions + keys)
        for k, fut in zip(new_functions, submitted):
            self._function_futures[k] = fut
            self._function_data.pop(k, None)
        futures = submitted[len(new_functions):]
        self.stats["batches"] += len(batches)
        self.stats["tasks"] += len(tasks)
        siblings = [weakref.ref(b) for b in batches]
        for batch, fut in zip(batches, futures):
            batch.siblings = siblings
            batch.future = fut
            self._batches[batch.key] = batch
            fut.add_done_callback(self._on_done)

    def _submit_graph(self, dsk, keys):
        """Send a graph; the futures of `keys`, in order. Dask starts the graph's ready tasks in
        the order of `keys` (its own ordering breaks ties by key name, which ran a flush's
        batches backwards: the small last ones first, the program's first results last), and
        this graph's after those of earlier flushes (fifo_timeout=0: a generation per graph).
        That takes Client._graph_to_futures, as Client.map calls it; a Dask without it gets
        Client.get and its own order."""
        if not _dask_orders():
            return self.client.get(dsk, keys, sync=False)
        from dask._expr import LLGExpr
        from distributed.spans import SpanMetadata
        futures = self.client._graph_to_futures(
            LLGExpr(dsk), set(keys), internal_priority={k: i for i, k in enumerate(keys)},
            fifo_timeout=0, span_metadata=SpanMetadata(collections=[{"type": "low-level-graph"}]))
        return [futures[k] for k in keys]

    def _export(self, hold, input_of, scatter):
        """(pickle bytes, buffer specs) of a BlobHold: small buffers inline, large ones as the
        key of a constant scattered once."""
        data, bufs, where = hold.export()
        specs = []
        keep_hold = False
        for buf, (addr, size) in zip(bufs, where):
            if size < SCATTER_MIN_BYTES:
                specs.append(bytes(buf))
                continue
            entry = self._constants.get((addr, size))
            if entry is None:
                key = f"{self.prefix}-const-{len(scatter)}-{self._seq}-{addr:x}"
                entry = [key, None, hold]
                scatter[key] = (bytes(buf), entry, (addr, size))
                keep_hold = True
            else:
                self._constants.move_to_end((addr, size))
                self.stats["constants_reused"] += 1
            specs.append(input_of(entry[0], entry))
        if not keep_hold:
            hold.release()
        return data, specs

    async def _scatter(self, scatter):
        futures = await self.client._scatter({k: v[0] for k, v in scatter.items()},
                                             hash=False)
        for key, (data, entry, where) in scatter.items():
            entry[1] = futures[key]
            self._constants[where] = entry
            self._constant_bytes += where[1]
            self.stats["constants_scattered"] += 1
        while self._constants and (len(self._constants) > CONSTANTS_KEPT or
                                   self._constant_bytes > CONSTANTS_MAX_BYTES):
            where, (key, fut, hold) = self._constants.popitem(last=False)
            self._constant_bytes -= where[1]
            # Batches that read it keep its future in their inputs until they are done.

    # -- finishing (Dask's callback thread) ----------------------------------------------------------

    def _on_report(self, event):
        _, msg = event
        key = msg.get("key")
        if key is not None:
            self._reports[key] = msg

    def _lane(self, worker):
        lane = self._lanes.get(worker)
        if lane is None:
            lane = self._lanes[worker] = len(self._lanes) + 1
        return lane

    def _on_done(self, future):
        batch = self._batches.pop(future.key, None)
        if batch is None:
            return
        try:
            items = self._outcomes(batch, future)
        except Exception as exc:    # never lose the tasks: fail them with what went wrong
            items = [(t.id, REMOTE_FAILED, exc, 0, 0.0, 0.0) for t in batch.tasks]
        if items:
            with self._lock:
                self._done.extend(items)
            self._core._remote_notify()

    def _timing(self, batch):
        """(lane, [(started, finished)] on pydron's clock) from the worker's report."""
        report = self._reports.pop(batch.key, None)
        if report is None:
            return 0, [(0.0, 0.0)] * len(batch.tasks)
        batch.nbytes = report.get("nbytes")
        lane = batch.lane = self._lane(report.get("worker", "?"))
        off = self._clock_offset
        times = [(s + off, e + off) for s, e in report.get("times", ())]
        for t, (s, e) in zip(batch.tasks, times):
            prev = self._run_time.get(t.fn_key)
            d = max(e - s, 1e-7)
            # Up at once, down slowly: a batch sized for tasks shorter than they are idles the
            # other workers; one sized for longer tasks only costs Dask a few more tasks.
            self._run_time[t.fn_key] = d if prev is None or d > prev else 0.9 * prev + 0.1 * d
        times += [(0.0, 0.0)] * (len(batch.tasks) - len(times))
        return lane, times

    def _outcomes(self, batch, future):
        status = future.status
        tasks = batch.tasks
        if status in ("finished", "lost"):
            lane, times = self._timing(batch)
            batch.tasks = [None] * len(tasks)       # the count, for fetch; records go
            batch.inputs = ()
            batch.payload = None
            return [(t.id, REMOTE_DONE, RemoteRef(batch, i), lane, s, e)
                    for i, (t, (s, e)) in enumerate(zip(tasks, times)) if not t.cancelled]
        if status == "cancelled":
            if batch.cancelled:
                return []
            self._declare_lost(f"the Dask scheduler at {self.address} cancelled pydron's tasks "
                               f"(the connection was lost or the scheduler restarted)")
            return [(t.id, REMOTE_FAILED, ClusterLostError(str(self._lost)), 0, 0.0, 0.0)
                    for t in tasks if not t.cancelled]
        exc = future.exception()
        if isinstance(exc, _cluster_worker.BatchFailed):
            return self._split_outcomes(batch, exc)
        if _is_killed_worker(exc):
            return self._killed(batch, exc)
        return [(t.id, REMOTE_FAILED, exc, 0, 0.0, 0.0) for t in tasks if not t.cancelled]

    def _split_outcomes(self, batch, failure):
        lane, times = self._timing(batch)
        items = []
        for t, (ok, payload), (s, e) in zip(batch.tasks, failure.outcomes, times):
            if t.cancelled:
                continue
            if ok:     # its batch's key holds an error, so the value lives here from now on
                items.append((t.id, REMOTE_VALUE, payload, lane, s, e))
                continue
            try:
                exc = _exec_helpers.restore_builtin_state(pickle.loads(payload))
            except Exception as err:
                exc = _exec_helpers.undecodable_error(err)
            items.append((t.id, REMOTE_FAILED, exc, lane, s, e))
        return items

    def _killed(self, batch, exc):
        """The batch killed Dask's allowed number of workers: run its tasks alone, so that only
        the one to blame fails; that one fails with WorkerLostError."""
        live = [t for t in batch.tasks if not t.cancelled]
        if len(batch.tasks) > 1 and live:
            self.stats["batches_split"] += 1
            self.client.loop.add_callback(self._resend_split, batch, live)
            return []
        items = []
        payload, _ = batch.payload
        specs = pickle.loads(payload)[-1]
        for t, spec in zip(batch.tasks, specs):
            if t.cancelled:
                continue
            data, bufs = spec[1], [b if isinstance(b, bytes) else b"" for b in spec[2]]
            err = _exec_helpers.worker_lost(t.fn, f"Dask worker lost ({_killed_text(exc)})",
                                            _allowed_failures(), data, bufs)
            items.append((t.id, REMOTE_FAILED, err, 0, 0.0, 0.0))
        return items

    async def _resend_split(self, batch, live):
        from dask._task_spec import Task, TaskRef
        payload, input_keys = batch.payload
        key, topic, versions, fn_keys, table_input, specs = pickle.loads(payload)
        dsk, keys, parts = {}, [], []
        for t, spec in zip(batch.tasks, specs):
            if t.cancelled:
                continue
            part_key = f"{key}-alone-{len(parts)}"
            part = Batch(part_key, [t])
            part.inputs = batch.inputs
            part.payload = (pickle.dumps((part_key, topic, versions, fn_keys, table_input,
                                          [spec]), protocol=5), input_keys)
            t.batch = part
            dsk[part_key] = Task(part_key, _cluster_worker.run_batch, part.payload[0],
                                 *[TaskRef(k) for k in input_keys])
            keys.append(part_key)
            parts.append(part)
        if not parts:
            return
        futures = self.client.get(dsk, keys, sync=False)
        for part, fut in zip(parts, futures):
            part.future = fut
            self._batches[part.key] = part
            fut.add_done_callback(self._on_done)

    # -- fetching ----------------------------------------------------------------------------------

    @staticmethod
    def _finished_siblings(batch):
        out, size = [], batch.nbytes or 0
        for w in batch.siblings or ():
            b = w()
            if b is None or b is batch or b.values is not None or b.future is None or \
                    b.nbytes is None or b.future.status != "finished":
                continue
            size += b.nbytes
            if size > FETCH_WHOLE_MAX_BYTES:
                break
            out.append(b)
        return out

    @staticmethod
    def _batch_size(batch):
        return len(batch.tasks)

    @staticmethod
    def _take(batch, index):
        value = batch.values[index]
        batch.fetched += 1
        if batch.fetched >= len(batch.values):
            batch.values = None     # every value was read: the copies here are the graph's now
            batch.fetched = 0
        return value

    # -- losing the cluster --------------------------------------------------------------------------

    def _declare_lost(self, why, quiet=False):
        if self._lost is None:
            self._lost = ClusterLostError(f"pydron: {why}; the tasks it held are lost. Tasks "
                                          f"submitted from now on run on this machine")
            if not quiet:
                log.error("%s", self._lost)

    def _fail_tasks(self, tasks, exc):
        with self._lock:
            self._done.extend((t.id, REMOTE_FAILED, exc, 0, 0.0, 0.0) for t in tasks
                              if not t.cancelled)
        self._core._remote_notify()

    def _fail_outstanding(self):
        """Every task not yet handed over fails with the loss (each exactly once)."""
        with self._lock:
            queued = {item[0] for item in self._done}
            pending = [t for t in self._tasks.values() if t.id not in queued]
            self._queued = []
            self._done.extend((t.id, REMOTE_FAILED, ClusterLostError(str(self._lost)), 0, 0.0,
                               0.0) for t in pending)
            self._batches.clear()

    def _close_in_background(self):
        if self._closed:
            return
        self._closed = True
        client, cluster = self.client, self.cluster

        def close():
            for thing in (client, cluster):
                if thing is not None:
                    try:
                        thing.close(timeout=5)
                    except Exception:
                        pass

        threading.Thread(target=close, name="pydron-cluster-close", daemon=True).start()

    # -- what `pydron info`, tests and the timeline read ---------------------------------------------

    def _refresh_slots(self):
        try:
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
            self.slots = max(1, sum(w.get("nthreads", 1) for w in workers.values()))
        except Exception:
            self.slots = max(1, self.slots)
        self._slots_asked = time.monotonic()

    def _ask_slots(self):
        """Have the worker threads counted again in the background (Dask's event-loop thread)
        when the last count is older than SLOTS_REFRESH_S: workers join late (a cluster found
        with one worker up) or leave, and batches are cut for the threads there are."""
        now = time.monotonic()
        if now - self._slots_asked < SLOTS_REFRESH_S:
            return
        self._slots_asked = now

        async def count():
            try:
                info = await self.client.scheduler.identity(n_workers=-1)
                self.slots = max(1, sum(w.get("nthreads", 1)
                                        for w in info.get("workers", {}).values()))
            except Exception as exc:      # the count stays as it was
                log.debug("pydron: counting the Dask worker threads: %r", exc)

        self.client.loop.add_callback(count)

    def info(self) -> dict:
        try:
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
        except Exception:
            workers = {}
        return {"address": self.address, "workers": len(workers),
                "threads": sum(w.get("nthreads", 0) for w in workers.values()),
                "dashboard": _dashboard(self.client), "lost": str(self._lost or ""),
                **self.stats}

    def lane_names(self) -> dict[int, str]:
        return {lane: f"dask {addr}" for addr, lane in self._lanes.items()}


def _dask_orders() -> bool:
    """Whether this Dask lets the client order a graph's tasks and mark root tasks:
    Client._graph_to_futures takes an expression with priorities, Task takes _data_producer
    (distributed 2025 and later). Without, graphs go through Client.get as they are."""
    global _orders_known
    if _orders_known is None:
        import inspect
        try:
            from dask._task_spec import Task
            from distributed import Client
            import dask._expr  # noqa: F401
            import distributed.spans  # noqa: F401
            sent = inspect.signature(Client._graph_to_futures).parameters
            _orders_known = all(p in sent for p in ("expr", "internal_priority",
                                                    "fifo_timeout", "span_metadata")) and \
                "_data_producer" in inspect.signature(Task.__init__).parameters
        except (AttributeError, ImportError, TypeError, ValueError):
            _orders_known = False
    return _orders_known


_orders_known: bool | None = None


def _is_cancelled(exc) -> bool:
    return type(exc).__name__ in ("CancelledError", "FutureCancelledError")


def _is_killed_worker(exc) -> bool:
    return type(exc).__name__ == "KilledWorker"


def _killed_text(exc) -> str:
    try:
        worker = exc.last_worker
        return f"last on {getattr(worker, 'address', worker)}"
    except Exception:
        return str(exc)[:200]


def _allowed_failures() -> int:
    import dask
    try:
        return int(dask.config.get("distributed.scheduler.allowed-failures")) + 1
    except Exception:
        return 3


def _dashboard(client) -> str | None:
    try:
        info = client.scheduler_info(n_workers=0)
        port = info.get("services", {}).get("dashboard")
        return client.dashboard_link if port else None
    except Exception:
        return None


# ---- connecting ---------------------------------------------------------------------------------

_adapter: Adapter | None = None


def current() -> Adapter | None:
    return _adapter


def _forget(adapter) -> None:
    global _adapter
    if _adapter is adapter:
        _adapter = None


def _start_local(n: int):
    """A cluster on this machine: a scheduler and n single-threaded workers, each in a
    subprocess of its own (no fork of this process, no re-import of the user's __main__)."""
    from distributed.deploy.subprocess import SubprocessCluster
    from pydron import config
    n = n or config.default_workers()
    return SubprocessCluster(host="127.0.0.1", n_workers=n, threads_per_worker=1,
                             dashboard_address=":0", silence_logs=logging.ERROR,
                             worker_kwargs={"nthreads": 1})


def check_worker_versions(client, own: dict) -> None:
    """Compare every worker's versions with this process's: one VersionMismatchError naming
    each worker that differs and how."""
    answers = client.run(_cluster_worker.versions)
    problems = []
    for worker, theirs in sorted(answers.items()):
        diff = _cluster_worker.compare_versions(own, theirs)
        if diff:
            problems.append(f"{worker}: " + "; ".join(diff))
    if problems:
        raise VersionMismatchError("pydron: the Dask workers cannot run this client's tasks "
                                   "(versions differ):\n  " + "\n  ".join(problems))


def connect(address: str, *, security=None, insecure: bool = False,
            timeout: float = CONNECT_TIMEOUT_S) -> Adapter:
    """Connect to (or, for local:N, start) a cluster, check it, and attach it to the C core:
    from now on pydron's tasks run there."""
    global _adapter
    from distributed import Client
    from pydron import _core
    if _adapter is not None:
        disconnect()
    cluster = None
    n = parse_local(address)
    # A cluster started here is used once all its workers are up (batches are cut for the
    # threads there are); one found running, as soon as one worker is.
    wanted = 1
    try:
        if n is not None:
            from pydron import config
            wanted = n = n or config.default_workers()
            cluster = _start_local(n)
            client = Client(cluster, set_as_default=False, timeout=timeout)
            where = f"{address} ({cluster.scheduler_address})"
        else:
            security = check_security(address, security, insecure)
            try:
                client = Client(address, security=security, set_as_default=False,
                                timeout=timeout)
            except OSError as exc:
                raise ClusterError(f"pydron: cannot reach the Dask scheduler at {address}: "
                                   f"{exc}") from None
            where = address
        try:
            client.wait_for_workers(wanted, timeout=timeout)
        except Exception:
            client.close()
            if wanted > 1:
                raise ClusterError(f"pydron: the {wanted} Dask workers of {where} did not all "
                                   f"start within {timeout:g} s") from None
            raise ClusterError(f"pydron: no Dask worker joined the scheduler at {where} within "
                               f"{timeout:g} s (start some with `dask worker ADDRESS`)") from None
        try:
            check_worker_versions(client, _cluster_worker.versions())
        except BaseException:
            client.close()
            raise
        adapter = Adapter(client, cluster, where)
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise
    _core._remote_attach(adapter)
    _adapter = adapter
    info = adapter.info()
    log.info("pydron: tasks run on the Dask cluster at %s: %d workers, %d threads",
             where, info["workers"], info["threads"])
    if info["dashboard"]:
        log.info("pydron: Dask dashboard: %s", info["dashboard"])
    return adapter


def disconnect() -> None:
    """Detach the cluster (tasks run locally again) and close the client."""
    global _adapter
    from pydron import _core
    adapter, _adapter = _adapter, None
    if adapter is None:
        return
    try:
        adapter._declare_lost("the cluster was detached (pydron.disable())", quiet=True)
        adapter._fail_outstanding()
        _core._remote_detach()
    finally:
        adapter.close()
