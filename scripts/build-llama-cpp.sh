#!/usr/bin/env bash
# llama.cpp, compiled once for both of its uses: llama-cpp-python (the proofs in the real llama.cpp) and
# llama.cpp's own servers (`vlmkit serve --engine llama.cpp`). The source is the sdist (from PyPI) of
# the llama-cpp-python that pyproject.toml pins (scripts/llama-cpp-source.sh fetches it once). One CMake
# build of its vendored llama.cpp makes the shared libraries, llama-server and ggml-rpc-server;
# llama-cpp-python's wheel is then built without compiling anything (its option LLAMA_BUILD=OFF) and
# carries that build in llama_cpp/lib (scripts/llama-cpp-wheel.cmake), where llama_cpp loads its
# libraries and every file finds the libraries it links beside itself ($ORIGIN). PYTHON gets the wheel,
# and llama-server and ggml-rpc-server beside it (links into llama_cpp/lib), so `pip install .[test]`
# then finds llama-cpp-python installed.
#
# The build (15 CPU-minutes here; the same 195 objects the static server build alone compiled) is kept
# in a cache outside the repository (VLMKIT_CACHE, default ~/.cache/vlmkit), keyed by version, machine
# and extra CMake options, so a second checkout or a CI run on the same machine installs it in seconds.
#
# llama.cpp's RPC backend is built in, and its ggml-rpc-server installed beside llama-server: a model
# spread over several hosts (`vlmkit serve ... --engine llama.cpp --rpc HOST:PORT,...`; README).
# LLAMA_SERVER_CMAKE_ARGS adds CMake options (e.g. -DGGML_CUDA=ON) to the one build: llama-cpp-python
# and the servers both get them.
set -euo pipefail
PY=${1:?usage: build-llama-cpp.sh PYTHON}
HERE=$(cd "$(dirname "$0")" && pwd)
EXTRA=${LLAMA_SERVER_CMAKE_ARGS:-}
VERSION=$(grep -o '"llama-cpp-python==[^"]*"' "$HERE/../pyproject.toml" | sort -u | sed 's/.*==\(.*\)"/\1/')
if [ -z "$VERSION" ] || [ "$(printf '%s\n' "$VERSION" | wc -l)" != 1 ]; then
  echo "pyproject.toml must pin one llama-cpp-python==VERSION in its extras (found: ${VERSION:-none})" >&2
  exit 1
fi
CACHE=${VLMKIT_CACHE:-$HOME/.cache/vlmkit}/llama-server-$VERSION-$(uname -m)
[ -z "$EXTRA" ] || CACHE="$CACHE-$(printf %s "$EXTRA" | md5sum | cut -c1-8)"
# the servers' targets bring every library llama-cpp-python loads (llama, ggml*, mtmd)
TARGETS="llama-server ggml-rpc-server"
if ! compgen -G "$CACHE/wheel/llama_cpp_python-$VERSION-*.whl" >/dev/null; then
  mkdir -p "$CACHE"
  LLAMA_CPP=$(bash "$HERE/llama-cpp-source.sh" "$PY")
  SDIST=$(dirname "$(dirname "$LLAMA_CPP")")
  # shellcheck disable=SC2016,SC2086
  cmake -S "$LLAMA_CPP" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN' \
    -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF -DGGML_RPC=ON $EXTRA > "$CACHE/configure.log" 2>&1
  # shellcheck disable=SC2086
  cmake --build "$CACHE/build" --target $TARGETS -j "$(nproc)" > "$CACHE/build.log" 2>&1 \
    || { tail -30 "$CACHE/build.log"; exit 1; }
  "$PY" -m pip wheel -q --no-deps "$SDIST" -w "$CACHE/wheel" -C cmake.define.LLAMA_BUILD=OFF \
    -C cmake.define.CMAKE_PROJECT_llama_cpp_INCLUDE="$HERE/llama-cpp-wheel.cmake" \
    -C cmake.define.VLMKIT_LLAMA_CPP_BIN="$CACHE/build/bin" > "$CACHE/wheel.log" 2>&1 \
    || { tail -30 "$CACHE/wheel.log"; exit 1; }
fi
WHEEL=$(compgen -G "$CACHE/wheel/llama_cpp_python-$VERSION-*.whl")
# this build replaces any other llama-cpp-python (a pip-built one of the same version included)
if "$PY" -m pip show -q llama-cpp-python >/dev/null 2>&1; then
  "$PY" -m pip uninstall -q -y llama-cpp-python
fi
"$PY" -m pip install -q "$WHEEL"
LIB=$("$PY" -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / 'lib')")
for target in $TARGETS; do
  ln -sf "$LIB/$target" "$(dirname "$PY")/$target"
done
echo "llama-cpp-python $VERSION, llama-server and ggml-rpc-server (one llama.cpp build) installed for $PY"
