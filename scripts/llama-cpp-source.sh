#!/usr/bin/env bash
# llama.cpp's source, one copy for all its uses: the vendored tree of the llama-cpp-python sdist that
# pyproject.toml pins, fetched once (from PyPI) into the cache outside the repository (VLMKIT_CACHE, default
# ~/.cache/vlmkit). build-llama-cpp.sh compiles it; the tests and benchmarks run llama.cpp's own converters
# from it. Prints the path of the llama.cpp tree (the sdist's vendor/llama.cpp).
set -euo pipefail
PY=${1:?usage: llama-cpp-source.sh PYTHON}
HERE=$(cd "$(dirname "$0")" && pwd)
VERSION=$(grep -o '"llama-cpp-python==[^"]*"' "$HERE/../pyproject.toml" | sort -u | sed 's/.*==\(.*\)"/\1/')
if [ -z "$VERSION" ] || [ "$(printf '%s\n' "$VERSION" | wc -l)" != 1 ]; then
  echo "pyproject.toml must pin one llama-cpp-python==VERSION in its extras (found: ${VERSION:-none})" >&2
  exit 1
fi
SRC=${VLMKIT_CACHE:-$HOME/.cache/vlmkit}/llama-cpp-python-$VERSION-src
mkdir -p "$(dirname "$SRC")"
exec 9>"$SRC.lock" && flock 9  # one fetch when several processes (test workers) ask at once
if [ ! -f "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
  # unpacked beside it and renamed into place: a run stopped half-way leaves no half tree
  PART=$(mktemp -d "$SRC.part.XXXXXX")
  trap 'rm -rf "$PART"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$PART/sdist" >&2
  mkdir "$PART/src"
  tar xzf "$PART"/sdist/llama_cpp_python-*.tar.gz -C "$PART/src" --strip-components=1
  rm -rf "$SRC"
  mv "$PART/src" "$SRC"
fi
echo "$SRC/vendor/llama.cpp"
