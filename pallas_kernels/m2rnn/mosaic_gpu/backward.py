"""The Mosaic GPU backward kernel (docs/kernels.md, "mosaic_gpu": what lives where)."""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import platforms
from pallas_kernels.loops import fori_loop
from pallas_kernels.m2rnn.heads import expand_heads, sum_heads
from pallas_kernels.m2rnn.mosaic_gpu import common, warp_sums
from pallas_kernels.m2rnn.mosaic_gpu.common import BF16, F32, KEY_DIM, VALUE_DIM

# The walk back recomputes RECORD_EVERY states into registers at once from the states recorded
# every RECORD_EVERY steps; the dW wgmma takes DW_STEPS steps at once (M = DW_STEPS·16 = 64).
# Two states rather than four keep the kernel under 168 registers, so that 3 CTAs fit an SM.
RECORD_EVERY = 2
DW_STEPS = 4


def _kernel(*refs, chunk, num_chunks, heads_per_group, has_keep, clip, on_gpu):
    # fk_ref: (B, N, S/C, 2C) float32, a chunk's f then its keep (zeros without keep): one
    # TMA copy of 8·C bytes, a multiple of 128 as the Lane lowering's copies must be.
    q_ref, k_ref, v_ref, fk_ref, w_ref, wt_ref, *rest = refs
    # On the GPU dq_ref/dk_ref are the zero-initialised (B, S, L, 64) float32 Refs (inputs
    # aliased to outputs) that the group's heads add into; in the interpreter per-head
    # (B, S, N, 64) outputs: same position. Names ending in ``_s`` are SMEM scratch (the
    # ``scratch`` list of ``backward`` says what each holds).
    (ckpt_ref, dy_ref, dhf_ref, dq_ref, dk_ref, dv_ref, df_ref, dw_ref, dh0_ref,
     q_s, k_s, v_s, dy_s, fk_s, w_s, wt_s, states_s, h_prev_stack_s, du_stack_s,
     dq_s, dk_s, dv_s, df_s, in_bar, w_bar, dv_warp_partials_s, df_warp_partials_s) = rest
    if on_gpu:
        def inline(body):
            return plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))(body)

        row_sums, col_partials, warp_totals = (
            inline(warp_sums.store_row_sums), inline(warp_sums.store_warp_column_sums),
            inline(warp_sums.store_warp_totals))

        def sum_partials(src, dst, axis):
            plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))(
                functools.partial(warp_sums.sum_partials, axis=axis))(src, dst)
    b = lax.axis_index("b")
    n = lax.axis_index("n")
    grp = lax.div(n, jnp.int32(heads_per_group))
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    records = chunk // RECORD_EVERY
    halves = DW_STEPS // RECORD_EVERY
    cols = pl.ds(n * VALUE_DIM, VALUE_DIM)

    plgpu.copy_gmem_to_smem(w_ref.at[n], w_s, w_bar)
    plgpu.copy_gmem_to_smem(wt_ref.at[n], wt_s, w_bar)
    # states_s[0] is also where dh_final, each chunk's checkpoint, dh0 and dW pass through.
    plgpu.copy_gmem_to_smem(dhf_ref.at[b, n], states_s.at[0], w_bar)
    plgpu.barrier_wait(w_bar)
    g_later = plgpu.load(states_s.at[0], layout=wgmma_layout, optimized=False)

    def clamp(x):
        return x if clip is None else jnp.minimum(jnp.maximum(x, -clip), clip)

    split_state = common.hi_lo_splitter(on_gpu)  # as the forward's
    split_grad = common.hi_lo_splitter(on_gpu)   # du: bf16's exponent range

    def matmul_w(x, w_smem, split, addend):
        """addend + x (64×16 float32) · w (16×16 bf16 in SMEM) on the bf16 parts ``split``
        makes."""
        parts = split(x)
        if not on_gpu:
            return sum(jnp.dot(a, w_smem[...], preferred_element_type=F32)
                       for a in parts) + addend

        def products(acc_ref):
            for a in parts:
                plgpu.wgmma(acc_ref, a, w_smem)
            return acc_ref[...]

        return pl.run_scoped(products, plgpu.ACC((KEY_DIM, VALUE_DIM), F32)) + addend

    def load_step(t):
        k_t = plgpu.load(k_s.at[t], layout=row_layout, optimized=False).astype(F32)
        v_t = plgpu.load(v_s.at[t], layout=col_layout, optimized=False).astype(F32)
        keep_t = fk_s[chunk + t] if has_keep else None
        return k_t, v_t, fk_s[t], keep_t

    def advance(h, t):
        """H_{t-1} before a reset -> (Z_t, H_t)."""
        k_t, v_t, f_t, keep_t = load_step(t)
        if keep_t is not None:
            h = h * keep_t
        kv = lax.broadcast_in_dim(k_t, (KEY_DIM, VALUE_DIM), [0]) * lax.broadcast_in_dim(
            v_t, (KEY_DIM, VALUE_DIM), [1])
        z = jnp.tanh(matmul_w(h, w_s, split_state, kv))
        return z, z + f_t * (h - z)

    def chunk_loop(acc_ref, g_later, dw):
        def chunk_body(i, acc):
            g_later, dw = acc
            c = num_chunks - 1 - i
            steps = pl.ds(c * chunk, chunk)
            # The previous chunk's output blocks have been read by their copies, and every
            # thread is past its reads of states_s (its slot 0 takes the checkpoint).
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.commit_smem()
            plgpu.copy_gmem_to_smem(q_ref.at[b, steps, grp], q_s, in_bar)
            plgpu.copy_gmem_to_smem(k_ref.at[b, steps, grp], k_s, in_bar)
            plgpu.copy_gmem_to_smem(v_ref.at[b, steps, n], v_s, in_bar)
            plgpu.copy_gmem_to_smem(dy_ref.at[b, steps, n], dy_s, in_bar)
            plgpu.copy_gmem_to_smem(fk_ref.at[b, n, c], fk_s, in_bar)
            plgpu.copy_gmem_to_smem(ckpt_ref.at[b, c, :, cols], states_s.at[0], in_bar)
            plgpu.barrier_wait(in_bar)

            # Phase 1: the state every RECORD_EVERY steps, into SMEM (the first is the
            # checkpoint itself).
            def record(j, h):
                for m in range(RECORD_EVERY):
                    _, h = advance(h, j * RECORD_EVERY + m)
                states_s[j + 1] = h
                return h

            h = plgpu.load(states_s.at[0], layout=wgmma_layout, optimized=False)
            fori_loop(0, records - 1, record, h)
            plgpu.commit_smem()  # states_s is written (read back in another layout, maybe)

            # Phase 2: DW_STEPS steps at a time in reverse, each RECORD_EVERY steps recomputed
            # into registers from their recorded state and walked back; one dW wgmma per
            # DW_STEPS steps.
            def walk_back(i2, acc):
                g_later, dw = acc
                group = chunk // DW_STEPS - 1 - i2
                for half in reversed(range(halves)):
                    j = group * halves + half
                    befores = [plgpu.load(states_s.at[j], layout=wgmma_layout,
                                          optimized=False)]
                    zs = []
                    for m in range(RECORD_EVERY):
                        z, h = advance(befores[-1], j * RECORD_EVERY + m)
                        befores.append(h)
                        zs.append(z)
                    if on_gpu and half == halves - 1:
                        plgpu.wgmma_wait(0)  # the last dW wgmma has read the stacks
                    for m in reversed(range(RECORD_EVERY)):
                        t = j * RECORD_EVERY + m
                        k_t, v_t, f_t, keep_t = load_step(t)
                        q_t = plgpu.load(q_s.at[t], layout=row_layout,
                                         optimized=False).astype(F32)
                        dy_t = plgpu.load(dy_s.at[t], layout=col_layout,
                                          optimized=False).astype(F32)
                        dy_b = lax.broadcast_in_dim(dy_t, (KEY_DIM, VALUE_DIM), [1])
                        # docs/math.md §2: clamp what arrives from later steps, then add the
                        # read-out's.
                        g = clamp(g_later) + lax.broadcast_in_dim(
                            q_t, (KEY_DIM, VALUE_DIM), [0]) * dy_b
                        # The state the step read (after a reset), recomputed rather than held.
                        h_prev = befores[m] if keep_t is None else befores[m] * keep_t
                        z = zs[m]
                        du = (1.0 - f_t) * g * (1.0 - z * z)
                        g_later = matmul_w(du, wt_s, split_grad, f_t * g)
                        if keep_t is not None:
                            g_later = g_later * keep_t
                        # No cross-warp exchange per step: dq/dk row sums are warp-local; dv
                        # and df as per-warp partials, summed once per chunk.
                        p_dq = befores[m + 1] * dy_b
                        p_dk = du * lax.broadcast_in_dim(v_t, (KEY_DIM, VALUE_DIM), [1])
                        p_dv = du * lax.broadcast_in_dim(k_t, (KEY_DIM, VALUE_DIM), [0])
                        p_df = g * (h_prev - z)
                        if on_gpu:
                            row_sums(p_dq, dq_s.at[t])
                            row_sums(p_dk, dk_s.at[t])
                            col_partials(p_dv, dv_warp_partials_s.at[:, t])
                            warp_totals(p_df, df_warp_partials_s.at[t])
                            blk = pl.ds((half * RECORD_EVERY + m) * VALUE_DIM, VALUE_DIM)
                            h_prev_stack_s[:, blk] = h_prev.astype(BF16)
                            du_stack_s[:, blk] = du.astype(BF16)
                        else:  # the same sums as jnp ops (no inline Mosaic GPU code)
                            dq_s[t] = jnp.sum(p_dq, axis=1)
                            dk_s[t] = jnp.sum(p_dk, axis=1)
                            dv_warp_partials_s[:, t] = jnp.sum(
                                p_dv.reshape(4, 16, VALUE_DIM), axis=1)
                            df_warp_partials_s[t] = jnp.sum(p_df.reshape(4, 16 * VALUE_DIM),
                                                            axis=1)
                            dw = dw + jnp.dot(h_prev.T, du, preferred_element_type=F32)
                if on_gpu:
                    # dW += Σ_m H_{t-1}ᵀ du_t: one wgmma, M = (step, column of H), N = (step,
                    # column of du); the diagonal 16×16 blocks are summed outside.
                    plgpu.commit_smem()
                    plgpu.wgmma(acc_ref, h_prev_stack_s.transpose((1, 0)), du_stack_s)
                return g_later, dw

            acc = fori_loop(0, chunk // DW_STEPS, walk_back, (g_later, dw))
            plgpu.commit_smem()  # every warp's sums are written
            if on_gpu:  # inline code: no layout inference on these small blocks
                sum_partials(dv_warp_partials_s, dv_s, 0)
                sum_partials(df_warp_partials_s, df_s, 1)
            else:
                dv_s[...] = jnp.sum(dv_warp_partials_s[...], axis=0).astype(dv_s.dtype)
                df_s[...] = jnp.sum(df_warp_partials_s[...], axis=1)
            plgpu.commit_smem()
            if on_gpu:
                # Sum over the heads of the q/k group in GMEM (L2): TMA reduce-add into the
                # zero-initialised float32 buffers.
                plgpu.copy_smem_to_gmem(dq_s, dq_ref.at[b, steps, grp], reduction_op="add")
                plgpu.copy_smem_to_gmem(dk_s, dk_ref.at[b, steps, grp], reduction_op="add")
            else:  # the interpreter has no TMA reductions: per head, summed in XLA
                plgpu.copy_smem_to_gmem(dq_s, dq_ref.at[b, steps, n])
                plgpu.copy_smem_to_gmem(dk_s, dk_ref.at[b, steps, n])
            plgpu.copy_smem_to_gmem(dv_s, dv_ref.at[b, steps, n])
            plgpu.copy_smem_to_gmem(df_s, df_ref.at[b, n, steps])
            return acc

        return fori_loop(0, num_chunks, chunk_body, (g_later, dw))

    if on_gpu:
        def with_acc(acc_ref):
            g_later_out, _ = chunk_loop(acc_ref, g_later, None)
            plgpu.wgmma_wait(0)
            return g_later_out, acc_ref[...]

        g_later, dw_blocks = pl.run_scoped(with_acc, plgpu.ACC((KEY_DIM, KEY_DIM), F32))
        # Column block i of the 64×64 accumulator holds dW's i-th diagonal block in rows
        # 16i..16i+16 (the rest is discarded outside).
        dw_columns = [dw_blocks[:, i * VALUE_DIM:(i + 1) * VALUE_DIM] for i in range(DW_STEPS)]
    else:
        g_later, dw = chunk_loop(None, g_later, jnp.zeros((VALUE_DIM, VALUE_DIM), F32))
        zero = jnp.zeros((KEY_DIM, VALUE_DIM), F32)
        dw_columns = [zero.at[0:VALUE_DIM].set(dw)] + [zero] * (DW_STEPS - 1)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for i, column in enumerate(dw_columns):
        states_s[i] = column
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(states_s.at[pl.ds(0, DW_STEPS)], dw_ref.at[b, n])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    states_s[0] = g_later
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(states_s.at[0], dh0_ref.at[b, n])
    plgpu.wait_smem_to_gmem(0)


def backward(q, k, v, w, f, h0, keep, checkpoints, dy, dh_final, *, gradient_clipping,
             chunk_size):
    """``(dq, dk, dv, dw, df, dh0)`` for bfloat16 inputs, from the checkpoints of this
    backend's ``forward`` with the same ``chunk_size``."""
    del h0  # the checkpoints start with it
    common.check_supported(q, k, v, w, f, dh_final, keep, chunk_size)
    on_gpu = not platforms.interpret("gpu")
    batch, seq_len = q.shape[:2]
    num_heads = dh_final.shape[1]
    dtype = v.dtype
    groups, qg, kg, vn, fn = common.per_head_inputs(q, k, v, f, num_heads)
    wn = expand_heads(w, num_heads, axis=0).astype(BF16)
    wt = jnp.swapaxes(wn, 1, 2)
    has_keep = keep is not None
    c = chunk_size
    f_chunks = fn.reshape(batch, num_heads, seq_len // c, c)
    keep_chunks = (jnp.zeros_like(f_chunks) if keep is None else jnp.broadcast_to(
        keep.astype(F32).reshape(batch, 1, seq_len // c, c), f_chunks.shape))
    inputs = [qg, kg, vn, jnp.concatenate([f_chunks, keep_chunks], axis=-1), wn, wt]
    inputs += [checkpoints, dy.astype(dtype), dh_final.astype(F32)]
    if on_gpu:
        # Zero-initialised accumulators, passed as Refs: the kernel adds into them in place.
        qk_refs = [jax.new_ref(jnp.zeros((batch, seq_len, groups, KEY_DIM), F32))
                   for _ in range(2)]
        inputs += qk_refs
        out_type = []
    else:
        out_type = [jax.ShapeDtypeStruct((batch, seq_len, num_heads, KEY_DIM), F32)] * 2
    out_type += [
        jax.ShapeDtypeStruct((batch, seq_len, num_heads, VALUE_DIM), dtype),         # dv
        jax.ShapeDtypeStruct((batch, num_heads, seq_len), F32),                     # df
        jax.ShapeDtypeStruct((batch, num_heads, DW_STEPS, KEY_DIM, VALUE_DIM), F32),  # dW cols
        jax.ShapeDtypeStruct((batch, num_heads, KEY_DIM, VALUE_DIM), F32),          # dh0
    ]
    w_transforms = (plgpu.TilingTransform((8, VALUE_DIM)), plgpu.SwizzleTransform(32))
    scratch = [
        plgpu.SMEM((c, KEY_DIM), dtype),                     # q
        plgpu.SMEM((c, KEY_DIM), dtype),                     # k
        plgpu.SMEM((c, VALUE_DIM), dtype),                   # v
        plgpu.SMEM((c, VALUE_DIM), dtype),                   # dy
        plgpu.SMEM((2 * c,), F32),                           # f, then keep
        plgpu.SMEM((VALUE_DIM, VALUE_DIM), BF16, transforms=w_transforms),  # W
        plgpu.SMEM((VALUE_DIM, VALUE_DIM), BF16, transforms=w_transforms),  # Wᵀ
        plgpu.SMEM((c // RECORD_EVERY, KEY_DIM, VALUE_DIM), F32),  # recorded states
        # The dW wgmma's operands: H_{t-1} and du of DW_STEPS steps side by side.
        plgpu.SMEM((KEY_DIM, KEY_DIM), BF16, transforms=w_transforms),  # H_{t-1} stack
        plgpu.SMEM((KEY_DIM, KEY_DIM), BF16, transforms=w_transforms),  # du stack
        plgpu.SMEM((c, KEY_DIM), F32),                       # dq (row sums)
        plgpu.SMEM((c, KEY_DIM), F32),                       # dk (row sums)
        plgpu.SMEM((c, VALUE_DIM), dtype),                   # dv
        plgpu.SMEM((c,), F32),                               # df
        plgpu.Barrier(num_arrivals=6),                       # a chunk's inputs, one per TMA copy
        plgpu.Barrier(num_arrivals=3),                       # W, Wᵀ and dh_final
        plgpu.SMEM((4, c, VALUE_DIM), F32),                  # per-warp dv partials
        plgpu.SMEM((c, 4), F32),                             # per-warp df partials
    ]
    kernel = functools.partial(
        _kernel, chunk=chunk_size, num_chunks=seq_len // chunk_size,
        heads_per_group=num_heads // groups, has_keep=has_keep, clip=gradient_clipping,
        on_gpu=on_gpu)
    # No automatic barriers: the per-step Pallas stores left are the dW stacks, written and
    # read by wgmma across commit_smem / wgmma_wait.
    outs = common.launch(kernel, out_type, scratch, (batch, num_heads), no_auto_barriers=True,
                         name="m2rnn_backward_mosaic")(*inputs)
    if on_gpu:
        dv, df, dw_blocks, dh0 = outs
        dq, dk = qk_refs[0][...], qk_refs[1][...]   # already summed over the group's heads
    else:
        dq, dk, dv, df, dw_blocks, dh0 = outs
        # Per-head dq/dk -> the L = lcm(Nq, Nk) groups.
        heads_per_group = num_heads // groups
        dq = jnp.sum(dq.reshape(batch, seq_len, groups, heads_per_group, KEY_DIM), axis=3)
        dk = jnp.sum(dk.reshape(batch, seq_len, groups, heads_per_group, KEY_DIM), axis=3)
    # The L groups -> q's and k's own heads.
    dq = sum_heads(dq, q.shape[2], axis=2)
    dk = sum_heads(dk, k.shape[2], axis=2)
    dv = sum_heads(dv.astype(F32), v.shape[2], axis=2)
    df = sum_heads(jnp.transpose(df, (0, 2, 1)), f.shape[2], axis=2)
    # Column block i's rows 16i..16i+16: dW's i-th diagonal block.
    blocks = dw_blocks.reshape(batch, num_heads, DW_STEPS, DW_STEPS, VALUE_DIM, VALUE_DIM)
    dw = jnp.einsum("bniivw->nvw", blocks)
    dw = sum_heads(dw, w.shape[0], axis=0)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dw.astype(w.dtype),
            df.astype(f.dtype), dh0)
