#!/usr/bin/env bash
# The GGUF export checked in llama.cpp (not in CI; see bench/README.md, `llamacpp_check`).
#
#   bench/llamacpp_check.sh [--run RUN_DIR] [--gguf-types q8_0,q4_0] [--prompts 8] [--gamma 4]
#       [--max-new-tokens 48] [--rounds 3] [--threads 2] [--out FILE] [--work DIR]
#   bench/llamacpp_check.sh --build-only
#
# 1. builds llama.cpp once from the source vendored in the llama-cpp-python sdist on PyPI
#    (cached under ~/.cache/adaspec/llama.cpp; about 40 minutes on 2 busy cores), and installs
#    sentencepiece beside it (pip --target; llama.cpp's converter imports it);
# 2. runs bench/llamacpp_check/check.py with the project's .venv: exports the run's draft as GGUF
#    (default demo/runs/adaspec-k0.4, its best/), decodes the demo's test prompts with llama-server
#    (target alone, target as its own perfect draft, target with each exported draft), compares
#    with adaspec-eval on the same prompt ids and writes bench/results/llamacpp.json.
set -euo pipefail

LLAMACPP_PY_VERSION="${LLAMACPP_PY_VERSION:-0.3.36}"
CACHE="${ADASPEC_LLAMACPP_CACHE:-$HOME/.cache/adaspec/llama.cpp}"
SRC="$CACHE/llama-cpp-python-$LLAMACPP_PY_VERSION/vendor/llama.cpp"
BUILD="$CACHE/build-$LLAMACPP_PY_VERSION"
CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON
             -DLLAMA_BUILD_TESTS=OFF)
TARGETS=(llama-speculative-simple llama-bench llama-completion llama-server)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"

build() {
    if [[ -f "$BUILD/.built" ]]; then return; fi
    mkdir -p "$CACHE"
    if [[ ! -d "$SRC" ]]; then
        local sdist="$CACHE/llama_cpp_python-$LLAMACPP_PY_VERSION.tar.gz"
        if [[ ! -f "$sdist" ]]; then
            "$PY" -m pip download --no-binary :all: --no-deps \
                "llama-cpp-python==$LLAMACPP_PY_VERSION" -d "$CACHE"
        fi
        local tmp="$CACHE/extract.tmp"
        rm -rf "$tmp" && mkdir -p "$tmp"
        tar xzf "$sdist" -C "$tmp"
        mv "$tmp/llama_cpp_python-$LLAMACPP_PY_VERSION" "$CACHE/llama-cpp-python-$LLAMACPP_PY_VERSION"
        rm -rf "$tmp"
    fi
    cmake -S "$SRC" -B "$BUILD" "${CMAKE_FLAGS[@]}"
    nice -n 19 cmake --build "$BUILD" -j "$(nproc)" --target "${TARGETS[@]}"
    echo "${CMAKE_FLAGS[*]}" > "$BUILD/.built"
}

pydeps() {  # llama.cpp's converter imports sentencepiece; kept out of the project's venv
    if [[ -f "$CACHE/pydeps/.installed" ]]; then return; fi
    "$PY" -m pip install -q --target "$CACHE/pydeps" sentencepiece
    touch "$CACHE/pydeps/.installed"
}

build
if [[ "${1:-}" == "--build-only" ]]; then echo "llama.cpp built in $BUILD/bin"; exit 0; fi
pydeps
cd "$ROOT"
export LLAMACPP_PY_VERSION
exec "$PY" "$ROOT/bench/llamacpp_check/check.py" --llamacpp-bin "$BUILD/bin" \
    --llamacpp-src "$SRC" --cmake-flags "${CMAKE_FLAGS[*]}" --pydeps "$CACHE/pydeps" "$@"
