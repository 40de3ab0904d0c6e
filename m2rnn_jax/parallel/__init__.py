"""Parallel layouts the layers place themselves (``MeshAxes``; see ``axes.py``)."""

from m2rnn_jax.parallel.axes import MeshAxes

__all__ = ["MeshAxes"]
