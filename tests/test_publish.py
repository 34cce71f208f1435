"""Publishing an export: whatever step an interruption or a kill -9 lands on, --out
holds a complete model (the old one or the new one), and the next export cleans up,
or puts back, what was left beside it.

Most tests publish plain directories holding a fake saved_model.pb, so every step can be
hit cheaply; the kill -9 cases use real processes (forked children of one interpreter,
and two real `lenet_dist export` runs)."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lenet_dist import exporting, faults
from lenet_dist import publishing
from lenet_dist.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MODES = ("renameat2", "two renames")
POINTS = publishing.PUBLISH_POINTS[2:]  # the steps inside publish()
NEW_FROM = publishing.PUBLISH_POINTS.index("publish:moved")


def write_model(path: Path, tag: str) -> Path:
    (path / "assets.extra").mkdir(parents=True)
    (path / "variables").mkdir()
    (path / "saved_model.pb").write_text(f"graph {tag}")
    (path / "variables" / "variables.index").write_text(tag)
    (path / "assets.extra" / "metadata.json").write_text(json.dumps({"tag": tag}))
    return path


def model_tag(path: Path) -> str | None:
    """Which model is complete at `path` (None when nothing is there)."""
    if not os.path.lexists(path):
        return None
    tag = json.loads((path / "assets.extra" / "metadata.json").read_text())["tag"]
    assert (path / "saved_model.pb").read_text() == f"graph {tag}"
    assert (path / "variables" / "variables.index").read_text() == tag
    return tag


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if ".staging-" in p.name or ".old-" in p.name)


def no_renameat2(src, dst, flags):
    raise OSError(errno.ENOSYS, "renameat2 is not available here (test)")


def expected_after(at: str, had_old: bool) -> str | None:
    if publishing.PUBLISH_POINTS.index(at) >= NEW_FROM:
        return "new"
    return "old" if had_old else None


def cases():
    """(mode, had_old, point) for every point each path reaches."""
    return [(mode, had_old, at) for mode in MODES for had_old in (True, False) for at in POINTS
            if at != "publish:set-aside" or (mode == "two renames" and had_old)]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """`stage(had_old)` -> (out, staging/model, work); `use(mode)` picks the rename path."""
    probe = tmp_path / "probe"
    (probe / "a").mkdir(parents=True)
    (probe / "b").mkdir()
    try:
        publishing.renameat2(probe / "a", probe / "b", publishing.RENAME_EXCHANGE)
        supported = True
    except OSError as e:
        supported = e.errno not in publishing.NO_RENAMEAT2

    def use(mode):
        if mode == "two renames":
            monkeypatch.setattr(publishing, "renameat2", no_renameat2)
        elif not supported:
            pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE)")
        else:  # the atomic path must not fall back without our noticing
            monkeypatch.setattr(publishing, "publish_by_two_renames", None)

    def stage(had_old=True, name="1"):
        out = tmp_path / "serving" / name
        out.parent.mkdir(exist_ok=True)
        if had_old:
            write_model(out, "old")
        staging = publishing.make_staging(out)
        return out, write_model(staging / "model", "new"), tmp_path / "work"

    return stage, use


def interrupt_at(monkeypatch, at, exc=KeyboardInterrupt):
    hit = []

    def point(name):
        hit.append(name)
        if name == at:
            raise exc(f"injected at {name}")

    monkeypatch.setattr(faults, "point", point)
    return hit


# ------------------------------------------------------------ in-process interruptions


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("mode, had_old, at", cases())
def test_an_interruption_at_any_step_leaves_a_complete_model(setup, monkeypatch, mode,
                                                             had_old, at, exc):
    stage, use = setup
    use(mode)
    out, model, work = stage(had_old)
    hit = interrupt_at(monkeypatch, at, exc)
    with pytest.raises(exc, match="injected"):
        publishing.publish(model, out, True, work)
    assert hit[-1] == at
    assert model_tag(out) == expected_after(at, had_old)
    # The next export's recovery (this PID counts as gone: it has no export running)
    # leaves the same model and nothing else.
    publishing.recover_leftovers(out)
    assert model_tag(out) == expected_after(at, had_old)
    assert leftovers(out.parent) == []


@pytest.mark.parametrize("at", publishing.PUBLISH_POINTS[:2])
def test_an_interruption_before_publish_leaves_the_old_model(trained, tmp_path, monkeypatch,
                                                              at):
    """The steps before publish() (staging written, verified) in a real export_checkpoint;
    saving and verifying are stand-ins, since what is under test is the flow around them."""
    def save(tf, params, staging, *args):
        (staging / "model").mkdir()
        (staging / "model" / "saved_model.pb").write_text("graph new")
        return staging / "model"

    monkeypatch.setattr(exporting, "save_savedmodel", save)
    monkeypatch.setattr(exporting, "verify", lambda *args: 0.0)
    out = write_model(tmp_path / "1", "old")
    hit = interrupt_at(monkeypatch, at)
    with pytest.raises(KeyboardInterrupt):
        exporting.export_checkpoint(trained.config.workdir, str(out), overwrite=True)
    assert hit[-1] == at and model_tag(out) == "old" and leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", MODES)
def test_publish_replaces_or_creates(setup, mode):
    stage, use = setup
    use(mode)
    for had_old, name in ((True, "1"), (False, "2")):
        out, model, work = stage(had_old, name)
        publishing.publish(model, out, True, work)
        assert model_tag(out) == "new"
        assert sorted(p.name for p in model.parent.iterdir()) == []  # old model deleted


def test_a_model_appearing_during_publish_is_exchanged_not_clobbered(setup, monkeypatch):
    """NOREPLACE fails when --out appears after the look; the destination is checked
    again (it must be a model) and the two are exchanged."""
    stage, use = setup
    use("renameat2")
    out, model, work = stage(had_old=False)

    def appear(name):
        if name == "publish:before-move" and not out.exists():
            write_model(out, "rival")

    monkeypatch.setattr(faults, "point", appear)
    publishing.publish(model, out, True, work)
    assert model_tag(out) == "new" and not model.exists()

    out, model, work = stage(had_old=False, name="3")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        publishing.publish(model, out, False, work)
    assert model_tag(out) == "rival" and model_tag(model) == "new"


# ------------------------------------------------------------ recovery of leftovers


def test_recovery_touches_only_leftovers_whose_owner_is_gone(tmp_path):
    out = write_model(tmp_path / "1", "current")
    host = publishing.this_host()
    live = write_model(tmp_path / f".1.staging-{host}-{os.getppid()}-abcd1234", "x")
    other = write_model(tmp_path / f".1.staging-elsewhere-a-1-{os.getpid()}-abcd1234", "x")
    dead = tmp_path / f".1.staging-{host}-{dead_pid()}-zz_9yy8x"
    write_model(dead / "model", "x")
    unrelated = write_model(tmp_path / ".2.staging-xyz", "x")
    note = publishing.recover_leftovers(out)
    assert note.startswith("warning: ") and "\n" not in note
    assert f"removed 1 leftover(s) of killed exports: {dead.name}" in note
    assert f"left {other.name} (from elsewhere-a-1; remove it if no export runs there)" in note
    assert live.name not in note
    assert not dead.exists() and live.exists() and other.exists() and unrelated.exists()
    assert model_tag(out) == "current"


def test_recovery_restores_a_model_set_aside_by_a_killed_export(tmp_path):
    out = tmp_path / "1"
    host = publishing.this_host()
    staging = tmp_path / f".1.staging-{host}-{dead_pid()}-abcd1234"
    write_model(staging / "old", "before")
    write_model(staging / "model", "new")
    note = publishing.recover_leftovers(out)
    assert f"restored the model that was at {out} before an interrupted export" in note
    assert model_tag(out) == "before" and leftovers(tmp_path) == []


def test_recovery_of_what_older_versions_left(tmp_path):
    out = tmp_path / "1"
    write_model(tmp_path / f".1.old-{dead_pid()}", "before")  # killed between two renames
    young = write_model(tmp_path / ".1.staging-k2j4h5g6", "x")  # no owner in the name
    aged = write_model(tmp_path / ".1.staging-a1b2c3d4", "x")
    os.utime(aged, (0, 0))
    note = publishing.recover_leftovers(out)
    assert model_tag(out) == "before" and "restored" in note
    assert leftovers(tmp_path) == [young.name]
    assert f"left {young.name} (no owner recorded, under an hour old)" in note

    write_model(tmp_path / f".1.old-{dead_pid()}", "older")  # out is back: just remove it
    publishing.recover_leftovers(out)
    assert model_tag(out) == "before" and leftovers(tmp_path) == [young.name]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------ kill -9, really

# One interpreter imports lenet_dist once, then forks a child per case; each child
# makes its own staging directory (so the leftover names a dead PID), publishes with
# LENET_DIST_KILL_AT set, and SIGKILLs itself there: no except or finally runs.
FORKS = """
import errno, json, os, sys
from pathlib import Path
from lenet_dist import publishing as export, faults
def write_model(path, tag):
    (path / "assets.extra").mkdir(parents=True)
    (path / "variables").mkdir()
    (path / "saved_model.pb").write_text(f"graph {tag}")
    (path / "variables" / "variables.index").write_text(tag)
    (path / "assets.extra" / "metadata.json").write_text(json.dumps({"tag": tag}))
mode, cases = sys.argv[1], json.loads(sys.argv[2])
if mode == "two renames":
    def no_renameat2(*args):
        raise OSError(errno.ENOSYS, "test")
    export.renameat2 = no_renameat2
died = {}
for at, out in cases:
    out = Path(out)
    pid = os.fork()
    if pid == 0:
        try:
            os.environ[faults.ENV] = at
            staging = export.make_staging(out)
            write_model(staging / "model", "new")
            export.publish(staging / "model", out, True, out.parent / "work")
        finally:
            os._exit(0)  # not killed: the parent reports signal 0
    status = os.waitpid(pid, 0)[1]
    died[at] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
print(json.dumps(died))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_kill9_at_every_step_of_publish(setup, tmp_path, mode):
    stage, use = setup
    if mode == "renameat2":
        use(mode)  # skips where the filesystem lacks it
    points = [at for at in POINTS if at != "publish:set-aside" or mode == "two renames"]
    outs = {}
    for at in points:
        outs[at] = tmp_path / at.replace(":", "_") / "1"
        write_model(outs[at], "old")
    proc = subprocess.run([sys.executable, "-c", FORKS, mode,
                           json.dumps([[at, str(outs[at])] for at in points])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {at: signal.SIGKILL for at in points}
    for at, out in outs.items():
        # The fallback's one window: killed between its renames, --out is missing
        # until the next export puts the old model back.
        window = at == "publish:set-aside"
        assert model_tag(out) == (None if window else expected_after(at, True)), at
        assert leftovers(out.parent), at  # the kill left its staging directory
        note = publishing.recover_leftovers(out)
        assert "removed 1 leftover(s)" in note, (at, note)
        assert ("restored" in note) == window, (at, note)
        assert model_tag(out) == expected_after(at, True), at
        assert leftovers(out.parent) == [], at


def export_argv(workdir, out) -> list[str]:
    return ["export", "--workdir", workdir, "--out", str(out), "--overwrite",
            "--platforms", "cpu"]


@pytest.mark.slow
def test_kill9_during_real_exports_then_the_next_export_recovers(trained, tmp_path, capsys):
    from lenet_dist.cli import main

    out = write_model(tmp_path / "serving" / "1", "old")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for at, expected in (("publish:staged", "old"), ("publish:moved", None)):
        proc = subprocess.run([sys.executable, "-m", "lenet_dist",
                               *export_argv(trained.config.workdir, out)],
                              env={**env, faults.ENV: at}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
        # Killed after the swap, the new model is fully there, metadata and all.
        meta = json.loads((out / "assets.extra" / "metadata.json").read_text())
        assert (out / "saved_model.pb").is_file()
        assert meta.get("tag") == expected
        if expected is None:
            assert meta["checkpoint"]["step"] == trained.state.step
        # Each run cleaned the one before: one staging directory, the last run's.
        assert len(leftovers(out.parent)) == 1, leftovers(out.parent)

    assert main(export_argv(trained.config.workdir, out)) == 0
    printed = capsys.readouterr().out
    assert "warning: removed 1 leftover(s) of killed exports: .1.staging-" in printed
    assert leftovers(out.parent) == []
    meta = json.loads((out / "assets.extra" / "metadata.json").read_text())
    assert meta["checkpoint"]["step"] == trained.state.step


# ------------------------------------------------------------ the hook itself


def test_a_fault_point_kills_only_when_named(tmp_path):
    code = "from lenet_dist import faults; faults.point('a'); print('alive'); faults.point('b')"
    env = dict(os.environ, **{faults.ENV: "b"})
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and proc.stdout == "alive\n"
