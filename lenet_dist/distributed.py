"""Joining a multi-process job (`jax.distributed`) and what its processes must agree on.

One process per host (or per GPU node), all running the same command. JAX's
own runtime does the work: `jax.distributed.initialize` before any backend
starts, a coordination service with heartbeats, collectives across processes.
This module adds only what a trainer needs on top: a join bounded by
`--join-timeout` that says what it waits for, `--distributed auto` as one process
where JAX detects no cluster, the global `--devices` split evenly over processes,
one writer (process 0), and start-up checks that every process sees the same
workdir and the same data, so a misconfigured job fails in seconds with one line on
every process instead of hanging or silently training different models.

JAX is imported inside the functions (each marked "JAX late"): the CLI imports this
module to parse its options, before `jax.distributed.initialize` may run, which must
come before any backend starts; and `--help` never loads JAX.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from lenet_dist import safefs
from lenet_dist.errors import Failure, UserError, first_line

MODES = ("off", "auto")
# How long the survivors of a dead process wait before exiting (JAX's
# coordination-service heartbeat timeout; JAX's own default is 100 s).
DEFAULT_HEARTBEAT_TIMEOUT = 60
# How long a process waits for all the others to join (JAX's own default): hosts of a
# slice or an allocation rarely start within seconds of each other.
DEFAULT_JOIN_TIMEOUT = 300
# A day: more for either timeout is surely a typo.
MAX_TIMEOUT = 86_400
# A join that takes longer than this says once what it waits for, so a slow start does
# not look like a hang.
JOIN_NOTICE_AFTER = 5.0
# JAX's own join deadline comes this much later than ours: ours ends the wait with one
# line, JAX's with a C++ abort and a stack trace.
JAX_DEADLINE_MARGIN = 30
CLUSTERS = "Cloud TPU, SLURM, Open MPI, Kubernetes"
JOB_TOKEN_FILE = ".lenet-dist-job"
JOINED: "JobSpec | None" = None  # the job this process joined, if any


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """How this process joins a job: `auto` (JAX detects Cloud TPU, SLURM, Open MPI,
    Kubernetes), explicit address/count/id, or off (one process)."""

    mode: str = "off"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT
    join_timeout: int = DEFAULT_JOIN_TIMEOUT

    @property
    def enabled(self) -> bool:
        return self.mode == "auto" or self.coordinator_address is not None

    def validate(self) -> "JobSpec":
        if self.mode not in MODES:
            raise UserError(f"--distributed {self.mode!r}: choose one of {', '.join(MODES)}")
        for name, value in (("heartbeat", self.heartbeat_timeout),
                            ("join", self.join_timeout)):
            if not 1 <= value <= MAX_TIMEOUT:
                raise UserError(f"--{name}-timeout must be in 1..{MAX_TIMEOUT} seconds, "
                                f"got {value}")
        if self.coordinator_address is not None:
            host, _, port = self.coordinator_address.rpartition(":")
            if not host or not port.isdigit():
                raise UserError(f"--coordinator-address {self.coordinator_address!r}: "
                                "expected HOST:PORT, e.g. 10.0.0.2:8476")
        if self.mode == "auto":  # JAX detects whatever is not given
            return self
        given = [self.coordinator_address, self.num_processes, self.process_id]
        if any(v is not None for v in given) and any(v is None for v in given):
            raise UserError("a job needs --coordinator-address, --num-processes and "
                            "--process-id together (or LENET_DIST_COORDINATOR_ADDRESS, "
                            "LENET_DIST_NUM_PROCESSES, LENET_DIST_PROCESS_ID), or "
                            "--distributed auto")
        if self.num_processes is not None and not 0 <= self.process_id < self.num_processes:
            raise UserError(f"--process-id {self.process_id} must be in 0.."
                            f"{self.num_processes - 1} for --num-processes {self.num_processes}")
        return self


def check_devices(devices: int | None, processes: int) -> int | None:
    """Devices each process contributes to the mesh (`--devices` is the global count)."""
    if devices is None:
        return None
    if devices % processes:
        raise UserError(f"--devices {devices} does not split over {processes} processes; "
                        f"use a multiple of {processes} (every process gives the mesh the "
                        "same number of its devices)")
    return devices // processes


def join(spec: JobSpec, devices: int | None) -> int | None:
    """Join the job before any JAX backend starts; returns this process's share of
    `devices` (what CPU simulation should provide locally), or `devices` unchanged
    in a single-process run (also `--distributed auto` where no cluster is found)."""
    spec = spec.validate()
    if not spec.enabled:
        return devices
    if spec.num_processes is not None:  # fail before connecting, on every process alike
        check_devices(devices, spec.num_processes)
    import jax  # JAX late
    from jax._src import xla_bridge  # JAX late

    if xla_bridge.backends_are_initialized():
        raise UserError("JAX's backend started before the job was joined; "
                        "jax.distributed.initialize must come first")
    nothing_given = (spec.coordinator_address, spec.num_processes, spec.process_id,
                     os.environ.get("JAX_COORDINATOR_ADDRESS")) == (None,) * 4
    if spec.mode == "auto" and nothing_given and detect_cluster() is None:
        # A laptop, a single-host TPU slice (no TPU_WORKER_* variables): one process.
        _say(f"note: --distributed auto found no cluster ({CLUSTERS}); running as one "
             "process")
        return devices
    # CPU collectives across processes (the CPU backend also exists on GPU/TPU hosts).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    start_fatal_filter()
    watch = JoinWatch(spec.join_timeout).start()
    address = spec.coordinator_address
    try:
        address, count, index = resolve(spec)
        if count is not None:  # detected: fail before connecting, as with flags
            check_devices(devices, count)
        watch.joining(address, count)
        jax.distributed.initialize(
            coordinator_address=address, num_processes=count, process_id=index,
            heartbeat_timeout_seconds=spec.heartbeat_timeout,
            shutdown_timeout_seconds=spec.heartbeat_timeout,
            initialization_timeout=spec.join_timeout + JAX_DEADLINE_MARGIN)
    except (RuntimeError, ValueError, KeyError) as e:
        hint = (f"; no cluster was detected ({CLUSTERS}): pass --coordinator-address, "
                "--num-processes and --process-id"
                if spec.mode == "auto" and address is None and detect_cluster() is None
                else "")
        # A connection that failed (RuntimeError) may work on a restart: exit 1, which
        # restart policies retry; a bad setting (ValueError, KeyError) is exit 2.
        kind = Failure if isinstance(e, RuntimeError) else UserError
        raise kind(f"cannot join the job: {first_line(e).rstrip('.')}{hint}") from None
    finally:
        watch.stop()
    global JOINED
    JOINED = spec
    state = jax._src.distributed.global_state
    return check_devices(devices, state.num_processes)


def detect_cluster() -> str | None:
    """The name of the cluster JAX's `initialize()` would detect (its ClusterEnv
    classes' own `is_env_present`, in JAX's order, opt-in ones skipped as JAX skips
    them), or None where it would find none and fail."""
    from jax._src import clusters  # JAX late

    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.name or env.__name__
    return None


def resolve(spec: JobSpec) -> tuple[str | None, int | None, int | None]:
    """The coordinator address, process count and this process's id: as given, the
    rest detected as `jax.distributed.initialize` would detect it (JAX's own
    ClusterEnv code), so that the wait can name what it waits for. On GKE this
    may wait for the coordinator's DNS name, within --join-timeout."""
    address = spec.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count, index = spec.num_processes, spec.process_id
    if spec.mode == "auto" and None in (address, count, index):
        from jax._src import clusters  # JAX late

        address, count, index, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            address, count, index, None, None, spec.join_timeout)
    return address, count, index


class JoinWatch:
    """Bounds the join: after JOIN_NOTICE_AFTER seconds, one line says what this
    process waits for; at `timeout`, one line and exit 1. JAX's own deadline would
    abort from C++ with a stack trace (its `connect()` releases the GIL, so this
    thread runs meanwhile).

    It also hears SIGTERM and Ctrl-C while the main thread is inside `connect()`:
    Python runs a signal's handler only when the main thread returns to bytecode,
    so until the join ended (up to --join-timeout) a scheduler's SIGTERM did nothing
    (measured: 25 s). Python's C-level handler still writes the signal's number to
    the wakeup fd (`signal.set_wakeup_fd`), which this thread reads: 143 or 130, one
    line, at once. Nothing is written yet at that point."""

    def __init__(self, timeout: float, notice_after: float = JOIN_NOTICE_AFTER):
        self.timeout, self.notice_after = timeout, notice_after
        self.address: str | None = None
        self.count: int | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="join-watch", daemon=True)
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup = -1

    def start(self) -> "JoinWatch":
        if threading.current_thread() is threading.main_thread():
            self._pipe = os.pipe()
            for fd in self._pipe:
                os.set_blocking(fd, False)
            self._old_wakeup = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        self._thread.start()
        return self

    def joining(self, address: str | None, count: int | None) -> None:
        self.address, self.count = address, count

    def stop(self) -> None:
        self._done.set()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            os.write(self._pipe[1], b"\0")  # wakes the thread
            self._thread.join(timeout=5)
            for fd in self._pipe:
                os.close(fd)

    def _what(self) -> str:
        if self.address is None:
            return "the job's coordinator address (cluster detection)"
        return f"all {self.count} processes of the job to join at {self.address}"

    def _wait(self, seconds: float) -> bool:
        """True once the join ended; exits on SIGTERM or SIGINT meanwhile."""
        if self._pipe is None:
            return self._done.wait(seconds)
        deadline = time.monotonic() + seconds
        while not self._done.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if select.select([self._pipe[0]], [], [], left)[0]:
                try:
                    got = os.read(self._pipe[0], 64)
                except BlockingIOError:
                    continue
                if self._done.is_set():
                    break
                if signal.SIGTERM in got:
                    os.write(2, b"error: stopped by SIGTERM while joining the job\n")
                    os._exit(128 + signal.SIGTERM)
                if signal.SIGINT in got:
                    os.write(2, b"error: interrupted while joining the job\n")
                    os._exit(128 + signal.SIGINT)
        return True

    def _watch(self) -> None:
        if self._wait(min(self.notice_after, self.timeout)):
            return
        if self.notice_after < self.timeout:
            _say(f"waiting for {self._what()} (up to {self.timeout:g} s: --join-timeout)")
            if self._wait(self.timeout - self.notice_after):
                return
        _say(f"error: gave up waiting for {self._what()} after {self.timeout:g} s "
             "(--join-timeout): start the same command on every host, check that they "
             "reach that address, or raise --join-timeout")
        os._exit(1)


def _say(line: str) -> None:
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


def process_index() -> int:
    import jax  # JAX late

    return jax.process_index()


def process_count() -> int:
    import jax  # JAX late

    return jax.process_count()


def is_primary() -> bool:
    """Process 0 writes logs, metrics, exports; all processes take part in checkpoints."""
    return process_index() == 0


def gather(values) -> np.ndarray:
    """Every process's int64 `values`, stacked [processes, ...] (a collective)."""
    from jax.experimental import multihost_utils  # JAX late

    if process_count() == 1:
        return np.asarray([values], np.int64)
    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))


def barrier(name: str) -> None:
    from jax.experimental import multihost_utils  # JAX late

    if process_count() == 1:
        return
    multihost_utils.sync_global_devices(name)


def on_primary(fn):
    """fn() on process 0 only (e.g. what writes or needs TensorFlow); the others learn
    whether it failed and fail too, instead of waiting in the next collective."""
    result, error = None, None
    if is_primary():
        try:
            result = fn()
        except UserError as e:
            error = e
    code = int(gather([error.exit_code if error is not None else 0])[0, 0])
    if error is not None:
        raise error
    if code:  # the same class as process 0's, so a restart policy treats both alike
        raise (Failure if code == Failure.exit_code else UserError)(
            "process 0 stopped (its error says why)")
    return result


def check_same_workdir(workdir) -> None:
    """Process 0 writes a fresh random token into the workdir; every process must read
    it back. A per-host local directory fails here, not in the first save's barrier."""
    from jax.experimental import multihost_utils  # JAX late

    if process_count() == 1:
        return
    token = np.frombuffer(secrets.token_bytes(8), np.int64)
    token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    path = workdir / JOB_TOKEN_FILE
    if is_primary():
        safefs.write_atomic(path, str(int(token[0])))
    barrier("lenet-dist: job token written")
    try:
        seen = int(path.read_text().strip()) == int(token[0])
    except (OSError, ValueError):
        seen = False
    ok = gather([seen])[:, 0]
    if not ok.all():
        blind = ", ".join(str(i) for i in np.flatnonzero(~ok.astype(bool)))
        raise UserError(f"process(es) {blind} do not see process 0's --workdir {workdir}: "
                        "every process needs the same shared directory (a shared "
                        "filesystem or gs://), not a per-host local path")


def data_fingerprint(*arrays: np.ndarray) -> int:
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(np.ascontiguousarray(a).data)
    return int(np.frombuffer(h.digest(), np.int64)[0])


def check_same_data(arrays, source: str) -> None:
    """All processes must train on identical data: compare fingerprints of `arrays`."""
    if process_count() == 1:
        return
    prints = gather([data_fingerprint(*arrays)])[:, 0]
    if (prints != prints[0]).any():
        groups = {}
        for i, p in enumerate(prints.tolist()):
            groups.setdefault(p, []).append(str(i))
        parts = "; ".join(f"processes {', '.join(g)}: {p & 0xFFFFFFFF:08x}"
                          for p, g in groups.items())
        raise UserError(f"processes loaded different data ({parts}; this process read "
                        f"{source}); give every process the same --data-dir")


# ------------------------------------------------ fatal errors as one line

# When a process of the job dies, JAX's coordination service notices the missing
# heartbeats (or the lost coordinator) and aborts every survivor from C++ with a
# multi-line log and a stack trace, out of Python's reach. In a multi-process
# run, stderr (and stdout, for gloo's start-up chatter) pass through a small
# filter process that turns exactly that report into one line.
_FILTER_STARTED = False


def start_fatal_filter() -> None:
    """Route this process's stdout and stderr through `lenet_dist.fatal_filter`."""
    global _FILTER_STARTED
    if _FILTER_STARTED or os.environ.get("LENET_DIST_RAW_OUTPUT") == "1":
        return
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        stream.flush()
        original = os.dup(fd)
        proc = subprocess.Popen([sys.executable, "-m", "lenet_dist.fatal_filter"],
                                stdin=subprocess.PIPE, stdout=original, close_fds=True)
        os.close(original)
        os.dup2(proc.stdin.fileno(), fd)
        proc.stdin.close()  # this process now holds the pipe only as `fd`
    _FILTER_STARTED = True
