"""Per-version opcode tables: everything that differs between CPython 3.11, 3.12 and 3.13 is
here, and only here. The analysis (analysis.py) and the emission (emit.py) read these tables and
the two layout flags (HAS_PRECALL, CALLABLE_FIRST); neither tests the version itself.

What changed across the three versions, as far as the rewrite is concerned:
  3.11  PRECALL before every CALL, KW_NAMES for keyword names, LOAD_METHOD, backward conditional
        jumps (POP_JUMP_BACKWARD_IF_*), comprehensions are separate code objects.
  3.12  PRECALL and LOAD_METHOD gone (LOAD_ATTR with a method flag), LOAD_SUPER_ATTR, PEP 709
        inlined list/set/dict comprehensions (LOAD_FAST_AND_CLEAR), END_FOR pops two, FOR_ITER
        jumps past its END_FOR, CALL_INTRINSIC_1/2, RETURN_CONST.
  3.13  CALL_KW replaces KW_NAMES, the callable sits below its self-or-NULL slot, TO_BOOL before
        conditional jumps, FORMAT_SIMPLE/FORMAT_WITH_SPEC/CONVERT_VALUE, fused LOAD_FAST_LOAD_FAST
        and STORE_FAST_* instructions, SET_FUNCTION_ATTRIBUTE, END_FOR pops one then POP_TOP.
"""

from __future__ import annotations

import sys

from .errors import RewriteError

PY = sys.version_info[:2]
if PY < (3, 11) or PY > (3, 13):
    raise ImportError("pydron._rewrite supports CPython 3.11 to 3.13, not %d.%d" % PY)

#: 3.11 pairs every CALL with a PRECALL and passes keyword names through KW_NAMES.
HAS_PRECALL = PY == (3, 11)
#: 3.11 and 3.12 name a call's keywords in a KW_NAMES before it; 3.13 has CALL_KW.
HAS_KW_NAMES = PY < (3, 13)
#: 3.13: [callable, self_or_null, args]; 3.11/3.12: [null_or_callable, callable_or_self, args].
CALLABLE_FIRST = PY >= (3, 13)
#: 3.12+: LOAD_ATTR's argument is (loads a method, name); 3.11 has LOAD_METHOD instead.
LOAD_ATTR_METHOD_FLAG = PY >= (3, 12)
#: 3.12+: FOR_ITER's exit jumps past the END_FOR at its target (see FOR_ITER_EXIT_SKIP).
FOR_ITER_SKIPS_EXIT = PY >= (3, 12)
#: The jump taken when an object is false (3.11 names its direction); 3.13 wants a bool there,
#: so TO_BOOL goes before it.
JUMP_IF_FALSE = "POP_JUMP_FORWARD_IF_FALSE" if PY == (3, 11) else "POP_JUMP_IF_FALSE"
JUMP_NEEDS_BOOL = PY >= (3, 13)

CO_OPTIMIZED = 0x01
CO_VARARGS = 0x04
CO_VARKEYWORDS = 0x08
CO_GENERATOR = 0x20
CO_COROUTINE = 0x80
CO_ITERABLE_COROUTINE = 0x100
CO_ASYNC_GENERATOR = 0x200

#: 3.11 comprehension bodies (separate code objects, called in place by their function).
COMPREHENSION_NAMES = frozenset({"<listcomp>", "<dictcomp>", "<setcomp>"})
#: The code objects nested in a module's code that are rewritten with it: the expressions of
#: its statements. Its functions, lambdas and classes stay plain.
MODULE_EXPRESSION_NAMES = COMPREHENSION_NAMES | {"<genexpr>"}

#: Force kinds on operands, listed from the top of the stack down: "S" shallow, "D" deep,
#: "-" no force (a move). Instructions not listed here nor in NO_FORCE force every operand deep.
CONSUME = {
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
#: Instructions whose operands all get the same force kind, however many they pop.
CONSUME_REPEAT = {"BUILD_SET": "D", "BUILD_SLICE": "D", "BUILD_STRING": "D",
                  "BUILD_MAP": "-D", "RAISE_VARARGS": "S"}
#: Instructions that read no operand's value (they move or do not look at their operands).
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

#: Instructions that cannot run rewritten code, hence cannot move a pending into a container:
#: values proved fully forced ("level 0") stay so across them. Everything else is a barrier.
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

#: Results that are plain values computed from deep-forced operands (level 0 until a barrier).
VALUE_RESULT = frozenset("""
BINARY_OP COMPARE_OP IS_OP CONTAINS_OP UNARY_NOT UNARY_NEGATIVE UNARY_INVERT UNARY_POSITIVE
TO_BOOL FORMAT_VALUE FORMAT_SIMPLE FORMAT_WITH_SPEC CONVERT_VALUE BUILD_STRING BUILD_SLICE
LOAD_CONST GET_LEN MATCH_MAPPING MATCH_SEQUENCE CHECK_EXC_MATCH
""".split())
#: Results that may themselves be pending (level 2).
PENDING_RESULT = frozenset("""
BINARY_SUBSCR FOR_ITER UNPACK_SEQUENCE UNPACK_EX LOAD_DEREF LOAD_CLASSDEREF LOAD_FROM_DICT_OR_DEREF
SEND CALL CALL_KW CALL_FUNCTION_EX
""".split())
#: Results that are new containers: (instruction -> exact type the analysis may track, or None).
CONTAINER_RESULT = {"BUILD_TUPLE": "tuple", "BUILD_LIST": "list", "BUILD_SET": None,
                    "BUILD_MAP": None, "BUILD_CONST_KEY_MAP": None, "LIST_TO_TUPLE": "tuple"}
#: Peeking instructions: how many of the popped operands are pushed back unchanged first.
KEEP = {"GET_LEN": 1, "MATCH_MAPPING": 1, "MATCH_SEQUENCE": 1, "MATCH_KEYS": 2,
        "CHECK_EXC_MATCH": 1, "WITH_EXCEPT_START": 4, "FOR_ITER": 1, "IMPORT_FROM": 1}

#: Stores into a local (the fused forms are 3.13's).
STORES = frozenset({"STORE_FAST", "STORE_FAST_LOAD_FAST", "STORE_FAST_STORE_FAST"})
#: The two instructions that must stay adjacent to the CALL they belong to (3.11 PRECALL
#: specializations skip it; KW_NAMES sets interpreter state that CALL reads).
CALL_PREFIXES = ("KW_NAMES", "PRECALL")
RETURNS = ("RETURN_VALUE", "RETURN_CONST")

#: 3.11 backward conditional jumps, retargeted to a trampoline at the end of the code.
JUMP_FORWARD_OF = {
    "POP_JUMP_BACKWARD_IF_FALSE": "POP_JUMP_FORWARD_IF_FALSE",
    "POP_JUMP_BACKWARD_IF_TRUE": "POP_JUMP_FORWARD_IF_TRUE",
    "POP_JUMP_BACKWARD_IF_NONE": "POP_JUMP_FORWARD_IF_NONE",
    "POP_JUMP_BACKWARD_IF_NOT_NONE": "POP_JUMP_FORWARD_IF_NOT_NONE",
}
#: Jumps whose target cannot be moved: 3.12+ FOR_ITER skips the END_FOR (3.13: END_FOR and
#: POP_TOP) at its target, so an exit edge's code goes after those instead.
NO_TRAMPOLINE = frozenset({"SEND", "END_ASYNC_FOR"} | ({"FOR_ITER"} if FOR_ITER_SKIPS_EXIT
                                                         else set()))
FOR_ITER_EXIT_SKIP = ("END_FOR", "POP_TOP") if PY >= (3, 13) else ("END_FOR",)

#: Callees that look at their caller's frame: called in place (never through a helper frame).
INTROSPECT_GLOBALS = frozenset({"super", "locals", "vars", "dir", "globals", "eval", "exec",
                                "breakpoint"})
INTROSPECT_ATTRS = frozenset({"_getframe", "currentframe", "_getframemodulename"})
#: Of those, the ones whose result lists the frame's locals (the hidden ones are taken out).
LISTS_LOCALS = frozenset({"locals", "vars", "dir"})

BINARY_ADD = 0
BINARY_INPLACE_ADD = 13
INTRINSIC_STOPITERATION_ERROR = 3
INTRINSIC_LIST_TO_TUPLE = 6


def stack_pops(instr):
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
