"""The fused M²RNN decode step (pallas_kernels/m2rnn/decode_step.py, Pallas' interpreter on the
CPU) against the layer's XLA decode step and a float64 NumPy step, and in a decoding model.
The interpreter runs the kernel's programs one after another, so a race between them (on the
shared ring) shows only where these tests run on a GPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpy_reference import relative_error, rounded, silu, softplus, values
from m2rnn_jax import HybridLM
from m2rnn_jax.layers import M2RNN
from pallas_kernels.m2rnn import decode_step as fused_decode
from test_generation import assert_prefill_then_decode_equals_full, packed_batch, tiny_config
from test_layers import small_config

TAPS = 3  # 7 steps below turn the ring of 3 slots over twice


def layer_pair(compute_dtype, **m2rnn):
    """The same layer (same parameters) with the XLA decode step and with the fused kernel."""
    config = small_config(compute_dtype, **{"key_dim": 16, "value_dim": 16, "conv_kernel": TAPS,
                                            **m2rnn})
    layers = []
    for kernel in ("xla", "fused"):
        cfg = dataclasses.replace(config, m2rnn=dataclasses.replace(config.m2rnn,
                                                                    decode_kernel=kernel))
        layer = M2RNN(cfg, rngs=nnx.Rngs(3))
        if layer.conv_bias is not None:  # zero at init: random, so a dropped bias shows
            layer.conv_bias[...] = jax.random.normal(jax.random.key(9), layer.conv_bias.shape)
            layer.in_proj.bias[...] = jax.random.normal(jax.random.key(7),
                                                        layer.in_proj.bias.shape)
        layer.W[...] = 0.5 * jax.random.normal(jax.random.key(8), layer.W.shape)
        if layer.D is not None:  # ones at init: random, so a dropped or misplaced D shows
            layer.D[...] = jax.random.normal(jax.random.key(6), layer.D.shape)
        layers.append(layer)
    return layers


def reference_step(layer, x, cache, dtype):
    """docs/math.md §3's decode step in float64 from the layer's parameters and its product
    ``in_proj(x)``, rounding that, the conv output, q, k, v, W, y and the gate to ``dtype``
    where the layer does: ``(gated read-out (B, N, V), state)``."""
    cfg = layer.cfg
    heads = {name: cfg.heads(name) for name in "qkvfwg"}
    n, k_dim, v_dim, taps = cfg.num_heads, cfg.key_dim, cfg.value_dim, cfg.conv_kernel
    proj = rounded(layer.in_proj(x, out_dtype=jnp.float32)[:, 0], dtype)  # not under test
    width = cfg.conv_width
    qkv_in, logits = proj[:, :width], proj[:, width:width + heads["f"]]
    g = proj[:, width + heads["f"]:]
    # The window from the ring (layers/conv.py): the input lag steps back is in slot
    # (taps - 1 + step - lag) % taps.
    ring, step = np.asarray(cache["conv"], np.float64), int(cache["conv_step"])
    conv = qkv_in * values(layer.conv_weight)[taps - 1]
    for lag in range(1, taps):
        conv += ring[:, (taps - 1 + step - lag) % taps] * values(layer.conv_weight)[taps - 1 - lag]
    if layer.conv_bias is not None:
        conv += values(layer.conv_bias)
    conv = rounded(conv, dtype)
    q, k, v = np.split(conv, np.cumsum([heads["q"] * k_dim, heads["k"] * k_dim]), axis=-1)
    q, k = rounded(silu(q), dtype), rounded(silu(k), dtype)
    v = rounded(silu(v), dtype) if cfg.value_activation == "silu" else v
    b = x.shape[0]
    q = np.repeat(q.reshape(b, heads["q"], k_dim), n // heads["q"], axis=1)
    k = np.repeat(k.reshape(b, heads["k"], k_dim), n // heads["k"], axis=1)
    v = np.repeat(v.reshape(b, heads["v"], v_dim), n // heads["v"], axis=1)
    f = np.exp(-np.exp(values(layer.A_log)) * softplus(logits + values(layer.dt_bias)))
    f = np.repeat(f, n // heads["f"], axis=1)[..., None, None]
    w = np.repeat(rounded(values(layer.W), dtype), n // heads["w"], axis=0)
    h = np.asarray(cache["state"], np.float64)
    z = np.tanh(np.einsum("bnkv,nvw->bnkw", h, w) + k[..., :, None] * v[..., None, :])
    h = f * h + (1.0 - f) * z
    y = rounded(np.einsum("bnkv,bnk->bnv", h, q), dtype)
    if layer.D is not None:
        y = rounded(y + rounded(rounded(values(layer.D), dtype) * v, dtype), dtype)
    g = np.repeat(g.reshape(b, heads["g"], v_dim), n // heads["g"], axis=1)
    return y * rounded(silu(g), dtype), h


def fused_outputs(layer, x, cache):
    """The kernel's own outputs (gated read-out, state, ring) for the layer's inputs."""
    return layer._fused_step(layer.in_proj(x, out_dtype=jnp.float32), cache)


CASES = [
    # Shared q/k like the 400M config; per-head q/k with grouped v, f, W; identity v, no D.
    dict(num_heads=8, num_q_heads=1, num_k_heads=1, num_g_heads=2),
    dict(num_heads=4, num_q_heads=4, num_k_heads=4, num_v_heads=2, num_f_heads=2,
         num_w_heads=1, num_g_heads=2, add_bias=True),
    dict(num_heads=6, num_q_heads=2, num_k_heads=3, num_g_heads=3, value_activation="identity",
         use_residual=False),
    # K != V: swapped dimensions in the channel offsets or the state's layout show.
    dict(num_heads=4, num_q_heads=1, num_k_heads=2, num_g_heads=2, key_dim=32, add_bias=True),
]


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_step_matches_xla_step_and_float64(compute_dtype, case):
    """Seven steps after a 2-token prompt: the kernel's gated read-out, state and ring against
    a float64 step from the same cache, and the layer's output and cache against the XLA
    path's."""
    xla_layer, fused_layer = layer_pair(compute_dtype, **CASES[case])
    dtype = xla_layer.dtype
    x = jax.random.normal(jax.random.key(case), (2, 9, 32))
    _, cache = xla_layer.prefill(x[:, :2], None, max_len=9)
    xla_cache = cache
    kernel_step, xla_step = jax.jit(fused_outputs), nnx.jit(lambda m, x, c: m.decode_step(x, c))
    fused_step = nnx.jit(lambda m, x, c: m.decode_step(x, c))
    tolerance = 2e-6 if compute_dtype == "float32" else 2e-2
    for t in range(2, 9):
        token = x[:, t:t + 1]
        gated, state, ring = kernel_step(fused_layer, token, cache)
        want_gated, want_state = reference_step(fused_layer, token, cache, dtype)
        for name, got, want in (("gated", gated, want_gated), ("state", state, want_state)):
            assert relative_error(got, want) < tolerance, (name, t)
        # The new input went to the slot of the input that left the window.
        slot = (TAPS - 1 + t - 2) % TAPS
        projected = fused_layer.in_proj(token, out_dtype=jnp.float32).astype(dtype)
        projected = projected[:, 0, :fused_layer.cfg.conv_width]
        np.testing.assert_array_equal(np.asarray(ring[:, slot], np.float32),
                                      np.asarray(projected, np.float32))
        out, cache = fused_step(fused_layer, token, cache)
        xla_out, xla_cache = xla_step(xla_layer, token, xla_cache)
        assert relative_error(out, np.asarray(xla_out, np.float64)) < tolerance, t
        assert relative_error(cache["state"], np.asarray(xla_cache["state"])) < tolerance, t
        np.testing.assert_array_equal(np.asarray(cache["conv"], np.float32),
                                      np.asarray(xla_cache["conv"], np.float32))
        assert int(cache["conv_step"]) == int(xla_cache["conv_step"]) == t - 1


def test_supports_powers_of_two_from_16():
    assert fused_decode.supports(64, 16) is None
    assert "K" in fused_decode.supports(8, 16) and "V" in fused_decode.supports(64, 24)
    config = small_config(decode_kernel="fused")  # K = 8, V = 4
    layer = M2RNN(config, rngs=nnx.Rngs(0))
    _, cache = layer.prefill(jnp.ones((1, 2, 32)), None, max_len=4)
    with pytest.raises(ValueError, match="decode_kernel"):
        layer.decode_step(jnp.ones((1, 1, 32)), cache)
    auto = M2RNN(small_config(), rngs=nnx.Rngs(0))  # "auto" off a GPU: the XLA path
    assert not auto._decodes_fused()


def test_batch_one_decoding_with_the_fused_step_equals_the_full_sequence():
    """A tiny HybridLM decoding one row with the kernel forced on: every logit equals the
    full-sequence forward's."""
    config = tiny_config("MAM")
    m2rnn = dataclasses.replace(config.m2rnn, key_dim=16, value_dim=16, decode_kernel="fused")
    model = HybridLM(dataclasses.replace(config, m2rnn=m2rnn), rngs=nnx.Rngs(2))
    tokens, segment_ids = packed_batch(5, 10)
    assert_prefill_then_decode_equals_full(model, tokens[1:], segment_ids[1:], prompt_len=5,
                                           max_len=10)
