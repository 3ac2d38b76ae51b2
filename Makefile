# gemini-sim: the two set-up commands are `make run` and `make test`; both build .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-long test-torch test-titan bench clean runtime-demo calibrate netns-up netns-down gpu-wheels gpu-bench

# OFFLINE=1: a machine with its own torch (and numpy, scipy, networkx, matplotlib) that reaches no registry, the
# GPU machine: the venv sees the packages $(PYTHON) sees and installs the rest from wheels/ (made by make gpu-wheels).
# $(PYTHON) may itself be a venv's (the GPU machine's python3 is /opt/torch/.venv's), and a venv made from a venv
# sees only the base interpreter's packages, not that venv's: so a .pth file in ours adds $(PYTHON)'s site
# directories (after our own), and pip comes from wheels/ where it is not there.
OFFLINE  ?=
GPU_PY   ?= 3.12
GPU_PKGS := "setuptools>=77,<82" xxhash==4.1.0 simpy==4.1.2 tqdm==4.70.1 jsonschema==4.26.0 dask==2026.8.0 \
            distributed==2026.8.0 pytest==9.2.0 pytest-xdist==3.8.0 pytest-timeout==2.4.0 hypothesis==6.170.15 \
            nbmake==1.5.5 ipykernel==7.4.0
GPU_PIP  := pip==26.3
SITES    := import site; print("import site; " + "; ".join("site.addsitedir(%r)" % p for p in site.getsitepackages()))

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(if $(OFFLINE),--system-site-packages --without-pip) $(VENV)
ifeq ($(OFFLINE),)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
else
	$(PYTHON) -c '$(SITES)' > \
	  "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_gemini_parent.pth"
	$(BIN)/python -c 'import torch' 2> /dev/null || \
	  { echo "OFFLINE=1: $(PYTHON) has no torch for the venv to use" >&2; exit 2; }
	$(BIN)/python -m pip --version > /dev/null 2>&1 || \
	  $(BIN)/python $(firstword $(wildcard wheels/pip-*.whl) wheels/pip-missing.whl)/pip install --quiet --no-index \
	  --find-links wheels $(GPU_PIP)
	$(BIN)/python -m pip install --quiet --no-index --find-links wheels $(GPU_PKGS)
	$(BIN)/python -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
endif
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/gemini-sim replay --trace traces/bloom176b.csv --preset gemini-paper --out out
	$(BIN)/gemini-sim plan --trace traces/bloom176b.csv --preset gemini-paper -o out/plan.json --plot out/plan-pareto.png

# WORKERS: pytest processes (2, the CI machine's cores; a larger machine may give more).
WORKERS ?= 2
# whole files to a worker, in the order conftest.py gives them (the longest first)
DIST := --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) $(DIST) -m "not long" tests --nbmake notebooks

# Everything make test runs, and the cases it leaves out (marked long: the fault matrix on the second example).
test-long: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) $(DIST) tests --nbmake notebooks

# The tests on another torch than the pinned one (the runtime supports torch >= 2.6), in a venv of their own,
# .venv-torch-VERSION: make test-torch TORCH=2.7.1. From PyPI that torch is a CUDA build (a few GB to download) that
# trains on the CPU too; FSDP2 trains on the CPU from 2.7, so on 2.6 without a GPU the tests that need it skip.
TORCH ?= 2.6.0
test-torch:
	test -x .venv-torch-$(TORCH)/bin/python || $(PYTHON) -m venv .venv-torch-$(TORCH)
	.venv-torch-$(TORCH)/bin/python -m pip install --quiet torch==$(TORCH) -e '.[test,runtime]'
	.venv-torch-$(TORCH)/bin/python -m pytest -q -n $(WORKERS) $(DIST) tests

# TorchTitan's Llama 3 under the Checkpointer (examples/titan) and its fault matrix, in a venv of its own: TorchTitan
# pulls datasets, tensorboard, tokenizers and more that nothing else needs. CI runs it after make test.
test-titan:
	test -x .venv-titan/bin/python || $(PYTHON) -m venv .venv-titan
	.venv-titan/bin/python -m pip install --quiet -e '.[dev,titan]'
	.venv-titan/bin/python -m pytest -q -n $(WORKERS) tests/test_faults_titan.py

runtime-demo: $(STAMP)
	$(BIN)/python examples/tinygpt/demo.py out/runtime-demo

# Runtime -> profile -> simulator -> plan -> runtime, per schedule; prints predicted vs measured (out/calibrate).
# Uses tc-limited network namespaces when this host allows them (root), else plain localhost; 2 machines with an
# emulated accelerator by default (python examples/tinygpt/calibrate.py --help for the others; docs/runtime.md).
calibrate: $(STAMP)
	$(BIN)/python examples/tinygpt/calibrate.py out/calibrate

# Bandwidth-limited "machines" for the runtime by hand: make netns-up MACHINES=4 MBIT=400, then
# python -m runtime.agent --netns ... -- SCRIPT; make netns-down removes them.
MACHINES ?= 4
MBIT     ?= 400
netns-up: $(STAMP)
	$(BIN)/python -m runtime.netns up --machines $(MACHINES) --mbit $(MBIT)

netns-down: $(STAMP)
	$(BIN)/python -m runtime.netns down

# the peers section's peers (the bench extra) too; a machine without a registry runs the others
bench: $(STAMP)
	$(if $(OFFLINE),,$(BIN)/python -m pip install --quiet -e '.[dev,bench]')
	$(BIN)/python bench/run.py --out bench/results.md

clean:
	rm -rf $(VENV) .venv-torch-* .venv-titan out .pytest_cache .hypothesis

# Wheels for OFFLINE=1 (see above), for Python $(GPU_PY); carry wheels/ to that machine with the working tree.
gpu-wheels:
	$(PYTHON) -m pip download --quiet --python-version $(GPU_PY) --only-binary=:all: \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d wheels $(GPU_PKGS) $(GPU_PIP)
	# and make itself, unpacked, for a machine without it (bench/gpu_session.sh puts it on PATH there): from Debian's
	# registry, so on a Debian or Ubuntu host (make 4.3 needs glibc 2.27 or later)
	test -x wheels/make/usr/bin/make || ! command -v apt-get > /dev/null || \
	  (cd wheels && apt-get download -q make 2> /dev/null && dpkg -x make_*.deb make && rm make_*.deb)

# On the GPU machine (carry wheels/ from make gpu-wheels), after `make test OFFLINE=1` in a call of its own: the
# runtime's checkpoint path against DCP at the first state size per rank (GIB: the sizes, default 1 and 8) with the
# compute-bound overhead case, the runtime bench, the calibration, then the other sizes (the longest), into out/gpu/. bench/gpu_session.sh runs both within a device session's time.
# GPU_RESULTS: where the table goes (rewritten after every bench, so a run cut short keeps what finished).
GIB ?=
GPU_RESULTS ?= out/gpu/results.md
gpu-bench:
	$(MAKE) $(STAMP) OFFLINE=1
	mkdir -p out/gpu
	GEMINI_BENCH_GIB="$(GIB)" $(BIN)/python bench/run.py --only state-path --only runtime --only calibration \
	  --only state-path-large --out $(GPU_RESULTS)
