"""The Mosaic GPU forward prototype (interpret mode off the GPU) against the scan backend.

The Mosaic GPU interpreter runs the kernel's TMA copies, barriers, SMEM slots and layouts; its
wgmma takes the A operand only from SMEM, so in interpret mode the kernel computes the same
bf16 hi/lo products with float32 accumulation as a dot (the wgmma path is checked by lowering
for CUDA, ``test_lowers_for_cuda``). Inputs are fresh random values, never zeros.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpy_reference import relative_error
from m2rnn_jax import m2rnn, reference
from m2rnn_jax.ops import keep_mask
from pallas_kernels.m2rnn import gpu, mosaic_gpu

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
    # Interval not a multiple of the staging block: staged in 8-step blocks.
    "chunk8": ((1, 1, 2, 2, 2), 32, 8, True, True),
}


@pytest.mark.parametrize("case", list(BF16_CASES))
def test_bfloat16_forward_matches_scan(case):
    heads, seq_len, chunk, with_keep, checkpoints = BF16_CASES[case]
    args = _problem(list(BF16_CASES).index(case), 2, seq_len, heads, jnp.bfloat16)
    keep = _keep(2, seq_len, 5) if with_keep else None
    want = reference.forward(*args, keep, chunk_size=chunk, save_checkpoints=True)
    got = mosaic_gpu.forward(*args, keep, chunk_size=chunk, save_checkpoints=checkpoints,
                             interpret=True)
    errors = {"y": relative_error(got[0], want[0]), "h_final": relative_error(got[1], want[1])}
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    assert max(errors.values()) < BF16_TOLERANCE, errors
    if checkpoints:
        # One state per checkpoint interval, in gpu.forward's layout (B, S/C, 64, N·16).
        want_ckpt = jnp.transpose(want[2], (1, 0, 3, 2, 4)).reshape(got[2].shape)
        assert got[2].shape == (2, seq_len // chunk, 64, max(heads) * 16)
        assert relative_error(got[2], want_ckpt) < BF16_TOLERANCE
    else:
        assert got[2] is None


# Forward options (opt-in; the default above is what was measured): (heads, S, checkpoint
# interval, keep, checkpoints, options). N / L must be even for two heads per CTA.
# One case (the interpreter is slow): two heads per CTA (grid (B, N/2)) in two q/k groups of
# two heads each, W shared by pairs, resets, both heads' checkpoints; the kv-initialised
# accumulator (interpret mode computes the same sum as a dot; its wgmma path is lowered below).
FWD_OPTION_CASES = {
    "heads2_two_groups_keep_acc_kv": ((2, 2, 4, 4, 2), 64, 32, True, True,
                                      {"heads_per_cta": 2, "acc_init": "kv"}),
    # The hi/lo state parts by two roundings (the default splits by bit operations).
    "hi_lo_cvt_keep": ((1, 1, 2, 2, 2), 64, 32, True, True, {"hi_lo_split": "cvt"}),
    # lo rounded by the integer add too (no conversion in the split).
    "hi_lo_bits_lo": ((1, 1, 2, 2, 2), 64, 32, False, True, {"hi_lo_split": "bits_lo"}),
    # One float16 wgmma for H W and tanh on float16 pairs, resets, checkpoints.
    "f16_state_tanh_keep": ((1, 1, 2, 2, 2), 64, 32, True, True,
                            {"f16_state": True, "f16_tanh": True}),
    # H W by warp-level mma.sync (interpret mode: the same products as a dot; W's fragment
    # input and its SMEM copy run).
    "mma_sync_keep": ((1, 1, 2, 2, 2), 64, 32, True, True, {"state_product": "mma_sync"}),
    # H W by mma.sync on tf32 hi/lo parts (interpret mode: the same parts' products as a dot).
    "mma_sync_tf32_two_groups_keep": ((2, 2, 4, 4, 2), 64, 32, True, True,
                                      {"state_product": "mma_sync_tf32"}),
}


@pytest.mark.parametrize("case", list(FWD_OPTION_CASES))
def test_bfloat16_forward_options_match_scan(case):
    heads, seq_len, chunk, with_keep, checkpoints, options = FWD_OPTION_CASES[case]
    args = _problem(50 + list(FWD_OPTION_CASES).index(case), 2, seq_len, heads, jnp.bfloat16)
    keep = _keep(2, seq_len, 6) if with_keep else None
    want = reference.forward(*args, keep, chunk_size=chunk, save_checkpoints=True)
    got = mosaic_gpu.forward(*args, keep, chunk_size=chunk, save_checkpoints=checkpoints,
                             interpret=True, **options)
    errors = {"y": relative_error(got[0], want[0]), "h_final": relative_error(got[1], want[1])}
    if checkpoints:
        want_ckpt = jnp.transpose(want[2], (1, 0, 3, 2, 4)).reshape(got[2].shape)
        errors["checkpoints"] = relative_error(got[2], want_ckpt)
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
    assert max(errors.values()) < BF16_TOLERANCE, errors


def test_forward_option_errors():
    args = _problem(0, 1, 16, (1, 1, 3, 3, 3), jnp.bfloat16)
    for bad, match in (({"heads_per_cta": 2}, "heads per q/k group"),
                       ({"heads_per_cta": 4}, "heads_per_cta"), ({"acc_init": "one"}, "acc_init"),
                       ({"f16_state": True, "state_split": 2}, "f16_state"),
                       ({"f16_tanh": True, "approx_tanh": False}, "f16_tanh"),
                       ({"y_reduction": "tree"}, "y_reduction"),
                       ({"hi_lo_split": "round"}, "hi_lo_split"),
                       ({"state_product": "dot"}, "state_product"),
                       ({"state_product": "mma_sync", "hi_lo_split": "cvt"}, "split by bits"),
                       ({"state_product": "mma_sync", "acc_init": "kv"}, "acc_init"),
                       ({"state_product": "mma_sync_tf32", "state_split": 3}, "state_split=2"),
                       ({"mma_accumulators": 2}, "mma_accumulators"),
                       ({"state_product": "mma_sync_tf32", "acc_init": "kv"},
                        "'mma_sync_tf32' needs heads_per_cta=1")):
        with pytest.raises(ValueError, match=match):
            mosaic_gpu.forward(*args, None, chunk_size=8, interpret=True, **bad)


def test_hi_lo_split_by_bits_against_float64():
    """hi is x rounded to bf16 by adding 0x8000 to its bits and keeping the upper 16 (ties away
    from zero), lo the rest rounded: hi + lo within 2⁻¹⁶ of x (relative), as close as rounding's
    split."""
    from pallas_kernels.m2rnn.mosaic_gpu import common
    x = jax.random.normal(jax.random.PRNGKey(3), (64, 16)) * jnp.logspace(-6, 3, 16)
    hi, lo = common._hi_lo_by_bits(x)
    assert hi.dtype == lo.dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64)
    bits = (np.asarray(x).view(np.uint32) + np.uint32(0x8000)) & np.uint32(0xFFFF0000)
    np.testing.assert_array_equal(np.asarray(hi.astype(jnp.float32)), bits.view(np.float32))
    assert np.all(np.abs(np.asarray(hi, np.float64) - x64) <= 2.0 ** -8 * np.abs(x64))  # rounded
    got = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
    rel = np.abs(got - x64) / np.abs(x64)
    assert rel.max() < 2.0 ** -16
    # lo by the same integer rounding: lo within 2⁻⁸ of the exact remainder, hi unchanged.
    hi_b, lo_b = common._hi_lo_by_bits(x, lo_by_bits=True)
    np.testing.assert_array_equal(np.asarray(hi_b, np.float32), np.asarray(hi, np.float32))
    rest = x64 - np.asarray(hi, np.float64)
    assert np.all(np.abs(np.asarray(lo_b, np.float64) - rest) <= 2.0 ** -8 * np.abs(rest))
    assert (np.abs(np.asarray(hi_b, np.float64) + np.asarray(lo_b, np.float64) - x64)
            / np.abs(x64)).max() < 2.0 ** -16
    hi_rn, lo_rn = common._bf16_parts(x, 2)
    rel_rn = np.abs(np.asarray(hi_rn, np.float64) + np.asarray(lo_rn, np.float64) - x64) / np.abs(x64)
    assert rel.mean() < 1.2 * rel_rn.mean()


def _wgmma_register(row, col):
    """(warp, lane, register (j, h), element) holding [row, col] of a 64×16 WGMMA-layout array:
    rows 16w + l//4 + 8h, columns 8j + 2(l%4) + e (PTX ISA, wgmma .m64n16 D fragments)."""
    warp, r = divmod(row, 16)
    half, g = divmod(r, 8)
    j, c = divmod(col, 8)
    return warp, 4 * g + c // 2, (j, half), c % 2


def _registers_by_lane(arrays):
    """{(name, warp, lane, (j, h)): its two elements} of 64×16 WGMMA-layout arrays by name."""
    regs = {}
    for name, array in arrays.items():
        for row in range(64):
            for col in range(16):
                warp, lane, reg, e = _wgmma_register(row, col)
                regs.setdefault((name, warp, lane, reg), [0.0, 0.0])[e] = array[row, col]
    return regs


def _place_mma_outputs(out, d, warp, n):
    """The 16×8 product ``d`` of column block ``n`` as each lane's C/D fragment holds it
    (c0..c3 = rows g, g+8 of columns 2t+e), put where its registers (n, 0), (n, 1) say."""
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i, (row, col) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t),
                                        (g + 8, 2 * t + 1)]):
            half, e = divmod(i, 2)
            out_row, out_col = 16 * warp + g + 8 * half, 8 * n + 2 * t + e
            assert _wgmma_register(out_row, out_col) == (warp, lane, (n, half), e)
            out[out_row, out_col] = d[row, col]


def test_mma_sync_fragments_compute_h_w():
    """The mma.sync path's register bookkeeping, simulated lane by lane with the PTX ISA's
    m16n8k16 fragment definitions (A: a0..a7 = rows g, g+8 of k 0-7 then k 8-15, two per
    register; B: b0..b3 = k 2t+e, 8+2t+e of column g; C/D: c0..c3 = rows g, g+8 of columns
    2t+e), on random H and W: the kernel's A registers (H's own WGMMA registers, taken
    (j, h) = (0,0), (0,1), (1,0), (1,1)), B registers (``mma_weight_fragments(W)``'s WGMMA
    registers (n, 0), (n, 1)) and outputs (registers (n, 0), (n, 1)) give H W."""
    from pallas_kernels.m2rnn.mosaic_gpu import common
    rng = np.random.default_rng(7)
    h = rng.standard_normal((64, 16))
    w = rng.standard_normal((16, 16)).astype(np.float32).astype(np.float64)
    frag = np.asarray(common.mma_weight_fragments(jnp.asarray(w, jnp.float32)), np.float64)
    assert frag.shape == (64, 16)
    regs = _registers_by_lane({"h": h, "w": frag})
    out = np.full((64, 16), np.nan)
    for warp in range(4):
        a_frag = np.zeros((16, 16))  # what the warp's lanes feed as A, placed per PTX
        for lane in range(32):
            g, t = divmod(lane, 4)
            a = [x for reg in ((0, 0), (0, 1), (1, 0), (1, 1)) for x in regs["h", warp, lane, reg]]
            for i, (row, col) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t),
                                            (g + 8, 2 * t + 1), (g, 2 * t + 8), (g, 2 * t + 9),
                                            (g + 8, 2 * t + 8), (g + 8, 2 * t + 9)]):
                a_frag[row, col] = a[i]
        for n in (0, 1):
            b_frag = np.zeros((16, 8))
            for lane in range(32):
                g, t = divmod(lane, 4)
                b = [x for reg in ((n, 0), (n, 1)) for x in regs["w", warp, lane, reg]]
                for i, k in enumerate((2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)):
                    b_frag[k, g] = b[i]
            _place_mma_outputs(out, a_frag @ b_frag, warp, n)
    np.testing.assert_allclose(out, h @ w, rtol=1e-12, atol=1e-12)


def _tf32(x):
    """x truncated to tf32 (low 13 bits of the float32 cleared), as float64."""
    bits = np.asarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFFE000)
    return bits.view(np.float32).astype(np.float64)


def test_tf32_hi_lo_against_float64():
    """hi is x with its low 13 bits cleared, lo = x − hi exactly; with lo read as tf32 (the
    tensor core's truncation) hi + lo is within 2⁻²⁰ of x (relative), 16× closer than bf16
    hi/lo parts."""
    from pallas_kernels.m2rnn.mosaic_gpu import common
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(4096) * np.exp(rng.uniform(-8, 8, 4096))).astype(np.float32)
    hi, lo = (np.asarray(p) for p in common.tf32_hi_lo(jnp.asarray(x)))
    np.testing.assert_array_equal(hi, _tf32(x))
    np.testing.assert_array_equal(hi.astype(np.float64) + lo, x.astype(np.float64))
    x64 = x.astype(np.float64)
    rel = np.abs(_tf32(hi) + _tf32(lo) - x64) / np.abs(x64)
    assert rel.max() <= 2.0 ** -20
    hi_bf, lo_bf = common._bf16_parts(jnp.asarray(x), 2)
    rel_bf = np.abs(np.asarray(hi_bf, np.float64) + np.asarray(lo_bf, np.float64) - x64) / np.abs(x64)
    assert rel.mean() * 16 < rel_bf.mean()


def test_mma_sync_tf32_fragments_compute_h_w():
    """The tf32 mma.sync path's register bookkeeping, simulated lane by lane with the PTX ISA's
    m16n8k8 tf32 fragments (A: a0..a3 = (g, t), (g+8, t), (g, t+4), (g+8, t+4); B: b0, b1 =
    (t, g), (t+4, g); C/D: c0..c3 = rows g, g+8 of columns 2t+e) on random H and W: the
    kernel reads k block kb's A from H's own registers (kb, h), element e, as k index t + 4e,
    its B from ``mma_weight_fragments(W)``'s register (n, kb), and the outputs land in
    registers (n, 0), (n, 1): the sum over both k blocks is H W."""
    from pallas_kernels.m2rnn.mosaic_gpu import common
    rng = np.random.default_rng(8)
    h = rng.standard_normal((64, 16))
    w = rng.standard_normal((16, 16)).astype(np.float32).astype(np.float64)
    frag = np.asarray(common.mma_weight_fragments(jnp.asarray(w, jnp.float32)), np.float64)
    regs = _registers_by_lane({"h": h, "w": frag})
    out = np.full((64, 16), np.nan)
    for warp in range(4):
        for n in (0, 1):
            d = np.zeros((16, 8))
            for kb in (0, 1):
                a_frag, b_frag = np.full((16, 8), np.nan), np.full((8, 8), np.nan)
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    # the kernel's a0..a3: (e, half) = (0, 0), (0, 1), (1, 0), (1, 1)
                    a = [regs["h", warp, lane, (kb, half)][e] for e in (0, 1) for half in (0, 1)]
                    for value, (row, k) in zip(a, [(g, t), (g + 8, t), (g, t + 4),
                                                   (g + 8, t + 4)]):
                        a_frag[row, k] = value
                    b = regs["w", warp, lane, (n, kb)]
                    b_frag[t, g], b_frag[t + 4, g] = b
                assert not np.isnan(a_frag).any() and not np.isnan(b_frag).any()
                d += a_frag @ b_frag
            _place_mma_outputs(out, d, warp, n)
    np.testing.assert_allclose(out, h @ w, rtol=1e-12, atol=1e-12)


def test_checkpoints_feed_the_triton_backward():
    """The Mosaic forward's checkpoints through gpu.backward give the scan's gradients."""
    args = _problem(9, 1, 128, (1, 1, 2, 2, 2), jnp.bfloat16)
    ks = jax.random.split(jax.random.PRNGKey(10), 2)
    dy = jax.random.normal(ks[0], (1, 128, 2, 16), jnp.bfloat16)
    dh = jax.random.normal(ks[1], (1, 2, 64, 16))
    _, _, ckpt = mosaic_gpu.forward(*args, None, chunk_size=64, interpret=True)
    got = gpu.backward(*args, None, ckpt, dy, dh, gradient_clipping=1.0, chunk_size=64)
    _, _, ref_ckpt = reference.forward(*args, None, chunk_size=64)
    want = reference.backward(*args, None, ref_ckpt, dy, dh, gradient_clipping=1.0,
                              chunk_size=64)
    errors = [relative_error(g, w) for g, w in zip(got, want)]
    assert max(errors) < BF16_TOLERANCE, errors


def test_unsupported_shapes_raise():
    q, k, v, w, f, h0 = _problem(0, 1, 16, (1, 1, 2, 2, 2), jnp.bfloat16)
    with pytest.raises(ValueError, match="K must be 64"):
        mosaic_gpu.forward(q[..., :32], k[..., :32], v, w, f, h0[:, :, :32], None,
                           chunk_size=8, interpret=True)
    with pytest.raises(ValueError, match="chunk_size"):
        mosaic_gpu.forward(q, k, v, w, f, h0, None, chunk_size=12, interpret=True)
    with pytest.raises(ValueError, match="must be bfloat16"):
        mosaic_gpu.forward(q.astype(jnp.float32), k.astype(jnp.float32),
                           v.astype(jnp.float32), w, f, h0, None, chunk_size=8,
                           interpret=True)


def test_lowers_for_cuda():
    """Lowering for CUDA (no GPU needed): Mosaic GPU's layout inference and dialect lowering run
    in Python at export time (for sm_90 when no GPU is present), which catches unsupported
    layouts and ops, including the register-A wgmma path and the inline per-warp y sums that
    interpret mode does not run. PTX generation and ptxas run only on the GPU."""
    sds = jax.ShapeDtypeStruct
    fast = {"approx_tanh": True, "unroll": 4, "no_auto_barriers": True,
            "y_reduction": "warp_partials"}  # the options interpret mode cannot fully run
    plain = {"approx_tanh": False, "y_reduction": "per_step"}
    for dtype, with_keep, options in ((jnp.bfloat16, False, plain), (jnp.bfloat16, True, {}),
                                      (jnp.bfloat16, True, fast)):
        args = [sds((2, 128, 1, 64), dtype), sds((2, 128, 1, 64), dtype),
                sds((2, 128, 3, 16), dtype), sds((3, 16, 16), dtype), sds((2, 128, 3), dtype),
                sds((2, 3, 64, 16), jnp.float32),
                sds((2, 128), jnp.float32) if with_keep else None]
        fn = functools.partial(mosaic_gpu.forward, chunk_size=64, save_checkpoints=with_keep,
                               interpret=False, **options)
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
        assert "mosaic_gpu" in exported.mlir_module()


def test_forward_options_lower_for_cuda():
    """The opt-in forward options' real paths (two heads per CTA: four register-A wgmmas per
    step and one wait; the kv-initialised accumulator under ``pl.run_state``; the lane
    butterfly y partials; one float16 wgmma and float16-pair tanh; the hi/lo split by two
    roundings instead of the default's inline ``prmt``/``cvt`` code; one accumulator per state
    part, whose products interpret mode computes as the default's dot) for sm_90."""
    sds, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    args = [sds((2, 128, 1, 64), bf), sds((2, 128, 1, 64), bf), sds((2, 128, 4, 16), bf),
            sds((4, 16, 16), bf), sds((2, 128, 4), bf), sds((2, 4, 64, 16), jnp.float32),
            sds((2, 128), jnp.float32)]
    for options in ({"heads_per_cta": 2}, {"acc_init": "kv"},
                    {"heads_per_cta": 2, "acc_init": "kv", "no_auto_barriers": True,
                     "unroll": 2}, {"y_reduction": "warp_partials"},
                    {"f16_state": True, "f16_tanh": True}, {"hi_lo_split": "cvt"},
                    {"hi_lo_split": "bits_lo", "y_reduction": "warp_scatter_fma"},
                    {"state_product": "mma_sync"},
                    {"state_product": "mma_sync", "hi_lo_split": "bits_lo", "unroll": 2},
                    {"state_product": "mma_sync_tf32"},
                    {"state_product": "mma_sync_tf32", "unroll": 2, "mma_accumulators": 2},
                    {"acc_init": "per_part"}, {"heads_per_cta": 2, "acc_init": "per_part"}):
        fn = functools.partial(mosaic_gpu.forward, chunk_size=64, save_checkpoints=True,
                               interpret=False, **options)
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
        assert "mosaic_gpu" in exported.mlir_module()


# Backward: (heads, S, checkpoint interval, keep, gradient clipping)
BWD_CASES = {
    # The paper's grouping, resets, random initial state, clipping active (c = 0.5).
    "paper_grouping_keep_clip": ((1, 1, 2, 2, 2), 64, 32, True, 0.5),
    # Two q/k groups, one shared W, no resets, no clipping, one chunk of 64.
    "two_qk_groups_noclip": ((2, 2, 2, 2, 1), 64, 64, False, None),
}


def _backward_problem(case, seed, keep_seed, cotangent_seed):
    """Random bf16 inputs and cotangents for a BWD_CASES case, the scan's gradients for them
    and the scan's checkpoints (``(S/C, B, N, K, V)``)."""
    heads, seq_len, chunk, with_keep, clip = BWD_CASES[case]
    n = max(heads)
    args = _problem(seed, 2, seq_len, heads, jnp.bfloat16)
    keep = _keep(2, seq_len, keep_seed) if with_keep else None
    ks = jax.random.split(jax.random.PRNGKey(cotangent_seed), 2)
    dy = jax.random.normal(ks[0], (2, seq_len, n, 16), jnp.bfloat16)
    dh = jax.random.normal(ks[1], (2, n, 64, 16))
    _, _, ckpt = reference.forward(*args, keep, chunk_size=chunk)
    want = reference.backward(*args, keep, ckpt, dy, dh, gradient_clipping=clip,
                              chunk_size=chunk)
    return args, keep, dy, dh, want, ckpt


@pytest.mark.parametrize("case", list(BWD_CASES))
def test_bfloat16_backward_matches_scan(case):
    heads, seq_len, chunk, with_keep, clip = BWD_CASES[case]
    args, keep, dy, dh, want, _ = _backward_problem(case, 20 + list(BWD_CASES).index(case), 7, 11)
    _, _, ckpt = mosaic_gpu.forward(*args, keep, chunk_size=chunk, interpret=True)
    got = mosaic_gpu.backward(*args, keep, ckpt, dy, dh, gradient_clipping=clip,
                              chunk_size=chunk, interpret=True)
    names = ("dq", "dk", "dv", "dw", "df", "dh0")
    errors = {name: relative_error(g, w) for name, g, w in zip(names, got, want)}
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape)
    if clip is not None:  # the clamp binds somewhere, so the clipping rule is exercised
        assert float(jnp.max(jnp.abs(want[5]))) > 0 and float(jnp.max(jnp.abs(dh))) > clip
    assert max(errors.values()) < BF16_TOLERANCE, errors


# Backward options other than the defaults (the defaults: per-warp dv/df partials and
# warp-local dq/dk row sums summed once per chunk, dq/dk summed over a group's heads in the
# kernel — interpret: per-head float32 + XLA sum, the TMA reduce-add is checked by lowering —,
# approx tanh): (case, options).
BWD_OPTION_CASES = {
    # The first measured path: per-step cross-warp reductions, per-head bf16 dq/dk summed in XLA.
    "per_step_xla_sum": ("paper_grouping_keep_clip",
                         {"reductions": "per_step", "qk_grad_sum": "xla", "approx_tanh": False}),
    "per_step_kernel_sum": ("two_qk_groups_noclip", {"reductions": "per_step"}),
    # Hi/lo parts of the recomputed states and of du by two roundings (default: bit operations).
    "hi_lo_cvt": ("two_qk_groups_noclip", {"hi_lo_split": "cvt"}),
    "hi_lo_bits_lo": ("two_qk_groups_noclip", {"hi_lo_split": "bits_lo"}),
    # States recomputed with one float16 wgmma and float16-pair tanh (the forward's options).
    "f16_state_tanh": ("paper_grouping_keep_clip", {"f16_state": True, "f16_tanh": True}),
    # H W and du Wᵀ by mma.sync with the addend as accumulator (interpret: as a dot + addend;
    # the fragment inputs and their SMEM copies run).
    "mma_sync": ("paper_grouping_keep_clip", {"state_product": "mma_sync"}),
    # The same on tf32 hi/lo parts (interpret: their products as a dot + addend).
    "mma_sync_tf32": ("two_qk_groups_noclip", {"state_product": "mma_sync_tf32"}),
}


@pytest.mark.parametrize("option_case", list(BWD_OPTION_CASES))
def test_bfloat16_backward_options_match_scan(option_case):
    case, options = BWD_OPTION_CASES[option_case]
    heads, seq_len, chunk, with_keep, clip = BWD_CASES[case]
    n = max(heads)
    args, keep, dy, dh, want, ckpt = _backward_problem(
        case, 40 + list(BWD_OPTION_CASES).index(option_case), 8, 12)
    # The reference's checkpoints in the Mosaic layout (B, S/C, 64, N·16).
    ckpt = jnp.transpose(ckpt, (1, 0, 3, 2, 4)).reshape(2, seq_len // chunk, 64, n * 16)
    got = mosaic_gpu.backward(*args, keep, ckpt, dy, dh, gradient_clipping=clip,
                              chunk_size=chunk, interpret=True, **options)
    names = ("dq", "dk", "dv", "dw", "df", "dh0")
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape)
    errors = {name: relative_error(g, w) for name, g, w in zip(names, got, want)}
    assert max(errors.values()) < BF16_TOLERANCE, errors


def test_backward_option_errors():
    args = _problem(0, 1, 32, (1, 1, 2, 2, 2), jnp.bfloat16)
    ckpt = jnp.zeros((1, 1, 64, 32))
    for bad in ({"qk_grad_sum": "atomic"}, {"reductions": "shuffle"}, {"state_product": "x"},
                {"state_product": "mma_sync", "f16_state": True},
                {"state_product": "mma_sync", "acc_per_part": True}):
        with pytest.raises(ValueError, match=list(bad)[-1]):
            mosaic_gpu.backward(*args, None, ckpt, args[2], args[5], gradient_clipping=None,
                                chunk_size=32, interpret=True, **bad)


def _backward_shapes(seq_len, chunk):
    """Abstract backward arguments (B=2, Nq=Nk=1, N=3, reset mask, checkpoints every
    ``chunk``) for the CUDA lowering checks."""
    sds, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    return [sds((2, seq_len, 1, 64), bf), sds((2, seq_len, 1, 64), bf),
            sds((2, seq_len, 3, 16), bf), sds((3, 16, 16), bf), sds((2, seq_len, 3), bf),
            sds((2, 3, 64, 16), f32), sds((2, seq_len), f32),
            sds((2, seq_len // chunk, 64, 48), f32), sds((2, seq_len, 3, 16), bf),
            sds((2, 3, 64, 16), f32)]


def test_backward_options_lower_for_cuda():
    """The real paths for sm_90 on the CPU, defaults and alternatives: TMA reduce-add of
    float32 dq/dk into ``jax.new_ref`` buffers (aliased to outputs) or per-head outputs, inline
    per-step warp sums without automatic barriers or per-step cross-warp reductions."""
    args = _backward_shapes(seq_len=64, chunk=32)
    for options in ({}, {"qk_grad_sum": "xla"}, {"reductions": "per_step"},
                    {"scatter_sums": False}, {"f16_state": True, "f16_tanh": True},
                    {"hi_lo_split": "cvt"}, {"hi_lo_split": "bits_lo"},
                    {"state_product": "mma_sync"}, {"state_product": "mma_sync_tf32"},
                    {"state_product": "mma_sync_tf32", "mma_accumulators": 2},
                    {"acc_per_part": True},
                    {"reductions": "per_step", "qk_grad_sum": "xla", "approx_tanh": False}):
        fn = functools.partial(mosaic_gpu.backward, gradient_clipping=1.0, chunk_size=32,
                               interpret=False, **options)
        module = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
        assert "mosaic_gpu" in module
        # In-kernel dq/dk sums: the zero-initialised buffers are aliased inputs/outputs.
        assert ("output_operand_alias" in module) == (
            options.get("qk_grad_sum", "kernel") == "kernel")


def test_backward_lowers_for_cuda():
    """The backward's real paths (register-A wgmma for du·Wᵀ, transposed-A wgmma for dW on
    SMEM stacks) through Mosaic GPU's layout inference and lowering for sm_90, on the CPU."""
    args = _backward_shapes(seq_len=128, chunk=64)
    fn = functools.partial(mosaic_gpu.backward, gradient_clipping=1.0, chunk_size=64,
                           interpret=False)
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    assert "mosaic_gpu" in exported.mlir_module()


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
    assert not mosaic_gpu.supports(q, k, v, w, f, h0)
    assert mosaic_gpu._unsupported(q, k, v, w, f, h0) == []
    assert mosaic_gpu._unsupported(q.astype(jnp.float32), k, v, w, f, h0)
