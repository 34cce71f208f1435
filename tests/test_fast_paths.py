"""The measured speed-ups compute what the plain path computes (issue 22).

Each kept speed-up is checked against the reference (XLA:CPU's defaults): the same
forward, the same gradients (within 1e-6), the same train step."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lenet_dist import runtime
from lenet_dist.config import Config
from lenet_dist.feed import put
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.model import build, init_params
from lenet_dist.state import create_state, make_optimizer
from lenet_dist.step import build_steps, preprocess

D2L_OPTIONS = runtime.CPU_TRAIN_OPTIONS["d2l"]


@pytest.fixture
def options_apply(monkeypatch):
    """The d2l options apply on a CPU without AVX-512: pretend this is one."""
    monkeypatch.setattr(runtime, "cpu_has_avx512", lambda: False)


def batch(n=128, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28, 1)).astype(np.uint8),
            rng.integers(0, 10, (n,)).astype(np.int32))


def loss_and_grads(options):
    model = build("d2l")

    def loss_fn(params, images, labels):
        logits = model.apply({"params": params}, preprocess(images))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=options)


def test_d2l_options_give_the_same_forward_and_gradients():
    params = init_params(jax.random.key(0))
    images, labels = batch()
    (loss_a, logits_a), grads_a = loss_and_grads(None)(params, images, labels)
    (loss_b, logits_b), grads_b = loss_and_grads(D2L_OPTIONS)(params, images, labels)
    np.testing.assert_allclose(logits_b, logits_a, rtol=0, atol=1e-6)
    assert abs(float(loss_b) - float(loss_a)) <= 1e-6
    for name in grads_a:
        for leaf in grads_a[name]:
            np.testing.assert_allclose(grads_b[name][leaf], grads_a[name][leaf], rtol=0,
                                       atol=1e-6, err_msg=f"{name}/{leaf}")


@pytest.mark.parametrize("n", [1, 8])
def test_d2l_train_step_with_options_matches_the_default_step(n, monkeypatch, options_apply):
    images, labels = batch(seed=1)
    sh = Shardings(make_mesh(n))
    tx = make_optimizer(Config())
    x, y = put(images[None], sh.stacked_batches), put(labels[None], sh.stacked_batches)
    results = {}
    for tuned in (True, False):
        if not tuned:
            monkeypatch.setitem(runtime.CPU_TRAIN_OPTIONS, "d2l", {})
        steps = build_steps(tx, sh)
        state, sums = steps.train(create_state(0, tx, sh), steps.zeros(), x, y, 0)
        results[tuned] = jax.device_get((state.params, sums))
    for a, b in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_d2l_train_step_is_compiled_with_its_options(options_apply):
    sh = Shardings(make_mesh(1))
    tx = make_optimizer(Config())
    steps = build_steps(tx, sh)
    x = put(np.zeros((1, 8, 28, 28, 1), np.uint8), sh.stacked_batches)
    y = put(np.zeros((1, 8), np.int32), sh.stacked_batches)
    text = steps.train.lower(create_state(0, tx, sh), steps.zeros(), x, y, 0).compile().as_text()
    assert "__ynn_fusion" not in text


def test_train_compiler_options(monkeypatch, options_apply):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("LENET_DIST_ONEDNN", raising=False)
    assert runtime.train_compiler_options("d2l", "cpu") == D2L_OPTIONS
    assert runtime.train_compiler_options("modern", "cpu") is None  # measured slower
    assert runtime.train_compiler_options("d2l", "gpu") is None
    monkeypatch.setenv("LENET_DIST_ONEDNN", "0")
    assert runtime.train_compiler_options("d2l", "cpu") is None
    monkeypatch.delenv("LENET_DIST_ONEDNN")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert runtime.train_compiler_options("d2l", "cpu") is None  # the user's flag wins
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(runtime, "cpu_has_avx512", lambda: True)
    assert runtime.train_compiler_options("d2l", "cpu") is None  # XLA's defaults there


def test_d2l_options_are_valid_xla_options():
    """A misspelt option would fail every d2l run at its first step."""
    jax.jit(lambda v: jnp.dot(v, v), compiler_options=D2L_OPTIONS)(jnp.ones((4, 4)))


# Page faults of a 48 MiB block (over glibc's largest mmap threshold, under the size of
# a thread arena's heap) malloc'd, written and freed four times in a thread, as XLA:CPU's
# workers allocate a step's temporaries; counted after the first time.
FAULT_PROBE = """
import ctypes, resource, sys, threading
from lenet_dist import runtime
runtime.tune_cpu()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 48 << 20, []
def steps():
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=steps)
worker.start()
worker.join()
print(max(faults[1:]))
"""


def refaults(**env) -> int:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LENET_DIST_ONEDNN"))}
    out = subprocess.run([sys.executable, "-c", FAULT_PROBE], env={**environ, **env},
                         capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_freed_blocks_stay_in_the_process():
    """A step's temporaries over glibc's mmap threshold are not faulted in afresh at
    every step (runtime.keep_freed_memory), unless the tuning is off or the user set
    malloc up themselves."""
    pages = (48 << 20) // 4096
    assert refaults() < pages // 20
    assert refaults(LENET_DIST_ONEDNN="0") > pages // 2
    assert refaults(MALLOC_MMAP_THRESHOLD_="131072") > pages // 2
