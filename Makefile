# Two entry points: `make demo` (the main job on embedded defaults) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m flows.demo

test: $(BIN)/.installed
	$(BIN)/pytest

clean:
	rm -rf .pneumo mlruns  # mlruns: artifacts of demos run before #27 item 6 put them under .pneumo
