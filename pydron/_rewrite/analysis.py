"""What the rewrite learns about a code object before changing it.

- `Regions`: the user's try/with regions (as opposed to regions the compiler makes for its own
  purposes: 3.12's inlined comprehensions, generator wrappers), found through the exception
  table: a region is user code when its handler starts with PUSH_EXC_INFO.
- The data flow (`analyse`): for each instruction, the abstract `State` before it (a `Slot` per
  stack item and what is known about each local) and a `Plan`: the operands to force before it
  and the kind of rewrite it gets (`Plan.action`).
- The locals a region must give back at its handler (`Analysis.saved`, `Analysis.logged_names`).

Values are tracked with a level: PLAIN (no pending anywhere inside, until something that may run
rewritten code, e.g. a call or a loop step, could move one into it), NOT_PENDING (not pending
itself) or MAYBE_PENDING. Only operands whose level requires it are forced; a forced local is
written back, so it is forced once. Exact list/tuple types of locals are tracked for
concatenation, which is a move.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import NamedTuple, Optional

from .errors import RewriteError
from .listing import ExceptionEntry, Listing
from .opcodes import (BINARY_ADD, BINARY_INPLACE_ADD, CALLABLE_FIRST, CO_VARARGS,
                      CO_VARKEYWORDS, CONSUME, CONSUME_REPEAT, CONTAINER_RESULT, HAS_KW_NAMES,
                      HAS_PRECALL, INTRINSIC_LIST_TO_TUPLE, INTRINSIC_STOPITERATION_ERROR,
                      INTROSPECT_ATTRS, INTROSPECT_GLOBALS, KEEP, LISTS_LOCALS,
                      LOAD_ATTR_METHOD_FLAG, NO_FORCE, PENDING_RESULT, PURE, RETURNS, STORES,
                      VALUE_RESULT, stack_pops)

# Levels of a value.
PLAIN = 0
NOT_PENDING = 1
MAYBE_PENDING = 2

# Force kinds (opcodes.CONSUME spells them "S" and "D").
SHALLOW = "S"
DEEP = "D"

# What a call site's NULL slot may hold.
NULL = "NULL"
MAYBE_NULL = "MAYBE_NULL"
NULLS = (NULL, MAYBE_NULL)


class Origin(NamedTuple):
    """Where a stack value came from, when the analysis knows."""
    kind: str       # one of the origin kinds below
    value: object   # the local/global/attribute name, code object, constant or exact type


FAST = "fast"           # loaded from the local `value`
GLOBAL = "global"       # loaded from the global `value`
ATTR = "attr"           # attribute `value` of something
CODE = "code"           # the code object `value` (LOAD_CONST)
FUNC = "func"           # a function made from code object `value` (MAKE_FUNCTION)
CONST = "const"         # the tuple constant `value`
EXACT = "exact"         # a new container of exact type `value` ("list", "tuple" or None)
CLEARED = "cleared"     # 3.12+ LOAD_FAST_AND_CLEAR's saved local; `value`: 1 if maybe unbound


class Slot(NamedTuple):
    """One stack item: its level and, when known, its origin (an Origin, NULL or MAYBE_NULL)."""
    level: int
    origin: object


NULL_SLOT = Slot(PLAIN, NULL)
#: A value of each level whose origin is unknown.
ANONYMOUS = (Slot(PLAIN, None), Slot(NOT_PENDING, None), Slot(MAYBE_PENDING, None))


class State(NamedTuple):
    """The abstract state before an instruction. The tuples indexed by local follow
    co_varnames."""
    stack: tuple        # Slots, bottom first
    levels: tuple       # level of each local
    unbound: tuple      # 1 if the local may be unbound
    kinds: tuple        # exact type of each local when known ("list", "tuple"), else None


# The data flow makes a State per edge: built without NamedTuple's Python-level __new__.
_new_state = functools.partial(tuple.__new__, State)


class Force(NamedTuple):
    """One operand to force before an instruction."""
    depth: int                  # 1 is the top of the stack
    kind: str                   # SHALLOW or DEEP
    writeback: Optional[str]    # the local it was loaded from: the value is stored back


# Plan actions: how an instruction is rewritten (None: kept, after its forces).
CALL = "call"                   # the call goes through rt.call(callable, args, kwnames)
CALL_EX = "call_ex"             # f(*args, **kwargs) goes through rt.call_ex
STORE_SUBSCR = "store_subscr"   # c[k] = v goes through rt.store_subscr (a move into lists/dicts)
METHOD_LOAD = "method_load"     # obj.m(...) loads the bound method, so that rt.call sees it
SUPER_METHOD = "super_method"   # the same for super().m(...)
DIRECT = "direct"               # called in place, operands forced (introspecting callees,
                                # the method form of a call)
DIRECT_COMP = "direct_comp"     # a comprehension body called in place
CONCAT = "concat"               # list/tuple concatenation: a move, nothing forced
NOTE_NAME = "note_name"         # module code's STORE_NAME of what may be (or hold) a pending:
                                # the name is logged (rt.pending_names), the value is moved


@dataclasses.dataclass(eq=False, slots=True)
class Plan:
    """What the emission does with one instruction."""
    forces: list                        # Force, in the order they are emitted
    action: Optional[str] = None
    argc: int = 0                       # CALL: arguments, keyword values included
    kwnames: Optional[tuple] = None     # CALL: keyword names
    strip_hidden: bool = False          # DIRECT: the callee lists the frame's locals
    result_kind: Optional[str] = None   # CONCAT, DIRECT_COMP: exact type of the result
    # METHOD_LOAD, STORE_SUBSCR in module code: the global name the method's object or the
    # container was loaded from (a value may be moved into it: the name is logged)
    container_name: Optional[str] = None


class SavedLocal(NamedTuple):
    """A local assigned in a user region, saved in a hidden local when the region is entered."""
    name: str
    save: str


def stored_names(instr) -> tuple:
    """Locals a STORE_FAST-like instruction stores into (3.13 fuses two)."""
    if instr.name == "STORE_FAST_STORE_FAST":
        return instr.arg
    if instr.name == "STORE_FAST_LOAD_FAST":
        return instr.arg[:1]
    return (instr.arg,)


class Regions:
    """The user try/with regions of a listing, each named by its handler's label."""

    def __init__(self, listing: Listing):
        self.listing = listing
        self.of_entry = {}  # entry -> labels of the user regions it is in, innermost first
        self.marks = {}     # region label -> hidden local holding mark() at the region's entry
        for e in listing.entries:
            if e is not None and e not in self.of_entry:
                chain = tuple(self.chain(e))
                self.of_entry[e] = chain
                for lab in chain:
                    if lab not in self.marks:
                        self.marks[lab] = ".pydron_mark%d" % len(self.marks)

    def is_user_handler(self, entry: ExceptionEntry) -> bool:
        i = self.listing.handler_index(entry)
        instrs = self.listing.instrs
        return i < len(instrs) and instrs[i].name == "PUSH_EXC_INFO"

    def chain(self, entry: Optional[ExceptionEntry]) -> list:
        """User regions (handler labels) enclosing code covered by `entry`, innermost first."""
        out, seen = [], set()
        entries = self.listing.entries
        while entry is not None and entry not in seen:
            seen.add(entry)
            if self.is_user_handler(entry):
                out.append(entry.handler)
            entry = entries[self.listing.handler_index(entry)]
        return out

    def enclosing(self, i: int) -> tuple:
        """User regions enclosing instruction i, innermost first. An unconditional jump or NOP
        that no exception entry covers (the compiler leaves some loop back-edges uncovered)
        cannot raise: it belongs to the regions of where it leads, so that it is no exit."""
        instrs, entries = self.listing.instrs, self.listing.entries
        for _ in range(8):
            e = entries[i]
            if e is not None:
                return self.of_entry[e]
            x = instrs[i]
            if x.name == "NOP" and i + 1 < len(instrs):
                i += 1
            elif x.is_uncond_jump() and x.name not in RETURNS:
                i = self.listing.label_index[x.arg]
                if i >= len(instrs):
                    return ()
            else:
                return ()
        return ()

    def statement_entry(self, region) -> Optional[ExceptionEntry]:
        """Entry covering the try statement of a user region (where its handler is set up)."""
        listing = self.listing
        e = listing.entries[listing.label_index[region]]
        if e is None:
            return None
        c = listing.handler_index(e)
        instrs = listing.instrs
        if (instrs[c].name == "COPY" and instrs[c].arg == 3 and c + 1 < len(instrs)
                and instrs[c + 1].name == "POP_EXCEPT"):
            return listing.entries[c]
        return e


@dataclasses.dataclass(eq=False)
class Analysis:
    """Everything the emission needs to know about one code object."""
    listing: Listing
    regions: Regions
    role: str
    states: list                # State before each instruction, None if unreachable
    plans: list                 # Plan of each instruction, None if unreachable
    saved: dict                 # region label -> [SavedLocal] restored at its handler
    restorable: dict            # region label -> names of those locals
    logged: set                 # locals whose stores in regions go through rt.log_store

    def logged_names(self, i: int) -> list:
        """Locals stored by instruction i whose stores are logged: restorable in an enclosing
        region, bound before the store, and the stored value may be pending."""
        if not self.logged:
            return []
        st = self.states[i]
        if st is None:
            return []
        index = self.listing.local_index
        out = []
        for depth, n in enumerate(stored_names(self.listing.instrs[i]), 1):
            k = index.get(n) if type(n) is str else None
            if (k is not None and n in self.logged and not st.unbound[k]
                    and st.stack[-depth].level >= MAYBE_PENDING
                    and any(n in self.restorable.get(r, ())
                            for r in self.regions.enclosing(i))):
                out.append(n)
        return out


def analyse(listing: Listing, role: str, can_undo: bool, can_log_stores: bool,
            globals_pending: bool = False) -> Analysis:
    """Data flow over `listing`, then the locals its regions restore. `can_undo`: the runtime
    has enter_handler and undo; `can_log_stores`: it also has log_store; `globals_pending`:
    module globals may hold pendings (the code runs as, or inside, a scheduled module)."""
    regions = Regions(listing)
    states, plans = _DataFlow(listing, role, regions, globals_pending).run()
    analysis = Analysis(listing, regions, role, states, plans, {}, {}, set())
    if can_undo:
        _plan_restores(analysis, can_log_stores)
    return analysis


def _plan_restores(a: Analysis, can_log_stores: bool) -> None:
    """Locals assigned inside a user region and bound at its handler: saved when the region
    is entered, given back at the handler if what they hold is a call plain Python never
    completed (`r = f(x)` where f failed leaves r as it was)."""
    listing, regions = a.listing, a.regions
    index = listing.local_index
    stores = {lab: set() for lab in regions.marks}
    for i, x in enumerate(listing.instrs):
        if x.name in STORES:
            names = stored_names(x)
            for r in regions.enclosing(i):
                stores[r].update(n for n in names if type(n) is str and n in index)
    for k, lab in enumerate(regions.marks):
        st = a.states[listing.label_index[lab]]
        if st is None:
            continue
        a.saved[lab] = [SavedLocal(n, ".pydron_save%d_%s" % (k, n)) for n in sorted(stores[lab])
                        if not st.unbound[index[n]]]
        a.restorable[lab] = {s.name for s in a.saved[lab]}
    if can_log_stores:
        a.logged = set().union(*a.restorable.values()) if a.restorable else set()


def _join_slot(a: Slot, b: Slot) -> Slot:
    if a == b:
        return a
    la, oa = a
    lb, ob = b
    if oa == ob:
        return Slot(max(la, lb), oa)
    if oa in NULLS or ob in NULLS:
        return Slot(max(la, lb), MAYBE_NULL)
    if type(oa) is Origin and type(ob) is Origin and oa.kind == ob.kind == CLEARED:
        return Slot(max(la, lb), Origin(CLEARED, max(oa.value, ob.value)))
    return Slot(max(la, lb), None)


def _join(a: State, b: State) -> State:
    sa, la, ua, ka = a
    sb, lb, ub, kb = b
    if len(sa) != len(sb):
        raise RewriteError("inconsistent stack depths (%d vs %d)" % (len(sa), len(sb)))
    st = tuple(map(_join_slot, sa, sb)) if sa != sb else sa
    lc = tuple(map(max, la, lb)) if la != lb else la
    uc = tuple(map(max, ua, ub)) if ua != ub else ua
    kc = tuple(x if x == y else None for x, y in zip(ka, kb)) if ka != kb else ka
    return _new_state((st, lc, uc, kc))


class _DataFlow:
    """A worklist over the instructions: the State before each one, and its Plan."""

    def __init__(self, listing: Listing, role: str, regions: Regions, globals_pending: bool):
        self.listing = listing
        self.instrs = listing.instrs
        self.role = role
        self.regions = regions
        self.globals_pending = globals_pending
        self.global_level = MAYBE_PENDING if globals_pending else NOT_PENDING
        self.index = listing.local_index
        # Slots of named origins (locals, globals, attributes), made once: the states hold
        # many, and fewer objects also mean less work for the cyclic garbage collector
        self._named_slots = {}  # (level, origin kind, name) -> Slot

    def run(self):
        instrs, entries = self.instrs, self.listing.entries
        n = len(instrs)
        states = [None] * n
        states[0] = self._initial_state()
        plans = [None] * n
        work = [0]
        queued = [False] * n
        queued[0] = True
        while work:
            i = work.pop()
            queued[i] = False
            st = states[i]
            plan = self._plan(i, st)
            plans[i] = plan
            outs = self._transfer(i, st, plan)
            e = entries[i]
            if e is not None:
                # an exception here reaches the handler with the locals as they are and the
                # stack cut to the entry's depth (plus lasti) and the exception on top
                h = self.listing.handler_index(e)
                depth = e.stack_depth if isinstance(e.stack_depth, int) else 0
                hstack = ([ANONYMOUS[MAYBE_PENDING]] * depth
                          + ([ANONYMOUS[PLAIN]] if e.push_lasti else [])
                          + [ANONYMOUS[NOT_PENDING]])
                hs = State(tuple(hstack), st.levels, st.unbound, st.kinds)
                prev = outs.get(h)
                outs[h] = hs if prev is None else _join(prev, hs)
            for tgt, s in outs.items():
                old = states[tgt]
                new = s if old is None else _join(old, s)
                if new != old:
                    states[tgt] = new
                    if not queued[tgt]:
                        queued[tgt] = True
                        work.append(tgt)
        return states, plans

    def _initial_state(self) -> State:
        nvars = len(self.index)
        levels = [PLAIN] * nvars
        unbound = [1] * nvars
        code = self.listing.code
        nargs = code.co_argcount + code.co_kwonlyargcount
        nargs += bool(code.co_flags & CO_VARARGS) + bool(code.co_flags & CO_VARKEYWORDS)
        for k in range(nargs):
            levels[k] = MAYBE_PENDING
            unbound[k] = 0
        if self.role == "comprehension" and nvars and code.co_varnames[0] == ".0":
            levels[0] = NOT_PENDING
        return State((), tuple(levels), tuple(unbound), (None,) * nvars)

    def _successors(self, i: int) -> list:
        """[(target index, jumped)] of normal control flow out of instruction i."""
        x = self.instrs[i]
        out = []
        if x.has_jump():
            out.append((self.listing.label_index[x.arg], True))
        if not x.is_final() and i + 1 < len(self.instrs):
            out.append((i + 1, False))
        return out

    # -- plans -----------------------------------------------------------------------------
    def _plan(self, i: int, state: State) -> Plan:
        x = self.instrs[i]
        name = x.name
        stack = state.stack
        n = len(stack)
        forces = []

        def want(depth, kind):
            if depth > n:
                raise RewriteError("stack underflow at %s" % name)
            level, origin = stack[n - depth]
            if origin in NULLS:
                return
            if ((kind == SHALLOW and level >= MAYBE_PENDING)
                    or (kind == DEEP and level >= NOT_PENDING)):
                wb = origin.value if type(origin) is Origin and origin.kind == FAST else None
                forces.append(Force(depth, kind, wb))

        if name in ("CALL", "CALL_KW"):
            return self._plan_call(i, x, stack, want, forces)
        if name == "CALL_FUNCTION_EX":
            kw = x.arg & 1
            null_depth = 2 + kw if CALLABLE_FIRST else 3 + kw
            if stack[n - null_depth].origin == NULL:
                return Plan(forces, CALL_EX)
            for d in range(1, 4 + kw):
                want(d, DEEP)
            return Plan(forces)
        if name == "PRECALL" or name == "KW_NAMES":
            return Plan(forces)
        if name == "RETURN_VALUE":
            if self.role in ("function", "generator"):
                want(1, DEEP)
            return Plan(forces)
        if name == "YIELD_VALUE":
            if self.role == "generator":
                want(1, DEEP)
            return Plan(forces)
        if name == "STORE_SUBSCR":
            want(2, SHALLOW)
            return Plan(forces, STORE_SUBSCR, container_name=self._global_name(stack[-2])
                        if self.globals_pending else None)
        if name == "STORE_NAME" and self.role == "module":
            if self.regions.enclosing(i):
                # a name stored in a try region is not given back if the region is aborted
                # (locals are, see Analysis.saved): the value is waited for
                want(1, DEEP)
                return Plan(forces)
            if stack[-1].level >= NOT_PENDING:
                return Plan(forces, NOTE_NAME)
            return Plan(forces)
        if name == "BINARY_OP" and int(x.arg) in (BINARY_ADD, BINARY_INPLACE_ADD) and n >= 2:
            left = self._exact_type(stack[-2], state.kinds)
            right = self._exact_type(stack[-1], state.kinds)
            if left is not None and left == right:
                return Plan(forces, CONCAT, result_kind=left)  # list/tuple concatenation
            if left == "list" and int(x.arg) == BINARY_INPLACE_ADD:
                want(1, SHALLOW)  # list += iterable extends the list: the items are moved
                return Plan(forces, CONCAT, result_kind=left)
        if name == "LOAD_METHOD" or (name == "LOAD_ATTR" and LOAD_ATTR_METHOD_FLAG and x.arg[0]):
            want(1, SHALLOW)
            return Plan(forces, METHOD_LOAD, container_name=self._global_name(stack[-1])
                        if self.globals_pending else None)
        if name == "LOAD_SUPER_ATTR":
            for d in (1, 2, 3):
                want(d, SHALLOW)
            return Plan(forces, SUPER_METHOD if x.arg[0] else None)
        if name == "CALL_INTRINSIC_1":
            if int(x.arg) not in (INTRINSIC_LIST_TO_TUPLE, INTRINSIC_STOPITERATION_ERROR):
                want(1, DEEP)
            return Plan(forces)
        if name == "CALL_INTRINSIC_2":
            if "RERAISE" not in str(x.arg):
                want(1, DEEP)
                want(2, DEEP)
            return Plan(forces)
        if name in NO_FORCE:
            return Plan(forces)
        pops = stack_pops(x)
        kinds = CONSUME.get(name)
        if kinds is None and name in CONSUME_REPEAT:
            kinds = (CONSUME_REPEAT[name] * pops)[:pops]
        if kinds is None:
            kinds = DEEP * pops
        for d, k in enumerate(kinds[:pops], 1):
            if k != "-" and d <= n:
                want(d, k)
        return Plan(forces)

    def _global_name(self, slot: Slot) -> Optional[str]:
        """The global name `slot` was loaded from, if it was."""
        o = slot.origin
        return o.value if type(o) is Origin and o.kind == GLOBAL else None

    def _plan_call(self, i, x, stack, want, forces) -> Plan:
        n = len(stack)
        argc = x.arg
        kwnames = None
        extra_top = 0   # 3.13 CALL_KW: the keyword names tuple above the arguments
        if x.name == "CALL_KW":
            prev = self.instrs[i - 1] if i else None
            if (prev is None or prev.name != "LOAD_CONST" or self.listing.labels_before[i]
                    or type(prev.arg) is not tuple):
                for d in range(1, argc + 4):
                    want(d, DEEP)
                return Plan(forces)
            kwnames = prev.arg
            extra_top = 1
        elif HAS_KW_NAMES:
            j = i - 1
            if HAS_PRECALL and j >= 0 and self.instrs[j].name == "PRECALL":
                j -= 1
            if j >= 0 and self.instrs[j].name == "KW_NAMES":
                kwnames = self.instrs[j].arg
                if type(kwnames) is int:
                    kwnames = self.listing.code.co_consts[kwnames]
        base = extra_top + argc  # depth of the last argument is extra_top + 1
        first_depth, second_depth = base + 2, base + 1
        first, second = stack[n - first_depth], stack[n - second_depth]
        null_slot, callable_slot = (second, first) if CALLABLE_FIRST else (first, second)
        if null_slot.origin == NULL:
            origin = callable_slot.origin
            introspect = type(origin) is Origin and (
                (origin.kind == GLOBAL and origin.value in INTROSPECT_GLOBALS)
                or (origin.kind == ATTR and origin.value in INTROSPECT_ATTRS))
            if not introspect:
                return Plan(forces, CALL, argc=argc, kwnames=kwnames)
            want(first_depth if CALLABLE_FIRST else second_depth, SHALLOW)
            for d in range(extra_top + 1, base + 1):
                want(d, DEEP)
            return Plan(forces, DIRECT, strip_hidden=origin.value in LISTS_LOCALS)
        # method form [callable, self, args]: a comprehension/genexpr body or __exit__
        origin = first.origin
        if type(origin) is Origin and origin.kind == FUNC:
            kind = ("list" if origin.value is not None and origin.value.co_name == "<listcomp>"
                    else None)
            return Plan(forces, DIRECT_COMP, result_kind=kind)
        if null_slot.origin == MAYBE_NULL:
            raise RewriteError("call site with an unknown stack layout")
        want(first_depth, SHALLOW)
        for d in range(extra_top + 1, base + 2):
            want(d, DEEP)
        return Plan(forces, DIRECT)

    # -- transfer ----------------------------------------------------------------------------
    def _transfer(self, i: int, state: State, plan: Plan) -> dict:
        """States after instruction i: {successor index: state}."""
        x = self.instrs[i]
        name = x.name
        stack, levels = list(state.stack), list(state.levels)
        unbound, kinds = list(state.unbound), list(state.kinds)
        index = self.index
        for depth, kind, wb in plan.forces:
            level = NOT_PENDING if kind == SHALLOW else PLAIN
            origin = stack[-depth].origin
            stack[-depth] = (self._named_slot(level, FAST, origin.value)
                             if type(origin) is Origin and origin.kind == FAST
                             else Slot(level, origin))
            if wb is not None and wb in index:
                levels[index[wb]] = level
                unbound[index[wb]] = 0
        barrier = name not in PURE
        results = {}
        successors = self._successors(i)
        if not successors:
            return results
        for tgt, jumped in successors:
            one = len(successors) == 1
            st = list(stack)
            lv = levels if one else list(levels)
            ub = unbound if one else list(unbound)
            kd = kinds if one else list(kinds)
            self._effect(x, name, st, lv, ub, kd, jumped, plan)
            if barrier:
                # rewritten code may have run: a pending may now be inside any container
                for k, (level, origin) in enumerate(st):
                    if level == PLAIN and origin not in NULLS:
                        if type(origin) is not Origin:
                            st[k] = ANONYMOUS[NOT_PENDING]
                        elif origin.kind == FAST:
                            st[k] = self._named_slot(NOT_PENDING, FAST, origin.value)
                        elif origin.kind != CONST:
                            st[k] = Slot(NOT_PENDING, origin)
                lv = [NOT_PENDING if v == PLAIN else v for v in lv]
            results[tgt] = _new_state((tuple(st), tuple(lv), tuple(ub), tuple(kd)))
        return results

    def _named_slot(self, level: int, kind: str, name) -> Slot:
        key = (level, kind, name)
        slot = self._named_slots.get(key)
        if slot is None:
            slot = self._named_slots[key] = Slot(level, Origin(kind, name))
        return slot

    def _exact_type(self, slot: Slot, kinds) -> Optional[str]:
        """Exact type of a stack slot's value when the analysis knows it."""
        o = slot.origin
        if type(o) is Origin:
            if o.kind == EXACT:
                return o.value
            if o.kind == FAST:
                k = self.index.get(o.value)
                return None if k is None else kinds[k]
            if o.kind == CONST and type(o.value) is tuple:
                return "tuple"
        return None

    def _store(self, st, lv, ub, kd, var, slot, maybe_unbound=0) -> None:
        """Local `var` gets `slot`'s value (None: is cleared/deleted)."""
        kind = self._exact_type(slot, kd) if slot is not None else None
        loaded = (FAST, var)
        for k, (level, origin) in enumerate(st):
            if origin == loaded:  # a value loaded from var earlier is no longer var's
                st[k] = ANONYMOUS[level]
        k = self.index.get(var)
        if k is not None:
            lv[k] = slot.level if slot is not None else PLAIN
            ub[k] = maybe_unbound
            kd[k] = kind

    def _load(self, lv, var) -> Slot:
        k = self.index.get(var)
        level = MAYBE_PENDING if k is None else lv[k]
        return self._named_slots.get((level, FAST, var)) or self._named_slot(level, FAST, var)

    def _effect(self, x, name, st, lv, ub, kd, jumped, plan) -> None:
        """Apply instruction x to the stack `st` and the per-local lists, in place."""
        index = self.index
        action = plan.action
        if name == "SWAP":
            a = x.arg
            st[-1], st[-a] = st[-a], st[-1]
            return
        if name == "COPY":
            st.append(st[-x.arg])
            return
        if name in ("LOAD_FAST", "LOAD_FAST_CHECK"):
            if type(x.arg) is not str:  # 3.13: LOAD_CLOSURE became LOAD_FAST of the cell
                st.append(ANONYMOUS[NOT_PENDING])
                return
            st.append(self._load(lv, x.arg))
            return
        if name == "LOAD_FAST_AND_CLEAR":
            # 3.12+ inlined comprehension: the saved value may be NULL (unbound), and so may
            # the local be again once STORE_FAST puts it back
            k = index.get(x.arg)
            st.append(Slot(lv[k] if k is not None else MAYBE_PENDING,
                           Origin(CLEARED, ub[k] if k is not None else 1)))
            self._store(st, lv, ub, kd, x.arg, None, 1)
            return
        if name == "LOAD_FAST_LOAD_FAST":
            for v in x.arg:
                st.append(self._load(lv, v))
            return
        if name in ("STORE_FAST", "STORE_FAST_MAYBE_NULL"):
            slot = st.pop()
            o = slot.origin
            self._store(st, lv, ub, kd, x.arg, slot,
                        o.value if type(o) is Origin and o.kind == CLEARED else 0)
            return
        if name == "STORE_FAST_LOAD_FAST":
            a, b = x.arg
            self._store(st, lv, ub, kd, a, st.pop())
            st.append(self._load(lv, b))
            return
        if name == "STORE_FAST_STORE_FAST":
            a, b = x.arg
            self._store(st, lv, ub, kd, a, st.pop())
            self._store(st, lv, ub, kd, b, st.pop())
            return
        if name == "DELETE_FAST":
            self._store(st, lv, ub, kd, x.arg, None, 1)
            return
        if name == "PUSH_NULL":
            st.append(NULL_SLOT)
            return
        if name == "LOAD_CONST":
            v = x.arg
            if isinstance(v, types.CodeType):
                st.append(Slot(PLAIN, Origin(CODE, v)))
            elif type(v) is tuple:
                st.append(Slot(PLAIN, Origin(CONST, v)))
            else:
                st.append(ANONYMOUS[PLAIN])
            return
        if name == "LOAD_NAME" and self.globals_pending:
            st.append(self._named_slot(MAYBE_PENDING, GLOBAL, x.arg))
            return
        if name == "LOAD_GLOBAL":
            push_null, gname = x.arg if isinstance(x.arg, tuple) else (False, x.arg)
            g = self._named_slot(self.global_level, GLOBAL, gname)
            if push_null:
                st.extend((g, NULL_SLOT) if CALLABLE_FIRST else (NULL_SLOT, g))
            else:
                st.append(g)
            return
        if action == METHOD_LOAD or name == "LOAD_ATTR":
            aname = x.arg[1] if isinstance(x.arg, tuple) else x.arg
            st.pop()
            a = self._named_slot(NOT_PENDING, ATTR, aname)
            if action == METHOD_LOAD:
                st.extend((a, NULL_SLOT) if CALLABLE_FIRST else (NULL_SLOT, a))
            else:
                st.append(a)
            return
        if name == "LOAD_SUPER_ATTR":
            del st[-3:]
            a = self._named_slot(NOT_PENDING, ATTR, x.arg[2])
            if action == SUPER_METHOD:
                st.extend((a, NULL_SLOT) if CALLABLE_FIRST else (NULL_SLOT, a))
            else:
                st.append(a)
            return
        if name == "MAKE_FUNCTION":
            pops = stack_pops(x)
            code_origin = st[-1].origin
            del st[-pops:]
            st.append(Slot(NOT_PENDING, Origin(FUNC, code_origin.value)
                           if type(code_origin) is Origin and code_origin.kind == CODE
                           else None))
            return
        if name == "SET_FUNCTION_ATTRIBUTE":
            f = st.pop()
            st.pop()
            st.append(f)
            return
        if name == "RETURN_GENERATOR":
            st.append(ANONYMOUS[NOT_PENDING])
            return
        if name in ("PRECALL", "KW_NAMES"):
            return
        if action == CALL or action == CALL_EX:
            del st[-stack_pops(x):]
            st.append(ANONYMOUS[MAYBE_PENDING])
            return
        if action == DIRECT or action == DIRECT_COMP:
            del st[-stack_pops(x):]
            st.append(Slot(NOT_PENDING, Origin(EXACT, plan.result_kind)
                           if action == DIRECT_COMP and plan.result_kind else None))
            return
        if action == CONCAT:
            del st[-2:]
            st.append(Slot(NOT_PENDING, Origin(EXACT, plan.result_kind)))
            return
        self._generic_effect(x, name, st, jumped)

    def _generic_effect(self, x, name, st, jumped) -> None:
        """Any other instruction: pop what it reads, push back what it keeps, then its results
        with the level its kind of result has."""
        pops = stack_pops(x)
        pushes = x.stack_effect(jump=jumped) + pops
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
        if name in CONTAINER_RESULT:
            kind = CONTAINER_RESULT[name]
            st.append(Slot(NOT_PENDING, Origin(EXACT, kind) if kind else None))
            return
        if name == "CALL_INTRINSIC_1" and int(x.arg) == INTRINSIC_LIST_TO_TUPLE:
            st.append(Slot(NOT_PENDING, Origin(EXACT, "tuple")))  # (its operand is popped above)
            return
        if name in VALUE_RESULT:
            level = PLAIN
        elif name in PENDING_RESULT:
            level = MAYBE_PENDING
        elif name == "FOR_ITER" and jumped:
            level = PLAIN
        else:
            level = NOT_PENDING
        st.extend([ANONYMOUS[level]] * pushes)
