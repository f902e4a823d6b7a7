# minerd: the two commands a new user needs are `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test test-fast bench gpu-check lint clean

setup: $(STAMP)

# Idempotent: re-runs pip only when the dependency declarations change.
# constraints.txt pins torch to the CPU build on machines without a GPU.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,ft]'
	touch $(STAMP)

run: setup
	$(BIN)/minerd run $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m bench $(BENCH_ARGS)

# On a CUDA machine: one table of GPU checks, exit 1 on a failure (docs/PERFORMANCE.md, "GPU check").
# Without CUDA it exits 2; GPU_CHECK_ARGS=--cpu-rehearsal runs the same plumbing on the CPU.
gpu-check: setup
	$(BIN)/python -m bench.gpu_check $(GPU_CHECK_ARGS)

lint: setup
	$(BIN)/ruff check daemon api tests bench
	$(BIN)/mypy daemon api bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
