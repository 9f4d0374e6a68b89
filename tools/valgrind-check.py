#!/usr/bin/env python3
"""Run a Python script under valgrind memcheck (master and forked workers) and fail on memory
errors or definite leaks whose stack passes through pydron's C core. Errors wholly inside CPython,
glibc's loader or other libraries are listed as ignored, not hidden.

    tools/valgrind-check.py PYTHON SCRIPT
"""
import glob
import os
import re
import subprocess
import sys
import tempfile

OURS = re.compile(r"_core\.cpython|/(trace|graph|exec|jit)/[a-z_]+\.c")
BLOCK_START = re.compile(r"^==\d+== (Invalid|Conditional|Use of uninitialised|Syscall param|"
                         r"Mismatched|[0-9,]+ bytes in [0-9,]+ blocks are definitely lost)")


def blocks(log):
    """Error reports of one valgrind log: lists of lines."""
    current = None
    for line in log.splitlines():
        if BLOCK_START.match(line):
            current = [line]
            yield current
        elif current is not None:
            if re.match(r"^==\d+== *$", line):
                current = None
            else:
                current.append(line)


def main():
    python, script = sys.argv[1], sys.argv[2]
    logdir = tempfile.mkdtemp(prefix="pydron-valgrind-")
    env = dict(os.environ, PYTHONMALLOC="malloc")
    cmd = ["valgrind", "--tool=memcheck", "--leak-check=full", "--errors-for-leak-kinds=definite",
           "--child-silent-after-fork=no", f"--log-file={logdir}/vg.%p.log", python, script]
    proc = subprocess.run(cmd, env=env, timeout=1800)
    ours, ignored = [], 0
    for path in sorted(glob.glob(f"{logdir}/vg.*.log")):
        for block in blocks(open(path).read()):
            if any(OURS.search(line) for line in block):
                ours.append((path, block))
            else:
                ignored += 1
    for path, block in ours:
        print(f"--- {os.path.basename(path)}")
        print("\n".join(block))
    print(f"valgrind: {len(ours)} error(s) in pydron's C core, {ignored} outside it ignored "
          f"(logs in {logdir}); script exit status {proc.returncode}")
    sys.exit(1 if ours or proc.returncode != 0 else 0)


if __name__ == "__main__":
    main()
