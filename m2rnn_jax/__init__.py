"""m2rnn-jax: M²RNN (non-linear RNN with matrix-valued states) in JAX and Flax NNX."""

from m2rnn_jax.ops import BACKENDS, m2rnn

__all__ = ["BACKENDS", "m2rnn"]
