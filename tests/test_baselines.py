"""Baseline mixers ``S`` (Mamba-2 style) and ``D`` (Gated DeltaNet) against float64 NumPy
formulas; causality, packed-document isolation, gradients, decoding, axes and the registry.
Their recurrences alone are tested in test_recurrences.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpy_reference import causal_conv, rms_norm, silu, softplus, values

from m2rnn_jax import HybridLM
from m2rnn_jax.config import (AttentionConfig, GatedDeltaNetConfig, Mamba2Config, MLPConfig,
                              ModelConfig)
from m2rnn_jax.layers import LOGICAL_AXES, logical_axes, no_decay_mask
from m2rnn_jax.layers.gated_deltanet import GatedDeltaNet
from m2rnn_jax.layers.mamba2 import Mamba2
from m2rnn_jax.layers.registry import mixer_class

D_MODEL = 24
EPS = 1e-5


def small_config(compute_dtype="float32", pattern="SD"):
    return ModelConfig(vocab_size=32, d_model=D_MODEL, layer_pattern=pattern,
                       mamba2=Mamba2Config(num_heads=4, head_dim=6, state_dim=5, num_groups=2),
                       gated_deltanet=GatedDeltaNetConfig(num_heads=2, key_dim=5, value_dim=7),
                       attention=AttentionConfig(num_heads=4), mlp=MLPConfig(hidden_dim=32),
                       compute_dtype=compute_dtype,
                       init_std=0.3)  # large enough that the recurrences are far from trivial


def same_document(segment_ids, b, s, t):
    return segment_ids is None or len(set(segment_ids[b, s:t + 1])) == 1


def mamba2_reference(layer, cfg, x, segment_ids):
    """The closed form y_t = Σ_{s≤t, same document} (Π_{s<r≤t} a_r) dt_s (C_t·B_s) x_s + D x_t."""
    batch, seq_len, _ = x.shape
    h, p, n, groups = cfg.num_heads, cfg.head_dim, cfg.state_dim, cfg.num_groups
    inner = h * p
    proj = x @ values(layer.in_proj.kernel)
    z, xbc, dt_logits = proj[..., :inner], proj[..., inner:-h], proj[..., -h:]
    xbc = silu(causal_conv(xbc, values(layer.conv_weight), segment_ids))
    xs = xbc[..., :inner].reshape(batch, seq_len, h, p)
    bs = xbc[..., inner:inner + groups * n].reshape(batch, seq_len, groups, n)
    cs = xbc[..., inner + groups * n:].reshape(batch, seq_len, groups, n)
    dt = softplus(dt_logits + values(layer.dt_bias))
    a = np.exp(-np.exp(values(layer.A_log)) * dt)
    y = np.zeros((batch, seq_len, h, p))
    for b in range(batch):
        for head in range(h):
            g = head // (h // groups)
            for t in range(seq_len):
                for s in range(t + 1):
                    if same_document(segment_ids, b, s, t):
                        decay = np.prod(a[b, s + 1:t + 1, head])
                        y[b, t, head] += decay * dt[b, s, head] * (cs[b, t, g] @ bs[b, s, g]) \
                            * xs[b, s, head]
    y = y + values(layer.D)[:, None] * xs
    gated = y.reshape(batch, seq_len, inner) * silu(z)
    return rms_norm(gated, values(layer.out_norm.scale), EPS) @ values(layer.out_proj.kernel)


def gated_deltanet_reference(layer, cfg, x, segment_ids):
    """Step by step with the explicit transition matrix α (I - β k kᵀ)."""
    batch, seq_len, _ = x.shape
    h, kd, vd = cfg.num_heads, cfg.key_dim, cfg.value_dim
    proj = x @ values(layer.in_proj.kernel)
    widths = np.cumsum([h * (2 * kd + vd), h * vd, h])
    qkv, g, b_logits, a_logits = np.split(proj, widths, axis=-1)
    qkv = silu(causal_conv(qkv, values(layer.conv_weight), segment_ids))
    q = qkv[..., :h * kd].reshape(batch, seq_len, h, kd)
    k = qkv[..., h * kd:2 * h * kd].reshape(batch, seq_len, h, kd)
    v = qkv[..., 2 * h * kd:].reshape(batch, seq_len, h, vd)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True) / np.sqrt(kd)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    alpha = np.exp(-np.exp(values(layer.A_log)) * softplus(a_logits + values(layer.dt_bias)))
    beta = 1 / (1 + np.exp(-b_logits))
    o = np.zeros((batch, seq_len, h, vd))
    for b in range(batch):
        for head in range(h):
            state = np.zeros((kd, vd))
            for t in range(seq_len):
                if t > 0 and not same_document(segment_ids, b, t - 1, t):
                    state = np.zeros((kd, vd))
                kt = k[b, t, head]
                transition = alpha[b, t, head] * (np.eye(kd) - beta[b, t, head] * np.outer(kt, kt))
                state = transition @ state + beta[b, t, head] * np.outer(kt, v[b, t, head])
                o[b, t, head] = state.T @ q[b, t, head]
    gated = rms_norm(o, values(layer.out_norm.scale), EPS) * silu(g.reshape(o.shape))
    return gated.reshape(batch, seq_len, h * vd) @ values(layer.out_proj.kernel)


MIXERS = {"S": (Mamba2, "mamba2", mamba2_reference),
          "D": (GatedDeltaNet, "gated_deltanet", gated_deltanet_reference)}


@nnx.jit
def apply(layer, x, segment_ids=None):
    return layer(x, segment_ids)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 10, D_MODEL)).astype(np.float32)
    segment_ids = np.array([[0] * 4 + [1] * 6, [3] * 2 + [5] * 5 + [6] * 3], np.int32)
    return x, segment_ids


def make(letter, compute_dtype="float32", seed=1):
    cls, _, _ = MIXERS[letter]
    layer = cls(small_config(compute_dtype), rngs=nnx.Rngs(seed))
    if letter == "S":  # move D and the norm scale off their init so the test sees them
        layer.D[...] = jax.random.normal(jax.random.key(2), layer.D.shape)
    layer.out_norm.scale[...] = 1 + 0.5 * jax.random.normal(jax.random.key(3),
                                                            layer.out_norm.scale.shape)
    return layer


@pytest.mark.parametrize("letter", ["S", "D"])
def test_matches_float64_reference_with_and_without_packing(letter, inputs):
    x, segment_ids = inputs
    layer = make(letter)
    _, field, reference = MIXERS[letter]
    cfg = getattr(small_config(), field)
    for seg in (None, segment_ids):
        got = np.asarray(apply(layer, jnp.asarray(x), None if seg is None else jnp.asarray(seg)))
        want = reference(layer, cfg, x.astype(np.float64), seg)
        assert np.abs(want).max() > 0.1  # a non-trivial output
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("letter", ["S", "D"])
def test_causal_and_documents_isolated(letter, inputs):
    x, segment_ids = inputs  # the shapes of the reference test: no new compilation
    layer = make(letter)
    noise = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    base = np.asarray(apply(layer, jnp.asarray(x)))
    changed = np.where(np.arange(10)[None, :, None] >= 6, noise, x)
    out = np.asarray(apply(layer, jnp.asarray(changed)))
    np.testing.assert_allclose(out[:, :6], base[:, :6], rtol=1e-6, atol=1e-6)
    assert np.abs(out[:, 6:] - base[:, 6:]).max() > 1e-3
    # Row 0 packs [doc of 4 | doc of 6]: rewriting the first document leaves the second alone.
    base = np.asarray(apply(layer, jnp.asarray(x), jnp.asarray(segment_ids)))
    changed = np.where(np.arange(10)[None, :, None] < 4, noise, x)
    out = np.asarray(apply(layer, jnp.asarray(changed), jnp.asarray(segment_ids)))
    np.testing.assert_allclose(out[0, 4:], base[0, 4:], rtol=1e-6, atol=1e-6)
    assert np.abs(out[0, :4] - base[0, :4]).max() > 1e-3


@pytest.mark.parametrize("letter", ["S", "D"])
def test_gradients_finite_and_reach_every_parameter(letter, inputs):
    x, segment_ids = inputs
    layer = make(letter)
    graphdef, params = nnx.split(layer, nnx.Param)

    @jax.jit
    def grads(params):
        def loss(params):
            out = nnx.merge(graphdef, params)(jnp.asarray(x), jnp.asarray(segment_ids))
            return jnp.sum(jnp.sin(out))
        return jax.grad(loss)(params)

    for path, g in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads(params)))[0]:
        assert np.all(np.isfinite(g)), path
        assert np.abs(g).max() > 0, path


@pytest.mark.parametrize("letter", ["S", "D"])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_shapes_dtypes_axes_and_decay_flags(letter, compute_dtype, inputs):
    x, segment_ids = inputs
    layer = make(letter, compute_dtype)
    out = apply(layer, jnp.asarray(x, compute_dtype), jnp.asarray(segment_ids))
    assert out.shape == x.shape and out.dtype == jnp.dtype(compute_dtype)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    state = nnx.state(layer, nnx.Param)
    params = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0])
    axes = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(logical_axes(state)),
                                                is_leaf=lambda a: isinstance(a, tuple))[0]
    assert len(axes) == len(params)
    for path, names in axes:
        assert isinstance(names, tuple) and len(names) == np.ndim(params[path]), (path, names)
        assert set(names) <= set(LOGICAL_AXES), (path, names)
    excluded = {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(no_decay_mask(state)))[0] if v}
    expected = {"['A_log']", "['dt_bias']", "['out_norm']['scale']"}
    assert excluded == (expected | {"['D']"} if letter == "S" else expected)


@pytest.mark.parametrize("letter", ["S", "D"])
def test_prefill_then_decode_matches_the_full_sequence(letter, inputs):
    x, _ = inputs
    layer = make(letter)
    full = np.asarray(apply(layer, jnp.asarray(x)))
    _, cache = nnx.jit(lambda m, h: m.prefill(h, None, 10))(layer, jnp.asarray(x[:, :6]))
    step = nnx.jit(lambda m, h, c: m.decode_step(h, c))
    for t in range(6, 10):
        y, cache = step(layer, jnp.asarray(x[:, t:t + 1]), cache)
        np.testing.assert_allclose(np.asarray(y[:, 0]), full[:, t], rtol=1e-4, atol=1e-5)


def test_letters_registered_and_build_into_hybrid_lm():
    assert mixer_class("S") is Mamba2 and mixer_class("D") is GatedDeltaNet
    model = HybridLM(small_config(pattern="SD"), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 32, (2, 7)), jnp.int32)
    logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert logits.shape == (2, 7, 32) and np.all(np.isfinite(np.asarray(logits)))
