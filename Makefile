# hf_gradext: `make demo` trains the embedded default, `make test` runs the test suite.
# Both install what is needed first: CPU torch 2.13.0, then this package with its dev extras, pinned to
# the known-good set in requirements/locked.txt (the floors of pyproject.toml, tested by CI).
# `make install-newest` instead takes the newest releases pyproject.toml allows (CI tests that too).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# pip takes the CPU wheel of torch 2.13.0 from /opt/wheels on the project machines. Elsewhere add
# TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" so that pip does not pull a CUDA build.
TORCH_INDEX ?=
STAMP := build/.installed
LOCK := requirements/locked.txt

.PHONY: install install-newest demo test test-fast lint format flags clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PIP) install "torch==2.13.0" $(TORCH_INDEX)
	$(PIP) install -e ".[dev]" -c $(LOCK)
	@mkdir -p build && touch $(STAMP)

# Newest allowed releases of everything but torch (kept at the CPU build: the newest allowed torch
# release on PyPI is a multi-GB CUDA build).
install-newest:
	$(PIP) install "torch==2.13.0" $(TORCH_INDEX)
	$(PIP) install -U --upgrade-strategy eager -e ".[dev]" "torch==2.13.0"
	@mkdir -p build && touch $(STAMP)

demo: install
	$(PYTHON) -m hf_gradext.train

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	ruff check hf_gradext tests recipes
	ruff format --check hf_gradext tests recipes

format:
	ruff format hf_gradext tests recipes

flags:
	$(PYTHON) recipes/make_flags_table.py --write

clean:
	rm -rf build outputs trainer_output
