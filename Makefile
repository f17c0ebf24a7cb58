# The two set-up commands of the README: `make demo` and `make test`.
# Each creates the virtual environment it needs (.venv), installing torch==2.13.0 (CPU) first:
# a plain `torch` requirement would otherwise pull a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test venv schema bench clean

$(BIN)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip uninstall --quiet --yes mapper 2>/dev/null || true  # the name this project was installed under before neox-mapper
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/mapper demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest

schema: $(BIN)/.installed
	$(BIN)/mapper rules schema > schemas/ruleset.v1.json

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/convert_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis demo-output
