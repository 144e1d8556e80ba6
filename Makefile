# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench servers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,report]'
	touch $(STAMP)

# influxd, victoria-metrics, chromium (the HTML report's render test), openssl (the
# TLS tests' certificate) and wrk (the benchmarks' load, run by their smoke tests) come
# from Debian's packages; installed when missing.
servers:
	@missing=""; \
	command -v influxd >/dev/null 2>&1 || missing="$$missing influxdb"; \
	command -v victoria-metrics >/dev/null 2>&1 || missing="$$missing victoria-metrics"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v wrk >/dev/null 2>&1 || missing="$$missing wrk"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "lunamon's tests need the Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check lunamon tests benchmarks
	$(BIN)/ruff format --check lunamon tests benchmarks
	$(BIN)/mypy

# The whole catalogue, load and deployment tests included (about 2 minutes on 2 cores).
# pytest exits 5 when it collected no test; make treats every non-zero exit as failure.
test: $(STAMP) servers lint
	$(BIN)/python -m pytest -q

# Only the load and deployment tests, with their printed figures.
test-slow: $(STAMP) servers
	$(BIN)/python -m pytest -q -s -m slow

bench: $(STAMP) servers
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m benchmarks.run_all

demo: $(STAMP)
	$(BIN)/lunamon demo

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .hypothesis
