# Two set-up commands on a fresh clone: `make demo` and `make test`.
# torch is installed first and pinned, so pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: demo test lint bench clean gpu-wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"

# one stamp per set of extras: the test suite needs [dev], the demo and benchmark [bench] too
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $@ $(VENV)/.installed-dev

demo: $(VENV)/.installed-bench
	$(BIN)/tiesmerge demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/minilm/run.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

# mergekit 0.1.5 and what it needs beyond the lent GPU machines' image (Python 3.12, no network), as
# wheels in .whl/ for benchmarks/gpu_check.sh, which installs them there (the device tool carries .whl)
GPU_WHEELS := mergekit==0.1.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
	immutables==0.21 typing-extensions click tqdm
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl $(GPU_WHEELS)
