#!/usr/bin/env bash
# Create .venv with torch (CPU), Horovod (gloo, built once and cached) and mmp.
#
# Why a script and not just `pip install`: Horovod 0.28.1 ships only as an sdist
# that fails against torch 2.x with C++14; we patch it to C++17 (the fix merged
# upstream after 0.28.1) and cache the built wheel under build/wheels/, keyed by
# the Horovod, torch and Python versions, so later set-ups and CI skip the build.
# The Horovod build (CPU-bound) runs while mmp's own dependencies install.
#
#   MMP_EXTRAS=dev bash scripts/bootstrap.sh    # what `make test` uses; `make demo` needs none
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VENV="$ROOT/.venv"
EXTRAS="${MMP_EXTRAS:-}"
LOG_DIR="$ROOT/build/logs"
mkdir -p "$LOG_DIR"

stamp() { printf '[%4ss] %s\n' "$SECONDS" "$*"; }

# -- system packages the tests need -------------------------------------------------------
# Installed with apt-get when this runs as root; otherwise the script stops at once with the
# exact command to run. Each need is one `need_system PROGRAM PACKAGE` line (append yours).
#   MMP_ONLY_SYSTEM=1 bash scripts/bootstrap.sh   # only this part (what `make test` runs first)
SBIN_PATH="${MMP_SBIN_PATH-/usr/local/sbin:/usr/sbin:/sbin}"  # sshd lives there, off a user's PATH
MISSING_PACKAGES=()
need_system() {  # need_system PROGRAM PACKAGE: PACKAGE is installed unless PROGRAM is found
  PATH="$PATH${SBIN_PATH:+:$SBIN_PATH}" command -v "$1" >/dev/null 2>&1 || MISSING_PACKAGES+=("$2")
}
install_system_packages() {
  [ "${#MISSING_PACKAGES[@]}" -eq 0 ] && return 0
  local packages="${MISSING_PACKAGES[*]}"
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    stamp "installing system packages: $packages (apt-get)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${MISSING_PACKAGES[@]}" >/dev/null; }; then
      echo "error: apt-get could not install $packages; run: apt-get update && apt-get install -y $packages" >&2
      exit 1
    fi
  elif command -v apt-get >/dev/null 2>&1; then
    echo "error: the tests need system packages that are missing: $packages" >&2
    echo "run:   sudo apt-get update && sudo apt-get install -y $packages" >&2
    echo "then run \`make test\` again" >&2
    exit 1
  else
    echo "error: the tests need system packages that are missing (Debian/Ubuntu names): $packages" >&2
    echo "install them with this system's package manager (e.g. sudo dnf install -y $packages), then run \`make test\` again" >&2
    exit 1
  fi
}
if [ -n "${MMP_ONLY_SYSTEM:-}" ] || [[ ",$EXTRAS," == *",dev,"* ]]; then
  need_system sshd openssh-server  # the dlami backend's tests run a real sshd on 127.0.0.1
  install_system_packages
fi
[ -n "${MMP_ONLY_SYSTEM:-}" ] && exit 0

if [ ! -x "$VENV/bin/python" ]; then
  stamp "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

"${PIP[@]}" --upgrade "pip>=23" "setuptools>=77" wheel packaging

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
  stamp "installing torch==$TORCH_VERSION (CPU)"
  "${PIP[@]}" "torch==$TORCH_VERSION" numpy  # numpy now: the Horovod build imports torch, which imports it
fi

PYTAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')"
CACHE="$ROOT/build/wheels/horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-$PYTAG"

build_horovod() {
  # pip wheel only builds (nothing is installed), so it may run beside the install below
  local src="$ROOT/build/src"
  rm -rf "$src" && mkdir -p "$src" "$CACHE.partial"
  "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$src"
  tar -xzf "$src/horovod-$HOROVOD_VERSION.tar.gz" -C "$src"
  local hsrc="$src/horovod-$HOROVOD_VERSION"
  sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$hsrc/CMakeLists.txt" "$hsrc/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$hsrc/CMakeLists.txt"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1 MAKEFLAGS="-j$(nproc)" \
    "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$CACHE.partial" "$hsrc"
  rm -rf "$CACHE" && mv "$CACHE.partial" "$CACHE" && rm -rf "$src"
}

build_pid=""
if ! "$PY" -c "import horovod.torch" 2>/dev/null && ! ls "$CACHE"/horovod-*.whl >/dev/null 2>&1; then
  command -v cmake >/dev/null || "${PIP[@]}" cmake
  stamp "building Horovod $HOROVOD_VERSION against torch $TORCH_VERSION (gloo, C++17; once, log: build/logs/horovod.log)"
  build_horovod > "$LOG_DIR/horovod.log" 2>&1 &
  build_pid=$!
fi

stamp "installing mmp${EXTRAS:+[$EXTRAS]} and its dependencies"
nice -n 15 "${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"  # the build is the critical path: it gets the CPU first

if [ -n "$build_pid" ]; then
  if ! wait "$build_pid"; then
    tail -40 "$LOG_DIR/horovod.log" >&2
    echo "Horovod build failed; full log: build/logs/horovod.log" >&2
    exit 1
  fi
fi
if ! "$PY" -c "import horovod.torch" 2>/dev/null; then
  stamp "installing Horovod from $CACHE"
  "${PIP[@]}" "$CACHE"/horovod-*.whl
fi

# PostgreSQL server binaries: tests/infra/test_mlflow_container.py runs the MLflow task's start-up
# against a real database (it skips without them). Debian keeps them off PATH.
if [[ "$EXTRAS" == *dev* ]] && ! command -v initdb >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  stamp "installing PostgreSQL server binaries"
  apt-get install -y -q postgresql >/dev/null
  for bin in /usr/lib/postgresql/*/bin/initdb /usr/lib/postgresql/*/bin/pg_ctl /usr/lib/postgresql/*/bin/postgres; do
    ln -sf "$bin" /usr/local/bin/
  done
fi
"$PY" -c "import horovod.torch, mmp; print('horovod', horovod.__version__, '| torch', __import__('torch').__version__)"
stamp "ready"

# Node tools the state-machine tests run (tests/infra): asl-validator checks the ASL the
# Pulumi program makes, and jsonata evaluates its JSONata expressions as Step Functions does.
NODE_TOOLS="$ROOT/build/node"
if command -v npm >/dev/null 2>&1; then
  if [ ! -x "$NODE_TOOLS/node_modules/.bin/asl-validator" ] || [ ! -d "$NODE_TOOLS/node_modules/jsonata" ]; then
    stamp "installing asl-validator and jsonata (npm) into build/node"
    npm install --silent --no-audit --no-fund --prefix "$NODE_TOOLS" asl-validator@3.16.0 jsonata@2.2.2
  fi
else
  echo "npm not found: the state-machine tests need Node.js and npm (apt-get install -y nodejs npm)" >&2
fi
