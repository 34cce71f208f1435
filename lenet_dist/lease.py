"""The lease of a gs:// workdir: who holds it, renewed while it runs.

A bucket cannot be flock'ed, so `Lease` holds <workdir>/lock as an object, created and
rewritten only with generation preconditions (google-cloud-storage, which gcsfs
depends on). rundir.workdir_lock hands it out for gs:// workdirs, as it hands out a
flock for local ones.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid

from lenet_dist.errors import (RESTART_EXIT_CODE, Busy, Restartable, UserError,
                               describe_holder, first_line)
from lenet_dist.gcs import REQUEST_TIMEOUT_S, split, storage

# The holder rewrites its lease every REFRESH seconds; a lease not seen to change for
# STALE_AFTER refreshes belongs to a trainer that died (or lost the network that
# long) and may be taken over. LENET_DIST_LEASE_REFRESH shortens it for tests.
DEFAULT_REFRESH_S = 10.0
REFRESH_ENV = "LENET_DIST_LEASE_REFRESH"
STALE_AFTER = 3
JOB_ENV = "LENET_DIST_JOB_ID"  # one value for every attempt of one job (job_identity)



def refresh_seconds() -> float:
    text = os.environ.get(REFRESH_ENV, "")
    try:
        value = float(text) if text else DEFAULT_REFRESH_S
    except ValueError:
        value = -1.0
    if not 0.2 <= value <= 3600:
        raise UserError(f"{REFRESH_ENV}={text!r} is not a number of seconds in [0.2, 3600]")
    return value


def job_identity() -> str | None:
    """Who this run is, across its own restarts: LENET_DIST_JOB_ID (which `launch`, the
    JobSet manifest and the TPU VM startup script set), else SLURM's job id (the same
    across requeues). None for a run started by hand: it is a job of its own."""
    job = os.environ.get(JOB_ENV, "").strip()
    if job:
        return job[:200]
    slurm = os.environ.get("SLURM_JOB_ID", "").strip()
    return f"slurm-{slurm}" if slurm else None


class Lease:
    """<workdir>/lock on Cloud Storage: who holds the workdir, renewed while it runs.

    Taking it: create the object only if absent (ifGenerationMatch=0). Holding it: a
    background thread rewrites it every `refresh` seconds, each time only if it is
    still the generation we wrote. A lease lasts STALE_AFTER refreshes. Whether it is
    stale is judged as Kubernetes' leader election does, from what this client saw:
    a lease whose generation does not change for that long, timed on this process's
    monotonic clock, belongs to a trainer that died. No wall clock is compared with
    another machine's. Taking it over is a rewrite on the generation we watched, so of
    two takers exactly one wins. An earlier attempt of the same job (job_identity) is
    taken over at once, and so is a holder on this host whose process is gone.

    The holder fences itself: it stops renewing-and-writing, and its process exits
    RESTART_EXIT_CODE, when its lease was taken over or when it could not renew it for
    the lease's length less one refresh (before anyone else may take it); `check()`
    refuses a checkpoint when the lease is not held. Requests time out well within a
    refresh. Releasing deletes it, again on our generation.
    """

    def __init__(self, url: str, command: str, refresh: float | None = None,
                 on_lost=None, log=None):
        self.url = os.fspath(url)  # the lock object (rundir.lock_path names it)
        self.bucket, self.name = split(self.url)
        self.command = command
        self.refresh = refresh_seconds() if refresh is None else refresh
        self.on_lost = on_lost or _exit_lost
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self.job = job_identity()
        self.generation: int | None = None
        self.renewed = 0.0  # time.monotonic() of the last write that we know landed
        self.lost: str | None = None
        self.stale: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client, self._errors = storage()

    @property
    def duration(self) -> float:
        return STALE_AFTER * self.refresh

    @property
    def timeout(self) -> float:
        """Each request's: well under a refresh, so a hung request cannot outlast it."""
        return max(0.5, min(REQUEST_TIMEOUT_S, self.refresh / 2))

    def _blob(self):
        return self._client.bucket(self.bucket).blob(self.name)

    def _record(self) -> bytes:
        return (json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "since": self._since,
            "command": self.command, "refresh_seconds": self.refresh, "job": self.job,
            "attempt": self._attempt}) + "\n").encode()

    def _write(self, generation: int) -> None:
        blob = self._blob()
        blob.upload_from_string(self._record(), content_type="application/json",
                                if_generation_match=generation, timeout=self.timeout,
                                retry=None)
        self.generation, self.renewed = blob.generation, time.monotonic()

    def acquire(self) -> Lease:
        """Take the lease, or raise Busy naming its holder; OSError when Cloud
        Storage cannot be reached or refuses (one line, not the client's traceback)."""
        try:
            return self._acquire()
        except (Busy, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - google.api_core, google.auth, requests
            raise OSError(f"{type(e).__name__}: {first_line(e, 200)}") from None

    def _acquire(self) -> Lease:
        self._since = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        self._attempt = uuid.uuid4().hex[:12]
        for _ in range(5):  # a lease may vanish or change between our calls
            try:
                self._write(0)
                break
            except self._errors.PreconditionFailed:
                pass
            current = self._read()
            if current is None:
                continue  # released in between: create it again
            holder, generation = current
            if not self._dead(holder) and not self._watch(holder, generation):
                continue  # it changed hands or vanished while we watched: look again
            try:  # take over the dead trainer's lease, unless another taker was first
                self._write(generation)
            except self._errors.PreconditionFailed:
                continue
            self.stale = holder
            break
        else:
            raise OSError(f"{self.url} keeps changing; is another trainer starting?")
        self._thread = threading.Thread(target=self._keep, name="lenet-dist lease",
                                        daemon=True)
        self._thread.start()
        return self

    def _dead(self, holder: dict) -> bool:
        """Known dead without watching: an earlier attempt of this very job (whose
        launcher, scheduler or JobSet started us because it ended), or a holder on
        this host whose process is gone."""
        if self.job is not None and holder.get("job") == self.job:
            return True
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except OSError:
                pass
        return False

    def _watch(self, holder: dict, generation: int) -> bool:
        """Watch a lease for its holder's length (by our monotonic clock): True when it
        did not change (a dead holder's), Busy when its holder renewed it, False when
        it vanished or changed hands."""
        length = STALE_AFTER * holder_refresh(holder, self.refresh)
        self.log(f"note: {self.url} is held by {describe_holder(holder)}; watching it for "
                 f"up to {length:g} s to see whether that run still renews it")
        seen = time.monotonic()
        while time.monotonic() - seen < length:
            time.sleep(min(1.0, length / 10))
            current = self._read()
            if current is None:
                return False
            if current[1] != generation:
                if current[0].get("attempt") != holder.get("attempt"):
                    return False  # another trainer took it: judge that one afresh
                raise Busy({**holder, "renewed_seconds": round(time.monotonic() - seen, 1),
                            "expires_seconds": length})
        return True

    def _read(self) -> tuple[dict, int] | None:
        """(holder, generation), or None if absent."""
        blob = self._client.bucket(self.bucket).get_blob(self.name, timeout=self.timeout)
        if blob is None:
            return None
        try:
            raw = blob.download_as_bytes(if_generation_match=blob.generation,
                                         timeout=self.timeout)
        except (self._errors.NotFound, self._errors.PreconditionFailed):
            raw = b""  # rewritten in between: judged by the generation we have
        return parse_holder(raw), blob.generation

    def _keep(self) -> None:
        """Rewrite the lease every `refresh` seconds while we hold it. A failed rewrite
        (the network) is retried at the next tick, until the lease could expire for
        others: then this process stops. A rewrite refused on its generation means the
        lease is someone else's now."""
        while not self._stop.wait(self.refresh):
            overdue = self._overdue()
            if overdue:
                self._lose(overdue, {})
                return
            try:
                self._write(self.generation)
            except (self._errors.PreconditionFailed, self._errors.NotFound):
                current = self._read_quietly()
                if current and current[0] == parse_holder(self._record()):
                    self.generation = current[1]  # our retried rewrite had landed
                    self.renewed = time.monotonic()
                    continue
                self._lose("another trainer took it over (this run stalled longer than "
                           "the lease lasts)", current[0] if current else {})
                return
            except Exception as e:  # noqa: BLE001 - a network error: try again next tick
                print(f"warning: cannot renew {self.url} ({type(e).__name__}); retrying",
                      file=sys.stderr)

    def _lose(self, why: str, holder: dict) -> None:
        if self._stop.is_set():
            return
        self.lost = why
        self.on_lost(self.url, why, holder)

    def _overdue(self) -> str | None:
        """Why this holder must stop writing, if its last renewal is older than the
        lease less one refresh (after that, another trainer may take it over)."""
        since = time.monotonic() - self.renewed
        if since > self.duration - self.refresh:
            return f"could not renew it for {since:.0f} s (it lasts {self.duration:g} s)"
        return None

    def check(self) -> None:
        """Before a checkpoint is written: Restartable unless the lease is held, and
        was renewed recently enough that nobody else may have taken it."""
        self.lost = self.lost or self._overdue()
        if self.lost is not None:
            raise Restartable(f"lost the lease {self.url}: {self.lost}; not saving, so that "
                              "two trainers never write one workdir; run the same command "
                              "again to resume")

    def _read_quietly(self) -> tuple[dict, int] | None:
        try:
            return self._read()
        except Exception:  # noqa: BLE001 - only to tell whose the lease is now
            return None

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (a taker's is left)."""
        if self.generation is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.timeout + 1)
        generation, self.generation = self.generation, None
        try:
            blob = self._client.bucket(self.bucket).get_blob(self.name, timeout=self.timeout)
            # Checked first, too: an emulator may ignore the precondition on DELETE.
            if blob is not None and blob.generation == generation:
                self._blob().delete(if_generation_match=generation, timeout=self.timeout)
        except (self._errors.PreconditionFailed, self._errors.NotFound):
            pass
        except Exception as e:  # noqa: BLE001 - the run is done; the lease just ages out
            print(f"warning: cannot remove {self.url} ({type(e).__name__}); it expires "
                  f"{self.duration:g} s after its last renewal", file=sys.stderr)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_refresh(holder: dict, default: float) -> float:
    """The holder's own refresh period (it may run with another setting)."""
    value = holder.get("refresh_seconds")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 3600:
        return float(value)
    return default


def parse_holder(raw: bytes) -> dict:
    try:
        holder = json.loads(raw.decode(errors="replace")) if raw.strip() else {}
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def lease_holder(url: str) -> dict | None:
    """Who holds a gs:// workdir's lease now (None if nobody), with when the server
    last saw it renewed ("renewed_at", the server's clock): a reader does not wait to
    judge whether its holder is alive."""
    client, errors = storage()
    bucket, name = split(os.fspath(url))
    blob = client.bucket(bucket).get_blob(name, timeout=REQUEST_TIMEOUT_S)
    if blob is None:
        return None
    try:
        holder = parse_holder(blob.download_as_bytes(if_generation_match=blob.generation,
                                                     timeout=REQUEST_TIMEOUT_S))
    except (errors.NotFound, errors.PreconditionFailed):
        return None
    if blob.updated is not None:
        holder["renewed_at"] = blob.updated.astimezone(datetime.timezone.utc).isoformat(
            timespec="seconds")
    return holder


def _exit_lost(url: str, why: str, holder: dict) -> None:
    """The lease is gone (taken over, or not renewable before it could be): another
    trainer may write the workdir now, so stop at once, saving nothing (a save would
    overwrite its checkpoints). Exit RESTART_EXIT_CODE: the next attempt resumes."""
    taker = f" (now held by {describe_holder(holder)})" if holder else ""
    os.write(2, (f"error: lost the lease {url}: {why}{taker}; stopping without saving, so "
                 "that two trainers never write one workdir; run the same command again "
                 "to resume\n").encode())
    os._exit(RESTART_EXIT_CODE)
