"""Files the project did not write, in a workdir's checkpoints/: they are named once
and left alone, and every command keeps working; and what a failed save says about the
checkpoints is read from the disk after it failed."""

import os
import shutil
import subprocess

import pytest

from lenet_dist.checkpoint import Checkpoints
from lenet_dist.step_files import scan, step_of
from lenet_dist.rundir import CHECKPOINT_DIR
from lenet_dist.errors import Failure
from lenet_dist.mesh import Shardings, make_mesh
from lenet_dist.restore import config_from
from lenet_dist.state import make_optimizer
from lenet_dist.step import build_steps
from tests.conftest import run_cli

# Not steps: a zero-padded name, digits int() refuses, digits of another script, and
# one Orbax's own pattern (`\d`) would read as step 15. Each is a copy of a real step,
# so it would restore if anything took it for one.
ODD = ("00005", "①", "²", "٥", "1٥")


def steps_of(workdir) -> list[int]:
    return sorted(int(p) for p in os.listdir(os.path.join(workdir, CHECKPOINT_DIR))
                  if step_of(p) is not None)


@pytest.fixture
def odd_run(trained, tmp_path):
    """A private copy of the trained run with the odd names planted in checkpoints/."""
    run = tmp_path / "run"
    shutil.copytree(trained.config.workdir, run)
    first = run / CHECKPOINT_DIR / str(steps_of(run)[0])
    for name in ODD:
        shutil.copytree(first, run / CHECKPOINT_DIR / name)
    return run


@pytest.mark.parametrize("name, step", [
    ("0", 0), ("7", 7), ("250", 250), ("00005", None), ("05", None), ("①", None),
    ("²", None), ("٥", None), ("1٥", None), ("+5", None), (" 5", None), ("5\n", None),
    ("5.orbax-checkpoint-tmp-1", None), ("", None)])
def test_only_orbax_canonical_names_are_steps(name, step):
    assert step_of(name) == step


def test_scan_passes_over_odd_names(odd_run):
    assert list(scan(odd_run / CHECKPOINT_DIR)) == steps_of(odd_run)


def test_readers_name_each_odd_directory_once_and_keep_working(odd_run, data_dir):
    listing = run_cli("checkpoints", "--workdir", str(odd_run))
    assert listing.returncode == 0, listing.stderr
    for step in steps_of(odd_run):
        assert str(step) in listing.stdout
    assert "Traceback" not in listing.stderr
    expected = [f"note: checkpoints/{name} is not a step this project wrote; left alone"
                for name in sorted(ODD)]
    assert [ln for ln in listing.stderr.splitlines() if ln.startswith("note: ")] == expected

    ev = run_cli("eval", "--workdir", str(odd_run), "--devices", "1", "--data-dir", data_dir)
    assert ev.returncode == 0, ev.stderr
    assert f"step {steps_of(odd_run)[-1]} " in ev.stdout
    notes = [line for line in ev.stderr.splitlines() if line.startswith("note: ")]
    assert notes == expected, ev.stderr
    assert all((odd_run / CHECKPOINT_DIR / name).is_dir() for name in ODD)


def restore_tree(ckpts: Checkpoints, step: int):
    meta = ckpts.meta(step)
    config = config_from(meta)
    fns = build_steps(make_optimizer(config), Shardings(make_mesh(1)), config)
    return ckpts.restore(step, fns.abstract())


def test_a_writer_leaves_odd_directories_alone_and_orbax_never_sees_them(odd_run):
    """The keep-1 policy deletes old steps: never a directory that is not a step, and
    "1٥" is not Orbax's step 15 (its own pattern would say so)."""
    notes = []
    ckpts = Checkpoints(odd_run, keep=1, warn=notes.append)
    assert len(notes) == len(ODD) and all(n.startswith("note: checkpoints/") for n in notes)
    assert ckpts.manager.all_steps() == steps_of(odd_run)
    last = steps_of(odd_run)[-1]
    tree, meta = restore_tree(ckpts, last)
    ckpts.save(last + 1, tree, {**meta, "step": last + 1}, {"test_accuracy": 0.0}, wait=True)
    ckpts.close()
    assert all((odd_run / CHECKPOINT_DIR / name).is_dir() for name in ODD)
    assert last + 1 in steps_of(odd_run)


# ------------------------------------------------------------------ a step that stays


def undeletable_symlink(step_dir):
    """The step directory becomes a link to its own contents (rmtree refuses links)."""
    target = step_dir.parent.parent / f"real-{step_dir.name}"
    step_dir.rename(target)
    step_dir.symlink_to(target)
    return lambda: None


def undeletable_immutable(step_dir):
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("chattr +i needs root and chattr")
    if subprocess.run(["chattr", "+i", str(step_dir)], capture_output=True).returncode:
        pytest.skip("this filesystem has no immutable flag")
    return lambda: subprocess.run(["chattr", "-i", str(step_dir)], check=True)


@pytest.mark.parametrize("make_undeletable", [undeletable_symlink, undeletable_immutable])
def test_a_step_that_cannot_be_deleted_is_reported_as_it_is_on_disk(
        trained, tmp_path, make_undeletable):
    """Orbax's keep-1 policy fails to delete the oldest step after the new one was
    written: the message said "the latest checkpoint saved is none" with every step
    still there. It now says what the directory holds after the failure."""
    run = tmp_path / "run"
    shutil.copytree(trained.config.workdir, run)
    old = steps_of(run)
    ckpts = Checkpoints(run, keep=1)
    tree, meta = restore_tree(ckpts, old[-1])
    undo = make_undeletable(run / CHECKPOINT_DIR / str(old[0]))
    new = old[-1] + 1
    try:
        with pytest.raises(Failure) as failed:
            ckpts.save(new, tree, {**meta, "step": new}, {"test_accuracy": 0.0}, wait=True)
            ckpts.save(new + 1, tree, {**meta, "step": new + 1}, {"test_accuracy": 0.0},
                       wait=True)
            ckpts.close()
    finally:
        undo()
    message = str(failed.value)
    on_disk = steps_of(run)
    assert "none" not in message, message
    assert message.endswith(f"on disk: steps {', '.join(map(str, on_disk))} "
                            f"(the latest is step {max(on_disk)})"), message
    saved = max(on_disk)
    assert message.startswith(f"checkpoint step {saved} was saved in {run / CHECKPOINT_DIR}, "
                              "but then: "), message
    assert old[0] in on_disk
