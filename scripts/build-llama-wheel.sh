#!/usr/bin/env bash
# Build llama-cpp-python once into a wheel cache outside the repo, with the flags this machine needs.
#
# PyPI has only the sdist, which compiles llama.cpp (5-13 min on 2 cores). The default
# -DGGML_NATIVE=ON build enables AMX, which the CPU advertises but which raises SIGILL in
# this sandbox (DESIGN.md §3), so native detection is off and AVX2/FMA/F16C are named explicitly.
# The cache directory is keyed by version and flags, so a later run reuses the wheel.
set -euo pipefail
PY=${1:?python}
CACHE=${2:?wheel cache dir}
VERSION=${3:-0.3.36}
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
KEY=$(printf '%s %s' "$VERSION" "$FLAGS" | sha256sum | cut -c1-12)
DIR="$CACHE/llama-cpp-python-$KEY"
if ls "$DIR"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "llama-cpp-python $VERSION: using cached wheel in $DIR"
  exit 0
fi
# A wheel built earlier with the same flags (before the cache was keyed) is reused too.
if [ "${KILN_REUSE_UNKEYED_WHEEL:-1}" = 1 ] && ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  mkdir -p "$DIR"
  cp "$CACHE"/llama_cpp_python-"$VERSION"-*.whl "$DIR"/
  exit 0
fi
mkdir -p "$DIR"
echo "llama-cpp-python $VERSION: compiling llama.cpp (about 5-13 minutes on 2 cores, once)..."
CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$PY" -m pip wheel --no-deps --no-binary llama-cpp-python -w "$DIR" "llama-cpp-python==$VERSION"
