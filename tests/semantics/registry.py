"""Registration of semantics cases: each case is a scheduled function plus the arguments it is
called with, declared next to it, and whether plain Python raises for it (a self-check)."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import pkgutil
from typing import Any, Callable

_CASES: dict[str, "Case"] = {}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str                       # "<theme>.<qualname>", unique, stable: used as the test id
    fn: Callable[..., Any]          # the @pydron.schedule function (or method, called unbound)
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    raises: type | None = None      # the exception class plain Python raises, None if it returns
    # mode -> why that mode cannot match plain Python here (an inherent limit, not a bug): the
    # test is an expected failure in that mode, strict, so a surprise pass is reported too.
    known_differences: dict = dataclasses.field(default_factory=dict)
    submits_tasks: bool = True      # under pydron, at least one task must be submitted

    def fresh_arguments(self) -> tuple[tuple, dict]:
        """Deep copies, so a case that mutates its arguments cannot change the next run's."""
        return copy.deepcopy(self.args), copy.deepcopy(self.kwargs)

    def __repr__(self) -> str:
        return f"Case({self.name})"


def case(*args: Any, kwargs: dict | None = None, raises: type | None = None,
         name: str | None = None, known_differences: dict | None = None,
         submits_tasks: bool = True) -> Callable:
    """Register the decorated scheduled function as a case called with `*args, **kwargs`.

    Put it above `@pydron.schedule`; the function is returned unchanged.
    """
    def register(fn: Callable) -> Callable:
        theme = fn.__module__.rpartition(".")[2].removeprefix("cases_")
        case_name = f"{theme}.{name or fn.__qualname__}"
        if case_name in _CASES:
            raise ValueError(f"duplicate semantics case {case_name}")
        _CASES[case_name] = Case(case_name, fn, tuple(args), dict(kwargs or {}), raises,
                                 dict(known_differences or {}), submits_tasks)
        return fn
    return register


def load_all() -> list[Case]:
    """Import every cases_* module of this package and return all cases, in definition order."""
    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("cases_"):
            importlib.import_module(f"{__package__}.{info.name}")
    return list(_CASES.values())
