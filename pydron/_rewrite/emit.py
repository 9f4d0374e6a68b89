"""Emission: the rewritten listing of an analysed code object, one kind of rewrite per function.

Walking the instructions in order, each one becomes, in this order:
  - the code entering a user handler, if one starts there (`_handler_entry`): earlier regions'
    tasks forced, the region's first failure chosen, the locals it assigned given back;
  - the forces its Plan asks for (`_forces`);
  - the force points of a region left by return, yield or re-raise (`_region_exits`);
  - the instruction itself, rewritten by its Plan's action (`_call_site`, `_call_ex_site`,
    `_store_subscr_site`, `_method_load`, `_super_method_load`, `_introspecting_call`,
    `_logged_store`, `_jump`) or kept;
  - what follows it on its fall-through edge (`_after`): regions marked again after a yield, the
    hidden marks initialised at the first RESUME, regions left or entered by falling through.
Exit edges that are jumps get their code before the jump (unconditional), on a trampoline at
the end (conditional), or after the loop's END_FOR (3.12+ FOR_ITER). Module code (and the
expressions nested in it) also gets its logged names flushed before call sites
(`_names_flushed_before`) and its name stores noted (`_noted_name_store`, `_note`).

Every inserted sequence leaves the stack as it found it and pushes at most EXTRA_STACK items
above what the original code had there.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from bytecode import Instr, Label

from .analysis import (CALL, CALL_EX, DIRECT, METHOD_LOAD, NOTE_NAME, SHALLOW, STORE_SUBSCR,
                       SUPER_METHOD, Analysis)
from .errors import RewriteError
from .listing import Builder, ExceptionEntry
from .opcodes import (CALL_PREFIXES, CALLABLE_FIRST, FOR_ITER_EXIT_SKIP, FOR_ITER_SKIPS_EXIT,
                      HAS_PRECALL, JUMP_FORWARD_OF, JUMP_IF_FALSE, JUMP_NEEDS_BOOL,
                      LOAD_ATTR_METHOD_FLAG, NO_TRAMPOLINE, RETURNS, STORES)

EXTRA_STACK = 6  # the most any inserted sequence pushes above the original stack (rt.call: 3)


class Helpers(NamedTuple):
    """The runtime's helpers (see the package doc), looked up once; None: the runtime has no
    such optional helper. The last five are a module runtime's (see `for_module`)."""
    call: object
    call_ex: object
    force: object
    force_deep: object
    store_subscr: object
    mark: object
    force_since: object
    force_before: object
    enter_handler: object = None
    handler_guard: object = None
    undo: object = None
    log_store: object = None
    logged_types: object = None
    before_call: object = None
    flush_names: object = None
    pending_names: object = None
    hide_locals: object = None

    @classmethod
    def of(cls, rt) -> "Helpers":
        return cls(rt.call, rt.call_ex, rt.force, rt.force_deep, rt.store_subscr, rt.mark,
                   rt.force_since, rt.force_before,
                   *(getattr(rt, name, None) for name in cls._fields[8:]))

    @property
    def for_module(self) -> bool:
        """The runtime runs a module's code as scheduled code: its names may hold pendings."""
        return self.pending_names is not None


def strip_hidden(result):
    """`locals()`/`vars()`/`dir()` seen from rewritten code: without the hidden locals."""
    if type(result) is dict:
        for k in [k for k in result if type(k) is str and k.startswith(".pydron_")]:
            del result[k]
    elif type(result) is list:
        result[:] = [k for k in result if not (type(k) is str and k.startswith(".pydron_"))]
    return result


class _LoopExit(NamedTuple):
    """Code of a 3.12+ FOR_ITER's exit edge, placed after the END_FOR it jumps past."""
    code: list
    entry: Optional[ExceptionEntry]     # the entry covering the FOR_ITER


class _Trampoline(NamedTuple):
    """A conditional jump out of a region goes to `label` at the end of the code, which runs
    `code` (covered by `entry`) and jumps on to the original `target`."""
    label: Label
    code: list
    entry: Optional[ExceptionEntry]
    target: Label
    location: object


def emit_instructions(analysis: Analysis, helpers: Helpers) -> Builder:
    """The rewritten instructions, in a Builder that makes them a code object."""
    return _Emitter(analysis, helpers).run()


def _call(argc, loc) -> list:
    """CALL argc, with 3.11's PRECALL before it."""
    if HAS_PRECALL:
        return [Instr("PRECALL", argc, location=loc), Instr("CALL", argc, location=loc)]
    return [Instr("CALL", argc, location=loc)]


class _Emitter:
    def __init__(self, analysis: Analysis, helpers: Helpers):
        self.a = analysis
        self.h = helpers
        self.for_module = helpers.for_module
        listing = analysis.listing
        self.listing = listing
        self.instrs = listing.instrs
        self.regions = analysis.regions
        self.out = Builder()
        self.trampolines = []
        self.after_loop_exit = {}   # index of a loop's END_FOR (3.13: POP_TOP) -> _LoopExit
        self.remark_after = {}      # index of the RESUME after a yield in user regions -> regions
        self.forced_early = set()   # calls whose forces went before their KW_NAMES/PRECALL
        self.handler_region = {}    # index of a user handler's first instruction -> region
        self.cleanup_region = {}    # label of a user handler's cleanup handler -> the region
        for lab in self.regions.marks:
            start = listing.label_index[lab]
            self.handler_region[start] = lab
            cleanup = listing.entries[start]
            if cleanup is not None:
                self.cleanup_region[cleanup.handler] = lab
        self.dropped = self._dropped_call_prefixes()
        self.first_resume = next((k for k, x in enumerate(self.instrs) if x.name == "RESUME"),
                                 None)

    def _dropped_call_prefixes(self) -> set:
        """KW_NAMES/PRECALL of calls that go through rt.call (which takes the keyword names as
        an argument and is called with its own PRECALL), and 3.13 CALL_KW's names tuple."""
        dropped = set()
        for i, plan in enumerate(self.a.plans):
            if plan is not None and plan.action == CALL:
                j = i - 1
                while j >= 0 and self.instrs[j].name in CALL_PREFIXES:
                    dropped.add(j)
                    j -= 1
                if self.instrs[i].name == "CALL_KW":
                    dropped.add(i - 1)
        return dropped

    def run(self) -> Builder:
        for i in range(len(self.instrs)):
            self._emit_instruction(i)
        self.out.labels(self.listing.trailing_labels)
        for t in self.trampolines:
            self.out.labels((t.label,))
            self.out.place(t.code + [Instr("JUMP_BACKWARD", t.target, location=t.location)],
                           t.entry)
        return self.out

    def _emit_instruction(self, i: int) -> None:
        x = self.instrs[i]
        e = self.listing.entries[i]
        loc = x.location
        self.out.labels(self.listing.labels_before[i])
        if i in self.handler_region:
            self._handler_entry(self.handler_region[i], e, loc)
        plan = self.a.plans[i]
        if plan is None:  # unreachable code: keep it as it is
            self.out.place([x], e)
            return
        if i in self.dropped:
            return
        # most instructions force nothing: skip the call (the rewrite's time is in this loop)
        has_forces = (plan.forces or x.name in CALL_PREFIXES
                      or (self.for_module and plan.action is not None))
        out = self._forces(i, x, plan, loc) if has_forces else []
        out += self._region_exits(i, x, e, loc)
        out += self._rewritten(i, x, e, plan, loc)
        out += self._after(i, x, loc)
        self.out.place(out, e)
        if i in self.after_loop_exit:
            exit_edge = self.after_loop_exit.pop(i)
            self.out.place(exit_edge.code, exit_edge.entry)

    # -- forces ------------------------------------------------------------------------------
    def _forces(self, i, x, plan, loc) -> list:
        """The operands the plan forces. A call's forces go before its KW_NAMES/PRECALL, which
        must stay adjacent to the CALL."""
        out = []
        if x.name in CALL_PREFIXES and i not in self.forced_early:
            c = i
            while self.instrs[c].name in CALL_PREFIXES:
                c += 1
            if self.a.plans[c] is not None:
                out += self._force_code(self.a.plans[c].forces, loc)
                out += self._names_flushed_before(self.instrs[c], self.a.plans[c], loc)
                self.forced_early.add(c)
            self.forced_early.update(range(i, c))
        if i not in self.forced_early:
            out += self._force_code(plan.forces, loc)
            out += self._names_flushed_before(x, plan, loc)
        return out

    def _force_code(self, forces, loc) -> list:
        out = []
        for depth, kind, writeback in forces:
            if depth > 1:
                out.append(Instr("SWAP", depth, location=loc))
            out += self._apply(self.h.force if kind == SHALLOW else self.h.force_deep, loc)
            if writeback is not None:
                out += [Instr("COPY", 1, location=loc),
                        Instr("STORE_FAST", writeback, location=loc)]
            if depth > 1:
                out.append(Instr("SWAP", depth, location=loc))
        return out

    def _names_flushed_before(self, x, plan, loc) -> list:
        """Module code (and the expressions nested in it): before a call site whose callee may
        read module globals, the names that may hold pendings are forced in place, if any
        were logged. rt.before_call(callable) leaves them for functional callees; a call
        made in place (introspection, __exit__) flushes them all."""
        if not self.for_module:
            return []
        if plan.action == CALL:
            # [NULL, c, args] (3.13: [c, NULL, args]); 3.13 CALL_KW's names are dropped
            depth = plan.argc + (2 if CALLABLE_FIRST else 1)
            flush = [Instr("COPY", depth, location=loc)] + self._apply(self.h.before_call, loc)
        elif plan.action == CALL_EX:
            depth = (3 if CALLABLE_FIRST else 2) + (x.arg & 1)
            flush = [Instr("COPY", depth, location=loc)] + self._apply(self.h.before_call, loc)
        elif plan.action == DIRECT:
            flush = self._call_no_args(self.h.flush_names, loc)
        else:
            return []
        skip = Label()
        test = [Instr("LOAD_CONST", self.h.pending_names, location=loc)]
        if JUMP_NEEDS_BOOL:
            test.append(Instr("TO_BOOL", location=loc))
        test.append(Instr(JUMP_IF_FALSE, skip, location=loc))
        return test + flush + [Instr("POP_TOP", location=loc), skip]

    def _call_no_args(self, fn, loc) -> list:
        """fn(), its result left on the stack."""
        if CALLABLE_FIRST:
            out = [Instr("LOAD_CONST", fn, location=loc), Instr("PUSH_NULL", location=loc)]
        else:
            out = [Instr("PUSH_NULL", location=loc), Instr("LOAD_CONST", fn, location=loc)]
        return out + _call(0, loc)

    def _apply(self, fn, loc) -> list:
        """TOS -> fn(TOS), as a method-form call [fn, TOS] (same layout on 3.11-3.13)."""
        return [Instr("LOAD_CONST", fn, location=loc), Instr("SWAP", 2, location=loc)] + \
            _call(0, loc)

    # -- try/with regions -----------------------------------------------------------------------
    def _region_exits(self, i, x, e, loc) -> list:
        """Leaving the innermost user region by return, yield or re-raise: its calls first."""
        name = x.name
        inside = self.regions.enclosing(i)
        out = []
        if name in RETURNS and inside:
            out += self._force_since(inside[-1], loc)
        if name == "YIELD_VALUE" and inside:
            # a generator suspended inside a try: its region's calls are settled before
            # it yields, and the calls its consumer makes meanwhile are not the region's
            # (the regions are marked again when it resumes)
            out += self._force_since(inside[-1], loc)
            j = i + 1
            while j < len(self.instrs) and self.instrs[j].name != "RESUME":
                j += 1
            if j < len(self.instrs):
                self.remark_after[j] = inside
        if name == "RERAISE" and e is not None and e.handler in self.cleanup_region:
            # leaving a handler or finally block with the exception in flight: a call
            # that failed in the block replaces it, as it would have in plain Python
            out += self._force_since(self.cleanup_region[e.handler], loc)
        return out

    def _handler_entry(self, region, e, loc) -> None:
        """At a user handler's entry: force the tasks from before each enclosing region,
        outermost first, each in the exception context of its own try statement; then the
        handler sees the region's first failure, and its assigned locals are given back."""
        chain = list(reversed(self.regions.chain(e))) if e is not None else []
        ctx = None
        for r in chain + [region]:
            ctx = self.regions.statement_entry(r)
            self.out.place(self._force_before(r, loc), ctx)
        if self.h.enter_handler is None:
            return
        # the region was aborted: the first failure inside it wins over the exception that
        # reached the handler, and later tasks are cancelled
        seq = [Instr("LOAD_CONST", self.h.enter_handler, location=loc),
               Instr("SWAP", 2, location=loc),
               Instr("LOAD_FAST", self.regions.marks[region], location=loc)] + _call(1, loc)
        for var, save in self.a.saved.get(region, ()):
            seq += [Instr("LOAD_CONST", self.h.undo, location=loc),
                    Instr("LOAD_FAST", var, location=loc),
                    Instr("LOAD_FAST", save, location=loc),
                    Instr("LOAD_CONST", var, location=loc)] + _call(2, loc)
            seq.append(Instr("STORE_FAST", var, location=loc))
        self.out.place(seq, ctx)

    def _mark(self, region, loc, save=True) -> list:
        """Entering a region: mark() into its hidden local, and the locals it may give back
        saved."""
        out = self._call_no_args(self.h.mark, loc)
        out.append(Instr("STORE_FAST", self.regions.marks[region], location=loc))
        for var, saved in self.a.saved.get(region, ()) if save else ():
            out += [Instr("LOAD_FAST", var, location=loc), Instr("STORE_FAST", saved, location=loc)]
        return out

    def _helper_on_mark(self, helper, region, loc) -> list:
        """helper(mark of region), its result dropped."""
        return ([Instr("LOAD_CONST", helper, location=loc),
                 Instr("LOAD_FAST", self.regions.marks[region], location=loc)]
                + _call(0, loc) + [Instr("POP_TOP", location=loc)])

    def _force_since(self, region, loc) -> list:
        return self._helper_on_mark(self.h.force_since, region, loc)

    def _force_before(self, region, loc) -> list:
        if self.h.handler_guard is None:
            return self._helper_on_mark(self.h.force_before, region, loc)
        # handler_guard(exc, mark): [guard, exc, mark] -> guard(exc, mark), exc left below
        return ([Instr("COPY", 1, location=loc),
                 Instr("LOAD_CONST", self.h.handler_guard, location=loc),
                 Instr("SWAP", 2, location=loc),
                 Instr("LOAD_FAST", self.regions.marks[region], location=loc)]
                + _call(1, loc) + [Instr("POP_TOP", location=loc)])

    def _edge_code(self, src, dst) -> list:
        """Code for the normal edge src -> dst: await regions left, mark regions entered."""
        left_from = self.regions.enclosing(src)
        arrive_in = self.regions.enclosing(dst) if dst is not None else ()
        loc = self.instrs[src].location
        out = []
        left = [r for r in left_from if r not in arrive_in]
        if left:
            out += self._force_since(left[-1], loc)
        entered = [r for r in arrive_in if r not in left_from]
        for r in reversed(entered):
            out += self._mark(r, self.instrs[dst].location)
        return out

    # -- the instruction itself ---------------------------------------------------------------
    def _rewritten(self, i, x, e, plan, loc) -> list:
        site = _SITES.get(plan.action)
        if site is not None:
            return site(self, x, plan, loc)
        if self.for_module and (plan.action == DIRECT or x.name == "IMPORT_STAR"):
            # 3.11/3.12 copy a module frame's fast locals, the hidden ones included, into its
            # namespace for `from m import *` and for the caller-frame readers (locals(),
            # exec, ...): they are taken out again at once
            out = self._introspecting_call(x, loc) if plan.strip_hidden else [x]
            return out + self._call_no_args(self.h.hide_locals, loc) + [
                Instr("POP_TOP", location=loc)]
        if plan.action == DIRECT and plan.strip_hidden:
            return self._introspecting_call(x, loc)
        if x.name in STORES:
            logged = self.a.logged_names(i)
            if logged:
                return self._logged_store(x, logged, loc)
        if x.has_jump():
            return self._jump(i, x, e, loc)
        return [x]

    def _call_site(self, x, plan, loc) -> list:
        """A call site [NULL, c, args...] (3.13: [c, NULL, args...]) becomes
        rt.call(c, args, kwnames)."""
        return ([Instr("BUILD_TUPLE", plan.argc, location=loc),
                 Instr("LOAD_CONST", plan.kwnames, location=loc),
                 Instr("LOAD_CONST", self.h.call, location=loc)]
                + self._under_swaps(loc) + _call(3, loc))

    def _call_ex_site(self, x, plan, loc) -> list:
        """f(*args, **kwargs) becomes rt.call_ex(f, args, kwargs or None)."""
        out = []
        if not x.arg & 1:
            out.append(Instr("LOAD_CONST", None, location=loc))
        out.append(Instr("LOAD_CONST", self.h.call_ex, location=loc))
        return out + self._under_swaps(loc) + _call(3, loc)

    def _under_swaps(self, loc) -> list:
        """A call site [NULL, c, a, k, H] (3.13: [c, NULL, a, k, H]) -> [NULL, H, c, a, k]
        (3.13: [H, NULL, c, a, k]): the helper H called with c, a, k."""
        seq = (5, 3, 2) if CALLABLE_FIRST else (4, 3, 2)
        return [Instr("SWAP", k, location=loc) for k in seq]

    def _store_subscr_site(self, x, plan, loc) -> list:
        """c[k] = v ([v, c, k]) becomes rt.store_subscr(v, c, k)."""
        out = []
        if plan.container_name is not None:   # module code: c is a global name, logged
            out += ([Instr("SWAP", 2, location=loc)] + self._note(plan.container_name, loc)
                    + [Instr("SWAP", 2, location=loc)])
        out.append(Instr("LOAD_CONST", self.h.store_subscr, location=loc))
        out += [Instr("SWAP", k, location=loc) for k in (4, 3, 2)]
        out += _call(2, loc)
        out.append(Instr("POP_TOP", location=loc))
        return out

    def _method_load(self, x, plan, loc) -> list:
        """obj.m for a call: the bound method and a NULL, so that the call site passes the
        method itself to rt.call (which sees a functional method as such)."""
        name = x.arg[1] if isinstance(x.arg, tuple) else x.arg
        out = []
        if plan.container_name is not None:   # module code: results.append(...) may move
            out += self._note(plan.container_name, loc)   # a pending into a global's list
        out += [Instr("LOAD_ATTR", (False, name) if LOAD_ATTR_METHOD_FLAG else name,
                      location=loc),
                Instr("PUSH_NULL", location=loc)]
        if not CALLABLE_FIRST:
            out.append(Instr("SWAP", 2, location=loc))
        return out

    def _super_method_load(self, x, plan, loc) -> list:
        """super().m for a call: as _method_load."""
        out = [Instr("LOAD_SUPER_ATTR", (False,) + tuple(x.arg[1:]), location=loc),
               Instr("PUSH_NULL", location=loc)]
        if not CALLABLE_FIRST:
            out.append(Instr("SWAP", 2, location=loc))
        return out

    def _noted_name_store(self, x, plan, loc) -> list:
        """STORE_NAME n of module code, the name logged first if the value is pending or a
        container that may hold pendings."""
        return self._note(x.arg, loc) + [x]

    def _note(self, name, loc) -> list:
        """With TOS left in place: `if type(TOS) in logged_types: pending_names[name] = None`,
        all in bytecode (the type() call is the interpreter's fast path), so that a store of a
        plain value in a loop costs a few instructions, not a Python call."""
        skip = Label()
        type_of = [Instr("LOAD_CONST", type, location=loc), Instr("PUSH_NULL", location=loc)]
        if not CALLABLE_FIRST:
            type_of.reverse()
        return (type_of + [Instr("COPY", 3, location=loc)] + _call(1, loc)
                + [Instr("LOAD_CONST", self.h.logged_types, location=loc),
                   Instr("CONTAINS_OP", 0, location=loc),
                   Instr(JUMP_IF_FALSE, skip, location=loc),
                   Instr("LOAD_CONST", None, location=loc),
                   Instr("LOAD_CONST", self.h.pending_names, location=loc),
                   Instr("LOAD_CONST", name, location=loc),
                   Instr("STORE_SUBSCR", location=loc), skip])

    def _introspecting_call(self, x, loc) -> list:
        """locals()/vars()/dir() called in place, the hidden locals taken out of the result."""
        return [x] + self._apply(strip_hidden, loc)

    def _logged_store(self, x, logged, loc) -> list:
        """STORE_FAST x as x = log_store(value, x, "x"): the value x held before a pending is
        remembered with it, for undo at a handler."""
        if x.name == "STORE_FAST":
            stores, then = [x.arg], None
        elif x.name == "STORE_FAST_LOAD_FAST":
            stores, then = [x.arg[0]], x.arg[1]
        else:
            stores, then = list(x.arg), None
        out = []
        for n in stores:
            if n in logged:
                out += [Instr("LOAD_CONST", self.h.log_store, location=loc),
                        Instr("SWAP", 2, location=loc), Instr("LOAD_FAST", n, location=loc),
                        Instr("LOAD_CONST", n, location=loc)] + _call(2, loc)
            out.append(Instr("STORE_FAST", n, location=loc))
        if then is not None:
            out.append(Instr("LOAD_FAST", then, location=loc))
        return out

    def _jump(self, i, x, e, loc) -> list:
        """A jump whose edge leaves or enters a region gets that edge's code on the way."""
        target = self.listing.label_index[x.arg]
        code = self._edge_code(i, target) if target < len(self.instrs) else []
        if not code:
            return [x]
        if x.is_uncond_jump():
            return code + [x]
        if x.name == "FOR_ITER" and FOR_ITER_SKIPS_EXIT:
            k = len(FOR_ITER_EXIT_SKIP)
            if (tuple(y.name for y in self.instrs[target:target + k]) != FOR_ITER_EXIT_SKIP
                    or any(self.listing.labels_before[j] for j in range(target + 1, target + k))):
                raise RewriteError("unexpected loop exit layout")
            self.after_loop_exit[target + k - 1] = _LoopExit(code, e)
            return [x]
        if x.name in NO_TRAMPOLINE:
            raise RewriteError("%s leaves a try region" % x.name)
        t = Label()
        self.trampolines.append(_Trampoline(t, code, e, x.arg, loc))
        return [Instr(JUMP_FORWARD_OF.get(x.name, x.name), t, location=loc)]

    # -- after the instruction ------------------------------------------------------------------
    def _after(self, i, x, loc) -> list:
        out = []
        if i in self.remark_after:
            for r in reversed(self.remark_after.pop(i)):
                out += self._mark(r, loc, save=False)
        if x.name == "RESUME" and i == self.first_resume and x.arg == 0:
            # every hidden mark is bound from the start, so that no path reads one unbound
            for m in self.regions.marks.values():
                out += [Instr("LOAD_CONST", 0, location=loc), Instr("STORE_FAST", m, location=loc)]
        if not x.is_final() and i + 1 < len(self.instrs) and not x.is_uncond_jump():
            out += self._edge_code(i, i + 1)
        return out


_SITES = {
    CALL: _Emitter._call_site,
    CALL_EX: _Emitter._call_ex_site,
    STORE_SUBSCR: _Emitter._store_subscr_site,
    METHOD_LOAD: _Emitter._method_load,
    SUPER_METHOD: _Emitter._super_method_load,
    NOTE_NAME: _Emitter._noted_name_store,
}
