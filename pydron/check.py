"""The functional contract, checked statically: which side effects a function's bytecode shows.

A functional function runs in a worker on copies of its arguments, so whatever it changes
outside itself is lost: an Ising step that flips spins of its argument in place, a loop body
filling a global array, a task reading lines from a file it was handed. This module reads the
bytecode (CPython 3.11-3.13) and lists, with line numbers:

- writes: stores to globals (STORE_GLOBAL/DELETE_GLOBAL, i.e. `global` names), to variables
  of an enclosing function, and item stores, attribute stores, in-place operators and
  mutating calls (append, update, write, readline, ...) on its arguments, on globals or on
  what it captured from an enclosing function -- these break the contract;
- I/O: print(), open(), input() -- allowed, but they run in a worker;

including what its nested code objects (comprehensions, lambdas, inner functions) do.

How: an abstract interpretation over the control-flow graph in which each stack slot and
local holds the set of outside objects ("roots") its value may be, or be part of: parameter
`x`, global `X`, enclosing variable `y`. Indexing, attribute loads, iteration, unpacking and
view-making calls (np.asarray, .reshape, enumerate) keep the roots; other operations make
new objects. Unknown is not reported: the check finds likely breaches, it proves nothing.

Used by `@pydron.functional` (one warning per function, through the `pydron` logger) and by
`pydron check script.py`.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import opcode
import sys
import types
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("pydron")

__all__ = ["Effect", "side_effects", "warn_side_effects", "check_source", "main"]

# ---- what counts --------------------------------------------------------------------------

# Methods that change their receiver: containers, numpy arrays, files (the position moves),
# random generators (the state advances: two tasks handed one generator draw the same numbers).
CONTAINER_MUTATORS = frozenset({
    "append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse",
    "update", "setdefault", "popitem", "add", "discard", "difference_update",
    "intersection_update", "symmetric_difference_update", "appendleft", "extendleft",
    "popleft", "rotate", "fill", "put", "itemset", "resize", "partition", "setflags",
    "__setitem__", "__delitem__", "__setattr__", "__delattr__", "__iadd__", "__imul__",
})
FILE_METHODS = frozenset({
    "write", "writelines", "read", "readline", "readlines", "seek", "truncate", "flush",
    "close", "readinto", "send", "sendall", "recv",
})
RNG_METHODS = frozenset({
    "random", "normal", "uniform", "integers", "standard_normal", "choice", "shuffle",
    "permutation", "randint", "randrange", "gauss", "seed", "rand", "randn",
})
MUTATORS = CONTAINER_MUTATORS | FILE_METHODS | RNG_METHODS
# Functions that change their first argument in place.
INPLACE_FUNCTIONS = frozenset({
    "shuffle", "copyto", "put", "place", "putmask", "fill_diagonal", "heappush", "heappop",
    "heapify", "heapreplace", "heappushpop", "insort", "insort_left", "insort_right",
    "setattr", "delattr",
})
# Functions and methods whose result may be (a view of) their first argument or its items.
ALIAS_FUNCTIONS = frozenset({
    "asarray", "asanyarray", "ascontiguousarray", "asfortranarray", "atleast_1d",
    "atleast_2d", "atleast_3d", "squeeze", "ravel", "reshape", "transpose", "moveaxis",
    "swapaxes", "broadcast_to", "memoryview", "iter", "reversed", "enumerate", "zip",
    "next", "getattr",
})
VIEW_METHODS = frozenset({
    "view", "reshape", "ravel", "transpose", "swapaxes", "squeeze", "diagonal", "get",
    "setdefault", "values", "items", "keys", "__getitem__", "__iter__", "__next__",
})
IO_FUNCTIONS = frozenset({"print", "open", "input", "breakpoint"})

_OPS = opcode.opmap
_INPLACE_ARGS = frozenset(i for i, (name, _) in enumerate(getattr(opcode, "_nb_ops", ()))
                          if name.startswith("NB_INPLACE_"))
_INPLACE_SYMBOLS = {i: sym for i, (_, sym) in enumerate(getattr(opcode, "_nb_ops", ()))}
# Opcodes whose presence makes a write possible: the cheap screen before the analysis.
_WRITE_OPCODES = frozenset(_OPS[name] for name in (
    "STORE_GLOBAL", "DELETE_GLOBAL", "STORE_ATTR", "DELETE_ATTR", "STORE_SUBSCR",
    "DELETE_SUBSCR", "STORE_SLICE") if name in _OPS)
_STORE_DEREF = _OPS["STORE_DEREF"]
_BINARY_OP = _OPS.get("BINARY_OP")
_SCREEN_NAMES = MUTATORS | INPLACE_FUNCTIONS


@dataclasses.dataclass(frozen=True)
class Effect:
    """One side effect: `kind` is "global" (a global or what a global holds), "argument",
    "enclosing" (a variable of an enclosing function, or what it holds) or "io"."""
    kind: str
    target: str          # the parameter, global or enclosing variable's name ("" for io)
    action: str          # "item store `[...] = ...`", "calls `.append()`", ...
    line: int | None
    where: str           # qualname of the code object it is in (a nested one may differ)

    @property
    def breaks_contract(self) -> bool:
        return self.kind != "io"

    def describe(self) -> str:
        if self.kind == "io":
            return self.action
        if self.kind == "argument":
            return f"changes its argument `{self.target}`: {self.action}"
        if self.kind == "global":
            return f"changes global `{self.target}`: {self.action}"
        return f"changes `{self.target}` of the enclosing function: {self.action}"


# ---- the abstract values ------------------------------------------------------------------

class _Val(NamedTuple):
    roots: frozenset = frozenset()   # "param:x", "global:X", "free:y"
    name: str | None = None          # global/attribute name, to recognise print, asarray...
    var: str | None = None           # the local variable it was loaded from
    method: bool = False             # the callable slot of a method call (receiver follows)
    null: bool = False               # the NULL pushed before a plain call
    code: types.CodeType | None = None   # a code object, or a function made from one


_FRESH = _Val()
_NULL = _Val(null=True)


def _join_val(a: _Val, b: _Val) -> _Val:
    if a == b:
        return a
    return _Val(a.roots | b.roots, a.name if a.name == b.name else None,
                a.var if a.var == b.var else None, a.method and b.method, a.null and b.null,
                a.code if a.code is b.code else None)


_BLOCK_ENDS = frozenset({"RETURN_VALUE", "RETURN_CONST", "RAISE_VARARGS", "RERAISE",
                         "JUMP_FORWARD", "JUMP_BACKWARD", "JUMP_ABSOLUTE",
                         "JUMP_BACKWARD_NO_INTERRUPT", "JUMP", "JUMP_NO_INTERRUPT"})


class _State:
    __slots__ = ("locals", "stack")

    def __init__(self, locals_: dict, stack: tuple):
        self.locals = locals_
        self.stack = stack

    def join(self, other: "_State") -> "_State | None":
        """The join of self and other, or None when other adds nothing."""
        changed = False
        merged = dict(self.locals)
        for k, v in other.locals.items():
            old = merged.get(k)
            if old is None:
                merged[k] = v
                changed = True
            elif not v <= old:
                merged[k] = old | v
                changed = True
        # Valid bytecode reaches an instruction with one stack depth; should two differ
        # (an exception handler's depth is approximated), the shorter one is kept.
        a, b = self.stack, other.stack
        n = min(len(a), len(b))
        stack = list(a[len(a) - n:])
        changed = changed or len(a) != n
        for i in range(n):
            j = _join_val(stack[i], b[len(b) - n + i])
            if j != stack[i]:
                stack[i] = j
                changed = True
        return _State(merged, tuple(stack)) if changed else None


# ---- the analysis of one code object --------------------------------------------------------

class _Analysis:
    """Abstract interpretation of `code` given the roots of its parameters and free variables;
    effects are added to `effects` (keyed, so a loop revisiting an instruction adds none)."""

    def __init__(self, code: types.CodeType, params: dict[str, frozenset],
                 free: dict[str, tuple[frozenset, str | None]], effects: dict):
        import dis
        self.dis = dis
        self.code = code
        self.effects = effects
        self.free = free                       # freevar -> (roots it holds, root of the var)
        self.instrs = list(dis.get_instructions(code))
        self.index = {ins.offset: i for i, ins in enumerate(self.instrs)}
        self.plan = self._plan()
        self.calls: dict[types.CodeType, list[list[frozenset]]] = {}
        self.passed: dict[types.CodeType, frozenset] = {}
        self.ever: dict[str, frozenset] = {}   # every root a local ever held (for closures)
        init_locals = dict(params)
        for name, (roots, _) in free.items():
            init_locals[name] = roots
        for name, roots in init_locals.items():
            self.ever[name] = roots
        self.init = _State(init_locals, ())

    def _handlers(self):
        entries = getattr(self.dis.Bytecode(self.code), "exception_entries", ())
        return [(e.start, e.end, e.target, e.depth, e.lasti) for e in entries]

    def _plan(self):
        """Per instruction, what does not depend on the abstract state: (name, arg,
        stack effect falling through, jump target index, stack effect jumping, ends the
        block, [(handler index, depth, lasti)])."""
        dis = self.dis
        jumping = frozenset(dis.hasjrel) | frozenset(dis.hasjabs)
        handlers = self._handlers()
        plan = []
        for ins in self.instrs:
            name = ins.opname
            arg = ins.arg if ins.opcode >= opcode.HAVE_ARGUMENT else None
            target = net_jump = None
            try:
                if ins.opcode in jumping:
                    target = self.index.get(ins.argval)
                    net_jump = dis.stack_effect(ins.opcode, arg, jump=True)
                    net = dis.stack_effect(ins.opcode, arg, jump=False)
                else:
                    net = dis.stack_effect(ins.opcode, arg)
            except ValueError:      # an opcode without a stack effect of its own
                net, net_jump = 0, (0 if target is not None else None)
            ends = name in _BLOCK_ENDS
            catch = [(self.index.get(t), depth, lasti)
                     for start, end, t, depth, lasti in handlers if start <= ins.offset < end]
            plan.append((name, arg, net, target, net_jump, ends, catch))
        return plan

    # -- effects
    def _line(self, ins) -> int | None:
        pos = getattr(ins, "positions", None)
        if pos is not None and pos.lineno is not None:
            return pos.lineno
        return self.code.co_firstlineno

    def _effect(self, ins, roots: frozenset, action: str, global_ok: bool = True) -> None:
        for root in roots:
            kind, _, target = root.partition(":")
            kind = {"param": "argument", "global": "global", "free": "enclosing"}[kind]
            if kind == "global" and not global_ok:
                continue
            key = (self.code, ins.offset, root, action)
            if key not in self.effects:
                self.effects[key] = Effect(kind, target, action, self._line(ins),
                                           self.code.co_qualname)

    def _io(self, ins, action: str) -> None:
        key = (self.code, ins.offset, "io", action)
        if key not in self.effects:
            self.effects[key] = Effect("io", "", action, self._line(ins), self.code.co_qualname)

    # -- the fixpoint
    def run(self) -> None:
        states: dict[int, _State] = {0: self.init}
        work = [0]
        count = len(self.instrs)

        def reach(t, new):
            if t is None or t >= count:
                return
            old = states.get(t)
            if old is None:
                states[t] = new
                work.append(t)
            else:
                joined = old.join(new)
                if joined is not None:
                    states[t] = joined
                    work.append(t)

        while work:
            i = work.pop()
            state = states[i]
            name, arg, net, target, net_jump, ends, catch = self.plan[i]
            if target is not None:
                reach(target, _State(state.locals, tuple(_apply_net(list(state.stack),
                                                                    net_jump))))
            if not ends:
                stack = list(state.stack)
                local = self._transfer(self.instrs[i], name, arg, stack, state.locals, net)
                reach(i + 1, _State(local, tuple(stack)))
            # a handler may be entered from any instruction of its range
            for t, depth, lasti in catch:
                stack = state.stack[:depth]
                stack = (_FRESH,) * (depth - len(stack)) + stack + (_FRESH,) * (1 + bool(lasti))
                reach(t, _State(state.locals, stack))

    # -- one instruction's effect on the abstract state (fall-through edge)
    def _transfer(self, ins, name, arg, stack, local, net):
        def pop(n):
            if n <= 0:
                return []
            taken = stack[-n:] if len(stack) >= n else [_FRESH] * (n - len(stack)) + stack
            del stack[max(0, len(stack) - n):]
            return taken

        def push(*vals):
            stack.extend(vals)

        def load(var):
            return local.get(var, frozenset())

        def store(var, val):
            nonlocal local
            local = dict(local)
            local[var] = val.roots
            self.ever[var] = self.ever.get(var, frozenset()) | val.roots

        if name in ("LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_AND_CLEAR", "LOAD_DEREF",
                    "LOAD_CLASSDEREF", "LOAD_FROM_DICT_OR_DEREF"):
            if name == "LOAD_FROM_DICT_OR_DEREF":
                pop(1)
            push(_Val(load(ins.argval), var=ins.argval))
        elif name == "LOAD_FAST_LOAD_FAST":
            a, b = ins.argval
            push(_Val(load(a), var=a), _Val(load(b), var=b))
        elif name in ("STORE_FAST", "STORE_DEREF"):
            (v,) = pop(1)
            if name == "STORE_DEREF" and ins.argval in self.free:
                var_root = self.free[ins.argval][1]
                if var_root is not None:
                    self._effect(ins, frozenset({var_root}), "assigns it")
            store(ins.argval, v)
        elif name == "STORE_FAST_STORE_FAST":
            a, b = ins.argval
            v1, v2 = pop(2)
            store(a, v2)
            store(b, v1)
        elif name == "STORE_FAST_LOAD_FAST":
            a, b = ins.argval
            (v,) = pop(1)
            store(a, v)
            push(_Val(local.get(b, frozenset()), var=b))
        elif name in ("DELETE_FAST", "DELETE_DEREF"):
            local = dict(local)
            local[ins.argval] = frozenset()
        elif name in ("LOAD_GLOBAL", "LOAD_NAME"):
            val = _Val(frozenset({f"global:{ins.argval}"}), name=ins.argval)
            if name == "LOAD_GLOBAL" and arg is not None and arg & 1:
                if sys.version_info >= (3, 13):
                    push(val, _NULL)
                else:
                    push(_NULL, val)
            else:
                push(val)
        elif name in ("STORE_GLOBAL", "DELETE_GLOBAL"):
            pop(1 if name == "STORE_GLOBAL" else 0)
            verb = "assigns it (global statement)" if name == "STORE_GLOBAL" else "deletes it"
            self._effect(ins, frozenset({f"global:{ins.argval}"}), verb)
        elif name == "LOAD_CONST":
            c = ins.argval
            push(_Val(code=c) if isinstance(c, types.CodeType) else _FRESH)
        elif name == "LOAD_METHOD" or (name == "LOAD_ATTR" and sys.version_info >= (3, 12)
                                       and arg is not None and arg & 1):
            (obj,) = pop(1)
            push(_Val(obj.roots, name=ins.argval, method=True), obj)
        elif name == "LOAD_ATTR":
            (obj,) = pop(1)
            push(_Val(obj.roots, name=ins.argval))
        elif name in ("STORE_ATTR", "DELETE_ATTR"):
            taken = pop(2 if name == "STORE_ATTR" else 1)
            verb = "attribute store" if name == "STORE_ATTR" else "attribute delete"
            what = f"`.{ins.argval} = ...`" if name == "STORE_ATTR" else f"`del .{ins.argval}`"
            self._effect(ins, taken[-1].roots, f"{verb} {what}")
        elif name == "STORE_SUBSCR":
            _, container, _ = pop(3)
            self._effect(ins, container.roots, "item store `[...] = ...`")
        elif name == "STORE_SLICE":
            _, container, _, _ = pop(4)
            self._effect(ins, container.roots, "slice store `[a:b] = ...`")
        elif name == "DELETE_SUBSCR":
            container, _ = pop(2)
            self._effect(ins, container.roots, "item delete `del [...]`")
        elif name == "BINARY_SUBSCR":
            container, _ = pop(2)
            push(_Val(container.roots))
        elif name == "BINARY_SLICE":
            container, _, _ = pop(3)
            push(_Val(container.roots))
        elif name == "BINARY_OP":
            left, _ = pop(2)
            if arg in _INPLACE_ARGS:
                # Only on the argument itself (`config += d`): an item read from it may be
                # a number, and `s *= -1` on a number changes nothing outside.
                itself = frozenset(r for r in left.roots if left.var is not None and
                                   r in (f"param:{left.var}", f"free:{left.var}"))
                self._effect(ins, itself, f"in-place `{_INPLACE_SYMBOLS.get(arg, '')}` "
                             "(changes it if it is a list, an array or another mutable)")
                push(_Val(left.roots))    # x += y is x itself for mutable x
            else:
                push(_FRESH)
        elif name in ("GET_ITER", "GET_YIELD_FROM_ITER", "GET_AITER"):
            (it,) = pop(1)
            push(_Val(it.roots))
        elif name == "FOR_ITER":
            it = stack[-1] if stack else _FRESH
            push(_Val(it.roots))
        elif name in ("UNPACK_SEQUENCE", "UNPACK_EX"):
            (seq,) = pop(1)
            push(*[_Val(seq.roots)] * (net + 1))
        elif name == "PUSH_NULL":
            push(_NULL)
        elif name in ("CALL", "CALL_KW", "CALL_FUNCTION_EX"):
            self._call(ins, name, arg, stack, pop, push, net)
        elif name == "PRECALL" or name == "KW_NAMES":
            pass
        elif name == "MAKE_FUNCTION":
            taken = pop(1 - net)
            code = next((v.code for v in taken if v.code is not None), None)
            push(_Val(code=code))
        elif name == "SET_FUNCTION_ATTRIBUTE":
            fn, _ = pop(2)[::-1]
            push(fn)
        elif name == "COPY":
            push(stack[-arg] if len(stack) >= arg else _FRESH)
        elif name == "SWAP":
            if len(stack) >= arg:
                stack[-1], stack[-arg] = stack[-arg], stack[-1]
        elif name in ("DUP_TOP",):
            push(stack[-1] if stack else _FRESH)
        elif name in ("UNARY_NEGATIVE", "UNARY_INVERT", "UNARY_NOT", "TO_BOOL",
                      "FORMAT_SIMPLE", "CONVERT_VALUE", "GET_LEN", "CALL_INTRINSIC_1"):
            pop(1 if name != "GET_LEN" else 0)
            push(_FRESH)
        else:
            # Anything else: the stack depth moves by `net`; what it pushes is a new object.
            stack[:] = _apply_net(stack, net)
        return local

    def _call(self, ins, name, arg, stack, pop, push, net):
        # 3.11 splits a call's stack effect between PRECALL and CALL: count the operands here.
        if name == "CALL":
            taken = pop(arg + 2)
        elif name == "CALL_KW":
            taken = pop(arg + 3)
        else:
            taken = pop(1 - net)
        if name == "CALL_FUNCTION_EX":
            callee = next((v for v in taken[:2] if not v.null), _FRESH)
            receiver, args = None, [v for v in taken[2:]]
        else:
            if name == "CALL_KW":
                taken = taken[:-1]               # the tuple of keyword names
            a, b, args = taken[0], taken[1], list(taken[2:])
            receiver = None
            if a.method:
                callee, receiver = a, b
            elif a.null:
                callee = b
            elif b.null:
                callee = a
            else:                                 # 3.11 `callable, self` form
                callee, args = a, [b] + args
        result = _FRESH
        fname = callee.name
        if receiver is not None and fname is not None:
            if fname in CONTAINER_MUTATORS or fname in RNG_METHODS:
                param_or_free = frozenset(r for r in receiver.roots
                                          if not r.startswith("global:"))
                globals_ = receiver.roots - param_or_free
                self._effect(ins, param_or_free, f"calls `.{fname}()`")
                if fname in CONTAINER_MUTATORS:
                    self._effect(ins, globals_, f"calls `.{fname}()`")
            elif fname in FILE_METHODS:
                self._effect(ins, receiver.roots, f"calls `.{fname}()`", global_ok=False)
                if any(r.startswith("global:") for r in receiver.roots):
                    self._io(ins, f"calls `.{fname}()` on a global (I/O)")
            if fname in VIEW_METHODS:
                result = _Val(receiver.roots)
        if fname in INPLACE_FUNCTIONS and args and not (receiver is not None and
                                                        fname in CONTAINER_MUTATORS):
            self._effect(ins, args[0].roots, f"passes it to `{fname}()`, which changes it")
        if fname in IO_FUNCTIONS and receiver is None and \
                callee.roots == frozenset({f"global:{fname}"}):
            self._io(ins, f"calls `{fname}()` (I/O)")
        if fname in ALIAS_FUNCTIONS and args:
            roots = frozenset().union(*(v.roots for v in args)) if fname == "zip" \
                else args[0].roots
            result = _Val(roots | result.roots)
        # calls of nested functions: their parameters may be what is passed here
        if callee.code is not None:
            self.calls.setdefault(callee.code, []).append([v.roots for v in args])
        for k, v in enumerate(args):
            if v.code is not None:        # map(fn, grid): fn may see any other argument
                others = frozenset().union(*(w.roots for j, w in enumerate(args) if j != k))
                self.passed[v.code] = self.passed.get(v.code, frozenset()) | others
        push(result)


def _apply_net(stack, net):
    if net < 0:
        return stack[:max(0, len(stack) + net)]
    return stack + [_FRESH] * net


def _param_names(code: types.CodeType) -> list[str]:
    n = code.co_argcount + code.co_kwonlyargcount
    n += bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)   # *args, **kwargs
    return list(code.co_varnames[:n])


def _analyse(code, params, free, effects, depth=0):
    analysis = _Analysis(code, params, free, effects)
    analysis.run()
    if depth > 20:
        return
    for const in code.co_consts:
        if not isinstance(const, types.CodeType):
            continue
        names = _param_names(const)
        sites = analysis.calls.get(const, [])
        passed = analysis.passed.get(const, frozenset())
        nested_params = {}
        for k, pname in enumerate(names):
            roots = passed
            for site in sites:
                if k < len(site):
                    roots = roots | site[k]
            nested_params[pname] = roots
        nested_free = {}
        for var in const.co_freevars:
            outer_var_root = free[var][1] if var in free else None
            nested_free[var] = (analysis.ever.get(var, frozenset()), outer_var_root)
        _analyse(const, nested_params, nested_free, effects, depth + 1)


def side_effects(fn) -> list[Effect]:
    """The side effects the bytecode of `fn` (a function or code object) shows, its nested
    code objects included, sorted by line."""
    code = getattr(fn, "__code__", fn)
    if not isinstance(code, types.CodeType):
        raise TypeError(f"pydron.check: expected a function or code object, got "
                        f"{type(fn).__name__}")
    params = {p: frozenset({f"param:{p}"}) for p in _param_names(code)}
    free = {v: (frozenset({f"free:{v}"}), f"free:{v}") for v in code.co_freevars}
    effects: dict = {}
    _analyse(code, params, free, effects)
    found = set(effects.values())
    # `total += 1` on an enclosing variable is one effect: the assignment says it all.
    assigned = {(e.where, e.line, e.target) for e in found if e.action == "assigns it"}
    found = {e for e in found if not (e.action.startswith("in-place") and
                                      (e.where, e.line, e.target) in assigned)}
    return sorted(found, key=lambda e: (e.line or 0, e.kind, e.target, e.action))


# ---- at decoration --------------------------------------------------------------------------

def _may_write(code: types.CodeType) -> bool:
    """The cheap screen: could this bytecode (or a nested one) write anything at all?"""
    raw = code.co_code
    ops = set(raw[::2])
    if not _WRITE_OPCODES.isdisjoint(ops):
        return True
    if code.co_freevars and _STORE_DEREF in ops:     # assigns a variable of its encloser
        return True
    if _BINARY_OP is not None and any(bytes((_BINARY_OP, a)) in raw for a in _INPLACE_ARGS):
        return True
    if not _SCREEN_NAMES.isdisjoint(code.co_names):
        return True
    return any(_may_write(c) for c in code.co_consts if isinstance(c, types.CodeType))


_warned: set = set()


def _in_worker() -> bool:
    """A module a worker imports to run a task decorates its functions again: the master has
    warned (or will) already, and every worker saying it too would repeat it."""
    core = sys.modules.get("pydron._core")
    return core is not None and bool(core._exec_in_worker())


def _def_line(code: types.CodeType) -> int:
    """The line of the `def` (a decorated function's code starts at its first decorator)."""
    import linecache
    for n in range(code.co_firstlineno, code.co_firstlineno + 50):
        text = linecache.getline(code.co_filename, n).lstrip()
        if not text:
            break
        if text.startswith(("def ", "async def ")):
            return n
    return code.co_firstlineno


def warn_side_effects(fn) -> None:
    """@pydron.functional: one warning, through the `pydron` logger, when fn's bytecode shows
    writes to globals, enclosing variables, or attributes or items of its arguments."""
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType) or not _may_write(code):
        return
    key = (code.co_filename, code.co_qualname, code.co_firstlineno)
    if key in _warned or _in_worker():
        return
    try:
        found = [e for e in side_effects(code) if e.breaks_contract]
    except Exception as exc:     # an opcode this analysis does not know: say so, go on
        log.debug("pydron: side-effect check of %s skipped: %s: %s", code.co_qualname,
                  type(exc).__name__, exc)
        return
    if not found:
        return
    _warned.add(key)
    where = f"{Path(code.co_filename).name}:{_def_line(code)}"
    listed = "; ".join(f"line {e.line}: {e.describe()}" for e in found[:5])
    more = f"; and {len(found) - 5} more" if len(found) > 5 else ""
    log.warning("pydron: @functional %s (%s) is not side-effect free: %s%s. A task runs on "
                "copies of its arguments in a worker, so these changes are lost under "
                "pydron (`pydron check %s` lists them all)", code.co_qualname, where, listed,
                more, Path(code.co_filename).name)


# ---- `pydron check script.py` -------------------------------------------------------------

@dataclasses.dataclass
class FunctionReport:
    qualname: str
    line: int
    marked: str | None           # "functional", "schedule" or None
    effects: list[Effect]

    @property
    def breaks(self) -> list[Effect]:
        return [e for e in self.effects if e.breaks_contract]

    @property
    def verdict(self) -> str:
        if self.marked == "functional":
            return "BREAKS the contract" if self.breaks else "no side effect found"
        if self.marked == "schedule":
            return "scheduled (its own side effects run on the calling thread, in order)"
        if not self.effects:
            return "candidate for @functional (no side effect found)"
        return "has side effects" if self.breaks else "I/O only"


def _decorator_kind(node: ast.expr) -> str | None:
    """functional/schedule for @pydron.functional, @functional, @pydron.functional(...)."""
    if isinstance(node, ast.Call):
        node = node.func
    name = node.attr if isinstance(node, ast.Attribute) else \
        node.id if isinstance(node, ast.Name) else None
    return name if name in ("functional", "schedule") else None


def _marked_in_source(tree: ast.Module) -> dict[tuple[str, int], str]:
    """(qualname, def line) -> "functional"/"schedule" for decorated functions."""
    found = {}

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = prefix + node.name
                for dec in node.decorator_list:
                    kind = _decorator_kind(dec)
                    if kind:
                        found[(qual, node.lineno)] = kind
                visit(node.body, qual + ".<locals>.")
            elif isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    sub = getattr(node, field, None)
                    if isinstance(sub, list):
                        visit(sub, prefix)

    visit(tree.body, "")
    return found


def _def_lines(tree: ast.Module) -> dict[tuple[str, int], int]:
    """(qualname, first line of the code object) -> line of the `def`: a decorated
    function's code starts at its first decorator."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            out[(node.name, first)] = node.lineno
    return out


def _functions(code: types.CodeType):
    """Every function code object in a module's code (methods and nested ones too), in
    source order; comprehensions and lambdas are part of the function they are in."""
    for const in code.co_consts:
        if not isinstance(const, types.CodeType):
            continue
        if not const.co_name.startswith("<"):
            is_class_body = not (const.co_flags & 0x02)     # CO_NEWLOCALS: a function
            if not is_class_body:
                yield const
        yield from _functions(const)


def check_source(source: str, filename: str, named: dict[str, str] | None = None
                 ) -> list[FunctionReport]:
    """Reports for every function of a script's source. `named`: extra qualname -> kind
    (from --functional/--schedule or the config file)."""
    tree = ast.parse(source, filename)
    module = compile(tree, filename, "exec", dont_inherit=True)
    marked = _marked_in_source(tree)
    def_lines = _def_lines(tree)
    reports = []
    for code in _functions(module):
        line = def_lines.get((code.co_name, code.co_firstlineno), code.co_firstlineno)
        kind = marked.get((code.co_qualname, line))
        if named:
            kind = named.get(code.co_qualname, kind)
        reports.append(FunctionReport(code.co_qualname, line, kind, side_effects(code)))
    reports.sort(key=lambda r: r.line)
    return reports


class CheckUsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CheckUsageError(f"pydron check: {message}")


def main(argv: list[str]) -> int:
    """`pydron check script.py`: 0 when no function marked functional shows side effects,
    1 when one does, 2 on bad input."""
    p = _Parser(prog="pydron check", description="List, per function of a script, the side "
                "effects its bytecode shows: candidates for @pydron.functional, and "
                "functional functions that break the contract.")
    p.add_argument("--functional", action="append", default=[], metavar="NAME",
                   help="treat this function of the script as functional (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("script")
    try:
        ns = p.parse_args(argv)
        path = Path(ns.script)
        if not path.is_file():
            raise CheckUsageError(f"pydron check: script not found: {ns.script}")
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckUsageError(f"pydron check: cannot read {path}: {exc}") from None
        from . import config
        try:
            cfg = config.resolve({"functional": ns.functional},
                                 search_dirs=[path.resolve().parent, Path.cwd()])
        except config.ConfigError as exc:
            raise CheckUsageError(f"pydron check: {exc}") from None
        named = {}
        for kind in ("schedule", "functional"):
            for name in getattr(cfg, kind):
                head, _, rest = name.partition(".")
                named[rest if head in ("__main__", path.stem) and rest else name] = kind
        try:
            reports = check_source(source, str(path), named)
        except SyntaxError as exc:
            raise CheckUsageError(f"pydron check: {path}:{exc.lineno}: {exc.msg}") from None
    except CheckUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    broken = [r for r in reports if r.marked == "functional" and r.breaks]
    if ns.json:
        print(json.dumps({"script": str(path), "functions": [
            {"name": r.qualname, "line": r.line, "marked": r.marked, "verdict": r.verdict,
             "side_effects": [dataclasses.asdict(e) | {"breaks_contract": e.breaks_contract}
                              for e in r.effects]} for r in reports]}, indent=2))
        return 1 if broken else 0
    print(f"{path}: {len(reports)} function{'s' * (len(reports) != 1)}")
    for r in reports:
        mark = f" @{r.marked}" if r.marked else ""
        print(f"  {r.qualname} (line {r.line}){mark}: {r.verdict}")
        for e in r.effects:
            inside = f" [in {e.where}]" if e.where != r.qualname else ""
            print(f"      line {e.line}: {e.describe()}{inside}")
    candidates = [r.qualname for r in reports if r.marked is None and not r.effects]
    if candidates:
        print(f"candidates for @pydron.functional: {', '.join(candidates)}")
    if broken:
        print(f"{len(broken)} function{'s' * (len(broken) != 1)} marked functional "
              f"change{'s' * (len(broken) == 1)} what {'it is' if len(broken) == 1 else 'they are'} "
              f"given or global state: under pydron those changes are lost "
              f"({', '.join(r.qualname for r in broken)})")
    return 1 if broken else 0


_unread_warned: set = set()


def warn_result_unread(fn) -> None:
    """Called by the C core when scheduled code calls a functional function as a statement
    (its result dropped at once): the call was made for a side effect, which a functional task
    cannot have. One warning per function."""
    code = getattr(fn, "__code__", None)
    key = (code.co_filename, code.co_qualname, code.co_firstlineno) if code else repr(fn)
    if key in _unread_warned:
        return
    _unread_warned.add(key)
    name = code.co_qualname if code else getattr(fn, "__qualname__", repr(fn))
    log.warning("pydron: the result of @functional %s is never read: if it is called for a "
                "side effect (printing, writing a file, changing an argument), that effect "
                "happens in a worker process and is lost; a functional function should return "
                "what it computes", name)
