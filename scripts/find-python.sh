#!/usr/bin/env bash
# Print the path of a Python >= 3.12 (jax >= 0.11 needs it): $PYTHON if set,
# else python3 / python3.13 / python3.12 on PATH, else a pyenv-installed one.
set -euo pipefail
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }
for cand in "${PYTHON:-}" python3 python3.13 python3.12; do
  if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && ok "$cand"; then
    command -v "$cand"; exit 0
  fi
done
root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
# shellcheck disable=SC2012  # pyenv version directories have plain names
for cand in $(ls -d "$root"/versions/3.1[2-9]* 2>/dev/null | sort -V); do
  if ok "$cand/bin/python"; then echo "$cand/bin/python"; exit 0; fi
done
echo "error: lenet-dist needs Python >= 3.12 (jax >= 0.12); install one or set PYTHON=/path/to/python3.12" >&2
exit 1
