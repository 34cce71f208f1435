"""Shared test setup: 8 simulated CPU devices, real data when present, one trained run."""

import atexit
import gzip
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from lenet_dist import caches, runtime

# One compilation cache for the session and every process it starts (they inherit the
# environment): the suite's many runs of the same small programs compile each once.
# A fresh folder, so that no other checkout's programs are loaded.
if caches.COMPILE_CACHE_ENV not in os.environ:
    os.environ[caches.COMPILE_CACHE_ENV] = tempfile.mkdtemp(prefix="test-jax-compile-")
    atexit.register(shutil.rmtree, os.environ[caches.COMPILE_CACHE_ENV], True)

# Before any JAX backend starts: 8 simulated CPU devices for the whole session.
runtime.configure(cpu_devices=8)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lenet_dist import data as data_lib  # noqa: E402
from lenet_dist.cli import main  # noqa: E402
from lenet_dist.config import Config  # noqa: E402
from lenet_dist.restore import restore_checkpoint  # noqa: E402
from lenet_dist.step_files import step_of  # noqa: E402
from lenet_dist.exporting import export_checkpoint  # noqa: E402
from lenet_dist.mesh import Shardings, make_mesh  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL_DIR = os.environ.get("LENET_DIST_TEST_DATA", data_lib.SYSTEM_DIRS["fashion_mnist"])


def real_data_available() -> bool:
    return data_lib._find_idx(data_lib.Path(REAL_DIR), "train-images-idx3-ubyte") is not None


def write_idx(path, array, magic=None, gz=False, cut=0):
    array = np.asarray(array, np.uint8)
    magic = magic if magic is not None else 0x0800 | array.ndim
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw += array.tobytes()
    raw = raw[: len(raw) - cut]
    with gzip.open(path, "wb") if gz else open(path, "wb") as f:
        f.write(raw)
    return path


def write_dataset(directory, n_train=20, n_test=10, gz=False, label_max=9):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{split}-images-idx3-ubyte{sfx}",
                  rng.integers(0, 256, (n, 28, 28)), gz=gz)
        write_idx(directory / f"{split}-labels-idx1-ubyte{sfx}",
                  rng.integers(0, label_max + 1, n), gz=gz)
    return directory


def synthetic_dataset(n_train=2048, n_test=512, seed=0) -> data_lib.Dataset:
    """Learnable stand-in: each class is a bright bar at its own position, plus noise."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 10, n).astype(np.int32)
        images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
        for c in range(10):
            images[labels == c, 2 + 2 * c: 4 + 2 * c, :, 0] = 255
        return data_lib.Split(images, labels)

    return data_lib.Dataset("fashion_mnist", "synthetic", split(n_train), split(n_test),
                            data_lib.CLASS_NAMES["fashion_mnist"])


@pytest.fixture(scope="session")
def dataset() -> data_lib.Dataset:
    """The real Fashion-MNIST when installed (CI installs it), synthetic otherwise."""
    if real_data_available():
        return data_lib.load_idx_dir(REAL_DIR, "fashion_mnist")
    return synthetic_dataset()


@pytest.fixture(scope="session")
def trained(dataset, tmp_path_factory):
    """One short run on 8 devices, shared by every test that needs a trained model:
    2,000 real training images, 2 epochs, Adam lr 3e-3, batch 16 (the seed's SGD
    needs ~4 full epochs to leave its sigmoid loss plateau; measured here, Adam
    with larger batches or rates also stays on it for 2 short epochs)."""
    from lenet_dist.training import train

    config = Config(devices=8, epochs=2, train_limit=2000, batch_size=16, optimizer="adam",
                    learning_rate=0.003, workdir=str(tmp_path_factory.mktemp("trained")))
    return train(config, dataset=dataset, log=lambda _: None)


def run_cli(*args, cwd=None, env=None):
    """`python -m lenet_dist ARGS` in a subprocess, as a user runs it (5-minute bound)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **(env or {}))
    return subprocess.run([sys.executable, "-m", "lenet_dist", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def small(workdir, **kw) -> Config:
    """The short run the checkpoint and multi-process tests share: 10 steps an epoch."""
    base = dict(devices=8, epochs=2, train_limit=640, batch_size=64, learning_rate=0.5,
                workdir=str(workdir))
    return Config(**{**base, **kw})


def copy_run_until(run, work, step):
    """A copy of a run's workdir as if it was killed just after saving `step`."""
    shutil.copytree(run, work)
    for step_dir in (work / "checkpoints").iterdir():
        saved = step_of(step_dir.name)
        if saved is not None and saved > step:
            shutil.rmtree(step_dir)
    return work


def assert_same_params(a, b, atol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


@pytest.fixture(scope="session")
def reference(dataset, tmp_path_factory):
    """An uninterrupted `small` run on 8 devices in this process, saving every 3 steps."""
    from lenet_dist.training import train

    work = tmp_path_factory.mktemp("ref")
    result = train(small(work, save_every_steps=3, keep_checkpoints=20), dataset=dataset,
                   log=lambda _: None)
    return work, result


def modern(workdir, **kw) -> Config:
    """`small` (10 steps an epoch) with every part of the modern recipe on."""
    from lenet_dist.config import PRESETS

    fields = {k: getattr(PRESETS["modern"], k) for k in (
        "network", "optimizer", "schedule", "warmup_epochs", "weight_decay",
        "label_smoothing", "augment")}
    return small(workdir, **{**fields, "learning_rate": 0.003, **kw})


# The uninterrupted run of each recipe, by name: the resume tests hold theirs against it.
RECIPE_RUNS = {"d2l": small, "modern": modern}


@pytest.fixture(scope="session")
def modern_reference(dataset, tmp_path_factory):
    """`reference` with the modern recipe: an uninterrupted `modern` run, saving every
    3 steps (shared by the recipe and checkpoint tests)."""
    from lenet_dist.training import train

    work = tmp_path_factory.mktemp("modern")
    result = train(modern(work, save_every_steps=3, keep_checkpoints=20), dataset=dataset,
                   log=lambda _: None)
    return work, result


@pytest.fixture(scope="session")
def data_dir(dataset, tmp_path_factory) -> str:
    """`dataset` as a directory of IDX files, for commands run in subprocesses."""
    if dataset.source != "synthetic":
        return dataset.source
    directory = tmp_path_factory.mktemp("idx")
    for prefix, split in (("train", dataset.train), ("t10k", dataset.test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte", split.images[..., 0])
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", split.labels)
    return str(directory)


@pytest.fixture(scope="session")
def devices():
    assert jax.device_count() >= 8, "conftest must set up 8 simulated CPU devices"
    return jax.devices()


def returns_within(seconds, fn, *args):
    """fn(*args)'s exception (None if it returned), failing the test if it blocks."""
    outcome = []

    def run():
        try:
            fn(*args)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"{getattr(fn, '__name__', fn)}{args} still blocked after {seconds} s"
    return outcome[0]


def make_special(directory, kind: str, suffix: str = ""):
    """A path of `kind` (fifo, dev-zero, directory, socket) that is not a regular file."""
    path = directory / f"{kind}{suffix}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        return Path("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()  # the socket file stays
    return path


# ---------------------------------------------------------------- export fixtures
# Shared by the export, predict, kit and image tests: one export per session.

@pytest.fixture(scope="session")
def test_idx(dataset, tmp_path_factory):
    """The fixture dataset's test split as IDX files (what a serving host would have)."""
    d = tmp_path_factory.mktemp("test-idx")
    images = write_idx(d / "t10k-images-idx3-ubyte", dataset.test.images[..., 0])
    labels = write_idx(d / "t10k-labels-idx1-ubyte", dataset.test.labels)
    return images, labels


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("serving") / "lenet" / "1"
    info = export_checkpoint(trained.config.workdir, str(out))
    return out, info


@pytest.fixture(scope="session")
def jax_params(trained):
    variables = restore_checkpoint(trained.config.workdir, Shardings(make_mesh(1))).variables
    return jax.device_get(variables)


def one_line_error(capsys, argv, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def png_bytes(tf, array):
    return tf.io.encode_png(np.asarray(array, np.uint8)).numpy()


def load_kit_module(name):
    """A module of the deployment kit (export/), imported as the kit imports its own."""
    sys.path.insert(0, str(ROOT / "export"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "export" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "export"))


# ------------------------------------------------- a job whose second process is late

class LateJoin:
    """A 2-process job whose process 1 starts `delay` seconds after process 0: what
    --join-timeout's default must wait for. Most of that is waiting, so when its test
    is selected the job starts as the session does (`pytest_collection_modifyitems`),
    beside the other tests, and the test collects the result; outputs go to files (no
    pipe to fill), and every process is killed by its group at the end."""

    TEST = "test_a_peer_70_seconds_late_still_joins_and_trains"
    running: "LateJoin | None" = None

    def __init__(self, data_dir: str, work: Path, delay: float = 70.0):
        from lenet_dist.launch import free_port

        self.port, self.work, self.delay = free_port(), work, delay
        self.args = ["train", "--devices", "2", "--epochs", "1", "--train-limit", "256",
                     "--batch-size", "128", "--no-checkpoint", "--no-tensorboard",
                     "--no-progress", "--data-dir", data_dir, "--workdir", str(work / "run")]
        self.procs: list[subprocess.Popen] = []
        self.first_alive_when_late: bool | None = None
        self._timer = threading.Timer(delay, self._start_late)

    def _start(self, i: int) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PYTHONUNBUFFERED="1",
                   LENET_DIST_COORDINATOR_ADDRESS=f"127.0.0.1:{self.port}",
                   LENET_DIST_NUM_PROCESSES="2", LENET_DIST_PROCESS_ID=str(i))
        with open(self.work / f"out{i}", "w") as out, open(self.work / f"err{i}", "w") as err:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "lenet_dist", *self.args], env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True))

    def _start_late(self) -> None:
        self.first_alive_when_late = self.procs[0].poll() is None
        self._start(1)

    def start(self) -> "LateJoin":
        self._start(0)
        self._timer.start()
        return self

    def result(self, timeout: float) -> tuple[list[int | None], list[tuple[str, str]]]:
        """Exit codes and (stdout, stderr) of both processes, once both have ended."""
        self._timer.join(timeout=self.delay + 5)
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        outs = [((self.work / f"out{i}").read_text(), (self.work / f"err{i}").read_text())
                for i in range(len(self.procs))]
        return [p.returncode for p in self.procs], outs

    def kill(self) -> None:
        self._timer.cancel()
        for proc in self.procs:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


# The files that take over 20 s, longest first, from one serial run of the suite
# (`pytest --durations=0`, 2026-12-08, 2-core AMD EPYC; the gs:// fault matrix alone took
# 414 s of 1,603), and test_distributed.py early (its 70 s late-joining job mostly
# waits): under xdist they are handed out first.
LONG_FILES = {name: rank for rank, name in enumerate((
    "test_gcs_faults.py", "test_distributed.py", "test_multiprocess.py",
    "test_fault_injection.py",
    "test_bad_inputs.py", "test_sigterm.py", "test_gcs.py", "test_package.py",
    "test_watchdog.py", "test_slurm.py", "test_robustness.py", "test_topology.py",
    "test_bench.py", "test_checkpoint.py", "test_recipes.py",
    "test_children.py", "test_cli.py", "test_edge.py", "test_launch.py",
    "test_job_consistency.py", "test_caches.py", "test_mpi.py"))}
LATE_JOIN_FILE = "test_distributed.py"


def start_late_join() -> None:
    import tempfile

    LateJoin.running = LateJoin(REAL_DIR, Path(tempfile.mkdtemp(prefix="late-join-")))
    LateJoin.running.start()


def under_xdist(config) -> bool:
    """Whether this process is one of pytest-xdist's workers (`make test` runs several)."""
    return hasattr(config, "workerinput")


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected: only what will run
def pytest_collection_modifyitems(session, config, items):
    if under_xdist(config):
        # Every worker collects every test and runs the files it is handed (--dist
        # loadfile) in this order: the files that take minutes go first, so that no
        # worker is left with one of them once the others are done.
        items.sort(key=lambda item: LONG_FILES.get(item.path.name, len(LONG_FILES)))
    elif any(item.name == LateJoin.TEST for item in items) and real_data_available():
        start_late_join()


def pytest_runtest_setup(item):
    """Under xdist, the late-joining job starts with the first test of its file on the
    worker that runs that file (the others never start it), and runs beside the rest."""
    if (under_xdist(item.config) and LateJoin.running is None and real_data_available()
            and item.path.name == LATE_JOIN_FILE
            and any(i.name == LateJoin.TEST for i in item.session.items)):
        start_late_join()


def pytest_sessionfinish(session, exitstatus):
    if LateJoin.running is not None:
        LateJoin.running.kill()
        shutil.rmtree(LateJoin.running.work, ignore_errors=True)
