# The README's commands. Each creates .venv and installs the package first, so a fresh machine needs
# nothing but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= /tmp/attnjax_demo
# Spread the suite over both CI cores.
PYTEST_ARGS ?= -n 2 --dist worksteal

.PHONY: demo test test-slow bench docs lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.sweep --config=configs/sweeps/mqar_demo.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow and not gpu"

test-slow: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) -m "slow"

bench: $(STAMP)
	$(PY) -m experiments.bench --config=configs/bench/flex.py --workdir=$(WORKDIR)/bench

docs: $(STAMP)
	$(PY) -m attnjax.docs

lint: $(STAMP)
	$(VENV)/bin/ruff check attnjax experiments configs tests

clean:
	rm -rf $(VENV) build *.egg-info
