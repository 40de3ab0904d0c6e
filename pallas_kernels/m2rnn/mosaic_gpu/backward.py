"""The Mosaic GPU backward kernel (see the package docstring for what lives where)."""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from m2rnn_jax.heads import expand_heads, sum_heads
from pallas_kernels.m2rnn.mosaic_gpu.common import (_check_supported, _per_head_inputs, _launch,
                                                    _tanh, state_splitter, check_hi_lo_split,
                                                    check_state_product, check_mma_accumulators,
                                                    mma_state_products, MMA_SYNC_PRODUCTS,
                                                    mma_tf32_state_products, tf32_hi_lo,
                                                    mma_weight_fragments, wgmma_products_apart,
                                                    DEFAULT_CHUNK_SIZE, KEY_DIM, VALUE_DIM, _F32,
                                                    _BF16, _F16)
from pallas_kernels.m2rnn.mosaic_gpu.warp_sums import _store_warp_sums, _sum_partials

SUBCHUNK = 4  # backward: states recomputed into registers at once (4·16 = the wgmma M of dW)


def _bwd_kernel(*refs, chunk, num_chunks, heads_per_group, has_keep, clip, approx_tanh,
                interpret, warp_sums=False, qk_reduce_add=False, no_auto_barriers=False,
                scatter_sums=False, f16_state=False, f16_tanh=False, hi_lo_split="bits",
                state_product="wgmma", acc_per_part=False, mma_accumulators=1):
    q_ref, k_ref, v_ref, f_ref, w_ref, wt_ref, *rest = refs
    mma_sync = state_product in MMA_SYNC_PRODUCTS
    tf32 = state_product == "mma_sync_tf32"
    w_frag_ref, wt_frag_ref = (rest.pop(0), rest.pop(0)) if mma_sync else (None, None)
    keep_ref = rest.pop(0) if has_keep else None
    # With ``qk_reduce_add`` dq_ref/dk_ref are the zero-initialised (B, S, L, 64) float32 Refs
    # (inputs aliased to outputs), else per-head (B, S, N, 64) outputs: same position.
    (ckpt_ref, dy_ref, dhf_ref, dq_ref, dk_ref, dv_ref, df_ref, dw_ref, dh0_ref,
     q_s, k_s, v_s, dy_s, f_s, keep_s, w_s, wt_s, sub_s, h_s, xs_s, ds_s,
     dq_s, dk_s, dv_s, df_s, dwo_s, in_bar, w_bar, *sums_s) = rest
    w_frag_s, wt_frag_s = (sums_s.pop(0), sums_s.pop(0)) if mma_sync else (None, None)
    if warp_sums:
        # Per-warp partial sums of dv (4, C, 16) and df (C, 4); float32 row sums of dq/dk
        # (C, 64): dq_s/dk_s themselves when they are float32.
        dvp_s, dfp_s, *qk_f32 = sums_s
        dqf_s, dkf_s = qk_f32 if qk_f32 else (dq_s, dk_s)
        if not interpret:
            def inline_sums(over):
                return plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))(
                    functools.partial(_store_warp_sums, over=over))
            row_sums, col_partials, all_partials = (
                inline_sums("columns"),
                inline_sums("warp_rows_scatter" if scatter_sums else "warp_rows"),
                inline_sums("warp_all"))

            def sum_partials(src, dst, axis):
                plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))(
                    functools.partial(_sum_partials, axis=axis))(src, dst)
    b = lax.axis_index("b")
    n = lax.axis_index("n")
    grp = lax.div(n, jnp.int32(heads_per_group))
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    sub = SUBCHUNK
    subs = chunk // sub
    cols = pl.ds(n * VALUE_DIM, VALUE_DIM)

    plgpu.copy_gmem_to_smem(w_ref.at[n], w_s, w_bar)
    plgpu.copy_gmem_to_smem(wt_ref.at[n], wt_s, w_bar)
    plgpu.copy_gmem_to_smem(dhf_ref.at[b, n], h_s, w_bar)
    if mma_sync:
        plgpu.copy_gmem_to_smem(w_frag_ref.at[n], w_frag_s, w_bar)
        plgpu.copy_gmem_to_smem(wt_frag_ref.at[n], wt_frag_s, w_bar)
    plgpu.barrier_wait(w_bar)
    g_later = plgpu.load(h_s, layout=wgmma_layout, optimized=False)
    w_frag = wt_frag = None
    if mma_sync and not interpret:
        # W's and Wᵀ's mma.sync B fragments: loop-invariant registers (4 per thread each;
        # 8 as tf32).
        w_frag, wt_frag = (plgpu.load(buf, layout=wgmma_layout, optimized=False)
                           for buf in (w_frag_s, wt_frag_s))
        if tf32:
            tf32_products = mma_tf32_state_products(mma_accumulators)

            def products_by_mma(x, fragments, addend):
                return tf32_products(*tf32_hi_lo(x), fragments, addend)
        else:
            w_frag, wt_frag = w_frag.astype(_BF16), wt_frag.astype(_BF16)
            products_by_mma = mma_state_products(hi_lo_split)

    def clamp(x):
        return x if clip is None else jnp.minimum(jnp.maximum(x, -clip), clip)

    split_state = state_splitter(2, f16_state, hi_lo_split, interpret)  # as the forward's
    split_grad = state_splitter(2, False, hi_lo_split, interpret)  # du: bf16's range
    if tf32:  # what the interpreter multiplies (on the GPU: products_by_mma)
        split_state = split_grad = tf32_hi_lo

    def matmul_w(x, w_smem, w_fragments, split, addend):
        """addend + x (64×16 f32) · w (16×16 in SMEM, the parts' dtype) on the parts ``split``
        makes (by mma.sync on w's B fragments when given: the addend is its accumulator)."""
        if w_fragments is not None:
            return products_by_mma(x, w_fragments, addend)
        parts = split(x)
        if interpret:
            return sum(jnp.dot(a, w_smem[...], preferred_element_type=_F32)
                       for a in parts) + addend

        if acc_per_part:  # as the forward's acc_init="per_part"
            out = addend
            for part in wgmma_products_apart([(a, w_smem, None) for a in parts]):
                out = out + part
            return out

        def products(acc_ref):
            for a in parts:
                plgpu.wgmma(acc_ref, a, w_smem)
            return acc_ref[...]

        return pl.run_scoped(products, plgpu.ACC((KEY_DIM, VALUE_DIM), _F32)) + addend

    def load_step(t):
        k_t = plgpu.load(k_s.at[t], layout=row_layout, optimized=False).astype(_F32)
        v_t = plgpu.load(v_s.at[t], layout=col_layout, optimized=False).astype(_F32)
        keep_t = keep_s[t] if has_keep else None
        return k_t, v_t, f_s[t], keep_t

    def advance(h, t):
        """H_{t-1} before a reset -> (reset H_{t-1}, Z_t, H_t)."""
        k_t, v_t, f_t, keep_t = load_step(t)
        if keep_t is not None:
            h = h * keep_t
        kv = lax.broadcast_in_dim(k_t, (KEY_DIM, VALUE_DIM), [0]) * lax.broadcast_in_dim(
            v_t, (KEY_DIM, VALUE_DIM), [1])
        z = _tanh(matmul_w(h, w_s, w_frag, split_state, kv), f16_tanh)
        return h, z, z + f_t * (h - z)

    def chunk_loop(acc_ref, g_later, dw):
        def chunk_body(i, carry):
            g_later, dw = carry
            c = num_chunks - 1 - i
            steps = pl.ds(c * chunk, chunk)
            # The previous chunk's output blocks (and h_s) have been read by their copies.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.commit_smem()
            plgpu.copy_gmem_to_smem(q_ref.at[b, steps, grp], q_s, in_bar)
            plgpu.copy_gmem_to_smem(k_ref.at[b, steps, grp], k_s, in_bar)
            plgpu.copy_gmem_to_smem(v_ref.at[b, steps, n], v_s, in_bar)
            plgpu.copy_gmem_to_smem(dy_ref.at[b, steps, n], dy_s, in_bar)
            plgpu.copy_gmem_to_smem(f_ref.at[b, n, steps], f_s, in_bar)
            plgpu.copy_gmem_to_smem(ckpt_ref.at[b, c, :, cols], h_s, in_bar)
            if has_keep:
                plgpu.copy_gmem_to_smem(keep_ref.at[b, steps], keep_s, in_bar)
            plgpu.barrier_wait(in_bar)

            # Phase 1: the state at every sub-chunk start, into SMEM.
            def record(j, h):
                sub_s[j] = h
                for m in range(sub):
                    _, _, h = advance(h, j * sub + m)
                return h

            h = plgpu.load(h_s, layout=wgmma_layout, optimized=False)
            lax.fori_loop(0, subs, record, h)
            if no_auto_barriers:
                plgpu.commit_smem()  # sub_s is written (read back in another layout, maybe)

            # Phase 2: sub-chunks in reverse, recomputed into registers and walked back.
            def walk_back(i2, carry):
                g_later, dw = carry
                j = subs - 1 - i2
                h = sub_s[j]
                befores, prevs, zs = [h], [], []
                for m in range(sub):
                    h_prev, z, h = advance(h, j * sub + m)
                    befores.append(h)
                    prevs.append(h_prev)
                    zs.append(z)
                if not interpret:
                    plgpu.wgmma_wait(0)  # the last sub-chunk's dW wgmma has read xs_s/ds_s
                for m in reversed(range(sub)):
                    t = j * sub + m
                    k_t, v_t, f_t, keep_t = load_step(t)
                    q_t = plgpu.load(q_s.at[t], layout=row_layout, optimized=False).astype(_F32)
                    dy_t = plgpu.load(dy_s.at[t], layout=col_layout, optimized=False).astype(_F32)
                    dy_b = lax.broadcast_in_dim(dy_t, (KEY_DIM, VALUE_DIM), [1])
                    # SPEC §1: clamp what arrives from later steps, then add the read-out's.
                    g = clamp(g_later) + lax.broadcast_in_dim(
                        q_t, (KEY_DIM, VALUE_DIM), [0]) * dy_b
                    h_prev, z = prevs[m], zs[m]
                    du = (1.0 - f_t) * g * (1.0 - z * z)
                    g_later = matmul_w(du, wt_s, wt_frag, split_grad, f_t * g)
                    if keep_t is not None:
                        g_later = g_later * keep_t
                    if warp_sums:
                        # No cross-warp exchange per step: dq/dk row sums are warp-local;
                        # dv and df as per-warp partials, summed once per chunk.
                        p_dq = befores[m + 1] * dy_b
                        p_dk = du * lax.broadcast_in_dim(v_t, (KEY_DIM, VALUE_DIM), [1])
                        p_dv = du * lax.broadcast_in_dim(k_t, (KEY_DIM, VALUE_DIM), [0])
                        p_df = g * (h_prev - z)
                        if interpret:  # the same sums as jnp ops (no inline Mosaic GPU code)
                            dqf_s[t] = jnp.sum(p_dq, axis=1)
                            dkf_s[t] = jnp.sum(p_dk, axis=1)
                            dvp_s[:, t] = jnp.sum(p_dv.reshape(4, 16, VALUE_DIM), axis=1)
                            dfp_s[t] = jnp.sum(p_df.reshape(4, 16 * VALUE_DIM), axis=1)
                        else:
                            row_sums(p_dq, dqf_s.at[t])
                            row_sums(p_dk, dkf_s.at[t])
                            col_partials(p_dv, dvp_s.at[:, t])
                            all_partials(p_df, dfp_s.at[t])
                    else:
                        dq_s[t] = jnp.sum(befores[m + 1] * dy_b, axis=1).astype(dq_s.dtype)
                        dk_s[t] = jnp.sum(du * lax.broadcast_in_dim(
                            v_t, (KEY_DIM, VALUE_DIM), [1]), axis=1).astype(dk_s.dtype)
                        dv_s[t] = jnp.sum(du * lax.broadcast_in_dim(
                            k_t, (KEY_DIM, VALUE_DIM), [0]), axis=0).astype(dv_s.dtype)
                        df_s[t] = jnp.sum(jnp.sum(g * (h_prev - z), axis=0))
                    if interpret:
                        dw = dw + jnp.dot(h_prev.T, du, preferred_element_type=_F32)
                    else:
                        blk = pl.ds(m * VALUE_DIM, VALUE_DIM)
                        xs_s[:, blk] = h_prev.astype(_BF16)
                        ds_s[:, blk] = du.astype(_BF16)
                if not interpret:
                    # dW += Σ_m H_{t-1}ᵀ du_t: one wgmma, M = (step, column of H), N = (step,
                    # column of du); the diagonal 16×16 blocks are summed outside.
                    plgpu.commit_smem()
                    plgpu.wgmma(acc_ref, xs_s.transpose((1, 0)), ds_s)
                return g_later, dw

            carry = lax.fori_loop(0, subs, walk_back, (g_later, dw))
            if warp_sums:
                plgpu.commit_smem()  # every warp's sums are written
                if interpret:
                    dv_s[...] = jnp.sum(dvp_s[...], axis=0).astype(dv_s.dtype)
                    df_s[...] = jnp.sum(dfp_s[...], axis=1)
                    if dqf_s is not dq_s:
                        dq_s[...] = dqf_s[...].astype(dq_s.dtype)
                        dk_s[...] = dkf_s[...].astype(dk_s.dtype)
                else:  # inline code: no layout inference on these small blocks
                    sum_partials(dvp_s, dv_s, 0)
                    sum_partials(dfp_s, df_s, 1)
                    if dqf_s is not dq_s:
                        sum_partials(dqf_s.reshape(1, chunk, KEY_DIM), dq_s, 0)
                        sum_partials(dkf_s.reshape(1, chunk, KEY_DIM), dk_s, 0)
            plgpu.commit_smem()
            if qk_reduce_add:
                # Sum over the heads of the q/k group in GMEM (L2): TMA reduce-add into the
                # zero-initialised float32 buffers.
                plgpu.copy_smem_to_gmem(dq_s, dq_ref.at[b, steps, grp], reduction_op="add")
                plgpu.copy_smem_to_gmem(dk_s, dk_ref.at[b, steps, grp], reduction_op="add")
            else:
                plgpu.copy_smem_to_gmem(dq_s, dq_ref.at[b, steps, n])
                plgpu.copy_smem_to_gmem(dk_s, dk_ref.at[b, steps, n])
            plgpu.copy_smem_to_gmem(dv_s, dv_ref.at[b, steps, n])
            plgpu.copy_smem_to_gmem(df_s, df_ref.at[b, n, steps])
            return carry

        return lax.fori_loop(0, num_chunks, chunk_body, (g_later, dw))

    dw0 = jnp.zeros((VALUE_DIM, VALUE_DIM), _F32)
    if interpret:
        g_later, dw = chunk_loop(None, g_later, dw0)
        dwo_s[...] = jnp.zeros((KEY_DIM, KEY_DIM), _F32)
        dwo_s[0:VALUE_DIM, 0:VALUE_DIM] = dw
    else:
        def with_acc(acc_ref):
            g_later_out, _ = chunk_loop(acc_ref, g_later, None)
            plgpu.wgmma_wait(0)
            dwo_s[...] = acc_ref[...]
            return g_later_out

        g_later = pl.run_scoped(with_acc, plgpu.ACC((KEY_DIM, KEY_DIM), _F32))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    h_s[...] = g_later
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(h_s, dh0_ref.at[b, n])
    plgpu.copy_smem_to_gmem(dwo_s, dw_ref.at[b, n])
    plgpu.wait_smem_to_gmem(0)


def backward(q, k, v, w, f, h0, keep, checkpoints, dy, dh_final, *, gradient_clipping,
             chunk_size=DEFAULT_CHUNK_SIZE, approx_tanh=True, no_auto_barriers=None,
             qk_grad_dtype=_BF16, qk_grad_sum="kernel", reductions="warp_sums", scatter_sums=True,
             f16_state=False, f16_tanh=False, hi_lo_split="bits", state_product="wgmma",
             acc_per_part=False, mma_accumulators=1, interpret=None):
    """The backend-interface backward: ``(dq, dk, dv, dw, df, dh0)`` (bfloat16 inputs).

    Consumes the checkpoints of ``forward`` (or ``gpu.forward``) with the same ``chunk_size``.
    Grid ``(B, N)``, one warpgroup per CTA; chunks in reverse; per chunk the inputs are copied
    to SMEM with TMA, the states every ``SUBCHUNK`` steps recomputed from the checkpoint into
    SMEM, then each sub-chunk's states recomputed into registers and walked back. ``du Wᵀ`` is a
    register-A wgmma on bf16 hi/lo parts of ``du`` (Wᵀ exact in bf16). ``dW`` accumulates in a
    64×64 wgmma accumulator, one wgmma per sub-chunk on bf16 ``H_{t-1}`` and ``du`` stacks
    (M = 4 steps × 16; only the diagonal blocks are used). dq/dk of a group's heads are summed
    in the kernel (``qk_grad_sum``, below).

    Options. The defaults are the fastest combination measured on an H200 (2026-11-30,
    ``benchmarks/mosaic_check.py``, with the forward's defaults): 8×4096×84 fwd+bwd 12.0 ms and
    0.56 GiB extra (13.2 ms with ``hi_lo_split="cvt"`` here and in the forward; 13.5 ms with
    butterfly sums; 10.6 ms with ``f16_state`` here and in the forward; 21.6 ms / 1.20 GiB with
    ``qk_grad_sum="xla", reductions="per_step", approx_tanh=False, no_auto_barriers=False``;
    bf16 error against the scan at 2×256×4 at most 2.7e-3, dW).

    * ``approx_tanh``: ``tanh.approx.f32`` in the recomputed states (as the forward).
    * ``qk_grad_sum="xla"``: dq/dk written per head (``qk_grad_dtype``, B·S·N·64 each) and
      summed over the heads of a group in XLA.
    * ``qk_grad_sum="kernel"`` (default): each CTA adds its float32 dq/dk chunk into
      zero-initialised ``(B, S, L, 64)`` float32 buffers with a TMA reduce-add
      (``cp.reduce.async.bulk.tensor .add``, in L2); the buffers are ``jax.new_ref`` inputs
      of the kernel (aliased to outputs). Replaces the per-head ``2·B·S·N·64`` bf16 outputs
      (0.66 GiB at 8×4096×84) by ``2·B·S·L·64`` float32 (16 MiB): extra memory of fwd+bwd
      ≈ 1.19 − 0.66 + 0.02 ≈ 0.55 GiB. SMEM dq/dk blocks become float32 (+4 KiB at C = 32).
      The Mosaic GPU interpreter cannot run TMA reductions: in interpret mode the kernel
      writes per-head float32 dq/dk that XLA sums (the same values); ``jax.export`` for CUDA
      lowers the real path.
    * ``reductions="warp_sums"`` (default): no cross-warp exchange per step. With
      ``"per_step"`` each step stores dq, dk, dv, df with four Pallas SMEM stores (each
      bracketed by warpgroup barriers under Mosaic's automatic barriers) and reduces dv (over
      rows) and df (over all) across the 4 warps through SMEM. With this option inline Mosaic
      GPU code writes per step, without barriers: dq/dk row sums (warp-local: shuffles over
      the 4 lanes of a row) to float32 (C, 64) SMEM, per-warp dv column partials to
      (4, C, 16) and per-warp df totals to (4, C); the 4 warps' partials are added once per
      chunk (as the forward's y). +16–24 KiB SMEM at C = 32. Interpret mode computes the
      same partial buffers with jnp ops.
    * ``scatter_sums`` (default, with ``warp_sums``): the per-warp dv column sums by a lane
      reduce-scatter (4 shuffles instead of 12; ``warp_sums._store_warp_partial_sums``).
    * ``hi_lo_split`` (default ``"bits"``): how the bf16 hi/lo parts of the recomputed states
      and of ``du`` are made, as the forward's option of that name.
    * ``f16_state``, ``f16_tanh`` (opt-in): the recomputed states as the forward's options of
      the same names (one float16 wgmma for ``H W``, faster and less exact;
      ``tanh.approx.f16x2``): pass the forward's values. ``du Wᵀ`` keeps bf16 hi/lo parts
      (gradients need bf16's exponent range).
    * ``state_product="mma_sync"`` (opt-in): ``H W`` and ``du Wᵀ`` by warp-level mma.sync with
      the addend (``k vᵀ``, ``f ⊙ g``) as the accumulator, as the forward's option of that name.
    * ``state_product="mma_sync_tf32"`` (opt-in): the same on tf32 hi/lo parts (``m16n8k8``,
      ≥ 21 significant bits, no conversions), as the forward's option of that name, and its
      ``mma_accumulators``.
    * ``acc_per_part`` (opt-in): each bf16 part's product (``H W`` and ``du Wᵀ``) in its own
      accumulator, added after, as the forward's ``acc_init="per_part"``; measured slower with
      it (8×4096×84 fwd+bwd 12.29 vs 11.92 ms, ninth session).
    * ``no_auto_barriers``: ``CompilerParams(unsafe_no_auto_barriers=True)``; with it an
      explicit barrier follows the sub-chunk start states' stores. ``None`` (default) = on with
      ``warp_sums``, for which it is meant (the remaining per-step Pallas stores are the dW
      stacks, written and read by wgmma across ``commit_smem``/``wgmma_wait``), off otherwise.
    """
    _check_supported(q, k, v, w, f, h0, keep, chunk_size)
    if chunk_size % SUBCHUNK:
        raise ValueError(f"chunk_size must be a multiple of {SUBCHUNK}")
    if qk_grad_sum not in ("xla", "kernel"):
        raise ValueError(f"qk_grad_sum must be 'xla' or 'kernel', got {qk_grad_sum!r}")
    if reductions not in ("per_step", "warp_sums"):
        raise ValueError(f"reductions must be 'per_step' or 'warp_sums', got {reductions!r}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    # The interpreter has no TMA reduce-add: per-head float32 dq/dk summed in XLA instead.
    qk_reduce_add = qk_grad_sum == "kernel" and not interpret
    if qk_grad_sum == "kernel":
        qk_grad_dtype = _F32
    warp_sums = reductions == "warp_sums"
    if no_auto_barriers is None:
        no_auto_barriers = warp_sums
    batch, seq_len = q.shape[:2]
    num_heads = dh_final.shape[1]
    dtype = v.dtype
    groups, qg, kg, vn, fn = _per_head_inputs(q, k, v, f, num_heads)
    if f16_tanh and not approx_tanh:
        raise ValueError("f16_tanh needs approx_tanh (tanh.approx.f16x2)")
    check_hi_lo_split(hi_lo_split)
    check_state_product(state_product, 2, 1, f16_state, hi_lo_split)
    mma_sync = state_product in MMA_SYNC_PRODUCTS
    check_mma_accumulators(mma_accumulators, state_product)
    wn = expand_heads(w, num_heads, axis=0).astype(_BF16)
    wt = jnp.swapaxes(wn, 1, 2)
    if f16_state:
        wn = wn.astype(_F16)  # only the recomputation's H W reads it
    dyn = dy.astype(dtype)
    has_keep = keep is not None
    inputs = [qg, kg, vn, fn, wn, wt]
    if mma_sync:
        inputs += [mma_weight_fragments(wn), mma_weight_fragments(wt)]
    if has_keep:
        inputs.append(keep.astype(_F32))
    inputs += [checkpoints, dyn, dh_final.astype(_F32)]
    num_chunks = seq_len // chunk_size
    c = chunk_size
    if qk_reduce_add:
        # Zero-initialised accumulators, passed as Refs: the kernel adds into them in place.
        qk_refs = [jax.new_ref(jnp.zeros((batch, seq_len, groups, KEY_DIM), _F32))
                   for _ in range(2)]
        inputs += qk_refs
        out_type = []
    else:
        out_type = [
            jax.ShapeDtypeStruct((batch, seq_len, num_heads, KEY_DIM), qk_grad_dtype),  # dq
            jax.ShapeDtypeStruct((batch, seq_len, num_heads, KEY_DIM), qk_grad_dtype),  # dk
        ]
    out_type += [
        jax.ShapeDtypeStruct((batch, seq_len, num_heads, VALUE_DIM), dtype),         # dv
        jax.ShapeDtypeStruct((batch, num_heads, seq_len), _F32),                     # df
        jax.ShapeDtypeStruct((batch, num_heads, KEY_DIM, KEY_DIM), _F32),            # dW blocks
        jax.ShapeDtypeStruct((batch, num_heads, KEY_DIM, VALUE_DIM), _F32),          # dh0
    ]
    w_transforms = (plgpu.TilingTransform((8, VALUE_DIM)), plgpu.SwizzleTransform(32))
    scratch = [
        plgpu.SMEM((c, KEY_DIM), dtype),                     # q
        plgpu.SMEM((c, KEY_DIM), dtype),                     # k
        plgpu.SMEM((c, VALUE_DIM), dtype),                   # v
        plgpu.SMEM((c, VALUE_DIM), dtype),                   # dy
        plgpu.SMEM((c,), _F32),                              # f
        plgpu.SMEM((c,), _F32),                              # keep
        plgpu.SMEM((VALUE_DIM, VALUE_DIM), wn.dtype, transforms=w_transforms),  # W
        plgpu.SMEM((VALUE_DIM, VALUE_DIM), _BF16, transforms=w_transforms),  # Wᵀ
        plgpu.SMEM((c // SUBCHUNK, KEY_DIM, VALUE_DIM), _F32),  # sub-chunk start states
        plgpu.SMEM((KEY_DIM, VALUE_DIM), _F32),              # checkpoint / dh_final / dh0
        plgpu.SMEM((KEY_DIM, KEY_DIM), _BF16, transforms=w_transforms),  # H_{t-1} stack
        plgpu.SMEM((KEY_DIM, KEY_DIM), _BF16, transforms=w_transforms),  # du stack
        plgpu.SMEM((c, KEY_DIM), qk_grad_dtype),             # dq
        plgpu.SMEM((c, KEY_DIM), qk_grad_dtype),             # dk
        plgpu.SMEM((c, VALUE_DIM), dtype),                   # dv
        plgpu.SMEM((c,), _F32),                              # df
        plgpu.SMEM((KEY_DIM, KEY_DIM), _F32),                # dW accumulator out
        plgpu.Barrier(num_arrivals=7 if has_keep else 6),
        plgpu.Barrier(num_arrivals=3 + 2 * mma_sync),
    ]
    extra = {}
    if mma_sync:
        scratch += [plgpu.SMEM((KEY_DIM, VALUE_DIM), _F32)] * 2  # W's, Wᵀ's mma.sync fragments
        extra["state_product"] = state_product
        if mma_accumulators != 1:
            extra["mma_accumulators"] = mma_accumulators
    if warp_sums:
        scratch += [plgpu.SMEM((4, c, VALUE_DIM), _F32),     # per-warp dv partials
                    plgpu.SMEM((c, 4), _F32)]                # per-warp df partials
        if jnp.dtype(qk_grad_dtype) != jnp.float32:
            scratch += [plgpu.SMEM((c, KEY_DIM), _F32),      # dq row sums
                        plgpu.SMEM((c, KEY_DIM), _F32)]      # dk row sums
        extra["warp_sums"] = True
        if scatter_sums:
            extra["scatter_sums"] = True
    if qk_reduce_add:
        extra["qk_reduce_add"] = True
    if no_auto_barriers:
        extra["no_auto_barriers"] = True
    if acc_per_part:
        if mma_sync:
            raise ValueError("acc_per_part is for state_product='wgmma'")
        extra["acc_per_part"] = True
    kernel = functools.partial(
        _bwd_kernel, chunk=chunk_size, num_chunks=num_chunks,
        heads_per_group=num_heads // groups, has_keep=has_keep, clip=gradient_clipping,
        approx_tanh=approx_tanh, interpret=bool(interpret), f16_state=f16_state,
        f16_tanh=f16_tanh, hi_lo_split=hi_lo_split, **extra)
    outs = _launch(kernel, out_type, scratch, (batch, num_heads), approx_tanh,
                   no_auto_barriers, interpret, "m2rnn_backward_mosaic")(*inputs)
    if qk_reduce_add:
        dv, df, dw_blocks, dh0 = outs
        dq, dk = qk_refs[0][...], qk_refs[1][...]   # already summed over the group's heads
    else:
        dq, dk, dv, df, dw_blocks, dh0 = outs
        # Per-head dq/dk -> the L = lcm(Nq, Nk) groups.
        hpg = num_heads // groups
        dq = jnp.sum(dq.astype(_F32).reshape(batch, seq_len, groups, hpg, KEY_DIM), axis=3)
        dk = jnp.sum(dk.astype(_F32).reshape(batch, seq_len, groups, hpg, KEY_DIM), axis=3)
    # The L groups -> q's and k's own heads.
    dq = sum_heads(dq, q.shape[2], axis=2)
    dk = sum_heads(dk, k.shape[2], axis=2)
    dv = sum_heads(dv.astype(_F32), v.shape[2], axis=2)
    df = sum_heads(jnp.transpose(df, (0, 2, 1)), f.shape[2], axis=2)
    blocks = dw_blocks.reshape(batch, num_heads, 4, VALUE_DIM, 4, VALUE_DIM)
    dw = jnp.einsum("bnivjw->nvw", blocks * jnp.eye(4, dtype=_F32)[None, None, :, None, :, None])
    dw = sum_heads(dw, w.shape[0], axis=0)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dw.astype(w.dtype),
            df.astype(f.dtype), dh0)
