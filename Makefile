# hashlake: two commands for a fresh machine — `make demo` and `make test`. Both run `make setup` first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup system-packages demo test bench clean

setup: system-packages $(VENV)/.installed

# Debian packages the stack and the tests start, installed only when one is missing.
system-packages:
	@deploy/install-system-packages.sh

# Re-installs when pyproject.toml changes (the project with its extras: local = the stack's S3 server,
# bench = plots and faiss, test = the suite's tools), then compiles the hashlake_hamming DuckDB extension
# (hashlake/native; it also rebuilds itself on first use after its C sources in src/ change).
# torch==2.14.1/torchvision==0.29.1 are pinned: pip takes them from this machine's local wheel
# store instead of downloading gigabytes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[local,bench,test]'
	$(BIN)/python -m hashlake.native.build
	touch $@

demo: setup
	$(BIN)/hashlake demo $(DEMO_ARGS)

test: setup
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/hamming.py
	$(BIN)/python benchmarks/lake.py
	$(BIN)/python benchmarks/map_cifar10.py

clean:
	-$(BIN)/hashlake stack down
	rm -rf $(VENV) .hashlake *.egg-info
