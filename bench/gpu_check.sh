#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py, see bench/README.md) on a CUDA machine: the whole pipeline
# on the GPU with random models of the paper pair's shapes, then the stream and step benches.
# Elsewhere it says so in one line and exits 0.
#
#   bench/gpu_check.sh --prepare        # where pip works: carried wheels (.whl/) + tokenizer (.gpu/)
#   bench/gpu_check.sh [--out FILE]     # on the GPU machine (offline): runs the check
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [ "${1:-}" = "--prepare" ]; then
    # What the GPU machine lacks (it has torch, transformers, accelerate, tqdm, yaml, psutil),
    # as cp312 wheels, and the embedded model's tokenizer (the GGUF itself is too big to carry).
    mkdir -p .whl .gpu
    for pkg in zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
               crc32c==2.9.post0; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg" || exit 1
    done
    "$PYTHON" -c "from adaspec import models; models.load_tokenizer('smollm2-135m')\
.save_pretrained('.gpu/tokenizer')" || exit 1
    echo "gpu_check: prepared .whl/ ($(du -sh .whl | cut -f1)) and .gpu/tokenizer;" \
         "carry both (device run: carry [\".whl\", \".gpu\"])"
    exit 0
fi

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
        2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check"
    exit 0
fi
if ! "$PYTHON" -c "import zarr, numcodecs" 2>/dev/null; then
    if [ ! -d .whl ]; then
        echo "gpu_check: zarr/numcodecs are missing and there is no .whl/ to install them from;" \
             "run bench/gpu_check.sh --prepare where pip works and carry .whl/"
        exit 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/adaspec-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/adaspec-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
exec "$PYTHON" -m bench.gpu_check "$@"
