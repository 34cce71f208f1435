"""The gs:// path under real faults: a fault matrix on the GCS emulator, and the lease.

Each row of the matrix trains one small run in its own gs:// workdir, breaks it with
one fault, recovers as a user would (the same command again by hand, or `lenet-dist
launch --max-restarts 2`), and ends with the uninterrupted run's parameters, trained in
this process on local disk. 1 and 2 processes x

  kill9      every trainer SIGKILLed while a checkpoint is being written (step 6);
  outage     the emulator SIGKILLed while a checkpoint is being written, started again
             OUTAGE_S later (the trainers are frozen at the save until it is down);
  takeover   the trainers frozen (SIGSTOP) mid-save; another job watches their lease
             expire, takes it over and finishes the run; the frozen ones are thawed
             and must stop without writing (exit 42, "lost the lease"); once more,
             by hand with 1 process, frozen in the commit itself;
  startup    SIGTERM at step 2, then SIGTERM again while the resumed run starts up
             (just after it took the lease);
  plain      SIGTERM at step 2, then resumed.

Every command runs with a hard timeout (ROW_TIMEOUT), its children are ended by process
group, and nothing edits the bucket by hand. The lease tests below run single
processes against leases held by small helper processes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lenet_dist.checkpoint import Checkpoints
from lenet_dist.config import Config
from lenet_dist.errors import RESTART_EXIT_CODE
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.state import make_optimizer
from lenet_dist.step import build_steps
from tests.conftest import assert_same_params, write_idx
from tests.gcs_support import BUCKET, errors, hold_lease, kill_group, serve

pytestmark = pytest.mark.slow

# 4 steps an epoch, 8 in all; a checkpoint every 2 steps (2, 4, 6, 8).
RUN = dict(devices=2, epochs=2, train_limit=512, batch_size=128, learning_rate=0.5)
# SIGTERM early: a job of 2 processes stops at the step they agree on, a few later.
SAVE_EVERY, FAULT_STEP, SIGTERM_STEP, LAST = 2, 6, 2, 8
TEST_IMAGES = 1000
ROW_TIMEOUT = 150  # one command of a row (each row runs at most three)
OUTAGE_S = 4.0
REFRESH = "0.5"  # the lease of a frozen holder expires 1.5 s after its last renewal


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    yield from serve(tmp_path_factory, "gcs-faults")


@pytest.fixture(scope="module")
def small_data(dataset, tmp_path_factory) -> str:
    """The first 512 training and 1,000 test images of `dataset` (the real
    Fashion-MNIST where installed) as IDX files: each row evaluates two epochs in up to
    three runs, and 10,000 test images made that a third of a row's time."""
    directory = tmp_path_factory.mktemp("faults-data")
    for prefix, split, n in (("train", dataset.train, RUN["train_limit"]),
                             ("t10k", dataset.test, TEST_IMAGES)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte", split.images[:n, ..., 0])
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", split.labels[:n])
    return str(directory)


@pytest.fixture(scope="module")
def uninterrupted(small_data, tmp_path_factory):
    """The run uninterrupted, on local disk, in this process."""
    from lenet_dist.data import load_idx_dir
    from lenet_dist.training import train

    config = Config(**RUN, workdir=str(tmp_path_factory.mktemp("faults-ref")))
    return train(config, dataset=load_idx_dir(small_data, "fashion_mnist"),
                 log=lambda _: None).state.params


def train_args(url: str, data_dir: str) -> list[str]:
    return ["train", "--workdir", url, "--data-dir", data_dir, "--no-progress",
            "--devices", str(RUN["devices"]), "--epochs", str(RUN["epochs"]),
            "--train-limit", str(RUN["train_limit"]), "--batch-size",
            str(RUN["batch_size"]), "--lr", str(RUN["learning_rate"]),
            "--save-every-steps", str(SAVE_EVERY)]


def params_in(workdir: Path, step: int):
    ckpts = Checkpoints(workdir, read_only=True)
    abstract = build_steps(make_optimizer(Config(**RUN)), Shardings(make_mesh(2))).abstract()
    return ckpts.restore(step, abstract)[0]["state"].params


class Row:
    """One row's commands: `train` itself (1 process, by hand), or `launch -n P`."""

    def __init__(self, emulator, data_dir: str, name: str, processes: int, restarts: int,
                 marks: Path):
        self.emulator, self.processes, self.restarts = emulator, processes, restarts
        self.name, self.url = name, f"gs://{name}/run"  # a bucket a row (gcs_support)
        emulator.create_bucket(name)
        self.args = train_args(self.url, data_dir)
        self.marks = marks
        marks.mkdir()
        self.results: list[subprocess.CompletedProcess] = []

    def path(self, name: str = "") -> Path:
        """Where the emulator keeps the run's object NAME (the run itself: "")."""
        return self.emulator.object(f"run/{name}".rstrip("/"), bucket=self.name)

    def command(self) -> list[str]:
        if self.processes == 1 and not self.restarts:
            return self.args
        more = ["--max-restarts", str(self.restarts)] if self.restarts else []
        return ["launch", "-n", str(self.processes), "--timeout", str(ROW_TIMEOUT - 10),
                *more, "--", *self.args]

    def spawn(self, **env) -> subprocess.Popen:
        return self.emulator.spawn(*self.command(), LENET_DIST_FAULT_ONCE=str(self.marks),
                                   LENET_DIST_TEST_ROW=self.name, **env)

    def finish(self, proc: subprocess.Popen) -> subprocess.CompletedProcess:
        try:
            out, err = proc.communicate(timeout=ROW_TIMEOUT)
        finally:
            kill_group(proc)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        self.results.append(done)
        return done

    def run(self, **env) -> subprocess.CompletedProcess:
        return self.finish(self.spawn(**env))

    def trainers(self) -> list[int]:
        """PIDs of this row's `train` processes (not the launcher, not output filters)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"LENET_DIST_TEST_ROW={self.name}".encode() in environ and b"train" in argv \
                    and b"launch" not in argv and b"lenet_dist.fatal_filter" not in argv:
                found.append(int(entry))
        return found

    def wait_frozen(self, proc: subprocess.Popen) -> list[int]:
        """Until all P trainers have stopped themselves (SIGSTOP at the fault point)."""
        deadline = time.monotonic() + ROW_TIMEOUT
        while True:
            pids = self.trainers()
            if len(pids) == self.processes and all(state(p) == "T" for p in pids):
                return pids
            assert proc.poll() is None, self.finish(proc)
            assert time.monotonic() < deadline, f"{self.name}: never froze: {pids}"
            time.sleep(0.1)

    def lease(self) -> dict | None:
        try:
            return json.loads(self.path("lock").read_text())
        except (OSError, ValueError):
            return None

    def transcript(self) -> str:
        return "\n".join(f"$ {' '.join(r.args[3:])}\nexit {r.returncode}\n{r.stdout[-2500:]}"
                         f"{r.stderr[-2500:]}" for r in self.results)


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def signal_all(pids, signum) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- the faults


def kill9(row: Row) -> None:
    """Every trainer SIGKILLs itself just after step 6's save started (async writes in
    flight): a partial checkpoint in the bucket and a lease nobody renews."""
    first = row.run(LENET_DIST_KILL_AT=f"checkpoint:saving@{FAULT_STEP}")
    if not row.restarts:
        assert first.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), row.transcript()
        row.run()


def outage(row: Row) -> None:
    """The trainers freeze as step 6's save starts; the emulator is SIGKILLed, the
    trainers thawed into the outage, and the emulator started again OUTAGE_S later."""
    proc = row.spawn(LENET_DIST_STOP_AT=f"checkpoint:saving@{FAULT_STEP}")
    pids = row.wait_frozen(proc)
    row.emulator.kill_server()
    try:
        signal_all(pids, signal.SIGCONT)
        time.sleep(OUTAGE_S)
    finally:
        row.emulator.start_server()
    first = row.finish(proc)
    if not row.restarts and first.returncode != 0:
        row.run()


def takeover(row: Row, point: str = "checkpoint:saving") -> None:
    """The trainers freeze mid-save; another job (the same command started afresh)
    watches their lease for its 1.5 s, takes it over and finishes; the frozen ones,
    thawed, find the lease gone and stop without saving."""
    proc = row.spawn(LENET_DIST_STOP_AT=f"{point}@{FAULT_STEP}",
                     LENET_DIST_LEASE_REFRESH=REFRESH)
    pids = row.wait_frozen(proc)
    try:
        taker = row.emulator.spawn(*row.args if row.processes == 1 else
                                   ["launch", "-n", str(row.processes), "--", *row.args],
                                   LENET_DIST_LEASE_REFRESH=REFRESH)
        other = row.finish(taker)
        assert other.returncode == 0, row.transcript()
        assert "is held by `lenet-dist train`" in other.stdout + other.stderr
        assert "took over the lock of a run that is no longer running" in other.stdout
        before = snapshot(row.path("checkpoints"))
    finally:
        signal_all(pids, signal.SIGCONT)
    thawed = row.finish(proc)
    lost = [ln for ln in errors(thawed) + thawed.stdout.splitlines()  # launch: stdout
            if "lost the lease" in ln]
    assert lost and "stopping without saving" in lost[0], row.transcript()
    if not row.restarts:
        assert thawed.returncode == RESTART_EXIT_CODE, row.transcript()
    # Fenced: the thawed trainers committed nothing after the taker finished, and their
    # writes still in flight landed only under their own attempt's temporary name.
    after = snapshot(row.path("checkpoints"))
    assert committed(after) == committed(before), (before, after)
    assert steps_only(after) == steps_only(before), (before, after)
    if not row.restarts:
        row.run()  # the run is finished: exit 0, nothing trained


def startup(row: Row) -> None:
    """SIGTERM at step 2 (exit 143); then SIGTERM to the resumed run's process 0 (to the
    launcher, by hand with 2 processes) just after it took the lease, while it restores
    and compiles; then once more, to the end."""
    seen = []
    stop = threading.Event()

    def strike(target) -> None:  # target(lease) -> the PID to SIGTERM
        while not stop.wait(0.05):
            lease = row.lease()
            if lease and seen and lease.get("attempt") != seen[0]:
                os.kill(target(lease), signal.SIGTERM)
                return
            if lease and not seen:
                seen.append(lease.get("attempt"))

    if row.restarts:
        watcher = threading.Thread(target=strike, args=(lambda lease: lease["pid"],))
        watcher.start()
        try:
            row.run(LENET_DIST_SIGTERM_AT=str(SIGTERM_STEP))
        finally:
            stop.set()
            watcher.join()
        return
    first = row.run(LENET_DIST_SIGTERM_AT=str(SIGTERM_STEP))
    assert first.returncode == 143, row.transcript()
    seen.append(None)  # released at its exit: the next lease seen is the resumed run's
    proc = row.spawn()
    watcher = threading.Thread(target=strike, args=(lambda lease: proc.pid,))
    watcher.start()
    try:
        second = row.finish(proc)
    finally:
        stop.set()
        watcher.join()
    assert second.returncode == 143, row.transcript()
    row.run()


def plain(row: Row) -> None:
    first = row.run(LENET_DIST_SIGTERM_AT=str(SIGTERM_STEP))
    if not row.restarts:
        assert first.returncode == 143, row.transcript()
        row.run()


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.is_file()}


def committed(files: dict) -> dict:
    """The files that make a step a checkpoint (Orbax's commit markers, the metadata);
    an unfinished save's temporary directory is not one."""
    return {k: v for k, v in files.items()
            if k.endswith(("commit_success.txt", "_CHECKPOINT_METADATA", "meta/metadata"))
            and ".orbax-checkpoint-tmp" not in k.split("/")[0]}


def steps_only(files: dict) -> dict:
    """Every file of the step directories, without Orbax's temporary ones."""
    return {k: v for k, v in files.items() if ".orbax-checkpoint-tmp" not in k.split("/")[0]}


FAULTS = {"kill9": kill9, "outage": outage, "takeover": takeover, "startup": startup,
          "plain": plain}


@pytest.mark.parametrize("how", ["hand", "launch"])
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_matrix(emulator, small_data, uninterrupted, tmp_path, fault, processes, how):
    name = f"{fault}-{processes}-{how}"
    row = Row(emulator, small_data, name, processes, 2 if how == "launch" else 0,
              tmp_path / "marks")
    started = time.monotonic()
    FAULTS[fault](row)
    check_finished(row, uninterrupted,
                   restarted=how == "launch" and fault in ("kill9", "startup", "plain"))
    print(f"{name}: {time.monotonic() - started:.1f} s, {len(row.results)} command(s)")


def test_a_commit_thawed_after_a_takeover_is_refused(emulator, small_data, uninterrupted,
                                                     tmp_path):
    """The trainer frozen in its commit of step 6 (every file written, under its own
    temporary name) while another job takes its lease over and finishes; thawed, its
    commit is refused by the lease's check: the taker's checkpoints keep every byte."""
    row = Row(emulator, small_data, "takeover-commit-1-hand", 1, 0, tmp_path / "marks")
    takeover(row, "checkpoint:committing")
    check_finished(row, uninterrupted, restarted=False)


def check_finished(row: Row, uninterrupted: dict, restarted: bool) -> None:
    """The row ended as the uninterrupted run did, and left no lease behind."""
    last = row.results[-1]
    assert last.returncode == 0, row.transcript()
    if restarted:  # an outage may pass without a restart
        assert "restarting the job (1 of 2)" in last.stdout + last.stderr, row.transcript()
    run = row.path()
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == LAST, (steps, row.transcript())
    assert_same_params(params_in(run, LAST), uninterrupted, atol=1e-6)
    assert not row.path("lock").exists(), row.transcript()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8], row.transcript()


# ---------------------------------------------------------------- the lease

# Takes the lease like a trainer would (refresh 0.5 s), says how it went and how long
# it took on the monotonic clock, and lets it go.
TAKE = ("import json, sys, time; from lenet_dist.lease import Lease\n"
        "from lenet_dist.errors import Busy\n"
        "t = time.monotonic()\n"
        "try:\n"
        "    lease = Lease(sys.argv[1] + '/lock', 'newcomer', refresh=0.5, log=lambda _: None)\n"
        "    lease.acquire()\n"
        "except Busy as e:\n"
        "    print(json.dumps(['busy', str(e), time.monotonic() - t])); sys.exit(0)\n"
        "print(json.dumps(['took', lease.stale, time.monotonic() - t])); lease.release()\n")
# A lease its holder on another host stopped renewing (it lasts 3 x 0.5 s).
DEAD = {"pid": 1, "host": "elsewhere", "since": "2026-01-01T00:00:00+00:00",
        "command": "lenet-dist train", "refresh_seconds": 0.5, "job": "another"}


def leave_lease(emulator, url: str, record: dict) -> None:
    bucket, name = url[len("gs://"):].split("/", 1)
    done = emulator.python(
        "from google.cloud import storage\n"
        f"storage.Client().bucket({bucket!r}).blob({name + '/lock'!r})"
        f".upload_from_string({json.dumps(record)!r})\n")
    assert done.returncode == 0, done.stderr


def take(emulator, url: str, skew: str | None = None, **env) -> list:
    prefix = ["faketime", "-f", skew] if skew else []
    done = subprocess.run(["nsenter", emulator.net, "--", *prefix, sys.executable, "-c",
                           TAKE, url], env=emulator.env(**env), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("skew", ["+45s", "-45s"])
def test_the_lease_is_judged_by_what_was_seen_not_by_a_clock(emulator, skew):
    """A newcomer whose clock is 45 s ahead or behind: a live lease (renewed every 0.5 s
    by another process) is refused, however old or young its timestamps look; a dead
    one on another host is taken over only after it was seen unchanged for its whole
    length (1.5 s), never before."""
    if shutil.which("faketime") is None:
        pytest.skip("faketime is not installed (Debian's faketime; make tools)")
    live = f"gs://{BUCKET}/skew-live{skew[0] == '+'}"
    holder = hold_lease(emulator, live)
    try:
        verdict, said, seconds = take(emulator, live, skew)
        assert verdict == "busy", said
        assert said.startswith("`lenet-dist train` (PID ") and "renewed" in said and \
            "it expires 1.5 s after its last renewal" in said, said
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    dead = f"gs://{BUCKET}/skew-dead{skew[0] == '+'}"
    leave_lease(emulator, dead, DEAD)
    verdict, stale, seconds = take(emulator, dead, skew)
    assert verdict == "took" and stale == DEAD, stale
    assert seconds >= 1.5, seconds  # watched for the lease's whole length first


def test_an_earlier_attempt_of_the_same_job_is_taken_over_at_once(emulator):
    """LENET_DIST_JOB_ID (launch, the JobSet, the TPU VM startup script) or SLURM's job
    id: the lease an earlier attempt left (30 s long) is taken at once; a different
    job waits to see whether it is renewed."""
    url = f"gs://{BUCKET}/same-job"
    record = {**DEAD, "refresh_seconds": 10.0, "job": "slurm-77"}
    leave_lease(emulator, url, record)
    verdict, stale, seconds = take(emulator, url, SLURM_JOB_ID="77")
    assert verdict == "took" and stale == record and seconds < 3, (verdict, seconds)
    leave_lease(emulator, url, {**record, "job": "job-a"})
    verdict, stale, seconds = take(emulator, url, LENET_DIST_JOB_ID="job-a")
    assert verdict == "took" and seconds < 3, (verdict, seconds)


FENCE = """
import json, sys, time
import numpy as np
from lenet_dist.checkpoint import Checkpoints
from lenet_dist.errors import Restartable
from lenet_dist.lease import Lease
url, lost = sys.argv[1], []
lease = Lease(url + '/lock', 'fence', refresh=0.5,
              on_lost=lambda url, why, holder: lost.append(why))
lease.acquire()
ckpts = Checkpoints(url, fence=lease.check, warn=lambda _: None)
ckpts.save(1, {"w": np.zeros(3)}, {"step": 1}, wait=True)
def down(generation):
    raise ConnectionError("the network is down")
lease._write = down  # every renewal fails from now on
t = time.monotonic()
while not lost and time.monotonic() - t < 10:
    time.sleep(0.05)
try:
    ckpts.save(2, {"w": np.ones(3)}, {"step": 2}, wait=True)
    fenced = None
except Restartable as e:
    fenced = str(e)
print(json.dumps({"lost": lost, "after": time.monotonic() - t, "fenced": fenced}))
"""


def test_a_holder_that_cannot_renew_stops_writing(emulator):
    """Fencing: once renewals fail for the lease's length less one refresh (1 s of
    1.5 s), the holder is told it lost the lease (a trainer exits 42 there) and a
    checkpoint save is refused before anything is written."""
    url = f"gs://{BUCKET}/fence"
    done = emulator.python(FENCE.replace("sys.argv[1]", repr(url)))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["lost"] and result["lost"][0].startswith("could not renew it for "), result
    assert 0.5 <= result["after"] < 1.6, result  # before anyone else may take it (1.5 s)
    assert result["fenced"] and "not saving" in result["fenced"], result
    assert emulator.object("fence/checkpoints/1/commit_success.txt").exists()
    assert not emulator.object("fence/checkpoints/2").exists()


# ---------------------------------------------------------------- paths and reach


@pytest.mark.parametrize("env, message, code", [
    ({"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}, "cannot reach Cloud Storage", 42),
    ({"STORAGE_EMULATOR_HOST": "", "GOOGLE_AUTH_TOKEN_FOR_TESTING": ""},
     "no usable Google Cloud credentials", 2),
])
def test_no_network_or_no_credentials_is_one_line_at_once(emulator, tmp_path, env, message,
                                                           code):
    """Every command that opens a gs:// path makes one bounded request first."""
    env = {**env, "HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path / "gcloud")}
    for args in (["checkpoints", "--workdir", "gs://bucket/nowhere"],
                 ["train", "--workdir", "gs://bucket/nowhere", "--devices", "1"]):
        started = time.monotonic()
        done = emulator.cmd(*args, timeout=60, **env)
        lines = errors(done)
        assert done.returncode == code and len(lines) == 1 and message in lines[0], \
            (args, done.returncode, done.stderr[-2000:])
        assert time.monotonic() - started < 15, args


def test_a_bucket_that_does_not_exist_is_one_line(emulator):
    done = emulator.cmd("checkpoints", "--workdir", "gs://no-such-bucket/run", timeout=60)
    assert done.returncode == 2 and errors(done) == [
        "error: cannot use --workdir gs://no-such-bucket/run: bucket gs://no-such-bucket "
        "does not exist"], done.stderr


def test_a_refused_job_writes_nothing_into_the_workdir(emulator, small_data):
    """A 2-process job refused by another run's live lease: the lease is taken before
    the job's shared-directory token is written, so the bucket holds only the lease."""
    from lenet_dist.rundir import JOB_TOKEN_FILE

    emulator.create_bucket("refused")
    url = "gs://refused/run"
    holder = hold_lease(emulator, url)
    try:
        done = emulator.cmd("launch", "-n", "2", "--timeout", "120", "--",
                            *train_args(url, small_data), timeout=150)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "is in use by `lenet-dist train`" in done.stdout + done.stderr
    run = emulator.object("run", bucket="refused")
    assert not (run / JOB_TOKEN_FILE).exists()
    assert sorted(p.name for p in run.rglob("*") if p.is_file()) == [], \
        list(run.rglob("*"))  # the holder released its lease; nothing else was written
