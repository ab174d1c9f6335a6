# Two commands on a fresh machine: `make demo` (a whole search on the built-in data) and `make test`.
# Both create the virtual environment first (torch with its CUDA build runs fine on a CPU).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/kdsearch demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf results/cache results/digits results/evaluate .pytest_cache
