#!/usr/bin/env bash
# Make sure the launcher tests' tools are here: shellcheck (Debian's package),
# installed when apt-get is available as root; otherwise harmless, and
# tests/test_launch.py skips the shellcheck test. gcloud (the Cloud SDK, on
# this project's machine image) is not installed here: the flag checks skip
# without it.
set -euo pipefail
if command -v shellcheck >/dev/null 2>&1; then
  echo "tools: $(shellcheck --version | sed -n 's/^version: /shellcheck /p') found"; exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "tools: installing Debian's shellcheck"
  apt-get update -q >/dev/null && apt-get install -y -q shellcheck >/dev/null \
    && exit 0
  echo "tools: apt-get could not install shellcheck" >&2
fi
echo "tools: no shellcheck; the launcher tests skip their shellcheck check"
