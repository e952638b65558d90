# edgeseq: every job a fresh machine needs. `make demo` and `make test` install on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
RUN    ?= runs/demo

.PHONY: install demo test test-aarch64 lint typecheck pytest bench clean reference-models

install: $(STAMP)

# Idempotent: the venv is (re)built only when the dependency pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[train,daemon,dev]'
	touch $(STAMP)

demo: install
	$(BIN)/edgeseq demo --out $(RUN)

lint: install
	$(BIN)/ruff check edgeseq tests devices/*.py devices/aarch64
	$(BIN)/ruff format --check edgeseq tests devices/*.py devices/aarch64

typecheck: install
	$(BIN)/mypy

# One worker per core, each test file on one worker (its daemons, brokers and fixtures stay
# together): on 2 cores the suite takes 5 minutes instead of 12.
pytest: install
	$(BIN)/python -m pytest -q -m "not slow" -n auto --dist loadfile

test: lint typecheck pytest

# The runtime and the daemon on 64-bit ARM under QEMU, installed from a bundle (needs root).
test-aarch64: install
	$(BIN)/python devices/aarch64/harness.py

# Slow measurements (long recordings, soak, drift) and the speed report BENCHMARKS.md.
bench: install
	$(BIN)/python -m pytest -q -s -m slow
	$(BIN)/edgeseq bench export/bench-lstm.onnx export/bench-gru.onnx export/bench-rnn.onnx --models-in export --write BENCHMARKS.md
	$(BIN)/edgeseq loadtest export/pump-lstm.onnx --streams 1000 --connections 4 --seconds 20 --soak 600 --stdin-lines 200000 --mqtt --write BENCHMARKS.md
	$(BIN)/edgeseq cluster-bench export/pump-lstm.onnx --streams 10000 --samples 100 --write BENCHMARKS.md

# Regenerate every reference model in export/ (model + golden I/O) from its recipe.
reference-models: install
	$(BIN)/edgeseq replay export/recipes/*.toml --out-dir export

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
