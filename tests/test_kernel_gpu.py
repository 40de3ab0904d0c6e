"""The GPU Pallas kernels (``pallas_gpu``; interpret mode off the GPU) against the scan backend.

Each case compares y, the final state and every gradient (``jax.vjp`` with random cotangents) on
fresh random inputs. Shapes are tiny because interpret mode is slow; each case packs several
features (odd K/V, groupings, S not a multiple of the chunk, initial state, active clipping,
segments) so that few compilations cover them all.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpy_reference import relative_error
from m2rnn_jax import m2rnn, reference
from pallas_kernels.m2rnn import gpu

F32_TOLERANCE = 1e-4
BF16_TOLERANCE = 1e-2


def _problem(seed, batch, seq_len, heads, key_dim, value_dim, dtype=jnp.float32, *,
             initial_state=True, segments=False):
    """Random op arguments, segment ids and cotangents; heads = (Nq, Nk, Nv, Nf, Nw)."""
    nq, nk, nv, nf, nw = heads
    n = max(heads)
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    q = jax.random.normal(ks[0], (batch, seq_len, nq, key_dim), dtype)
    k = 0.5 * jax.random.normal(ks[1], (batch, seq_len, nk, key_dim), dtype)
    v = jax.random.normal(ks[2], (batch, seq_len, nv, value_dim), dtype)
    w = (0.6 * jax.random.normal(ks[3], (nw, value_dim, value_dim))).astype(dtype)
    f = jax.random.uniform(ks[4], (batch, seq_len, nf), dtype, 0.05, 0.95)
    h0 = jax.random.normal(ks[5], (batch, n, key_dim, value_dim)) if initial_state else None
    seg = None
    if segments:
        seg = jnp.cumsum(jax.random.bernoulli(ks[6], 0.2, (batch, seq_len)), axis=1)
        seg = seg.astype(jnp.int32)
    dy = jax.random.normal(ks[7], (batch, seq_len, n, value_dim), dtype)
    dh = jax.random.normal(ks[8], (batch, n, key_dim, value_dim))
    return (q, k, v, w, f, h0), seg, (dy, dh)


def _outputs_and_grads(backend, args, seg, cotangents, clip, chunk_size=None):
    """[y, final state, d(each differentiable argument)] through the public op."""
    diff_args = tuple(x for x in args if x is not None)

    @jax.jit
    def run(diff_args, seg, cotangents):
        def op(*xs):
            full = list(xs) + [None] * (len(args) - len(xs))
            return m2rnn(*full, clip, segment_ids=seg, backend=backend, chunk_size=chunk_size)

        out, vjp = jax.vjp(op, *diff_args)
        return [*out, *vjp(cotangents)]

    return run(diff_args, seg, cotangents)


def _assert_close(got, want, tolerance):
    names = ["y", "final_state", "dq", "dk", "dv", "dw", "df", "dh0"]
    errors = {name: relative_error(g, w) for name, g, w in zip(names, got, want)}
    assert len(got) == len(want)
    assert max(errors.values()) < tolerance, errors


# (heads (Nq, Nk, Nv, Nf, Nw), K, V, S, chunk_size, initial_state, clip, segments)
F32_CASES = {
    # The paper's grouping (one shared q/k head: dq/dk summed by atomics across programs), odd
    # K and V (padded inside), S = 21 padded to the chunk of 8, clipping active.
    "paper_grouping_odd_kv_clip": ((1, 1, 4, 4, 4), 5, 3, 21, 8, True, 0.3, False),
    # Mixed head counts (q/k expanded to lcm(2, 3) = 6 groups, one program each: plain stores),
    # v/w shared by pairs of heads, packed segments, no initial state, no clipping.
    "mixed_groups_segments": ((2, 3, 6, 6, 3), 16, 8, 16, 8, False, None, True),
    # Values, forget gate and weight shared by all heads; the backend's default chunk (S = 13
    # padded to 16); everything at once: initial state, segments, clipping.
    "shared_value_default_chunk": ((2, 2, 1, 1, 1), 8, 4, 13, None, True, 1.0, True),
}


@pytest.mark.parametrize("case", list(F32_CASES))
def test_float32_matches_scan(case):
    heads, key_dim, value_dim, seq_len, chunk, initial_state, clip, segments = F32_CASES[case]
    args, seg, cot = _problem(list(F32_CASES).index(case), 2, seq_len, heads, key_dim, value_dim,
                              initial_state=initial_state, segments=segments)
    want = _outputs_and_grads("scan", args, seg, cot, clip)
    got = _outputs_and_grads("pallas_gpu", args, seg, cot, clip, chunk_size=chunk)
    _assert_close(got, want, F32_TOLERANCE)
    if clip is not None and case == "paper_grouping_odd_kv_clip":
        # The clipping case must actually clip: without it the gradients differ.
        unclipped = _outputs_and_grads("scan", args, seg, cot, None)
        assert relative_error(unclipped[3], want[3]) > 1e-2  # dk


def test_bfloat16_matches_scan():
    args, seg, cot = _problem(7, 2, 64, (1, 1, 4, 4, 4), 16, 16, jnp.bfloat16, segments=True)
    want = _outputs_and_grads("scan", args, seg, cot, 1.0)
    got = _outputs_and_grads("pallas_gpu", args, seg, cot, 1.0)
    assert got[0].dtype == jnp.bfloat16
    _assert_close(got, want, BF16_TOLERANCE)


def test_kernel_options_match_reference_backend():
    """Non-default tiling through the backend interface: two heads per program (block-diagonal
    W), prefetching, z recomputation, replicated dq/dk atomics, a reset mask."""
    config = gpu.KernelConfig(heads_per_program=2, unroll=4, subchunk=2, prefetch=True,
                              recompute_z=True, qk_replicas=2)
    (q, k, v, w, f, h0), _, (dy, dh) = _problem(11, 2, 16, (1, 1, 8, 8, 8), 6, 5)
    keep = jnp.ones((2, 16)).at[0, 5].set(0.0).at[1, 11].set(0.0)
    chunk = 8
    outs = {}
    for name, backend, kwargs in (("scan", reference, {}), ("kernel", gpu, {"config": config})):
        y, h_final, ckpt = backend.forward(q, k, v, w, f, h0, keep, chunk_size=chunk, **kwargs)
        grads = backend.backward(q, k, v, w, f, h0, keep, ckpt, dy, dh, gradient_clipping=0.5,
                                 chunk_size=chunk, **kwargs)
        outs[name] = [y, h_final, *grads]
    _assert_close(outs["kernel"], outs["scan"], F32_TOLERANCE)


@pytest.mark.parametrize("weight_dtype", [jnp.bfloat16, jnp.float32])
def test_split_dots_match_exact_dots(weight_dtype):
    """bfloat16 inputs with the tensor-core split dots (hi + lo bf16 parts) against the same
    kernel with exact float32 dots: far closer than bf16 rounding (one-part bf16 dots miss this
    bound). A float32 weight with bfloat16 inputs also exercises the weight's lo part."""
    (q, k, v, w, f, h0), _, (dy, dh) = _problem(13, 2, 32, (1, 1, 4, 4, 4), 16, 16,
                                                 jnp.bfloat16)
    w = (0.6 * jax.random.normal(jax.random.PRNGKey(14), w.shape)).astype(weight_dtype)
    keep = jnp.ones((2, 32)).at[1, 9].set(0.0)
    outs = {}
    for split in (False, True):
        config = gpu.KernelConfig(split_dots=split, unroll=4, subchunk=2)
        y, h_final, ckpt = gpu.forward(q, k, v, w, f, h0, keep, chunk_size=8, config=config)
        grads = gpu.backward(q, k, v, w, f, h0, keep, ckpt, dy, dh, gradient_clipping=1.0,
                             chunk_size=8, config=config)
        # y in float32 from the state would hide nothing; compare the bf16 outputs as given.
        outs[split] = [y.astype(jnp.float32), h_final, *grads]
    _assert_close(outs[True], outs[False], 2e-3)


def test_chunk_size_choice_and_errors():
    assert gpu.choose_chunk_size(4096, None) == gpu.DEFAULT_CHUNK_SIZE
    assert gpu.choose_chunk_size(13, None) == 16  # rounded up to the chunk quantum, not 64
    assert gpu.choose_chunk_size(4096, 128) == 128
    with pytest.raises(ValueError, match="chunk_size"):
        gpu.choose_chunk_size(100, 12)
    with pytest.raises(ValueError, match="heads_per_program"):
        gpu.KernelConfig(heads_per_program=3)
    with pytest.raises(ValueError, match="bf16_precision"):
        gpu.KernelConfig(bf16_precision="fp8")
