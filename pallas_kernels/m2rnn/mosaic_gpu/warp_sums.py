"""Inline Mosaic GPU code (``plgpu.inline_mgpu`` bodies) for sums of a 64×16 float32
WGMMA-layout array that each warp stores to shared memory without a cross-warp exchange (no
barrier per step), and their once-per-block reduction.

In the WGMMA layout thread (warp w, lane l) of the warpgroup holds rows 16w + 8i + l//4
(i = 0, 1) and columns 8j + 2(l%4) + e (j, e = 0, 1) as registers [0, j, 0, 0, i, 0, 0, 0, 0]
of two values each.
"""

import math


def _wgmma_registers_and_lane(p):
    """``p``'s registers, this thread's warp and lane in the warpgroup, an i32 constant maker."""
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


def store_warp_column_sums(ctx, p, part_ref):
    """Each warp's sums over its 16 rows of ``p`` into ``part_ref[warp, :]`` (a (4, 16) float32
    SMEM ref).

    The 8 lanes sharing a column set (lane bits 2-4) are summed by a reduce-scatter: at lane
    bit 4 a lane keeps one column block j and sends the other, at bit 3 one column e of that
    block, at bit 2 both lanes finish the same column: 4 shuffles and adds (plus selects) and
    one scalar store per lane, where a butterfly on all 4 values takes 12 of each.
    """
    del ctx
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, vector
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    regs, warp, lane, const = _wgmma_registers_and_lane(p)
    # This lane's two rows summed: per column block j, two columns.
    parts = [arith.addf(regs[0, j, 0, 0, 0, 0, 0, 0, 0], regs[0, j, 0, 0, 1, 0, 0, 0, 0])
             for j in range(2)]
    index = ir.IndexType.get()
    col0 = arith.muli(arith.remui(lane, const(4)), const(2))

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


def _element_sum(vec):
    """vector<2xf32> -> f32."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, vector

    e0 = vector.extract(vec, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([0]))
    e1 = vector.extract(vec, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([1]))
    return arith.addf(e0, e1)


def store_row_sums(ctx, p, ref):
    """The 64 row sums of ``p`` (over its 16 columns) into ``ref[row]`` ((64,) float32). Rows
    are warp-local, so these are the full sums; the lanes holding the same sum store it alike."""
    del ctx
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    index = ir.IndexType.get()
    regs, warp, lane, const = _wgmma_registers_and_lane(p)
    for i in range(2):
        s = _element_sum(arith.addf(regs[0, 0, 0, 0, i, 0, 0, 0, 0],
                                    regs[0, 1, 0, 0, i, 0, 0, 0, 0]))
        for distance in (1, 2):  # the lane bits that select the column pair (l % 4)
            s = arith.addf(s, mgpu_utils.shfl_bfly(s, distance))
        row = arith.addi(arith.addi(arith.muli(warp, const(16)), const(8 * i)),
                         arith.divui(lane, const(4)))
        memref.store(s, ref, [arith.index_cast(index, row)])


def store_warp_totals(ctx, p, ref):
    """Each warp's sum of its 16×16 block of ``p`` into ``ref[warp]`` ((4,) float32)."""
    del ctx
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    index = ir.IndexType.get()
    regs, warp, _, _ = _wgmma_registers_and_lane(p)
    s = None
    for i in range(2):
        for j in range(2):
            r = regs[0, j, 0, 0, i, 0, 0, 0, 0]
            s = r if s is None else arith.addf(s, r)
    s = _element_sum(s)
    for distance in (1, 2, 4, 8, 16):
        s = arith.addf(s, mgpu_utils.shfl_bfly(s, distance))
    memref.store(s, ref, [arith.index_cast(index, warp)])


def sum_partials(ctx, src, dst, *, axis):
    """``dst = sum of src over axis`` (SMEM to SMEM, float32 sums, cast to ``dst``'s type), the
    elements spread over the warpgroup's 128 threads (scalar loads; when ``dst`` has fewer than
    128·r elements some are computed and stored by several threads, the same value to the same
    address). Used once per block, after a barrier."""
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
