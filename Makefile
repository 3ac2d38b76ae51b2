# gemini-sim: the two set-up commands are `make run` and `make test`; both build .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench clean runtime-demo calibrate netns-up netns-down

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/gemini-sim replay --trace traces/bloom176b.csv --preset gemini-paper --out out
	$(BIN)/gemini-sim plan --trace traces/bloom176b.csv --preset gemini-paper -o out/plan.json --plot out/plan-pareto.png

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests --nbmake notebooks

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

bench: $(STAMP)
	$(BIN)/python bench/run.py --out bench/results.md

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
