#!/usr/bin/env bash
# On a GPU machine, from the repository root: training images/s of both recipes for
# batch 256..65,536, fp32 and bf16, the dataset on the device (about 2-4 minutes).
# Needs jax with CUDA, flax and optax (the device image has them); installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu_check.py --recipe d2l "$@"
python3 benchmarks/gpu_check.py --recipe modern --batches 256,4096,65536 "$@"
