"""Inline Mosaic GPU code (``plgpu.inline_mgpu`` bodies): per-warp sums of a WGMMA-layout array
stored to shared memory without cross-warp exchange, and their once-per-chunk reduction."""

import math


def _wgmma_registers_and_lane(p):
    """For the inline Mosaic GPU helpers below: ``p``'s registers (a 64×16 float32 array in the
    WGMMA layout), this thread's warp and lane in the warpgroup, and an i32 constant maker."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    i32 = ir.IntegerType.get_signless(32)
    const = lambda x: mgpu_utils.c(x, i32)
    tid = arith.remui(mgpu_utils.thread_idx(), const(128))
    return _wgmma_registers(p), arith.divui(tid, const(32)), arith.remui(tid, const(32)), const


def _wgmma_registers(p):
    regs = p.registers
    if regs.shape != (1, 2, 1, 1, 2, 1, 1, 1, 1):
        raise NotImplementedError(f"unexpected WGMMA register shape {regs.shape}")
    return regs


def _store_warp_partial_sums(ctx, p, part_ref, *, scatter=False):
    """Mosaic GPU code: each warp's sum over its 16 rows of ``p`` (64×16 float32, WGMMA layout)
    into ``part_ref[warp, :]`` (a (4, 16) float32 SMEM ref); no cross-warp exchange.

    In the WGMMA layout thread (warp w, lane l) holds rows 16w + 8i + l//4 (i = 0, 1) and columns
    8j + 2(l%4) + e (j, e = 0, 1) as registers [0, j, 0, 0, i, 0, 0, 0, 0] of 2 values.

    The 8 lanes sharing a column set (lane bits 2-4) are summed either by a full butterfly on
    all 4 values (12 shuffles and adds), or with ``scatter`` by a reduce-scatter: at lane bit 4
    a lane keeps one column block j and sends the other (2 shuffles), at bit 3 one column e of
    that block (1 shuffle), at bit 2 both lanes finish the same column (1 shuffle): 4 shuffles
    and adds (plus selects) and one scalar store per lane.
    """
    del ctx
    from jax._src.lib.mlir.dialects import arith

    regs, warp, lane, const = _wgmma_registers_and_lane(p)
    parts = [arith.addf(regs[0, j, 0, 0, 0, 0, 0, 0, 0], regs[0, j, 0, 0, 1, 0, 0, 0, 0])
             for j in range(2)]  # this lane's two rows summed: column block j, 2 columns
    _store_lane_parts(parts, warp, lane, const, part_ref, scatter)


def _store_warp_partial_products(ctx, p, factor, part_ref, *, scatter=False):
    """``_store_warp_partial_sums`` of ``p ⊙ factor`` (both 64×16 float32, WGMMA layout), the
    product fused into the sum of a lane's two rows: one multiply and one FMA per register
    pair instead of two multiplies and an add."""
    del ctx
    from jax._src.lib.mlir.dialects import arith, llvm

    regs, warp, lane, const = _wgmma_registers_and_lane(p)
    fregs = _wgmma_registers(factor)
    parts = []
    for j in range(2):
        r0, r1 = (0, j, 0, 0, 0, 0, 0, 0, 0), (0, j, 0, 0, 1, 0, 0, 0, 0)
        parts.append(llvm.intr_fma(regs[r1], fregs[r1], arith.mulf(regs[r0], fregs[r0])))
    _store_lane_parts(parts, warp, lane, const, part_ref, scatter)


def _store_lane_parts(parts, warp, lane, const, part_ref, scatter):
    """The warp sums of ``parts`` (per column block j: this lane's two rows already summed,
    2 columns) into ``part_ref[warp, :]``, as ``_store_warp_partial_sums`` describes."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, vector
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    index = ir.IndexType.get()
    col0 = arith.muli(arith.remui(lane, const(4)), const(2))
    if not scatter:
        for j, part in enumerate(parts):
            for distance in (4, 8, 16):  # the lane bits that select the row (l // 4)
                part = arith.addf(part, mgpu_utils.shfl_bfly(part, distance))
            col = arith.addi(col0, const(8 * j))
            vector.store(part, part_ref, [arith.index_cast(index, warp),
                                          arith.index_cast(index, col)])
        return

    def lane_bit(bit):
        return arith.cmpi(arith.CmpIPredicate.ne, arith.andi(lane, const(1 << bit)), const(0))

    def extract(vec, i):
        return vector.extract(vec, dynamic_position=[],
                              static_position=ir.DenseI64ArrayAttr.get([i]))

    bit4, bit3 = lane_bit(4), lane_bit(3)
    keep = arith.select(bit4, parts[1], parts[0])
    send = arith.select(bit4, parts[0], parts[1])
    pair = arith.addf(keep, mgpu_utils.shfl_bfly(send, 16))  # block j = bit 4, over bit 4
    e0, e1 = extract(pair, 0), extract(pair, 1)
    value = arith.addf(arith.select(bit3, e1, e0),
                       mgpu_utils.shfl_bfly(arith.select(bit3, e0, e1), 8))
    value = arith.addf(value, mgpu_utils.shfl_bfly(value, 4))
    col = arith.addi(arith.addi(col0, arith.select(bit4, const(8), const(0))),
                     arith.select(bit3, const(1), const(0)))
    memref.store(value, part_ref, [arith.index_cast(index, warp), arith.index_cast(index, col)])


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
    if over in ("warp_rows", "warp_rows_scatter"):
        return _store_warp_partial_sums(ctx, p, ref, scatter=over == "warp_rows_scatter")
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
