"""lenet-dist: the d2l LeNet-5, trained data-parallel with jax.sharding."""

__version__ = "0.1.0"
