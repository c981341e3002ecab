# Quick start: `make bench` and `make test` set up .venv on first use, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test bench check lint clean

setup: $(STAMP)

# torch==2.13.0 first when torch is missing: a plain `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[bench,test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(VENV)/bin/leetdecoding bench

check: $(STAMP)
	$(VENV)/bin/leetdecoding check

lint: $(STAMP)
	$(VENV)/bin/ruff check leetdecoding tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
