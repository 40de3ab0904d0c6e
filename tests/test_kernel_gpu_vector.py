"""The vector-state GPU kernels (``pallas_gpu_vector``, K = 1; interpret mode off the GPU) against
the scan backend: y, final state and every gradient on fresh random inputs. Batches are not
multiples of the row block, so padded rows are exercised too."""

import jax
import jax.numpy as jnp
import pytest

from numpy_reference import relative_error
from test_kernel_gpu import BF16_TOLERANCE, F32_TOLERANCE, _assert_close, _contract_outputs, \
    _outputs_and_grads, _problem
from m2rnn_jax import ops, reference
from pallas_kernels.m2rnn import gpu_vector

# (heads (Nq, Nk, Nv, Nf, Nw), V, S, batch, chunk_size, initial_state, clip, segments)
F32_CASES = {
    # The paper's grouping (q and k shared by all heads), odd V padded to 16, S = 21 padded to
    # the chunk of 8, 20 rows = a full block of 16 and a padded one, active clipping.
    "shared_qk_odd_v_clip": ((1, 1, 4, 4, 4), 5, 21, 20, 8, True, 0.3, False),
    # Mixed head counts (q in 2 groups, v/f/w shared by pairs or triples), segments, three rows
    # in one padded block, no initial state, the backend's default chunk.
    "mixed_groups_segments": ((2, 1, 6, 3, 2), 16, 16, 3, None, False, None, True),
}


@pytest.mark.parametrize("case", list(F32_CASES))
def test_float32_matches_scan(case):
    heads, value_dim, seq_len, batch, chunk, initial_state, clip, segments = F32_CASES[case]
    args, seg, cot = _problem(20 + list(F32_CASES).index(case), batch, seq_len, heads, 1,
                              value_dim, initial_state=initial_state, segments=segments)
    want = _outputs_and_grads("scan", args, seg, cot, clip)
    got = _outputs_and_grads("pallas_gpu_vector", args, seg, cot, clip, chunk_size=chunk)
    _assert_close(got, want, F32_TOLERANCE)
    if clip is not None:
        # The clipping case must actually clip: without it the gradients differ.
        unclipped = _outputs_and_grads("scan", args, seg, cot, None)
        assert relative_error(unclipped[3], want[3]) > 1e-2  # dk


def test_bfloat16_matches_scan():
    args, seg, cot = _problem(23, 18, 64, (1, 1, 4, 4, 4), 1, 16, jnp.bfloat16, segments=True)
    want = _outputs_and_grads("scan", args, seg, cot, 1.0)
    got = _outputs_and_grads("pallas_gpu_vector", args, seg, cot, 1.0)
    assert got[0].dtype == jnp.bfloat16
    _assert_close(got, want, BF16_TOLERANCE)


def test_backend_contract_matches_reference_backend():
    """The kernels called as the op calls them (the backend contract): 35 rows (two full blocks
    and a padded one), a reset mask, active clipping, two chunks."""
    args, _, cot = _problem(24, 35, 16, (1, 1, 4, 4, 4), 1, 7)
    keep = jnp.ones((35, 16)).at[0, 5].set(0.0).at[34, 11].set(0.0)
    _assert_close(_contract_outputs(gpu_vector, args, keep, cot, 0.5),
                  _contract_outputs(reference, args, keep, cot, 0.5), F32_TOLERANCE)


def test_errors_and_dispatch(monkeypatch):
    (q, k, v, w, f, h0), _, _ = _problem(26, 2, 8, (1, 1, 2, 2, 2), 2, 4)
    with pytest.raises(ValueError, match="K = 1"):
        gpu_vector.forward(q, k, v, w, f, h0, None, chunk_size=8, save_checkpoints=False)
    assert gpu_vector.supports(q, k, v, w, f, h0) == "needs K = 1 (got K = 2)"
    assert gpu_vector.supports(q[..., :1], k[..., :1], v, w, f, h0[:, :, :1]) is None
    assert gpu_vector.choose_chunk_size(20, None) == 20
    assert gpu_vector.choose_chunk_size(20, 7) == 7  # any size runs
    with pytest.raises(ValueError, match="dividing S = 8"):
        gpu_vector.forward(q[..., :1], k[..., :1], v, w, f, h0[:, :, :1], None, chunk_size=3,
                           save_checkpoints=False)
    q1, k1 = q[..., :1], k[..., :1]
    # On a GPU, "auto" takes these kernels for K = 1 and the general ones for this other shape.
    monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
    assert ops.resolve_backend("auto", q1, k1, v, w, f) == "pallas_gpu_vector"
    assert ops.resolve_backend("auto", q, k, v, w, f) == "pallas_gpu"
    assert ops.resolve_backend("scan", q1, k1, v, w, f) == "scan"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_triton_for_an_h200(lowered_for_an_h200, dtype):
    """The kernels as the GPU compiles them (not the interpreter): forward and backward (and
    the forward vmapped) lower to Triton custom calls for an H200 on this CPU machine, so an op
    the Triton lowering lacks fails here rather than on the GPU."""
    import functools

    spec = jax.ShapeDtypeStruct
    batch, seq_len, heads, value_dim, chunk = 40, 24, 4, 5, 8
    qk = spec((batch, seq_len, 1, 1), dtype)
    v = spec((batch, seq_len, heads, value_dim), dtype)
    w = spec((heads, value_dim, value_dim), dtype)
    f = spec((batch, seq_len, heads), dtype)
    h0 = spec((batch, heads, 1, value_dim), jnp.float32)
    keep = spec((batch, seq_len), jnp.float32)
    checkpoints = spec((heads, seq_len // chunk, 48, 16), jnp.float32)  # Bp = 48, Vp = 16
    forward = functools.partial(gpu_vector.forward, chunk_size=chunk, save_checkpoints=True)
    backward = jax.jit(functools.partial(gpu_vector.backward, chunk_size=chunk,
                                         gradient_clipping=1.0))
    # Vmapped over a leading axis too (state tracking trains seeds together that way).
    seeds = jax.jit(jax.vmap(forward, in_axes=(0, 0, 0, 0, 0, 0, None)))
    two = [spec((2,) + x.shape, x.dtype) for x in (qk, qk, v, w, f, h0)]
    for fn, args in ((jax.jit(forward), (qk, qk, v, w, f, h0, keep)),
                     (backward, (qk, qk, v, w, f, h0, keep, checkpoints, v, h0)),
                     (seeds, (*two, None))):
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1


def _per_token_transposes(jaxpr, seq_len):
    """Transposes outside the kernels of arrays with a sequence axis, in a jaxpr and its
    sub-jaxprs."""
    found = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            continue
        if eqn.primitive.name == "transpose" and seq_len in eqn.outvars[0].aval.shape:
            found += 1
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found += _per_token_transposes(inner, seq_len)
    return found


def test_op_leaves_no_per_token_transposes():
    """The per-head scalars stay in the op's (B, S, N_x) layout, so the op's fwd+bwd rearranges
    nothing that has a sequence axis (time-major scalars made XLA transpose the S5 model's whole
    q|k|v tensor in its train step: docs/kernels.md); the counter itself finds such a
    transpose."""
    (q, k, v, w, f, h0), _, (dy, _) = _problem(27, 24, 40, (1, 1, 4, 4, 4), 1, 5)

    def loss(q, k, v, w, f):
        return jnp.sum(ops.m2rnn(q, k, v, w, f, h0, 1.0, backend="pallas_gpu_vector")[0] * dy)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, w, f)
    assert _per_token_transposes(jaxpr.jaxpr, 40) == 0
    time_major = jax.make_jaxpr(lambda q: jnp.sum(jnp.swapaxes(q, 0, 1) * 2.0))(q)
    assert _per_token_transposes(time_major.jaxpr, 40) == 1
