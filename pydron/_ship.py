"""What crosses between the master and its workers, and in which form (the Python side of
exec/codec.c and exec/functions.c).

A worker is a fork of the fork server, which is a fork of the master made at enable(): it has
the modules the master had then (and those the fork server imported since), as they were then.
So an object crosses

* by reference (its module and name) when the worker can import it as it is: classes and
  functions that are the attribute their __module__ and __qualname__ name, of a module the
  worker has or can import; anything else that is a module attribute (the bound methods of
  module-level singletons such as numpy.random.rand, sentinels, loggers, sys.stdout), so the
  task uses the worker's own object, as plain Python uses the module's;
* by value (cloudpickle's reduction, code objects keeping their real file name) when it lives
  in __main__, in a module still being imported when the fork server was forked, in exec()'d
  code, inside a function, or nowhere importable. A by-value class or function is pickled once
  and sent as (token, bytes) while it is unchanged; the receiver unpickles each token once.

Arrays keep their layout (reduce_array). Nothing here runs for the plain values of the fast
path: exec/codec.c calls in only for classes, functions, methods and unusual arrays, and caches
the by-reference answers. It must not import pydron._core at module level.
"""
from __future__ import annotations

import collections
import io
import itertools
import os
import pickle
import sys
import types
import weakref

# ---- what the workers have -------------------------------------------------------------------

# Set by before_fork() (via _exec_helpers): modules still being imported when the fork server was
# forked (their workers' copies are half-executed), and the modules the fork server has.
half_imported: frozenset = frozenset()
server_modules: set = set()


def before_fork() -> None:
    global half_imported, server_modules
    half_imported = frozenset(
        name for name, m in list(sys.modules.items())
        if getattr(getattr(m, "__spec__", None), "_initializing", False))
    server_modules = set(sys.modules)
    _module_index.clear()
    _indexed_modules.clear()
    _index_state[0] = -1


def worker_has_module(name: str, module) -> bool:
    """Whether a worker can get module `name` by importing it, as the master has it."""
    if name == "__main__" or name in half_imported or module is None:
        return False
    spec = getattr(module, "__spec__", None)
    if spec is not None and getattr(spec, "_initializing", False):
        return False
    if name in server_modules:
        return True
    # Imported since the fork: the worker imports it by name, which needs a real spec.
    return spec is not None and spec.origin is not None


def _registered_by_value(module) -> bool:
    try:
        from cloudpickle.cloudpickle import _is_registered_pickle_by_value
    except ImportError:          # another cloudpickle: nothing is registered in a way we know
        return False
    return _is_registered_pickle_by_value(module)


def _getattribute(obj, qualname: str):
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def by_reference(obj) -> bool:
    """Whether class or function obj can travel by name: the worker finds this very object at
    obj.__module__ + obj.__qualname__."""
    modname = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None)
    if not isinstance(modname, str) or not isinstance(qual, str) or "<locals>" in qual:
        return False
    module = sys.modules.get(modname)
    if not worker_has_module(modname, module) or _registered_by_value(module):
        return False
    try:
        return _getattribute(module, qual) is obj
    except Exception:
        return False


# ---- module attributes ------------------------------------------------------------------------

# id(object) -> (module name, attribute) for the attributes of the modules the workers have.
# Rebuilt when sys.modules grows or shrinks; every hit is checked again (ids are reused).
_module_index: dict = {}
_index_state = [-1]

# Values that are data rather than objects with an identity of their own: a task gets their
# content as it is in the master at its call, never the worker's (possibly older) copy.
_DATA_TYPES = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset, list, dict,
               set, bytearray, memoryview, range, slice)


def _is_data(value) -> bool:
    if isinstance(value, _DATA_TYPES):
        return True
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, (np.ndarray, np.generic))


_indexed_modules: set = set()


def _rebuild_module_index() -> None:
    """Index the modules not indexed yet (all of them after a module was removed): with numpy,
    dask and matplotlib loaded, 850 modules take ~35 ms, so a module imported later costs only
    its own attributes."""
    if len(sys.modules) < _index_state[0]:
        _module_index.clear()
        _indexed_modules.clear()
    for name, module in list(sys.modules.items()):
        if name in _indexed_modules:
            continue
        if not isinstance(module, types.ModuleType) or not worker_has_module(name, module):
            continue
        spec = getattr(module, "__spec__", None)
        if spec is not None and getattr(spec, "_initializing", False):
            continue                      # still being imported: look again next time
        _indexed_modules.add(name)
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        for attr, value in items:
            if attr.startswith("__") or isinstance(value, types.ModuleType) or _is_data(value):
                continue
            _module_index.setdefault(id(value), (name, attr))
    _index_state[0] = len(sys.modules)


def module_attribute(obj):
    """(module name, attribute) of a module the workers have that holds obj itself, or None."""
    if _index_state[0] != len(sys.modules):
        _rebuild_module_index()
    hit = _module_index.get(id(obj))
    if hit is None:
        return None
    module = sys.modules.get(hit[0])
    if module is None or vars(module).get(hit[1], _MISSING) is not obj:
        return None
    return hit


_MISSING = object()


def _module_attribute(modname: str, attr: str):
    """Unpickling side of a module attribute: the receiver's own object."""
    import importlib
    return getattr(importlib.import_module(modname), attr)


def _method_of_attribute(modname: str, attr: str, name: str):
    return getattr(_module_attribute(modname, attr), name)


def reduce_method(method):
    """(reduction or None, cacheable) for a bound method (builtin or Python): by reference when
    it, or the object it is bound to, is a module attribute (numpy.random.rand is a method of
    numpy's global RandomState: a copy of that generator is not numpy's generator); else None,
    for pickle's own (getattr, (self, name))."""
    where = module_attribute(method)
    if where is not None:
        return (_module_attribute, where), True
    owner = getattr(method, "__self__", None)
    name = getattr(method, "__name__", None)
    if owner is None or not isinstance(name, str) or isinstance(owner, types.ModuleType):
        return None, False
    where = module_attribute(owner)
    if where is not None:
        return (_method_of_attribute, (*where, name)), False
    return None, False


# ---- by value, sent once while unchanged ------------------------------------------------------

# The master and each worker name what they send by value with their own nonce: tokens never
# collide between processes (a worker's pid may be reused by the next worker).
_nonce = [None, 0]
_token_count = itertools.count()

# What this process sent by value: obj -> (fingerprint, reduction). Weak: a lambda made per call
# leaves with its last user.
_sent: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# What this process received: token -> object, the oldest dropped past _RECEIVED_MAX (a loop
# making a lambda per task would otherwise grow it without end).
_received: "collections.OrderedDict" = collections.OrderedDict()
_RECEIVED_MAX = 4096


def _new_token():
    pid = os.getpid()
    if _nonce[0] is None or _nonce[1] != pid:
        _nonce[0] = int.from_bytes(os.urandom(8), "little")
        _nonce[1] = pid
    return (_nonce[0], next(_token_count))


def _load_by_value(token, blob):
    """Unpickling side of a by-value class or function: unpickled once per token."""
    obj = _received.get(token, _MISSING)
    if obj is _MISSING:
        obj = pickle.loads(blob)
        _received[token] = obj
        if len(_received) > _RECEIVED_MAX:
            _received.popitem(last=False)
    return obj


_code_names: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _names_of(code) -> tuple:
    """Every name code and its nested code objects load (globals among them)."""
    names = _code_names.get(code)
    if names is None:
        found = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                found.update(_names_of(const))
        names = tuple(sorted(found))
        _code_names[code] = names
    return names


def _function_parts(fn, parts: list) -> None:
    """What a by-value function is made of: its code, defaults, closure contents and the
    globals it names. Another object there (a global rebound, a method replaced) makes it
    travel again; a change inside one of them does not (like the task function itself, a
    by-value function is a snapshot of the definitions it uses)."""
    g = fn.__globals__
    parts += (fn.__code__, fn.__defaults__, fn.__kwdefaults__, fn.__dict__)
    for cell in fn.__closure__ or ():
        try:
            parts.append(cell.cell_contents)
        except ValueError:           # an empty cell
            parts.append(_MISSING)
    parts.extend(g.get(n, _MISSING) for n in _names_of(fn.__code__))


def _fingerprint(obj) -> list:
    """The objects obj is made of, compared by identity (_same); the list holds them, so an id
    cannot be reused by another object while it is remembered."""
    parts: list = []
    if isinstance(obj, types.FunctionType):
        _function_parts(obj, parts)
        return parts
    parts.extend(obj.__bases__)
    for key, value in list(vars(obj).items()):
        parts += (key, value)
        inner = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        if isinstance(inner, types.FunctionType):
            _function_parts(inner, parts)
        elif isinstance(inner, property):
            for f in (inner.fget, inner.fset, inner.fdel):
                if isinstance(f, types.FunctionType):
                    _function_parts(f, parts)
    return parts


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y or (type(x) is str and x == y) for x, y in zip(a, b))


def _describe(obj) -> str:
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", "?")
    kind = "class" if isinstance(obj, type) else "function"
    return f"{kind} {mod}.{qual}" if mod else f"{kind} {qual}"


def _why_by_value(obj) -> str:
    modname = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", "") or ""
    if "<locals>" in qual:
        return "it is defined inside a function"
    if modname == "__main__":
        return "it is defined in the script (__main__)"
    if modname in half_imported:
        return f"module {modname} was still being imported when pydron started"
    if modname not in sys.modules:
        return "its module cannot be imported by name (exec()'d or generated code)"
    return f"it is not reachable as {modname}.{qual}"


class ByValueError(pickle.PicklingError):
    """A class or function that travels by value could not be pickled: says which and why it
    travels by value."""


def better_error(first, second):
    """Of two pickling errors for one value (the C pickler's, then cloudpickle's), the one to
    report."""
    return first if isinstance(first, ByValueError) else second


def by_value(obj):
    """The reduction that sends class or function obj by value: (_load_by_value, (token,
    bytes)), pickled again only when obj changed since it was last sent. Raises
    pickle.PicklingError saying what could not be pickled and why obj travels by value."""
    try:
        fp = _fingerprint(obj)
    except Exception:
        fp = None
    try:
        entry = _sent.get(obj)
    except TypeError:                 # unhashable or not weakly referenceable: no memory of it
        entry = None
    if entry is not None and fp is not None and _same(entry[0], fp):
        return entry[1]
    try:
        blob = dumps(obj)
    except Exception as err:
        raise ByValueError(
            f"{_describe(obj)} travels by value ({_why_by_value(obj)}), and pickling it "
            f"failed: {type(err).__name__}: {err}") from err
    reduction = (_load_by_value, (_new_token(), blob))
    if fp is not None:
        try:
            _sent[obj] = (fp, reduction)
        except TypeError:
            pass
    return reduction


# ---- the codec's reducers (exec/codec.c calls these; they return (reduction, cacheable)) ------

# Classes of open files and streams seen in the objects being pickled: exec/codec.c checks the
# list after encoding a call and has the function named once (note_streams).
streams_seen: list = []


def _class_without_payload(cls):
    """For a class that is not found by its name: the reduction of one that needs no by-value
    payload (builtin types without a public name, NoneType, ...), _PICKLE for a C type (only
    pickle can say what becomes of it), or None (a Python class: by value)."""
    try:
        from cloudpickle.cloudpickle import _BUILTIN_TYPE_NAMES, _builtin_type
    except ImportError:
        _BUILTIN_TYPE_NAMES, _builtin_type = {}, None
    if cls in _BUILTIN_TYPE_NAMES:
        return _builtin_type, (_BUILTIN_TYPE_NAMES[cls],)
    for singleton in (None, Ellipsis, NotImplemented):
        if cls is type(singleton):
            return type, (singleton,)
    if not cls.__flags__ & (1 << 9):        # not a heap type
        return _PICKLE
    return None


_PICKLE = "pickle"


def reduce_class(cls):
    """(None: by reference | a reduction, cacheable) for class cls."""
    if issubclass(cls, io.IOBase):
        streams_seen.append(cls)
        return None, False
    if by_reference(cls):
        return None, True
    special = _class_without_payload(cls)
    if special is _PICKLE:
        return None, True
    if special is not None:
        return special, True
    return by_value(cls), False


def reduce_function(fn):
    if by_reference(fn):
        return None, True
    return by_value(fn), False


# ---- arrays keep their layout -----------------------------------------------------------------

class _Span:
    """Bytes [start, start + n) of an array's memory, as an array interface holding the array."""

    __slots__ = ("__array_interface__", "owner")


# A span starts at the array's first byte, and arrives where its address modulo this is the
# sender's (the arena copy keeps it, an in-band span is moved there): a worker's SIMD loops peel
# the same elements as the master's, so reductions give the same last bits.
_SPAN_ALIGN = 64


def _rebuild_array(buffer, dtype, shape, strides, offset, writeable, misalign=0):
    import numpy as np
    span = np.frombuffer(buffer, dtype=np.uint8)
    if span.__array_interface__["data"][0] % _SPAN_ALIGN != misalign:
        # In band, the bytes sit wherever the unpickler put them: small, so copied to where
        # the element alignment is the sender's again.
        room = np.empty(span.size + _SPAN_ALIGN, dtype=np.uint8)
        shift = (misalign - room.__array_interface__["data"][0]) % _SPAN_ALIGN
        aligned = room[shift:shift + span.size]
        aligned[...] = span
        buffer = aligned
    a = np.ndarray(shape, dtype=dtype, buffer=buffer, offset=offset, strides=strides)
    if not writeable:
        a.flags.writeable = False
    return a


def reduce_array(a):
    """numpy pickles a non-contiguous array as a contiguous copy (another memory layout, so
    another summation order and other last bits) and gives an out-of-band read-only array back
    writable: such arrays cross as the bytes they span, with their strides, offset, dtype and
    writeable flag. Writable contiguous arrays keep numpy's own reduction."""
    flags = a.flags
    contiguous = flags.c_contiguous or flags.f_contiguous
    if a.dtype.hasobject or (contiguous and flags.writeable) or type(a).__name__ != "ndarray":
        return a.__reduce_ex__(5)
    import numpy as np
    data = a.__array_interface__["data"][0]
    lo = hi = 0
    for n, s in zip(a.shape, a.strides):
        if n == 0:
            return a.__reduce_ex__(5)
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    start = data + lo                  # the span reads no byte outside the array's own
    span = _Span()
    span.owner = a
    span.__array_interface__ = {"data": (start, not flags.writeable),
                                "shape": (data + hi + a.itemsize - start,),
                                "typestr": "|u1", "version": 3}
    buffer = pickle.PickleBuffer(np.asarray(span))
    return _rebuild_array, (buffer, a.dtype, a.shape, a.strides, data - start, flags.writeable,
                            start % _SPAN_ALIGN)


# ---- read-only numpy.memmap arrays travel as their file -----------------------------------------

def _mapping_of(first: int, end: int):
    """(device, inode, file offset of byte `first`) of the file mapping holding bytes
    [first, end) of this process, from /proc/self/maps, or None (not one file mapping, no /proc)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            for line in maps:
                fields = line.split(None, 5)
                lo, _, hi = fields[0].partition(b"-")
                lo, hi = int(lo, 16), int(hi, 16)
                if lo <= first < hi:
                    if end > hi or int(fields[4]) == 0:
                        return None
                    major, _, minor = fields[3].partition(b":")
                    return (os.makedev(int(major, 16), int(minor, 16)), int(fields[4]),
                            int(fields[2], 16) + first - lo)
    except (OSError, ValueError, IndexError):
        return None
    return None


def reduce_memmap(a):
    """A read-only numpy.memmap (mode 'r', or a view of one) crosses as its file, the byte range
    it spans there and its layout: the worker maps the same pages of the page cache, nothing is
    copied. Nobody can write through a read-only mapping, so the task sees the array as it was at
    the call. Anything else (writable or copy-on-write modes, whose writes would reach the task or
    not as plain Python would not have it; a file replaced or deleted since it was mapped; an
    empty array) crosses as a copy that keeps what the callee can see of it: type, filename,
    offset, mode, layout and writeable flag."""
    filename = getattr(a, "filename", None)
    if getattr(a, "_mmap", None) is None or filename is None or \
            getattr(a, "mode", None) != "r" or a.size == 0 or a.dtype.hasobject:
        return _copied_memmap(a)
    data = a.__array_interface__["data"][0]
    lo = hi = 0
    for n, s in zip(a.shape, a.strides):
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    span = hi - lo + a.itemsize
    mapping = _mapping_of_mmap(a._mmap)
    if mapping is None:
        return _copied_memmap(a)
    device, inode, base, base_in_file, size = mapping
    if not (base <= data + lo and data + lo + span <= base + size):
        return _copied_memmap(a)
    start = base_in_file + data + lo - base        # the first byte's offset in the file
    try:
        st = os.stat(filename)
    except OSError:
        return _copied_memmap(a)
    if (device, inode) != (st.st_dev, st.st_ino) or start + span > st.st_size:
        return _copied_memmap(a)                   # replaced, deleted or truncated since
    return _rebuild_memmap, (filename, (device, inode), start, span, -lo, a.dtype, a.shape,
                             a.strides, a.offset)


# mmap object -> (device, inode, its address, the file offset there, its length): where a
# mapping lies does not change while it lives, so /proc/self/maps is read once per mapping, not
# once per task that receives an array over it.
_mappings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _mapping_of_mmap(mm):
    known = _mappings.get(mm)
    if known is None:
        import numpy as np
        base = np.frombuffer(mm, dtype=np.uint8).__array_interface__["data"][0]
        found = _mapping_of(base, base + len(mm))
        if found is None:
            return None
        known = _mappings[mm] = (found[0], found[1], base, found[2], len(mm))
    return known


def _copied_memmap(a):
    return _rebuild_copied_memmap, (a.view(_ndarray()), getattr(a, "filename", None),
                                    getattr(a, "offset", None), getattr(a, "mode", None))


def _ndarray():
    import numpy as np
    return np.ndarray


def _rebuild_copied_memmap(array, filename, offset, mode):
    import numpy as np
    m = array.view(np.memmap)
    m.filename, m.offset, m.mode = filename, offset, mode
    return m


def _rebuild_memmap(filename, identity, start, span, at, dtype, shape, strides, offset):
    """The worker's side of reduce_memmap: the same file range, mapped read-only, as a memmap with
    the caller's layout and attributes (filename, offset, mode)."""
    import mmap
    import numpy as np
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    fd = os.open(filename, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != tuple(identity):
            raise FileNotFoundError(
                f"pydron: the file {filename!r} of a numpy.memmap argument was replaced or "
                f"deleted between the call and the task reading it")
        mm = mmap.mmap(fd, start - aligned + span, access=mmap.ACCESS_READ, offset=aligned)
    finally:
        os.close(fd)
    a = np.ndarray.__new__(np.memmap, shape, dtype=dtype, buffer=mm,
                           offset=start - aligned + at, strides=strides)
    a._mmap, a.filename, a.offset, a.mode = mm, filename, offset, "r"
    return a


# ---- the cloudpickle side ---------------------------------------------------------------------

def _rebuild_code(make, args, filename):
    return make(*args).replace(co_filename=filename)


def _reduce_code(code):
    """cloudpickle names every code object it sends '<dynamic-code>': keep the real file name,
    so a worker's traceback shows the script's file and line (and the master its source)."""
    from cloudpickle.cloudpickle import _code_reduce
    make, args = _code_reduce(code)
    return _rebuild_code, (make, args, code.co_filename)


def _reduce_memoryview(view):
    from pydron._exec_helpers import _reduce_memoryview as reduce
    return reduce(view)


_ship_pickler = None


def ship_pickler_class():
    """cloudpickle's Pickler with pydron's rules: what workers have goes by reference (module
    attributes included), code keeps its file name, arrays their layout."""
    global _ship_pickler
    if _ship_pickler is not None:
        return _ship_pickler
    import cloudpickle

    table = {types.CodeType: _reduce_code, memoryview: _reduce_memoryview}

    class ShipPickler(cloudpickle.Pickler):
        dispatch_table = collections.ChainMap(table, cloudpickle.Pickler.dispatch_table)

        def reducer_override(self, obj):
            t = type(obj)
            if t is types.FunctionType or isinstance(obj, type):
                if isinstance(obj, type) and issubclass(obj, io.IOBase):
                    streams_seen.append(obj)
                if by_reference(obj):
                    return NotImplemented
                if t is types.FunctionType:
                    return self._dynamic_function_reduce(obj)
                special = _class_without_payload(obj)
                if special is _PICKLE:
                    return NotImplemented
                if special is not None:
                    return special
                # Inline in one cloudpickle payload (cloudpickle keeps its identity across
                # payloads with its class tracker).
                from cloudpickle.cloudpickle import _dynamic_class_reduce
                make, newargs, state, _, _, _ = _dynamic_class_reduce(obj)
                return _make_class, (make, newargs), state, None, None, _set_class_state
            if t is types.BuiltinFunctionType or t is types.MethodType:
                reduced, _ = reduce_method(obj)
                return NotImplemented if reduced is None else reduced
            if isinstance(obj, io.IOBase):
                streams_seen.append(t)
                return NotImplemented
            if t.__name__ == "ndarray" and t.__module__ == "numpy":
                return reduce_array(obj)
            if t is not types.ModuleType and not _is_data(obj):
                where = module_attribute(obj)
                if where is not None:
                    return _module_attribute, where
            return NotImplemented

    _ship_pickler = ShipPickler
    return ShipPickler


# Classes this process made by unpickling, and those it got back by unpickling but defined
# itself. cloudpickle maps a class sent by value back to the receiver's own class (by tracker
# id) and then sets its attributes from the payload: in the process that defined the class (the
# master, for the script's classes) that would replace its methods by copies whose globals are
# a snapshot, so a global rebound later would not be seen by them. The defining process keeps
# its class as it is; a process that got the class by value takes the sender's newer version.
_unpickled_classes: "weakref.WeakSet" = weakref.WeakSet()
_defined_here: "weakref.WeakSet" = weakref.WeakSet()


def _make_class(make, newargs):
    from cloudpickle.cloudpickle import _DYNAMIC_CLASS_TRACKER_BY_ID
    known = _DYNAMIC_CLASS_TRACKER_BY_ID.get(newargs[-2])   # the tracker id, in both forms
    cls = make(*newargs)
    if known is not None and known not in _unpickled_classes:
        _defined_here.add(cls)
    else:
        _unpickled_classes.add(cls)
    return cls


def _set_class_state(cls, state):
    if cls in _defined_here:
        return
    from cloudpickle.cloudpickle import _class_setstate
    _class_setstate(cls, state)


def dumps(obj) -> bytes:
    out = io.BytesIO()
    ship_pickler_class()(out, protocol=5).dump(obj)
    return out.getvalue()


class FastPickler(pickle.Pickler):
    """The C pickler, as a subclass so that exec/codec.c can give it a reducer_override (the
    C type has no slot for one, and its dispatch_table is never asked about classes or
    functions)."""
