# Two entry points for newcomers: `make serve` (install + run the node on the embedded
# default pipeline) and `make test` (install test dependencies + run the whole suite).
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests drive for real, installed (with root, or sudo) by
# tests/install-debian-tools.sh without starting or enabling their services:
# dcmtk (storescu/echoscu, dcmcrle/dcmcjpls), dicom3tools (dciodvfy),
# orthanc (the PACS of the round-trip test), orthanc-dicomweb (its DICOMweb plugin, the
# STOW-RS peer of tests/test_dicomweb.py), prometheus (prometheus, promtool), systemd
# (systemd-analyze verifies the unit file), postgresql (initdb/pg_ctl: tests/postgres.py
# runs its own server for the PostgreSQL journal; the packaged cluster stays off).
# Orthanc installs into /usr/sbin, PostgreSQL into /usr/lib/postgresql/<major>/bin. Each
# pair is a command, or a file pattern for what is not a command, and the package that brings it.
DEBIAN_TOOLS := storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc promtool:prometheus prometheus:prometheus \
	systemd-analyze:systemd /usr/lib/orthanc/libOrthancDicomWeb.so*:orthanc-dicomweb \
	/usr/lib/postgresql/*/bin/initdb:postgresql

.PHONY: serve test test-postgresql install install-test system-deps lint

$(BIN)/radpipe: pyproject.toml
	python3 -m venv $(VENV)
	# The CPU build, pinned first so no dependency pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

install: $(BIN)/radpipe

$(VENV)/.test-installed: $(BIN)/radpipe
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install-test: $(VENV)/.test-installed system-deps

system-deps:
	@missing=""; for pair in $(DEBIAN_TOOLS); do \
	  PATH="$$PATH:/usr/sbin" command -v $${pair%%:*} >/dev/null || ls $${pair%%:*} >/dev/null 2>&1 \
	    || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (as tools: their services stay off):$$missing"; \
	  $(SUDO) tests/install-debian-tools.sh $$missing; \
	fi

serve: install
	$(BIN)/radpipe serve

lint: install-test
	$(BIN)/ruff check plugin tests benchmarks
	$(BIN)/ruff format --check plugin tests benchmarks
	$(BIN)/mypy

test: install-test lint
	TCP_NODELAY=1 $(BIN)/pytest -q --durations=25

# The whole suite again with every node's journal in PostgreSQL (journal.url): one server
# for the session (tests/postgres.py), a fresh database per node. Not part of `make test`
# (CI runs the suite once, on SQLite); tests about SQLite itself are skipped, with why.
test-postgresql: install-test
	TCP_NODELAY=1 RADPIPE_TEST_JOURNAL=postgresql $(BIN)/pytest -q --durations=25
