"""Joining a multi-process job (`jax.distributed`), before any JAX backend starts.

One process per host (or per GPU node), all running the same command. JAX's
own runtime does the work: `jax.distributed.initialize` before any backend
starts, a coordination service with heartbeats, collectives across processes.
This module adds only what a trainer needs on top: a join bounded by
`--join-timeout` that says what it waits for, `--distributed auto` as one process
where JAX detects no cluster, and the global `--devices` split evenly over processes.
What the processes of a running job do together is distributed.py.

Before JAX's own join, the processes meet once on the coordinator's port (`Rendezvous`):
process 0 listens there, which proves the port free, and each other process says who
it is and what it was started with (--num-processes, --devices, ...). JAX's join waits
until every expected process has registered, so a job whose processes disagree on
their number, or two processes with one id, would only wait out --join-timeout there;
here process 0 names the difference at once, to every process that has arrived. What
only a command knows (the training config) is compared after the join
(`distributed.check_same_settings`).

JAX is imported inside the functions (each marked "JAX late"): the CLI imports this
module to parse its options, before `jax.distributed.initialize` may run, which must
come before any backend starts; and `--help` never loads JAX.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys


from lenet_dist import jax_compat, versions, watchdog
from lenet_dist.errors import Failure, UserError, first_line
from lenet_dist.rendezvous import (LOCAL_ERROR_GRACE, MAX_TIMEOUT, JoinWatch, Rendezvous,
                                   split_address, tell)

MODES = ("off", "auto")
# How long the survivors of a dead process wait before exiting (JAX's
# coordination-service heartbeat timeout; JAX's own default is 100 s).
DEFAULT_HEARTBEAT_TIMEOUT = 60
# How long a process waits for all the others to join (JAX's own default): hosts of a
# slice or an allocation rarely start within seconds of each other.
DEFAULT_JOIN_TIMEOUT = 300
# JAX's own join deadline comes this much later than ours: ours ends the wait with one
# line, JAX's with a C++ abort and a stack trace.
JAX_DEADLINE_MARGIN = 30
# The most processes a job may have. JAX sets no bound, but its coordination service
# allocates per expected process at start-up: measured on the 2-core dev machine, 0.4 s
# and 120 MB for 2**20, so --num-processes 2147483647 grew to gigabytes with no output.
# 2**20 is far above the largest jobs run (one process per host or per GPU).
MAX_PROCESSES = 2**20
CLUSTERS = "Cloud TPU, SLURM, Open MPI, Kubernetes"
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
            split_address(self.coordinator_address)
        check_count(self.num_processes, self.process_id)
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


def check_count(count: int | None, index: int | None) -> None:
    """--num-processes and --process-id within what a job can be (also when detected)."""
    if count is not None and not 1 <= count <= MAX_PROCESSES:
        raise UserError(f"--num-processes {count} must be in 1..{MAX_PROCESSES:,} (the "
                        "processes of one job)")
    if index is not None and count is None and not 0 <= index < MAX_PROCESSES:
        raise UserError(f"--process-id {index} must be in 0..{MAX_PROCESSES - 1:,}")


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
    try:  # fail before connecting, on every process alike
        _check_share(devices, spec.num_processes)
        early = None
    except UserError as e:
        if None in (spec.coordinator_address, spec.process_id):
            raise  # no rendezvous to tell the others of it
        early = e  # told to the others at the rendezvous, then raised
    import jax  # JAX late

    if jax_compat.backends_are_initialized():
        raise early or UserError("JAX's backend started before the job was joined; "
                                 "jax.distributed.initialize must come first")
    nothing_given = (spec.coordinator_address, spec.num_processes, spec.process_id,
                     os.environ.get("JAX_COORDINATOR_ADDRESS")) == (None,) * 4
    if spec.mode == "auto" and nothing_given and detect_cluster() is None:
        # A laptop, a single-host TPU slice (no TPU_WORKER_* variables): one process.
        tell(f"note: --distributed auto found no cluster ({CLUSTERS}); running as one "
             "process")
        return devices
    # CPU collectives across processes (the CPU backend also exists on GPU/TPU hosts).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    start_fatal_filter()
    watchdog.mark("joining")  # the goodput ledger's "joining" (ledger.py)
    watch = JoinWatch(spec.join_timeout).start()
    try:
        connect(spec, devices, watch)
    finally:
        watch.stop()
        watchdog.mark("starting")  # start-up again, until the run's first phase
    global JOINED
    JOINED = spec
    return check_devices(devices, jax_compat.distributed_state().num_processes)


def connect(spec: JobSpec, devices: int | None, watch: "JoinWatch") -> None:
    """Find the job (as given, or detected), meet the others at the rendezvous, and
    start JAX's distributed runtime; a failure is one line (exit 1 when a restart may
    succeed, 2 for a bad setting)."""
    import jax

    address = spec.coordinator_address
    try:
        address, count, index = resolve(spec)
        check_count(count, index)
        watch.joining(address, count, index)
        if None in (address, count, index) or count == 1:
            _check_share(devices, count)
        else:
            try:
                _check_share(devices, count)
                problem = None
            except UserError as e:
                # Perhaps this process alone was started with it: the others hear of the
                # difference (or of this error) within a short grace, instead of waiting
                # out --join-timeout for a process that is gone.
                problem = e
            with watch.quiet_signals():  # the watch alone says why it stops
                Rendezvous(address, count, index, job_settings(spec, devices, count),
                           watch).meet(problem, min(LOCAL_ERROR_GRACE, spec.join_timeout / 2))
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


def _check_share(devices: int | None, count: int | None) -> None:
    if count is not None:
        check_devices(devices, count)


def detect_cluster() -> str | None:
    """The name of the cluster JAX's `initialize()` would detect (its ClusterEnv
    classes' own `is_env_present`, in JAX's order, opt-in ones skipped as JAX skips
    them), or None where it would find none and fail."""
    for env in jax_compat.cluster_types():
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
        address, count, index, _ = jax_compat.auto_detect_unset_distributed_params(
            address, count, index, spec.join_timeout)
    return address, count, index


def job_settings(spec: JobSpec, devices: int | None, count: int) -> dict:
    """What every process of a job must have been started with, compared at the
    rendezvous (--process-id and --join-timeout may differ; --coordinator-address may
    name one host differently)."""
    stack = versions.installed(("jax", "jaxlib"))
    return {"num_processes": count, "devices": devices,
            "heartbeat_timeout": spec.heartbeat_timeout,
            "lenet_dist_version": versions.__version__,
            "jax_version": stack["jax"], "jaxlib_version": stack["jaxlib"]}


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
