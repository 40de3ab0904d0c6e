"""The Triton-lowered kernels (``pallas_gpu``; interpret mode off the GPU) against the scan backend.

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
from pallas_kernels.m2rnn import gpu, triton_common

F32_TOLERANCE = 1e-4
BF16_TOLERANCE = 1e-2
# bfloat16 inputs, float32 arithmetic in the scan: the kernels' tensor-core dots on hi + lo bf16
# parts of the float32 operands (~16 bits) stay within this, dots on one bf16 part do not.
SPLIT_TOLERANCE = 2e-3


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


def _contract_outputs(backend, args, keep, cot, clip, chunk_size=8):
    """y, the final state and every gradient from a backend module called as the op calls it
    (``forward`` saving checkpoints, then ``backward`` from them)."""
    q, k, v, w, f, h0 = args
    y, h_final, ckpt = backend.forward(q, k, v, w, f, h0, keep, chunk_size=chunk_size,
                                       save_checkpoints=True)
    grads = backend.backward(q, k, v, w, f, h0, keep, ckpt, *cot, gradient_clipping=clip,
                             chunk_size=chunk_size)
    return [y, h_final, *grads]


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
    _assert_close(got, want, SPLIT_TOLERANCE)


def test_backend_contract_matches_reference_backend():
    """The kernels called as the op calls them (the backend contract), against the scan's
    forward and backward: heads sharing one q/k group (float32 atomics across programs), a
    reset mask, active clipping, two chunks."""
    args, _, cot = _problem(11, 2, 16, (1, 1, 8, 8, 8), 6, 5)
    keep = jnp.ones((2, 16)).at[0, 5].set(0.0).at[1, 11].set(0.0)
    _assert_close(_contract_outputs(gpu, args, keep, cot, 0.5),
                  _contract_outputs(reference, args, keep, cot, 0.5), F32_TOLERANCE)


def test_float32_weight_with_bfloat16_inputs():
    """A float32 weight with bfloat16 inputs: the split dots then use the weight's lo part too
    (a bf16 weight has none); as close to the scan as the bf16 weight's case."""
    (q, k, v, w, f, h0), _, cot = _problem(13, 2, 32, (1, 1, 4, 4, 4), 16, 16, jnp.bfloat16)
    args = (q, k, v, 0.6 * jax.random.normal(jax.random.PRNGKey(14), w.shape), f, h0)
    keep = jnp.ones((2, 32)).at[1, 9].set(0.0)
    got = _contract_outputs(gpu, args, keep, cot, 1.0)
    want = _contract_outputs(reference, args, keep, cot, 1.0)
    assert got[5].dtype == jnp.float32  # dW in the weight's dtype
    # y in float32 from the state would hide nothing; compare the bf16 outputs as given.
    _assert_close([got[0].astype(jnp.float32), *got[1:]],
                  [want[0].astype(jnp.float32), *want[1:]], SPLIT_TOLERANCE)


@pytest.mark.parametrize("b_is_bf16", [False, True])
def test_split_dot_against_float64(b_is_bf16):
    """``triton_common.dot(..., "split")``: hi·hi + lo·hi (+ hi·lo) of the bf16 parts is within
    about 2⁻¹⁶ of the float64 product, where one bf16 part is off by about 2⁻⁸."""
    a = jax.random.normal(jax.random.PRNGKey(15), (16, 16))
    b = jax.random.normal(jax.random.PRNGKey(16), (16, 16))
    if b_is_bf16:
        b = b.astype(jnp.bfloat16).astype(jnp.float32)
    want = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    split = triton_common.dot(a, b, "split", b_is_bf16=b_is_bf16)
    one_part = triton_common.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                                 jax.lax.Precision.DEFAULT)
    assert relative_error(split, want) < 2e-5
    assert relative_error(one_part, want) > 1e-3


def test_chunk_size_choice_and_errors():
    assert gpu.choose_chunk_size(4096, None) == gpu.DEFAULT_CHUNK_SIZE
    assert gpu.choose_chunk_size(13, None) == 16  # rounded up to the chunk quantum, not 64
    assert gpu.choose_chunk_size(4096, 128) == 128
    assert gpu.choose_chunk_size(100, 12) == 16  # a request is rounded up, not refused
    (q, k, v, w, f, h0), _, _ = _problem(17, 1, 16, (1, 1, 2, 2, 2), 4, 4)
    with pytest.raises(ValueError, match="chunk_size 4 is not a size the pallas_gpu kernels"):
        gpu.forward(q, k, v, w, f, h0, None, chunk_size=4, save_checkpoints=False)
    with pytest.raises(ValueError, match="dividing S = 16"):
        gpu.forward(q, k, v, w, f, h0, None, chunk_size=24, save_checkpoints=False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_op_lowers_to_triton_for_an_h200(lowered_for_an_h200, dtype):
    """The kernels as the GPU compiles them (not the interpreter): the op's fwd+bwd lowers to
    two Triton custom calls for an H200 on this CPU machine."""
    spec = jax.ShapeDtypeStruct
    args = [spec((2, 40, 1, 64), dtype), spec((2, 40, 1, 64), dtype),
            spec((2, 40, 4, 16), dtype), spec((4, 16, 16), dtype), spec((2, 40, 4), dtype),
            spec((2, 4, 64, 16), jnp.float32)]

    def loss(*xs, segment_ids):
        y, h = m2rnn(*xs, 1.0, segment_ids=segment_ids, backend="pallas_gpu")
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
    text = grad.trace(*args, segment_ids=spec((2, 40), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2
