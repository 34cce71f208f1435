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

Before JAX's own join, the processes meet once on the coordinator's port (`Rendezvous`):
process 0 listens there, which proves the port free, and each other process says who
it is and what it was started with (--num-processes, --devices, ...). JAX's join waits
until every expected process has registered, so a job whose processes disagree on
their number, or two processes with one id, would only wait out --join-timeout there;
here process 0 names the difference at once, to every process that has arrived. What
only a command knows (the training config) is compared after the join
(`check_same_settings`).

JAX is imported inside the functions (each marked "JAX late"): the CLI imports this
module to parse its options, before `jax.distributed.initialize` may run, which must
come before any backend starts; and `--help` never loads JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from lenet_dist import jax_compat, safefs, versions, watchdog
from lenet_dist.errors import Failure, Restartable, UserError, first_line

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
# A process whose own settings are wrong (--devices that does not split over its
# --num-processes) waits this long at the rendezvous before it stops, so that a job whose
# processes were given different counts names that difference on every process.
LOCAL_ERROR_GRACE = 3.0
# The most processes a job may have. JAX sets no bound, but its coordination service
# allocates per expected process at start-up: measured on the 2-core dev machine, 0.4 s
# and 120 MB for 2**20, so --num-processes 2147483647 grew to gigabytes with no output.
# 2**20 is far above the largest jobs run (one process per host or per GPU).
MAX_PROCESSES = 2**20
# A host name or IPv4 address, or an IPv6 address in brackets, then :PORT.
ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.%\w]+\]|[A-Za-z0-9_.-]+):([0-9]+)")
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


def split_address(address: str, what: str = "--coordinator-address") -> tuple[str, int]:
    """(host, port) of HOST:PORT, [IPv6]:PORT; a UserError for anything JAX cannot use."""
    match = ADDRESS.fullmatch(address)
    if match is None:
        raise UserError(f"{what} {address!r}: expected HOST:PORT, e.g. 10.0.0.2:8476")
    host, port = match.group(1), int(match.group(2))
    if not 1 <= port <= 65535:
        raise UserError(f"{what} {address}: port {port} is not in 1..65535")
    return host.strip("[]"), port


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
        _say(f"note: --distributed auto found no cluster ({CLUSTERS}); running as one "
             "process")
        return devices
    # CPU collectives across processes (the CPU backend also exists on GPU/TPU hosts).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    start_fatal_filter()
    watchdog.mark("joining")  # the goodput ledger's "joining" (ledger.py)
    watch = JoinWatch(spec.join_timeout).start()
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
    finally:
        watch.stop()
        watchdog.mark("starting")  # start-up again, until the run's first phase
    global JOINED
    JOINED = spec
    return check_devices(devices, jax_compat.distributed_state().num_processes)


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
        self.index: int | None = None
        self.arrived: set[int] = set()  # process 0: the others that have said hello
        self.answered = False  # the others: process 0 has answered at the address
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

    def joining(self, address: str | None, count: int | None,
                index: int | None = None) -> None:
        self.address, self.count, self.index = address, count, index

    @contextlib.contextmanager
    def quiet_signals(self):
        """While the main thread waits in Python (the rendezvous), its own SIGTERM and
        SIGINT handlers would print a second, different line: this watch answers them
        alone. Restored before JAX's join, which installs its SIGTERM notifier."""
        if self._pipe is None:
            yield
            return
        old = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

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
             f"(--join-timeout): {self._cause()}start the same command on every host, "
             "check that they reach that address, or raise --join-timeout")
        os._exit(1)

    def _cause(self) -> str:
        """The likely reason, from how far the rendezvous got ("" if unknown)."""
        if self.address is None or self.count is None or self.index is None:
            return ""
        if self.index == 0:
            missing = sorted(set(range(1, self.count)) - self.arrived)
            if not missing:
                return "every process arrived, but JAX's join did not complete; "
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            return (f"{len(missing)} of the {self.count} processes never joined "
                    f"(process{'es' if len(missing) > 1 else ''} {shown}); ")
        if not self.answered:
            return (f"the coordinator at {self.address} never answered: is process 0 "
                    "running there? ")
        return "process 0 answered, but not every process of the job joined; "


def job_settings(spec: JobSpec, devices: int | None, count: int) -> dict:
    """What every process of a job must have been started with, compared at the
    rendezvous (--process-id and --join-timeout may differ; --coordinator-address may
    name one host differently)."""
    stack = versions.installed(("jax", "jaxlib"))
    return {"num_processes": count, "devices": devices,
            "heartbeat_timeout": spec.heartbeat_timeout,
            "lenet_dist_version": versions.__version__,
            "jax_version": stack["jax"], "jaxlib_version": stack["jaxlib"]}


def disagreement(settings: dict[int, dict], limit: int = 3) -> str | None:
    """One line naming every setting on which processes differ from the lowest-numbered
    one, with their values, or None if they all agree."""
    first = min(settings)
    reference = settings[first]
    parts = []
    for key in sorted(set().union(*settings.values())):
        mine = reference.get(key)
        differ = [(i, s.get(key)) for i, s in sorted(settings.items())
                  if i != first and s.get(key) != mine]
        if differ:
            shown = ", ".join(f"process {i}: {_value(v)}"
                              for i, v in [(first, mine), *differ[:limit]])
            parts.append(f"{key} ({shown}{', ...' if len(differ) > limit else ''})")
    if not parts:
        return None
    return (f"the job's processes disagree on {', '.join(parts)}; start every process with "
            "the same settings")


def _value(v) -> str:
    return "unset" if v is None else v if isinstance(v, str) else json.dumps(v)


class Rendezvous:
    """The processes meet once on the coordinator's port before JAX's join: process 0
    listens (so a port in use fails at once, in one line), each other process sends
    {process_id, settings} and waits; process 0 answers every one "ok" once all have
    come, or, at the first that differs or repeats an id, the one line to all that came.
    A connection that sends no hello (a port scan, a health check) is dropped."""

    MAGIC = "lenet-dist-rendezvous/1"
    RETRY = 0.2  # seconds between attempts to reach process 0
    HELLO_TIMEOUT = 2.0  # for a connection to say who it is (it sends at once)

    def __init__(self, address: str, count: int, index: int, settings: dict,
                 watch: "JoinWatch | None" = None):
        self.address, self.count, self.index = address, count, index
        self.host, self.port = split_address(address)
        self.settings = json.loads(json.dumps(settings))  # as the others will read them
        self.watch = watch or JoinWatch(MAX_TIMEOUT)

    def meet(self, problem: UserError | None = None, grace: float = LOCAL_ERROR_GRACE) -> None:
        """Returns once every process has come with the same settings. With `problem`
        (this process's own settings are wrong), raises within `grace` seconds: the
        difference, if a process that differs came meanwhile, else `problem`."""
        deadline = None if problem is None else time.monotonic() + grace
        if self.index == 0:
            self._host(problem, deadline)
        else:
            self._visit(problem, deadline)
        if problem is not None:
            raise problem

    # -- process 0 -----------------------------------------------------------------

    def listen(self) -> socket.socket:
        """Bind the port where JAX's coordination service will (all addresses, unless
        JAX_COORDINATOR_BIND_ADDRESS says otherwise), as gRPC binds it: SO_REUSEADDR,
        so a previous run's connections in TIME_WAIT do not count, a listener does."""
        bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS")
        host, port = split_address(bind, "JAX_COORDINATOR_BIND_ADDRESS") if bind \
            else ("::", self.port)
        families = [socket.AF_INET6, socket.AF_INET] if host == "::" else [
            socket.AF_INET6 if ":" in host else socket.AF_INET]
        for n, family in enumerate(families):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and host == "::":
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("0.0.0.0" if family == socket.AF_INET and host == "::" else host,
                           port))
                sock.listen(min(self.count, socket.SOMAXCONN))
                return sock
            except OSError as e:
                sock.close()
                if e.errno == errno.EADDRINUSE:
                    raise UserError(
                        f"port {port} of --coordinator-address {self.address} is in use on "
                        "this host (another job's coordinator, or a second process 0 of "
                        "this one?); choose a free port, or stop what holds it") from None
                if e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL) \
                        and n + 1 < len(families):
                    continue  # no IPv6 here: IPv4 alone
                raise UserError(f"process 0 cannot listen on port {port} of "
                                f"--coordinator-address {self.address}: "
                                f"{e.strerror or e}") from None
        raise AssertionError("unreachable")

    def _host(self, problem: UserError | None, deadline: float | None) -> None:
        _raise_fd_limit(self.count + 64)
        try:
            listener = self.listen()
        except UserError:
            if problem is not None:
                raise problem from None  # this process's own error comes first
            raise
        peers: dict[int, tuple[socket.socket, str]] = {}
        try:
            while len(peers) < self.count - 1:
                left = 1.0 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    self._answer([c for c, _ in peers.values()], {"error": str(problem)})
                    return
                if not select.select([listener], [], [], min(left, 1.0))[0]:
                    continue
                try:
                    conn, peer = listener.accept()
                except OSError:
                    continue
                hello = self._hello(conn)
                if hello is None:
                    conn.close()
                    continue
                index, theirs = hello
                where = peer[0].removeprefix("::ffff:")  # IPv4, seen through IPv6
                differ = self._problem(index, theirs, peers, where)
                if differ is not None:
                    self._answer([conn, *(c for c, _ in peers.values())], {"error": differ})
                    raise UserError(differ)
                peers[index] = (conn, where)
                self.watch.arrived.add(index)
            self._answer([c for c, _ in peers.values()],
                         {"ok": True} if problem is None else {"error": str(problem)})
        finally:
            for conn, _ in peers.values():
                conn.close()
            listener.close()

    def _hello(self, conn: socket.socket) -> tuple[int, dict] | None:
        conn.settimeout(self.HELLO_TIMEOUT)
        try:
            line = _read_line(conn)
            hello = json.loads(line) if line is not None else None
            if not isinstance(hello, dict) or hello.get("magic") != self.MAGIC:
                return None
            index, theirs = hello["process_id"], hello["settings"]
            if not isinstance(index, int) or not isinstance(theirs, dict):
                return None
        except (OSError, ValueError, KeyError):
            return None
        conn.settimeout(None)
        return index, theirs

    def _problem(self, index: int, theirs: dict, peers: dict, where: str) -> str | None:
        differ = disagreement({0: self.settings, index: theirs})
        if differ is not None:
            return differ
        if index == 0 or (index in peers and _alive(peers[index][0])):
            first = "this host" if index == 0 else peers[index][1]
            return (f"two processes have --process-id {index} (on {first} and on {where}); "
                    f"give each process of the job its own id in 0..{self.count - 1}")
        if not 0 < index < self.count:  # the same count, so its own check failed: a bug
            return f"a process joined with --process-id {index}, outside 0..{self.count - 1}"
        return None

    @staticmethod
    def _answer(conns, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.settimeout(2.0)
                conn.sendall(data)

    # -- every other process -------------------------------------------------------

    def _visit(self, problem: UserError | None, deadline: float | None) -> None:
        hello = (json.dumps({"magic": self.MAGIC, "process_id": self.index,
                             "settings": self.settings}) + "\n").encode()
        strange = 0
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            try:
                conn = socket.create_connection((self.host, self.port),
                                                timeout=2.0 if left is None else min(left, 2.0))
            except OSError:  # not listening yet, not reachable yet, no DNS name yet
                time.sleep(self.RETRY)
                continue
            with conn:
                self.watch.answered = True
                try:
                    conn.sendall(hello)
                    # With a problem of its own, process 0 answers at once (it differs,
                    # or has the same problem); else it answers when all have come.
                    conn.settimeout(None if deadline is None
                                    else max(deadline - time.monotonic(), 0.1))
                    line = _read_line(conn)
                except TimeoutError:
                    return
                except OSError:  # process 0 went away meanwhile: it may come back
                    line = None
            try:
                reply = json.loads(line) if line else None
            except ValueError:
                reply = None
            if isinstance(reply, dict) and "error" in reply:
                raise UserError(str(reply["error"]))
            if isinstance(reply, dict) and reply.get("ok"):
                return
            strange += 1
            if line is not None and strange >= 3:
                raise UserError(
                    f"the coordinator at {self.address} answers, but not as a lenet-dist "
                    "process 0 waiting for its job: the job may have started without this "
                    f"process (is another one running as --process-id {self.index}?), or "
                    "another program holds that port")
            time.sleep(self.RETRY)


def _read_line(conn: socket.socket, limit: int = 1 << 20) -> str | None:
    """One newline-ended line, or None at end of stream without one."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
        if len(data) > limit:
            raise ValueError("a line too long")
    return data.decode("utf-8", "replace")


def _alive(conn: socket.socket) -> bool:
    """Whether the peer of `conn` still holds its end (it sends nothing until answered)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def _raise_fd_limit(needed: int) -> None:
    """Process 0 holds a connection per process (as JAX's service will): lift the soft
    limit on open files towards the hard one where the default 1,024 is too few."""
    import resource  # POSIX only; a large job alone needs it

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


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


_MEETINGS = itertools.count(1)  # every process meets the others in the same order


def meet(what: str) -> None:
    """Wait until every process of the job is here, for at most --join-timeout; then
    every process raises one line naming `what` and the processes that did not come
    (Restartable: a stuck or lost process is what a restart mends). A device
    collective alone would wait forever for a process whose main thread is stuck."""
    if process_count() == 1:
        return
    client = jax_compat.distributed_state().client
    if client is None:  # a job joined without JAX's service: nothing to wait on
        return
    seconds = JOINED.join_timeout if JOINED is not None else DEFAULT_JOIN_TIMEOUT
    key, me = f"lenet-dist/meet/{next(_MEETINGS)}", process_index()
    try:
        client.key_value_set(f"{key}/{me}", what)
        client.wait_at_barrier(key, seconds * 1000)
        client.key_value_delete(f"{key}/{me}")  # only a failed meeting reads it: keep none
    except Exception as e:  # JaxRuntimeError: the deadline, or the service failed
        try:
            came = {int(k.rsplit("/", 1)[1]) for k, _ in client.key_value_dir_get(f"{key}/")}
        except Exception:  # noqa: BLE001 - the coordinator itself is gone
            came = {me}
        missing = [i for i in range(process_count()) if i not in came]
        if not missing:
            raise Restartable(f"the job's processes could not meet ({what}): "
                              f"{first_line(e)}") from None
        raise Restartable(f"waited {seconds} s ({what}) for process"
                          f"{'es' if len(missing) > 1 else ''} "
                          f"{', '.join(map(str, missing[:8]))}"
                          f"{', ...' if len(missing) > 8 else ''}, which did not come "
                          "(stuck or lost; --join-timeout bounds every wait for the "
                          "others)") from None


def gather(values, what: str) -> np.ndarray:
    """Every process's int64 `values`, stacked [processes, ...] (a collective), once
    all have come (`meet`)."""
    from jax.experimental import multihost_utils  # JAX late

    if process_count() == 1:
        return np.asarray([values], np.int64)
    meet(what)
    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))


def on_primary(fn, what: str):
    """fn() on process 0 only (e.g. what writes or needs TensorFlow); the others learn
    whether it failed and fail too, instead of waiting in the next collective."""
    result, error = None, None
    if is_primary():
        try:
            result = fn()
        except UserError as e:
            error = e
    code = int(gather([error.exit_code if error is not None else 0],
                      f"process 0 {what}")[0, 0])
    if error is not None:
        raise error
    if code:  # the same class as process 0's, so a restart policy treats both alike
        kind = {Failure.exit_code: Failure, Restartable.exit_code: Restartable}.get(
            code, UserError)
        raise kind("process 0 stopped (its error says why)")
    return result


def check_same_workdir(workdir) -> str:
    """Process 0 writes a fresh random token into the workdir; every process must read
    it back. A per-host local directory fails here, not in the first save's barrier.
    The token, the same in every process, names this attempt (its checkpoints'
    temporary directories: checkpoint.FencedCommit)."""
    from jax.experimental import multihost_utils  # JAX late

    if process_count() == 1:
        return secrets.token_hex(6)
    token = np.frombuffer(secrets.token_bytes(8), np.int64)
    meet("sharing the job token")
    token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    path = workdir / JOB_TOKEN_FILE
    if is_primary():
        safefs.write_atomic(path, str(int(token[0])))
    meet("process 0 writing the job token")
    try:
        seen = int(path.read_text().strip()) == int(token[0])
    except (OSError, ValueError):
        seen = False
    ok = gather([seen], "reading the job token")[:, 0]
    if not ok.all():
        blind = ", ".join(str(i) for i in np.flatnonzero(~ok.astype(bool)))
        raise UserError(f"process(es) {blind} do not see process 0's --workdir {workdir}: "
                        "every process needs the same shared directory (a shared "
                        "filesystem or gs://), not a per-host local path")
    return f"{int(token[0]) & (2**48 - 1):012x}"


def check_same_settings(settings: dict, name: str) -> None:
    """Every process of the job must run `name` (e.g. "train") with the same `settings`
    (e.g. the effective Config): process 0 posts its own to JAX's key-value store, each
    process compares, those that differ post theirs, and after one barrier every process
    raises the same one line naming each setting that differs. Nothing touches the
    devices, so it works before any mesh; it costs a few RPCs to the coordinator."""
    if process_count() == 1 or JOINED is None:
        return
    client = jax_compat.distributed_state().client
    if client is None:
        return
    me, timeout_ms = process_index(), JOINED.join_timeout * 1000
    mine = json.loads(json.dumps(settings, sort_keys=True, default=str))
    prefix = f"lenet-dist/settings/{name}"
    try:
        if me == 0:
            client.key_value_set(f"{prefix}/0", json.dumps(mine))
            reference = mine
        else:
            reference = json.loads(client.blocking_key_value_get(f"{prefix}/0", timeout_ms))
        if mine != reference:
            client.key_value_set(f"{prefix}/differs/{me}", json.dumps(mine))
        client.wait_at_barrier(f"{prefix}/compared", timeout_ms)
        differing = client.key_value_dir_get(f"{prefix}/differs/")
    except Exception as e:  # JaxRuntimeError: a process died or never came
        raise Failure(f"cannot compare the job's {name} settings across its processes: "
                      f"{first_line(e)}") from None
    if differing:
        table = {0: reference}
        for key, value in sorted(differing, key=lambda kv: int(kv[0].rsplit("/", 1)[1])):
            table[int(key.rsplit("/", 1)[1])] = json.loads(value)
        raise UserError(disagreement(table))


# Config fields a host may spell its own way: a shared directory mounted elsewhere, the
# same data at another path; check_same_workdir and check_same_data compare what they hold.
PER_HOST_FIELDS = ("workdir", "data_dir")


def check_same_config(config: dict, name: str = "train", **extra) -> None:
    """`check_same_settings` for a `Config.to_dict()` (and `extra` command options)."""
    check_same_settings({k: v for k, v in config.items() if k not in PER_HOST_FIELDS}
                        | extra, name)


def data_fingerprint(*arrays: np.ndarray) -> int:
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(np.ascontiguousarray(a).data)
    return int(np.frombuffer(h.digest(), np.int64)[0])


def check_same_data(arrays, source: str) -> None:
    """All processes must train on identical data: compare fingerprints of `arrays`."""
    if process_count() == 1:
        return
    prints = gather([data_fingerprint(*arrays)], "comparing the data")[:, 0]
    if (prints != prints[0]).any():
        groups = {}
        for i, p in enumerate(prints.tolist()):
            groups.setdefault(p, []).append(str(i))
        parts = "; ".join(f"processes {', '.join(g)}: {p & 0xFFFFFFFF:08x}"
                          for p, g in groups.items())
        raise UserError(f"processes loaded different data ({parts}; this process read "
                        f"{source}); give every process the same data (--data-dir, the "
                        "same files under folder: and idx: paths)")


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
