"""Bytecode analysis and rewrite of scheduled code objects.

DESIGN.md, "Where results are waited for", is the specification.

`rewrite(code, rt)` returns a copy of `code` in which every call site goes through `rt.call` /
`rt.call_ex`, every consuming instruction first forces the operands that may be pending, and every
user try/with region is awaited before it is left. The PyPI package `bytecode` does the assembly.

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

Values are tracked by the analysis with a level: 0 no pending anywhere inside (until something
that may run rewritten code, e.g. a call or a loop step, could move one into it), 1 not pending
itself, 2 maybe pending. Only operands whose level requires it are forced; a forced local is
written back, so it is forced once. Exact list/tuple types of locals are tracked for
concatenation, which is a move.
"""

from __future__ import annotations

import sys
import types

from bytecode import Bytecode, Instr, Label, TryBegin, TryEnd
from bytecode.concrete import _ConvertBytecodeToConcrete

__all__ = ["rewrite", "is_rewritable", "is_rewritten", "forget", "RewriteError"]

# ======================================================================================
# Per-version opcode tables: everything that differs between 3.11, 3.12 and 3.13 is here.
# ======================================================================================

PY = sys.version_info[:2]
if PY < (3, 11) or PY > (3, 13):
    raise ImportError("pydron._rewrite supports CPython 3.11 to 3.13, not %d.%d" % PY)

#: 3.11 pairs every CALL with a PRECALL and passes keyword names through KW_NAMES.
HAS_PRECALL = PY == (3, 11)
#: 3.13: [callable, self_or_null, args]; 3.11/3.12: [null_or_callable, callable_or_self, args].
CALLABLE_FIRST = PY >= (3, 13)

CO_GENERATOR = 0x20
CO_COROUTINE = 0x80
CO_ITERABLE_COROUTINE = 0x100
CO_ASYNC_GENERATOR = 0x200
CO_OPTIMIZED = 0x01

COMPREHENSION_NAMES = frozenset({"<listcomp>", "<dictcomp>", "<setcomp>"})

# Force kinds on operands, listed from the top of the stack down: "S" shallow, "D" deep,
# "-" no force (a move). Instructions not listed here nor in NO_FORCE force every operand deep.
_CONSUME = {
    "BINARY_OP": "DD", "COMPARE_OP": "DD", "IS_OP": "SS", "CONTAINS_OP": "DD",
    "UNARY_NOT": "S", "UNARY_NEGATIVE": "D", "UNARY_INVERT": "D", "UNARY_POSITIVE": "D",
    "TO_BOOL": "S",
    "POP_JUMP_IF_FALSE": "S", "POP_JUMP_IF_TRUE": "S",
    "POP_JUMP_IF_NONE": "S", "POP_JUMP_IF_NOT_NONE": "S",
    "POP_JUMP_FORWARD_IF_FALSE": "S", "POP_JUMP_FORWARD_IF_TRUE": "S",
    "POP_JUMP_FORWARD_IF_NONE": "S", "POP_JUMP_FORWARD_IF_NOT_NONE": "S",
    "POP_JUMP_BACKWARD_IF_FALSE": "S", "POP_JUMP_BACKWARD_IF_TRUE": "S",
    "POP_JUMP_BACKWARD_IF_NONE": "S", "POP_JUMP_BACKWARD_IF_NOT_NONE": "S",
    "JUMP_IF_FALSE_OR_POP": "S", "JUMP_IF_TRUE_OR_POP": "S",
    "GET_ITER": "S", "GET_YIELD_FROM_ITER": "S", "UNPACK_SEQUENCE": "S", "UNPACK_EX": "S",
    "BINARY_SUBSCR": "DS", "BINARY_SLICE": "DDS", "STORE_SLICE": "DDSD",
    "DELETE_SUBSCR": "DS", "STORE_SUBSCR": "-S-",
    "LIST_EXTEND": "S", "SET_UPDATE": "D", "DICT_UPDATE": "S", "DICT_MERGE": "S",
    "SET_ADD": "D", "MAP_ADD": "-D", "LIST_APPEND": "-",
    "LOAD_ATTR": "S", "LOAD_METHOD": "S", "LOAD_SUPER_ATTR": "SSS",
    "STORE_ATTR": "SD", "DELETE_ATTR": "S", "STORE_GLOBAL": "D", "STORE_NAME": "D",
    "BEFORE_WITH": "S", "MATCH_CLASS": "SSS", "MATCH_MAPPING": "S", "MATCH_SEQUENCE": "S",
    "GET_LEN": "S", "MATCH_KEYS": "DS", "IMPORT_FROM": "S", "GET_AWAITABLE": "S",
    "SEND": "--", "YIELD_VALUE": "-", "RETURN_VALUE": "-",
    "FORMAT_VALUE": "DD", "FORMAT_SIMPLE": "D", "FORMAT_WITH_SPEC": "DD", "CONVERT_VALUE": "D",
}
_CONSUME_REPEAT = {"BUILD_SET": "D", "BUILD_SLICE": "D", "BUILD_STRING": "D",
                   "BUILD_MAP": "-D", "RAISE_VARARGS": "S"}
NO_FORCE = frozenset("""
NOP RESUME CACHE EXTENDED_ARG PUSH_NULL POP_TOP SWAP COPY LOAD_CONST LOAD_FAST LOAD_FAST_CHECK
LOAD_FAST_AND_CLEAR LOAD_FAST_LOAD_FAST LOAD_GLOBAL LOAD_NAME LOAD_DEREF LOAD_CLASSDEREF
LOAD_CLOSURE LOAD_BUILD_CLASS LOAD_ASSERTION_ERROR LOAD_LOCALS LOAD_FROM_DICT_OR_GLOBALS
LOAD_FROM_DICT_OR_DEREF STORE_FAST STORE_DEREF DELETE_FAST DELETE_DEREF DELETE_GLOBAL DELETE_NAME
STORE_FAST_LOAD_FAST STORE_FAST_STORE_FAST STORE_FAST_MAYBE_NULL MAKE_CELL COPY_FREE_VARS
JUMP_FORWARD JUMP_BACKWARD JUMP_BACKWARD_NO_INTERRUPT JUMP JUMP_NO_INTERRUPT RETURN_CONST
RETURN_GENERATOR PUSH_EXC_INFO POP_EXCEPT CHECK_EXC_MATCH CHECK_EG_MATCH WITH_EXCEPT_START RERAISE
PREP_RERAISE_STAR END_FOR END_SEND CLEANUP_THROW LIST_TO_TUPLE BUILD_TUPLE BUILD_LIST
BUILD_CONST_KEY_MAP MAKE_FUNCTION SET_FUNCTION_ATTRIBUTE FOR_ITER KW_NAMES PRECALL
SETUP_ANNOTATIONS EXIT_INIT_CHECK CALL CALL_KW CALL_FUNCTION_EX
""".split())

# Instructions that cannot run rewritten code, hence cannot move a pending into a container:
# values proved fully forced ("level 0") stay so across them. Everything else is a barrier.
PURE = NO_FORCE - {"CALL", "CALL_KW", "CALL_FUNCTION_EX", "FOR_ITER", "SEND",
                   "RETURN_GENERATOR"} | {
    "BINARY_OP", "COMPARE_OP", "IS_OP", "UNARY_NOT", "UNARY_NEGATIVE", "UNARY_INVERT",
    "UNARY_POSITIVE", "TO_BOOL", "BINARY_SUBSCR", "BINARY_SLICE", "GET_ITER", "LOAD_ATTR",
    "LOAD_METHOD", "STORE_ATTR", "DELETE_ATTR", "STORE_GLOBAL", "STORE_NAME", "SET_ADD",
    "MAP_ADD", "LIST_APPEND", "BUILD_SET", "BUILD_MAP", "BUILD_SLICE", "BUILD_STRING",
    "FORMAT_VALUE", "FORMAT_SIMPLE", "FORMAT_WITH_SPEC", "CONVERT_VALUE", "GET_LEN",
    "MATCH_MAPPING", "MATCH_SEQUENCE", "POP_JUMP_IF_FALSE", "POP_JUMP_IF_TRUE",
    "POP_JUMP_IF_NONE", "POP_JUMP_IF_NOT_NONE", "POP_JUMP_FORWARD_IF_FALSE",
    "POP_JUMP_FORWARD_IF_TRUE", "POP_JUMP_FORWARD_IF_NONE", "POP_JUMP_FORWARD_IF_NOT_NONE",
    "POP_JUMP_BACKWARD_IF_FALSE", "POP_JUMP_BACKWARD_IF_TRUE", "POP_JUMP_BACKWARD_IF_NONE",
    "POP_JUMP_BACKWARD_IF_NOT_NONE", "JUMP_IF_FALSE_OR_POP", "JUMP_IF_TRUE_OR_POP",
}

# Results that are plain values computed from deep-forced operands (level 0 until a barrier).
VALUE_RESULT = frozenset("""
BINARY_OP COMPARE_OP IS_OP CONTAINS_OP UNARY_NOT UNARY_NEGATIVE UNARY_INVERT UNARY_POSITIVE
TO_BOOL FORMAT_VALUE FORMAT_SIMPLE FORMAT_WITH_SPEC CONVERT_VALUE BUILD_STRING BUILD_SLICE
LOAD_CONST GET_LEN MATCH_MAPPING MATCH_SEQUENCE CHECK_EXC_MATCH
""".split())
# Results that may themselves be pending (level 2).
PENDING_RESULT = frozenset("""
BINARY_SUBSCR FOR_ITER UNPACK_SEQUENCE UNPACK_EX LOAD_DEREF LOAD_CLASSDEREF LOAD_FROM_DICT_OR_DEREF
SEND CALL CALL_KW CALL_FUNCTION_EX
""".split())
# Peeking instructions: how many of the popped operands are pushed back unchanged first.
KEEP = {"GET_LEN": 1, "MATCH_MAPPING": 1, "MATCH_SEQUENCE": 1, "MATCH_KEYS": 2,
        "CHECK_EXC_MATCH": 1, "WITH_EXCEPT_START": 4, "FOR_ITER": 1, "IMPORT_FROM": 1}

JUMP_FORWARD_OF = {  # 3.11 backward conditional jumps, retargeted to a trampoline at the end
    "POP_JUMP_BACKWARD_IF_FALSE": "POP_JUMP_FORWARD_IF_FALSE",
    "POP_JUMP_BACKWARD_IF_TRUE": "POP_JUMP_FORWARD_IF_TRUE",
    "POP_JUMP_BACKWARD_IF_NONE": "POP_JUMP_FORWARD_IF_NONE",
    "POP_JUMP_BACKWARD_IF_NOT_NONE": "POP_JUMP_FORWARD_IF_NOT_NONE",
}
# Jumps whose target cannot be moved: 3.12+ FOR_ITER skips the END_FOR (3.13: END_FOR and
# POP_TOP) at its target, so an exit edge's code goes after those instead.
NO_TRAMPOLINE = frozenset({"SEND", "END_ASYNC_FOR"} | ({"FOR_ITER"} if PY >= (3, 12) else set()))
FOR_ITER_EXIT_SKIP = ("END_FOR", "POP_TOP") if PY >= (3, 13) else ("END_FOR",)

# Callees that look at their caller's frame: called in place (never through a helper frame).
INTROSPECT_GLOBALS = frozenset({"super", "locals", "vars", "dir", "globals", "eval", "exec",
                                "breakpoint"})
INTROSPECT_ATTRS = frozenset({"_getframe", "currentframe", "_getframemodulename"})

EXTRA_STACK = 6  # the most any inserted sequence pushes above the original stack (rt.call: 3)
BINARY_ADD = 0
BINARY_INPLACE_ADD = 13
INTRINSIC_LIST_TO_TUPLE = 6
_STORES = frozenset({"STORE_FAST", "STORE_FAST_LOAD_FAST", "STORE_FAST_STORE_FAST"})
INTRINSIC_STOPITERATION_ERROR = 3
INTRINSIC_UNARY_POSITIVE = 5


def _pops(instr):
    """Number of stack items `instr` reads (pops, before pushing any back)."""
    name, arg = instr.name, instr.arg
    if name in _FIXED_POPS:
        return _FIXED_POPS[name]
    if name in ("BUILD_TUPLE", "BUILD_LIST", "BUILD_SET", "BUILD_STRING", "BUILD_SLICE",
                "RAISE_VARARGS"):
        return arg
    if name == "BUILD_MAP":
        return 2 * arg
    if name == "BUILD_CONST_KEY_MAP":
        return arg + 1
    if name == "UNPACK_SEQUENCE" or name == "UNPACK_EX":
        return 1
    if name == "CALL":
        return arg + 2
    if name == "CALL_KW":
        return arg + 3
    if name == "CALL_FUNCTION_EX":
        return 3 + (arg & 1)
    if name == "MAKE_FUNCTION":
        return 1 if PY >= (3, 13) else 1 + bin(arg & 0xF).count("1")
    if name == "FORMAT_VALUE":
        return 2 if (arg & 4) else 1
    if name == "RERAISE":
        return 1 + (1 if arg else 0)
    if name == "COPY" or name == "SWAP":
        return arg
    if name in ("LOAD_ATTR", "LOAD_METHOD"):
        return 1
    raise RewriteError("no stack table entry for %s on %d.%d" % ((name,) + PY))


_FIXED_POPS = dict.fromkeys("""
NOP RESUME CACHE EXTENDED_ARG PUSH_NULL LOAD_CONST LOAD_FAST LOAD_FAST_CHECK LOAD_FAST_AND_CLEAR
LOAD_FAST_LOAD_FAST LOAD_GLOBAL LOAD_NAME LOAD_DEREF LOAD_CLASSDEREF LOAD_CLOSURE LOAD_BUILD_CLASS
LOAD_ASSERTION_ERROR LOAD_LOCALS MAKE_CELL COPY_FREE_VARS JUMP_FORWARD JUMP_BACKWARD
JUMP_BACKWARD_NO_INTERRUPT JUMP JUMP_NO_INTERRUPT KW_NAMES PRECALL RETURN_GENERATOR RETURN_CONST
DELETE_FAST DELETE_DEREF DELETE_GLOBAL DELETE_NAME SETUP_ANNOTATIONS
""".split(), 0)
_FIXED_POPS.update(dict.fromkeys("""
POP_TOP UNARY_NOT UNARY_NEGATIVE UNARY_INVERT UNARY_POSITIVE TO_BOOL GET_ITER GET_YIELD_FROM_ITER
GET_LEN MATCH_MAPPING MATCH_SEQUENCE STORE_FAST STORE_NAME STORE_GLOBAL STORE_DEREF
STORE_FAST_LOAD_FAST STORE_FAST_MAYBE_NULL DELETE_ATTR IMPORT_FROM IMPORT_STAR LIST_APPEND SET_ADD
LIST_EXTEND SET_UPDATE DICT_UPDATE DICT_MERGE LIST_TO_TUPLE POP_JUMP_IF_FALSE POP_JUMP_IF_TRUE
POP_JUMP_IF_NONE POP_JUMP_IF_NOT_NONE POP_JUMP_FORWARD_IF_FALSE POP_JUMP_FORWARD_IF_TRUE
POP_JUMP_FORWARD_IF_NONE POP_JUMP_FORWARD_IF_NOT_NONE POP_JUMP_BACKWARD_IF_FALSE
POP_JUMP_BACKWARD_IF_TRUE POP_JUMP_BACKWARD_IF_NONE POP_JUMP_BACKWARD_IF_NOT_NONE
JUMP_IF_FALSE_OR_POP JUMP_IF_TRUE_OR_POP RETURN_VALUE YIELD_VALUE FOR_ITER PUSH_EXC_INFO
POP_EXCEPT BEFORE_WITH BEFORE_ASYNC_WITH GET_AWAITABLE GET_AITER GET_ANEXT ASYNC_GEN_WRAP
PRINT_EXPR FORMAT_SIMPLE CONVERT_VALUE CALL_INTRINSIC_1 EXIT_INIT_CHECK MAKE_FUNCTION
LOAD_FROM_DICT_OR_GLOBALS LOAD_FROM_DICT_OR_DEREF
""".split(), 1))
_FIXED_POPS.update(dict.fromkeys("""
BINARY_OP COMPARE_OP IS_OP CONTAINS_OP BINARY_SUBSCR DELETE_SUBSCR STORE_ATTR MAP_ADD MATCH_KEYS
IMPORT_NAME CHECK_EXC_MATCH CHECK_EG_MATCH SEND END_SEND PREP_RERAISE_STAR CALL_INTRINSIC_2
FORMAT_WITH_SPEC SET_FUNCTION_ATTRIBUTE STORE_FAST_STORE_FAST END_ASYNC_FOR
""".split(), 2))
_FIXED_POPS.update(dict.fromkeys("STORE_SUBSCR BINARY_SLICE MATCH_CLASS CLEANUP_THROW "
                                 "LOAD_SUPER_ATTR".split(), 3))
_FIXED_POPS.update({"STORE_SLICE": 4, "WITH_EXCEPT_START": 4, "END_FOR": 2 if PY == (3, 12) else 1})
if PY < (3, 13):
    del _FIXED_POPS["MAKE_FUNCTION"]  # 3.11/3.12: depends on its flags


class RewriteError(Exception):
    """The rewriter met code it cannot handle soundly; the caller runs the function plainly."""


# ======================================================================================
# Public API
# ======================================================================================

_cache = {}  # (code, id(rt), role) -> (rt, rewritten code)
_produced = {}  # id(rewritten code) -> rewritten code


def is_rewritable(code):
    """(True, "") if `code` can run as a top-level scheduled function, else (False, reason)."""
    if not isinstance(code, types.CodeType):
        return False, "not a code object"
    if code.co_flags & (CO_COROUTINE | CO_ITERABLE_COROUTINE):
        return False, "coroutines (async def) are not scheduled; they run plainly"
    if code.co_flags & CO_ASYNC_GENERATOR:
        return False, "async generators are not scheduled; they run plainly"
    if code.co_flags & CO_GENERATOR:
        return False, "generators are not scheduled at top level; they run plainly"
    if not code.co_flags & CO_OPTIMIZED:
        return False, "module and class bodies are not scheduled"
    return True, ""


def rewrite(code, rt, role="scheduled"):
    """Rewritten copy of `code` whose helpers are the attributes of `rt` (see module doc).

    `role` is "scheduled" for a top-level scheduled function; nested code objects get
    "comprehension", "generator" or "function" from the rewriter itself.
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
    new = _Rewriter(code, rt, role).run()
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


def nested_role(code):
    """Role of a code object found in the constants of rewritten code, or None (left as is)."""
    if not code.co_flags & CO_OPTIMIZED:
        return None  # class body: neither it nor its methods are rewritten
    if code.co_flags & (CO_COROUTINE | CO_ITERABLE_COROUTINE | CO_ASYNC_GENERATOR):
        return None
    if code.co_name in COMPREHENSION_NAMES:
        return "comprehension"
    if code.co_flags & CO_GENERATOR:
        return "generator"
    return "function"


def strip_hidden(result):
    """`locals()`/`vars()`/`dir()` seen from rewritten code: without the hidden locals."""
    if type(result) is dict:
        for k in [k for k in result if type(k) is str and k.startswith(".pydron_")]:
            del result[k]
    elif type(result) is list:
        result[:] = [k for k in result if not (type(k) is str and k.startswith(".pydron_"))]
    return result


# ======================================================================================
# Analysis
# ======================================================================================

# A stack slot is (level, origin). level: 0 = no pending anywhere inside (until a barrier),
# 1 = not pending itself, 2 = may be pending. origin: None, "NULL", "MAYBE_NULL",
# ("cleared", maybe_unbound) (3.12+ LOAD_FAST_AND_CLEAR),
# ("fast", name), ("global", name), ("attr", name), ("code", co), ("func", co), ("const", v).
_NULL = (0, "NULL")


class _Entry:
    """One exception-table entry: handler label, push_lasti, stack depth."""
    __slots__ = ("label", "lasti", "depth")

    def __init__(self, label, lasti, depth):
        self.label, self.lasti, self.depth = label, lasti, depth


class _Plan:
    __slots__ = ("forces", "action", "extra")

    def __init__(self, forces, action=None, extra=None):
        self.forces, self.action, self.extra = forces, action, extra


def _join_slot(a, b):
    if a == b:
        return a
    la, oa = a
    lb, ob = b
    if oa == ob:
        return (max(la, lb), oa)
    nullish = ("NULL", "MAYBE_NULL")
    if oa in nullish or ob in nullish:
        return (max(la, lb), "MAYBE_NULL")
    if type(oa) is tuple and type(ob) is tuple and oa[0] == ob[0] == "cleared":
        return (max(la, lb), ("cleared", max(oa[1], ob[1])))
    return (max(la, lb), None)


class _Rewriter:
    def __init__(self, code, rt, role):
        self.code, self.rt, self.role = code, rt, role
        self.enter_handler = getattr(rt, "enter_handler", None)
        self.undo = getattr(rt, "undo", None)
        self.log_store = getattr(rt, "log_store", None)
        self.restore_names = {}
        self.logged = set()
        self.handler_guard = getattr(rt, "handler_guard", None)
        self.restore = {}

    # -- decomposition ------------------------------------------------------------
    def _decompose(self):
        bc = Bytecode.from_code(self.code, conserve_exception_block_stackdepth=True)
        self.orig = bc
        instrs, entries, labels_before = [], [], []
        label_pos = {}
        entry_of_tb = {}
        cur = None
        pending_labels = []
        for item in bc:
            if isinstance(item, Instr):
                for lab in pending_labels:
                    label_pos[lab] = len(instrs)
                labels_before.append(pending_labels)
                pending_labels = []
                instrs.append(item)
                entries.append(cur)
            elif isinstance(item, Label):
                pending_labels.append(item)
            elif isinstance(item, TryBegin):
                e = entry_of_tb.get(id(item))
                if e is None:
                    e = entry_of_tb[id(item)] = _Entry(item.target, item.push_lasti,
                                                       item.stack_depth)
                cur = e
            elif isinstance(item, TryEnd):
                cur = None
            else:  # SetLineno does not occur in from_code output
                raise RewriteError("unexpected bytecode item %r" % (item,))
        for lab in pending_labels:
            label_pos[lab] = len(instrs)
        self.trailing_labels = pending_labels
        self.instrs, self.entries, self.labels_before = instrs, entries, labels_before
        self.label_pos = label_pos
        names = list(self.code.co_varnames)
        self.vindex = {n: i for i, n in enumerate(names)}
        self.nvars = len(names)

    # -- regions -------------------------------------------------------------------
    def _handler_first(self, entry):
        return self.label_pos[entry.label]

    def _is_user_handler(self, entry):
        i = self._handler_first(entry)
        return i < len(self.instrs) and self.instrs[i].name == "PUSH_EXC_INFO"

    def _chain(self, entry):
        """User regions (handler labels) enclosing code covered by `entry`, innermost first."""
        out, seen = [], set()
        while entry is not None and id(entry) not in seen:
            seen.add(id(entry))
            if self._is_user_handler(entry):
                out.append(entry.label)
            entry = self.entries[self._handler_first(entry)]
        return out

    def _regions(self):
        self.user_of = {}  # id(entry) -> tuple of region labels, innermost first
        self.marks = {}
        for e in self.entries:
            if e is not None and id(e) not in self.user_of:
                ch = tuple(self._chain(e))
                self.user_of[id(e)] = ch
                for lab in ch:
                    if lab not in self.marks:
                        self.marks[lab] = ".pydron_mark%d" % len(self.marks)

    def _U(self, i):
        """User regions enclosing instruction i, innermost first. An unconditional jump or NOP
        that no exception entry covers (the compiler leaves some loop back-edges uncovered)
        cannot raise: it belongs to the regions of where it leads, so that it is no exit."""
        ins, entries = self.instrs, self.entries
        for _ in range(8):
            e = entries[i]
            if e is not None:
                return self.user_of[id(e)]
            x = ins[i]
            if x.name == "NOP" and i + 1 < len(ins):
                i += 1
            elif x.is_uncond_jump() and x.name not in ("RETURN_VALUE", "RETURN_CONST"):
                i = self.label_pos[x.arg]
                if i >= len(ins):
                    return ()
            else:
                return ()
        return ()

    def _statement_ctx(self, region_label):
        """Entry covering the try statement of a user region (where its handler is set up)."""
        p = self.label_pos[region_label]
        e = self.entries[p]
        if e is None:
            return None
        c = self._handler_first(e)
        ins = self.instrs
        if (ins[c].name == "COPY" and ins[c].arg == 3 and c + 1 < len(ins)
                and ins[c + 1].name == "POP_EXCEPT"):
            return self.entries[c]
        return e

    # -- successors ------------------------------------------------------------------
    def _succ(self, i):
        """[(target index, jumped)] of normal control flow out of instruction i."""
        ins = self.instrs[i]
        out = []
        if ins.has_jump():
            out.append((self.label_pos[ins.arg], True))
        if not ins.is_final() and i + 1 < len(self.instrs):
            out.append((i + 1, False))
        return out

    # -- data flow -------------------------------------------------------------------
    def _initial_state(self):
        loc = [0] * self.nvars
        unbound = [1] * self.nvars
        code = self.code
        nargs = code.co_argcount + code.co_kwonlyargcount
        nargs += bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)
        for k in range(nargs):
            loc[k] = 2
            unbound[k] = 0
        if self.role == "comprehension" and self.nvars and code.co_varnames[0] == ".0":
            loc[0] = 1
        # (stack slots, level of each local, 1 if the local may be unbound, exact type of
        # each local when known: "list", "tuple" or None)
        return ((), tuple(loc), tuple(unbound), (None,) * self.nvars)

    def _plan(self, i, state):
        ins = self.instrs[i]
        name = ins.name
        stack = state[0]
        n = len(stack)
        forces = []

        def want(depth, kind):
            if depth > n:
                raise RewriteError("stack underflow at %s" % name)
            lvl, org = stack[n - depth]
            if org in ("NULL", "MAYBE_NULL"):
                return
            if (kind == "S" and lvl >= 2) or (kind == "D" and lvl >= 1):
                wb = org[1] if (type(org) is tuple and org[0] == "fast") else None
                forces.append((depth, kind, wb))

        if name in ("CALL", "CALL_KW"):
            return self._plan_call(i, ins, stack, want, forces)
        if name == "CALL_FUNCTION_EX":
            kw = ins.arg & 1
            null_d = 2 + kw if CALLABLE_FIRST else 3 + kw
            if stack[n - null_d][1] == "NULL":
                return _Plan(forces, "call_ex")
            for d in range(1, 4 + kw):
                want(d, "D")
            return _Plan(forces)
        if name == "PRECALL" or name == "KW_NAMES":
            return _Plan(forces)
        if name == "RETURN_VALUE":
            if self.role in ("function", "generator"):
                want(1, "D")
            return _Plan(forces)
        if name == "YIELD_VALUE":
            if self.role == "generator":
                want(1, "D")
            return _Plan(forces)
        if name == "STORE_SUBSCR":
            want(2, "S")
            return _Plan(forces, "store_subscr")
        if name == "BINARY_OP" and int(ins.arg) in (BINARY_ADD, BINARY_INPLACE_ADD) and n >= 2:
            left = self._slot_kind(stack[-2], state[3])
            right = self._slot_kind(stack[-1], state[3])
            if left is not None and left == right:
                return _Plan(forces, "concat", left)  # list/tuple concatenation: a move
            if left == "list" and int(ins.arg) == BINARY_INPLACE_ADD:
                want(1, "S")  # list += iterable extends the list: the items are moved
                return _Plan(forces, "concat", left)
        if name == "LOAD_METHOD" or (name == "LOAD_ATTR" and PY >= (3, 12) and ins.arg[0]):
            want(1, "S")
            return _Plan(forces, "method_load")
        if name == "LOAD_SUPER_ATTR":
            for d in (1, 2, 3):
                want(d, "S")
            return _Plan(forces, "super_method" if ins.arg[0] else None)
        if name == "CALL_INTRINSIC_1":
            if int(ins.arg) not in (INTRINSIC_LIST_TO_TUPLE, INTRINSIC_STOPITERATION_ERROR):
                want(1, "D")
            return _Plan(forces)
        if name == "CALL_INTRINSIC_2":
            if "RERAISE" not in str(ins.arg):
                want(1, "D")
                want(2, "D")
            return _Plan(forces)
        if name in NO_FORCE:
            return _Plan(forces)
        kinds = _CONSUME.get(name)
        if kinds is None and name in _CONSUME_REPEAT:
            kinds = _CONSUME_REPEAT[name] * _pops(ins)
            kinds = kinds[:_pops(ins)]
        if kinds is None:
            kinds = "D" * _pops(ins)
        for d, k in enumerate(kinds[:_pops(ins)], 1):
            if k != "-" and d <= n:
                want(d, k)
        return _Plan(forces)

    def _plan_call(self, i, ins, stack, want, forces):
        n = len(stack)
        argc = ins.arg
        kwnames = None
        extra_top = 0
        if ins.name == "CALL_KW":
            prev = self.instrs[i - 1] if i else None
            if (prev is None or prev.name != "LOAD_CONST" or self.labels_before[i]
                    or type(prev.arg) is not tuple):
                for d in range(1, argc + 4):
                    want(d, "D")
                return _Plan(forces)
            kwnames = prev.arg
            extra_top = 1
        elif HAS_PRECALL or PY == (3, 12):
            j = i - 1
            if HAS_PRECALL and j >= 0 and self.instrs[j].name == "PRECALL":
                j -= 1
            if j >= 0 and self.instrs[j].name == "KW_NAMES":
                kwnames = self.instrs[j].arg
                if type(kwnames) is int:
                    kwnames = self.code.co_consts[kwnames]
        base = extra_top + argc  # depth of the last argument is extra_top + 1
        first_d, second_d = base + 2, base + 1
        first, second = stack[n - first_d], stack[n - second_d]
        null_slot, callable_slot = (second, first) if CALLABLE_FIRST else (first, second)
        if null_slot[1] == "NULL":
            org = callable_slot[1]
            introspect = type(org) is tuple and (
                (org[0] == "global" and org[1] in INTROSPECT_GLOBALS)
                or (org[0] == "attr" and org[1] in INTROSPECT_ATTRS))
            if not introspect:
                return _Plan(forces, "call", (argc, kwnames, extra_top))
            want(first_d if CALLABLE_FIRST else second_d, "S")
            for d in range(extra_top + 1, base + 1):
                want(d, "D")
            strip = org[1] in ("locals", "vars", "dir")
            return _Plan(forces, "direct", strip)
        # method form [callable, self, args]: a comprehension/genexpr body or __exit__
        org = first[1]
        if type(org) is tuple and org[0] == "func":
            kind = "list" if org[1] is not None and org[1].co_name == "<listcomp>" else None
            return _Plan(forces, "direct_comp", kind)
        if null_slot[1] == "MAYBE_NULL":
            raise RewriteError("call site with an unknown stack layout")
        want(first_d, "S")
        for d in range(extra_top + 1, base + 2):
            want(d, "D")
        return _Plan(forces, "direct")

    def _transfer(self, i, state, plan):
        """States after instruction i: {successor index: state}."""
        ins = self.instrs[i]
        name = ins.name
        stack, loc, unb, knd = list(state[0]), list(state[1]), list(state[2]), list(state[3])
        vindex = self.vindex
        # forcing
        for depth, kind, wb in plan.forces:
            lvl = 1 if kind == "S" else 0
            stack[-depth] = (lvl, stack[-depth][1])
            if wb is not None and wb in vindex:
                loc[vindex[wb]] = lvl
                unb[vindex[wb]] = 0
        action = plan.action
        barrier = name not in PURE
        pushes = None
        results = {}
        succ = self._succ(i)
        if not succ:
            return results
        for tgt, jumped in succ:
            st = list(stack)
            lc = loc if len(succ) == 1 else list(loc)
            ub = unb if len(succ) == 1 else list(unb)
            kd = knd if len(succ) == 1 else list(knd)
            self._effect(ins, name, st, lc, ub, kd, jumped, action, plan)
            if barrier:
                st = [(1, o) if l == 0 and o not in ("NULL", "MAYBE_NULL") and not (
                    type(o) is tuple and o[0] == "const") else (l, o) for l, o in st]
                lc = [1 if v == 0 else v for v in lc]
            results[tgt] = (tuple(st), tuple(lc), tuple(ub), tuple(kd))
        return results

    def _slot_kind(self, slot, knd):
        """Exact type of a stack slot's value when the analysis knows it."""
        o = slot[1]
        if type(o) is tuple:
            if o[0] == "kind":
                return o[1]
            if o[0] == "fast":
                k = self.vindex.get(o[1])
                return None if k is None else knd[k]
            if o[0] == "const" and type(o[1]) is tuple:
                return "tuple"
        return None

    def _effect(self, ins, name, st, lc, ub, kd, jumped, action, plan):
        vindex = self.vindex

        def kill(var):
            for k, (l, o) in enumerate(st):
                if o == ("fast", var):
                    st[k] = (l, None)

        def store(var, slot, cleared=0):
            kind = self._slot_kind(slot, kd) if slot is not None else None
            kill(var)
            if var in vindex:
                k = vindex[var]
                lc[k] = slot[0] if slot is not None else 0
                ub[k] = cleared
                kd[k] = kind

        if name == "SWAP":
            a = ins.arg
            st[-1], st[-a] = st[-a], st[-1]
            return
        if name == "COPY":
            st.append(st[-ins.arg])
            return
        if name in ("LOAD_FAST", "LOAD_FAST_CHECK"):
            if type(ins.arg) is not str:  # 3.13: LOAD_CLOSURE became LOAD_FAST of the cell
                st.append((1, None))
                return
            st.append((lc[vindex[ins.arg]] if ins.arg in vindex else 2, ("fast", ins.arg)))
            return
        if name == "LOAD_FAST_AND_CLEAR":
            # 3.12+ inlined comprehension: the saved value may be NULL (unbound), and so may
            # the local be again once STORE_FAST puts it back
            k = vindex.get(ins.arg)
            st.append((lc[k] if k is not None else 2, ("cleared", ub[k] if k is not None else 1)))
            store(ins.arg, None, 1)
            return
        if name == "LOAD_FAST_LOAD_FAST":
            for v in ins.arg:
                st.append((lc[vindex[v]] if v in vindex else 2, ("fast", v)))
            return
        if name in ("STORE_FAST", "STORE_FAST_MAYBE_NULL"):
            slot = st.pop()
            o = slot[1]
            store(ins.arg, slot, o[1] if type(o) is tuple and o[0] == "cleared" else 0)
            return
        if name == "STORE_FAST_LOAD_FAST":
            a, b = ins.arg
            store(a, st.pop())
            st.append((lc[vindex[b]] if b in vindex else 2, ("fast", b)))
            return
        if name == "STORE_FAST_STORE_FAST":
            a, b = ins.arg
            store(a, st.pop())
            store(b, st.pop())
            return
        if name == "DELETE_FAST":
            store(ins.arg, None, 1)
            return
        if name == "PUSH_NULL":
            st.append(_NULL)
            return
        if name == "LOAD_CONST":
            v = ins.arg
            if isinstance(v, types.CodeType):
                st.append((0, ("code", v)))
            elif type(v) is tuple:
                st.append((0, ("const", v)))
            else:
                st.append((0, None))
            return
        if name == "LOAD_GLOBAL":
            push_null, gname = ins.arg if isinstance(ins.arg, tuple) else (False, ins.arg)
            g = (1, ("global", gname))
            if push_null:
                st.extend((g, _NULL) if CALLABLE_FIRST else (_NULL, g))
            else:
                st.append(g)
            return
        if action == "method_load" or name == "LOAD_ATTR":
            aname = ins.arg[1] if isinstance(ins.arg, tuple) else ins.arg
            st.pop()
            a = (1, ("attr", aname))
            if action == "method_load":
                st.extend((a, _NULL) if CALLABLE_FIRST else (_NULL, a))
            else:
                st.append(a)
            return
        if name == "LOAD_SUPER_ATTR":
            del st[-3:]
            a = (1, ("attr", ins.arg[2]))
            if action == "super_method":
                st.extend((a, _NULL) if CALLABLE_FIRST else (_NULL, a))
            else:
                st.append(a)
            return
        if name == "MAKE_FUNCTION":
            pops = _pops(ins)
            code_slot = st[-1]
            del st[-pops:]
            org = code_slot[1]
            st.append((1, ("func", org[1]) if type(org) is tuple and org[0] == "code" else None))
            return
        if name == "SET_FUNCTION_ATTRIBUTE":
            f = st.pop()
            st.pop()
            st.append(f)
            return
        if name == "RETURN_GENERATOR":
            st.append((1, None))
            return
        if name in ("PRECALL", "KW_NAMES"):
            return
        if action == "call" or action == "call_ex":
            del st[-_pops(ins):]
            st.append((2, None))
            return
        if action == "direct" or action == "direct_comp":
            del st[-_pops(ins):]
            st.append((1, ("kind", plan.extra) if action == "direct_comp" and plan.extra
                       else None))
            return
        if action == "concat":
            del st[-2:]
            st.append((1, ("kind", plan.extra)))
            return
        pops = _pops(ins)
        net = ins.stack_effect(jump=jumped)
        pushes = net + pops
        if pops > len(st):
            raise RewriteError("stack underflow at %s" % name)
        popped = st[len(st) - pops:] if pops else []
        if pops:
            del st[-pops:]
        keep = KEEP.get(name, 0)
        if keep and pushes >= keep:
            st.extend(popped[:keep])
            pushes -= keep
        if pushes <= 0:
            return
        if name in ("BUILD_TUPLE", "BUILD_LIST", "BUILD_SET", "BUILD_MAP",
                    "BUILD_CONST_KEY_MAP", "LIST_TO_TUPLE"):
            kind = ("list" if name == "BUILD_LIST" else
                    "tuple" if name in ("BUILD_TUPLE", "LIST_TO_TUPLE") else None)
            st.append((1, ("kind", kind) if kind else None))
            return
        if name == "CALL_INTRINSIC_1" and int(ins.arg) == INTRINSIC_LIST_TO_TUPLE:
            st.append((1, ("kind", "tuple")))  # (its operand is popped above)
            return
        if name in VALUE_RESULT:
            lvl = 0
        elif name in PENDING_RESULT:
            lvl = 2
        elif name == "FOR_ITER" and jumped:
            lvl = 0
        else:
            lvl = 1
        st.extend([(lvl, None)] * pushes)

    def _analyse(self):
        n = len(self.instrs)
        states = [None] * n
        states[0] = self._initial_state()
        plans = [None] * n
        work = [0]
        on = [False] * n
        on[0] = True
        handler_in = {}
        while work:
            i = work.pop()
            on[i] = False
            st = states[i]
            plan = self._plan(i, st)
            plans[i] = plan
            outs = self._transfer(i, st, plan)
            e = self.entries[i]
            if e is not None:
                h = self._handler_first(e)
                depth = e.depth if isinstance(e.depth, int) else 0
                hstack = [(2, None)] * depth + ([(0, None)] if e.lasti else []) + [(1, None)]
                outs.setdefault(h, None)
                hs = (tuple(hstack), st[1], st[2], st[3])
                prev = outs[h]
                outs[h] = hs if prev is None else self._join(prev, hs)
            for tgt, s in outs.items():
                old = states[tgt]
                new = s if old is None else self._join(old, s)
                if new != old:
                    states[tgt] = new
                    if not on[tgt]:
                        on[tgt] = True
                        work.append(tgt)
        self.states, self.plans = states, plans

    @staticmethod
    def _join(a, b):
        sa, la, ua, ka = a
        sb, lb, ub, kb = b
        if len(sa) != len(sb):
            raise RewriteError("inconsistent stack depths (%d vs %d)" % (len(sa), len(sb)))
        st = tuple(map(_join_slot, sa, sb)) if sa != sb else sa
        lc = tuple(map(max, la, lb)) if la != lb else la
        uc = tuple(map(max, ua, ub)) if ua != ub else ua
        kc = tuple(x if x == y else None for x, y in zip(ka, kb)) if ka != kb else ka
        return (st, lc, uc, kc)

    # -- emission ----------------------------------------------------------------------
    def _force_code(self, forces, loc):
        out = []
        for depth, kind, wb in forces:
            if depth > 1:
                out.append(Instr("SWAP", depth, location=loc))
            out += self._force_seq(kind, loc)
            if wb is not None:
                out += [Instr("COPY", 1, location=loc), Instr("STORE_FAST", wb, location=loc)]
            if depth > 1:
                out.append(Instr("SWAP", depth, location=loc))
        return out

    def _force_seq(self, kind, loc):
        return self._apply_seq(self.rt.force if kind == "S" else self.rt.force_deep, loc)

    def _apply_seq(self, fn, loc):
        """TOS -> fn(TOS), as a method-form call [fn, TOS] (same layout on 3.11-3.13)."""
        out = [Instr("LOAD_CONST", fn, location=loc), Instr("SWAP", 2, location=loc)]
        if HAS_PRECALL:
            out.append(Instr("PRECALL", 0, location=loc))
        out.append(Instr("CALL", 0, location=loc))
        return out

    def _helper_on(self, helper, arg_instrs, loc, pop=True):
        """helper(arg) for one freshly pushed argument, method-form call: [helper, arg]."""
        out = [Instr("LOAD_CONST", helper, location=loc)] + arg_instrs
        if HAS_PRECALL:
            out.append(Instr("PRECALL", 0, location=loc))
        out.append(Instr("CALL", 0, location=loc))
        if pop:
            out.append(Instr("POP_TOP", location=loc))
        return out

    def _mark_seq(self, region, loc, save=True):
        if CALLABLE_FIRST:
            out = [Instr("LOAD_CONST", self.rt.mark, location=loc),
                   Instr("PUSH_NULL", location=loc)]
        else:
            out = [Instr("PUSH_NULL", location=loc),
                   Instr("LOAD_CONST", self.rt.mark, location=loc)]
        if HAS_PRECALL:
            out.append(Instr("PRECALL", 0, location=loc))
        out.append(Instr("CALL", 0, location=loc))
        out.append(Instr("STORE_FAST", self.marks[region], location=loc))
        for var, saved in self.restore.get(region, ()) if save else ():
            out += [Instr("LOAD_FAST", var, location=loc), Instr("STORE_FAST", saved, location=loc)]
        return out

    def _since_seq(self, region, loc):
        return self._helper_on(self.rt.force_since,
                               [Instr("LOAD_FAST", self.marks[region], location=loc)], loc)

    def _before_seq(self, region, loc):
        if self.handler_guard is None:
            return self._helper_on(self.rt.force_before,
                                   [Instr("LOAD_FAST", self.marks[region], location=loc)], loc)
        # handler_guard(exc, mark): [guard, exc, mark] -> guard(exc, mark), exc left below
        out = [Instr("COPY", 1, location=loc),
               Instr("LOAD_CONST", self.handler_guard, location=loc),
               Instr("SWAP", 2, location=loc),
               Instr("LOAD_FAST", self.marks[region], location=loc)]
        if HAS_PRECALL:
            out.append(Instr("PRECALL", 1, location=loc))
        out += [Instr("CALL", 1, location=loc), Instr("POP_TOP", location=loc)]
        return out

    def _under_swaps(self, loc):
        """A call site [NULL, c, a, k, H] (3.13: [c, NULL, a, k, H]) -> [NULL, H, c, a, k]
        (3.13: [H, NULL, c, a, k]): the helper H called with c, a, k."""
        seq = (5, 3, 2) if CALLABLE_FIRST else (4, 3, 2)
        return [Instr("SWAP", k, location=loc) for k in seq]

    def _call3(self, loc):
        out = []
        if HAS_PRECALL:
            out.append(Instr("PRECALL", 3, location=loc))
        out.append(Instr("CALL", 3, location=loc))
        return out

    def _edge_code(self, src, dst):
        """Code for the normal edge src -> dst: await regions left, mark regions entered."""
        us, ud = self._U(src), self._U(dst) if dst is not None else ()
        loc = self.instrs[src].location
        out = []
        left = [r for r in us if r not in ud]
        if left:
            out += self._since_seq(left[-1], loc)
        entered = [r for r in ud if r not in us]
        for r in reversed(entered):
            out += self._mark_seq(r, self.instrs[dst].location)
        return out

    def _plan_restores(self):
        """Locals assigned inside a user region and bound at its handler: saved when the region
        is entered, given back at the handler if what they hold is a call plain Python never
        completed (`r = f(x)` where f failed leaves r as it was)."""
        if self.undo is None or self.enter_handler is None:
            return
        stores = {lab: set() for lab in self.marks}
        for i, x in enumerate(self.instrs):
            if x.name in ("STORE_FAST", "STORE_FAST_STORE_FAST", "STORE_FAST_LOAD_FAST"):
                names = x.arg if x.name == "STORE_FAST_STORE_FAST" else (
                    x.arg[:1] if x.name == "STORE_FAST_LOAD_FAST" else (x.arg,))
                for r in self._U(i):
                    stores[r].update(n for n in names if type(n) is str and n in self.vindex)
        for k, (lab, mark) in enumerate(self.marks.items()):
            st = self.states[self.label_pos[lab]]
            if st is None:
                continue
            self.restore[lab] = [(n, ".pydron_save%d_%s" % (k, n)) for n in sorted(stores[lab])
                                 if not st[2][self.vindex[n]]]
            self.restore_names[lab] = {n for n, _ in self.restore[lab]}
        if self.log_store is not None:
            self.logged = set().union(*self.restore_names.values()) if self.restore_names else set()

    def _logged_names(self, i):
        """Locals stored by instruction i whose stores are logged: restorable in an enclosing
        region, bound before the store, and the stored value may be pending."""
        if not self.logged:
            return ()
        x = self.instrs[i]
        names = x.arg if x.name == "STORE_FAST_STORE_FAST" else (
            x.arg[:1] if x.name == "STORE_FAST_LOAD_FAST" else (x.arg,))
        st = self.states[i]
        if st is None:
            return ()
        out = []
        for depth, n in enumerate(names, 1):
            k = self.vindex.get(n) if type(n) is str else None
            if (k is not None and n in self.logged and not st[2][k]
                    and st[0][-depth][0] >= 2 and any(n in self.restore_names.get(r, ())
                                                       for r in self._U(i))):
                out.append(n)
        return out

    def _logged_store(self, i, x, loc):
        """STORE_FAST x as x = log_store(value, x, "x"): the value x held before a pending is
        remembered with it, for undo at a handler."""
        logged = self._logged_names(i)
        if x.name == "STORE_FAST":
            stores, then = [x.arg], None
        elif x.name == "STORE_FAST_LOAD_FAST":
            stores, then = [x.arg[0]], x.arg[1]
        else:
            stores, then = list(x.arg), None
        out = []
        for n in stores:
            if n in logged:
                out += [Instr("LOAD_CONST", self.log_store, location=loc),
                        Instr("SWAP", 2, location=loc), Instr("LOAD_FAST", n, location=loc),
                        Instr("LOAD_CONST", n, location=loc)]
                if HAS_PRECALL:
                    out.append(Instr("PRECALL", 2, location=loc))
                out.append(Instr("CALL", 2, location=loc))
            out.append(Instr("STORE_FAST", n, location=loc))
        if then is not None:
            out.append(Instr("LOAD_FAST", then, location=loc))
        return out

    def _emit(self):
        self._plan_restores()
        rt = self.rt
        ins = self.instrs
        n = len(ins)
        items = []  # (Label) or (Instr, entry)
        trampolines = []
        drop = set()
        for i, plan in enumerate(self.plans):
            if plan is None:
                continue
            if plan.action == "call":
                j = i - 1
                while j >= 0 and ins[j].name in ("PRECALL", "KW_NAMES"):
                    drop.add(j)
                    j -= 1
                if ins[i].name == "CALL_KW":
                    drop.add(i - 1)
        handler_starts = {}
        cleanup_region = {}  # label of a user handler's cleanup handler -> the region
        for lab in self.marks:
            handler_starts[self.label_pos[lab]] = lab
            ce = self.entries[self.label_pos[lab]]
            if ce is not None:
                cleanup_region[ce.label] = lab
        moved = set()
        remark_after = {}  # index of the RESUME after a yield inside user regions -> regions
        after_exit = {}  # index of a loop's END_FOR (3.13: its POP_TOP) -> (exit code, entry)
        first_resume = next((k for k, x in enumerate(ins) if x.name == "RESUME"), None)

        for i in range(n):
            x = ins[i]
            e = self.entries[i]
            loc = x.location
            for lab in self.labels_before[i]:
                items.append(lab)
            if i in handler_starts:
                region = handler_starts[i]
                chain = list(reversed(self._chain(e))) if e is not None else []
                for r in chain + [region]:
                    ctx = self._statement_ctx(r)
                    for y in self._before_seq(r, loc):
                        items.append((y, ctx))
                if self.enter_handler is not None:
                    # the region was aborted: the first failure inside it wins over the
                    # exception that reached the handler, and later tasks are cancelled
                    seq = [Instr("LOAD_CONST", self.enter_handler, location=loc),
                           Instr("SWAP", 2, location=loc),
                           Instr("LOAD_FAST", self.marks[region], location=loc)]
                    if HAS_PRECALL:
                        seq.append(Instr("PRECALL", 1, location=loc))
                    seq.append(Instr("CALL", 1, location=loc))
                    for var, save in self.restore.get(region, ()):
                        seq += [Instr("LOAD_CONST", self.undo, location=loc),
                                Instr("LOAD_FAST", var, location=loc),
                                Instr("LOAD_FAST", save, location=loc),
                                Instr("LOAD_CONST", var, location=loc)]
                        if HAS_PRECALL:
                            seq.append(Instr("PRECALL", 2, location=loc))
                        seq += [Instr("CALL", 2, location=loc),
                                Instr("STORE_FAST", var, location=loc)]
                    for y in seq:
                        items.append((y, ctx))
            plan = self.plans[i]
            if plan is None:  # unreachable code: keep it as it is
                items.append((x, e))
                continue
            if i in drop:
                continue
            name = x.name
            out = []
            if name in ("KW_NAMES", "PRECALL") and i not in moved:
                # forces of a call must precede its KW_NAMES/PRECALL: both must stay adjacent
                # to their CALL (3.11 PRECALL specializations skip it; KW_NAMES sets state)
                c = i
                while ins[c].name in ("KW_NAMES", "PRECALL"):
                    c += 1
                if self.plans[c] is not None:
                    out += self._force_code(self.plans[c].forces, loc)
                    moved.add(c)
                moved.update(range(i, c))
            if i not in moved:
                out += self._force_code(plan.forces, loc)
            action = plan.action
            name = x.name
            U = self._U(i)
            if name in ("RETURN_VALUE", "RETURN_CONST") and U:
                out += self._since_seq(U[-1], loc)
            if name == "YIELD_VALUE" and U:
                # a generator suspended inside a try: its region's calls are settled before
                # it yields, and the calls its consumer makes meanwhile are not the region's
                # (the regions are marked again when it resumes)
                out += self._since_seq(U[-1], loc)
                j = i + 1
                while j < n and ins[j].name != "RESUME":
                    j += 1
                if j < n:
                    remark_after[j] = U
            if name == "RERAISE" and e is not None and e.label in cleanup_region:
                # leaving a handler or finally block with the exception in flight: a call
                # that failed in the block replaces it, as it would have in plain Python
                out += self._since_seq(cleanup_region[e.label], loc)
            if action == "call":
                argc, kwnames, _ = plan.extra
                out += [Instr("BUILD_TUPLE", argc, location=loc),
                        Instr("LOAD_CONST", kwnames, location=loc),
                        Instr("LOAD_CONST", rt.call, location=loc)]
                out += self._under_swaps(loc) + self._call3(loc)
            elif action == "call_ex":
                if not x.arg & 1:
                    out.append(Instr("LOAD_CONST", None, location=loc))
                out.append(Instr("LOAD_CONST", rt.call_ex, location=loc))
                out += self._under_swaps(loc) + self._call3(loc)
            elif action == "store_subscr":
                out.append(Instr("LOAD_CONST", rt.store_subscr, location=loc))
                out += [Instr("SWAP", k, location=loc) for k in (4, 3, 2)]
                if HAS_PRECALL:
                    out.append(Instr("PRECALL", 2, location=loc))
                out += [Instr("CALL", 2, location=loc), Instr("POP_TOP", location=loc)]
            elif action == "method_load":
                aname = x.arg[1] if isinstance(x.arg, tuple) else x.arg
                out.append(Instr("LOAD_ATTR", (False, aname) if PY >= (3, 12) else aname,
                                 location=loc))
                out.append(Instr("PUSH_NULL", location=loc))
                if not CALLABLE_FIRST:
                    out.append(Instr("SWAP", 2, location=loc))
            elif action == "super_method":
                out.append(Instr("LOAD_SUPER_ATTR", (False,) + tuple(x.arg[1:]), location=loc))
                out.append(Instr("PUSH_NULL", location=loc))
                if not CALLABLE_FIRST:
                    out.append(Instr("SWAP", 2, location=loc))
            elif action == "direct" and plan.extra:
                out.append(x)
                out += self._apply_seq(strip_hidden, loc)
            elif name in _STORES and self._logged_names(i):
                out += self._logged_store(i, x, loc)
            elif x.has_jump():
                tgt = self.label_pos[x.arg]
                code = self._edge_code(i, tgt) if tgt < n else []
                if code and (x.is_uncond_jump()):
                    out += code
                    out.append(x)
                elif code and name == "FOR_ITER" and PY >= (3, 12):
                    k = len(FOR_ITER_EXIT_SKIP)
                    if tuple(y.name for y in ins[tgt:tgt + k]) != FOR_ITER_EXIT_SKIP or any(
                            self.labels_before[j] for j in range(tgt + 1, tgt + k)):
                        raise RewriteError("unexpected loop exit layout")
                    after_exit[tgt + k - 1] = (code, e)
                    out.append(x)
                elif code:
                    if name in NO_TRAMPOLINE:
                        raise RewriteError("%s leaves a try region" % name)
                    t = Label()
                    nx = Instr(JUMP_FORWARD_OF.get(name, name), t, location=loc)
                    out.append(nx)
                    trampolines.append((t, code, e, x.arg, loc))
                else:
                    out.append(x)
            else:
                out.append(x)
            if i in remark_after:
                for r in reversed(remark_after.pop(i)):
                    out += self._mark_seq(r, loc, save=False)
            if name == "RESUME" and i == first_resume and x.arg == 0:
                for m in self.marks.values():
                    out += [Instr("LOAD_CONST", 0, location=loc),
                            Instr("STORE_FAST", m, location=loc)]
            if not x.is_final() and i + 1 < n and not x.is_uncond_jump():
                out += self._edge_code(i, i + 1)
            for y in out:
                items.append((y, e))
            if i in after_exit:
                code, src_entry = after_exit.pop(i)
                for y in code:
                    items.append((y, src_entry))
        for lab in self.trailing_labels:
            items.append(lab)
        for t, code, e, target, loc in trampolines:
            items.append(t)
            for y in code:
                items.append((y, e))
            items.append((Instr("JUMP_BACKWARD", target, location=loc), e))
        return items

    # -- recomposition ---------------------------------------------------------------------
    def _assemble(self, items):
        out = []
        cur_e, cur_tb = None, None
        tbs = {}
        for it in items:
            if isinstance(it, Label):
                out.append(it)
                continue
            instr, e = it
            if e is not cur_e:
                if cur_tb is not None:
                    out.append(TryEnd(cur_tb))
                cur_tb = None
                if e is not None:
                    cur_tb = TryBegin(e.label, e.lasti, e.depth)
                    out.append(cur_tb)
                cur_e = e
            out.append(instr)
        if cur_tb is not None:
            out.append(TryEnd(cur_tb))
        bc = Bytecode(out)
        bc._copy_attr_from(self.orig)
        # Every inserted sequence leaves the stack as it found it and goes at most
        # EXTRA_STACK items above what the original code had there, so the stack size is
        # known without bytecode's own computation (whose estimate of a handler's entry
        # depth is thrown off by the handler-entry code, which runs deeper than its entry).
        stacksize = self.code.co_stacksize + EXTRA_STACK
        conv = _ConvertBytecodeToConcrete(bc)
        for v in self.code.co_varnames:
            conv.add_varname(v)
        concrete = conv.to_concrete_bytecode(compute_exception_stack_depths=False)
        return concrete.to_code(stacksize=stacksize, compute_exception_stack_depths=False)

    def _rewrite_consts(self):
        for x in self.instrs:
            if x.name == "LOAD_CONST" and isinstance(x.arg, types.CodeType):
                role = nested_role(x.arg)
                if role is not None:
                    x.arg = rewrite(x.arg, self.rt, role)

    def run(self):
        try:
            return self._run()
        except RewriteError as e:
            c = self.code
            if " in %s " % c.co_qualname not in str(e):
                raise RewriteError("%s in %s (%s:%d)" % (e, c.co_qualname, c.co_filename,
                                                         c.co_firstlineno)) from None
            raise

    def _run(self):
        self._decompose()
        self._regions()
        self._analyse()
        self._rewrite_consts()
        items = self._emit()
        return self._assemble(items)

