# Every target creates .venv if it is missing and installs what it needs (idempotent: the install
# step re-runs only when pyproject.toml changes), so each is the only command a user types.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
WORKDIR ?= workdirs/demo
# Parallel test workers: 2 cores here; override with `make test JOBS=8`.
JOBS   ?= 2

# The TPU compiler for `dreamjax aot`, beside the project rather than in the venv (with libtpu in the venv every
# CPU-only JAX process would first probe for TPU chips). The version jax[tpu]==0.10.2 pins.
LIBTPU ?= libtpu==0.0.42.1
TPU_DIR := .tpu

.PHONY: install tpu aot demo test test-slow bench bench-gpu lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[torch,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

$(TPU_DIR)/.installed: | $(PY)
	$(PY) -m pip install --quiet --no-deps --target $(TPU_DIR) '$(LIBTPU)' && touch $@ || \
		echo "libtpu could not be installed: dreamjax aot is unavailable and its compile test is skipped"

tpu: $(TPU_DIR)/.installed

# e.g. make aot CONFIG=configs/dreamllm_7b.py:stage2 TOPOLOGY=v5e-256 AOT_ARGS="--config.mesh.tensor=4 --config.mesh.rules=fsdp_tp"
CONFIG ?= configs/dreamllm_7b.py:stage2
TOPOLOGY ?= v5p-128
AOT_ARGS ?=
aot: install tpu
	$(VENV)/bin/dreamjax aot --config $(CONFIG) --topology $(TOPOLOGY) $(AOT_ARGS)

demo: install
	$(VENV)/bin/dreamjax demo --workdir $(WORKDIR)

test: install tpu
	$(PY) -m pytest -q -n $(JOBS) --durations=15

test-slow: install
	$(PY) -m pytest -q -m slow --durations=15

# Every CPU benchmark in sequence, then a summary of their ratios (~16 min on 2 idle cores; benchmarks/README.md).
bench: install
	$(PY) benchmarks/bench_all.py

# On a machine with a GPU: the 1.1B Llama train step vs PyTorch, and the 1B-class DreamLLM step.
bench-gpu: install
	$(PY) benchmarks/gpu_train_step.py --dreamllm

lint: install
	$(VENV)/bin/ruff check dreamjax tests benchmarks configs

clean:
	rm -rf $(VENV) $(TPU_DIR) workdirs .pytest_cache .ruff_cache
