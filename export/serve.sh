#!/usr/bin/env bash
# Serve exported LeNet SavedModels with TensorFlow Serving in Docker.
#
#   export/serve.sh MODEL_BASE [MODEL_NAME]
#
# MODEL_BASE holds numbered version folders (1/, 2/, ...), each a SavedModel
# written by `lenet-dist export --out MODEL_BASE/N`; TF Serving serves the
# highest number and hot-swaps when a new one appears. Ports: 8500 gRPC,
# 8501 REST. TF_SERVING_IMAGE picks the image (default below): its TensorFlow
# must read the StableHLO version recorded in assets.extra/metadata.json
# (export with the TensorFlow version your serving image is built on).
set -euo pipefail

base=${1:?usage: export/serve.sh MODEL_BASE [MODEL_NAME]}
name=${2:-lenet}
image=${TF_SERVING_IMAGE:-tensorflow/serving:latest}

if [[ ! -d "$base" ]]; then
  echo "error: $base is not a directory" >&2; exit 2
fi
base=$(cd "$base" && pwd)
versions=""
for d in "$base"/*/; do               # portable (no GNU find): numbered SavedModel folders
  v=$(basename "$d")
  [[ "$v" =~ ^[0-9]+$ && -f "$d/saved_model.pb" ]] && versions+="$v "
done
if [[ -z "$versions" ]]; then
  echo "error: $base has no version folder (e.g. $base/1/saved_model.pb);" \
       "export with: lenet-dist export --out $base/1" >&2
  exit 2
fi
if ! command -v docker >/dev/null; then
  echo "error: docker is not installed; see export/README.md for other ways to serve" >&2
  exit 2
fi

echo "serving '$name' versions: $versions(REST http://localhost:8501/v1/models/$name, gRPC localhost:8500)"
exec docker run --rm -p 8500:8500 -p 8501:8501 \
  --mount "type=bind,source=$base,target=/models/$name,readonly" \
  -e MODEL_NAME="$name" "$image"
