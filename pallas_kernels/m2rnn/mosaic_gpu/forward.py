"""The Mosaic GPU forward kernel (docs/kernels.md, "mosaic_gpu": what lives where)."""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import platforms
from pallas_kernels.loops import fori_loop
from pallas_kernels.m2rnn.heads import expand_heads
from pallas_kernels.m2rnn.mosaic_gpu import common
from pallas_kernels.m2rnn.mosaic_gpu.common import (BF16, F32, KEY_DIM, STAGE_SIZE,
                                                    TMA_SMEM_ALIGNMENT, VALUE_DIM)
from pallas_kernels.m2rnn.mosaic_gpu.warp_sums import store_warp_column_sums


def _kernel(*refs, stage, num_stages, stages_per_checkpoint, checkpoints_per_stage,
            heads_per_group, has_keep, save_checkpoints, on_gpu):
    q_ref, k_ref, v_ref, f_ref, w_ref, h0_ref, *rest = refs
    keep_ref = rest.pop(0) if has_keep else None
    y_ref, h_final_ref, *rest = rest
    ckpt_ref = rest.pop(0) if save_checkpoints else None
    (q_smem, k_smem, v_smem, f_smem, keep_smem, y_smem, part_smem, w_smem, h_smem,
     in_barriers, w_barrier) = rest
    if on_gpu:
        # y_t = H_tᵀ q_t: each warp's sums over its 16 rows into per-step SMEM partials, added
        # once per block, so that y is off the state's dependency chain.
        store_partials = plgpu.inline_mgpu(
            arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))(store_warp_column_sums)
    split_state = common.hi_lo_splitter(on_gpu)
    b = lax.axis_index("b")
    head = lax.axis_index("n")
    g = lax.div(head, jnp.int32(heads_per_group))  # the head's q/k group
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)   # (64,): one value per row of H
    col_layout = plgpu.Layout.WGMMA.reduce(0)   # (16,): one value per column of H

    def start_stage_copies(s, slot):
        steps = pl.ds(s * stage, stage)
        barrier = in_barriers.at[slot]
        plgpu.copy_gmem_to_smem(q_ref.at[b, steps, g], q_smem.at[slot], barrier)
        plgpu.copy_gmem_to_smem(k_ref.at[b, steps, g], k_smem.at[slot], barrier)
        plgpu.copy_gmem_to_smem(v_ref.at[b, steps, head], v_smem.at[slot], barrier)
        # f and keep: whole padded slots (the inputs are padded in XLA), so each copy moves a
        # multiple of 128 bytes, as the Lane lowering's copies must.
        window = pl.ds(s * stage, f_smem.shape[1])
        plgpu.copy_gmem_to_smem(f_ref.at[b, head, window], f_smem.at[slot], barrier)
        if has_keep:
            plgpu.copy_gmem_to_smem(keep_ref.at[b, window], keep_smem.at[slot], barrier)

    # W and h0 once per CTA; the first staging block's inputs.
    plgpu.copy_gmem_to_smem(w_ref.at[head], w_smem, w_barrier)
    plgpu.copy_gmem_to_smem(h0_ref.at[b, head], h_smem, w_barrier)
    start_stage_copies(0, 0)
    plgpu.barrier_wait(w_barrier)
    h = plgpu.load(h_smem, layout=wgmma_layout, optimized=False)

    def step(t, h, slot):
        k_t = plgpu.load(k_smem.at[slot, t], layout=row_layout, optimized=False).astype(F32)
        v_t = plgpu.load(v_smem.at[slot, t], layout=col_layout, optimized=False).astype(F32)
        q_t = plgpu.load(q_smem.at[slot, t], layout=row_layout, optimized=False).astype(F32)
        f_t = f_smem[slot, t]
        if has_keep:
            h = h * keep_smem[slot, t]
        k_b = lax.broadcast_in_dim(k_t, (KEY_DIM, VALUE_DIM), [0])
        kv = k_b * lax.broadcast_in_dim(v_t, (KEY_DIM, VALUE_DIM), [1])
        h_parts = split_state(h)  # bf16 hi, lo: H W ≈ hi W + lo W, W exact in bf16
        if on_gpu:
            def products(acc_ref):  # register-A wgmmas into a zero-initialised accumulator
                for a in h_parts:
                    plgpu.wgmma(acc_ref, a, w_smem.at[0])
                return acc_ref[...]  # waits for the wgmmas

            u = pl.run_scoped(products, plgpu.ACC((KEY_DIM, VALUE_DIM), F32)) + kv
        else:
            # The interpreter's wgmma takes the A operand only from SMEM: the same bf16
            # products with float32 accumulation, as a dot.
            u = sum(jnp.dot(a, w_smem[0], preferred_element_type=F32) for a in h_parts) + kv
        z = jnp.tanh(u)
        h = z + f_t * (h - z)
        q_b = lax.broadcast_in_dim(q_t, (KEY_DIM, VALUE_DIM), [0])
        if on_gpu:
            store_partials(h * q_b, part_smem.at[:, t])  # summed over the warps per block
        else:  # the interpreter cannot run inline Mosaic GPU code: y reduced per step
            y_smem[slot, t] = jnp.sum(h * q_b, axis=0).astype(y_smem.dtype)
        return h

    def save_checkpoint(h, index):
        """The state through SMEM to checkpoint ``index`` of (B, S/C, 64, N·16)."""
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        h_smem[...] = h
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            h_smem, ckpt_ref.at[b, index, :, pl.ds(head * VALUE_DIM, VALUE_DIM)])

    piece = stage // checkpoints_per_stage  # steps between checkpoints inside a block

    def stage_body(s, h):
        slot = lax.rem(s, jnp.int32(2))
        if save_checkpoints:
            # The state at the checkpoint interval: every ``stages_per_checkpoint`` staging
            # blocks, or ``checkpoints_per_stage`` times per block (below).
            @pl.when(lax.rem(s, jnp.int32(stages_per_checkpoint)) == 0)
            def _():
                save_checkpoint(h, lax.div(s, jnp.int32(stages_per_checkpoint))
                                * checkpoints_per_stage)
        # Every thread is past its reads of the other slot (the last block): prefetch into it.
        plgpu.commit_smem()

        @pl.when(s + 1 < num_stages)
        def _():
            start_stage_copies(s + 1, 1 - slot)

        plgpu.barrier_wait(in_barriers.at[slot])
        # The y slot written two blocks ago must have been read by its copy to GMEM.
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        for p in range(checkpoints_per_stage):
            if p and save_checkpoints:
                save_checkpoint(h, s * checkpoints_per_stage + p)
            h = fori_loop(p * piece, (p + 1) * piece, lambda t, h: step(t, h, slot), h)
        if on_gpu:
            plgpu.commit_smem()  # every warp's partial sums are written
            y_smem[slot] = (part_smem[0] + part_smem[1] + part_smem[2] + part_smem[3]).astype(
                y_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_smem.at[slot], y_ref.at[b, pl.ds(s * stage, stage), head])
        return h

    h = fori_loop(0, num_stages, stage_body, h)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    h_smem[...] = h
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(h_smem, h_final_ref.at[b, head])
    plgpu.wait_smem_to_gmem(0)


def padded_slot(stage):
    """Steps in an f or keep slot: ``stage`` rounded up to whole ``TMA_SMEM_ALIGNMENT`` bytes."""
    steps_per_alignment = TMA_SMEM_ALIGNMENT // 4  # float32 f and keep
    return -(-stage // steps_per_alignment) * steps_per_alignment


def scratch_types(stage, dtype, has_keep, on_gpu):
    """The forward's SMEM and barriers for staging blocks of ``stage`` steps. The
    double-buffered slots are TMA destinations (y's a source), so each is a multiple of
    ``TMA_SMEM_ALIGNMENT`` bytes: f and keep (4 bytes a step) are padded to a multiple of 32
    steps (q, k, v, y take 128, 128, 32, 32 bytes a step, and ``stage`` is a multiple of 16)."""
    padded = padded_slot(stage)
    w_transforms = (plgpu.TilingTransform((8, VALUE_DIM)), plgpu.SwizzleTransform(32))
    return [
        plgpu.SMEM((2, stage, KEY_DIM), dtype),             # q (two slots: double buffering)
        plgpu.SMEM((2, stage, KEY_DIM), dtype),             # k
        plgpu.SMEM((2, stage, VALUE_DIM), dtype),           # v
        plgpu.SMEM((2, padded), F32),                       # f
        plgpu.SMEM((2, padded), F32),                       # keep (unused without keep)
        plgpu.SMEM((2, stage, VALUE_DIM), dtype),           # y
        plgpu.SMEM((4, stage if on_gpu else 1, VALUE_DIM), F32),  # per-warp y partials
        plgpu.SMEM((1, VALUE_DIM, VALUE_DIM), BF16, transforms=w_transforms),  # W
        plgpu.SMEM((KEY_DIM, VALUE_DIM), F32),              # h0 / checkpoints / final state
        # One arrival per TMA copy that signals the barrier.
        plgpu.Barrier(num_barriers=2, num_arrivals=5 if has_keep else 4),
        plgpu.Barrier(num_arrivals=2),
    ]


def forward(q, k, v, w, f, h0, keep, *, chunk_size, save_checkpoints):
    """``(y (B, S, N, 16), h_final (B, N, 64, 16) float32, checkpoints)`` for bfloat16 inputs.

    ``checkpoints`` is ``(B, S/C, 64, N·16)`` float32 (the state at each chunk start) or
    ``None``. Inputs and y are staged through SMEM in blocks of ``STAGE_SIZE`` steps when S is a
    multiple of it and the checkpoint interval ``chunk_size`` is a multiple or a divisor of it
    (the state is then saved every ``chunk_size / STAGE_SIZE`` blocks, or ``STAGE_SIZE /
    chunk_size`` times per block), else in blocks of ``chunk_size`` steps.
    """
    common.check_supported(q, k, v, w, f, h0, keep, chunk_size)
    on_gpu = not platforms.interpret("gpu")
    batch, seq_len = q.shape[:2]
    num_heads = h0.shape[1]
    dtype = v.dtype
    groups, qg, kg, vn, fn = common.per_head_inputs(q, k, v, f, num_heads)
    if seq_len % STAGE_SIZE == 0 and (chunk_size % STAGE_SIZE == 0
                                      or STAGE_SIZE % chunk_size == 0):
        stage = STAGE_SIZE
    else:
        stage = chunk_size
    # (N, 1, 16, 16): the stack of W's bf16 parts the wgmma reads, one for bfloat16 W.
    w_parts = expand_heads(w, num_heads, axis=0).astype(BF16)[:, None]
    has_keep = keep is not None

    tail = padded_slot(stage) - stage  # the last block's f and keep windows stay in bounds
    inputs = [qg, kg, vn, jnp.pad(fn, ((0, 0), (0, 0), (0, tail))), w_parts, h0.astype(F32)]
    if has_keep:
        inputs.append(jnp.pad(keep.astype(F32), ((0, 0), (0, tail))))
    out_type = [jax.ShapeDtypeStruct((batch, seq_len, num_heads, VALUE_DIM), dtype),
                jax.ShapeDtypeStruct((batch, num_heads, KEY_DIM, VALUE_DIM), F32)]
    if save_checkpoints:
        out_type.append(jax.ShapeDtypeStruct(
            (batch, seq_len // chunk_size, KEY_DIM, num_heads * VALUE_DIM), F32))

    scratch = scratch_types(stage, dtype, has_keep, on_gpu)
    kernel = functools.partial(
        _kernel, stage=stage, num_stages=seq_len // stage,
        stages_per_checkpoint=max(1, chunk_size // stage),
        checkpoints_per_stage=max(1, stage // chunk_size),
        heads_per_group=num_heads // groups, has_keep=has_keep,
        save_checkpoints=save_checkpoints, on_gpu=on_gpu)
    outs = common.launch(kernel, out_type, scratch, (batch, num_heads), no_auto_barriers=False,
                         name="m2rnn_forward_mosaic")(*inputs)
    checkpoints = outs[2] if save_checkpoints else None
    return outs[0], outs[1], checkpoints
