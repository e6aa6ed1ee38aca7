# dsjobs developer entry points. `make demo` and `make test` are the README's two commands.
#
# PYTHON is the interpreter that creates the venv (`make demo PYTHON=python3.11`), VENV where it
# lives; everything then runs with the venv's python, PY. The hack/ scripts get PY explicitly as
# VENV_PYTHON (gen-proto.sh as PYTHON, its own interface): make exports PYTHON set on its command
# line to every recipe, so a script must never take PYTHON for the venv's python.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install proto lint typecheck test-unit test-e2e test k8s-bins cluster-up cluster-down \
        up down demo bench e2e-kind lock clean

# A venv whose Python is gone (an upgrade removed it) or that an interrupted install left broken
# is made again: the stamp alone would call it installed for good.
install: $(STAMP)
	@$(PY) -c 'import dsjobs' 2>/dev/null || { echo "$(VENV) does not run dsjobs: installing again"; \
	  rm -f $(STAMP); $(MAKE) --no-print-directory $(STAMP); }

# constraints.txt pins every distribution to the versions CI tested (`make lock` moves them).
$(STAMP): pyproject.toml constraints.txt
	@if ! $(PY) -m pip --version >/dev/null 2>&1; then \
	  if [ -e $(VENV)/pyvenv.cfg ]; then echo "$(VENV) lacks pip or its Python: making it again"; rm -rf $(VENV); fi; \
	  $(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "the operator, API, tests and demo need Python 3.11 or newer: make ... PYTHON=python3.11 (rm -rf $(VENV) first)")'
	$(PY) -m pip install -q -c constraints.txt --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

proto: install
	PYTHON=$(PY) bash hack/gen-proto.sh

lint: install
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/ruff format --check operator tests bench

typecheck: install
	$(VENV)/bin/mypy operator/dsjobs

test-unit: install
	$(PY) -m pytest -q tests/unit

k8s-bins:
	bash $${DSJOBS_K8S_BINS_SCRIPT:-hack/k8s-bins.sh}

cluster-up: install k8s-bins
	$(PY) -m dsjobs.devcluster up

cluster-down: install
	$(PY) -m dsjobs.devcluster down

test-e2e: install k8s-bins
	$(PY) -m pytest -q tests/e2e

test: lint typecheck test-unit test-e2e

up: install k8s-bins
	VENV_PYTHON=$(PY) bash hack/up.sh

down: install
	VENV_PYTHON=$(PY) bash hack/down.sh

demo: install k8s-bins
	VENV_PYTHON=$(PY) bash hack/demo.sh

bench: install k8s-bins
	VENV_PYTHON=$(PY) bash hack/bench.sh $(BENCH)

e2e-kind: install
	VENV_PYTHON=$(PY) bash hack/e2e-kind.sh

lock:
	PYTHON_FOR_LOCK=$(PYTHON) bash hack/lock.sh

clean:
	rm -rf $(VENV) .dev .pytest_cache .mypy_cache .ruff_cache
