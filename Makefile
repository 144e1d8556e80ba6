# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench servers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# setup.py builds lunamon._speedups (the compiled encoder) into the tree: rebuilt when its
# C changes.
$(STAMP): $(BIN)/python setup.cfg setup.py pyproject.toml lunamon/_speedups.c
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
	command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v clickhouse-server >/dev/null 2>&1 || missing="$$missing clickhouse-server clickhouse-client"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "lunamon's tests need the Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check lunamon tests benchmarks conformance
	$(BIN)/ruff format --check lunamon tests benchmarks conformance
	$(BIN)/mypy

# The whole catalogue, load and deployment tests included (about 2 minutes on 2 cores),
# then `make conformance` (about 2 minutes more).
# pytest exits 5 when it collected no test; make treats every non-zero exit as failure.
test: $(STAMP) servers lint
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory conformance

# Only the load and deployment tests, with their printed figures.
test-slow: $(STAMP) servers
	$(BIN)/python -m pytest -q -s -m slow

# aiohttp's own functional tests (the sdist of the installed aiohttp, cached in
# .conformance/), run without and then with lunamon on every served application; each
# request's point is compared with aiohttp's access log (conformance/run.py). Fails on
# a test that fails with lunamon only, a status mismatch or an unrecorded request.
# About 2 minutes on 2 cores.
CONFORMANCE_STAMP := $(VENV)/.conformance-installed

.PHONY: conformance

$(CONFORMANCE_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,report,conformance]'
	touch $(CONFORMANCE_STAMP)

conformance: $(CONFORMANCE_STAMP)
	$(BIN)/python conformance/run.py

# The fault campaign (issue 18, RELIABILITY.md 35-41): a seeded random sequence of faults
# (servers paused and killed, gunicorn workers SIGKILLed, the database dropped, the metrics
# folder removed, a slow sink) against real influxd, clickhouse-server, prometheus and a
# 3-worker gunicorn service under traffic; every store reconciled exactly against the ids
# the client received. About 3 minutes. `make faults SEED=N` replays a run; a short slice
# runs in `make test` (tests/test_campaign.py).
SEED ?=
FAULT_STEPS ?= 10
.PHONY: faults
faults: $(STAMP) servers
	$(BIN)/python -m tests.campaign --steps $(FAULT_STEPS) --duration 150 $(if $(SEED),--seed $(SEED))

bench: $(STAMP) servers
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m benchmarks.run_all

demo: $(STAMP)
	$(BIN)/lunamon demo

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .hypothesis

# Mutation testing (RELIABILITY.md 34, docs/mutation.md): mutmut mutates the modules below and
# runs, for each mutant, only the fast unit tests that reach the mutated function (no real
# servers, no `-m slow`). Not part of `make test`. Each run starts afresh (a kept result
# would hide a test since removed); over an hour on 2 cores for all the modules, or
# some: `make mutate MUTATE_MODULES="lunamon/flusher.py"`. It ends with the score per
# module and every mutant not killed; `cd .mutmut && ../.venv/bin/mutmut show <name>`
# shows one, `... mutmut run <name>` tests it again (docs/mutation.md).
MUTATE_MODULES ?= lunamon/point.py lunamon/flusher.py lunamon/_backlog.py lunamon/_recorder.py lunamon/aiohttp.py \
	lunamon/sinks/_http.py lunamon/settings.py lunamon/metrics.py lunamon/sinks/clickhouse.py \
	lunamon/_ids.py lunamon/collector.py lunamon/timing.py lunamon/spool.py lunamon/client.py \
	lunamon/logs.py lunamon/sinks/influxdb.py lunamon/sinks/influxdb_v2.py lunamon/sinks/file.py \
	lunamon/sinks/plugin.py lunamon/sinks/registry.py
MUTATE_TESTS ?= tests/test_point.py tests/test_flusher.py tests/test_emitter.py tests/test_aiohttp.py \
	tests/test_response_paths.py tests/test_collector.py tests/test_timing.py \
	tests/test_server_timing.py tests/test_metrics.py tests/test_sink_http.py \
	tests/test_tls_no_fallback.py tests/test_settings.py tests/test_settings_sources.py \
	tests/test_registry.py tests/test_recorder_run.py tests/test_gc_freeze.py tests/test_backlog.py \
	tests/test_sink_clickhouse.py tests/test_sink_stream.py tests/test_point_times.py \
	tests/test_spool.py tests/test_client.py tests/test_logs.py tests/test_sink_influxdb.py \
	tests/test_sink_influxdb_v2.py tests/test_sink_file.py tests/test_sink_plugin.py
# Tests of those modules that start a real server (not marked slow).
MUTATE_DESELECT ?= tests/test_metrics.py::test_a_real_prometheus_scrapes_counts_quantiles_and_exemplars
MUTMUT_DIR := .mutmut
MUTATE_STAMP := $(VENV)/.mutate-installed

.PHONY: mutate

$(MUTATE_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,report,mutate]'
	touch $(MUTATE_STAMP)

# mutmut reads its settings from setup.cfg or pyproject.toml in the directory it runs in:
# it runs in $(MUTMUT_DIR), which links to the sources and tests and holds its own setup.cfg.
# forkserver: every test run forks from a process that has only collected the tests, so no
# run sees the state an earlier one left (lunamon warns of an unknown variable once).
mutate: $(MUTATE_STAMP)
	@command -v openssl >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }
	mkdir -p $(MUTMUT_DIR)
	for path in lunamon tests docs pyproject.toml; do ln -sfn ../$$path $(MUTMUT_DIR)/$$path; done
	{ echo '[mutmut]'; echo 'source_paths = lunamon'; echo 'process_isolation = forkserver'; \
	  echo 'only_mutate ='; \
	  for m in $(MUTATE_MODULES); do echo "    $$m"; done; \
	  echo 'also_copy = docs'; echo 'pytest_add_cli_args ='; echo '    -m'; echo '    not slow'; \
	  for t in $(MUTATE_DESELECT); do echo "    --deselect=$$t"; done; \
	  echo 'pytest_add_cli_args_test_selection ='; \
	  for t in $(MUTATE_TESTS); do echo "    $$t"; done; } > $(MUTMUT_DIR)/setup.cfg
	rm -rf $(MUTMUT_DIR)/mutants
	# The Python encoder is the one mutated: the compiled one is switched off.
	cd $(MUTMUT_DIR) && LUNAMON_PURE_PYTHON=1 ../$(BIN)/mutmut run --max-children 2
	cd $(MUTMUT_DIR) && ../$(BIN)/python ../tests/_mutation_summary.py $(MUTATE_MODULES)
