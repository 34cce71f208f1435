"""Where the caches live, and JAX's compilation cache: on by default, moved or turned
off by --compile-cache / $LENET_DIST_COMPILE_CACHE, never a reason for a run to fail."""

from __future__ import annotations

import re

import pytest

from lenet_dist import caches
from tests.conftest import run_cli


def test_where_the_compilation_cache_lives(tmp_path, monkeypatch):
    monkeypatch.setenv(caches.CACHE_ENV, str(tmp_path / "root"))
    monkeypatch.delenv(caches.COMPILE_CACHE_ENV, raising=False)
    assert caches.compile_cache_dir() == tmp_path / "root" / "jax-compile"
    monkeypatch.setenv(caches.COMPILE_CACHE_ENV, str(tmp_path / "mine"))
    assert caches.compile_cache_dir() == tmp_path / "mine"
    for off in ("off", "OFF", "0", "none", "false"):
        monkeypatch.setenv(caches.COMPILE_CACHE_ENV, off)
        assert caches.compile_cache_dir() is None


def hits(stderr: str) -> list[str]:
    return re.findall(r"Persistent compilation cache hit for '(\w+)'", stderr)


@pytest.mark.slow
def test_a_second_run_loads_what_the_first_compiled(tmp_path, data_dir):
    """JAX's own log says which programs came from the cache; the second identical run
    (another workdir) loads the first's, the train and eval steps among them. With the
    CPU tuning off: XLA:CPU cannot serialize the oneDNN custom calls it puts in the
    steps (those two compile every time; GPU and TPU have no such calls)."""
    def train(work, *options):
        return run_cli(*options, "train", "--devices", "1", "--epochs", "1",
                       "--train-limit", "256", "--no-progress", "--no-tensorboard",
                       "--data-dir", str(data_dir), "--workdir", str(tmp_path / work),
                       # XLA_FLAGS: not the oneDNN flags this session's process set
                       env={"JAX_DEBUG_LOG_MODULES": "jax._src.compiler",
                            "LENET_DIST_ONEDNN": "0", "XLA_FLAGS": "",
                            caches.COMPILE_CACHE_ENV: str(tmp_path / "cache")})

    first = train("a")
    assert first.returncode == 0, first.stderr
    assert hits(first.stderr) == [] and any((tmp_path / "cache").iterdir())
    second = train("b")
    assert second.returncode == 0, second.stderr
    assert {"jit_train_at", "jit_eval_at"} <= set(hits(second.stderr)), second.stderr[-3000:]
    assert "Error" not in second.stderr and "Warning" not in second.stderr
    off = train("c", "--compile-cache", "off")
    assert off.returncode == 0 and hits(off.stderr) == [], off.stderr[-3000:]


def test_a_cache_folder_that_cannot_be_made_leaves_the_cache_off(tmp_path, data_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = run_cli("--compile-cache", str(blocker / "cache"), "train", "--devices", "1",
                   "--epochs", "1", "--train-limit", "128", "--no-progress",
                   "--no-tensorboard", "--data-dir", str(data_dir),
                   "--workdir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert "epoch 1/1" in done.stdout and not (blocker / "cache").exists()
