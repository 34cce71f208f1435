"""Inside a running multi-process job: who writes, meeting the others within a bound,
and start-up checks that every process sees the same workdir, settings and data.

One writer (process 0); every wait for the others bounded by --join-timeout and named
(`meet`), so a stuck or lost process fails the job with one line on every process
instead of a hang; a misconfigured job (another workdir, other settings, other data on
one host) fails in seconds instead of silently training different models. Joining the
job, before JAX starts, is joining.py.

JAX is imported inside the functions (each marked "JAX late"): this module loads
before `jax.distributed.initialize` may run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets

import numpy as np

from lenet_dist import jax_compat, joining, safefs
from lenet_dist.errors import Failure, Restartable, UserError, first_line
from lenet_dist.rendezvous import disagreement
from lenet_dist.rundir import JOB_TOKEN_FILE



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
    joined = joining.JOINED
    seconds = joined.join_timeout if joined is not None else joining.DEFAULT_JOIN_TIMEOUT
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
    if process_count() == 1 or joining.JOINED is None:
        return
    client = jax_compat.distributed_state().client
    if client is None:
        return
    me, timeout_ms = process_index(), joining.JOINED.join_timeout * 1000
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
