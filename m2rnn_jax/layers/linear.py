"""Dense projections and the token embedding, with logical axes on their parameters."""

import contextlib
import contextvars
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.params import make_param, normal
from pallas_kernels import row_product as row_kernel


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NormedRow:
    """``rms_norm(x)`` of a single row, not yet computed, for ``Linear`` and ``Embed.attend``:
    ``RMSNorm.for_product`` gives one when decoding one token at batch 1. A product takes it as
    ``((x · scale) W) · row_factor``, where ``x · scale`` is rounded to ``dtype`` and
    ``row_factor = 1 / sqrt(mean(x²) + eps)`` (``factors``). Under ``row_kernels`` one kernel
    does the norm and the product (``pallas_kernels/row_product.py``); in XLA, ``x · scale`` is
    fused into the product, a matrix-vector product. Either way the normalised row is never
    written out: one kernel fewer per norm (with more rows the GEMMs gain nothing). Only the
    rounding changes (in bf16 such outputs differ from the unfolded path's by bf16 rounding,
    equally far from float32's). It has no arithmetic: anything else takes arrays."""

    x: jax.Array      # (..., width), one row
    scale: jax.Array  # (width,): the norm's scale
    eps: float = dataclasses.field(metadata=dict(static=True))
    dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self):
        return self.x.shape

    def factors(self):
        """``(x · scale in dtype, row factor (..., 1) float32)``."""
        x32 = self.x.astype(jnp.float32)
        return ((x32 * self.scale.astype(jnp.float32)).astype(self.dtype),
                rms_row_factor(x32, self.eps))


def rms_row_factor(x32, eps):
    """RMSNorm's ``1 / sqrt(mean(x²) + eps)`` over the last axis of float32 ``x32``."""
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


_row_kernels = contextvars.ContextVar("row_kernels", default=False)


@contextlib.contextmanager
def row_kernels(enabled: bool):
    """While tracing inside, products of a single row (an array or a ``NormedRow``) with a
    ``Linear`` weight or the tied embedding run as ``pallas_kernels.row_product`` (the norm,
    bias and residual add fused in). The ``Generator`` enables it around its decode steps
    (``HybridLM.decodes_by_row_kernels``): the kernel reads each weight as ``(out, in)``, as the
    Generator holds it (elsewhere XLA would transpose the weight for every call), and it has
    no gradient."""
    token = _row_kernels.set(enabled)
    try:
        yield
    finally:
        _row_kernels.reset(token)


def single_row_kernel(x) -> bool:
    """Whether a product with ``x`` runs as the row kernel: a single row under ``row_kernels``."""
    return _row_kernels.get() and math.prod(x.shape[:-1]) == 1


def row_kernel_product(x, w, dtype, out_dtype=None, *, bias=None, add=None, w2=None):
    """``x w`` of a single row ``x`` (an array or a ``NormedRow``) by the row kernel, shaped as
    ``x @ w``; ``w (in, out)`` is passed as ``w.T``, which XLA folds into the ``(out, in)``
    copies a ``Generator`` holds. ``w2``: the SwiGLU pair (``pallas_kernels.row_product``)."""
    lead = x.shape[:-1]
    norm = {}
    if isinstance(x, NormedRow):
        norm = dict(norm_scale=x.scale, eps=x.eps)
        x = x.x
    y = row_kernel.row_product(
        x.reshape(-1), w.T, w2=None if w2 is None else w2.T,
        bias=bias, add=None if add is None else add.reshape(-1), dtype=dtype,
        out_dtype=out_dtype, **norm)
    return y.reshape(lead + y.shape)


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
    """``x w`` in ``dtype`` (``x`` an array or a ``NormedRow``), output in ``out_dtype`` (None:
    ``dtype``)."""
    if isinstance(x, NormedRow):
        values, row_factor = x.factors()
        y = jnp.matmul(values.astype(dtype), w.astype(dtype),
                       preferred_element_type=jnp.float32) * row_factor
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

    def __call__(self, x, out_dtype=None, columns=None, add=None):
        """``x W (+ b) (+ add)`` (``x`` an array or a ``NormedRow``; ``add`` a residual in the
        output's dtype); with ``columns`` (a sequence of slices) only those output columns, in
        that order, as a product of their own."""
        kernel, bias = self.kernel[...], None if self.bias is None else self.bias[...]
        if columns is None and single_row_kernel(x):
            return row_kernel_product(x, kernel, self.dtype, out_dtype, bias=bias, add=add)
        if columns is not None:  # slices, not an index array: the gradient is then no scatter
            kernel = jnp.concatenate([kernel[:, part] for part in columns], axis=1)
            bias = None if bias is None else jnp.concatenate([bias[part] for part in columns])
        y = _product(x, kernel, self.dtype, out_dtype)
        if bias is not None:
            y = y + bias.astype(y.dtype)
        return y if add is None else y + add.astype(y.dtype)


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
        """Float32 logits ``x @ embeddingᵀ`` (``x`` an array or a ``NormedRow``)."""
        if single_row_kernel(x):
            return row_kernel_product(x, self.embedding[...].T, self.dtype, jnp.float32)
        return _product(x, self.embedding[...].T, self.dtype, jnp.float32)


