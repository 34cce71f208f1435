"""Where lenet-dist keeps what it can make again: the decoded images of a folder
dataset (folder.py) and JAX's compiled programs (runtime.py). Stdlib only, below both.

The compilation cache: a second run of the same program on the same machine loads
its executables instead of compiling them (measured 2026-12-07, 2-core AMD EPYC,
`train --devices 1 --epochs 1 --train-limit 2048` twice with a fresh cache: XLA
compile seconds 3.03 -> 0.84). XLA:CPU cannot serialize a program holding oneDNN
custom calls (the CPU train step with lenet-dist's tuning on): that one compiles
every time; on GPU and TPU every program is cached. Several processes may share the
folder: JAX writes an entry under its content's key and a reader that meets a torn
one (a kill -9 mid-write) compiles instead.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LENET_DIST_CACHE_DIR"
# The compilation cache's folder, or "off": the --compile-cache option sets it too,
# so a launched job's processes inherit the choice.
COMPILE_CACHE_ENV = "LENET_DIST_COMPILE_CACHE"
COMPILE_CACHE_OFF = ("off", "0", "none", "false")
COMPILE_CACHE_SUBDIR = "jax-compile"


def expand_user(path: str | os.PathLike, option: str) -> Path:
    """`path` with a leading ~ or ~user expanded (folder: and idx: paths, the cache
    folders); a UserError when there is no such user (or no home), which pathlib
    raises as a RuntimeError. `option` starts the message: "--dataset folder:"."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        from lenet_dist.errors import UserError

        user = str(path).split("/", 1)[0]
        raise UserError(f"{option}{path}: cannot expand {user} (no such user, or no home "
                        "directory); give the path without ~") from None


def cache_root() -> Path | None:
    """$LENET_DIST_CACHE_DIR, else $XDG_CACHE_HOME/lenet-dist (an absolute one, as the
    XDG spec says), else ~/.cache/lenet-dist; None when there is no home to find."""
    if os.environ.get(CACHE_ENV):
        return expand_user(os.environ[CACHE_ENV], f"${CACHE_ENV}=")
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "lenet-dist"
    try:
        return Path.home() / ".cache" / "lenet-dist"
    except RuntimeError:  # no $HOME and no passwd entry
        return None


def compile_cache_dir() -> Path | None:
    """$LENET_DIST_COMPILE_CACHE (a folder, or "off"), else <cache_root>/jax-compile;
    None when off or there is no home to find."""
    value = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if value.lower() in COMPILE_CACHE_OFF:
        return None
    if value:
        return expand_user(value, f"${COMPILE_CACHE_ENV}=")
    root = cache_root()
    return None if root is None else root / COMPILE_CACHE_SUBDIR
