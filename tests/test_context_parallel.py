"""Context and tensor parallelism placed by the layers (m2rnn_jax.parallel) against the unsplit
computations, on the 8 simulated CPU devices: the M²RNN recurrence (pipelined over context
shards), the causal conv, attention, and the M2RNN and Attention layers."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.config import AttentionConfig, M2RNNConfig, MLPConfig, ModelConfig
from m2rnn_jax.layers import Attention, M2RNN, causal_depthwise_conv
from m2rnn_jax.ops import m2rnn
from m2rnn_jax.parallel import MeshAxes
from m2rnn_jax.parallel.context import sharded_attention, sharded_causal_conv
from m2rnn_jax.parallel.recurrence import (microbatch_count, pipeline_idle_fraction,
                                           pipeline_idle_fraction_for, sharded_m2rnn)
from train.config import MeshConfig
from train.sharding import make_mesh, model_axes

B, S, N, K, V = 8, 32, 4, 8, 4
MESHES = {"data2_context4": dict(data=2, context=4),
          "fsdp2_tensor2_context2": dict(fsdp=2, tensor=2, context=2),
          "data8": dict(data=8)}


@functools.cache
def mesh_axes(name, microbatches=4):
    axes = model_axes(make_mesh(MeshConfig(**MESHES[name])))
    return dataclasses.replace(axes, pipeline_microbatches=microbatches)


def assert_close(got, want, tol=2e-5, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


def packed_segment_ids():
    """Rows whose documents cross shard boundaries (8 or 16 steps per shard), start exactly at
    one (steps 8, 16, 24), or run through the whole row."""
    starts = {0: [], 1: [8], 2: [5, 20], 3: [16], 4: [3, 11, 12, 29], 5: [1, 31], 6: [15, 17],
              7: [9, 24]}
    ids = np.zeros((B, S), np.int32)
    for row, row_starts in starts.items():
        for start in row_starts:
            ids[row, start:] += 1
    return jnp.asarray(ids + 3 * np.arange(B)[:, None])  # ids differ between rows too


def recurrence_inputs(seed, num_q_heads=1, num_k_heads=1):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    q, k, v = normal(B, S, num_q_heads, K), normal(B, S, num_k_heads, K), normal(B, S, N, V)
    w = jnp.eye(V, dtype=jnp.float32) + 0.1 * normal(N, V, V)
    f = jax.nn.sigmoid(normal(B, S, N) + 1.0)
    h0 = 0.3 * normal(B, N, K, V)
    cotangents = (normal(B, S, N, V), normal(B, N, K, V))
    return (q, k, v, w, f, h0), cotangents


def value_and_grads(op, args, cotangents):
    """``((loss, (y, final_state)), gradients in every input)`` of
    loss = <y, dy> + <final_state, dh>."""
    def loss(*args):
        y, final_state = op(*args)
        return jnp.sum(y * cotangents[0]) + jnp.sum(final_state * cotangents[1]), (y, final_state)
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)


# --- the recurrence ------------------------------------------------------------------------

@pytest.mark.parametrize("mesh,microbatches,clip,num_q_heads", [
    ("data2_context4", 1, None, 1),
    ("data2_context4", 4, 0.05, 1),
    ("fsdp2_tensor2_context2", 2, 0.05, 2),
    ("fsdp2_tensor2_context2", 3, None, 1),  # 3 does not divide 4 local rows: 2 micro-batches
    ("data8", 4, 0.05, 1),
])
def test_split_recurrence_matches_unsplit_op(mesh, microbatches, clip, num_q_heads):
    axes = mesh_axes(mesh, microbatches)
    args, cotangents = recurrence_inputs(1, num_q_heads=num_q_heads, num_k_heads=2)
    op = dict(segment_ids=packed_segment_ids(), backend="scan", chunk_size=4)
    want = unsplit_op_results(clip, num_q_heads)
    got = value_and_grads(lambda *a: sharded_m2rnn(*a, clip, axes=axes, **op), args, cotangents)
    (loss, (y, final_state)), grads = got
    (loss_ref, (y_ref, final_ref)), grads_ref = want
    assert_close(loss, loss_ref, what="loss")
    assert_close(y, y_ref, what="y")
    assert_close(final_state, final_ref, what="final state")
    for name, g, w in zip(("q", "k", "v", "w", "f", "input_state"), grads, grads_ref):
        assert_close(g, w, what=f"d{name}")
    if clip is not None and mesh == "data2_context4":
        # The clamp is active on these inputs: without it the gradients differ.
        unclipped = unsplit_op_results(None, num_q_heads)
        assert float(np.abs(np.asarray(unclipped[1][3]) - np.asarray(want[1][3])).max()) > 1e-2


@functools.cache
def unsplit_op_results(clip, num_q_heads):
    """``value_and_grads`` of the unsplit op on the inputs of the split-recurrence test."""
    args, cotangents = recurrence_inputs(1, num_q_heads=num_q_heads, num_k_heads=2)
    op = dict(segment_ids=packed_segment_ids(), backend="scan", chunk_size=4)
    return value_and_grads(lambda *a: m2rnn(*a, clip, **op), args, cotangents)


def test_batch_only_mesh_is_one_op_call_per_shard():
    args, _ = recurrence_inputs(2)
    jaxpr = str(jax.make_jaxpr(lambda *a: sharded_m2rnn(*a, axes=mesh_axes("data8"),
                                                        backend="scan"))(*args))
    assert "ppermute" not in jaxpr and "shard_map" in jaxpr


def test_head_count_the_tensor_axis_cannot_split_is_an_error():
    axes = mesh_axes("fsdp2_tensor2_context2")
    q = jnp.zeros((B, S, 3, K))
    v = jnp.zeros((B, S, 6, V))
    with pytest.raises(ValueError, match="query has 3 heads"):
        sharded_m2rnn(q, q, v, jnp.zeros((6, V, V)), jnp.zeros((B, S, 6)), axes=axes)
    config = dataclasses.replace(layer_config(), m2rnn=M2RNNConfig(
        num_heads=6, num_q_heads=1, num_k_heads=3, key_dim=K, value_dim=V))
    with pytest.raises(ValueError, match="key has 3 heads"):
        M2RNN(config, rngs=nnx.Rngs(0), axes=axes)


def test_split_recurrence_without_segments_or_initial_state():
    (q, k, v, w, f, _), _ = recurrence_inputs(3)
    axes = mesh_axes("data2_context4", 2)
    got = jax.jit(lambda *a: sharded_m2rnn(*a, axes=axes, backend="scan"))(q, k, v, w, f)
    want = jax.jit(lambda *a: m2rnn(*a, backend="scan"))(q, k, v, w, f)
    for name, g, r in zip(("y", "final state"), got, want):
        assert_close(g, r, what=name)


def test_uneven_sequence_split_is_an_error():
    (q, k, v, w, f, _), _ = recurrence_inputs(3)
    with pytest.raises(ValueError, match="sequence length 30 is not divisible"):
        sharded_m2rnn(q[:, :30], k[:, :30], v[:, :30], w, f[:, :30],
                      axes=mesh_axes("data2_context4"))


def test_pipeline_idle_fraction_counts_idle_ticks():
    for microbatches in (1, 2, 4, 7):
        for shards in (1, 2, 4, 8):
            ticks = microbatches + shards - 1
            idle = sum(not 0 <= tick - shard < microbatches
                       for shard in range(shards) for tick in range(ticks))
            assert pipeline_idle_fraction(microbatches, shards) == pytest.approx(
                idle / (shards * ticks))
    assert [microbatch_count(rows, 4) for rows in (1, 2, 3, 4, 6, 8)] == [1, 2, 3, 4, 3, 4]
    # 8 rows over data=2: 4 local rows, 4 micro-batches, 4 context shards; no context: 0.
    assert pipeline_idle_fraction_for(mesh_axes("data2_context4"), 8) == pytest.approx(3 / 7)
    assert pipeline_idle_fraction_for(mesh_axes("data8"), 8) == 0


def test_pipeline_microbatches_must_be_positive():
    with pytest.raises(ValueError, match="pipeline_microbatches must be a positive integer"):
        MeshAxes(pipeline_microbatches=0)


# --- the conv --------------------------------------------------------------------------------

@pytest.mark.parametrize("mesh", ["data2_context4", "fsdp2_tensor2_context2"])
def test_split_conv_matches_unsplit_conv(mesh):
    axes = mesh_axes(mesh)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(B, S, 6)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
    ids = packed_segment_ids()
    for segment_ids in (None, ids):
        def loss(conv, x, weight, bias):
            return jnp.sum(jnp.sin(conv(x, weight, bias, segment_ids)))
        split = functools.partial(sharded_causal_conv, axes=axes)
        want = jax.jit(jax.value_and_grad(functools.partial(loss, causal_depthwise_conv),
                                          argnums=(0, 1, 2)))(x, weight, bias)
        got = jax.jit(jax.value_and_grad(functools.partial(loss, split),
                                         argnums=(0, 1, 2)))(x, weight, bias)
        assert_close(got[0], want[0], what="loss")
        for name, g, w in zip(("x", "weight", "bias"), got[1], want[1]):
            assert_close(g, w, what=f"d{name}")
        assert_close(jax.jit(split)(x, weight, bias, segment_ids),
                     causal_depthwise_conv(x, weight, bias, segment_ids), what="conv")


def test_conv_history_longer_than_a_shard_is_an_error():
    x = jnp.zeros((B, S, 2))
    with pytest.raises(ValueError, match="fewer than the conv's 9 steps of history"):
        sharded_causal_conv(x, jnp.zeros((10, 2)), axes=mesh_axes("data2_context4"))


# --- attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("mesh,kv_heads", [("data2_context4", 2), ("fsdp2_tensor2_context2", 2),
                                           ("fsdp2_tensor2_context2", 1)])
def test_split_attention_matches_unsplit(mesh, kv_heads):
    axes = mesh_axes(mesh)
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.normal(size=(B, S, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, S, kv_heads, 8)), jnp.float32) for _ in range(2))
    ct = jnp.asarray(rng.normal(size=(B, S, 4, 8)), jnp.float32)
    ids = packed_segment_ids()

    def unsplit(q, k, v):
        mask = (ids[:, :, None] == ids[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v) * ct)

    split = lambda q, k, v: sharded_attention(q, k, v, ids, axes=axes)  # noqa: E731
    want = jax.jit(jax.value_and_grad(functools.partial(loss, unsplit), argnums=(0, 1, 2)))(
        q, k, v)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, split), argnums=(0, 1, 2)))(q, k, v)
    assert_close(got[0], want[0], what="loss")
    for name, g, w in zip("qkv", got[1], want[1]):
        assert_close(g, w, what=f"d{name}")


# --- the layers -----------------------------------------------------------------------------

def layer_config(rope=False):
    return ModelConfig(
        vocab_size=64, d_model=32, layer_pattern="MA",
        m2rnn=M2RNNConfig(num_heads=N, num_q_heads=1, num_k_heads=2, num_g_heads=2, key_dim=K,
                          value_dim=V, add_bias=True, gradient_clipping=0.05, backend="scan",
                          chunk_size=4),
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, rope=rope),
        mlp=MLPConfig(hidden_dim=48), compute_dtype="float32")


def with_axes(layer, layer_class, config, axes):
    """The same parameters in a layer built with ``axes``."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: layer_class(config, rngs=nnx.Rngs(0),
                                                               axes=axes)))
    _, state = nnx.split(nnx.clone(layer))  # jit may replace a layer's arrays: no sharing
    return nnx.merge(graphdef, state)


@nnx.jit
def layer_loss_and_grads(layer, x, segment_ids, cotangent):
    """``(loss, output, cache, parameter gradients)`` of loss = <layer.prefill(x)[0], dy>."""
    def loss(layer):
        y, cache = layer.prefill(x, segment_ids)
        return jnp.sum(y * cotangent), (y, cache)
    (value, (y, cache)), grads = nnx.value_and_grad(loss, has_aux=True)(layer)
    return value, y, cache, nnx.to_pure_dict(grads)


@functools.cache
def unsplit_layer_results(layer_class, rope, seed):
    """The layer built without axes, and its results on ``layer_inputs(seed)``."""
    layer = layer_class(layer_config(rope), rngs=nnx.Rngs(seed))
    return layer, layer_loss_and_grads(layer, *layer_inputs(seed))


def layer_inputs(seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, S, 32)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(B, S, 32)), jnp.float32)
    return x, packed_segment_ids(), cotangent


def assert_layers_agree(layer_class, mesh, seed, rope=False):
    """Returns the split and unsplit layers' caches."""
    layer, want = unsplit_layer_results(layer_class, rope, seed)
    assert not layer.axes.splits_anything
    split_layer = with_axes(layer, layer_class, layer_config(rope), mesh_axes(mesh, 2))
    assert split_layer.axes.context is not None
    got = layer_loss_and_grads(split_layer, *layer_inputs(seed))
    assert_close(got[0], want[0], what="loss")
    assert_close(got[1], want[1], what="output")
    for (path, g), (_, w) in zip(jax.tree_util.tree_leaves_with_path(got[3]),
                                 jax.tree_util.tree_leaves_with_path(want[3]), strict=True):
        assert_close(g, w, what=f"gradient of {jax.tree_util.keystr(path)}")
    return got[2], want[2]


@pytest.mark.parametrize("mesh", ["data2_context4", "fsdp2_tensor2_context2"])
def test_split_m2rnn_layer_matches_unsplit(mesh):
    got_cache, want_cache = assert_layers_agree(M2RNN, mesh, seed=6)
    assert_close(got_cache["state"], want_cache["state"], what="cached state")
    assert_close(got_cache["conv"], want_cache["conv"], what="cached conv window")


@pytest.mark.parametrize("mesh,rope", [("data2_context4", True),
                                       ("fsdp2_tensor2_context2", False),
                                       ("fsdp2_tensor2_context2", True)])
def test_split_attention_layer_matches_unsplit(mesh, rope):
    assert_layers_agree(Attention, mesh, seed=7, rope=rope)
