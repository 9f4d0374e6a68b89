"""The boundary with the PyPI package `bytecode`, which does the assembly (jumps, EXTENDED_ARG,
caches, exception and line tables): a code object taken apart into a flat listing of
instructions, each with the exception-table entry covering it and the labels in front of it
(`decompose`), and the rewritten instructions put back together into a code object
(`Builder`).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Optional

from bytecode import Bytecode, Instr, Label, TryBegin, TryEnd

from .errors import RewriteError


@dataclasses.dataclass(frozen=True, eq=False)
class ExceptionEntry:
    """One entry of the exception table: where an exception raised in the covered instructions
    goes. Compared by identity: one object per TryBegin of the original code."""
    handler: Label
    push_lasti: bool
    stack_depth: int


@dataclasses.dataclass(eq=False)
class Listing:
    """A code object as the analysis and the emission see it: instruction i is `instrs[i]`,
    covered by `entries[i]` (None: no handler), preceded by the labels `labels_before[i]`."""
    code: types.CodeType
    bytecode: Bytecode                  # as read from `code`: its attributes go to the output
    instrs: list
    entries: list
    labels_before: list
    label_index: dict                   # Label -> index of the instruction it precedes
    trailing_labels: list               # labels after the last instruction
    local_index: dict                   # local variable name -> index in co_varnames

    def handler_index(self, entry: ExceptionEntry) -> int:
        """Index of the first instruction of `entry`'s handler."""
        return self.label_index[entry.handler]


def decompose(code: types.CodeType) -> Listing:
    bc = Bytecode.from_code(code, conserve_exception_block_stackdepth=True)
    instrs, entries, labels_before = [], [], []
    label_index = {}
    entry_of_begin = {}
    covering = None
    waiting_labels = []
    for item in bc:
        if isinstance(item, Instr):
            for lab in waiting_labels:
                label_index[lab] = len(instrs)
            labels_before.append(waiting_labels)
            waiting_labels = []
            instrs.append(item)
            entries.append(covering)
        elif isinstance(item, Label):
            waiting_labels.append(item)
        elif isinstance(item, TryBegin):
            entry = entry_of_begin.get(id(item))
            if entry is None:
                entry = entry_of_begin[id(item)] = ExceptionEntry(
                    item.target, item.push_lasti, item.stack_depth)
            covering = entry
        elif isinstance(item, TryEnd):
            covering = None
        else:  # SetLineno does not occur in from_code output
            raise RewriteError("unexpected bytecode item %r" % (item,))
    for lab in waiting_labels:
        label_index[lab] = len(instrs)
    return Listing(code, bc, instrs, entries, labels_before, label_index, waiting_labels,
                   {n: i for i, n in enumerate(code.co_varnames)})


class Builder:
    """The rewritten code as `bytecode` takes it, built in order: labels, and instructions placed
    with the exception-table entry that covers them (TryBegin/TryEnd where that changes)."""

    def __init__(self):
        self.items = []
        self._entry = None      # the entry covering the instructions placed last
        self._begin = None      # its TryBegin

    def labels(self, labels) -> None:
        self.items.extend(labels)

    def place(self, instrs: list, entry: Optional[ExceptionEntry]) -> None:
        if not instrs:
            return
        if entry is not self._entry:
            if self._begin is not None:
                self.items.append(TryEnd(self._begin))
            self._begin = None
            if entry is not None:
                self._begin = TryBegin(entry.handler, entry.push_lasti, entry.stack_depth)
                self.items.append(self._begin)
            self._entry = entry
        self.items.extend(instrs)

    def to_code(self, listing: Listing, stacksize: int) -> types.CodeType:
        """The code object, with the attributes of the listing's code (names, flags, argument
        counts, first line...)."""
        if self._begin is not None:
            self.items.append(TryEnd(self._begin))
            self._begin = self._entry = None
        return _to_code_object(self.items, listing.bytecode, listing.code.co_varnames, stacksize)


def _to_code_object(items: list, original: Bytecode, varnames: tuple,
                    stacksize: int) -> types.CodeType:
    """Assemble `items` into a code object. The one use of private parts of `bytecode` (a new
    release may change them; every rewrite goes through here, so the rewrite tests would fail
    at once), needed because its public `Bytecode.to_code()` cannot:
    - keep the original locals at their indexes: it numbers locals in order of first use,
      so a hidden local (`.pydron_mark0`) could take the slot of a local of the user's; frames,
      `locals()` and the C hook (which copies a frame's arguments by index) need the original
      co_varnames as a prefix. `_ConvertBytecodeToConcrete.add_varname` seeds them in order;
    - take our stack size: its own computation (and that of the exception handlers' entry
      depths) is thrown off by the code inserted at handler entries, which runs deeper than
      the entry. Every inserted sequence leaves the stack as it found it, so the original
      co_stacksize plus the deepest inserted sequence is exact; the converter's
      `compute_exception_stack_depths=False` keeps the depths decompose() read;
    - copy every attribute of the original code (name, qualname, flags, argument counts,
      cell and free variables, first line, docstring): `Bytecode._copy_attr_from`.
    """
    from bytecode.concrete import _ConvertBytecodeToConcrete

    bc = Bytecode(items)
    bc._copy_attr_from(original)
    converter = _ConvertBytecodeToConcrete(bc)
    for name in varnames:
        converter.add_varname(name)
    concrete = converter.to_concrete_bytecode(compute_exception_stack_depths=False)
    return concrete.to_code(stacksize=stacksize, compute_exception_stack_depths=False)
