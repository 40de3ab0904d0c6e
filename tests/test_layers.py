"""The layers against independent NumPy float64 formulas, their init, axes and errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_reference
from numpy_reference import causal_conv, rms_norm, silu, softplus, values
from m2rnn_jax.config import AttentionConfig, M2RNNConfig, MLPConfig, ModelConfig
from m2rnn_jax.layers import (LOGICAL_AXES, Attention, Embed, Linear, M2RNN, RMSNorm, SwiGLU,
                              causal_depthwise_conv, logical_axes, no_decay_mask)
from m2rnn_jax.layers.conv import conv_cache, conv_decode_step, conv_window
from m2rnn_jax.layers.registry import mixer_class, register_mixer
from m2rnn_jax.typed_config import ConfigError, from_dict

D_MODEL = 32


def small_config(compute_dtype="float32", **m2rnn_overrides):
    m2rnn = dict(num_heads=4, num_q_heads=1, num_k_heads=2, num_g_heads=2, key_dim=8,
                 value_dim=4, backend="scan")
    m2rnn.update(m2rnn_overrides)
    return ModelConfig(vocab_size=64, d_model=D_MODEL, layer_pattern="MA",
                       m2rnn=M2RNNConfig(**m2rnn),
                       attention=AttentionConfig(num_heads=4, num_kv_heads=2, rope=True),
                       mlp=MLPConfig(hidden_dim=48), compute_dtype=compute_dtype)


@nnx.jit
def apply(layer, x, segment_ids=None):
    """One compilation per layer kind and shape (eager dispatch of the scan is slow)."""
    return layer(x, segment_ids)


def m2rnn_layer_reference(layer, cfg, x, segment_ids):
    """docs/math.md §3, step by step in float64, from the layer's parameters."""
    eps = 1e-5
    n, k_dim, v_dim = cfg.num_heads, cfg.key_dim, cfg.value_dim
    heads = {name: cfg.heads(name) for name in "qkvfwg"}
    proj = x @ values(layer.in_proj.kernel)
    widths = [heads["q"] * k_dim, heads["k"] * k_dim, heads["v"] * v_dim, heads["f"]]
    q, k, v, f_logits, g = np.split(proj, np.cumsum(widths), axis=-1)
    qkv = causal_conv(np.concatenate([q, k, v], -1), values(layer.conv_weight), segment_ids)
    q, k, v = np.split(qkv, np.cumsum(widths[:2]), axis=-1)
    q, k = silu(q), silu(k)
    if cfg.value_activation == "silu":  # "identity": v stays linear after the conv
        v = silu(v)
    b, s = x.shape[:2]
    q = q.reshape(b, s, heads["q"], k_dim)
    k = k.reshape(b, s, heads["k"], k_dim)
    v = v.reshape(b, s, heads["v"], v_dim)
    f = np.exp(-np.exp(values(layer.A_log)) * softplus(f_logits + values(layer.dt_bias)))
    y, _, _ = numpy_reference.forward(q, k, v, values(layer.W), f, segment_ids=segment_ids)
    per_head_v = np.repeat(v, n // heads["v"], axis=2)
    y = y + values(layer.D) * per_head_v
    g = np.repeat(g.reshape(b, s, heads["g"], v_dim), n // heads["g"], axis=2)
    gated = (y * silu(g)).reshape(b, s, n * v_dim)
    return rms_norm(gated, values(layer.out_norm.scale), eps) @ values(layer.out_proj.kernel)


def attention_reference(layer, cfg, x, segment_ids):
    b, s, _ = x.shape
    h, hkv, dh = cfg.num_heads, cfg.kv_heads, layer.head_dim
    q = (x @ values(layer.q_proj.kernel)).reshape(b, s, h, dh)
    k = (x @ values(layer.k_proj.kernel)).reshape(b, s, hkv, dh)
    v = (x @ values(layer.v_proj.kernel)).reshape(b, s, hkv, dh)
    # Positions restart at each document start.
    pos = np.zeros((b, s))
    for i in range(b):
        for t in range(1, s):
            same = segment_ids is None or segment_ids[i, t] == segment_ids[i, t - 1]
            pos[i, t] = pos[i, t - 1] + 1 if same else 0
    if cfg.rope:
        half = dh // 2
        freq = cfg.rope_theta ** (-np.arange(half) / half)
        ang = pos[..., None, None] * freq
        def rot(z):
            z1, z2 = z[..., :half], z[..., half:]
            return np.concatenate([z1 * np.cos(ang) - z2 * np.sin(ang),
                                   z2 * np.cos(ang) + z1 * np.sin(ang)], -1)
        q, k = rot(q), rot(k)
    out = np.zeros((b, s, h, dh))
    for i in range(b):
        for head in range(h):
            kv = head // (h // hkv)
            for t in range(s):
                allowed = [u for u in range(t + 1)
                           if segment_ids is None or segment_ids[i, u] == segment_ids[i, t]]
                scores = np.array([q[i, t, head] @ k[i, u, kv] for u in allowed]) / np.sqrt(dh)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[i, t, head] = sum(pi * v[i, u, kv] for pi, u in zip(p, allowed))
    return out.reshape(b, s, h * dh) @ values(layer.o_proj.kernel)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 11, D_MODEL)).astype(np.float32)
    segment_ids = np.array([[0] * 4 + [1] * 7, [3] * 2 + [5] * 7 + [6] * 2], np.int32)
    return x, segment_ids


def test_m2rnn_layer_matches_float64_reference(inputs):
    x, segment_ids = inputs
    config = small_config()
    layer = M2RNN(config, rngs=nnx.Rngs(1))
    # Move W and D away from their init so the test sees them.
    layer.W[...] = layer.W[...] + 0.3 * jax.random.normal(jax.random.key(2), layer.W.shape)
    layer.D[...] = jax.random.normal(jax.random.key(3), layer.D.shape)
    for seg in (None, segment_ids):
        got = np.asarray(apply(layer, jnp.asarray(x), None if seg is None else jnp.asarray(seg)))
        want = m2rnn_layer_reference(layer, config.m2rnn, x.astype(np.float64), seg)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_linear_columns_are_those_columns_of_the_whole_product():
    layer = Linear(6, 9, ("embed", "mixer"), std=1.0, rngs=nnx.Rngs(3), use_bias=True)
    layer.bias[...] = jax.random.normal(jax.random.key(4), (9,))
    x = jax.random.normal(jax.random.key(5), (2, 3, 6))
    got = layer(x, columns=(slice(5, None), slice(0, 2)))
    np.testing.assert_allclose(got, layer(x)[..., np.r_[5:9, 0:2]], rtol=1e-6, atol=1e-6)


def test_m2rnn_projection_in_two_products_equals_one_with_its_gradients():
    config = dataclasses.replace(ModelConfig(), d_model=32, compute_dtype="float32",
                                 m2rnn=M2RNNConfig(num_heads=4, key_dim=8, value_dim=4,
                                                   add_bias=True, backend="scan"))
    layer = M2RNN(config, rngs=nnx.Rngs(7))
    layer.in_proj.bias[...] = jax.random.normal(jax.random.key(8), layer.in_proj.bias.shape)
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.key(9), (2, 5, 32))
    cotangents = [jax.random.normal(k, part.shape) for k, part in zip(
        jax.random.split(jax.random.key(10), 3), layer._split(layer.in_proj(x)))]

    def pulled(two_products, state, x):
        layer = nnx.merge(graphdef, state)
        parts = layer._project(x) if two_products else layer._split(layer.in_proj(x))
        return sum(jnp.vdot(part, ct) for part, ct in zip(parts, cotangents))

    want = jax.value_and_grad(lambda *a: pulled(False, *a), argnums=(0, 1))(state, x)
    got = jax.value_and_grad(lambda *a: pulled(True, *a), argnums=(0, 1))(state, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_m2rnn_layer_with_linear_value_matches_float64_reference(inputs):
    """``value_activation="identity"``: no SiLU on v (into the op and the D residual), q and k
    keep theirs; with a random-normal W as the state-tracking experiment uses."""
    x, segment_ids = inputs
    config = small_config(value_activation="identity", transition_init="normal",
                          transition_scale=0.5)
    layer = M2RNN(config, rngs=nnx.Rngs(1))
    layer.D[...] = jax.random.normal(jax.random.key(3), layer.D.shape)
    silu_layer = M2RNN(small_config(transition_init="normal", transition_scale=0.5),
                       rngs=nnx.Rngs(1))
    silu_layer.D[...] = layer.D[...]
    for seg in (None, segment_ids):
        seg = None if seg is None else jnp.asarray(seg)
        got = np.asarray(apply(layer, jnp.asarray(x), seg))
        want = m2rnn_layer_reference(layer, config.m2rnn, x.astype(np.float64),
                                     None if seg is None else np.asarray(seg))
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
        # Same parameters (same seed, same config otherwise), SiLU on v: a different layer.
        assert np.abs(got - np.asarray(apply(silu_layer, jnp.asarray(x), seg))).max() > 1e-3


def test_attention_matches_float64_reference(inputs):
    x, segment_ids = inputs
    config = small_config()
    layer = Attention(config, rngs=nnx.Rngs(4))
    for seg in (None, segment_ids):
        got = np.asarray(apply(layer, jnp.asarray(x), None if seg is None else jnp.asarray(seg)))
        want = attention_reference(layer, config.attention, x.astype(np.float64), seg)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_rmsnorm_and_swiglu_match_formulas(inputs):
    x, _ = inputs
    config = small_config()
    norm = RMSNorm(D_MODEL, eps=1e-5)
    norm.scale[...] = jax.random.normal(jax.random.key(5), (D_MODEL,))
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))),
                               rms_norm(x.astype(np.float64), values(norm.scale), 1e-5),
                               rtol=1e-5, atol=1e-6)
    mlp = SwiGLU(config, rngs=nnx.Rngs(6))
    want = (silu(x @ values(mlp.gate.kernel)) * (x @ values(mlp.up.kernel))) \
        @ values(mlp.down.kernel)
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_a_norm_folded_into_a_product_equals_the_norm_then_the_product(inputs, dtype, tolerance):
    """``RMSNorm.factored`` into ``Linear`` (bias, float32 output) and ``Embed.attend``, against
    float64 NumPy: the row factor applied after the product changes nothing but rounding."""
    x, _ = inputs
    norm = RMSNorm(D_MODEL, eps=1e-5, dtype=dtype)
    norm.scale[...] = jax.random.normal(jax.random.key(7), (D_MODEL,))
    linear = Linear(D_MODEL, 40, ("embed", "mlp"), std=0.2, rngs=nnx.Rngs(8), use_bias=True,
                    dtype=dtype)
    linear.bias[...] = jax.random.normal(jax.random.key(9), (40,))
    embed = Embed(50, D_MODEL, std=0.2, rngs=nnx.Rngs(10), dtype=dtype)
    x = 3 * x  # rows whose mean square is far from 1: the row factor matters
    normed = rms_norm(x.astype(np.float64), values(norm.scale), 1e-5)
    folded = norm.factored(jnp.asarray(x))
    cases = [(linear(folded), normed @ values(linear.kernel) + values(linear.bias)),
             (linear(folded, out_dtype=jnp.float32),
              normed @ values(linear.kernel) + values(linear.bias)),
             (embed.attend(folded), normed @ values(embed.embedding).T)]
    for got, want in cases:
        assert got.shape == want.shape
        error = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
        assert error < tolerance, error
    assert linear(folded).dtype == dtype and linear(folded, out_dtype=jnp.float32).dtype == \
        jnp.float32


def test_conv_isolates_documents_and_window_keeps_the_last_document(inputs):
    x, segment_ids = inputs
    weight = np.random.default_rng(7).standard_normal((4, D_MODEL)).astype(np.float32)
    got = causal_depthwise_conv(jnp.asarray(x), jnp.asarray(weight), None, jnp.asarray(segment_ids))
    np.testing.assert_allclose(np.asarray(got), causal_conv(x, weight, segment_ids),
                               rtol=1e-5, atol=1e-5)
    window = np.asarray(conv_window(jnp.asarray(x), jnp.asarray(segment_ids), 4))
    np.testing.assert_array_equal(window[0], x[0, -3:])  # row 0's last document has 7 steps
    np.testing.assert_array_equal(window[1, 0], 0 * x[1, -3])  # row 1's has 2 steps
    np.testing.assert_array_equal(window[1, 1:], x[1, -2:])
    short = np.asarray(conv_window(jnp.asarray(x[:, :2]), None, 4))
    np.testing.assert_array_equal(short[:, 0], np.zeros_like(short[:, 0]))
    np.testing.assert_array_equal(short[:, 1:], x[:, :2])


@pytest.mark.parametrize("taps", [1, 2, 4, 6])
def test_conv_decode_steps_continue_the_full_sequence_conv(taps):
    """A prompt's ``conv_cache``, then one ``conv_decode_step`` per step (past several turns of
    the ring): each output equals the full sequence's conv at that step (float64 loop). With 6
    taps the 4-step prompt leaves the window's first slots zero-padded."""
    rng = np.random.default_rng(taps)
    x = rng.normal(size=(2, 13, 5)).astype(np.float32)
    weight, bias = rng.normal(size=(taps, 5)), rng.normal(size=5)
    segment_ids = np.array([[0] * 13, [0] * 2 + [1] * 11])
    want = causal_conv(x.astype(np.float64), weight, segment_ids) + bias
    prompt = 4
    cache = conv_cache(jnp.asarray(x[:, :prompt]), jnp.asarray(segment_ids[:, :prompt]), taps)
    step = jax.jit(conv_decode_step)
    for t in range(prompt, 13):
        out, cache = step(jnp.asarray(x[:, t:t + 1]), cache, jnp.asarray(weight, jnp.float32),
                          jnp.asarray(bias, jnp.float32))
        np.testing.assert_allclose(np.asarray(out[:, 0]), want[:, t], rtol=1e-5, atol=1e-5,
                                   err_msg=f"step {t}")
    assert cache["conv"].shape == (2, taps, 5) and int(cache["conv_step"]) == 13 - prompt


def test_m2rnn_init_values():
    config = small_config(A_init_min=0.0, A_init_max=16.0)
    layer = M2RNN(config, rngs=nnx.Rngs(8))
    cfg = config.m2rnn
    np.testing.assert_array_equal(values(layer.W),
                                  np.broadcast_to(np.eye(cfg.value_dim), layer.W.shape))
    np.testing.assert_array_equal(values(layer.D), np.ones((cfg.num_heads, cfg.value_dim)))
    assert layer.A_log[...].dtype == jnp.float32 and layer.dt_bias[...].dtype == jnp.float32
    big = dataclasses.replace(config, m2rnn=dataclasses.replace(cfg, num_heads=512,
                                                                num_g_heads=None))
    layer = M2RNN(big, rngs=nnx.Rngs(9))
    a = np.exp(values(layer.A_log))
    assert np.all(a <= 16.0) and np.all(a >= np.finfo(np.float32).tiny)
    assert a.min() < 1.0 and a.max() > 15.0  # spread over [0, 16]
    dt = softplus(values(layer.dt_bias))
    assert np.all(dt >= 1e-3 * (1 - 1e-5)) and np.all(dt <= 0.1 * (1 + 1e-5))
    assert dt.min() < 2e-3 and dt.max() > 0.05
    # The forget gate starts in (0, 1) and near 1 for small A·dt.
    f = np.exp(-a * dt)
    assert np.all((f > 0) & (f < 1))


def test_m2rnn_normal_transition_init():
    """``transition_init="normal"``: every head's W has i.i.d. N(0, (scale / sqrt(V))²)
    entries, a fresh draw per head and per seed; the other parameters keep their init."""
    value_dim, scale = 16, 0.5
    config = small_config(num_heads=8, num_g_heads=None, value_dim=value_dim,
                          transition_init="normal", transition_scale=scale)
    w = values(M2RNN(config, rngs=nnx.Rngs(8)).W)
    assert w.shape == (8, value_dim, value_dim)
    n, std = w.size, scale / np.sqrt(value_dim)
    assert abs(w.mean()) < 5 * std / np.sqrt(n)
    assert abs(w.std() / std - 1) < 0.1  # the estimate's relative error is ~ 1/sqrt(2n) = 1.6%
    assert abs(np.mean(np.abs(w) < std) - 0.6827) < 0.05  # normal, not e.g. uniform (0.577)
    assert all(not np.allclose(w[0], w[h]) for h in range(1, 8))
    np.testing.assert_array_equal(values(M2RNN(config, rngs=nnx.Rngs(8)).W), w)
    assert not np.allclose(values(M2RNN(config, rngs=nnx.Rngs(9)).W), w)
    wide = dataclasses.replace(config, m2rnn=dataclasses.replace(config.m2rnn,
                                                                 transition_scale=2.0))
    np.testing.assert_allclose(values(M2RNN(wide, rngs=nnx.Rngs(8)).W).std() / w.std(), 4.0,
                               rtol=0.15)
    identity = M2RNN(dataclasses.replace(config, m2rnn=dataclasses.replace(
        config.m2rnn, transition_init="identity")), rngs=nnx.Rngs(8))
    np.testing.assert_array_equal(values(identity.W),
                                  np.broadcast_to(np.eye(value_dim), w.shape))


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_mixer_output_shapes_and_dtypes(inputs, compute_dtype):
    x, segment_ids = inputs
    config = small_config(compute_dtype)
    for layer in (M2RNN(config, rngs=nnx.Rngs(0)), Attention(config, rngs=nnx.Rngs(0)),
                  SwiGLU(config, rngs=nnx.Rngs(0))):
        x_in = jnp.asarray(x, compute_dtype)
        out = layer(x_in) if isinstance(layer, SwiGLU) else apply(layer, x_in,
                                                                  jnp.asarray(segment_ids))
        assert out.shape == x.shape and out.dtype == jnp.dtype(compute_dtype)
        assert np.all(np.isfinite(np.asarray(out, np.float32)))
        for p in jax.tree.leaves(nnx.state(layer, nnx.Param)):
            assert p.dtype == jnp.float32  # param_dtype


def test_m2rnn_bf16_close_to_float32(inputs):
    x, segment_ids = inputs
    f32 = M2RNN(small_config("float32"), rngs=nnx.Rngs(10))
    bf16 = M2RNN(small_config("bfloat16"), rngs=nnx.Rngs(10))
    want = np.asarray(apply(f32, jnp.asarray(x), jnp.asarray(segment_ids)))
    got = np.asarray(apply(bf16, jnp.asarray(x, jnp.bfloat16), jnp.asarray(segment_ids)),
                     np.float32)
    assert np.max(np.abs(got - want)) < 0.05 * np.max(np.abs(want))


def test_every_parameter_has_logical_axes_and_decay_flags():
    config = small_config()
    for cls in (M2RNN, Attention, SwiGLU):
        state = nnx.state(cls(config, rngs=nnx.Rngs(0)), nnx.Param)
        axes = nnx.to_pure_dict(logical_axes(state))
        params = nnx.to_pure_dict(state)
        for path, names in jax.tree_util.tree_flatten_with_path(
                axes, is_leaf=lambda a: isinstance(a, tuple))[0]:
            shape = np.shape(dict(jax.tree_util.tree_flatten_with_path(params)[0])[path])
            assert isinstance(names, tuple) and len(names) == len(shape), (path, names)
            assert set(names) <= set(LOGICAL_AXES), (path, names)
    mask = nnx.to_pure_dict(no_decay_mask(nnx.state(M2RNN(config, rngs=nnx.Rngs(0)),
                                                    nnx.Param)))
    assert mask == {"A_log": True, "D": True, "W": False, "conv_weight": False, "dt_bias": True,
                    "in_proj": {"kernel": False}, "out_norm": {"scale": True},
                    "out_proj": {"kernel": False}}


def test_bad_configs_name_the_field():
    cases = [
        (dict(m2rnn=dict(num_heads=6, num_v_heads=4)), "m2rnn.num_v_heads"),
        (dict(m2rnn=dict(num_heads=8, num_q_heads=1, num_k_heads=1, num_v_heads=4,
                         num_f_heads=4, num_w_heads=4)), "m2rnn.num_heads"),
        (dict(m2rnn=dict(backend="cuda")), "m2rnn.backend"),
        (dict(m2rnn=dict(key_dim=0)), "m2rnn.key_dim"),
        (dict(m2rnn=dict(gradient_clipping=-1.0)), "m2rnn.gradient_clipping"),
        (dict(m2rnn=dict(gradient_clipping=float("inf"))), "m2rnn.gradient_clipping"),
        (dict(m2rnn=dict(dt_init_min=0.5, dt_init_max=0.1)), "m2rnn.dt_init_min"),
        (dict(m2rnn=dict(transition_init="orthogonal")), "m2rnn.transition_init"),
        (dict(m2rnn=dict(transition_scale=0.0)), "m2rnn.transition_scale"),
        (dict(m2rnn=dict(value_activation="gelu")), "m2rnn.value_activation"),
        (dict(attention=dict(num_heads=16, num_kv_heads=3)), "attention.num_kv_heads"),
        (dict(d_model=100, attention=dict(num_heads=16)), "attention.num_heads"),
        (dict(compute_dtype="fp8"), "compute_dtype"),
        (dict(layer_pattern=""), "layer_pattern"),
        (dict(mlp=dict(hidden_dim=-3)), "mlp.hidden_dim"),
        (dict(norm_eps=0.0), "norm_eps"),
    ]
    for data, field in cases:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            from_dict(ModelConfig, data)
    # The dataclass checks its own fields too, not only the loader (which checks Literals).
    for field, value in (("transition_init", "orthogonal"), ("transition_scale", -1.0),
                         ("value_activation", "gelu")):
        with pytest.raises(ValueError, match=rf"m2rnn\.{field}"):
            M2RNNConfig(**{field: value})
    with pytest.raises(ConfigError, match="m2rnn.heads_q"):
        from_dict(ModelConfig, {"m2rnn": {"heads_q": 1}})


def test_registry_accepts_new_letters_and_rejects_unknown_ones():
    with pytest.raises(ValueError, match="'Z'"):
        mixer_class("Z")
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("M", SwiGLU)
    with pytest.raises(ValueError, match="one alphabetic character"):
        register_mixer("MM", SwiGLU)
    assert mixer_class("M") is M2RNN and mixer_class("A") is Attention


@pytest.mark.parametrize("taps", [1, 2, 4])
def test_conv_window_keeps_the_last_document_only(taps):
    """The decode history: the last taps-1 inputs of the row's last document (none for taps=1)."""
    x = jax.random.normal(jax.random.key(taps), (2, 6, 3))
    segment_ids = jnp.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 2]])
    window = np.asarray(conv_window(x, segment_ids, taps))
    assert window.shape == (2, taps - 1, 3)
    for row in range(2):
        for j in range(taps - 1):
            t = 6 - (taps - 1) + j
            keep = segment_ids[row, t] == segment_ids[row, -1]
            np.testing.assert_array_equal(window[row, j], np.asarray(x[row, t]) * keep)


def test_auto_attention_takes_cudnn_only_on_a_gpu_for_what_it_supports():
    from m2rnn_jax.layers.attention import attention_implementation

    def pick(dtype=jnp.bfloat16, head_dim=64, seq_len=4096, platform="gpu", capability="9.0"):
        return attention_implementation("auto", dtype, head_dim, seq_len, platform, capability)

    assert pick() == "cudnn" and pick(jnp.float16, 128, capability="8.0") == "cudnn"
    assert pick(jnp.float32) == "xla"
    assert pick(head_dim=100) == "xla" and pick(head_dim=256) == "xla"
    assert pick(seq_len=4095) == "xla"
    assert pick(capability="7.5") == "xla"
    assert pick(platform="cpu") == "xla" and pick(platform="tpu") == "xla"
    for forced in ("xla", "cudnn", None):
        assert attention_implementation(forced, jnp.float32, 7, 3, "gpu", "7.0") == forced
