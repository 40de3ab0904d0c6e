"""The training loss's cross-entropy against float64 NumPy, and the LM head's gradient products
in the compute dtype."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from numpy_reference import rounded
from m2rnn_jax.layers import Embed, Linear
from train.step import token_cross_entropy


def test_token_cross_entropy_and_its_gradient_match_float64():
    logits = jax.random.normal(jax.random.key(0), (3, 5, 37)) * 4
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 37)
    lg, tg = np.asarray(logits, np.float64), np.asarray(targets)
    top = lg.max(-1, keepdims=True)
    lse = np.log(np.exp(lg - top).sum(-1)) + top[..., 0]
    want = lse - np.take_along_axis(lg, tg[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_cross_entropy(logits, targets), want, rtol=1e-6, atol=1e-6)
    softmax = np.exp(lg - lse[..., None])
    onehot = np.arange(37) == tg[..., None]
    grad = jax.grad(lambda lg: token_cross_entropy(lg, targets).sum())(logits)
    np.testing.assert_allclose(grad, softmax - onehot, rtol=1e-5, atol=1e-6)


def test_a_wide_output_takes_its_cotangent_back_in_the_compute_dtype():
    """bf16 compute with float32 outputs (the LM head): the gradient products see the cotangent
    rounded to bf16. Rows 1 + 2⁻⁹ and -1 cancel: rounded (1 + 2⁻⁹ is 1 in bf16) the weight
    gradient is 0; from a float32 cotangent it would be 2⁻⁹."""
    x = jnp.ones((2, 3), jnp.float32)
    cotangent = jnp.array([[1 + 2.0 ** -9] * 2, [-1.0] * 2], jnp.float32)

    def kernel_gradient(dtype):
        layer = Linear(3, 2, ("embed", "vocab"), std=1.0, rngs=nnx.Rngs(0), dtype=dtype)
        graphdef, params = nnx.split(layer)
        _, pull = jax.vjp(lambda p: nnx.merge(graphdef, p)(x, out_dtype=jnp.float32), params)
        return pull(cotangent)[0]["kernel"][...]

    np.testing.assert_array_equal(kernel_gradient(jnp.bfloat16), np.zeros((3, 2), np.float32))
    np.testing.assert_array_equal(kernel_gradient(jnp.float32),
                                  np.full((3, 2), 2.0 ** -9, np.float32))


def test_the_tied_head_gradients_of_batched_rows_match_float64():
    """``Embed.attend`` on (B, S, D) rows in bf16: the gradients of the rows and of the
    embedding against float64 products of the bf16-rounded operands (dx = g E, dE = Σ gᵀ x)."""
    embed = Embed(37, 8, std=1.0, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (2, 3, 8))
    cotangent = jax.random.normal(jax.random.key(3), (2, 3, 37))
    graphdef, params = nnx.split(embed)
    _, pull = jax.vjp(lambda p, x: nnx.merge(graphdef, p).attend(x), params, x)
    d_params, dx = pull(cotangent)

    g, table, rows = (rounded(a, jnp.bfloat16) for a in (cotangent, params["embedding"][...], x))
    for got, want in ((dx, g @ table),
                      (d_params["embedding"][...], np.einsum("bsv,bsd->vd", g, rows))):
        got = np.asarray(got, np.float64)
        assert got.shape == want.shape
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
