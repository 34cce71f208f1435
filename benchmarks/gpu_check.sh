#!/usr/bin/env bash
# On a GPU machine, from the repository root: training images/s of the d2l LeNet-5 for
# batch 256..65,536, the dataset on the device, side by side on the same GPU in one run:
#   lenet-dist   its own per-step loop (fp32) and a lax.scan epoch (fp32, bf16 mixed)
#   PyTorch      eager and torch.compile (mode reduce-overhead: CUDA graphs), fp32 and
#                bf16 autocast
#   Keras 3      on JAX, model.fit, fp32
# alternating rounds (benchmarks/gpu/run.py); once, after the rounds, the bf16
# diagnosis (compile time, single-step times, compiled HLO, a profile, at batch 16,384
# and 65,536); last, lenet-dist's modern recipe. Results and JSON go to $OUT (default: the
# repository root; with --cpu-smoke, a new temporary directory, so a smoke run leaves the
# tree clean).
#
#   benchmarks/gpu_check.sh               install what is missing, then measure
#   benchmarks/gpu_check.sh --dry-run     print the install steps and every configuration
#   benchmarks/gpu_check.sh --cpu-smoke   a few steps per contender on the CPU, with the
#                                         environments already here (.venv, .peers/*)
#   benchmarks/gpu_check.sh --no-install  use only environments that already work
#   benchmarks/gpu_check.sh --wheels=DIR  first install DIR/*.whl (no index, no network)
#                                         into .peers/gpu/site, put on PYTHONPATH: for a
#                                         GPU machine with no registry (e.g. Keras, namex
#                                         and optree for an image that has jax and torch)
# Other options go to benchmarks/gpu/run.py (--budget-s 480, --rounds 2, --epochs 2,
# --batches, --compile-modes reduce-overhead,max-autotune-no-cudagraphs, ...; see --help).
#
# Environments (idempotent: one that already works is used as it is, nothing reinstalled):
#   jax    $JAX_PYTHON, else .peers/gpu/jax, else python3 if it has jax on the GPU, flax
#          and optax; else a new venv with jax[$JAX_CUDA] (default cuda12), flax, optax
#   keras  the jax environment if it has Keras 3, else Keras installed next to it
#   torch  $TORCH_PYTHON, else .peers/gpu/torch, else python3 if it has torch with CUDA;
#          else a new venv with torch from PyPI (its Linux wheel is the CUDA build; set
#          TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 or similar to choose)
# The whole run, installs included, keeps to --budget-s (8 minutes): configurations that
# would not finish in time are skipped and listed; the elapsed time is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

DRY=0 SMOKE=0 INSTALL=1 WHEELS=""
ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --cpu-smoke) SMOKE=1 ;;
    --no-install) INSTALL=0 ;;
    --wheels=*) WHEELS="${a#--wheels=}" ;;
    -h|--help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done

ENVS=.peers/gpu
JAX_VERSION=0.12.0.1  # pyproject.toml's pin
JAX_SPEC=("jax[${JAX_CUDA:-cuda12}]==$JAX_VERSION" "flax==0.12.12" "optax==0.2.8")
KERAS_SPEC=("keras==3.15.1")
TORCH_SPEC=("torch==${TORCH_VERSION:-2.13.0}" "numpy>=1.26")
TORCH_PIP=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then TORCH_PIP=(--index-url "$TORCH_INDEX_URL"); fi

say() { printf '%s\n' "$*"; }
# Runs a step, or in a dry run only prints it.
step() { if [ "$DRY" = 1 ]; then say "  would run: $*"; else say "+ $*"; "$@"; fi; }

jax_ok() {
  "$1" -c 'import jax, flax, optax; assert jax.devices()[0].platform == "gpu"' >/dev/null 2>&1
}
keras_ok() {
  KERAS_BACKEND=jax "$1" -c 'import jax, keras; assert jax.devices()[0].platform == "gpu"' \
    >/dev/null 2>&1
}
torch_ok() { "$1" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; }

# make_env DIR PYTHON [--system-site-packages] -- REQUIREMENT...  (a venv plus one pip install)
make_env() {
  local dir="$1" py="$2"; shift 2
  local venv_opts=()
  while [ "$1" != "--" ]; do venv_opts+=("$1"); shift; done
  shift
  step "$py" -m venv "${venv_opts[@]}" "$dir"
  step "$dir/bin/python" -m pip install -q --upgrade pip
  step "$dir/bin/python" -m pip install -q --retries 2 "$@"
}

PY_JAX="${JAX_PYTHON:-}" PY_KERAS="" PY_TORCH="${TORCH_PYTHON:-}"

if [ -n "$WHEELS" ] && [ "$SMOKE" = 0 ]; then
  # An offline machine: what is missing comes as wheels for its Python (one version of
  # each, --no-deps: name every missing dependency too). They go on every contender's
  # PYTHONPATH, so they must suit each contender's Python.
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then say "no wheels in $WHEELS"; exit 2; fi
  step "${JAX_PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile \
    --upgrade --target "$ENVS/site" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$PWD/$ENVS/site"
fi

if [ "$SMOKE" = 1 ]; then
  # The CPU: this checkout's environments only; nothing is installed.
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  if [ -z "$PY_JAX" ]; then
    if [ -x .venv/bin/python ]; then PY_JAX=.venv/bin/python; else PY_JAX="$(command -v python3)"; fi
  fi
  [ -x .peers/torch/bin/python ] && PY_TORCH="${PY_TORCH:-.peers/torch/bin/python}"
  [ -x .peers/keras/bin/python ] && PY_KERAS=.peers/keras/bin/python
elif [ "$DRY" = 1 ]; then
  say "install plan (idempotent; a dry run installs nothing):"
  say "  jax env: \$JAX_PYTHON if set, else $ENVS/jax or python3 if it imports jax (on a GPU),"
  say "    flax and optax; else:"
  make_env "$ENVS/jax" "$(scripts/find-python.sh 2>/dev/null || echo python3.12)" -- \
    "${JAX_SPEC[@]}" "${KERAS_SPEC[@]}"
  say "  keras: the jax env if it imports keras; else, in $ENVS/jax:"
  step "$ENVS/jax/bin/python" -m pip install -q --retries 2 "${KERAS_SPEC[@]}"
  say "    or, when the jax env is a system Python, a venv on top of it:"
  make_env "$ENVS/keras" python3 --system-site-packages -- "${KERAS_SPEC[@]}"
  say "  torch env: \$TORCH_PYTHON if set, else $ENVS/torch or python3 if torch sees CUDA; else:"
  make_env "$ENVS/torch" "$(command -v python3.11 || command -v python3)" -- \
    "${TORCH_PIP[@]}" "${TORCH_SPEC[@]}"
  PY_JAX="$ENVS/jax/bin/python" PY_KERAS="$ENVS/jax/bin/python" PY_TORCH="$ENVS/torch/bin/python"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  # jax (lenet-dist's environment)
  if [ -z "$PY_JAX" ]; then
    for cand in "$ENVS/jax/bin/python" python3; do
      if command -v "$cand" >/dev/null 2>&1 && jax_ok "$cand"; then PY_JAX="$cand"; break; fi
    done
  fi
  if [ -z "$PY_JAX" ] && [ "$INSTALL" = 1 ]; then
    make_env "$ENVS/jax" "$(scripts/find-python.sh)" -- "${JAX_SPEC[@]}" "${KERAS_SPEC[@]}" \
      || say "warning: installing the jax environment failed"
    jax_ok "$ENVS/jax/bin/python" && PY_JAX="$ENVS/jax/bin/python"
  fi
  say "jax env: ${PY_JAX:-none (lenet-dist is skipped)}"
  # keras (next to jax)
  if [ -n "$PY_JAX" ]; then
    if keras_ok "$PY_JAX"; then PY_KERAS="$PY_JAX"
    elif [ -x "$ENVS/keras/bin/python" ] && keras_ok "$ENVS/keras/bin/python"; then
      PY_KERAS="$ENVS/keras/bin/python"
    elif [ "$INSTALL" = 1 ]; then
      if [ "$PY_JAX" = "$ENVS/jax/bin/python" ]; then
        step "$PY_JAX" -m pip install -q --retries 2 "${KERAS_SPEC[@]}" || true
        keras_ok "$PY_JAX" && PY_KERAS="$PY_JAX"
      else
        make_env "$ENVS/keras" "$PY_JAX" --system-site-packages -- "${KERAS_SPEC[@]}" || true
        keras_ok "$ENVS/keras/bin/python" && PY_KERAS="$ENVS/keras/bin/python"
      fi
    fi
  fi
  say "keras env: ${PY_KERAS:-none (Keras is skipped)}"
  # torch
  if [ -z "$PY_TORCH" ]; then
    for cand in "$ENVS/torch/bin/python" python3; do
      if command -v "$cand" >/dev/null 2>&1 && torch_ok "$cand"; then PY_TORCH="$cand"; break; fi
    done
  fi
  if [ -z "$PY_TORCH" ] && [ "$INSTALL" = 1 ]; then
    make_env "$ENVS/torch" "$(command -v python3.11 || command -v python3)" -- \
      "${TORCH_PIP[@]}" "${TORCH_SPEC[@]}" || say "warning: installing torch failed"
    torch_ok "$ENVS/torch/bin/python" && PY_TORCH="$ENVS/torch/bin/python"
  fi
  say "torch env: ${PY_TORCH:-none (PyTorch is skipped)}"
  say "environments ready after $(( $(date +%s) - START )) s"
fi

MODE=()
[ "$DRY" = 1 ] && MODE+=(--dry-run)
if [ "$SMOKE" = 1 ]; then
  MODE+=(--cpu-smoke)
  export OUT="${OUT:-$(mktemp -d -t gpu-check-smoke.XXXXXX)}"
  say "results in $OUT"
fi
DRIVER="$(command -v python3 || echo "$PY_JAX")"
"$DRIVER" benchmarks/gpu/run.py "${MODE[@]}" --started "$START" \
  --python-jax "$PY_JAX" --python-keras "$PY_KERAS" --python-torch "$PY_TORCH" \
  ${ARGS[@]+"${ARGS[@]}"}
say "gpu_check.sh: $(( $(date +%s) - START )) s in all"
