"""lenet-dist: the d2l LeNet-5, trained data-parallel with jax.sharding.

The Python API (docs/python-api.md), for scripts and notebooks:

    import lenet_dist

    result = lenet_dist.train(lenet_dist.recipe("smoke"))
    model = lenet_dist.load(result.config.workdir, best=True)
    model.predict(images).names

Importing the package stays cheap (the CLI imports it for `--version`): each name is
imported from `lenet_dist.api` when it is first used, and JAX only when a function
that needs it runs, after it has set up the devices (`api.start_jax`).
"""

import importlib as _importlib

from lenet_dist.versions import __version__ as __version__  # the one home: versions.py

__all__ = ["Config", "Failure", "Model", "Predictions", "Preempted", "UserError", "dataset",
           "evaluate", "export", "load", "predict", "recipe", "train"]


def __getattr__(name: str):
    """PEP 562: the API's names, imported from lenet_dist.api on first use."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module("lenet_dist.api"), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    """The API, the submodules imported so far and the dunders; not this file's helpers."""
    return sorted(n for n in {*globals(), *__all__} if n.startswith("__") or n[0] != "_")
