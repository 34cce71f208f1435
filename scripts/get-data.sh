#!/usr/bin/env bash
# Make sure Fashion-MNIST can be found. Uses Debian's dataset-fashion-mnist
# when apt is available as root (no internet needed beyond Debian's mirror);
# otherwise lenet-dist falls back to TFDS (the tfds extra) at first use.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  echo "data: Fashion-MNIST found in $dir"; exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "data: installing Debian's dataset-fashion-mnist into $dir"
  apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null \
    && exit 0
  echo "data: apt-get could not install dataset-fashion-mnist" >&2
fi
echo "data: no system copy; pass --data-dir DIR with the four IDX files, or install the tfds" \
     "extra (.venv/bin/pip install -e '.[tfds]') to use a prepared TFDS copy or download it" \
     "(needs internet)"
