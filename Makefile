# Every target creates .venv if it is missing and installs what it needs (idempotent: the install
# step re-runs only when pyproject.toml changes), so each is the only command a user types.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
WORKDIR ?= workdirs/demo
# Parallel test workers: 2 cores here; override with `make test JOBS=8`.
JOBS   ?= 2

.PHONY: install demo test test-slow bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[torch,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/dreamjax demo --workdir $(WORKDIR)

test: install
	$(PY) -m pytest -q -n $(JOBS) --durations=15

test-slow: install
	$(PY) -m pytest -q -m slow --durations=15

bench: install
	$(PY) benchmarks/run_all.py

lint: install
	$(VENV)/bin/ruff check dreamjax tests benchmarks configs

clean:
	rm -rf $(VENV) workdirs .pytest_cache .ruff_cache
