# Every target calls the patchmine CLI or pytest; no logic lives here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORPUS ?= ../shared/corpus/imagenet-sample-500

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,demo]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check patchmine tests benchmarks
	$(BIN)/ruff format --check patchmine tests benchmarks

demo: install
	$(BIN)/patchmine run pipelines/demo.toml

bench: install
	$(BIN)/python benchmarks/bench.py --corpus $(CORPUS)

clean:
	rm -rf out build .pytest_cache
