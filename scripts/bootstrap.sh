#!/usr/bin/env bash
# Create .venv with torch (CPU), Horovod (gloo, built once and cached) and mmp.
#
# Why a script and not just `pip install`: Horovod 0.28.1 ships only as an sdist
# that fails against torch 2.x with C++14; we patch it to C++17 (the fix merged
# upstream after 0.28.1) and cache the built wheel under build/wheels/, keyed by
# the Horovod, torch and Python versions, so later set-ups and CI skip the build.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VENV="$ROOT/.venv"
EXTRAS="${MMP_EXTRAS:-dev}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

"${PIP[@]}" --upgrade "pip>=23" setuptools wheel packaging

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
  echo "==> installing torch==$TORCH_VERSION (CPU)"
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi

PYTAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')"
CACHE="$ROOT/build/wheels/horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-$PYTAG"
if ! "$PY" -c "import horovod.torch" 2>/dev/null; then
  if ! ls "$CACHE"/horovod-*.whl >/dev/null 2>&1; then
    echo "==> building Horovod $HOROVOD_VERSION against torch $TORCH_VERSION (gloo, C++17; ~3 min, once)"
    SRC="$ROOT/build/src"
    rm -rf "$SRC" && mkdir -p "$SRC" "$CACHE"
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$SRC"
    tar -xzf "$SRC"/horovod-"$HOROVOD_VERSION".tar.gz -C "$SRC"
    HSRC="$SRC/horovod-$HOROVOD_VERSION"
    sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$HSRC/CMakeLists.txt" "$HSRC/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$HSRC/CMakeLists.txt"
    "${PIP[@]}" cmake 2>/dev/null || true
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1 MAKEFLAGS="-j$(nproc)" \
      "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$CACHE" "$HSRC"
    rm -rf "$SRC"
  fi
  echo "==> installing Horovod from $CACHE"
  "${PIP[@]}" "$CACHE"/horovod-*.whl
fi

echo "==> installing mmp[$EXTRAS]"
"${PIP[@]}" -e ".[$EXTRAS]"
"$PY" -c "import horovod.torch, mmp; print('horovod', horovod.__version__, '| torch', __import__('torch').__version__)"
