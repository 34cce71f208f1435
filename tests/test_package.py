"""The published package: `python -m build` makes a wheel and an sdist, and a core-only
install from the wheel (no TensorFlow, TFDS or matplotlib) trains, and names the
`pip install` that a command needing an extra lacks."""

import subprocess
import sys
import tarfile
import tomllib
import zipfile

import numpy as np
import pytest

import lenet_dist
from lenet_dist import extras
from tests.conftest import ROOT, one_line_error

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_name(requirement: str) -> str:
    name = requirement.split(";")[0]
    for stop in "[=<>!~ ":
        name = name.split(stop)[0]
    return name.strip().lower()


def test_every_extra_the_code_names_exists_and_installs_its_module():
    optional = PYPROJECT["project"]["optional-dependencies"]
    core = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    for module, (_, extra, _) in extras.EXTRAS.items():
        names = {requirement_name(r) for r in optional[extra]}
        assert any(n.replace("-", "_").startswith(module) for n in names), (module, names)
        assert not any(n.replace("-", "_").startswith(module) for n in core), module
    assert set(optional["all"][0].split("[")[1].split("]")[0].split(",")) >= {
        extra for _, extra, _ in extras.EXTRAS.values()}


def test_the_version_has_one_source():
    assert "version" not in PYPROJECT["project"]
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "lenet_dist.versions.__version__"}


@pytest.mark.parametrize("module, argv, extra", [
    ("matplotlib", ["report", "--workdir", "{trained}"], "report"),
    ("tensorflow", ["export", "--workdir", "{trained}", "--out", "{tmp}/m"], "export"),
])
def test_a_missing_extra_is_one_line_naming_its_install(trained, capsys, tmp_path, monkeypatch,
                                                        module, argv, extra):
    for name in list(sys.modules):
        if name.split(".")[0] == module or name == "lenet_dist.report":
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # any import of it now fails
    argv = [a.format(trained=trained.config.workdir, tmp=tmp_path) for a in argv]
    assert f"pip install 'lenet-dist[{extra}]'" in one_line_error(capsys, argv)


# ---------------------------------------------------------------- the built package


def run(*argv, timeout=600, check=True):
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if check:
        assert proc.returncode == 0, (argv, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The wheel and sdist, built as a release would be (isolated build env)."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT, timeout=900)
    (wheel,), (sdist,) = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    return wheel, sdist


@pytest.fixture(scope="module")
def core_venv(dist, tmp_path_factory):
    """A clean venv with the wheel and its core dependencies only."""
    venv = tmp_path_factory.mktemp("core") / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", dist[0], timeout=1200)
    return venv


@pytest.mark.slow
def test_the_wheel_and_sdist_carry_the_package_and_its_version(dist, tmp_path):
    wheel, sdist = dist
    version = lenet_dist.__version__
    assert wheel.name.startswith(f"lenet_dist-{version}-") and \
        sdist.name == f"lenet_dist-{version}.tar.gz"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(f"lenet_dist-{version}.dist-info/METADATA").decode()
    assert "lenet_dist/cli.py" in names and not any(n.startswith("tests/") for n in names)
    assert f"\nVersion: {version}\n" in meta
    # TensorFlow and matplotlib only behind extras
    heavy = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")
             and any(k in line for k in ("tensorflow", "matplotlib"))]
    assert heavy and all("extra ==" in line for line in heavy), heavy
    with tarfile.open(sdist) as t:
        members = t.getnames()
    for path in ("pyproject.toml", "README.md", "lenet_dist/cli.py"):
        assert f"lenet_dist-{version}/{path}" in members, path
    # the sdist installs by itself too (its build, without the dependencies)
    run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
        tmp_path / "site", sdist, timeout=900)
    assert (tmp_path / "site" / "lenet_dist" / "cli.py").is_file()
    assert (tmp_path / "site" / f"lenet_dist-{version}.dist-info").is_dir()


@pytest.mark.slow
def test_a_core_install_answers_help_version_and_summary_without_the_extras(core_venv):
    bin_ = core_venv / "bin"
    assert "Usage: lenet-dist" in run(bin_ / "lenet-dist", "--help").stdout
    assert lenet_dist.__version__ in run(bin_ / "lenet-dist", "--version").stdout
    assert "parameters: 61,706" in run(bin_ / "lenet-dist", "summary").stdout
    for module in extras.EXTRAS:
        proc = run(bin_ / "python", "-c", f"import {module}", check=False)
        assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr, module


@pytest.mark.slow
def test_a_core_install_trains_predicts_and_says_what_export_needs(core_venv, data_dir,
                                                                   dataset, tmp_path):
    from PIL import Image

    cli = core_venv / "bin" / "lenet-dist"
    work = tmp_path / "run"
    run(cli, "train", "--recipe", "smoke", "--devices", "2", "--epochs", "1",
        "--train-limit", "256", "--data-dir", data_dir, "--workdir", work, "--no-progress")
    assert "best" in run(cli, "checkpoints", "--workdir", work).stdout
    png = tmp_path / "x.png"
    Image.fromarray(np.asarray(dataset.test.images[0][..., 0], np.uint8)).save(png)
    out = run(cli, "predict", "--workdir", work, png).stdout
    assert out.startswith(f"{png}: ") and len(out.splitlines()) == 1, out
    for argv, extra in ((["export", "--workdir", work, "--out", tmp_path / "m"], "export"),
                        (["report", "--workdir", work, "--data-dir", data_dir], "report")):
        proc = run(cli, *argv, check=False)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1, (argv, proc.stderr)
        assert f"pip install 'lenet-dist[{extra}]'" in err[0], err
    assert not (tmp_path / "m").exists()
