# Two commands on a fresh machine: `make demo` (a whole search on the built-in data) and `make test`.
# Both create the virtual environment first (torch with its CUDA build runs fine on a CPU).
# `make lint`: ruff and mypy (settings in pyproject.toml); `make test-fast`: the suite without the slow searches;
# `make test-cluster`: the multi-node tests, which start a 3-node Ray cluster of their own (CI runs all three).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo lint test test-fast test-cluster clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/kdsearch demo

lint: install
	$(VENV)/bin/ruff check kd search tests bench
	$(VENV)/bin/mypy

test: install
	$(PY) -m pytest -q -m "not cluster"

test-fast: install
	$(PY) -m pytest -q -m "not slow and not cluster"

test-cluster: install
	$(PY) -m pytest -q -m cluster

clean:
	rm -rf results/cache results/digits results/evaluate .pytest_cache
