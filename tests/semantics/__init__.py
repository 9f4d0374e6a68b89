"""The semantics corpus: scheduled functions whose return value, exception and printed output must
be the same plainly, under pydron, and through the pure-Python reference runtime.

Cases live in the cases_*.py modules, grouped by theme, and register themselves with
`registry.case`; `harness.py` runs and compares them (also usable from the command line).
"""
