"""Cloud Storage (gs://): the one way lenet-dist reaches it.

etils.epath (ours and Orbax's metadata files) reaches gs:// through tf.io.gfile when
TensorFlow is installed and through fsspec + gcsfs otherwise. tf.io.gfile's endpoint
is fixed (no emulator, no private endpoint) and whether it is used would depend on
whether the [export] extra is installed, so lenet-dist always takes fsspec + gcsfs:
EPATH_USE_TF=false, set here, at import, before any gs:// path is used (etils reads
it once, at the first one). safefs imports this module, and every module that
touches a workdir imports safefs. Orbax's arrays go through TensorStore's own GCS
driver, in the core install. A gs:// workdir's lease is lease.py's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys

from lenet_dist.errors import Restartable, UserError, first_line

# Only a default: a user who sets EPATH_USE_TF=true asks for tf.io.gfile knowingly.
os.environ.setdefault("EPATH_USE_TF", "false")


def _no_listing_cache() -> None:
    """gcsfs caches each directory listing per filesystem object, for the life of the
    process: once listed, a path another process (or a peer host) creates later stays
    invisible to exists(). In a resumed 2-process job Orbax waited its full 600 s for
    an object process 0 had written. Every gcsfs filesystem lenet-dist or Orbax makes
    through fsspec gets use_listings_cache=False: fsspec reads the variable when it
    loads (so importing it, ~60 ms, is left to the first gs:// path), or, loaded
    already by the program around us, gets it in its config here. A user's own
    setting, or a kwarg, wins."""
    os.environ.setdefault("FSSPEC_GCS_USE_LISTINGS_CACHE", "false")
    config = sys.modules.get("fsspec.config")
    if config is not None:
        for protocol in ("gs", "gcs"):
            config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_no_listing_cache()

SCHEME = "gs://"
REQUEST_TIMEOUT_S = 5.0  # the most one request to check or hold a workdir may take


@contextlib.contextmanager
def as_oserror(what: str):
    """gcsfs's own HttpError and aiohttp's errors as one OSError naming `what`, so
    callers catch one kind of error for local and remote paths alike."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - gcsfs's HttpError, aiohttp's errors
        raise OSError(f"{what}: {type(e).__name__}: {first_line(e)}") from None


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
        with as_oserror(f"cannot write {url}/{rel}"):
            epath.Path(url).joinpath(*rel.split(os.sep)).write_bytes(data)
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
    with as_oserror(f"cannot move {src} to {dst}"):
        if fs.isdir(src):
            names = fs.find(src)
            for name in names:
                fs.copy(name, dst + "/" + name[len(src.split("://", 1)[-1]) + 1:])
            fs.rm(names)
        else:
            fs.copy(src, dst)
            fs.rm(src)


# What Cloud Storage allows in a bucket's name (3-63 characters a name; dotted names
# up to 222), https://cloud.google.com/storage/docs/buckets#naming.
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")


def check_url(url: str, what: str = "path") -> None:
    """A gs:// path lenet-dist can use, or one line saying why not, before anything is
    written: TensorStore cuts a URL at `#` or `?` (a checkpoint would land in another
    run's directory), an empty bucket is not a bucket, a bucket's root is no run's
    directory. Then it needs gcsfs (the [gcs] extra), where fsspec would raise deep
    inside the first read."""
    text = os.fspath(url)
    if not text.startswith(SCHEME):
        return
    bucket, name = split(text)
    rest = text[len(SCHEME) + len(bucket):]
    if "#" in text or "?" in text:
        raise UserError(f"{what} {text} holds '#' or '?', which Cloud Storage URLs read "
                        "as a fragment or a query (the path would be cut there); rename it")
    if not bucket:
        raise UserError(f"{what} {text} names no bucket; write gs://BUCKET/PATH")
    if not BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise UserError(f"{what} {text}: {bucket!r} is not a bucket name (3-63 lowercase "
                        "letters, digits, '-', '_' and '.')")
    if not name:
        raise UserError(f"{what} {text} is a bucket's root; give a path inside it, e.g. "
                        f"gs://{bucket}/run")
    parts = rest[1:].rstrip("/").split("/")  # a trailing "/" is fine, "//" inside is not
    if any(part in ("", ".", "..") for part in parts) or any(
            ord(c) < 32 or c == "\x7f" for c in name):
        raise UserError(f"{what} {text} has an empty, '.' or '..' part or a control "
                        "character; Cloud Storage would keep them literally")
    if importlib.util.find_spec("gcsfs") is None:
        from lenet_dist import extras  # late: extras words the hint; keep this module low

        raise extras.missing("gcsfs", f" (needed for {text})")


_REACHED: set[str] = set()


def check_reachable(url: str, what: str = "path") -> None:
    """One request, bounded by REQUEST_TIMEOUT_S and never retried: no network or no
    credentials is one line at once (gcsfs retries for a minute, then prints its
    traceback). A listing, which every user of a workdir needs the right to do, and
    which tells a missing bucket (404) from a missing object. Once per bucket and
    process."""
    bucket, name = split(url)
    if bucket in _REACHED:
        return
    try:
        client, errors = storage()
        next(iter(client.list_blobs(bucket, prefix=name + "/", max_results=1,
                                    timeout=REQUEST_TIMEOUT_S, retry=None)), None)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - google.auth, google.api_core, requests
        kind = type(e).__name__
        if kind in ("DefaultCredentialsError", "RefreshError", "Unauthorized"):
            raise UserError(f"cannot use {what} {url}: no usable Google Cloud credentials "
                            f"({kind}); run `gcloud auth application-default login` or "
                            "set GOOGLE_APPLICATION_CREDENTIALS") from None
        if kind == "Forbidden":
            raise UserError(f"cannot use {what} {url}: this account may not list "
                            f"gs://{bucket} ({first_line(e, 120)})") from None
        if kind == "NotFound":
            raise UserError(f"cannot use {what} {url}: bucket gs://{bucket} does not "
                            "exist") from None
        raise Restartable(f"cannot reach Cloud Storage for {what} {url} within "
                          f"{REQUEST_TIMEOUT_S:g} s ({kind}: {first_line(e, 120)}); check "
                          "the network, then run the same command again") from None
    _REACHED.add(bucket)


def download_tree(url: str, local: str | os.PathLike) -> None:
    """Copy the objects under `url` into the local directory `local` (a SavedModel for
    TensorFlow, whose own gs:// reader cannot reach an emulator or a private endpoint).
    OSError on failure."""
    import fsspec  # late: only a remote model is downloaded

    fs = fsspec.filesystem("gs")
    with as_oserror(f"cannot read {url}"):
        fs.get(os.fspath(url).rstrip("/") + "/", os.fspath(local), recursive=True)


def split(url: str) -> tuple[str, str]:
    """gs://bucket/a/b -> ("bucket", "a/b")."""
    bucket, _, name = os.fspath(url)[len(SCHEME):].partition("/")
    return bucket, name.strip("/")


def storage():
    """google-cloud-storage's client and exceptions (STORAGE_EMULATOR_HOST, when set,
    points it at an emulator with anonymous credentials)."""
    try:
        from google.api_core import exceptions
        from google.cloud import storage
    except ImportError:
        from lenet_dist import extras  # late: see check_url

        raise extras.missing("gcsfs", " (google-cloud-storage, which comes with it, is "
                             "missing)") from None
    return storage.Client(), exceptions
