# The two commands a newcomer needs: `make test` and `make bench`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: test bench lint typecheck clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-test: pyproject.toml $(VENV)/bin/activate
	$(PY) -m pip install --quiet -e '.[test,bench,redis,otel]'
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m ruff check resilient tests benchmarks examples
	$(PY) -m mypy --strict resilient
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	$(PY) -m benchmarks $(BENCH_ARGS)

lint: $(VENV)/.installed-test
	$(PY) -m ruff check resilient tests benchmarks examples

typecheck: $(VENV)/.installed-test
	$(PY) -m mypy --strict resilient

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
