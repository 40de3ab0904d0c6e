"""Models built from the layers: the hybrid language model."""

from m2rnn_jax.models.hybrid_lm import Block, HybridLM

__all__ = ["Block", "HybridLM"]
