# Quick start: `make bench` and `make test` set up .venv on first use, then run. `make test-fast`: the suite
# without its slowest files (`make test` runs them all, as CI does).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# the slowest test files on a 2-core CPU (pytest --durations): test_train trains a model for about 5 minutes; the
# others take 40-50 s each (Triton's interpreter, transformers' MiniMax, torch.compile, extreme inputs)
SLOW_TESTS := tests/test_train.py tests/test_triton.py tests/test_decay_cache.py tests/test_hf_minimax.py \
              tests/test_extreme_inputs.py tests/test_compile.py

.PHONY: setup test test-fast bench check lint clean

setup: $(STAMP)

# torch==2.13.0 first when torch is missing: a plain `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip uninstall -q -y leetdecoding 2>/dev/null || true  # this project's name before 0.2.0
	$(PY) -m pip install -q -e '.[bench,hf,test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -x $(addprefix --ignore=,$(SLOW_TESTS))

bench: $(STAMP)
	$(VENV)/bin/leetdecoding bench

check: $(STAMP)
	$(VENV)/bin/leetdecoding check

lint: $(STAMP)
	$(VENV)/bin/ruff check leetdecoding tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
