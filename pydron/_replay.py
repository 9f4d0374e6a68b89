"""Graphs of scheduled functions, replayed without running their bytecode.

The first call of a scheduled function is traced (its rewritten bytecode runs, every call site
through the dispatcher). If its body stays within what a graph can say, it is also lifted, once,
into a small register program (the graph): moves, arithmetic, container building, subscripts,
branches, loops and calls. Later calls run that program in C (trace/replay.c) instead of the
bytecode: the same forcing rules at the same places (operators, comparisons, subscripts, truth
tests and iteration read their operands; moves do not), every call through the same dispatcher
(a functional callee becomes a task), and a comprehension whose element is one call of a
functional function becomes a map: its calls are submitted at once as a few chunk tasks
(graph/bulk.c) instead of one by one.

What a graph cannot say is refused with a reason, per line (pydron.explain shows them): printing,
stores to globals or attributes, mutation of anything but the function's own lists, unknown
callees, try/with/while, nested functions. A callee found at replay time that is neither
functional, scheduled, nor one of the pure builtins below makes the replay give up (its tasks are
cancelled: they are side-effect free) and the call runs traced, as if there were no graph.

This module also holds the pure-Python reference interpreter of the same programs, which the
tests run side by side with the C one.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import inspect
import operator
import textwrap
import types

# ---- the program -------------------------------------------------------------------------------
# Instructions are (op, a, b, c, d) tuples of ints; the numbers are shared with enum rop in
# trace/replay_internal.h (pydron._core exposes its copy as REPLAY_OPS; a test checks they agree).

OPS = [
    "ARG",          # a=dst b=k                  dst = the k-th argument
    "CONST",        # a=dst b=ci                 dst = consts[ci]
    "GLOBAL",       # a=dst b=ni                 dst = globals or builtins[names[ni]] (NameError)
    "MOVE",         # a=dst b=src
    "BINOP",        # a=dst b=x c=y d=binop      operands read (deep, but list/tuple +)
    "INPLACE",      # a=dst b=x c=y d=binop      x op= y
    "UNARY",        # a=dst b=x c=unop
    "COMPARE",      # a=dst b=x c=y d=cmpop      operands read (deep)
    "GETITEM",      # a=dst b=container c=key    container read, key read (deep)
    "GETATTR",      # a=dst b=obj c=ni           obj read
    "BUILD_LIST",   # a=dst b=first c=n          a move: items stay pending
    "BUILD_TUPLE",  # a=dst b=first c=n
    "BUILD_DICT",   # a=dst b=first c=n          n pairs: first, first+1 = key, value...; keys read
    "BUILD_SLICE",  # a=dst b=lo c=hi d=step     (-1: None)
    "APPEND",       # a=list b=value             a move into the function's own list
    "CALL",         # a=dst b=callee c=first d=n + kwnames in the next instruction's slot
    "KWNAMES",      # a=ci (a tuple of names) or -1: the keywords of the CALL before it
    "ITER",         # a=dst b=iterable           iterable read
    "FOR",          # a=dst b=iterator c=target  next item, or jump to target when exhausted
    "JUMP",         # a=target
    "IF_FALSE",     # a=cond b=target c=site     truth read (a site speculation may predict)
    "IF_TRUE",      # a=cond b=target c=site
    "UNPACK",       # a=first b=src c=n          src read; n items into first.. (ValueError)
    "RETURN",       # a=src
    "MAP",          # a=dst b=callee c=seq d=template (consts[d]: the argument sources)
    "NOT",          # a=dst b=x                  truth read
    "BAIL",         # a=ci (a str)               give up: the trace raises what plain Python does
    "STORE_ITEM",   # a=container b=key c=value  a container the call made; key read, value moved
    "BUILD_SET",    # a=dst b=first c=n          items read
    "SET_ADD",      # a=set b=value              a set the call made; value read
    "EXTEND",       # a=list b=iterable          a list the call made; iterable read, items moved
    "FORMAT",       # a=dst b=value c=conversion d=spec (-1: none)   f-string part; value read
    "BUILD_STRING", # a=dst b=first c=n          joins n strings
    "DEREF",        # a=dst b=k                  the value of the function's k-th closure cell
]
OP = {name: i for i, name in enumerate(OPS)}

BINOPS = [ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.LShift,
          ast.RShift, ast.BitOr, ast.BitXor, ast.BitAnd, ast.MatMult]
UNOPS = [ast.USub, ast.UAdd, ast.Invert]
CMPOPS = [ast.Lt, ast.LtE, ast.Eq, ast.NotEq, ast.Gt, ast.GtE, ast.Is, ast.IsNot, ast.In,
          ast.NotIn]

# Builtins a graph may call (on values: they read their arguments, as any plain callee does):
# none has a side effect or looks at anything but its arguments.
PURE_BUILTINS = ("len", "range", "enumerate", "zip", "min", "max", "abs", "sum", "int", "float",
                 "str", "bool", "tuple", "list", "dict", "sorted", "reversed", "round", "divmod",
                 "isinstance", "issubclass", "any", "all", "set", "frozenset", "type", "id",
                 "hash", "repr", "format", "chr", "ord", "bin", "hex", "oct", "pow", "complex",
                 "bytes", "slice", "callable", "getattr", "hasattr", "ascii")
# Of those and pure_callees(), the ones whose result is always a new object the call may change.
NEW_OBJECT_NAMES = ("list", "dict", "set", "sorted", "frozenset")
# Builtins that read a whole iterable at once: a generator expression handed to one of them is
# evaluated as a list comprehension (the same calls, made at once; a difference could only be
# an exception, and an exception makes the replay give up to the trace).
CONSUMERS = frozenset({"sum", "min", "max", "list", "tuple", "sorted", "set", "frozenset", "any",
                       "all", "dict"})

# Builtins that act on the world or on the caller's frame: a graph never calls them.
IMPURE_BUILTINS = frozenset({"print", "open", "input", "exec", "eval", "compile", "setattr",
                             "delattr", "globals", "locals", "vars", "next", "iter",
                             "__import__", "breakpoint", "exit", "quit", "help", "memoryview",
                             "super", "object", "map", "filter", "aiter", "anext"})

# Instructions a branch's condition may be computed with and computed again later (no call, no
# task, no store to a named local): see _condition_slices.
SLICE_OPS = frozenset({"CONST", "GLOBAL", "MOVE", "BINOP", "UNARY", "COMPARE", "GETITEM",
                       "GETATTR", "BUILD_LIST", "BUILD_TUPLE", "BUILD_SLICE", "NOT"})
JUMPS = {"JUMP": 1, "IF_FALSE": 2, "IF_TRUE": 2, "FOR": 3}     # op -> the slot of its target
SLICE_OPS = SLICE_OPS | {"FORMAT", "BUILD_STRING", "DEREF"}

# A map's template (consts[d] of MAP): (n, sources): n the number of names each element is
# unpacked into (0: the element is bound as it is), sources one per argument of the call:
# ("elem",), ("item", k), ("reg", r) or ("const", ci).


class Unsupported(Exception):
    """What a graph cannot say: the message names the construct; .line is where it is."""

    def __init__(self, message: str, node: ast.AST | None = None):
        super().__init__(message)
        self.line = getattr(node, "lineno", None)


@dataclasses.dataclass
class Program:
    name: str
    nargs: int
    nregs: int
    code: list            # [(op, a, b, c, d, line)]
    consts: list
    names: list
    sites: int            # branch sites (speculation keeps one history per site)
    maps: int             # MAP instructions
    argnames: tuple       # the parameters, for calls by keyword
    filename: str = ""

    def as_tuple(self) -> tuple:
        """The form trace/replay.c reads (and the disk cache stores)."""
        return (self.name, self.nargs, self.nregs, tuple(self.code), tuple(self.consts),
                tuple(self.names), self.sites, self.argnames, self.filename)

    def listing(self) -> str:
        """One instruction per line, for pydron.explain and for tests' failure messages."""
        out = []
        for pc, (op, a, b, c, d, line) in enumerate(self.code):
            out.append(f"{pc:4d}  line {line:<5d} {OPS[op]:<12} {a} {b} {c} {d}")
        return "\n".join(out)


# ---- lifting -------------------------------------------------------------------------------------

def source_tree(fn) -> ast.FunctionDef:
    """The function's def, parsed from its source, line numbers those of its file (Unsupported
    when there is no source)."""
    code = fn.__code__
    try:
        lines, first = inspect.getsourcelines(code)
    except (OSError, TypeError) as exc:
        raise Unsupported(f"no source to analyse ({type(exc).__name__}: {exc})") from None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    ast.increment_lineno(tree, max(first, 1) - 1)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == code.co_name:
            return node
    raise Unsupported("the function's def was not found in its source")


class _Lifter:
    def __init__(self, fn, tree: ast.FunctionDef):
        self.fn = fn
        self.tree = tree
        self.code: list = []
        self.consts: list = []
        self.names: list = []
        self.regs: dict[str, int] = {}
        self.nregs = 0
        self.sites = 0
        self.maps = 0
        self.line = tree.lineno
        self.named: set[int] = set()          # registers of named locals (not temporaries)
        self.loops: list = []                 # (continue target, [break jumps]) per open loop
        self.own_lists: set[str] = set()      # locals that only ever hold a list made here
        args = tree.args
        if args.vararg or args.kwarg or args.kwonlyargs or args.posonlyargs:
            raise Unsupported("*args, **kwargs and keyword-only or positional-only parameters",
                              tree)
        self.params = [a.arg for a in args.args]
        self.locals = self._assigned(tree) | set(self.params)
        self.freevars = list(fn.__code__.co_freevars)

    # --- registers, constants, names
    def reg(self, name: str) -> int:
        if name not in self.regs:
            self.regs[name] = self.new()
            self.named.add(self.regs[name])
        return self.regs[name]

    def new(self) -> int:
        self.nregs += 1
        return self.nregs - 1

    def const(self, value) -> int:
        for i, c in enumerate(self.consts):
            if type(c) is type(value) and c == value and (c is value or not callable(c)):
                if not (isinstance(c, float) and c != c):
                    return i
        self.consts.append(value)
        return len(self.consts) - 1

    def name(self, n: str) -> int:
        if n not in self.names:
            self.names.append(n)
        return self.names.index(n)

    def emit(self, op: str, a=0, b=0, c=0, d=0) -> int:
        self.code.append([OP[op], a, b, c, d, self.line])
        return len(self.code) - 1

    def patch(self, at: int, slot: int, value: int) -> None:
        self.code[at][slot] = value

    # --- analysis
    @staticmethod
    def _assigned(tree) -> set[str]:
        """The function's locals: names stored to outside comprehensions (whose targets have a
        scope of their own)."""
        out = set()
        stack = list(ast.iter_child_nodes(tree))
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                continue
            if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                out.add(node.id)
            stack.extend(ast.iter_child_nodes(node))
        return out

    # --- statements
    def lift(self) -> Program:
        for i, p in enumerate(self.params):
            self.emit("ARG", self.reg(p), i)
        self.block(self.tree.body)
        none = self.new()
        self.emit("CONST", none, self.const(None))
        self.emit("RETURN", none)
        self._condition_slices()
        code = [tuple(ins) for ins in self.code]
        return Program(self.fn.__qualname__, len(self.params), self.nregs, code, self.consts,
                       self.names, self.sites, self.maps, tuple(self.params),
                       self.fn.__code__.co_filename)

    def _condition_slices(self) -> None:
        """For each branch, where the straight run of pure instructions that computes its
        condition begins (its d slot): speculation may skip that run while an operand is
        pending and compute it again later to check the guess. So every register the run
        writes must be a temporary read nowhere but in the run and by the branch."""
        targets = {ins[JUMPS[OPS[ins[0]]]] for ins in self.code if OPS[ins[0]] in JUMPS}
        readers: dict[int, list[int]] = {}
        for pc, ins in enumerate(self.code):
            regs = _reads(ins, self.consts)
            if OPS[ins[0]] == "CALL":
                kw = self.code[pc + 1][1]
                regs += list(range(ins[3] + ins[4],
                                   ins[3] + ins[4] + (len(self.consts[kw]) if kw >= 0 else 0)))
            for r in regs:
                readers.setdefault(r, []).append(pc)
        for pc, ins in enumerate(self.code):
            if OPS[ins[0]] not in ("IF_FALSE", "IF_TRUE"):
                continue
            start = pc
            while start > 0 and start not in targets:
                prev = self.code[start - 1]
                dst = prev[1]
                if (OPS[prev[0]] not in SLICE_OPS or dst in self.named or
                        any(not start <= r <= pc for r in readers.get(dst, ()))):
                    break
                start -= 1
            ins[4] = start

    def block(self, body) -> None:
        for stmt in body:
            self.stmt(stmt)

    def stmt(self, s) -> None:
        self.line = s.lineno
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant):
            return                                   # a docstring
        if isinstance(s, ast.Assign):
            if len(s.targets) != 1:
                raise Unsupported("chained assignment", s)
            self.assign(s.targets[0], s.value)
        elif isinstance(s, ast.AugAssign):
            if isinstance(s.target, ast.Subscript):
                c = self.expr(s.target.value)
                k = self.slice_expr(s.target.slice)
                old = self.new()
                self.emit("GETITEM", old, c, k)
                v = self.expr(s.value)
                r = self.new()
                self.emit("INPLACE", r, old, v, BINOPS.index(type(s.op)))
                self.emit("STORE_ITEM", c, k, r)
                return
            if not isinstance(s.target, ast.Name) or s.target.id not in self.locals:
                raise Unsupported("augmented assignment to something else than a local or an "
                                  "item", s)
            r = self.reg(s.target.id)
            v = self.expr(s.value)
            self.emit("INPLACE", r, r, v, BINOPS.index(type(s.op)))
            self.own_lists.discard(s.target.id)
        elif isinstance(s, ast.Return):
            r = self.expr(s.value) if s.value is not None else self.constant(None)
            self.emit("RETURN", r)
        elif isinstance(s, ast.If):
            self.if_stmt(s)
        elif isinstance(s, ast.For):
            self.for_stmt(s)
        elif isinstance(s, ast.Expr) and self.is_append(s.value):
            lst = self.reg(s.value.func.value.id)
            v = self.expr(s.value.args[0])
            self.emit("APPEND", lst, v)
        elif isinstance(s, ast.Expr) and self.is_append(s.value, "extend"):
            lst = self.reg(s.value.func.value.id)
            v = self.expr(s.value.args[0])
            self.emit("EXTEND", lst, v)
        elif isinstance(s, ast.Expr) and self.is_append(s.value, "add"):
            st = self.reg(s.value.func.value.id)
            v = self.expr(s.value.args[0])
            self.emit("SET_ADD", st, v)
        elif isinstance(s, ast.Pass):
            pass
        elif isinstance(s, ast.While):
            self.while_stmt(s)
        elif isinstance(s, ast.Break):
            if not self.loops:
                raise Unsupported("break outside a loop", s)
            self.loops[-1][1].append(self.emit("JUMP", 0))
        elif isinstance(s, ast.Continue):
            if not self.loops:
                raise Unsupported("continue outside a loop", s)
            self.emit("JUMP", self.loops[-1][0])
        elif isinstance(s, (ast.Raise, ast.Assert)):
            if isinstance(s, ast.Assert):
                ok = self.expr(s.test)
                site = self.sites
                self.sites += 1
                j = self.emit("IF_TRUE", ok, 0, site)
                self.emit("BAIL", self.const(f"line {s.lineno}: the assertion fails"))
                self.patch(j, 2, len(self.code))
            else:
                self.emit("BAIL", self.const(f"line {s.lineno} raises"))
        else:
            what = type(s).__name__.lower()
            if isinstance(s, ast.Expr):
                what = "a call whose result is not used (made for a side effect)"
            raise Unsupported(what, s)

    def is_append(self, e, method: str = "append") -> bool:
        """x.append(v) (or x.extend, x.add) on a local: the interpreter checks at run time that
        x is a list (set) the call made itself, and gives up otherwise."""
        return (isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute) and
                e.func.attr == method and isinstance(e.func.value, ast.Name) and
                e.func.value.id in self.locals and len(e.args) == 1 and not e.keywords and
                not isinstance(e.args[0], ast.Starred))

    def assign(self, target, value) -> None:
        if isinstance(target, ast.Name):
            if target.id not in self.locals:
                raise Unsupported("a store to a global", target)
            if isinstance(value, ast.List) and not value.elts:
                self.own_lists.add(target.id)
            else:
                self.own_lists.discard(target.id)
            v = self.expr(value)
            self.emit("MOVE", self.reg(target.id), v)
        elif isinstance(target, (ast.Tuple, ast.List)):
            v = self.expr(value)
            for t in ast.walk(target):
                if isinstance(t, ast.Name):
                    self.own_lists.discard(t.id)
            self.store_target(target, v)
        elif isinstance(target, ast.Subscript):
            v = self.expr(value)
            c = self.expr(target.value)
            k = self.slice_expr(target.slice)
            self.emit("STORE_ITEM", c, k, v)
        else:
            raise Unsupported(f"a store to {type(target).__name__.lower()} "
                              "(attributes and items are changed in place)", target)

    def if_stmt(self, s) -> None:
        cond = self.expr(s.test)
        site = self.sites
        self.sites += 1
        jf = self.emit("IF_FALSE", cond, 0, site)
        self.block(s.body)
        if s.orelse:
            j = self.emit("JUMP", 0)
            self.patch(jf, 2, len(self.code))
            self.block(s.orelse)
            self.patch(j, 1, len(self.code))
        else:
            self.patch(jf, 2, len(self.code))

    def while_stmt(self, s) -> None:
        top = len(self.code)
        cond = self.expr(s.test)
        site = self.sites
        self.sites += 1
        jf = self.emit("IF_FALSE", cond, 0, site)
        self.loops.append((top, []))
        self.block(s.body)
        self.emit("JUMP", top)
        _, breaks = self.loops.pop()
        self.patch(jf, 2, len(self.code))
        self.block(s.orelse)
        for b in breaks:
            self.patch(b, 1, len(self.code))

    def for_stmt(self, s) -> None:
        if not isinstance(s.target, (ast.Name, ast.Tuple, ast.List)):
            raise Unsupported("a loop target that is not a name or names", s)
        # for x in seq: out.append(f(...)), out = [] just before: the whole loop is a map.
        body = s.body[0] if len(s.body) == 1 and not s.orelse else None
        if (isinstance(body, ast.Expr) and self.is_append(body.value)
                and body.value.func.value.id in self.own_lists
                and self.map_source(s.target, body.value.args[0]) is not None
                and self.loop_is_a_map(s, body.value.func.value.id)):
            m = self.comprehension_map(s.target, s.iter, body.value.args[0])
            out = self.reg(body.value.func.value.id)
            self.emit("MOVE", out, m)      # the map's pending list takes the empty list's place
            self.own_lists.discard(body.value.func.value.id)
            return
        seq = self.expr(s.iter)
        it = self.new()
        self.emit("ITER", it, seq)
        top = len(self.code)
        item = self.new()
        f = self.emit("FOR", item, it, 0)
        self.store_target(s.target, item)
        for t in ast.walk(s.target):
            if isinstance(t, ast.Name):
                self.own_lists.discard(t.id)
        self.loops.append((top, []))
        self.block(s.body)
        self.emit("JUMP", top)
        _, breaks = self.loops.pop()
        self.patch(f, 3, len(self.code))
        self.block(s.orelse)
        for b in breaks:
            self.patch(b, 1, len(self.code))

    def loop_is_a_map(self, loop, out: str) -> bool:
        """The loop only appends to out, which the statement right before it made empty, and
        neither out nor the loop's target is looked at anywhere else before the loop ends, nor
        the target after it (a map binds no target)."""
        body = self.tree.body
        if loop not in body:
            return False
        i = body.index(loop)
        before = body[i - 1] if i > 0 else None
        if not (isinstance(before, ast.Assign) and len(before.targets) == 1 and
                isinstance(before.targets[0], ast.Name) and before.targets[0].id == out and
                isinstance(before.value, ast.List) and not before.value.elts):
            return False
        targets = {t.id for t in ast.walk(loop.target) if isinstance(t, ast.Name)}
        for stmt in body:
            if stmt is loop or stmt is before:
                continue
            for n in ast.walk(stmt):
                if isinstance(n, ast.Name) and n.id in targets:
                    return False         # the loop variable is read or set elsewhere
                if (isinstance(n, ast.Name) and n.id == out and isinstance(n.ctx, ast.Store)):
                    return False         # out is rebound elsewhere
        return out not in targets

    def store_target(self, target, value: int) -> None:
        if isinstance(target, ast.Name):
            if target.id not in self.locals:
                raise Unsupported("a store to a global", target)
            self.emit("MOVE", self.reg(target.id), value)
            return
        if isinstance(target, ast.Subscript):
            c = self.expr(target.value)
            k = self.slice_expr(target.slice)
            self.emit("STORE_ITEM", c, k, value)
            return
        if not isinstance(target, (ast.Tuple, ast.List)) or any(
                isinstance(t, ast.Starred) for t in target.elts):
            raise Unsupported(f"a store to {type(target).__name__.lower()} (attributes are "
                              "changed in place; starred targets)", target)
        first = self.new()
        for _ in target.elts[1:]:
            self.new()
        self.emit("UNPACK", first, value, len(target.elts))
        for i, t in enumerate(target.elts):
            self.store_target(t, first + i)

    # --- expressions
    def constant(self, value) -> int:
        r = self.new()
        self.emit("CONST", r, self.const(value))
        return r

    def expr(self, e) -> int:
        if isinstance(e, ast.Constant):
            return self.constant(e.value)
        if isinstance(e, ast.Name):
            if e.id in self.locals:
                return self.reg(e.id)
            if e.id in self.freevars:
                r = self.new()
                self.emit("DEREF", r, self.freevars.index(e.id))
                return r
            if e.id in IMPURE_BUILTINS and e.id not in self.fn.__globals__:
                raise Unsupported(f"{e.id}() acts on the world or on the calling frame", e)
            r = self.new()
            self.emit("GLOBAL", r, self.name(e.id))
            return r
        if isinstance(e, ast.BinOp):
            if type(e.op) not in BINOPS:
                raise Unsupported(f"the operator {type(e.op).__name__}", e)
            x, y = self.expr(e.left), self.expr(e.right)
            r = self.new()
            self.emit("BINOP", r, x, y, BINOPS.index(type(e.op)))
            return r
        if isinstance(e, ast.UnaryOp):
            x = self.expr(e.operand)
            r = self.new()
            if isinstance(e.op, ast.Not):
                self.emit("NOT", r, x)
            else:
                self.emit("UNARY", r, x, UNOPS.index(type(e.op)))
            return r
        if isinstance(e, ast.Compare):
            # a < b < c: a < b and b < c, b computed once.
            r = self.new()
            ends = []
            left = self.expr(e.left)
            for k, (op, comp) in enumerate(zip(e.ops, e.comparators)):
                right = self.expr(comp)
                self.emit("COMPARE", r, left, right, CMPOPS.index(type(op)))
                if k < len(e.ops) - 1:
                    site = self.sites
                    self.sites += 1
                    ends.append(self.emit("IF_FALSE", r, 0, site))
                left = right
            for j in ends:
                self.patch(j, 2, len(self.code))
            return r
        if isinstance(e, ast.Slice):
            return self.slice_expr(e)
        if isinstance(e, ast.Set):
            regs = [self.expr(x) for x in e.elts]
            first = self.contiguous(regs)
            r = self.new()
            self.emit("BUILD_SET", r, first, len(regs))
            return r
        if isinstance(e, ast.JoinedStr):
            regs = [self.expr(v) for v in e.values]
            first = self.contiguous(regs)
            r = self.new()
            self.emit("BUILD_STRING", r, first, len(regs))
            return r
        if isinstance(e, ast.FormattedValue):
            v = self.expr(e.value)
            spec = self.expr(e.format_spec) if e.format_spec is not None else -1
            r = self.new()
            self.emit("FORMAT", r, v, e.conversion, spec)
            return r
        if isinstance(e, (ast.DictComp, ast.SetComp)):
            return self.comprehension(e)
        if isinstance(e, ast.BoolOp):
            # a and b / a or b: the value of the operand that decides, read for its truth.
            r = self.new()
            ends = []
            for i, v in enumerate(e.values):
                self.emit("MOVE", r, self.expr(v))
                if i < len(e.values) - 1:
                    site = self.sites
                    self.sites += 1
                    op = "IF_FALSE" if isinstance(e.op, ast.And) else "IF_TRUE"
                    ends.append(self.emit(op, r, 0, site))
            for j in ends:
                self.patch(j, 2, len(self.code))
            return r
        if isinstance(e, ast.IfExp):
            r = self.new()
            cond = self.expr(e.test)
            site = self.sites
            self.sites += 1
            jf = self.emit("IF_FALSE", cond, 0, site)
            self.emit("MOVE", r, self.expr(e.body))
            j = self.emit("JUMP", 0)
            self.patch(jf, 2, len(self.code))
            self.emit("MOVE", r, self.expr(e.orelse))
            self.patch(j, 1, len(self.code))
            return r
        if isinstance(e, ast.Subscript):
            x = self.expr(e.value)
            k = self.slice_expr(e.slice)
            r = self.new()
            self.emit("GETITEM", r, x, k)
            return r
        if isinstance(e, ast.Attribute):
            x = self.expr(e.value)
            r = self.new()
            self.emit("GETATTR", r, x, self.name(e.attr))
            return r
        if isinstance(e, (ast.List, ast.Tuple)):
            regs = [self.expr(x) for x in e.elts]
            first = self.contiguous(regs)
            r = self.new()
            self.emit("BUILD_LIST" if isinstance(e, ast.List) else "BUILD_TUPLE", r, first,
                      len(regs))
            return r
        if isinstance(e, ast.Dict):
            if any(k is None for k in e.keys):
                raise Unsupported("** in a dict display", e)
            regs = []
            for k, v in zip(e.keys, e.values):
                regs += [self.expr(k), self.expr(v)]
            first = self.contiguous(regs)
            r = self.new()
            self.emit("BUILD_DICT", r, first, len(e.keys))
            return r
        if isinstance(e, ast.Call):
            return self.call(e)
        if isinstance(e, ast.ListComp):
            return self.listcomp(e)
        raise Unsupported(type(e).__name__.lower(), e)

    def slice_expr(self, s) -> int:
        if isinstance(s, ast.Slice):
            parts = [self.expr(p) if p is not None else -1 for p in (s.lower, s.upper, s.step)]
            r = self.new()
            self.emit("BUILD_SLICE", r, *parts)
            return r
        return self.expr(s)

    def contiguous(self, regs: list[int]) -> int:
        """Copy regs into fresh consecutive registers (moves); the first one."""
        if not regs:
            return self.new()
        first = self.new()
        for _ in regs[1:]:
            self.new()
        for i, r in enumerate(regs):
            self.emit("MOVE", first + i, r)
        return first

    def call(self, e: ast.Call) -> int:
        if any(isinstance(a, ast.Starred) for a in e.args) or any(k.arg is None for k in e.keywords):
            raise Unsupported("*args or **kwargs in a call", e)
        # Methods and module functions are looked up as attributes; whether the interpreter may
        # call one (functional, scheduled, or known to change nothing) is decided when it runs.
        callee = self.expr(e.func)
        consumer = isinstance(e.func, ast.Name) and e.func.id in CONSUMERS
        regs = [self.comprehension(a) if consumer and isinstance(a, ast.GeneratorExp)
                else self.expr(a) for a in e.args] + [self.expr(k.value) for k in e.keywords]
        first = self.contiguous(regs)
        r = self.new()
        self.emit("CALL", r, callee, first, len(e.args))
        kw = tuple(k.arg for k in e.keywords)
        self.emit("KWNAMES", self.const(kw) if kw else -1)
        return r

    def map_source(self, target, elt):
        """The argument sources of elt = f(args) for a map over target, or None."""
        if not (isinstance(elt, ast.Call) and isinstance(elt.func, ast.Name) and not elt.keywords
                and not any(isinstance(a, ast.Starred) for a in elt.args)):
            return None
        names = ([target.id] if isinstance(target, ast.Name) else
                 [t.id for t in target.elts] if isinstance(target, ast.Tuple) and
                 all(isinstance(t, ast.Name) for t in target.elts) else None)
        if names is None or elt.func.id in names:
            return None
        sources = []
        for a in elt.args:
            if isinstance(a, ast.Name) and a.id in names:
                sources.append(("elem",) if isinstance(target, ast.Name)
                               else ("item", names.index(a.id)))
            elif isinstance(a, ast.Constant):
                sources.append(("const", a.value))
            elif isinstance(a, ast.Name):
                sources.append(("name", a.id))
            else:
                return None
        return sources

    def comprehension_map(self, target, iter_node, elt):
        sources = self.map_source(target, elt)
        if sources is None:
            return None
        seq = self.expr(iter_node)
        callee = self.expr(elt.func)
        template = []
        for s in sources:
            if s[0] == "name":
                template.append(("reg", self.expr(ast.Name(id=s[1], ctx=ast.Load()))))
            elif s[0] == "const":
                template.append(("const", self.const(s[1])))
            else:
                template.append(s)
        r = self.new()
        ntarget = 0 if isinstance(target, ast.Name) else len(target.elts)
        self.emit("MAP", r, callee, seq, self.const((ntarget, tuple(template))))
        self.maps += 1
        return r

    def listcomp(self, e: ast.ListComp) -> int:
        g = e.generators[0]
        if len(e.generators) == 1 and not g.ifs and not g.is_async:
            m = self.comprehension_map(g.target, g.iter, e.elt)
            if m is not None:
                return m
        return self.comprehension(e)

    def comprehension(self, e) -> int:
        """A list, set or dict comprehension (or a generator expression read at once, as a
        list) as loops in its own scope: its targets do not leak into the function's."""
        if any(g.is_async for g in e.generators):
            raise Unsupported("an async comprehension", e)
        out = self.new()
        if isinstance(e, ast.DictComp):
            self.emit("BUILD_DICT", out, 0, 0)
        elif isinstance(e, ast.SetComp):
            self.emit("BUILD_SET", out, 0, 0)
        else:
            self.emit("BUILD_LIST", out, 0, 0)
        saved_regs, saved_locals = dict(self.regs), set(self.locals)
        exits = []

        def level(k):
            g = e.generators[k]
            seq = self.expr(g.iter)          # the first iterable is the enclosing scope's
            for t in ast.walk(g.target):
                if isinstance(t, ast.Name):
                    self.regs.pop(t.id, None)
                    self.locals.add(t.id)
            it = self.new()
            self.emit("ITER", it, seq)
            top = len(self.code)
            item = self.new()
            f = self.emit("FOR", item, it, 0)
            self.store_target(g.target, item)
            for cond in g.ifs:
                site = self.sites
                self.sites += 1
                j = self.emit("IF_FALSE", self.expr(cond), 0, site)
                self.patch(j, 2, top)
            if k + 1 < len(e.generators):
                level(k + 1)
            elif isinstance(e, ast.DictComp):
                key = self.expr(e.key)
                self.emit("STORE_ITEM", out, key, self.expr(e.value))
            elif isinstance(e, ast.SetComp):
                self.emit("SET_ADD", out, self.expr(e.elt))
            else:
                self.emit("APPEND", out, self.expr(e.elt))
            self.emit("JUMP", top)
            self.patch(f, 3, len(self.code))

        level(0)
        self.regs, self.locals = saved_regs, saved_locals
        return out


def _reads(ins, consts) -> list[int]:
    """The registers an instruction reads."""
    op, a, b, c, d, _ = ins
    name = OPS[op]
    if name in ("MOVE", "NOT", "ITER", "GETATTR", "UNARY", "FOR", "UNPACK"):
        return [b]
    if name in ("BINOP", "INPLACE", "COMPARE", "GETITEM"):
        return [b, c]
    if name in ("BUILD_LIST", "BUILD_TUPLE", "BUILD_SET", "BUILD_STRING"):
        return list(range(b, b + c))
    if name == "BUILD_DICT":
        return list(range(b, b + 2 * c))
    if name == "BUILD_SLICE":
        return [r for r in (b, c, d) if r >= 0]
    if name in ("APPEND", "SET_ADD", "EXTEND"):
        return [a, b]
    if name == "STORE_ITEM":
        return [a, b, c]
    if name == "CALL":
        return [b] + list(range(c, c + d))            # keyword values: see the KWNAMES after
    if name in ("IF_FALSE", "IF_TRUE", "RETURN"):
        return [a]
    if name == "FORMAT":
        return [b] + ([d] if d >= 0 else [])
    if name == "MAP":
        return [b, c] + [s[1] for s in consts[d][1] if s[0] == "reg"]
    return []


def lift(fn) -> Program:
    """The graph of scheduled function fn; Unsupported (with .line) when it cannot be one."""
    inner = getattr(fn, "__func__", fn)
    tree = source_tree(inner)
    if tree.decorator_list and len(tree.decorator_list) > 1:
        pass   # pydron.schedule plus others: the code object is what runs, decorators aside
    for node in ast.walk(tree):
        if node is not tree and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                  ast.Lambda, ast.ClassDef)):
            raise Unsupported("a nested function, lambda or class", node)
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            raise Unsupported("global or nonlocal", node)
        if isinstance(node, (ast.Yield, ast.YieldFrom, ast.Await)):
            raise Unsupported("a generator or coroutine", node)
    return _Lifter(inner, tree).lift()


def explain_lift(fn) -> tuple[bool, str, int | None]:
    """(replayable, reason, line) for fn's graph."""
    try:
        p = lift(fn)
    except Unsupported as exc:
        return False, str(exc), exc.line
    except SyntaxError as exc:
        return False, f"its source does not parse ({exc.msg})", exc.lineno
    return True, f"{len(p.code)} instructions, {p.maps} map(s), {p.sites} branch site(s)", None


# ---- what the C core calls -----------------------------------------------------------------------

def lift_for_core(fn):
    """The program as trace/replay.c loads it, or a str: why fn has no graph. Either is kept in
    the disk cache for the next process."""
    try:
        value = lift(fn).as_tuple()
    except Unsupported as exc:
        value = f"line {exc.line}: {exc}" if exc.line else str(exc)
    except SyntaxError as exc:
        value = f"its source does not parse ({exc.msg})"
    except RecursionError:
        value = "its source is nested too deeply"
    from pydron import _graph_cache
    _graph_cache.store(fn, value)
    return value


def cached_for_core(fn):
    """fn's graph from the disk cache, as lift_for_core gives it, or None."""
    from pydron import _graph_cache
    return _graph_cache.load(fn)


# numpy functions that only compute their result from their arguments (none takes a random
# state, none writes into an argument unless given out=, which the interpreter refuses).
_NUMPY_PURE = (
    "array asarray asanyarray ascontiguousarray copy stack vstack hstack dstack column_stack "
    "concatenate split array_split mean average median std var sum prod cumsum cumprod min max "
    "amin amax argmin argmax ptp percentile quantile nanmean nansum nanmin nanmax nanstd "
    "nanmedian zeros ones full empty_like zeros_like ones_like full_like arange linspace logspace "
    "eye identity diag dot vdot inner outer matmul tensordot einsum kron cross trace transpose "
    "reshape ravel squeeze expand_dims swapaxes moveaxis flip roll where clip sort argsort unique "
    "searchsorted histogram histogram2d bincount digitize diff gradient convolve correlate "
    "interp polyfit polyval allclose isclose array_equal count_nonzero nonzero flatnonzero "
    "round around floor ceil trunc rint sqrt exp log log2 log10 log1p expm1 sin cos tan arcsin "
    "arccos arctan arctan2 hypot sinh cosh tanh abs absolute sign maximum minimum fmax fmin add "
    "subtract multiply divide true_divide floor_divide power mod remainder square real imag "
    "conj angle isnan isinf isfinite nan_to_num logical_and logical_or logical_not any all "
    "atleast_1d atleast_2d atleast_3d broadcast_to meshgrid tile repeat pad take").split()
_NUMPY_LINALG_PURE = "norm inv pinv solve det eig eigh eigvals eigvalsh svd qr cholesky lstsq".split()
_NUMPY_FFT_PURE = "fft ifft fft2 ifft2 fftn ifftn rfft irfft rfftn irfftn fftfreq fftshift".split()


_STR_METHODS = frozenset(n for n in dir(str) if not n.startswith("_"))
_BYTES_METHODS = frozenset(n for n in dir(bytes) if not n.startswith("_"))
_NDARRAY_PURE_METHODS = frozenset(
    "all any argmax argmin argsort astype clip conj conjugate copy cumprod cumsum diagonal dot "
    "flatten max mean min nonzero prod ptp ravel repeat reshape round squeeze std sum swapaxes "
    "take tolist tobytes trace transpose var view item".split())
# Of the methods above, the ones that return a new object (not a view, not the object itself).
_NEW_OBJECT_METHODS = frozenset("copy astype flatten tolist union intersection difference "
                                "symmetric_difference".split())


_tables_memo: dict = {}


def pure_tables() -> tuple:
    """_pure_tables of the modules imported now (made again only when numpy or one of its
    submodules appears)."""
    import sys
    key = (id(sys.modules.get("numpy")), "numpy.linalg" in sys.modules,
           "numpy.fft" in sys.modules)
    tables = _tables_memo.get(key)
    if tables is None:
        _tables_memo.clear()
        tables = _tables_memo[key] = _pure_tables()
    return tables


def _pure_tables() -> tuple:
    """(callables, methods, new): what a graph may call besides functional and scheduled
    functions. callables: functions and types that compute a result from their arguments and
    change nothing; methods: {type: method names} likewise for methods of those exact types;
    new: the callables (and method names) whose result is always a new object."""
    import sys
    callables = pure_callees()
    methods = {str: _STR_METHODS, bytes: _BYTES_METHODS,
               int: frozenset({"bit_length", "bit_count", "conjugate", "to_bytes",
                               "as_integer_ratio"}),
               float: frozenset({"is_integer", "as_integer_ratio", "hex", "conjugate"}),
               tuple: frozenset({"count", "index"}), list: frozenset({"count", "index", "copy"}),
               dict: frozenset({"get", "keys", "values", "items", "copy"}),
               set: frozenset({"union", "intersection", "difference", "symmetric_difference",
                               "issubset", "issuperset", "isdisjoint", "copy"}),
               frozenset: frozenset({"union", "intersection", "difference",
                                     "symmetric_difference", "issubset", "issuperset",
                                     "isdisjoint", "copy"})}
    new = {getattr(builtins, n) for n in NEW_OBJECT_NAMES}
    np = sys.modules.get("numpy")
    if np is not None:
        methods[np.ndarray] = _NDARRAY_PURE_METHODS
        methods[np.ufunc] = frozenset({"reduce", "accumulate", "outer"})
        for n in ("array", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like",
                  "stack", "vstack", "hstack", "dstack", "column_stack", "concatenate", "copy",
                  "arange", "linspace", "logspace", "eye", "identity"):
            f = getattr(np, n, None)
            if f is not None:
                new.add(f)
        new |= {f for f in callables if isinstance(f, np.ufunc)}
    return callables, methods, new | set(_NEW_OBJECT_METHODS)


def pure_callees() -> set:
    """Callables a graph may call in the master besides functional and scheduled functions: they
    compute a result from their arguments and change nothing (looked up once, by identity)."""
    import math
    import sys
    out = {getattr(builtins, n) for n in PURE_BUILTINS}
    out |= {getattr(math, n) for n in dir(math) if callable(getattr(math, n))}
    np = sys.modules.get("numpy")
    if np is not None:
        # numpy imports its submodules on first access: only those already imported count
        for table, names in ((np, _NUMPY_PURE), (sys.modules.get("numpy.linalg"),
                                                 _NUMPY_LINALG_PURE),
                             (sys.modules.get("numpy.fft"), _NUMPY_FFT_PURE)):
            if table is None:
                continue
            for n in names:
                f = getattr(table, n, None)
                if f is not None:
                    try:
                        hash(f)
                    except TypeError:
                        continue
                    out.add(f)
    return out


# ---- the reference interpreter ------------------------------------------------------------------
# The same programs, in Python, with the C interpreter's rules (which operand is read shallow or
# deep, what may be changed in place, which callees are taken, when to give up), minus guessing.
# Tests run the semantics corpus through both (PYDRON_REPLAY=reference selects this one).

_FRESH, _WRAPS, _OUTSIDE = 0, 1, 2
_IMMUTABLE = (int, float, complex, str, bytes, tuple, bool, frozenset, type(None))
_BINOP_FNS = [operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
              operator.mod, operator.pow, operator.lshift, operator.rshift, operator.or_,
              operator.xor, operator.and_, operator.matmul]
_INPLACE_FNS = [operator.iadd, operator.isub, operator.imul, operator.itruediv,
                operator.ifloordiv, operator.imod, operator.ipow, operator.ilshift,
                operator.irshift, operator.ior, operator.ixor, operator.iand, operator.imatmul]
_UNARY_FNS = [operator.neg, operator.pos, operator.invert]
_COMPARE_FNS = [operator.lt, operator.le, operator.eq, operator.ne, operator.gt, operator.ge,
                operator.is_, operator.is_not, lambda x, y: x in y, lambda x, y: x not in y]
_programs: dict = {}


class _Bail(Exception):
    pass


def _is_outside_iterator(value, taint) -> bool:
    return taint == _OUTSIDE and hasattr(type(value), "__next__")


def run_reference(fn, args: tuple):
    """(True, result) or (False, why it gave up): one call of fn through its graph."""
    from pydron import _core
    code = fn.__code__
    entry = _programs.get(code)
    if entry is None:
        entry = _programs[code] = (lift(fn), pure_tables())
    program, tables = entry
    try:
        return True, _Interpreter(program, fn, tables, _core).run(args)
    except _Bail as exc:
        return False, str(exc)


class _Interpreter:
    def __init__(self, program: Program, fn, tables: tuple, core):
        self.p = program
        self.fn = fn
        self.pure, self.pure_methods, self.new = tables
        self.core = core
        self.regs = [None] * program.nregs
        self.bound = [False] * program.nregs
        self.taint = [_OUTSIDE] * program.nregs

    def bail(self, line, why):
        raise _Bail(f"line {line} {why}")

    def get(self, r, line):
        if not self.bound[r]:
            self.bail(line, "reads a name that has no value")
        return self.regs[r]

    def set(self, r, value, taint):
        self.regs[r] = value
        self.bound[r] = True
        self.taint[r] = taint

    def read(self, r, line, deep):
        v = self.get(r, line)
        try:
            return self.core.force_deep(v) if deep else self.core.force(v)
        except Exception as exc:  # noqa: BLE001 — the trace raises it again, in place
            self.bail(line, f"raised {type(exc).__name__}: {exc}")

    def attempt(self, line, f, *args):
        try:
            return f(*args)
        except Exception as exc:  # noqa: BLE001 — the trace raises it again, in place
            self.bail(line, f"raised {type(exc).__name__}: {exc}")

    def callee_kind(self, callable_):
        kind = self.core._kind(callable_) if isinstance(callable_, (types.FunctionType,
                                                                    types.MethodType)) else 0
        if kind == 1:
            return "functional"
        if kind == 2:
            return "scheduled"
        try:
            if callable_ in self.pure:
                return "pure"
        except TypeError:
            return None
        owner = getattr(callable_, "__self__", None)
        if isinstance(callable_, types.BuiltinMethodType) and owner is not None and \
                not isinstance(owner, types.ModuleType) and \
                callable_.__name__ in self.pure_methods.get(type(owner), ()):
            return "pure"
        return None

    def makes_new_object(self, callable_):
        try:
            if callable_ in self.new:
                return True
        except TypeError:
            return False
        owner = getattr(callable_, "__self__", None)
        return (isinstance(callable_, types.BuiltinMethodType) and owner is not None and
                not isinstance(owner, types.ModuleType) and callable_.__name__ in self.new)

    def functional_threads(self, callable_):
        return False       # the reference cannot see the options: results are taken as new

    def run(self, args):
        p, R = self.p, self.regs
        globals_ = self.fn.__globals__
        builtins_ = globals_.get("__builtins__", builtins)
        if isinstance(builtins_, types.ModuleType):
            builtins_ = vars(builtins_)
        for ins in p.code:
            if OPS[ins[0]] == "ARG":
                self.set(ins[1], args[ins[2]], _OUTSIDE)
        pc = 0
        while True:
            op, a, b, c, d, line = p.code[pc]
            name = OPS[op]
            pc += 1
            if name in ("ARG", "KWNAMES"):
                continue
            if name == "CONST":
                self.set(a, p.consts[b], _OUTSIDE)
            elif name == "GLOBAL":
                n = p.names[b]
                if n in globals_:
                    self.set(a, globals_[n], _OUTSIDE)
                elif n in builtins_:
                    self.set(a, builtins_[n], _OUTSIDE)
                else:
                    self.bail(line, f"reads {n}, which is not defined")
            elif name == "MOVE":
                self.set(a, self.get(b, line), self.taint[b])
            elif name in ("BINOP", "INPLACE"):
                x0, y0 = self.get(b, line), self.get(c, line)
                inplace = name == "INPLACE"
                concat = d == 0 and ((type(x0) is list and (inplace or type(y0) is list)) or
                                     (type(x0) is tuple and type(y0) is tuple))
                if concat:
                    x = x0
                    y = self.read(c, line, False) if inplace and type(x0) is list else y0
                else:
                    x, y = self.read(b, line, True), self.read(c, line, True)
                if inplace and not isinstance(x, _IMMUTABLE) and self.taint[b] != _FRESH:
                    self.bail(line, "changes in place an object the call did not make")
                r = self.attempt(line, (_INPLACE_FNS if inplace else _BINOP_FNS)[d], x, y)
                self.set(a, r, self.taint[b] if r is x else self.taint[c] if r is y else _FRESH)
            elif name == "UNARY":
                self.set(a, self.attempt(line, _UNARY_FNS[c], self.read(b, line, True)), _FRESH)
            elif name == "NOT":
                self.set(a, self.attempt(line, operator.not_, self.read(b, line, False)), _FRESH)
            elif name == "COMPARE":
                deep = d not in (6, 7)
                x, y = self.read(b, line, deep), self.read(c, line, deep)
                self.set(a, self.attempt(line, _COMPARE_FNS[d], x, y), _FRESH)
            elif name == "GETITEM":
                cont, key = self.read(b, line, False), self.read(c, line, True)
                self.set(a, self.attempt(line, operator.getitem, cont, key), _OUTSIDE)
            elif name == "GETATTR":
                obj = self.read(b, line, False)
                self.set(a, self.attempt(line, getattr, obj, p.names[c]), _OUTSIDE)
            elif name in ("BUILD_LIST", "BUILD_TUPLE"):
                items = [self.get(b + k, line) for k in range(c)]
                self.set(a, items if name == "BUILD_LIST" else tuple(items), _FRESH)
            elif name == "BUILD_DICT":
                out = {}
                for k in range(c):
                    key, value = self.get(b + 2 * k, line), self.get(b + 2 * k + 1, line)
                    key = self.attempt(line, self.core.force_deep, key)
                    self.attempt(line, out.__setitem__, key, value)
                self.set(a, out, _FRESH)
            elif name == "BUILD_SLICE":
                parts = [None if r < 0 else self.read(r, line, True) for r in (b, c, d)]
                self.set(a, slice(*parts), _FRESH)
            elif name == "APPEND":
                lst = self.get(a, line)
                if type(lst) is not list or self.taint[a] != _FRESH:
                    self.bail(line, "appends to something else than a list it made")
                lst.append(self.get(b, line))
            elif name == "CALL":
                kw = p.code[pc]
                kwnames = p.consts[kw[1]] if kw[1] >= 0 else ()
                pc += 1
                argv = [self.get(c + k, line) for k in range(d + len(kwnames))]
                callable_ = self.attempt(line, self.core.force, self.get(b, line))
                kind = self.callee_kind(callable_)
                if kind is None:
                    self.bail(line, f"calls {getattr(callable_, '__qualname__', callable_)!s}, "
                                    "which is neither functional nor known to be pure")
                if kind == "scheduled":
                    ok, r = self.attempt(line, self.core._replay_call, callable_, tuple(argv),
                                         tuple(kwnames) or None)
                    if not ok:
                        self.bail(line, f"calls scheduled {callable_.__qualname__}, whose graph "
                                        f"gave up ({r})")
                    self.set(a, r, _OUTSIDE)
                    continue
                if kind == "pure":
                    for k in range(len(argv)):
                        if _is_outside_iterator(argv[k], self.taint[c + k]):
                            self.bail(line, "hands on an iterator it was handed")
                    if "out" in kwnames:
                        self.bail(line, "passes out=: the callee writes into it")
                r = self.attempt(line, self.core.call, callable_, tuple(argv),
                                 tuple(kwnames) or None)
                if kind == "functional":
                    taint = _FRESH
                else:
                    taint = _FRESH if self.makes_new_object(callable_) else _OUTSIDE
                    if hasattr(type(r), "__next__"):
                        taint = _WRAPS
                    for k, v in enumerate(argv):
                        if r is v:
                            taint = self.taint[c + k]
                self.set(a, r, taint)
            elif name == "ITER":
                x = self.read(b, line, False)
                if _is_outside_iterator(x, self.taint[b]):
                    self.bail(line, "consumes an iterator it was handed")
                self.set(a, self.attempt(line, iter, x),
                         _FRESH if self.taint[b] == _FRESH else _WRAPS)
            elif name == "FOR":
                it = self.get(b, line)
                try:
                    v = next(it)
                except StopIteration:
                    pc = c
                    continue
                except Exception as exc:  # noqa: BLE001
                    self.bail(line, f"raised {type(exc).__name__}: {exc}")
                self.set(a, v, _OUTSIDE)
            elif name == "JUMP":
                pc = a
            elif name in ("IF_FALSE", "IF_TRUE"):
                t = self.attempt(line, bool, self.read(a, line, False))
                if (name == "IF_FALSE") != t:
                    pc = b
            elif name == "UNPACK":
                x = self.read(b, line, False)
                if _is_outside_iterator(x, self.taint[b]):
                    self.bail(line, "consumes an iterator it was handed")
                items = self.attempt(line, tuple, x)
                if len(items) != c:
                    self.bail(line, "unpacks the wrong number of values")
                for k, v in enumerate(items):
                    self.set(a + k, v, _OUTSIDE)
            elif name == "RETURN":
                return self.get(a, line)
            elif name == "MAP":
                self.set(a, self.map(b, c, d, line), _FRESH)
            elif name == "BAIL":
                self.bail(line, f"{p.consts[a]}: the trace raises what plain Python raises")
            elif name in ("STORE_ITEM", "SET_ADD"):
                cont = self.get(a, line)
                if self.taint[a] != _FRESH:
                    self.bail(line, "changes a container the call did not make")
                cont = self.attempt(line, self.core.force, cont)
                if name == "SET_ADD":
                    if not isinstance(cont, (set, frozenset)):
                        self.bail(line, "adds to something else than a set it made")
                    self.attempt(line, cont.add, self.read(b, line, True))
                else:
                    key = self.read(b, line, True)
                    value = self.get(c, line)
                    if type(cont) not in (list, dict):
                        value = self.read(c, line, True)
                    self.attempt(line, operator.setitem, cont, key, value)
            elif name == "EXTEND":
                lst = self.get(a, line)
                if type(lst) is not list or self.taint[a] != _FRESH:
                    self.bail(line, "extends something else than a list it made")
                items = self.read(b, line, False)
                if _is_outside_iterator(items, self.taint[b]):
                    self.bail(line, "consumes an iterator it was handed")
                self.attempt(line, lst.extend, items)
            elif name == "BUILD_SET":
                items = [self.read(b + k, line, True) for k in range(c)]
                self.set(a, self.attempt(line, set, items), _FRESH)
            elif name == "FORMAT":
                v = self.read(b, line, True)
                spec = self.read(d, line, True) if d >= 0 else ""
                conv = {ord("s"): str, ord("r"): repr, ord("a"): ascii}.get(c)
                if conv is not None:
                    v = self.attempt(line, conv, v)
                self.set(a, self.attempt(line, format, v, spec), _FRESH)
            elif name == "BUILD_STRING":
                parts = [self.get(b + k, line) for k in range(c)]
                if not all(isinstance(x, str) for x in parts):
                    self.bail(line, "joins something that is not a str")
                self.set(a, "".join(parts), _FRESH)
            elif name == "DEREF":
                cells = self.fn.__closure__ or ()
                if b >= len(cells):
                    self.bail(line, "reads a free variable the function does not have")
                try:
                    v = cells[b].cell_contents
                except ValueError:
                    self.bail(line, "reads a free variable that has no value")
                self.set(a, v, _OUTSIDE)
            else:
                self.bail(line, f"meets an unknown operation {name}")

    def map(self, b, c, d, line):
        p = self.p
        fn = self.attempt(line, self.core.force, self.get(b, line))
        kind = self.callee_kind(fn)
        if kind == "scheduled":
            kind = None         # a map's calls are functional or pure (the C interpreter too)
        if kind is None:
            self.bail(line, f"calls {getattr(fn, '__qualname__', fn)!s}, which is neither "
                            "functional nor known to be pure")
        seq = self.read(c, line, False)
        if _is_outside_iterator(seq, self.taint[c]):
            self.bail(line, "consumes an iterator it was handed")
        ntarget, sources = p.consts[d]
        calls = []
        for elem in self.attempt(line, list, seq):
            items = None
            if ntarget:
                items = self.attempt(line, tuple, self.attempt(line, self.core.force, elem))
                if len(items) != ntarget:
                    self.bail(line, "unpacks an element of the wrong length")
            args = []
            for s in sources:
                if s[0] == "elem":
                    args.append(elem)
                elif s[0] == "item":
                    args.append(items[s[1]])
                elif s[0] == "reg":
                    args.append(self.get(s[1], line))
                else:
                    args.append(p.consts[s[1]])
            calls.append(tuple(args))
        if kind == "functional" and isinstance(fn, types.FunctionType) and len(calls) > 1:
            return self.attempt(line, self.core._map, fn, calls)
        return [self.attempt(line, self.core.call, fn, args, None) for args in calls]


# ---- pydron.explain -----------------------------------------------------------------------------

@dataclasses.dataclass
class Explanation:
    """What pydron.explain found: whether the function has a graph (and if not, why, where),
    what each call site does when the graph runs, and with arguments, what their call did."""
    function: str
    graph: bool
    reason: str
    line: int | None
    sites: list              # (line, callee as written, what the graph does there)
    outcome: str | None = None
    result: object = None

    def __str__(self) -> str:
        out = [f"{self.function}: " + (f"replays its graph ({self.reason})" if self.graph else
                                        f"no graph, traced on every call: {self.reason}" +
                                        (f" (line {self.line})" if self.line else ""))]
        for line, callee, verdict in self.sites:
            out.append(f"  line {line}: {callee}: {verdict}")
        if self.outcome:
            out.append(f"  this call: {self.outcome}")
        return "\n".join(out)


def _callee_text(program: Program, reg: int, upto: int) -> tuple[str, object]:
    """How the callee in register reg was written (the last instruction before upto that set
    it), and the object when it can be known before the call runs."""
    for pc in range(upto - 1, -1, -1):
        op, a, b, c, d, _ = program.code[pc]
        if a != reg or OPS[op] in ("APPEND", "STORE_ITEM", "SET_ADD", "EXTEND", "JUMP",
                                   "IF_FALSE", "IF_TRUE", "RETURN", "KWNAMES", "BAIL"):
            continue
        if OPS[op] == "GLOBAL":
            return program.names[b], _Global(program.names[b])
        if OPS[op] == "GETATTR":
            base, obj = _callee_text(program, b, pc)
            return f"{base}.{program.names[c]}", (_Attr(obj, program.names[c])
                                                 if obj is not None else None)
        if OPS[op] == "MOVE":
            return _callee_text(program, b, pc)
        return "a value computed in the function", None
    return "a parameter", None


@dataclasses.dataclass
class _Global:
    name: str


@dataclasses.dataclass
class _Attr:
    base: object
    name: str


def _resolve(ref, fn):
    if isinstance(ref, _Global):
        g = fn.__globals__
        if ref.name in g:
            return g[ref.name]
        b = g.get("__builtins__", builtins)
        b = vars(b) if isinstance(b, types.ModuleType) else b
        return b.get(ref.name, _MISSING)
    if isinstance(ref, _Attr):
        base = _resolve(ref.base, fn)
        if isinstance(base, types.ModuleType):
            return getattr(base, ref.name, _MISSING)
    return _MISSING


_MISSING = object()


def _verdict(obj, tables) -> str:
    from pydron import _core
    if obj is _MISSING:
        return "decided when it runs: functional -> a task, scheduled with a graph -> nested " \
               "replay, a known-pure function or method -> called here, else the graph gives " \
               "up to the trace"
    kind = _core._kind(obj) if isinstance(obj, (types.FunctionType, types.MethodType)) else 0
    if kind == 1:
        return "functional: a task"
    if kind == 2:
        try:
            lift(getattr(obj, "__func__", obj))
        except (Unsupported, SyntaxError) as exc:
            return f"scheduled, without a graph of its own ({exc}): the graph gives up here"
        return "scheduled: replays nested through its own graph"
    callables, methods, _ = tables
    try:
        if obj in callables:
            return "known pure: called here with its arguments read"
    except TypeError:
        pass
    return "neither functional nor known to be pure: the graph gives up to the trace here"


def explain(fn, *args, **kwargs) -> Explanation:
    """Whether scheduled function fn replays its graph on later calls, and if not why, with the
    line; per call site what the graph does with the callee. Given arguments, fn is also called
    once with them through its graph (its effects are its own: they happen) and the outcome is
    told: replayed to the end, or given up to the trace and why."""
    inner = getattr(fn, "__func__", fn)
    name = getattr(inner, "__qualname__", repr(fn))
    try:
        program = lift(inner)
    except Unsupported as exc:
        return Explanation(name, False, str(exc), exc.line, [])
    except SyntaxError as exc:
        return Explanation(name, False, f"its source does not parse ({exc.msg})", exc.lineno, [])
    tables = pure_tables()
    sites = []
    for pc, (op, a, b, c, d, line) in enumerate(program.code):
        if OPS[op] == "CALL":
            text, ref = _callee_text(program, b, pc)
            sites.append((line, text + "()", _verdict(_resolve(ref, inner), tables)))
        elif OPS[op] == "MAP":
            text, ref = _callee_text(program, b, pc)
            verdict = _verdict(_resolve(ref, inner), tables)
            if verdict.startswith("functional"):
                verdict = "functional, over a comprehension: sent as a few chunk tasks (a map)"
            sites.append((line, f"[{text}(...) for ...]", verdict))
    summary = (f"{len(program.code)} instructions, {program.maps} map(s), "
               f"{program.sites} branch site(s)")
    out = Explanation(name, True, summary, None, sites)
    if args or kwargs:
        from pydron import _core
        previous = _core._replay_configure(after=0)
        _core._replay_forget(inner)
        hits = _core._replay_stats()["hits"]
        try:
            out.result = fn(*args, **kwargs)
        finally:
            _core._replay_configure(after=previous["after"])
        state = _core._replay_state(inner)
        if _core._replay_stats()["hits"] > hits:
            out.outcome = (f"replayed to the end ({state['guesses']} branch guess(es), "
                           f"{state['mispredicts']} wrong)")
        else:
            out.outcome = f"gave up to the trace: {state.get('reason')}"
    return out
