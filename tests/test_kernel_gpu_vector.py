"""The vector-state GPU kernels (``pallas_gpu_vector``, K = 1; interpret mode off the GPU) against
the scan backend: y, final state and every gradient on fresh random inputs. Batches are not
multiples of the row block, so padded rows are exercised too."""

import jax
import jax.numpy as jnp
import pytest

from numpy_reference import relative_error
from test_kernel_gpu import BF16_TOLERANCE, F32_TOLERANCE, _assert_close, _outputs_and_grads, \
    _problem
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


@pytest.mark.parametrize("options", [
    {"block_rows": 32, "unroll": 2, "subchunk": 1},
    {"subchunk": 4, "float32_dots": "tf32x3"},  # exact dots in interpret mode
    # q, k, f, keep and dq, dk, df rearranged to (N_x, S, Bp), padded rows, exact dots.
    {"scalar_layout": "time_major", "float32_dots": "ieee", "unroll": 2, "subchunk": 2},
])
def test_kernel_options_match_reference_backend(options):
    """Non-default tiling through the backend interface, with a reset mask and clipping."""
    config = gpu_vector.VectorKernelConfig(**options)
    (q, k, v, w, f, h0), _, (dy, dh) = _problem(24, 35, 16, (1, 1, 4, 4, 4), 1, 7)
    keep = jnp.ones((35, 16)).at[0, 5].set(0.0).at[34, 11].set(0.0)
    outs = {}
    for name, backend, kwargs in (("scan", reference, {}),
                                  ("kernel", gpu_vector, {"config": config})):
        y, h_final, ckpt = backend.forward(q, k, v, w, f, h0, keep, chunk_size=8, **kwargs)
        grads = backend.backward(q, k, v, w, f, h0, keep, ckpt, dy, dh, gradient_clipping=0.5,
                                 chunk_size=8, **kwargs)
        outs[name] = [y, h_final, *grads]
    _assert_close(outs["kernel"], outs["scan"], F32_TOLERANCE)


def test_split_dots_stay_close_to_exact_dots():
    """float32 inputs with the bf16 hi/lo-split tensor-core dots: within 1e-4 of the exact
    kernel (about 16 mantissa bits per product), and not identical to it (the option acts)."""
    (q, k, v, w, f, h0), _, (dy, dh) = _problem(25, 16, 32, (1, 1, 2, 2, 2), 1, 16)
    outs = {}
    for dots in ("ieee", "split"):
        config = gpu_vector.VectorKernelConfig(float32_dots=dots)
        y, h_final, ckpt = gpu_vector.forward(q, k, v, w, f, h0, None, chunk_size=8,
                                              config=config)
        grads = gpu_vector.backward(q, k, v, w, f, h0, None, ckpt, dy, dh,
                                    gradient_clipping=1.0, chunk_size=8, config=config)
        outs[dots] = [y, h_final, *grads]
    _assert_close(outs["split"], outs["ieee"], 1e-4)
    assert relative_error(outs["split"][0], outs["ieee"][0]) > 1e-8


def test_errors_and_dispatch(monkeypatch):
    (q, k, v, w, f, h0), _, _ = _problem(26, 2, 8, (1, 1, 2, 2, 2), 2, 4)
    with pytest.raises(ValueError, match="K = 1"):
        gpu_vector.forward(q, k, v, w, f, h0, None, chunk_size=8)
    with pytest.raises(ValueError, match="block_rows"):
        gpu_vector.VectorKernelConfig(block_rows=8)
    with pytest.raises(ValueError, match="float32_dots"):
        gpu_vector.VectorKernelConfig(float32_dots="fp8")
    with pytest.raises(ValueError, match="scalar_layout"):
        gpu_vector.VectorKernelConfig(scalar_layout="column_major")
    with pytest.raises(ValueError, match="chunk_size"):
        gpu_vector.choose_chunk_size(64, 0)
    q1, k1 = q[..., :1], k[..., :1]
    with pytest.raises(ValueError, match="chunk_size must be a multiple of 8"):
        gpu_vector.forward(q1, k1, v, w, f, h0, None, chunk_size=4,
                           config=gpu_vector.VectorKernelConfig(unroll=8))
    # On a GPU, "auto" takes these kernels for K = 1 and the general ones otherwise.
    monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
    assert ops.resolve_backend("auto", q1, k1, v, w, f) == "pallas_gpu_vector"
    assert ops.resolve_backend("auto", q, k, v, w, f) == "pallas_gpu"
    assert ops.resolve_backend("scan", q1, k1, v, w, f) == "scan"


@pytest.mark.parametrize("dtype,scalar_layout", [(jnp.float32, "batch_major"),
                                                  (jnp.bfloat16, "batch_major"),
                                                  (jnp.float32, "time_major")])
def test_kernels_lower_to_triton_for_an_h200(monkeypatch, dtype, scalar_layout):
    """The kernels as the GPU compiles them (not the interpreter): forward and backward (and
    the forward vmapped) lower to Triton custom calls for an H200 on this CPU machine, so an op the Triton lowering lacks
    fails here rather than in device time. (Pallas asks the local GPU for its compute
    capability; there is none here, so the H200's is supplied through that private hook.)"""
    import functools

    from jax._src.pallas.triton import gpu_info, pallas_call_registration

    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info",
                        lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
    monkeypatch.setattr(gpu_vector, "_interpret", lambda: False)
    spec = jax.ShapeDtypeStruct
    batch, seq_len, heads, value_dim, chunk = 40, 24, 4, 5, 8
    qk = spec((batch, seq_len, 1, 1), dtype)
    v = spec((batch, seq_len, heads, value_dim), dtype)
    w = spec((heads, value_dim, value_dim), dtype)
    f = spec((batch, seq_len, heads), dtype)
    h0 = spec((batch, heads, 1, value_dim), jnp.float32)
    keep = spec((batch, seq_len), jnp.float32)
    checkpoints = spec((heads, seq_len // chunk, 48, 16), jnp.float32)  # Bp = 48, Vp = 16
    config = gpu_vector.VectorKernelConfig(scalar_layout=scalar_layout)
    forward = jax.jit(functools.partial(gpu_vector.forward, chunk_size=chunk, config=config))
    backward = jax.jit(functools.partial(gpu_vector.backward, chunk_size=chunk,
                                         gradient_clipping=1.0, config=config))
    # Vmapped over a leading axis too (state tracking trains seeds together that way).
    seeds = jax.jit(jax.vmap(functools.partial(gpu_vector.forward, chunk_size=chunk,
                                               config=config),
                             in_axes=(0, 0, 0, 0, 0, 0, None)))
    two = [spec((2,) + x.shape, x.dtype) for x in (qk, qk, v, w, f, h0)]
    for fn, args in ((forward, (qk, qk, v, w, f, h0, keep)),
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


def test_batch_major_scalars_leave_no_per_token_transposes(monkeypatch):
    """With ``scalar_layout="batch_major"`` (the default) the op's fwd+bwd rearranges nothing
    that has a sequence axis (the time-major q/k/f made XLA transpose the layer's whole q|k|v
    tensor in the S5 train step; RESULTS.md); time-major scalars do."""
    (q, k, v, w, f, h0), _, (dy, _) = _problem(27, 24, 40, (1, 1, 4, 4, 4), 1, 5)

    def loss(q, k, v, w, f):
        return jnp.sum(ops.m2rnn(q, k, v, w, f, h0, 1.0, backend="pallas_gpu_vector")[0] * dy)

    counts = {}
    for layout in ("time_major", "batch_major"):
        monkeypatch.setattr(gpu_vector, "DEFAULT_CONFIG",
                            gpu_vector.VectorKernelConfig(scalar_layout=layout))
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, w, f)
        counts[layout] = _per_token_transposes(jaxpr.jaxpr, 40)
    assert counts["time_major"] > 0 and counts["batch_major"] == 0, counts
