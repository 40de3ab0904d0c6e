"""RMSNorm, computed in float32 whatever the compute dtype."""

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.params import make_param


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x²) + eps) * scale`` over the last axis; output in ``dtype``."""

    def __init__(self, width: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = make_param(jnp.ones((width,), param_dtype), ("norm",), weight_decay=False)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)
