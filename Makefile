# The two commands a newcomer needs: `make test` and `make bench`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: test bench lint typecheck clean redis

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-test: pyproject.toml $(VENV)/bin/activate
	$(PY) -m pip install --quiet -e '.[test,bench,redis,otel]'
	touch $@

# Redis tests and the shared-quota benchmark need redis-server on PATH: found there, or
# installed with apt-get when we are root on Debian; otherwise a hint (tests then skip,
# except under CI=true, where they fail).
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) \
	      || echo "make: could not install redis-server; Redis tests will not run"; \
	  else \
	    echo "make: redis-server not found (Debian: sudo apt-get install redis-server)"; \
	  fi; }

test: $(VENV)/.installed-test redis
	$(PY) -m ruff check resilient tests benchmarks examples
	$(PY) -m mypy --strict resilient
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test redis
	$(PY) -m benchmarks $(BENCH_ARGS)

lint: $(VENV)/.installed-test
	$(PY) -m ruff check resilient tests benchmarks examples

typecheck: $(VENV)/.installed-test
	$(PY) -m mypy --strict resilient

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
