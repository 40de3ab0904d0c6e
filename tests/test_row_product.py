"""The single-row product kernel (pallas_kernels/row_product.py, Pallas' interpreter on the CPU)
against float64 NumPy on fresh random inputs, and decoding at batch 1 with every product on it
against the full sequence and the XLA products."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpy_reference import relative_error, rms_norm, rounded, silu
from m2rnn_jax import HybridLM
from m2rnn_jax.generation import Generator
from m2rnn_jax.layers import Linear, RMSNorm
from m2rnn_jax.layers.linear import row_kernels
from m2rnn_jax.layers.registry import register_mixer
from pallas_kernels.row_product import row_product
from test_generation import TanhDecodeMixer, forward, prefill, tiny_config

EPS = 1e-5


def random_case(seed, width, out, dtype):
    rng = np.random.default_rng(seed)
    x = rounded(3 * rng.standard_normal(width), dtype)  # mean square far from 1
    scale = 1 + 0.2 * rng.standard_normal(width)
    w = rounded(rng.standard_normal((out, width)) / np.sqrt(width), dtype)
    w2 = rounded(rng.standard_normal((out, width)) / np.sqrt(width), dtype)
    return x, scale, w, w2, rng.standard_normal(out), rounded(rng.standard_normal(out), dtype)


# Widths and outputs that are not multiples of the kernel's blocks (one output per program for
# the small ones), the 400M model's in-projection, a row of more than 32 blocks (a rolled loop).
SHAPES = [(100, 37), (300, 6), (1024, 2900), (9000, 40)]


@pytest.mark.parametrize("width, out", SHAPES)
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_row_product_equals_float64(width, out, dtype, tolerance):
    x, scale, w, w2, bias, add = random_case(width + out, width, out, dtype)
    normed = rms_norm(x, scale, EPS)
    as_jax = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    cases = {
        "norm, bias, float32 out": (
            row_product(as_jax(x), as_jax(w), norm_scale=jnp.asarray(scale, jnp.float32),
                        eps=EPS, bias=jnp.asarray(bias, jnp.float32), dtype=dtype,
                        out_dtype=jnp.float32),
            w @ normed + bias),
        "residual add": (row_product(as_jax(x), as_jax(w), add=as_jax(add), dtype=dtype),
                         w @ x + add),
        "norm, bias, residual add": (
            row_product(as_jax(x), as_jax(w), norm_scale=jnp.asarray(scale, jnp.float32),
                        eps=EPS, bias=jnp.asarray(bias, jnp.float32), add=as_jax(add),
                        dtype=dtype),
            w @ normed + bias + add),
        "SwiGLU pair": (row_product(as_jax(x), as_jax(w), w2=as_jax(w2),
                                    norm_scale=jnp.asarray(scale, jnp.float32), eps=EPS,
                                    dtype=dtype),
                        silu(w @ normed) * (w2 @ normed)),
    }
    for name, (got, want) in cases.items():
        assert got.shape == (out,), name
        assert relative_error(got, want) < tolerance, (name, relative_error(got, want))
    assert cases["norm, bias, float32 out"][0].dtype == jnp.float32
    assert cases["residual add"][0].dtype == cases["SwiGLU pair"][0].dtype == dtype


def test_a_linear_on_the_row_kernel_equals_its_xla_product():
    """float32: a norm folded into a Linear with a bias and a residual, kernel against XLA's
    product, to float32 rounding (a factor or a term in the wrong place would show)."""
    rng = np.random.default_rng(3)
    norm = RMSNorm(48, eps=EPS)
    norm.scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(48), jnp.float32)
    linear = Linear(48, 70, ("embed", "mlp"), std=0.3, rngs=nnx.Rngs(1), use_bias=True)
    linear.bias[...] = jnp.asarray(rng.standard_normal(70), jnp.float32)
    x = jnp.asarray(3 * rng.standard_normal((1, 1, 48)), jnp.float32)
    add = jnp.asarray(rng.standard_normal((1, 1, 70)), jnp.float32)
    want = linear(norm.for_product(x), add=add)
    with row_kernels(True):
        got = linear(norm.for_product(x), add=add)
    assert got.shape == want.shape == (1, 1, 70)
    assert relative_error(got, np.asarray(want, np.float64)) < 1e-6


def test_row_product_rejects_mismatched_inputs():
    x, w = jnp.ones(8), jnp.ones((4, 8))
    with pytest.raises(ValueError, match="weight"):
        row_product(x, jnp.ones((8, 4)), dtype=jnp.float32)
    with pytest.raises(ValueError, match="eps"):
        row_product(x, w, norm_scale=jnp.ones(8), dtype=jnp.float32)
    with pytest.raises(ValueError, match="add"):
        row_product(x, w, add=jnp.ones(5), dtype=jnp.float32)


def kernel_config(pattern, tied=False, **overrides):
    return dataclasses.replace(tiny_config(pattern), decode_products="kernel",
                               tie_embeddings=tied, **overrides)


@nnx.jit
def decode_on_row_kernels(model, tokens, caches):
    with row_kernels(True):  # inside the traced function: part of what this jit caches
        return model.decode_step(tokens, caches)


def randomize(model, seed):
    """Biases and ``D`` start at zeros and ones: random, so a dropped or misplaced term shows."""
    keys = iter(jax.random.split(jax.random.key(seed), 4 * len(model.blocks)))
    for block in model.blocks:
        for owner, name in ((getattr(block.mixer, "in_proj", None), "bias"), (block.mixer, "D")):
            param = getattr(owner, name, None) if owner is not None else None
            if param is not None:
                param[...] = jax.random.normal(next(keys), param.shape)


@pytest.mark.parametrize("pattern, tied, moe", [("MA", False, False), ("SD", True, False),
                                                ("MY", False, True)])
def test_batch_one_decoding_on_row_kernels_equals_the_full_sequence(pattern, tied, moe):
    """Every product of a decode step at batch 1 on the kernel (norms, biases, SwiGLU and the
    residual adds fused; the tied head; MoE blocks; a user's mixer that adds no residual
    itself): each logit equals the full-sequence forward's."""
    register_mixer("Y", TanhDecodeMixer, replace=True)
    config = kernel_config(pattern, tied)
    config = dataclasses.replace(config, m2rnn=dataclasses.replace(config.m2rnn, add_bias=True))
    if moe:
        config = dataclasses.replace(config, moe=dataclasses.replace(
            config.moe, num_experts=4, top_k=2, expert_hidden_dim=32,
            shared_expert_hidden_dim=32))
    model = HybridLM(config, rngs=nnx.Rngs(4))
    randomize(model, 5)
    tokens = jax.random.randint(jax.random.key(5), (1, 9), 0, 256, jnp.int32)
    segment_ids = jnp.zeros((1, 9), jnp.int32)
    full = np.asarray(forward(model, tokens, segment_ids))
    _, caches = prefill(model, tokens[:, :5], segment_ids[:, :5], 10)
    for t in range(5, 9):
        logits, caches = decode_on_row_kernels(model, tokens[:, t], caches)
        np.testing.assert_allclose(np.asarray(logits), full[:, t], rtol=1e-5, atol=1e-5,
                                   err_msg=f"step {t}")


def test_generator_tokens_are_the_same_with_row_kernels_and_with_xla():
    """bf16, greedy, through the Generator's transposed weights (which the kernel reads as they
    are): the same tokens as XLA's products; the kernel runs only at batch 1."""
    kernel = kernel_config("MAM", compute_dtype="bfloat16")
    xla = dataclasses.replace(kernel, decode_products="xla")
    runs = {}
    for name, config in (("kernel", kernel), ("xla", xla)):
        model = HybridLM(config, rngs=nnx.Rngs(6))
        runs[name] = Generator(model).generate([[5, 17, 99, 3]], max_new_tokens=12,
                                               temperature=0.0)
    assert runs["kernel"] == runs["xla"]
    model = HybridLM(kernel, rngs=nnx.Rngs(6))
    assert model.decodes_by_row_kernels(1) and not model.decodes_by_row_kernels(2)
    auto = HybridLM(tiny_config("MA"), rngs=nnx.Rngs(6))  # "auto" off a GPU: XLA
    assert not auto.decodes_by_row_kernels(1)
