#!/usr/bin/env bash
# The peers' own environments, outside lenet-dist's install (from the repo root):
#   .peers/torch  PyTorch CPU, Python 3.11 (torch 2.13.0 is what was measured, 2026-11)
#   .peers/keras  Keras 3 on JAX, Python >= 3.12, the same jax as lenet-dist
# Idempotent: an environment that imports is left alone. Set PIP_INDEX_URL (e.g.
# https://download.pytorch.org/whl/cpu for torch) to install from elsewhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
TORCH_PY="${TORCH_PYTHON:-$(command -v python3.11 || command -v python3)}"
KERAS_PY="$(scripts/find-python.sh)"

make_env() {  # make_env DIR PYTHON IMPORT REQUIREMENTS...
  local dir="$1" py="$2" mod="$3"; shift 3
  if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import $mod" 2>/dev/null; then
    echo "$dir: ready"; return
  fi
  "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
  "$dir/bin/python" -m pip install -q "$@"
  echo "$dir: installed $*"
}

# Versions measured together; jax matches pyproject.toml's pin.
make_env .peers/torch "$TORCH_PY" torch "torch==2.13.0" "numpy>=1.26"
make_env .peers/keras "$KERAS_PY" keras "keras==3.15.1" "jax==0.12.0.1" "numpy>=2"
