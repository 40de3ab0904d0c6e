"""M²RNN forward and backward kernels in Pallas Mosaic GPU (Hopper: TMA + WGMMA, fixed layouts).

For the paper's shape family (K = 64, V = 16, bfloat16). Same ``forward`` signature as the
backend interface of ``m2rnn_jax.reference``; the checkpoints it returns (when asked) have the
layout of ``pallas_kernels.m2rnn.gpu.forward`` (``(B, S/C, Kp, N·Vp)`` float32, Kp = 64,
Vp = 16), so the Triton backward of ``gpu.py`` can consume them.

Tiling (what lives where):
  * Grid ``(B, N)``: one CTA of one warpgroup (128 threads) per (batch row, head). The CTA walks
    the whole sequence in chunks of ``C`` steps.
  * The state ``H`` (64×16 float32) is a register array in the WGMMA accumulator layout
    (8 values per thread). ``H W`` runs on the tensor core as ``wgmma m64n16k16`` with the A
    operand from registers: ``H`` is split into ``state_split`` bf16 parts (hi, lo[, lo2]) and
    float32 ``W`` likewise; the products of total order < ``state_split`` are accumulated in
    float32 (bf16 inputs: 2 parts of H, W exact: 2 wgmmas; float32 inputs: 3 and 3: 6 wgmmas,
    ~24 mantissa bits). The accumulator starts at zero; ``k_t v_tᵀ`` is added after.
  * Per chunk, q/k (C×64, the head's q/k group), v (C×16), f (C), keep (C) are copied
    GMEM→SMEM with TMA into one of two slots (the next chunk is prefetched while this one runs);
    ``y`` (C×16) is written to an SMEM slot and copied to GMEM once per chunk.
  * ``y_t = H_tᵀ q_t`` is a reduction over the 64 rows (across the 4 warps). ``y_reduction=
    "per_step"``: Mosaic's ``reduce_sum(axis=0)`` each step (shuffles, then an SMEM exchange and
    a warpgroup barrier). ``"warp_partials"``: each warp sums its 16 rows with shuffles and
    stores 16 partial sums to SMEM (inline Mosaic GPU code, no barrier); the 4 warps' partials
    are added once per chunk. ``y_t`` is off the dependency chain (``H_{t+1}`` does not need it).
  * Knobs for the GPU run: ``approx_tanh`` (``CompilerParams(approx_math=True)``: tanh.approx),
    ``unroll`` (steps per loop iteration), ``no_auto_barriers``
    (``CompilerParams(unsafe_no_auto_barriers=True)``: threads exchange data through SMEM only
    across explicit ``commit_smem`` barriers — the per-warp partials, TMA'd inputs/outputs —
    and h_smem is read and written by each thread at the same addresses).

Backward (``backward``; what lives where): grid ``(B, N)``, one warpgroup per CTA, chunks in
reverse. Per chunk: q/k/v/dy/f/keep and the chunk's checkpoint TMA'd to SMEM; the state every
4 steps recomputed into SMEM (``sub_s``, C/4 × 64×16 float32); per sub-chunk the 4 states in
registers; ``g`` (the state gradient) a WGMMA-layout register array; ``du Wᵀ`` a register-A
wgmma; dW a 64×64 wgmma accumulator fed from bf16 SMEM stacks of H_{t-1} and du (``xs_s``,
``ds_s``, written every step). Per-step outputs dq, dk (row sums), dv (column sums) and df
(total) go to SMEM blocks copied to GMEM once per chunk. Defaults (measured): Pallas stores
per step with Mosaic's automatic barriers, dv/df reduced across the 4 warps every step, dq/dk
per head in bf16 summed in XLA. Options (opt-in, see ``backward``): ``reductions="warp_sums"``
(inline per-warp sums in SMEM: ``dvp`` (4, C, 16), ``dfp`` (C, 4), float32 dq/dk rows (C, 64);
added once per chunk), ``qk_grad_sum="kernel"`` (float32 dq/dk blocks TMA reduce-added into
zero-initialised (B, S, L, 64) float32 ``jax.new_ref`` buffers), ``no_auto_barriers``,
``approx_tanh``.

Inputs are re-laid out in XLA first: q/k expanded to ``L = lcm(Nq, Nk)`` groups, v to N heads,
f transposed to ``(B, N, S)`` float32 (a 1-D TMA per head and chunk), W to bf16 hi/lo parts.

Test off the GPU with ``interpret=True`` (the Mosaic GPU interpreter). Its wgmma takes the A
operand only from SMEM and it cannot run inline Mosaic GPU code, so in interpret mode the products
are the same bf16 parts as a ``jnp.dot`` with float32 accumulation and y is reduced per step.
``jax.export`` for ``platforms=["cuda"]`` runs Mosaic GPU's layout inference and lowering on a
CPU-only machine (for sm_90) and so checks the real paths (``tests/test_kernel_mosaic_gpu.py``).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from m2rnn_jax.heads import expand_heads, sum_heads

# The checkpoint interval. 32 measured faster than 64 on an H200 (8×4096×84 fwd+bwd 21.9 vs
# 30.0 ms) for 0.17 GiB more memory (1.20 vs 1.03 GiB); benchmarks/RESULTS.md.
DEFAULT_CHUNK_SIZE = 32
DEFAULT_STAGE_SIZE = 32  # bf16: ~25 KiB of SMEM per CTA (64: ~46 KiB, at most 4 CTAs per SM)
KEY_DIM = 64
VALUE_DIM = 16
_F32 = jnp.float32
_BF16 = jnp.bfloat16
_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16),)


def choose_chunk_size(seq_len, requested):
    if requested is None:
        requested = DEFAULT_CHUNK_SIZE
    if not isinstance(requested, int) or requested < 8 or requested % 8:
        raise ValueError(f"chunk_size for the Mosaic GPU kernel must be a positive multiple of 8, "
                         f"got {requested!r}")
    return min(requested, -(-seq_len // 8) * 8)


def _unsupported(q, k, v, w, f, h0):
    """Why these inputs do not fit the kernels (empty when they do)."""
    batch, seq_len, nq, key_dim = q.shape
    num_heads, value_dim = h0.shape[1], v.shape[-1]
    problems = []
    if key_dim != KEY_DIM or k.shape[-1] != KEY_DIM:
        problems.append(f"K must be {KEY_DIM} (got {key_dim})")
    if value_dim != VALUE_DIM or w.shape[-2:] != (VALUE_DIM, VALUE_DIM):
        problems.append(f"V must be {VALUE_DIM} (got {value_dim})")
    if h0.shape != (batch, num_heads, KEY_DIM, VALUE_DIM):
        problems.append(f"h0 must be (B, N, {KEY_DIM}, {VALUE_DIM}) (got {h0.shape})")
    for name, x in (("q", q), ("k", k), ("v", v), ("w", w)):
        if jnp.dtype(x.dtype) not in _SUPPORTED_DTYPES:
            problems.append(
                f"{name} must be bfloat16 (got {x.dtype}); float32 inputs: use the Triton kernel "
                f"(pallas_kernels.m2rnn.gpu) — the float32 Mosaic path (3-part split) missed 1e-4 "
                f"on an H200 (y rel. error 2.2e-3)")
    if jnp.dtype(f.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        problems.append(f"f must be bfloat16 or float32 (got {f.dtype})")
    heads = (nq, k.shape[2], v.shape[2], f.shape[2], w.shape[0])
    if any(num_heads % h for h in heads):
        problems.append(f"every head count must divide N = {num_heads} (got {heads})")
    return problems


def _check_supported(q, k, v, w, f, h0, keep, chunk_size):
    batch, seq_len = q.shape[:2]
    problems = _unsupported(q, k, v, w, f, h0)
    if not isinstance(chunk_size, int) or chunk_size < 8 or chunk_size % 8 or seq_len % chunk_size:
        problems.append(f"chunk_size must be a multiple of 8 dividing S = {seq_len} "
                        f"(got {chunk_size})")
    if keep is not None and keep.shape != (batch, seq_len):
        problems.append(f"keep must be (B, S) (got {keep.shape})")
    if problems:
        raise ValueError("Mosaic GPU M²RNN kernels do not support these inputs: "
                         + "; ".join(problems))


def supports(q, k, v, w, f, h0):
    """True when the op's inputs fit these kernels (bfloat16, K = 64, V = 16) and the GPU is a
    Hopper (wgmma: compute capability 9.x). ``backend="auto"`` picks them then."""
    device = jax.devices()[0]
    if device.platform != "gpu" or not str(getattr(device, "compute_capability", "")).startswith("9"):
        return False
    return not _unsupported(q, k, v, w, f, h0)


def _per_head_inputs(q, k, v, f, num_heads):
    """The kernels' input layout (XLA side): q/k expanded to L = lcm(Nq, Nk) groups, v to N
    heads, f to N heads as float32 ``(B, N, S)`` (one 1-D TMA per head and block)."""
    groups = math.lcm(q.shape[2], k.shape[2])
    fn = jnp.transpose(expand_heads(f, num_heads, axis=2).astype(_F32), (0, 2, 1))
    return (groups, expand_heads(q, groups, axis=2), expand_heads(k, groups, axis=2),
            expand_heads(v, num_heads, axis=2), fn)


def _launch(kernel, out_type, scratch, grid, approx_tanh, no_auto_barriers, interpret, name):
    """``plgpu.kernel`` over the (batch, head) grid, one warpgroup per CTA; the Mosaic GPU
    interpreter when ``interpret``."""
    return plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=("b", "n"),
        compiler_params=plgpu.CompilerParams(approx_math=bool(approx_tanh),
                                             unsafe_no_auto_barriers=bool(no_auto_barriers)),
        interpret=plgpu.InterpretGPUParams() if interpret else None, kernel_name=name)


def _bf16_parts(x, parts):
    """x ≈ sum of ``parts`` bf16 terms (each the bf16 rounding of what the previous left)."""
    out = []
    rest = x.astype(_F32)
    for _ in range(parts):
        part = rest.astype(_BF16)
        out.append(part)
        rest = rest - part.astype(_F32)
    return out


def _products(state_parts, weight_parts):
    """The (state part, weight part) products kept: those of total order < state_parts."""
    return [(i, j) for i in range(state_parts) for j in range(weight_parts)
            if i + j < state_parts]


def _wgmma_registers_and_lane(p):
    """For the inline Mosaic GPU helpers below: ``p``'s registers (a 64×16 float32 array in the
    WGMMA layout), this thread's warp and lane in the warpgroup, and an i32 constant maker."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    i32 = ir.IntegerType.get_signless(32)
    const = lambda x: mgpu_utils.c(x, i32)
    regs = p.registers
    if regs.shape != (1, 2, 1, 1, 2, 1, 1, 1, 1):
        raise NotImplementedError(f"unexpected WGMMA register shape {regs.shape}")
    tid = arith.remui(mgpu_utils.thread_idx(), const(128))
    return regs, arith.divui(tid, const(32)), arith.remui(tid, const(32)), const


def _store_warp_partial_sums(ctx, p, part_ref):
    """Mosaic GPU code: each warp's sum over its 16 rows of ``p`` (64×16 float32, WGMMA layout)
    into ``part_ref[warp, :]`` (a (4, 16) float32 SMEM ref); no cross-warp exchange.

    In the WGMMA layout thread (warp w, lane l) holds rows 16w + 8i + l//4 (i = 0, 1) and columns
    8j + 2(l%4) + e (j, e = 0, 1) as registers [0, j, 0, 0, i, 0, 0, 0, 0] of 2 values.
    """
    del ctx
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, vector
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    index = ir.IndexType.get()
    regs, warp, lane, const = _wgmma_registers_and_lane(p)
    col0 = arith.muli(arith.remui(lane, const(4)), const(2))
    for j in range(2):
        part = arith.addf(regs[0, j, 0, 0, 0, 0, 0, 0, 0], regs[0, j, 0, 0, 1, 0, 0, 0, 0])
        for distance in (4, 8, 16):  # the lane bits that select the row (l // 4)
            part = arith.addf(part, mgpu_utils.shfl_bfly(part, distance))
        col = arith.addi(col0, const(8 * j))
        vector.store(part, part_ref, [arith.index_cast(index, warp), arith.index_cast(index, col)])


def _store_warp_sums(ctx, p, ref, *, over):
    """Mosaic GPU code for the backward: sums of ``p`` (64×16 float32, WGMMA layout) stored to
    SMEM by each warp without any cross-warp exchange (no barrier).

    ``over="columns"``: the 64 row sums (sum over the 16 columns) into ``ref[row]`` ((64,)
    float32; rows are warp-local, so these are the full sums). ``over="warp_rows"``: each warp's
    sums over its 16 rows into ``ref[warp, :]`` ((4, 16) float32), as ``_store_warp_partial_sums``.
    ``over="warp_all"``: each warp's sum of its 16×16 block into ``ref[warp]`` ((4,) float32).
    Layout: see ``_store_warp_partial_sums``. Every lane of a group holding the same sum stores it
    (same value, same address).
    """
    if over == "warp_rows":
        return _store_warp_partial_sums(ctx, p, ref)
    del ctx
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, vector
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    index = ir.IndexType.get()
    regs, warp, lane, const = _wgmma_registers_and_lane(p)

    def element_sum(vec):  # vector<2xf32> -> f32
        e0 = vector.extract(vec, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([0]))
        e1 = vector.extract(vec, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([1]))
        return arith.addf(e0, e1)

    if over == "columns":
        for i in range(2):
            s = element_sum(arith.addf(regs[0, 0, 0, 0, i, 0, 0, 0, 0],
                                       regs[0, 1, 0, 0, i, 0, 0, 0, 0]))
            for distance in (1, 2):  # the lane bits that select the column pair (l % 4)
                s = arith.addf(s, mgpu_utils.shfl_bfly(s, distance))
            row = arith.addi(arith.addi(arith.muli(warp, const(16)), const(8 * i)),
                             arith.divui(lane, const(4)))
            memref.store(s, ref, [arith.index_cast(index, row)])
    elif over == "warp_all":
        s = None
        for i in range(2):
            for j in range(2):
                r = regs[0, j, 0, 0, i, 0, 0, 0, 0]
                s = r if s is None else arith.addf(s, r)
        s = element_sum(s)
        for distance in (1, 2, 4, 8, 16):
            s = arith.addf(s, mgpu_utils.shfl_bfly(s, distance))
        memref.store(s, ref, [arith.index_cast(index, warp)])
    else:
        raise ValueError(over)


def _sum_partials(ctx, src, dst, *, axis):
    """Mosaic GPU code: ``dst = sum of src over axis`` (SMEM to SMEM, float32 sums, cast to
    ``dst``'s type), the elements spread over the warpgroup's 128 threads (scalar loads; when
    ``dst`` has fewer than 128·r elements some are computed and stored by several threads, the
    same value to the same address). Used once per chunk, after a barrier."""
    del ctx
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    i32, index, f32 = ir.IntegerType.get_signless(32), ir.IndexType.get(), ir.F32Type.get()
    const = lambda x: mgpu_utils.c(x, i32)
    src_shape = tuple(ir.MemRefType(src.type).shape)
    dst_type = ir.MemRefType(dst.type)
    dst_shape = tuple(dst_type.shape)
    parts = src_shape[axis]
    if src_shape[:axis] + src_shape[axis + 1:] != dst_shape:
        raise ValueError(f"shapes {src_shape} (axis {axis}) and {dst_shape} do not match")
    total = math.prod(dst_shape)
    tid = arith.remui(mgpu_utils.thread_idx(), const(128))
    for r in range(-(-total // 128)):
        flat = arith.addi(tid, const(128 * r))
        if total % 128:
            flat = arith.remui(flat, const(total))
        idx = []
        for d in reversed(dst_shape):
            idx.append(arith.index_cast(index, arith.remui(flat, const(d))))
            flat = arith.divui(flat, const(d))
        idx.reverse()
        s = None
        for p in range(parts):
            src_idx = idx[:axis] + [arith.index_cast(index, const(p))] + idx[axis:]
            x = memref.load(src, src_idx)
            if x.type != f32:
                x = arith.extf(f32, x)
            s = x if s is None else arith.addf(s, x)
        if dst_type.element_type != f32:
            s = arith.truncf(dst_type.element_type, s)
        memref.store(s, dst, idx)


def _kernel(*refs, chunk, num_chunks, ckpt_every, heads_per_group, state_parts, weight_parts, has_keep,
            save_checkpoints, unroll, warp_partials, interpret, heads_per_cta=1, acc_init="zero"):
    q_ref, k_ref, v_ref, f_ref, w_ref, h0_ref, *rest = refs
    keep_ref = rest.pop(0) if has_keep else None
    y_ref, h_final_ref, *rest = rest
    ckpt_ref = rest.pop(0) if save_checkpoints else None
    (q_smem, k_smem, v_smem, f_smem, keep_smem, y_smem, part_smem, w_smem, h_smem,
     in_barriers, w_barrier, *more_heads) = rest
    # Per head of the CTA: its v, f, y, per-warp y, W and state buffers (head 0: the ones above;
    # ``heads_per_cta`` > 1 appends six per further head).
    per_head = [(v_smem, f_smem, y_smem, part_smem, w_smem, h_smem)] + [
        tuple(more_heads[6 * i:6 * i + 6]) for i in range(heads_per_cta - 1)]
    v_bufs, f_bufs, y_bufs, part_bufs, w_bufs, h_bufs = (list(x) for x in zip(*per_head))
    if warp_partials:
        store_partials = plgpu.inline_mgpu(
            arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))(_store_warp_partial_sums)

    b = lax.axis_index("b")
    n = lax.axis_index("n")
    if heads_per_cta == 1:
        heads = [n]
    else:
        heads = [n * heads_per_cta + i for i in range(heads_per_cta)]
    g = lax.div(heads[0], jnp.int32(heads_per_group))  # the CTA's heads share one q/k group
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)   # (64,): one value per row of H
    col_layout = plgpu.Layout.WGMMA.reduce(0)   # (16,): one value per column of H

    def start_chunk_copies(c, slot):
        steps = pl.ds(c * chunk, chunk)
        barrier = in_barriers.at[slot]
        plgpu.copy_gmem_to_smem(q_ref.at[b, steps, g], q_smem.at[slot], barrier)
        plgpu.copy_gmem_to_smem(k_ref.at[b, steps, g], k_smem.at[slot], barrier)
        for hh, head in enumerate(heads):
            plgpu.copy_gmem_to_smem(v_ref.at[b, steps, head], v_bufs[hh].at[slot], barrier)
            plgpu.copy_gmem_to_smem(f_ref.at[b, head, steps], f_bufs[hh].at[slot], barrier)
        if has_keep:
            plgpu.copy_gmem_to_smem(keep_ref.at[b, steps], keep_smem.at[slot], barrier)

    # W (bf16 parts) and h0 once per CTA; the first chunk's inputs.
    for hh, head in enumerate(heads):
        plgpu.copy_gmem_to_smem(w_ref.at[head], w_bufs[hh], w_barrier)
        plgpu.copy_gmem_to_smem(h0_ref.at[b, head], h_bufs[hh], w_barrier)
    start_chunk_copies(0, 0)
    plgpu.barrier_wait(w_barrier)
    hs = tuple(plgpu.load(h_bufs[hh], layout=wgmma_layout, optimized=False)
               for hh in range(heads_per_cta))

    def step(t, hs, slot):
        k_t = plgpu.load(k_smem.at[slot, t], layout=row_layout, optimized=False).astype(_F32)
        vs = [plgpu.load(v_bufs[hh].at[slot, t], layout=col_layout,
                         optimized=False).astype(_F32) for hh in range(heads_per_cta)]
        q_t = plgpu.load(q_smem.at[slot, t], layout=row_layout, optimized=False).astype(_F32)
        fs = [f_bufs[hh][slot, t] for hh in range(heads_per_cta)]
        if has_keep:
            keep_t = keep_smem[slot, t]
            hs = [h * keep_t for h in hs]
        k_b = lax.broadcast_in_dim(k_t, (KEY_DIM, VALUE_DIM), [0])
        kvs = [k_b * lax.broadcast_in_dim(v_t, (KEY_DIM, VALUE_DIM), [1]) for v_t in vs]
        pairs = []  # per head: the (bf16 state part, weight part) products
        for h in hs:
            h_parts = _bf16_parts(h, state_parts)
            pairs.append([(h_parts[i], j) for i, j in _products(state_parts, weight_parts)])
        if interpret:
            # The interpreter's wgmma takes the A operand only from SMEM: the same bf16
            # products with float32 accumulation, as a dot.
            us = [sum(jnp.dot(a, w_bufs[hh][p], preferred_element_type=_F32)
                      for a, p in pairs[hh]) + kvs[hh] for hh in range(heads_per_cta)]
        elif acc_init == "kv":
            # The accumulators start at k vᵀ: no zero-initialised registers, no add after.
            def products(acc_refs):
                for hh, acc_ref in enumerate(acc_refs):
                    for a, p in pairs[hh]:
                        plgpu.wgmma(acc_ref, a, w_bufs[hh].at[p])

            us = list(pl.run_state(products)(tuple(plgpu.ACC.init(kv) for kv in kvs)))
        else:
            def products(*acc_refs):  # zero-initialised accumulators
                for hh, acc_ref in enumerate(acc_refs):
                    for a, p in pairs[hh]:
                        plgpu.wgmma(acc_ref, a, w_bufs[hh].at[p])
                return tuple(acc_ref[...] for acc_ref in acc_refs)  # waits for the WGMMAs

            hws = pl.run_scoped(products, *[plgpu.ACC((KEY_DIM, VALUE_DIM), _F32)
                                            for _ in range(heads_per_cta)])
            us = [hw + kv for hw, kv in zip(hws, kvs)]
        out = []
        for hh, (h, u, f_t) in enumerate(zip(hs, us, fs)):
            z = jnp.tanh(u)
            h = z + f_t * (h - z)
            hq = h * lax.broadcast_in_dim(q_t, (KEY_DIM, VALUE_DIM), [0])
            if warp_partials:
                store_partials(hq, part_bufs[hh].at[:, t])  # summed over the warps per chunk
            else:
                y_bufs[hh][slot, t] = jnp.sum(hq, axis=0).astype(y_bufs[hh].dtype)
            out.append(h)
        return tuple(out)

    def chunk_body(c, hs):
        slot = lax.rem(c, 2)
        if save_checkpoints:
            # The state every ``ckpt_every`` staging blocks (the checkpoint interval), through
            # SMEM to (B, S/C_ckpt, Kp, N·Vp).
            @pl.when(lax.rem(c, ckpt_every) == 0)
            def _():
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                for hh in range(heads_per_cta):
                    h_bufs[hh][...] = hs[hh]
                plgpu.commit_smem()
                for hh, head in enumerate(heads):
                    plgpu.copy_smem_to_gmem(
                        h_bufs[hh], ckpt_ref.at[b, lax.div(c, ckpt_every), :,
                                                pl.ds(head * VALUE_DIM, VALUE_DIM)])
        # Every thread is past its reads of the other slot (the last chunk): prefetch into it.
        plgpu.commit_smem()

        @pl.when(c + 1 < num_chunks)
        def _():
            start_chunk_copies(c + 1, 1 - slot)

        plgpu.barrier_wait(in_barriers.at[slot])
        # The y slot written two chunks ago must have been read by its copy to GMEM.
        plgpu.wait_smem_to_gmem(heads_per_cta, wait_read_only=True)
        def steps(i, hs):
            for j in range(unroll):
                hs = step(i * unroll + j, hs, slot)
            return hs

        hs = lax.fori_loop(0, chunk // unroll, steps, hs)
        if warp_partials:
            plgpu.commit_smem()  # every warp's partial sums are written
            for hh in range(heads_per_cta):
                part = part_bufs[hh]
                y_bufs[hh][slot] = (part[0] + part[1] + part[2] + part[3]).astype(
                    y_bufs[hh].dtype)
        plgpu.commit_smem()
        for hh, head in enumerate(heads):
            plgpu.copy_smem_to_gmem(y_bufs[hh].at[slot],
                                    y_ref.at[b, pl.ds(c * chunk, chunk), head])
        return hs

    hs = lax.fori_loop(0, num_chunks, chunk_body, hs)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for hh in range(heads_per_cta):
        h_bufs[hh][...] = hs[hh]
    plgpu.commit_smem()
    for hh, head in enumerate(heads):
        plgpu.copy_smem_to_gmem(h_bufs[hh], h_final_ref.at[b, head])
    plgpu.wait_smem_to_gmem(0)


def forward(q, k, v, w, f, h0, keep, *, chunk_size=DEFAULT_CHUNK_SIZE, save_checkpoints=True,
            stage_size=DEFAULT_STAGE_SIZE, approx_tanh=True, state_split=None, unroll=1,
            no_auto_barriers=False, y_reduction="warp_partials", heads_per_cta=1,
            acc_init="zero", interpret=None):
    """The backend-interface forward: ``(y (B,S,N,V), h_final (B,N,K,V) f32, checkpoints)``.

    ``checkpoints`` is ``(B, S/C, 64, N·16)`` float32 (the state at each chunk start, the layout
    of ``gpu.forward``) or ``None``. ``interpret``: run the Mosaic GPU interpreter (default: when
    JAX's default backend is not a GPU).

    ``chunk_size`` is the op's checkpoint interval (the backward consumes one state per
    ``chunk_size`` steps); ``stage_size`` is the SMEM staging block of the inputs and y (32:
    measured faster than 64). When ``chunk_size`` is a multiple of ``stage_size`` the kernel stages
    ``stage_size`` steps and saves the state every ``chunk_size / stage_size`` blocks; otherwise it
    stages ``chunk_size`` steps.

    Defaults are the measured best on an H200 (8×4096×84: 3.16 ms; per-step y reduction 4.41,
    exact tanh 5.35): ``approx_tanh`` (tanh.approx.f32, rel. error ~2⁻¹¹, under bfloat16's
    rounding; y vs the scan 1.7e-4 at S=256) and per-warp y partials.

    Options (opt-in; not yet measured on a GPU, see benchmarks/KERNEL_NOTES.md run 6):

    * ``heads_per_cta=2``: each CTA (still one warpgroup) runs two heads of the same q/k group
      as two independent state chains in the same instruction stream: grid ``(B, N/2)``; q and
      k are loaded once per step for both; the four wgmmas of a step (hi/lo × 2 heads) are
      issued back to back and waited for once. Halves the warpgroup rendezvous (wgmma issue and
      wait) per head-step and gives each warp two chains to overlap. Needs ``N / L`` even
      (L = lcm(Nq, Nk), the q/k groups); SMEM per CTA +~14 KiB.
    * ``acc_init="kv"``: the wgmma accumulator starts at ``k_t v_tᵀ`` (``plgpu.ACC.init``
      under ``pl.run_state``) instead of zeros, saving the zero-initialising moves and the add.
    """
    _check_supported(q, k, v, w, f, h0, keep, chunk_size)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    batch, seq_len = q.shape[:2]
    num_heads = h0.shape[1]
    dtype = v.dtype
    groups, qg, kg, vn, fn = _per_head_inputs(q, k, v, f, num_heads)
    if not isinstance(stage_size, int) or stage_size < 8 or stage_size % 8:
        raise ValueError(f"stage_size must be a positive multiple of 8, got {stage_size!r}")
    stage = stage_size if chunk_size % stage_size == 0 else chunk_size
    if not isinstance(unroll, int) or unroll < 1 or stage % unroll:
        raise ValueError(f"unroll must be a positive divisor of chunk_size, got {unroll!r}")
    if y_reduction not in ("per_step", "warp_partials"):
        raise ValueError(f"y_reduction must be 'per_step' or 'warp_partials', got {y_reduction!r}")
    if heads_per_cta not in (1, 2):
        raise ValueError(f"heads_per_cta must be 1 or 2, got {heads_per_cta!r}")
    if (num_heads // groups) % heads_per_cta:
        raise ValueError(f"heads_per_cta={heads_per_cta} needs the heads per q/k group "
                         f"({num_heads // groups}) to be a multiple of it")
    if acc_init not in ("zero", "kv"):
        raise ValueError(f"acc_init must be 'zero' or 'kv', got {acc_init!r}")
    # The interpreter cannot run inline Mosaic GPU code: it reduces per step.
    warp_partials = y_reduction == "warp_partials" and not interpret
    if state_split is None:
        state_split = 3 if jnp.dtype(dtype) == jnp.float32 else 2
    if state_split not in (1, 2, 3):
        raise ValueError(f"state_split must be 1, 2 or 3, got {state_split!r}")
    # bfloat16 W is exact in one part; float32 W in as many parts as the state.
    weight_parts = 1 if jnp.dtype(w.dtype) == jnp.bfloat16 else state_split
    w_parts = jnp.stack(_bf16_parts(expand_heads(w, num_heads, axis=0), weight_parts), axis=1)
    num_chunks = seq_len // stage
    has_keep = keep is not None

    inputs = [qg, kg, vn, fn, w_parts, h0.astype(_F32)]
    if has_keep:
        inputs.append(keep.astype(_F32))
    out_type = [jax.ShapeDtypeStruct((batch, seq_len, num_heads, VALUE_DIM), dtype),
                jax.ShapeDtypeStruct((batch, num_heads, KEY_DIM, VALUE_DIM), _F32)]
    if save_checkpoints:
        out_type.append(jax.ShapeDtypeStruct(
            (batch, seq_len // chunk_size, KEY_DIM, num_heads * VALUE_DIM), _F32))

    w_transforms = (plgpu.TilingTransform((8, VALUE_DIM)), plgpu.SwizzleTransform(32))
    scratch = [
        plgpu.SMEM((2, stage, KEY_DIM), dtype),             # q
        plgpu.SMEM((2, stage, KEY_DIM), dtype),             # k
        plgpu.SMEM((2, stage, VALUE_DIM), dtype),           # v
        plgpu.SMEM((2, stage), _F32),                       # f
        plgpu.SMEM((2, stage), _F32),                       # keep (unused without keep)
        plgpu.SMEM((2, stage, VALUE_DIM), dtype),           # y
        plgpu.SMEM((4, stage if warp_partials else 1, VALUE_DIM), _F32),  # per-warp y
        plgpu.SMEM((weight_parts, VALUE_DIM, VALUE_DIM), _BF16, transforms=w_transforms),
        plgpu.SMEM((KEY_DIM, VALUE_DIM), _F32),                  # h0 / checkpoints / final
        # One arrival per TMA copy that signals the barrier.
        plgpu.Barrier(num_barriers=2,
                      num_arrivals=(5 if has_keep else 4) + 2 * (heads_per_cta - 1)),
        plgpu.Barrier(num_arrivals=2 * heads_per_cta),
    ]
    for _ in range(heads_per_cta - 1):  # the further heads' v, f, y, per-warp y, W, state
        scratch += [scratch[2], scratch[3], scratch[5], scratch[6], scratch[7], scratch[8]]
    kernel = functools.partial(
        _kernel, chunk=stage, num_chunks=num_chunks, ckpt_every=chunk_size // stage,
        heads_per_group=num_heads // groups, state_parts=state_split,
        weight_parts=weight_parts, has_keep=has_keep, unroll=unroll,
        warp_partials=warp_partials,
        save_checkpoints=save_checkpoints, interpret=bool(interpret),
        **({"heads_per_cta": heads_per_cta} if heads_per_cta != 1 else {}),
        **({"acc_init": acc_init} if acc_init != "zero" else {}))
    outs = _launch(kernel, out_type, scratch, (batch, num_heads // heads_per_cta), approx_tanh,
                   no_auto_barriers, interpret, "m2rnn_forward_mosaic")(*inputs)
    y, h_final = outs[0], outs[1]
    checkpoints = outs[2] if save_checkpoints else None
    return y, h_final, checkpoints


# ----------------------------------------------------------------------------------- backward

SUBCHUNK = 4  # backward: states recomputed into registers at once (4·16 = the wgmma M of dW)


def _bwd_kernel(*refs, chunk, num_chunks, heads_per_group, has_keep, clip, approx_tanh,
                interpret, warp_sums=False, qk_reduce_add=False, no_auto_barriers=False):
    q_ref, k_ref, v_ref, f_ref, w_ref, wt_ref, *rest = refs
    keep_ref = rest.pop(0) if has_keep else None
    # With ``qk_reduce_add`` dq_ref/dk_ref are the zero-initialised (B, S, L, 64) float32 Refs
    # (inputs aliased to outputs), else per-head (B, S, N, 64) outputs: same position.
    (ckpt_ref, dy_ref, dhf_ref, dq_ref, dk_ref, dv_ref, df_ref, dw_ref, dh0_ref,
     q_s, k_s, v_s, dy_s, f_s, keep_s, w_s, wt_s, sub_s, h_s, xs_s, ds_s,
     dq_s, dk_s, dv_s, df_s, dwo_s, in_bar, w_bar, *sums_s) = rest
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
                inline_sums("columns"), inline_sums("warp_rows"), inline_sums("warp_all"))

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
    plgpu.barrier_wait(w_bar)
    g_later = plgpu.load(h_s, layout=wgmma_layout, optimized=False)

    def clamp(x):
        return x if clip is None else jnp.minimum(jnp.maximum(x, -clip), clip)

    def matmul_w(x, w_smem):
        """x (64×16 f32) · w (16×16 bf16 in SMEM) on bf16 hi/lo parts of x."""
        hi, lo = _bf16_parts(x, 2)
        if interpret:
            return sum(jnp.dot(a, w_smem[...], preferred_element_type=_F32) for a in (hi, lo))

        def products(acc_ref):
            plgpu.wgmma(acc_ref, hi, w_smem)
            plgpu.wgmma(acc_ref, lo, w_smem)
            return acc_ref[...]

        return pl.run_scoped(products, plgpu.ACC((KEY_DIM, VALUE_DIM), _F32))

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
        z = jnp.tanh(matmul_w(h, w_s) + kv)
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
                    g_later = f_t * g + matmul_w(du, wt_s)
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
             chunk_size=DEFAULT_CHUNK_SIZE, approx_tanh=False, no_auto_barriers=False,
             qk_grad_dtype=_BF16, qk_grad_sum="xla", reductions="per_step", interpret=None):
    """The backend-interface backward: ``(dq, dk, dv, dw, df, dh0)`` (bfloat16 inputs).

    Consumes the checkpoints of ``forward`` (or ``gpu.forward``) with the same ``chunk_size``.
    Grid ``(B, N)``, one warpgroup per CTA; chunks in reverse; per chunk the inputs are copied
    to SMEM with TMA, the states every ``SUBCHUNK`` steps recomputed from the checkpoint into
    SMEM, then each sub-chunk's states recomputed into registers and walked back. ``du Wᵀ`` is a
    register-A wgmma on bf16 hi/lo parts of ``du`` (Wᵀ exact in bf16). ``dW`` accumulates in a
    64×64 wgmma accumulator, one wgmma per sub-chunk on bf16 ``H_{t-1}`` and ``du`` stacks
    (M = 4 steps × 16; only the diagonal blocks are used). dq/dk are written per head
    (``qk_grad_dtype``, B·S·N·64 each) and summed over the heads of a group in XLA.

    Options (the defaults are what was measured on 2026-11-30: 8×4096×84 fwd+bwd 21.8 ms,
    1.19 GiB):

    * ``qk_grad_sum="kernel"``: each CTA adds its float32 dq/dk chunk into zero-initialised
      ``(B, S, L, 64)`` float32 buffers with a TMA reduce-add (``cp.reduce.async.bulk.tensor``
      .add, in L2); the buffers are ``jax.new_ref`` inputs of the kernel (aliased to outputs).
      Replaces the per-head ``2·B·S·N·64`` bf16 outputs (0.66 GiB at 8×4096×84) by
      ``2·B·S·L·64`` float32 (16 MiB): extra memory of fwd+bwd ≈ 1.19 − 0.66 + 0.02 ≈ 0.55 GiB.
      SMEM dq/dk blocks become float32 (+4 KiB at C = 32). The Mosaic GPU interpreter cannot
      run TMA reductions: in interpret mode the kernel writes per-head float32 dq/dk that XLA
      sums (the same values); ``jax.export`` for CUDA lowers the real path.
    * ``reductions="warp_sums"``: no cross-warp exchange per step. Today each step stores dq,
      dk, dv, df with four Pallas SMEM stores (each bracketed by warpgroup barriers under
      Mosaic's automatic barriers) and reduces dv (over rows) and df (over all) across the 4
      warps through SMEM. With this option inline Mosaic GPU code writes per step, without
      barriers: dq/dk row sums (warp-local: shuffles over the 4 lanes of a row) to float32
      (C, 64) SMEM, per-warp dv column partials to (4, C, 16) and per-warp df totals to (4, C);
      the 4 warps' partials are added once per chunk (as the forward's y). +16–24 KiB SMEM at
      C = 32. Interpret mode computes the same partial buffers with jnp ops.
    * ``no_auto_barriers``: ``CompilerParams(unsafe_no_auto_barriers=True)``; with it an
      explicit barrier follows the sub-chunk start states' stores. Meant with ``warp_sums``
      (the remaining per-step Pallas stores are the dW stacks, written and read by wgmma
      across ``commit_smem``/``wgmma_wait``).
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
    batch, seq_len = q.shape[:2]
    num_heads = dh_final.shape[1]
    dtype = v.dtype
    groups, qg, kg, vn, fn = _per_head_inputs(q, k, v, f, num_heads)
    wn = expand_heads(w, num_heads, axis=0).astype(_BF16)
    wt = jnp.swapaxes(wn, 1, 2)
    dyn = dy.astype(dtype)
    has_keep = keep is not None
    inputs = [qg, kg, vn, fn, wn, wt]
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
        plgpu.SMEM((VALUE_DIM, VALUE_DIM), _BF16, transforms=w_transforms),  # W
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
        plgpu.Barrier(num_arrivals=3),
    ]
    extra = {}
    if warp_sums:
        scratch += [plgpu.SMEM((4, c, VALUE_DIM), _F32),     # per-warp dv partials
                    plgpu.SMEM((c, 4), _F32)]                # per-warp df partials
        if jnp.dtype(qk_grad_dtype) != jnp.float32:
            scratch += [plgpu.SMEM((c, KEY_DIM), _F32),      # dq row sums
                        plgpu.SMEM((c, KEY_DIM), _F32)]      # dk row sums
        extra["warp_sums"] = True
    if qk_reduce_add:
        extra["qk_reduce_add"] = True
    if no_auto_barriers:
        extra["no_auto_barriers"] = True
    kernel = functools.partial(
        _bwd_kernel, chunk=chunk_size, num_chunks=num_chunks,
        heads_per_group=num_heads // groups, has_keep=has_keep, clip=gradient_clipping,
        approx_tanh=approx_tanh, interpret=bool(interpret), **extra)
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
