# The two commands of the README:
#   make run    set up .venv (pinned, CPU torch) and run the whole embedded DAG to results/summary/comparison.md
#   make test   set up .venv, check the code (make lint: ruff, snakefmt, snakemake --lint) and run the test suite
#               (tests/test_layers.py among them)
#
# Which torch build: TORCH_VARIANT=cpu (default) installs the +cpu wheel (no CUDA libraries, a few hundred MB) from
# pip's configured indexes and find-links when they have it (a mirror, a local wheel directory), else from PyTorch's
# CPU index; TORCH_VARIANT=cuda installs PyPI's default build, which brings the CUDA libraries (for GPU machines:
# `make setup TORCH_VARIANT=cuda`). requirements.lock pins the version for both; the variant is installed first, so
# the lock's plain `torch==` pin is already satisfied by it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VARIANT ?= cpu
TORCH_VERSION := $(shell sed -n 's/^torch==//p' requirements.lock)
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
ifeq ($(TORCH_VARIANT),cpu)
TORCH_INSTALL := "torch==$(TORCH_VERSION)+cpu" || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)+cpu" \
	--extra-index-url $(TORCH_CPU_INDEX)
else ifeq ($(TORCH_VARIANT),cuda)
TORCH_INSTALL := "torch==$(TORCH_VERSION)"
else
$(error TORCH_VARIANT must be cpu or cuda, not '$(TORCH_VARIANT)')
endif

.PHONY: run test lint dryrun setup clean

$(BIN)/.installed-$(TORCH_VARIANT): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INSTALL)
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

setup: $(BIN)/.installed-$(TORCH_VARIANT)

run: setup
	$(BIN)/snakemake

dryrun: setup
	$(BIN)/snakemake -n

# ruff (config in pyproject.toml), snakefmt, and Snakemake's own linter (it plans the embedded default; nothing runs)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile rules/
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --lint --directory "$$(mktemp -d)"

test: lint
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf results .snakemake
