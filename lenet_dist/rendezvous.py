"""Meeting the job's other processes before JAX's own join: a wait that says what it
waits for and ends within --join-timeout (`JoinWatch`), and a rendezvous on the
coordinator's port where process 0 compares what each process was started with
(`Rendezvous`), so that a job whose processes disagree fails at once with one line on
each of them instead of waiting out the join. joining.py drives both.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import signal
import socket
import sys
import threading
import time

from lenet_dist.errors import UserError

# A day: more for either timeout is surely a typo.
MAX_TIMEOUT = 86_400
# A join that takes longer than this says once what it waits for, so a slow start does
# not look like a hang.
JOIN_NOTICE_AFTER = 5.0
# A process whose own settings are wrong (--devices that does not split over its
# --num-processes) waits this long at the rendezvous before it stops, so that a job whose
# processes were given different counts names that difference on every process.
LOCAL_ERROR_GRACE = 3.0
# A host name or IPv4 address, or an IPv6 address in brackets, then :PORT.
ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.%\w]+\]|[A-Za-z0-9_.-]+):([0-9]+)")


def tell(line: str) -> None:
    """`line` on stderr, after what stdout holds (so the two read in order)."""
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


def split_address(address: str, what: str = "--coordinator-address") -> tuple[str, int]:
    """(host, port) of HOST:PORT, [IPv6]:PORT; a UserError for anything JAX cannot use."""
    match = ADDRESS.fullmatch(address)
    if match is None:
        raise UserError(f"{what} {address!r}: expected HOST:PORT, e.g. 10.0.0.2:8476")
    host, port = match.group(1), int(match.group(2))
    if not 1 <= port <= 65535:
        raise UserError(f"{what} {address}: port {port} is not in 1..65535")
    return host.strip("[]"), port


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
            tell(f"waiting for {self._what()} (up to {self.timeout:g} s: --join-timeout)")
            if self._wait(self.timeout - self.notice_after):
                return
        tell(f"error: gave up waiting for {self._what()} after {self.timeout:g} s "
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
