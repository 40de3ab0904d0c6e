"""The Mosaic TPU kernels (``backend="pallas_tpu"``, interpret mode on CPU) against the scan.

Both backends run through the public op on the same fresh random inputs; y, the final state and
every gradient (``jax.vjp`` with random cotangents) must agree. The cases are tiny because TPU
interpret mode is slow, but each one crosses several kernel paths: odd K/V (padding), S not a
multiple of the chunk, several chunks per 128-lane column block and several column blocks,
heads shared by one group or spread per head, several head blocks, V > 128, clipping, segments.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from m2rnn_jax import m2rnn
from pallas_kernels import platforms
from pallas_kernels.m2rnn import tpu

CASES = {
    # The paper's grouping (one q/k head for all value heads), with odd K and V.
    "paper_grouping_odd_kv": dict(batch=2, seq_len=21, heads=(1, 1, 3, 3, 3), key_dim=5,
                                  value_dim=3, chunk=8, initial_state=True),
    # A small clip, so that clamping changes the gradients, with packed documents.
    "clipping_and_segments": dict(batch=2, seq_len=19, heads=(1, 1, 2, 2, 2), key_dim=8,
                                  value_dim=16, chunk=8, initial_state=True, clip=0.05,
                                  segments=True),
    # One q per head, k shared by pairs, one W for all heads; no initial state.
    "per_head_query_shared_weight": dict(batch=1, seq_len=13, heads=(4, 2, 4, 2, 1), key_dim=6,
                                         value_dim=33, chunk=8, clip=0.5),
    # 12 heads of V=64 make two head blocks; the second k group straddles them.
    "two_head_blocks": dict(batch=1, seq_len=16, heads=(1, 2, 12, 6, 4), key_dim=4,
                            value_dim=64, chunk=8, initial_state=True, segments=True),
    # V > 128 (one head per 256-lane tile) and a chunk of 128 steps.
    "wide_value_long_chunk": dict(batch=1, seq_len=130, heads=(1, 1, 2, 1, 2), key_dim=3,
                                  value_dim=130, chunk=128),
    # bfloat16 inputs; three chunks of 64 over two 128-step column blocks.
    "bfloat16": dict(batch=2, seq_len=150, heads=(1, 1, 2, 2, 2), key_dim=16, value_dim=16,
                     chunk=64, initial_state=True, clip=1.0, segments=True,
                     dtype=jnp.bfloat16),
}


def _make_inputs(rng, case):
    nq, nk, nv, nf, nw = case["heads"]
    batch, seq_len = case["batch"], case["seq_len"]
    key_dim, value_dim = case["key_dim"], case["value_dim"]
    num_heads = max(case["heads"])
    dtype = case.get("dtype", jnp.float32)
    arrays = dict(
        query=rng.standard_normal((batch, seq_len, nq, key_dim)) / np.sqrt(key_dim),
        key=rng.standard_normal((batch, seq_len, nk, key_dim)) / np.sqrt(key_dim),
        value=rng.standard_normal((batch, seq_len, nv, value_dim)),
        weight=np.eye(value_dim) + 0.5 * rng.standard_normal((nw, value_dim, value_dim))
        / np.sqrt(value_dim),
        forget_input=rng.uniform(0.3, 0.98, (batch, seq_len, nf)),
    )
    inputs = {name: jnp.asarray(x, dtype) for name, x in arrays.items()}
    state_shape = (batch, num_heads, key_dim, value_dim)
    inputs["input_state"] = (jnp.asarray(0.5 * rng.standard_normal(state_shape), jnp.float32)
                             if case.get("initial_state") else None)
    segment_ids = None
    if case.get("segments"):
        starts = rng.random((batch, seq_len)) < 0.15
        segment_ids = jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)
    return inputs, segment_ids


# Interpret mode turns each kernel into a large XLA program of host callbacks; optimizing it
# costs more time than it saves on these tiny shapes.
_QUICK_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def _value_and_grads(inputs, segment_ids, cotangents, *, backend, chunk, clip):
    """((y, final_state), {argument name: gradient}) of the op with the given cotangents."""

    def outputs_and_grads(inputs, segment_ids, cotangents):
        def op(differentiable):
            args = {**inputs, **differentiable}
            return m2rnn(args["query"], args["key"], args["value"], args["weight"],
                         args["forget_input"], args["input_state"], clip,
                         segment_ids=segment_ids, backend=backend, chunk_size=chunk)

        differentiable = {name: x for name, x in inputs.items() if x is not None}
        outputs, vjp = jax.vjp(op, differentiable)
        return outputs, vjp(cotangents)[0]

    args = (inputs, segment_ids, cotangents)
    return jax.jit(outputs_and_grads).lower(*args).compile(_QUICK_COMPILE)(*args)


def _relative_error(got, want):
    got, want = (np.asarray(x, np.float64) for x in (got, want))
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_scan_backend(name):
    case = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    inputs, segment_ids = _make_inputs(rng, case)
    num_heads = max(case["heads"])
    y_shape = (case["batch"], case["seq_len"], num_heads, case["value_dim"])
    cotangents = (jnp.asarray(rng.standard_normal(y_shape), inputs["value"].dtype),
                  jnp.asarray(rng.standard_normal(y_shape[:1] + (num_heads, case["key_dim"],
                                                                 case["value_dim"])),
                              jnp.float32))
    run = dict(chunk=case["chunk"], clip=case.get("clip"))
    (y, state), grads = _value_and_grads(inputs, segment_ids, cotangents, backend="pallas_tpu",
                                         **run)
    (y_ref, state_ref), grads_ref = _value_and_grads(inputs, segment_ids, cotangents,
                                                     backend="scan", **run)

    tolerance = 1e-2 if case.get("dtype") == jnp.bfloat16 else 1e-4
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    errors = {"y": _relative_error(y, y_ref), "final_state": _relative_error(state, state_ref)}
    for grad_name, grad in grads.items():
        assert grad.shape == grads_ref[grad_name].shape, grad_name
        assert grad.dtype == grads_ref[grad_name].dtype, grad_name
        errors[grad_name] = _relative_error(grad, grads_ref[grad_name])
    assert all(error < tolerance for error in errors.values()), errors

    if name == "clipping_and_segments":
        # The clip must be active: without it the scan's gradients differ clearly.
        _, unclipped = _value_and_grads(inputs, segment_ids, cotangents, backend="scan",
                                        chunk=case["chunk"], clip=None)
        assert _relative_error(grads["input_state"], unclipped["input_state"]) > 100 * tolerance


@pytest.mark.parametrize("device_kind, heads", [("TPU v5e", (1, 1, 84, 84, 84)),
                                                ("TPU v6e", (1, 1, 84, 84, 84)),
                                                ("TPU v5e", (84, 42, 84, 84, 1))])
def test_kernels_lower_to_mosaic(monkeypatch, device_kind, heads):
    """The compiled (not interpreted) kernels pass Pallas's Mosaic lowering at the paper's
    shape; Mosaic's own compiler passes need a TPU and are not run here."""
    monkeypatch.setattr(platforms, "interpret", lambda platform: False)
    batch, seq_len, num_heads, key_dim, value_dim = 2, 256, 84, 64, 16
    nq, nk, nv, nf, nw = heads
    shapes = [(batch, seq_len, nq, key_dim), (batch, seq_len, nk, key_dim),
              (batch, seq_len, nv, value_dim), (nw, value_dim, value_dim),
              (batch, seq_len, nf), (batch, num_heads, key_dim, value_dim)]
    args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16 if i < 5 else jnp.float32)
            for i, shape in enumerate(shapes)]
    segment_ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

    def loss(*args):
        *tensors, segment_ids = args
        y, state = m2rnn(*tensors, 1.0, segment_ids=segment_ids, backend="pallas_tpu")
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state)

    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind=device_kind, num_cores=1, platform="tpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(jax.jit(jax.grad(loss, argnums=tuple(range(6)))),
                                     platforms=["tpu"])(*args, segment_ids)
    assert exported.mlir_module().count("tpu_custom_call") == 2  # forward and backward


def test_choose_chunk_size_rounds_to_whole_column_blocks():
    assert tpu.choose_chunk_size(1000, None) == tpu.DEFAULT_CHUNK_SIZE
    assert tpu.choose_chunk_size(5, None) == 8
    assert tpu.choose_chunk_size(1000, 24) == 32
    assert tpu.choose_chunk_size(1000, 100) == 128
    assert tpu.choose_chunk_size(1000, 300) == 384
    assert tpu.choose_chunk_size(21, 64) == 32  # no longer than S needs
    assert tpu.choose_chunk_size(1000, 5) == 8
    assert tpu.choose_chunk_size(1000, 48) == 64
    args = [jnp.zeros(shape) for shape in ((1, 48, 1, 8), (1, 48, 1, 8), (1, 48, 2, 16),
                                           (2, 16, 16), (1, 48, 2), (1, 2, 8, 16))]
    for chunk in (24, 96):  # multiples of 8, but 128-lane column blocks hold no whole chunks
        with pytest.raises(ValueError, match="chunk_size"):
            tpu.forward(*args, None, chunk_size=chunk, save_checkpoints=False)
