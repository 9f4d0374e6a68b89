"""Bytecode analysis and rewrite of scheduled code objects.

DESIGN.md, "Where results are waited for", is the specification.

`rewrite(code, rt)` returns a copy of `code` in which every call site goes through `rt.call` /
`rt.call_ex`, every consuming instruction first forces the operands that may be pending, and every
user try/with region is awaited before it is left. The PyPI package `bytecode` does the assembly.

The package, in the order a code object goes through it:
  opcodes.py   the per-version opcode tables (3.11, 3.12, 3.13): what each instruction reads,
               forces and produces
  listing.py   the code object taken apart into instructions (and put back together): the one
               place that uses private parts of `bytecode`
  analysis.py  user try/with regions, the data flow (which values may be pending where) and a
               Plan per instruction: what to force before it, how to rewrite it
  emit.py      the rewritten instructions, one function per kind of rewrite
  __init__.py  this API: rewrite, the cache, the roles of nested code objects

Helpers, looked up once as attributes of `rt` and loaded with LOAD_CONST:
  call(callable, args, kwnames)   every call site; the last len(kwnames) args are keyword values
  call_ex(callable, args, kwargs) f(*args, **kwargs); args any iterable, kwargs a mapping or None
  force(x), force_deep(x)         shallow / deep (exact lists, tuples, dicts, in place)
  store_subscr(value, c, key)     c[key] = value
  mark(), force_since(m), force_before(m)   try/with regions (see below)
  enter_handler(exc, mark) -> exc  optional: at a user handler's entry, the exception it must
                                  see (the region's first failure), later tasks cancelled
  handler_guard(exc, mark)        optional, used instead of force_before at handler entries:
                                  re-raise exc if it is the failure of a task submitted before
                                  mark (it belongs to an outer try), then force_before(mark)
  undo(current, saved, name)      optional (needs enter_handler): a local `name` assigned in
                                  the aborted region gets back the value it held before the
                                  first call plain Python never completed (`saved`: its value
                                  when the region was entered, if nothing better is known)
  log_store(new, old, name) -> new  optional (with undo): in a region, a store of a maybe
                                  pending value into local `name` that held `old`
Region protocol: entering a user try/with region stores mark() in a hidden local (and saves the
locals the region assigns); every normal exit (fall-through, jump, return) calls force_since;
the handler's entry calls force_before(mark) for each enclosing region, outermost first, each in
the exception context of its own try statement, then enter_handler and undo.

Roles of code objects: "scheduled" (top level; its return value is not forced), "function"
(lambdas and inner functions: the return value is forced deep), "generator" (each yielded value
and the return value are forced deep), "comprehension" (3.11 list/set/dict comprehension bodies:
the result is a move). Class bodies, their methods and async code are left as they are.

"module": a script's top-level code run as scheduled code (`pydron run`, pydron/_toplevel.py).
Its names are module globals that plain functions read, so the runtime has five more helpers:
  pending_names                   the log: a dict whose keys are the logged names, truthy when
                                  not empty (tested at call sites). STORE_NAME of what may be
                                  a pending, and the object of `name.method(...)` or
                                  `name[k] = v`, log the name when the value's type is one of
  logged_types                    (a frozenset: the pending type, list, tuple, dict); the value
                                  is moved
  before_call(callable)           at a call site while names are logged: forces them in place
                                  unless the callee is functional (or a list move, len)
  flush_names()                   the same for calls made in place (locals(), __exit__, ...)
  hide_locals()                   after those and `from m import *`: the hidden locals out of
                                  the namespace (3.11 and 3.12 copy fast locals into it)
Globals may hold pendings there, so loads of globals may be pending. Names stored inside a
try region are waited for (only locals are given back when a region is aborted). Of the code
objects nested in module code only the expressions are rewritten (comprehensions and generator
expressions, with the same runtime): its functions and classes stay plain Python.
"""

from __future__ import annotations

import types

from .analysis import analyse
from .emit import EXTRA_STACK, Helpers, emit_instructions, strip_hidden
from .errors import RewriteError
from .listing import decompose
from .opcodes import (CO_ASYNC_GENERATOR, CO_COROUTINE, CO_GENERATOR, CO_ITERABLE_COROUTINE,
                      CO_OPTIMIZED, COMPREHENSION_NAMES, MODULE_EXPRESSION_NAMES)

__all__ = ["rewrite", "is_rewritable", "is_rewritten", "forget", "nested_role", "strip_hidden",
           "RewriteError"]

_cache = {}  # (code, id(rt), role) -> (rt, rewritten code)
_produced = {}  # id(rewritten code) -> rewritten code


def is_rewritable(code):
    """(True, "") if `code` can run as a top-level scheduled function, else (False, reason).
    The reason says what the code is; the caller says what happens to it."""
    if not isinstance(code, types.CodeType):
        return False, "not a code object"
    if code.co_flags & (CO_COROUTINE | CO_ITERABLE_COROUTINE):
        return False, "coroutines (async def) are not scheduled"
    if code.co_flags & CO_ASYNC_GENERATOR:
        return False, "async generators are not scheduled"
    if code.co_flags & CO_GENERATOR:
        return False, "generators are not scheduled at top level"
    if not code.co_flags & CO_OPTIMIZED:
        return False, "module and class bodies are not scheduled"
    return True, ""


def rewrite(code, rt, role="scheduled"):
    """Rewritten copy of `code` whose helpers are the attributes of `rt` (see module doc).

    `role` is "scheduled" for a top-level scheduled function, "module" for a module's code
    (with a module runtime); nested code objects get "comprehension", "generator" or
    "function" from the rewriter itself.
    """
    if id(code) in _produced and _produced[id(code)] is code:
        return code  # already rewritten (e.g. a closure made by rewritten code)
    key = (code, id(rt), role)
    hit = _cache.get(key)
    if hit is not None and hit[0] is rt:
        return hit[1]
    if role == "scheduled":
        ok, reason = is_rewritable(code)
        if not ok:
            raise RewriteError(reason)
    elif role == "module":
        if not isinstance(code, types.CodeType) or code.co_flags & CO_OPTIMIZED:
            raise RewriteError("not a module's code object")
        if not Helpers.of(rt).for_module:
            raise RewriteError("a module's code needs a module runtime (pending_names, ...)")
    new = translate(code, rt, role)
    _cache[key] = (rt, new)
    _produced[id(new)] = new
    return new


def is_rewritten(code):
    """True if `code` was produced by `rewrite`."""
    return _produced.get(id(code)) is code


def forget(rt):
    """Drop the cached rewrites made for runtime `rt` (their code holds `rt`'s helpers)."""
    for key in [k for k, v in _cache.items() if v[0] is rt]:
        del _produced[id(_cache.pop(key)[1])]


def nested_role(code, in_module=False):
    """Role of a code object found in the constants of rewritten code, or None (left as is).
    `in_module`: the code is a module's, or nested in one (only expressions are rewritten)."""
    if in_module and code.co_name not in MODULE_EXPRESSION_NAMES:
        return None
    if not code.co_flags & CO_OPTIMIZED:
        return None  # class body: neither it nor its methods are rewritten
    if code.co_flags & (CO_COROUTINE | CO_ITERABLE_COROUTINE | CO_ASYNC_GENERATOR):
        return None
    if code.co_name in COMPREHENSION_NAMES:
        return "comprehension"
    if code.co_flags & CO_GENERATOR:
        return "generator"
    return "function"


def translate(code, rt, role):
    """The rewrite of one code object (uncached), its nested code objects rewritten first. A
    RewriteError names the code object it happened in."""
    try:
        helpers = Helpers.of(rt)
        listing = decompose(code)
        analysis = analyse(listing, role, can_undo=helpers.undo is not None
                           and helpers.enter_handler is not None,
                           can_log_stores=helpers.log_store is not None,
                           globals_pending=helpers.for_module)
        for x in listing.instrs:
            if x.name == "LOAD_CONST" and isinstance(x.arg, types.CodeType):
                nested = nested_role(x.arg, helpers.for_module)
                if nested is not None:
                    x.arg = rewrite(x.arg, rt, nested)
        stacksize = code.co_stacksize + EXTRA_STACK
        return emit_instructions(analysis, helpers).to_code(listing, stacksize)
    except RewriteError as e:
        if " in %s " % code.co_qualname not in str(e):
            raise RewriteError("%s in %s (%s:%d)" % (e, code.co_qualname, code.co_filename,
                                                     code.co_firstlineno)) from None
        raise

