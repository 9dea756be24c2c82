# hf_gradext: `make demo` trains the embedded default, `make test` runs the test suite.
# Both install what is needed first (CPU torch 2.13.0, then this package with its dev extras).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# pip takes the CPU wheel of torch 2.13.0 from /opt/wheels on the project machines. Elsewhere add
# TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" so that pip does not pull a CUDA build.
TORCH_INDEX ?=
STAMP := build/.installed

.PHONY: install demo test test-fast lint format flags clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PIP) install "torch==2.13.0" $(TORCH_INDEX)
	$(PIP) install -e ".[dev]"
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
