"""What the op checks and where: value checks under ``jit`` (``value_checks="checkify"``), the
types of its options at trace time, and ``jax_enable_x64`` on every backend (interpret mode
here, and the real GPU/TPU lowerings)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from numpy_reference import relative_error
from m2rnn_jax import m2rnn, ops


def _inputs(seed, batch=2, seq_len=16, heads=(1, 1, 2, 2, 2), key_dim=4, value_dim=4,
            dtype=jnp.float32):
    """Random op arguments ``(q, k, v, w, f, h0)`` and segment ids; heads = (Nq, Nk, Nv, Nf,
    Nw). Forget values in (0.05, 0.95)."""
    nq, nk, nv, nf, nw = heads
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(ks[0], (batch, seq_len, nq, key_dim), dtype)
    k = (0.5 * jax.random.normal(ks[1], (batch, seq_len, nk, key_dim))).astype(dtype)
    v = jax.random.normal(ks[2], (batch, seq_len, nv, value_dim), dtype)
    w = (0.6 * jax.random.normal(ks[3], (nw, value_dim, value_dim))).astype(dtype)
    f = jax.random.uniform(ks[4], (batch, seq_len, nf), dtype, 0.05, 0.95)
    h0 = jax.random.normal(ks[5], (batch, max(heads), key_dim, value_dim))
    seg = jnp.cumsum(jax.random.bernoulli(ks[6], 0.2, (batch, seq_len)), axis=1)
    return (q, k, v, w, f, h0), seg.astype(jnp.int32)


def _loss(*args, segment_ids, **options):
    y, state = m2rnn(*args, 0.5, segment_ids=segment_ids, **options)
    return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(state)


# ---------------------------------------------------------------------------- values under jit


def test_forget_out_of_range_under_jit_is_reported_with_checkify():
    """forget_input = 5 passes jit silently by default (|y| blows up); with
    ``value_checks="checkify"`` a checkified jit(grad) reports it, naming the argument, and
    clean inputs report nothing."""
    args, seg = _inputs(0)
    bad = list(args)
    bad[4] = jnp.full_like(args[4], 5.0)
    grad = jax.grad(functools.partial(_loss, segment_ids=seg, backend="scan",
                                      value_checks="checkify"), argnums=(0, 2, 3, 4))
    checked = checkify.checkify(jax.jit(grad))
    err, _ = checked(*bad)
    assert "forget_input must lie in [0, 1]" in err.get() and "5.0" in err.get()
    with pytest.raises(ValueError, match="forget_input"):
        err.throw()
    err, _ = checked(*args)
    assert err.get() is None
    # The default checks nothing under jit (it costs nothing): the same input runs, y explodes.
    y, _ = jax.jit(lambda *a: m2rnn(*a, backend="scan"))(*bad)
    assert float(jnp.max(jnp.abs(y))) > 1e3
    # A checkify check that nobody functionalizes cannot be staged: jit fails to trace.
    with pytest.raises(ValueError, match="checkify"):
        jax.jit(lambda *a: m2rnn(*a, value_checks="checkify")[0])(*args)


@pytest.mark.parametrize("arg,index", [("query", 0), ("weight", 3), ("input_state", 5)])
def test_non_finite_inputs_propagate_by_default_and_are_reported_with_checkify(arg, index):
    args, _ = _inputs(1)
    bad = list(args)
    bad[index] = bad[index].at[(0,) * bad[index].ndim].set(jnp.nan)
    y, _ = jax.jit(lambda *a: m2rnn(*a, backend="scan"))(*bad)
    assert not bool(jnp.all(jnp.isfinite(y)))  # no check by default: NaN flows through
    run = jax.jit(lambda *a: m2rnn(*a, backend="scan", value_checks="checkify"))
    err, _ = checkify.checkify(run)(*bad)
    assert err.get() is not None and f"{arg} has 1 non-finite values" in err.get()


# ----------------------------------------------------------------------- option types and values


@pytest.mark.parametrize("clip,error", [("1.0", TypeError), (True, TypeError),
                                        (jnp.float32(1.0), TypeError), (-1, ValueError),
                                        (0.0, ValueError), (math.nan, ValueError),
                                        (math.inf, ValueError)])
def test_gradient_clipping_must_be_a_positive_finite_number(clip, error):
    args, _ = _inputs(2)
    with pytest.raises(error, match="gradient_clipping"):
        jax.eval_shape(lambda *a: m2rnn(*a, None, clip, backend="scan"), *args[:5])


@pytest.mark.parametrize("backend", list(ops.BACKEND_MODULES))
@pytest.mark.parametrize("chunk_size,error", [(0, ValueError), (-8, ValueError),
                                              (True, TypeError), (8.0, TypeError),
                                              ("8", TypeError)])
def test_chunk_size_must_be_a_positive_int_on_every_backend(backend, chunk_size, error):
    args, _ = _inputs(3, key_dim=1)
    with pytest.raises(error, match="chunk_size"):
        jax.eval_shape(lambda *a: m2rnn(*a, backend=backend, chunk_size=chunk_size), *args[:5])


def test_integral_options_of_other_types_are_accepted():
    args, _ = _inputs(4)
    want = m2rnn(*args, 1.0, backend="scan", chunk_size=8)
    got = m2rnn(*args, np.float32(1), backend="scan", chunk_size=np.int64(8))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change,error,message", [
    (dict(backend=None), TypeError, "backend must be a string"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(value_checks=True), TypeError, "value_checks must be a string"),
    (dict(value_checks="always"), ValueError, "value_checks must be one of"),
])
def test_backend_and_value_checks_names(change, error, message):
    args, _ = _inputs(5)
    with pytest.raises(error, match=message):
        jax.eval_shape(lambda *a: m2rnn(*a, **change), *args[:5])


# -------------------------------------------------------------------------------------- x64

# backend -> (heads (Nq, Nk, Nv, Nf, Nw), K, V, dtype): heads sharing a q/k group (the atomics
# of pallas_gpu), K = 1 for the vector kernels, the shape family of the Mosaic GPU kernels.
# S = 8, one chunk, few heads: interpret mode is slow.
X64_CASES = {
    "scan": ((1, 1, 2, 2, 2), 4, 4, jnp.float32),
    "pallas_gpu": ((1, 1, 2, 2, 1), 4, 4, jnp.float32),
    "pallas_gpu_vector": ((1, 1, 2, 2, 2), 1, 4, jnp.float32),
    "pallas_tpu": ((1, 1, 2, 2, 2), 4, 4, jnp.float32),
    "mosaic_gpu": ((1, 1, 1, 1, 1), 64, 16, jnp.bfloat16),
}


@pytest.mark.parametrize("backend", list(X64_CASES))
def test_x64_mode_gives_the_same_results(backend):
    """With ``jax_enable_x64`` the op runs on float32 (bfloat16) inputs on every backend and
    gives what the scan gives without x64: y, the final state and every gradient, in the same
    dtypes (the kernels' own agreement with the scan: tests/test_kernel_*.py). Segment resets
    and active clipping (c = 0.5) included."""
    heads, key_dim, value_dim, dtype = X64_CASES[backend]
    args, seg = _inputs(6, 1, 8, heads, key_dim, value_dim, dtype)

    def outputs_and_grads(backend):
        def op(*xs):
            return m2rnn(*xs, 0.5, segment_ids=seg, backend=backend, chunk_size=8)

        out, vjp = jax.vjp(op, *args)
        cotangents = (out[0] * 3, out[1] + 1)
        return [*out, *vjp(cotangents)]

    want = jax.jit(outputs_and_grads, static_argnums=0)("scan")
    with jax.enable_x64(True):
        got = jax.jit(outputs_and_grads, static_argnums=0)(backend)
    tolerance = 1e-2 if dtype == jnp.bfloat16 else 1e-4
    for name, g, w in zip(("y", "state", "dq", "dk", "dv", "dw", "df", "dh0"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert relative_error(g, w) < tolerance, name


def _exported_grad(backend, platform, args, seg):
    fn = jax.jit(jax.grad(functools.partial(_loss, backend=backend), argnums=tuple(range(6))))
    return jax.export.export(
        fn, platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*args, segment_ids=seg).mlir_module()


def test_x64_mode_lowers_for_gpus_and_tpus(lowered_for_an_h200):
    """The kernels' real lowerings (not the interpreters) under ``jax_enable_x64``: Triton for
    an H200 (both Triton kernels), Mosaic GPU for sm_90, Mosaic TPU, through the op's fwd+bwd:
    no int32/int64 mix in the index arithmetic."""
    spec = jax.ShapeDtypeStruct

    def shapes(heads, key_dim, value_dim, dtype, batch=2, seq_len=32):
        nq, nk, nv, nf, nw = heads
        return [spec((batch, seq_len, nq, key_dim), dtype),
                spec((batch, seq_len, nk, key_dim), dtype),
                spec((batch, seq_len, nv, value_dim), dtype),
                spec((nw, value_dim, value_dim), dtype), spec((batch, seq_len, nf), dtype),
                spec((batch, max(heads), key_dim, value_dim), jnp.float32)]

    seg = spec((2, 32), jnp.int32)
    with jax.enable_x64(True):
        gpu = _exported_grad("pallas_gpu", "cuda", shapes((1, 1, 2, 2, 2), 4, 4, jnp.float32), seg)
        assert gpu.count("__gpu$xla.gpu.triton") == 2
        vector = _exported_grad("pallas_gpu_vector", "cuda",
                                shapes((1, 1, 2, 2, 2), 1, 4, jnp.float32), seg)
        assert vector.count("__gpu$xla.gpu.triton") == 2
        mosaic = _exported_grad("mosaic_gpu", "cuda",
                                shapes((1, 1, 2, 2, 2), 64, 16, jnp.bfloat16), seg)
        assert mosaic.count("custom_call @mosaic_gpu") == 2
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
            device_kind="TPU v5e", num_cores=1, platform="tpu"))
        with jax.sharding.use_abstract_mesh(mesh):
            tpu_module = _exported_grad("pallas_tpu", "tpu",
                                        shapes((1, 2, 2, 2, 1), 4, 4, jnp.float32), seg)
        assert tpu_module.count("tpu_custom_call") == 2
