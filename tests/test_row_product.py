"""The single-row product kernel (pallas_kernels/row_product.py, Pallas' interpreter on the CPU)
against float64 NumPy on fresh random inputs, and decoding at batch 1 with every product on it
against the full sequence and the XLA products."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpy_reference import rms_norm, silu
from m2rnn_jax import HybridLM
from m2rnn_jax.generation import Generator
from pallas_kernels.row_product import row_product
from test_generation import assert_prefill_then_decode_equals_full, tiny_config

EPS = 1e-5


def rounded(x, dtype):
    """``x`` rounded to ``dtype`` and back, as float64."""
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)


def random_case(seed, width, out, dtype):
    rng = np.random.default_rng(seed)
    x = rounded(3 * rng.standard_normal(width), dtype)  # mean square far from 1
    scale = 1 + 0.2 * rng.standard_normal(width)
    w = rounded(rng.standard_normal((out, width)) / np.sqrt(width), dtype)
    w2 = rounded(rng.standard_normal((out, width)) / np.sqrt(width), dtype)
    return x, scale, w, w2, rng.standard_normal(out), rounded(rng.standard_normal(out), dtype)


def relative_error(got, want):
    return np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)


# Widths and outputs that are not multiples of the kernel's blocks (one output per program for
# the small ones), the 400M model's in-projection.
SHAPES = [(100, 37), (300, 6), (1024, 2900)]


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


@pytest.mark.parametrize("pattern, tied", [("MA", False), ("SD", True)])
def test_batch_one_decoding_on_row_kernels_equals_the_full_sequence(pattern, tied):
    """Every product of a decode step at batch 1 on the kernel (norms, biases, SwiGLU and the
    residual adds fused; the tied head too): each logit equals the full-sequence forward's."""
    config = kernel_config(pattern, tied)
    config = dataclasses.replace(config, m2rnn=dataclasses.replace(config.m2rnn, add_bias=True))
    model = HybridLM(config, rngs=nnx.Rngs(4))
    tokens = jax.random.randint(jax.random.key(5), (1, 9), 0, 256, jnp.int32)
    segment_ids = jnp.zeros((1, 9), jnp.int32)
    assert_prefill_then_decode_equals_full(model, tokens, segment_ids, prompt_len=5, max_len=10)


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
    assert model._decodes_by_row_kernels(1) and not model._decodes_by_row_kernels(2)
    auto = HybridLM(tiny_config("MA"), rngs=nnx.Rngs(6))  # "auto" off a GPU: XLA
    assert not auto._decodes_by_row_kernels(1)
