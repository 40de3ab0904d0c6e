"""Dense projections and the token embedding, with logical axes on their parameters."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.params import make_param, normal


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowScaled:
    """``values * row_scale``, kept as its two factors; ``Linear`` and ``Embed.attend`` take
    it as ``(values W) * row_scale``. ``RMSNorm.for_product`` gives one for a single row, whose
    product is a matrix-vector product: XLA then fuses ``values`` into it and the normalised row
    is never written out, one kernel fewer per norm (with more rows the GEMMs gain nothing).
    Only the rounding changes (in bf16 such logits differ from the unfolded path's by bf16
    rounding, equally far from float32's). It has no arithmetic: anything else takes arrays."""

    values: jax.Array     # (..., width), in the compute dtype
    row_scale: jax.Array  # (..., 1), float32

    @property
    def shape(self):
        return self.values.shape


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _wide_product(x, w, out_dtype):
    """``x w`` (both in the compute dtype) with a wider output. Its gradient products take the
    cotangent rounded to the compute dtype and so run at that dtype's rate like every other
    layer's: for the LM head's float32 logits they would otherwise be two float32 products of
    1.7 TFLOP each at 4 × 4096 tokens and a 50K vocabulary."""
    return jnp.matmul(x, w, preferred_element_type=out_dtype)


def _wide_product_fwd(x, w, out_dtype):
    return _wide_product(x, w, out_dtype), (x, w)


def _wide_product_bwd(out_dtype, residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    dx = jnp.matmul(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum("...i,...o->io", x, g, preferred_element_type=jnp.float32)
    return dx, dw.astype(w.dtype)


_wide_product.defvjp(_wide_product_fwd, _wide_product_bwd)


def _product(x, w, dtype, out_dtype):
    """``x w`` in ``dtype`` (``x`` an array or a ``RowScaled``), output in ``out_dtype`` (None:
    ``dtype``)."""
    if isinstance(x, RowScaled):
        y = jnp.matmul(x.values.astype(dtype), w.astype(dtype),
                       preferred_element_type=jnp.float32) * x.row_scale
        return y.astype(out_dtype or dtype)
    x, w = x.astype(dtype), w.astype(dtype)
    if out_dtype is not None and jnp.dtype(out_dtype).itemsize > jnp.dtype(dtype).itemsize:
        return _wide_product(x, w, jnp.dtype(out_dtype))
    return jnp.matmul(x, w, preferred_element_type=out_dtype)


class Linear(nnx.Module):
    """``y = x W (+ b)``; ``W (in, out)`` carries logical axes ``axes``; computed in ``dtype``."""

    def __init__(self, in_features: int, out_features: int, axes, *, std: float, rngs: nnx.Rngs,
                 use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32):
        self.dtype = dtype
        self.kernel = make_param(normal(rngs.params(), (in_features, out_features), std,
                                        param_dtype), axes)
        self.bias = (make_param(jnp.zeros((out_features,), param_dtype), axes[1:],
                                weight_decay=False) if use_bias else None)

    def __call__(self, x, out_dtype=None, columns=None):
        """``x W (+ b)`` (``x`` an array or a ``RowScaled``); with ``columns`` (a sequence of
        slices) only those output columns, in that order, as a product of their own."""
        kernel, bias = self.kernel[...], None if self.bias is None else self.bias[...]
        if columns is not None:  # slices, not an index array: the gradient is then no scatter
            kernel = jnp.concatenate([kernel[:, part] for part in columns], axis=1)
            bias = None if bias is None else jnp.concatenate([bias[part] for part in columns])
        y = _product(x, kernel, self.dtype, out_dtype)
        if bias is not None:
            y = y + bias.astype(y.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding ``(vocab, d_model)``; ``attend`` gives tied LM-head logits."""

    def __init__(self, vocab_size: int, d_model: int, *, std: float, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.dtype = dtype
        self.embedding = make_param(normal(rngs.params(), (vocab_size, d_model), std, param_dtype),
                                    ("vocab", "embed"))

    def __call__(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x):
        """Float32 logits ``x @ embeddingᵀ`` (``x`` an array or a ``RowScaled``)."""
        return _product(x, self.embedding[...].T, self.dtype, jnp.float32)


