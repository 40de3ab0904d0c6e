"""The Mosaic GPU kernels (interpret mode off the GPU) against the scan backend.

The Mosaic GPU interpreter runs the kernels' TMA copies, barriers, SMEM slots and layouts; its
wgmma takes the A operand only from SMEM, so in interpret mode the kernels compute the same
bf16 hi/lo products with float32 accumulation as a dot (the wgmma paths and the inline per-warp
sums are checked by lowering for CUDA, ``test_*_lowers_for_cuda``). Inputs are fresh random
values, never zeros.
"""

import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpy_reference import relative_error
from m2rnn_jax import m2rnn, reference
from m2rnn_jax.segments import keep_mask
from pallas_kernels import platforms
from pallas_kernels.m2rnn import mosaic_gpu
from pallas_kernels.m2rnn.mosaic_gpu import common

# The module (the package's ``forward`` attribute is the function of the same name).
forward_kernel = importlib.import_module("pallas_kernels.m2rnn.mosaic_gpu.forward")

BF16_TOLERANCE = 1e-2


def _problem(seed, batch, seq_len, heads, dtype=jnp.float32, *, zero_state=False):
    """Random backend-interface arguments; heads = (Nq, Nk, Nv, Nf, Nw), K = 64, V = 16."""
    nq, nk, nv, nf, nw = heads
    n = max(heads)
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (batch, seq_len, nq, 64), dtype)
    k = (0.5 * jax.random.normal(ks[1], (batch, seq_len, nk, 64))).astype(dtype)
    v = jax.random.normal(ks[2], (batch, seq_len, nv, 16), dtype)
    w = (0.6 * jax.random.normal(ks[3], (nw, 16, 16))).astype(dtype)
    f = jax.random.uniform(ks[4], (batch, seq_len, nf), dtype, 0.05, 0.95)
    h0 = jnp.zeros((batch, n, 64, 16)) if zero_state else jax.random.normal(
        ks[5], (batch, n, 64, 16))
    return q, k, v, w, f, h0


def _keep(batch, seq_len, seed):
    seg = jnp.cumsum(jax.random.bernoulli(jax.random.PRNGKey(seed), 0.1, (batch, seq_len)), 1)
    return keep_mask(seg.astype(jnp.int32))


# (heads (Nq, Nk, Nv, Nf, Nw), S, checkpoint interval, keep, checkpoints). bfloat16 inputs only
# (float32 raises); the scan runs on the same bf16 inputs with a float32 state.
BF16_CASES = {
    # The paper's grouping, segment resets, checkpoint interval 64 = two 32-step staging blocks.
    "paper_grouping_keep_ckpt64": ((1, 1, 3, 3, 3), 128, 64, True, True),
    # q/k in two groups, one W shared by all heads, no reset mask, no checkpoints.
    "two_qk_groups_shared_w": ((2, 2, 2, 2, 1), 64, 32, False, False),
    # Interval 16 inside 32-step staging blocks: two checkpoints per block.
    "chunk16": ((1, 1, 2, 2, 2), 64, 16, True, True),
    # S not a multiple of 32: staged in 16-step blocks (f and keep slots padded to 32 steps);
    # an interval of 48 in 48-step blocks (padded to 64).
    "chunk16_short_blocks": ((1, 1, 2, 2, 2), 48, 16, True, True),
    "chunk48": ((1, 1, 2, 2, 2), 96, 48, True, True),
}


@pytest.mark.parametrize("case", list(BF16_CASES))
def test_bfloat16_forward_matches_scan(case):
    heads, seq_len, chunk, with_keep, checkpoints = BF16_CASES[case]
    args = _problem(list(BF16_CASES).index(case), 2, seq_len, heads, jnp.bfloat16)
    keep = _keep(2, seq_len, 5) if with_keep else None
    want = reference.forward(*args, keep, chunk_size=chunk, save_checkpoints=True)
    got = mosaic_gpu.forward(*args, keep, chunk_size=chunk, save_checkpoints=checkpoints)
    errors = {"y": relative_error(got[0], want[0]), "h_final": relative_error(got[1], want[1])}
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    assert max(errors.values()) < BF16_TOLERANCE, errors
    if checkpoints:
        # One state per checkpoint interval, (B, S/C, 64, N·16).
        want_ckpt = jnp.transpose(want[2], (1, 0, 3, 2, 4)).reshape(got[2].shape)
        assert got[2].shape == (2, seq_len // chunk, 64, max(heads) * 16)
        assert relative_error(got[2], want_ckpt) < BF16_TOLERANCE
    else:
        assert got[2] is None


def test_hi_lo_split_by_bits_against_float64():
    """hi is x rounded to bf16 by adding 0x8000 to its bits and keeping the upper 16 (ties away
    from zero), lo the rest rounded: hi + lo within 2⁻¹⁶ of x (relative), as close as the split
    by two roundings."""
    x = jax.random.normal(jax.random.PRNGKey(3), (64, 16)) * jnp.logspace(-6, 3, 16)
    hi, lo = common.hi_lo_by_bits(x)
    assert hi.dtype == lo.dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64)
    bits = (np.asarray(x).view(np.uint32) + np.uint32(0x8000)) & np.uint32(0xFFFF0000)
    np.testing.assert_array_equal(np.asarray(hi.astype(jnp.float32)), bits.view(np.float32))
    assert np.all(np.abs(np.asarray(hi, np.float64) - x64) <= 2.0 ** -8 * np.abs(x64))  # rounded
    got = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
    rel = np.abs(got - x64) / np.abs(x64)
    assert rel.max() < 2.0 ** -16
    hi_rn = x.astype(jnp.bfloat16)
    lo_rn = (x - hi_rn.astype(jnp.float32)).astype(jnp.bfloat16)
    got_rn = np.asarray(hi_rn, np.float64) + np.asarray(lo_rn, np.float64)
    rel_rn = np.abs(got_rn - x64) / np.abs(x64)
    assert rel.mean() < 1.2 * rel_rn.mean()


def test_unsupported_shapes_raise():
    q, k, v, w, f, h0 = _problem(0, 1, 16, (1, 1, 2, 2, 2), jnp.bfloat16)
    with pytest.raises(ValueError, match="K must be 64"):
        mosaic_gpu.forward(q[..., :32], k[..., :32], v, w, f, h0[:, :, :32], None,
                           chunk_size=16, save_checkpoints=False)
    with pytest.raises(ValueError, match="chunk_size 12 is not a size the mosaic_gpu kernels"):
        mosaic_gpu.forward(q, k, v, w, f, h0, None, chunk_size=12, save_checkpoints=False)
    assert mosaic_gpu.choose_chunk_size(16, 12) == 16  # the op's request is rounded up
    with pytest.raises(ValueError, match="must be bfloat16"):
        mosaic_gpu.forward(q.astype(jnp.float32), k.astype(jnp.float32),
                           v.astype(jnp.float32), w, f, h0, None, chunk_size=16,
                           save_checkpoints=False)


def test_forward_double_buffer_slots_are_tma_aligned():
    """Every staging length the forward takes (a multiple of 8) gives double-buffered SMEM slots
    (TMA sources and destinations) of whole multiples of 128 bytes, the alignment a TMA copy
    needs: on the GPU a misaligned slot fails with CUDA_ERROR_MISALIGNED_ADDRESS, which the
    interpreter does not check."""
    for stage in range(8, 136, 8):
        slotted = [s for s in forward_kernel.scratch_types(stage, jnp.bfloat16, True, True)
                   if hasattr(s, "shape") and s.shape[0] == 2]
        assert len(slotted) == 6  # q, k, v, f, keep, y
        for s in slotted:
            slot_bytes = math.prod(s.shape[1:]) * jnp.dtype(s.dtype).itemsize
            assert slot_bytes % common.TMA_SMEM_ALIGNMENT == 0, (stage, s.shape, s.dtype)
            assert math.prod(s.shape[1:]) >= stage


def test_forward_lowers_for_cuda(monkeypatch):
    """Lowering for CUDA (no GPU needed): Mosaic GPU's layout inference and dialect lowering run
    in Python at export time (for sm_90 when no GPU is present), which catches unsupported
    layouts and ops, including the register-A wgmma, the inline hi/lo split and the inline
    per-warp y sums that interpret mode does not run. PTX generation and ptxas run only on the
    GPU."""
    monkeypatch.setattr(platforms, "interpret", lambda platform: False)
    sds = jax.ShapeDtypeStruct
    for with_keep in (False, True):
        args = [sds((2, 128, 1, 64), jnp.bfloat16), sds((2, 128, 1, 64), jnp.bfloat16),
                sds((2, 128, 3, 16), jnp.bfloat16), sds((3, 16, 16), jnp.bfloat16),
                sds((2, 128, 3), jnp.bfloat16), sds((2, 3, 64, 16), jnp.float32),
                sds((2, 128), jnp.float32) if with_keep else None]
        # 64: 32-step blocks; 16: 16-step blocks, f and keep copied into padded slots.
        for chunk in (64, 16):
            fn = functools.partial(mosaic_gpu.forward, chunk_size=chunk,
                                   save_checkpoints=with_keep)
            exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
            assert "mosaic_gpu" in exported.mlir_module()


# Backward: (heads, S, checkpoint interval, keep, gradient clipping)
BWD_CASES = {
    # The paper's grouping, resets, random initial state, clipping active (c = 0.5).
    "paper_grouping_keep_clip": ((1, 1, 2, 2, 2), 64, 32, True, 0.5),
    # Two q/k groups, one shared W, no resets, no clipping, one chunk of 64.
    "two_qk_groups_noclip": ((2, 2, 2, 2, 1), 64, 64, False, None),
    # The default interval (16) over three chunks, with and without resets.
    "chunk16_keep_clip": ((1, 1, 3, 3, 3), 48, 16, True, 1.0),
    "chunk16_no_keep": ((1, 1, 2, 2, 2), 32, 16, False, None),
}


def _backward_problem(case, seed, keep_seed, cotangent_seed):
    """Random bf16 inputs and cotangents for a BWD_CASES case and the scan's gradients."""
    heads, seq_len, chunk, with_keep, clip = BWD_CASES[case]
    n = max(heads)
    args = _problem(seed, 2, seq_len, heads, jnp.bfloat16)
    keep = _keep(2, seq_len, keep_seed) if with_keep else None
    ks = jax.random.split(jax.random.PRNGKey(cotangent_seed), 2)
    dy = jax.random.normal(ks[0], (2, seq_len, n, 16), jnp.bfloat16)
    dh = jax.random.normal(ks[1], (2, n, 64, 16))
    _, _, ckpt = reference.forward(*args, keep, chunk_size=chunk, save_checkpoints=True)
    want = reference.backward(*args, keep, ckpt, dy, dh, gradient_clipping=clip,
                              chunk_size=chunk)
    return args, keep, dy, dh, want


@pytest.mark.parametrize("case", list(BWD_CASES))
def test_bfloat16_backward_matches_scan(case):
    heads, seq_len, chunk, with_keep, clip = BWD_CASES[case]
    args, keep, dy, dh, want = _backward_problem(case, 20 + list(BWD_CASES).index(case), 7, 11)
    _, _, ckpt = mosaic_gpu.forward(*args, keep, chunk_size=chunk, save_checkpoints=True)
    got = mosaic_gpu.backward(*args, keep, ckpt, dy, dh, gradient_clipping=clip,
                              chunk_size=chunk)
    names = ("dq", "dk", "dv", "dw", "df", "dh0")
    errors = {name: relative_error(g, w) for name, g, w in zip(names, got, want)}
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape)
    if clip is not None:  # the clamp binds somewhere, so the clipping rule is exercised
        assert float(jnp.max(jnp.abs(want[5]))) > 0 and float(jnp.max(jnp.abs(dh))) > clip
    assert max(errors.values()) < BF16_TOLERANCE, errors


def _backward_shapes(seq_len, chunk):
    """Abstract backward arguments (B=2, Nq=Nk=1, N=3, reset mask, checkpoints every
    ``chunk``) for the CUDA lowering checks."""
    sds, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    return [sds((2, seq_len, 1, 64), bf), sds((2, seq_len, 1, 64), bf),
            sds((2, seq_len, 3, 16), bf), sds((3, 16, 16), bf), sds((2, seq_len, 3), bf),
            sds((2, 3, 64, 16), f32), sds((2, seq_len), f32),
            sds((2, seq_len // chunk, 64, 48), f32), sds((2, seq_len, 3, 16), bf),
            sds((2, 3, 64, 16), f32)]


def test_backward_lowers_for_cuda(monkeypatch):
    """The backward's real paths for sm_90 on the CPU: register-A wgmma for du·Wᵀ, the
    transposed-A wgmma for dW on SMEM stacks, the inline per-warp sums without automatic
    barriers, and the TMA reduce-add of float32 dq/dk into zero-initialised ``jax.new_ref``
    buffers (inputs aliased to outputs)."""
    monkeypatch.setattr(platforms, "interpret", lambda platform: False)
    for seq_len, chunk in ((48, 16), (64, 32), (128, 64)):
        fn = functools.partial(mosaic_gpu.backward, gradient_clipping=1.0, chunk_size=chunk)
        module = jax.export.export(jax.jit(fn), platforms=["cuda"])(
            *_backward_shapes(seq_len, chunk)).mlir_module()
        assert "mosaic_gpu" in module
        assert "output_operand_alias" in module


def test_a_model_lowers_each_kernel_once_for_all_its_layers(monkeypatch):
    """Three M²RNN layers of one shape, forward and backward, lowered for sm_90: one forward and
    one backward kernel in the module, called from every layer (lowering a Mosaic GPU kernel
    takes about a second; the 400M hybrid has 20 such layers)."""
    monkeypatch.setattr(platforms, "interpret", lambda platform: False)
    q, k, v, w, f, _ = _problem(41, 2, 64, (1, 1, 2, 2, 2), jnp.bfloat16)

    def loss(w, v):
        total = jnp.zeros((), jnp.float32)
        for layer in range(3):
            y, _ = m2rnn(q, k, v * (layer + 1), w, f, None, 1.0, backend="mosaic_gpu")
            total = total + jnp.sum(y.astype(jnp.float32) ** 2)
        return total

    module = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1))),
                               platforms=["cuda"])(w, v).mlir_module()
    kernels = module.count("stablehlo.custom_call @mosaic_gpu")
    assert kernels == 2, kernels
    assert module.count("call @_backend_forward") >= 3, "each layer calls the one forward"


def test_op_with_mosaic_backend_matches_scan():
    """Through the public op (its padding of S = 40 to the chunk of 32, segment resets,
    clipping and custom_vjp) with ``backend="mosaic_gpu"``: y, final state and every gradient
    against the scan on the same bfloat16 inputs."""
    q, k, v, w, f, _ = _problem(31, 2, 40, (1, 1, 2, 2, 2), jnp.bfloat16)
    seg = jnp.cumsum(jax.random.bernoulli(jax.random.PRNGKey(32), 0.1, (2, 40)), 1)
    ks = jax.random.split(jax.random.PRNGKey(33), 2)
    cot = (jax.random.normal(ks[0], (2, 40, 2, 16), jnp.bfloat16),
           jax.random.normal(ks[1], (2, 2, 64, 16)))

    def outputs_and_grads(backend):
        def op(*xs):
            return m2rnn(*xs, None, 1.0, segment_ids=seg.astype(jnp.int32), backend=backend)

        out, vjp = jax.vjp(op, q, k, v, w, f)
        return [*out, *vjp(cot)]

    got, want = outputs_and_grads("mosaic_gpu"), outputs_and_grads("scan")
    errors = [relative_error(g, x) for g, x in zip(got, want)]
    assert max(errors) < BF16_TOLERANCE, errors


def test_auto_backend_needs_a_hopper_gpu():
    """``supports`` is what lets ``backend="auto"`` pick these kernels: never off a Hopper GPU
    (here: the CPU), and never for inputs the kernels reject."""
    q, k, v, w, f, h0 = _problem(0, 1, 16, (1, 1, 2, 2, 2), jnp.bfloat16)
    assert "Hopper" in mosaic_gpu.supports(q, k, v, w, f, h0)
    assert common.unsupported(q, k, v, w, f, h0) == []
    assert common.unsupported(q.astype(jnp.float32), k, v, w, f, h0)
