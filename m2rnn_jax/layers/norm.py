"""RMSNorm, computed in float32 whatever the compute dtype."""

import math

import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.linear import NormedRow, rms_row_factor
from m2rnn_jax.layers.params import make_param


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x²) + eps) * scale`` over the last axis; output in ``dtype``."""

    def __init__(self, width: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = make_param(jnp.ones((width,), param_dtype), ("norm",), weight_decay=False)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        return (x32 * rms_row_factor(x32, self.eps)
                * self.scale[...].astype(jnp.float32)).astype(self.dtype)

    def factored(self, x) -> NormedRow:
        """``self(x)`` for a ``Linear`` to take, not yet computed (see ``NormedRow``)."""
        return NormedRow(x, self.scale[...], self.eps, jnp.dtype(self.dtype))

    def for_product(self, x):
        """``self(x)`` for input to ``Linear`` layers only: ``factored`` when ``x`` is a single
        row (decoding one token at batch 1; see ``NormedRow``), else the array."""
        return self.factored(x) if math.prod(x.shape[:-1]) == 1 else self(x)
