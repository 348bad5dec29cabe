# One entry point for humans and CI. `make test` builds .venv from nothing and runs every test tier.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
# One ninja for every DeepSpeed JIT build (the venv's): two ninja versions sharing a build folder rebuild it each time.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export TOKENIZERS_PARALLELISM := false
# GPUs when nvidia-smi sees any; otherwise DeepSpeed's CPU accelerator with one rank that uses every core:
# on a 2-core machine that beat 2 gloo ranks of one thread each (benchmarks/RESULTS.md, vs_trl.py's
# orpo-ds:2x1-zero3 row), whose ZeRO-3 traffic costs more than the second rank brings. `make train RANKS=2
# OMP_NUM_THREADS=1` runs the 2-rank layout; the distributed tests cover it either way.
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
ifeq ($(GPUS),0)
export DS_ACCELERATOR := cpu
export OMP_NUM_THREADS ?= $(shell nproc)
RANKS ?= 1
# One CPU rank: ZeRO-3 partitions nothing in a world of one and only adds its gathers and copies. On the
# main job ZeRO-0 peaked at 0.73x the memory, same losses, training time within the machine's noise
# (benchmarks/RESULTS.md, vs_trl.py's orpo-ds:zero3 row), so `make train` runs it with ds_configs/zero0.json.
# `make train DS_CONFIG=` keeps the config's own, and a deepspeed.config in OVERRIDES wins (it comes
# later). Several ranks, or any GPU: the config's own.
ifeq ($(RANKS),1)
DS_CONFIG ?= ds_configs/zero0.json
endif
else
RANKS ?= $(GPUS)
endif
CONFIG ?= configs/demo.yaml

.PHONY: setup lint test test-unit test-dist assets train clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q torch==2.13.0; fi; fi
	$(PY) -m pip install -q -e ".[dev,demo,tracking]"
	touch $(STAMP)

# ruff with the small rule set in pyproject.toml (pyflakes, pycodestyle, isort, bugbear, blind excepts),
# then import-linter's contracts there: the package's layers import downward only, and only the runtime
# (engine, ds_config) imports deepspeed.
lint: setup
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

# The main job: fetch + verify the real assets, then ORPO on them (see configs/demo.yaml).
assets: setup
	$(PY) -m orpo_ds.tools.assets

# launch/deepspeed.sh runs `deepspeed --num_gpus $(RANKS) --module orpo_ds train --config $(CONFIG) ...`.
# CONFIG, OVERRIDES and GPUS_PER_NODE reach it in the environment, never in the recipe's text, and the script
# splits OVERRIDES on whitespace only (launch/common.sh): `make train OVERRIDES='a=1; rm x'` passes the
# three words `a=1;` `rm` `x` and runs nothing. $(value ...) keeps make from expanding a `$` in them. The
# script's other variables apply as well (OUTPUT_DIR, MASTER_PORT, DRY_RUN=1: print the command, run nothing).
train: override export CONFIG := $(value CONFIG)
train: override export OVERRIDES := $(if $(DS_CONFIG),deepspeed.config=$(DS_CONFIG) )$(value OVERRIDES)
train: export GPUS_PER_NODE := $(RANKS)
train: assets
	PYTHON=$(PY) launch/deepspeed.sh

test-unit: setup
	$(PY) -m pytest -q -ra tests/unit

test-dist: setup
	$(PY) -m pytest -q -ra tests/distributed

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
