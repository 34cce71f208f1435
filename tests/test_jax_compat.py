"""Every private JAX symbol lenet-dist relies on exists in the installed JAX, and only
jax_compat.py reaches for one (checked against jax 0.12.0.1)."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from lenet_dist import jax_compat

PACKAGE = Path(__file__).resolve().parents[1] / "lenet_dist"
CHECKED_AGAINST = "0.12.0.1"


def test_the_module_names_the_jax_it_was_checked_against():
    assert jax_compat.CHECKED_JAX == CHECKED_AGAINST
    if jax.__version__ != CHECKED_AGAINST:
        pytest.skip(f"installed jax {jax.__version__}: the symbols below are what matters")


@pytest.mark.parametrize("module, attribute", jax_compat.PRIVATE)
def test_every_private_symbol_exists_in_the_installed_jax(module, attribute):
    assert jax_compat.private(module, attribute) is not None


def test_the_named_functions_work_here():
    assert isinstance(jax_compat.backends_are_initialized(), bool)
    assert jax_compat.cluster_types()
    assert hasattr(jax_compat.distributed_state(), "client")
    seen = []
    with jax_compat.stablehlo_serializer_wrapped(lambda f: seen.append(f) or f):
        pass
    assert len(seen) == 1 and callable(seen[0])


def test_a_moved_symbol_is_one_line_naming_both_versions():
    with pytest.raises(jax_compat.JaxMoved) as caught:
        jax_compat.private("jax._src.xla_bridge", "no_such_function")
    message = str(caught.value)
    assert "\n" not in message
    assert f"jax {jax.__version__} has no jax._src.xla_bridge.no_such_function" in message
    assert f"checked against jax {jax_compat.CHECKED_JAX}" in message
    with pytest.raises(jax_compat.JaxMoved, match="has no jax._src.gone.x"):
        jax_compat.private("jax._src.gone", "x")


PRIVATE_USE = re.compile(r"\bjax\._src\b|from\s+jax\s+import\s+[^\n]*\b_src\b")


def test_no_private_jax_outside_jax_compat():
    """A grep, as a lint would: tests/ may keep theirs, the package may not."""
    offenders = [f"{path.name}:{n}" for path in sorted(PACKAGE.rglob("*.py"))
                 if path.name != "jax_compat.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if PRIVATE_USE.search(line)]
    assert offenders == []


def test_importing_jax_compat_does_not_import_jax():
    """distributed.py imports JAX late on purpose; its compat module must not undo it."""
    code = "import sys, lenet_dist.jax_compat; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip()
    assert out == "False"
