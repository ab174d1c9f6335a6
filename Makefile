# Two commands on a fresh machine: `make demo` (a whole search on the built-in data) and `make test`.
# Both create the virtual environment first (torch with its CUDA build runs fine on a CPU).
# `make lint`: ruff and mypy (settings in pyproject.toml); `make test-fast`: the suite without the searches;
# `make test-reliability`: searches run as processes of their own and killed, interrupted or soaked;
# `make test-cluster`: the multi-node tests, which start a 3-node Ray cluster of their own (CI runs all four).
# Each prints its slowest tests (pytest --durations), so the next estimate is a measurement. `make test`,
# `make test-fast` and `make test-reliability` run in pytest-xdist workers, one per core (the shared search's tests
# in one: tests/conftest.py); a killed search trains one trial at a time on one thread, so one at a time they left a
# core idle. The cluster tests share one cluster (a module fixture), so they run in one process.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKERS := -n auto --dist loadgroup

.PHONY: install demo lint test test-fast test-reliability test-cluster clean

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
	$(PY) -m pytest -q $(WORKERS) -m "not cluster and not reliability" --durations=25

test-fast: install
	$(PY) -m pytest -q $(WORKERS) -m "not slow and not cluster and not reliability" --durations=10

test-reliability: install
	$(PY) -m pytest -q $(WORKERS) -m reliability --durations=10

test-cluster: install
	$(PY) -m pytest -q -m cluster --durations=10

clean:
	rm -rf results/cache results/digits results/evaluate .pytest_cache
