#!/usr/bin/env bash
# llama.cpp's own server for `vlmkit serve --engine llama.cpp`, built from the llama.cpp source
# of the llama-cpp-python that PYTHON has (its sdist, from PyPI), and installed beside PYTHON.
#
# The build (about 10-20 minutes on 2 cores) is kept in a cache outside the repository
# (VLMKIT_CACHE, default ~/.cache/vlmkit), keyed by version, machine and extra CMake options,
# so a second checkout or a CI run on the same machine installs it in a second.
#
# llama.cpp's RPC backend is built in, and its ggml-rpc-server installed beside llama-server: a model
# spread over several hosts (`vlmkit serve ... --engine llama.cpp --rpc HOST:PORT,...`; README).
# LLAMA_SERVER_CMAKE_ARGS adds CMake options (e.g. -DGGML_CUDA=ON).
set -euo pipefail
PY=${1:?usage: build-llama-server.sh PYTHON}
EXTRA=${LLAMA_SERVER_CMAKE_ARGS:-}
VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
CACHE=${VLMKIT_CACHE:-$HOME/.cache/vlmkit}/llama-server-$VERSION-$(uname -m)
[ -z "$EXTRA" ] || CACHE="$CACHE-$(printf %s "$EXTRA" | md5sum | cut -c1-8)"
TARGETS="llama-server ggml-rpc-server"
if [ ! -x "$CACHE/build/bin/llama-server" ] || [ ! -x "$CACHE/build/bin/ggml-rpc-server" ]; then
  mkdir -p "$CACHE"
  if [ ! -d "$CACHE/src" ]; then
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/sdist"
    mkdir -p "$CACHE/src"
    tar xzf "$CACHE"/sdist/llama_cpp_python-*.tar.gz -C "$CACHE/src" --strip-components=1
  fi
  cmake -S "$CACHE/src/vendor/llama.cpp" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF -DGGML_RPC=ON $EXTRA > "$CACHE/configure.log" 2>&1
  # shellcheck disable=SC2086
  cmake --build "$CACHE/build" --target $TARGETS -j "$(nproc)" > "$CACHE/build.log" 2>&1 \
    || { tail -30 "$CACHE/build.log"; exit 1; }
fi
for target in $TARGETS; do
  install -m 755 "$CACHE/build/bin/$target" "$(dirname "$PY")/$target"
done
echo "llama-server and ggml-rpc-server (llama.cpp of llama-cpp-python $VERSION) installed beside $PY"
