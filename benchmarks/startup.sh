#!/usr/bin/env bash
# Start-up of lenet-dist installs, side by side: `--help`, a one-step `train`, and
# `predict --workdir` on one PNG, in wall seconds, the venvs alternating each round.
#
#   benchmarks/startup.sh [-r ROUNDS] VENV...     e.g. /tmp/venv-core .venv
#
# Prints the median and min per command and venv. DATA (default: Debian's
# Fashion-MNIST) is the IDX directory; the run `predict` reads is trained once, with
# the first venv.
set -euo pipefail

rounds=5
if [[ "${1:-}" == "-r" ]]; then rounds="$2"; shift 2; fi
if (( $# == 0 )); then sed -n '2,9p' "$0"; exit 2; fi
data="${DATA:-/usr/share/datasets/fashion-mnist}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

first="$1"
"$first/bin/lenet-dist" train --recipe smoke --devices 1 --epochs 1 --train-limit 256 \
  --no-progress --no-tensorboard --workdir "$scratch/run" --data-dir "$data" > /dev/null
"$first/bin/python" - "$data" "$scratch/x.png" <<'EOF'
import gzip, sys
import numpy as np
from PIL import Image
raw = gzip.open(f"{sys.argv[1]}/t10k-images-idx3-ubyte.gz").read()[16:16 + 784]
Image.fromarray(np.frombuffer(raw, np.uint8).reshape(28, 28)).save(sys.argv[2])
EOF

seconds() {  # wall seconds of one command; its output is dropped, a failure is fatal
  local start end
  start="$(date +%s.%N)"
  "$@" > /dev/null 2>&1 || { echo "failed: $*" >&2; exit 1; }
  end="$(date +%s.%N)"
  echo "$end - $start" | bc
}

for ((r = 1; r <= rounds; r++)); do
  for venv in "$@"; do
    log="$scratch/$(basename "$venv").times"
    cli="$venv/bin/lenet-dist"
    echo "help $(seconds "$cli" --help)" >> "$log"
    rm -rf "$scratch/work"
    echo "train $(seconds "$cli" train --recipe smoke --devices 1 --epochs 1 \
      --train-limit 16 --batch-size 16 --no-checkpoint --no-tensorboard --no-progress \
      --workdir "$scratch/work" --data-dir "$data")" >> "$log"
    echo "predict $(seconds "$cli" predict --workdir "$scratch/run" "$scratch/x.png")" >> "$log"
  done
done

printf '%-28s %-8s %8s %8s\n' venv command median min
for venv in "$@"; do
  for command in help train predict; do
    grep "^$command " "$scratch/$(basename "$venv").times" | awk '{print $2}' | sort -n |
      awk -v v="$venv" -v c="$command" '{t[NR] = $1}
        END {printf "%-28s %-8s %8.2f %8.2f\n", v, c, t[int((NR + 1) / 2)], t[1]}'
  done
done
