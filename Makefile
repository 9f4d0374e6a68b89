# pydron — the two commands a new user needs: `make demo` and `make test`.
# Both set up what is missing first (Debian packages, a virtualenv, the C extension).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
BUILD  ?= build/dev
APT_PACKAGES := cmake pkg-config libffi-dev libxxhash-dev llvm-dev graphviz openssl
PIP_PACKAGES := bytecode cloudpickle tblib numpy threadpoolctl pytest pytest-timeout psutil \
                joblib "dask[distributed]" matplotlib rich scikit-build-core

# Other interpreters on the machine also run the semantics and rewrite tests (CPython 3.12, 3.13).
EXTRA_PYTHONS := $(foreach v,3.12 3.13,$(shell tools/find-python.sh $(v)))
EXTRA_PIP := bytecode cloudpickle tblib numpy threadpoolctl pytest pytest-timeout psutil \
             "dask[distributed]"
# A virtualenv made before a package joined the lists gets it at the next setup.
PIP_STAMP := $(VENV)/.pip-$(shell echo '$(PIP_PACKAGES)' | cksum | cut -d' ' -f1)

.PHONY: setup build demo test test-versions asan valgrind fuzz chaos bench clean
setup: $(VENV)/.ready $(PIP_STAMP) build

$(VENV)/.ready:
	tools/install-system-deps.sh $(APT_PACKAGES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_PACKAGES)
	echo "$(CURDIR)" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/pydron-dev.pth
	printf '#!%s\nimport sys\nfrom pydron.cli import main\nsys.exit(main())\n' "$(abspath $(PY))" > $(VENV)/bin/pydron
	chmod +x $(VENV)/bin/pydron
	touch $@

$(PIP_STAMP): $(VENV)/.ready
	$(PY) -m pip install -q $(PIP_PACKAGES)
	rm -f $(VENV)/.pip-*
	touch $@

# Build the extension in place (pydron/_core*.so) so the virtualenv imports this checkout.
build: $(VENV)/.ready $(PIP_STAMP)
	cmake -S . -B $(BUILD) -DPython_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release \
	      -DPYDRON_C_TESTS=ON -DPYDRON_SANITIZE=$(SANITIZE) >/dev/null
	cmake --build $(BUILD) -j2
	@# replace, never overwrite, the library: running processes keep the one they mapped
	@for so in $(BUILD)/_core*.so; do cp $$so pydron/.core.new && mv -f pydron/.core.new pydron/$$(basename $$so); done

SANITIZE ?= OFF

demo: setup
	$(PY) bench/pipeline_demo.py

test: setup
	cd $(BUILD) && ctest --output-on-failure
	$(PY) -m pytest -q tests
	$(MAKE) test-versions

# For each extra interpreter: its own virtualenv and build, then the semantics and rewrite tests.
test-versions:
	@set -e; for py in $(EXTRA_PYTHONS); do \
	  v=$$($$py -c 'import sys; print("%d%d" % sys.version_info[:2])'); venv=.venv$$v; \
	  if [ ! -f $$venv/.ready ]; then $$py -m venv $$venv && $$venv/bin/pip install -q $(EXTRA_PIP) && \
	    echo "$(CURDIR)" > $$($$venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/pydron-dev.pth && \
	    touch $$venv/.ready; fi; \
	  $$venv/bin/python -c 'import threadpoolctl, distributed' 2>/dev/null || $$venv/bin/pip install -q $(EXTRA_PIP); \
	  cmake -S . -B build/py$$v -DPython_EXECUTABLE=$(CURDIR)/$$venv/bin/python -DCMAKE_BUILD_TYPE=Release >/dev/null; \
	  cmake --build build/py$$v -j2 >/dev/null; \
	  for so in build/py$$v/_core*.so; do cp $$so pydron/.core.new && mv -f pydron/.core.new pydron/$$(basename $$so); done; \
	  echo "== semantics and rewrite tests under $$($$venv/bin/python -V)"; \
	  $$venv/bin/python -m pytest -q tests/test_semantics.py tests/test_rewrite.py tests/test_api.py \
	    tests/test_check.py tests/test_crossing.py tests/test_array_layout.py \
	    tests/test_check_runtime.py tests/test_copy_memo.py; \
	done

# The C core under AddressSanitizer + UndefinedBehaviorSanitizer, running the test suite.
asan:
	$(MAKE) build BUILD=build/asan SANITIZE=ON
	PYDRON_SANITIZED=1 ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	$(PY) -m pytest -q -x tests -m "not nosan"
	$(MAKE) build

# The C core under valgrind memcheck (master and workers): errors and definite leaks whose stack
# passes through pydron's C code fail the run.
valgrind: setup
	tools/install-system-deps.sh valgrind
	$(PY) tools/valgrind-check.py $(PY) tests/valgrind/smoke.py

# libFuzzer (clang) on what the master reads from memory a worker may have scribbled on: blobs,
# result and indirect records, whole result rings. Bounded in time; CI runs it.
FUZZ_SECONDS ?= 60
fuzz:
	tools/install-system-deps.sh clang-14 libclang-rt-14-dev
	mkdir -p build/fuzz/corpus
	clang-14 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I. \
	    tests/fuzz/fuzz_wire.c exec/wire.c exec/arena.c exec/ring.c -o build/fuzz/fuzz_wire
	clang-14 -g -O1 -fsanitize=fuzzer,address,undefined -DFUZZ_ORACLE_SELFTEST -I. \
	    tests/fuzz/fuzz_wire.c exec/wire.c exec/arena.c exec/ring.c -o build/fuzz/fuzz_oracle_selftest
	! build/fuzz/fuzz_oracle_selftest tests/fuzz/regressions/* >build/fuzz/selftest.log 2>&1 || \
	    { echo "fuzz_wire: its oracle let a buffer past its block through"; exit 1; }
	build/fuzz/fuzz_wire tests/fuzz/regressions/*
	build/fuzz/fuzz_wire build/fuzz/corpus -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -artifact_prefix=build/fuzz/

# A long chaos run: random SIGKILLs of workers and the fork server under load (tests/chaos.py).
CHAOS_SECONDS ?= 120
chaos: setup
	$(PY) tests/chaos.py --seconds $(CHAOS_SECONDS) --tasks 2000 --kill-every 0.02 0.2

bench: setup
	mkdir -p bench/results
	$(PY) -m pydron bench --json bench/results/bench.json --plot bench/results/bench.png

clean:
	rm -rf build pydron/_core*.so
