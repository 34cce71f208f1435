"""gs:// workdirs and exports against a real GCS emulator (fake-gcs-server) on loopback
(tests/gcs_support.py). One small run
is trained there (SIGTERM at step 5, then resumed) and every read-only command is
run on it; its parameters, metrics and TensorBoard scalars are held against the same
config trained on local disk. What the bucket holds is read back from the
emulator's filesystem root, where each object is a file under its own name.
"""

import json
import os
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
from tests.gcs_support import BUCKET, TIMEOUT, errors, hold_lease, serve

pytestmark = pytest.mark.slow

# The shared run: 8 steps an epoch, 16 in all.
RUN = dict(devices=2, epochs=2, train_limit=1024, batch_size=128, learning_rate=0.5)
SIGTERM_STEP = 5


def train_args(workdir: str, data_dir: str, *extra) -> list[str]:
    return ["train", "--workdir", workdir, "--data-dir", data_dir, "--no-progress",
            "--devices", str(RUN["devices"]), "--epochs", str(RUN["epochs"]),
            "--train-limit", str(RUN["train_limit"]), "--batch-size", str(RUN["batch_size"]),
            "--lr", str(RUN["learning_rate"]), *extra]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    yield from serve(tmp_path_factory)


@pytest.fixture(scope="module")
def local_run(dataset, tmp_path_factory):
    """The same config trained on local disk, uninterrupted, in this process."""
    from lenet_dist.training import train

    config = Config(**RUN, workdir=str(tmp_path_factory.mktemp("local-run")))
    return train(config, dataset=dataset, log=lambda _: None)


@pytest.fixture(scope="module")
def gcs_run(emulator, data_dir):
    """gs://bucket/run: SIGTERM at step 5, then resumed. In between, while another
    process holds the lease (and renews it), a second trainer and `checkpoints` run
    against the workdir. Returns what they printed."""
    url = f"gs://{BUCKET}/run"
    first = emulator.cmd(*train_args(url, data_dir),
                         LENET_DIST_SIGTERM_AT=str(SIGTERM_STEP))
    holder = hold_lease(emulator, url)
    try:
        record = json.loads(emulator.object("run/lock").read_text())
        intruder = emulator.spawn(*train_args(url, data_dir))
        listing = emulator.spawn("checkpoints", "--workdir", url)
        intruder_out = intruder.communicate(timeout=TIMEOUT)
        listing_out = listing.communicate(timeout=TIMEOUT)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    resumed = emulator.cmd(*train_args(url, data_dir))
    return {"url": url, "first": first, "holder": record, "resumed": resumed,
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
    """A live lease (renewed while the newcomer watches it) is refused in one line that
    names its holder, how long ago it was renewed and when it expires; the bucket is
    untouched by the refused trainer, and the holder's run resumes unharmed."""
    intruder, holder = gcs_run["intruder"], gcs_run["holder"]
    assert intruder.returncode == 1, intruder.stdout + intruder.stderr
    lines = errors(intruder)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: --workdir {gcs_run['url']} is in use by "
                               f"`lenet-dist train` (PID {holder['pid']} on "), lines
    assert " s ago as seen from here; it expires 1.5 s after its last renewal" in lines[0]
    assert "is held by `lenet-dist train`" in intruder.stdout  # it said it was watching
    listing = gcs_run["listing"]
    assert listing.returncode == 0, listing.stderr
    assert f"(being written by `lenet-dist train` (PID {holder['pid']}" in listing.stdout
    assert "its lease last renewed at " in listing.stdout
    # ...and the run finished with every checkpoint (the resume test compares its
    # parameters with the local run's).
    assert gcs_run["resumed"].returncode == 0


def test_lease_takeover_has_one_winner(emulator):
    """Two takers of one stale lease: the generation precondition lets exactly one win."""
    race = ("import json, os, threading, time; from lenet_dist.errors import Busy\n"
            "from lenet_dist.lease import Lease\n"
            "from google.cloud import storage\n"  # a lease its holder stopped renewing
            "storage.Client().bucket('bucket').blob('race/lock').upload_from_string(\n"
            "    json.dumps({'command': 'dead', 'refresh_seconds': 0.2}))\n"
            "time.sleep(1.0)\n"
            "won, go = [], threading.Barrier(2)\n"
            "def take(i):\n"
            "    lease = Lease('gs://bucket/race/lock', f'taker {i}', refresh=1, on_lost=print)\n"
            "    go.wait()\n"
            "    try:\n"
            "        won.append(lease.acquire())\n"
            "    except Busy:\n"
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
    leave = ("import os; from lenet_dist.lease import Lease; "
             f"Lease('{url}/lock', 'lenet-dist train', refresh=0.2).acquire(); "
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
    assert evaluated.stdout.startswith(f"{url} step 16 (epoch 2) on 2 device(s)") and acc in \
        evaluated.stdout, evaluated.stdout
    assert report.returncode == 0, report.stderr
    assert report.stdout.strip() == f"wrote {url}/report/report.md"
    for name in ("report.md", "curves.png", "confusion.png", "misclassified.png"):
        assert emulator.object(f"run/report/{name}").stat().st_size > 0, name


def test_export_to_the_bucket(gcs_run, emulator, data_dir):
    url, out = gcs_run["url"], f"gs://{BUCKET}/serving/lenet/1"
    done = emulator.cmd("export", "--workdir", url, "--out", out, "--platforms", "cpu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"exported {url} step 16 (test accuracy ") and f"to {out}\n" in \
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
    # predict reads the model from the bucket (TensorFlow's own gs:// reader could not).
    images = next(Path(data_dir).glob("t10k-images-idx3-ubyte*"))
    labels = next(Path(data_dir).glob("t10k-labels-idx1-ubyte*"))
    served = emulator.cmd("predict", "--model", out, str(images), "--labels", str(labels),
                          "--quiet")
    assert served.returncode == 0, served.stderr
    accuracy = float(served.stdout.split()[1])  # "accuracy 0.7216 on 10,000 images"
    assert accuracy == pytest.approx(meta["checkpoint"]["test_accuracy"], abs=3e-4), \
        served.stdout


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
    assert destination("gs://bkt/serving/1/") == "gs://bkt/serving/1"
    check_destination((tmp_path / "serving" / "1").resolve(), False, "gs://bkt/run")


@pytest.mark.parametrize("url, message", [
    ("gs://bucket/run#2", "holds '#' or '?'"),
    ("gs://bucket/run?x=1", "holds '#' or '?'"),
    ("gs://", "names no bucket"),
    ("gs:///run", "names no bucket"),
    ("gs://bucket", "is a bucket's root"),
    ("gs://bucket/", "is a bucket's root"),
    ("gs://Bucket/run", "is not a bucket name"),
    ("gs://bucket//run", "has an empty, '.' or '..' part"),
    ("gs://bucket/a/../run", "has an empty, '.' or '..' part"),
])
@pytest.mark.parametrize("command", [["train", "--workdir"], ["checkpoints", "--workdir"],
                                     ["export", "--workdir", "runs/x", "--out"]])
def test_a_gs_path_that_cannot_work_is_refused_first(capsys, url, message, command):
    """One line, exit 2, before any request (no emulator here: nothing can answer)."""
    assert main([*command, url]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0] and url in err[0], err
