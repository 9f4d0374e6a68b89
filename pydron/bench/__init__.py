"""`pydron bench`: workloads written once as sequential Python with the decorators, run
on pydron and on its peers side by side (harness.py drives, child.py measures)."""
