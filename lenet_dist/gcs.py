"""Cloud Storage (gs://): the one way lenet-dist reaches it, and the workdir's lease.

etils.epath (ours and Orbax's metadata files) reaches gs:// through tf.io.gfile when
TensorFlow is installed and through fsspec + gcsfs otherwise. tf.io.gfile's endpoint
is fixed (no emulator, no private endpoint) and whether it is used would depend on
whether the [export] extra is installed, so lenet-dist always takes fsspec + gcsfs:
EPATH_USE_TF=false, set here, at import, before any gs:// path is used (etils reads
it once, at the first one). safefs imports this module, and every module that
touches a workdir imports safefs. Orbax's arrays go through TensorStore's own GCS
driver, in the core install.

A gs:// workdir cannot be flock'ed, so `Lease` holds <workdir>/lock as an object,
created and rewritten only with generation preconditions (google-cloud-storage,
which gcsfs depends on).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import socket
import sys
import threading
import time

from lenet_dist.errors import Busy, UserError, describe_holder, first_line

# Only a default: a user who sets EPATH_USE_TF=true asks for tf.io.gfile knowingly.
os.environ.setdefault("EPATH_USE_TF", "false")


def _no_listing_cache() -> None:
    """gcsfs caches each directory listing per filesystem object, for the life of the
    process: once listed, a path another process (or a peer host) creates later stays
    invisible to exists(). In a resumed 2-process job Orbax waited its full 600 s for
    an object process 0 had written. Every gcsfs filesystem lenet-dist or Orbax makes
    through fsspec gets these defaults (before the first one is made; a kwarg wins)."""
    try:
        import fsspec.config
    except ImportError:  # no [gcs] extra: no gs:// either (check_installed says so)
        return
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_no_listing_cache()

SCHEME = "gs://"
LOCK_OBJECT = "lock"  # safefs.LOCK_FILE's name, as an object
# The holder rewrites its lease every REFRESH seconds; a lease not rewritten for
# STALE_AFTER refreshes belongs to a trainer that died (or lost the network that
# long) and may be taken over. LENET_DIST_LEASE_REFRESH shortens it for tests.
DEFAULT_REFRESH_S = 10.0
REFRESH_ENV = "LENET_DIST_LEASE_REFRESH"
STALE_AFTER = 3


def upload_tree(local: str | os.PathLike, url: str,
                done: dict[str, tuple[int, int]] | None = None, last: str | None = None) -> None:
    """Copy the files under `local` to `url` (through epath, so gcsfs), each object
    written whole; with `done` ({name: (size, mtime_ns)}), only files that changed;
    the file named `last` (relative, e.g. saved_model.pb) after all the others.
    Any failure is an OSError (gcsfs raises its own HttpError too)."""
    from etils import epath  # late: only a remote workdir's TensorBoard, traces, exports

    found = sorted(os.path.relpath(os.path.join(root, name), local)
                   for root, _, files in os.walk(local) for name in files)
    found.sort(key=lambda rel: rel == last)  # stable: `last` moves to the end
    for rel in found:
        path = os.path.join(local, rel)
        stat = os.stat(path)
        if done is not None and done.get(rel) == (stat.st_size, stat.st_mtime_ns):
            continue
        with open(path, "rb") as f:
            data = f.read()
        try:
            epath.Path(url).joinpath(*rel.split(os.sep)).write_bytes(data)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - gcsfs's HttpError, aiohttp's errors
            raise OSError(f"cannot write {url}/{rel}: {type(e).__name__}: "
                          f"{first_line(e)}") from None
        if done is not None:
            done[rel] = (stat.st_size, stat.st_mtime_ns)


def move(src: str, dst: str) -> None:
    """Move an object or a whole prefix ("folder") to `dst` in the same store. A bucket
    has no directories, so neither a folder rename nor a mkdir of the parent exists:
    each object is copied under the new name, and only then are the originals deleted
    (a crash in between leaves both copies, never neither). OSError on failure."""
    import fsspec  # late: only a remote workdir moves anything

    fs = fsspec.filesystem("gs")
    src, dst = os.fspath(src).rstrip("/"), os.fspath(dst).rstrip("/")
    try:
        if fs.isdir(src):
            names = fs.find(src)
            for name in names:
                fs.copy(name, dst + "/" + name[len(src.split("://", 1)[-1]) + 1:])
            fs.rm(names)
        else:
            fs.copy(src, dst)
            fs.rm(src)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - gcsfs's HttpError, aiohttp's errors
        raise OSError(f"cannot move {src} to {dst}: {type(e).__name__}: "
                      f"{first_line(e)}") from None


def check_installed(url: str) -> None:
    """A gs:// path needs gcsfs (the [gcs] extra): one line saying how to get it,
    where fsspec would raise deep inside the first read."""
    if os.fspath(url).startswith(SCHEME) and importlib.util.find_spec("gcsfs") is None:
        from lenet_dist import extras  # late: extras words the hint; keep this module low

        raise extras.missing("gcsfs", f" (needed for {url})")


def refresh_seconds() -> float:
    text = os.environ.get(REFRESH_ENV, "")
    try:
        value = float(text) if text else DEFAULT_REFRESH_S
    except ValueError:
        value = -1.0
    if not 0.2 <= value <= 3600:
        raise UserError(f"{REFRESH_ENV}={text!r} is not a number of seconds in [0.2, 3600]")
    return value


def split(url: str) -> tuple[str, str]:
    """gs://bucket/a/b -> ("bucket", "a/b")."""
    bucket, _, name = os.fspath(url)[len(SCHEME):].partition("/")
    return bucket, name.strip("/")


def _storage():
    """google-cloud-storage's client and exceptions (STORAGE_EMULATOR_HOST, when set,
    points it at an emulator with anonymous credentials)."""
    try:
        from google.api_core import exceptions
        from google.cloud import storage
    except ImportError:
        from lenet_dist import extras  # late: see check_installed

        raise extras.missing("gcsfs", " (google-cloud-storage, which comes with it, is "
                             "missing)") from None
    return storage.Client(), exceptions


class Lease:
    """<workdir>/lock on Cloud Storage: who holds the workdir, renewed while it runs.

    Taking it: create the object only if absent (ifGenerationMatch=0). Holding it: a
    background thread rewrites it every `refresh` seconds, each time only if it is
    still the generation we wrote. A lease not rewritten for STALE_AFTER refreshes
    (by the server's clock) is a dead trainer's: taking it over is a rewrite on its
    generation, so of two takers exactly one wins. A holder that finds its lease
    taken (it stalled longer than that) stops its process at once, since another
    trainer now writes the workdir. Releasing deletes it, again on our generation.
    """

    def __init__(self, workdir: str, command: str, refresh: float | None = None,
                 on_lost=None):
        self.url = os.fspath(workdir).rstrip("/") + "/" + LOCK_OBJECT
        self.bucket, self.name = split(self.url)
        self.command = command
        self.refresh = refresh_seconds() if refresh is None else refresh
        self.on_lost = on_lost or _exit_lost
        self.generation: int | None = None
        self.stale: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client, self._errors = _storage()

    def _blob(self):
        return self._client.bucket(self.bucket).blob(self.name)

    def _record(self) -> bytes:
        return (json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "since": self._since,
            "command": self.command, "refresh_seconds": self.refresh}) + "\n").encode()

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
        for _ in range(5):  # a lease may vanish or change between our calls
            blob = self._blob()
            try:
                blob.upload_from_string(self._record(), content_type="application/json",
                                        if_generation_match=0)
                self.generation = blob.generation
                break
            except self._errors.PreconditionFailed:
                pass
            current = self._read()
            if current is None:
                continue  # released in between: create it again
            holder, generation, age = current
            if age < STALE_AFTER * holder_refresh(holder, self.refresh):
                raise Busy(holder)
            blob = self._blob()
            try:  # take over the dead trainer's lease, unless another taker was first
                blob.upload_from_string(self._record(), content_type="application/json",
                                        if_generation_match=generation)
            except self._errors.PreconditionFailed:
                continue
            self.generation, self.stale = blob.generation, holder
            break
        else:
            raise OSError(f"{self.url} keeps changing; is another trainer starting?")
        self._thread = threading.Thread(target=self._keep, name="lenet-dist lease",
                                        daemon=True)
        self._thread.start()
        return self

    def _read(self) -> tuple[dict, int, float] | None:
        """(holder, generation, seconds since it was last written) or None if absent."""
        blob = self._client.bucket(self.bucket).get_blob(self.name)
        if blob is None:
            return None
        try:
            raw = blob.download_as_bytes(if_generation_match=blob.generation)
        except (self._errors.NotFound, self._errors.PreconditionFailed):
            raw = b""  # rewritten in between: judged by the metadata we have
        age = time.time() - blob.updated.timestamp()
        return parse_holder(raw), blob.generation, age

    def _keep(self) -> None:
        """Rewrite the lease every `refresh` seconds while we hold it. A failed rewrite
        (the network) is retried at the next tick; a rewrite refused on its generation
        means the lease is someone else's now."""
        while not self._stop.wait(self.refresh):
            blob = self._blob()
            try:
                blob.upload_from_string(self._record(), content_type="application/json",
                                        if_generation_match=self.generation)
                self.generation = blob.generation
            except (self._errors.PreconditionFailed, self._errors.NotFound):
                current = self._read_quietly()
                if current and current[0] == parse_holder(self._record()):
                    self.generation = current[1]  # our retried rewrite had landed
                    continue
                if not self._stop.is_set():
                    self.on_lost(self.url, current[0] if current else {})
                return
            except Exception as e:  # noqa: BLE001 - a network error: try again next tick
                print(f"warning: cannot renew {self.url} ({type(e).__name__}); retrying",
                      file=sys.stderr)

    def _read_quietly(self) -> tuple[dict, int, float] | None:
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
            self._thread.join(timeout=60)
        generation, self.generation = self.generation, None
        try:
            blob = self._client.bucket(self.bucket).get_blob(self.name)
            # Checked first, too: an emulator may ignore the precondition on DELETE.
            if blob is not None and blob.generation == generation:
                self._blob().delete(if_generation_match=generation)
        except (self._errors.PreconditionFailed, self._errors.NotFound):
            pass
        except Exception as e:  # noqa: BLE001 - the run is done; the lease just ages out
            print(f"warning: cannot remove {self.url} ({type(e).__name__}); it expires "
                  f"{STALE_AFTER * self.refresh:g} s after its last renewal", file=sys.stderr)

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


def lease_holder(workdir: str) -> dict | None:
    """Who holds a gs:// workdir's lease now (None if nobody, or it is stale)."""
    client, errors = _storage()
    bucket, name = split(os.fspath(workdir).rstrip("/") + "/" + LOCK_OBJECT)
    blob = client.bucket(bucket).get_blob(name)
    if blob is None:
        return None
    try:
        holder = parse_holder(blob.download_as_bytes(if_generation_match=blob.generation))
    except (errors.NotFound, errors.PreconditionFailed):
        return None
    age = time.time() - blob.updated.timestamp()
    return holder if age < STALE_AFTER * holder_refresh(holder, refresh_seconds()) else None


def _exit_lost(url: str, holder: dict) -> None:
    """The lease was taken over while we ran: another trainer writes the workdir now,
    so stop at once, saving nothing (a save would overwrite its checkpoints)."""
    os.write(2, (f"error: lost the lease {url} to {describe_holder(holder)} (this run "
                 "stalled longer than the lease lasts); stopping without saving, so that "
                 "two trainers never write one workdir\n").encode())
    os._exit(1)
