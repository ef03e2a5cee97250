# The two commands a newcomer needs: `make test` and `make bench`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: test bench lint typecheck docs docs-serve clean redis services

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-test: pyproject.toml $(VENV)/bin/activate
	$(PY) -m pip install --quiet -e '.[test,bench,redis,otel,docs]'
	touch $@

# Redis and nginx tests (and the shared-quota and nginx benchmarks) need redis-server and
# nginx: found on PATH or in /usr/sbin, or installed with apt-get when we are root on Debian;
# otherwise a hint (tests then skip, except under CI=true, where they fail).
SERVICES := redis-server nginx
services:
	@missing=""; for b in $(SERVICES); do \
	  command -v $$b >/dev/null 2>&1 || [ -x /usr/sbin/$$b ] || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) \
	      || echo "make: could not install$$missing; their tests will not run"; \
	  else \
	    echo "make: not found:$$missing (Debian: sudo apt-get install$$missing)"; \
	  fi; fi

redis: services

# `make test` also builds the documentation site strictly (a broken link, a missing page or
# an API name that no longer exists fails it) and, in pytest, the distribution
# (tests/test_distribution.py: sdist + wheel, installed into a fresh venv, imported).
test: $(VENV)/.installed-test services
	$(PY) -m ruff check resilient tests benchmarks examples
	$(PY) -m mypy --strict resilient benchmarks
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test services
	$(PY) -m benchmarks $(BENCH_ARGS)

lint: $(VENV)/.installed-test
	$(PY) -m ruff check resilient tests benchmarks examples

typecheck: $(VENV)/.installed-test
	$(PY) -m mypy --strict resilient benchmarks

# The documentation site (mkdocs.yml, docs/): built into site/, or served with live reload.
docs: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site dist
