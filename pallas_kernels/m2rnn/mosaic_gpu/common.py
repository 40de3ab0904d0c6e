"""Shared by the Mosaic GPU forward and backward: the inputs the kernels take, the XLA-side input
layout, the launch, and the bf16 hi/lo split of float32 state operands."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import platforms
from pallas_kernels.m2rnn import contract
from pallas_kernels.m2rnn.heads import expand_heads

# The checkpoint interval: the backward holds a chunk's inputs and states in SMEM (72 KiB at 16),
# and a longer interval takes SMEM from the CTAs an SM runs at once (3 at 16; the step is
# latency-bound), so it is slower, for little memory saved (docs/kernels.md).
DEFAULT_CHUNK_SIZE = 16
STAGE_SIZE = 32  # steps per SMEM staging block of the forward (~25 KiB of SMEM per CTA)
# Chunk sizes are multiples of this: the backward's f|keep copy (8 bytes a step) must move a
# multiple of 128 bytes in the Lane lowering.
CHUNK_QUANTUM = 16
# A TMA copy's SMEM address must be a multiple of 128 bytes (PTX ISA, cp.async.bulk.tensor): a
# misaligned double-buffer slot fails on the GPU with CUDA_ERROR_MISALIGNED_ADDRESS.
TMA_SMEM_ALIGNMENT = 128
KEY_DIM = 64
VALUE_DIM = 16
F32 = jnp.float32
BF16 = jnp.bfloat16
_ROUND_TO_BF16 = 0x8000  # added to float32 bits before keeping the upper 16: rounds |x| half up


def _runs_chunk(chunk):
    """The chunk sizes the kernels run: multiples of ``CHUNK_QUANTUM``."""
    return chunk % CHUNK_QUANTUM == 0


def choose_chunk_size(seq_len, requested):
    """The contract's chunk rule: rounded up to a multiple of ``CHUNK_QUANTUM``."""
    return contract.fit_chunk_size(seq_len, requested, default=DEFAULT_CHUNK_SIZE,
                                   runs=_runs_chunk)


def unsupported(q, k, v, w, f, h0):
    """Why these inputs do not fit the kernels (an empty list when they do)."""
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
        if jnp.dtype(x.dtype) != jnp.dtype(BF16):
            problems.append(f"{name} must be bfloat16 (got {x.dtype}); float32 inputs: use the "
                            f"pallas_gpu backend")
    if jnp.dtype(f.dtype) not in (jnp.dtype(BF16), jnp.dtype(F32)):
        problems.append(f"f must be bfloat16 or float32 (got {f.dtype})")
    heads = (nq, k.shape[2], v.shape[2], f.shape[2], w.shape[0])
    if any(num_heads % h for h in heads):
        problems.append(f"every head count must divide N = {num_heads} (got {heads})")
    return problems


def check_supported(q, k, v, w, f, h0, keep, chunk_size):
    batch, seq_len = q.shape[:2]
    contract.check_chunk_size("mosaic_gpu", seq_len, chunk_size, _runs_chunk)
    problems = unsupported(q, k, v, w, f, h0)
    if keep is not None and keep.shape != (batch, seq_len):
        problems.append(f"keep must be (B, S) (got {keep.shape})")
    if problems:
        raise ValueError("Mosaic GPU M²RNN kernels do not support these inputs: "
                         + "; ".join(problems))


def supports(q, k, v, w, f, h0):
    """``None`` on a Hopper GPU (wgmma: compute capability 9.x) for bfloat16 inputs with K = 64,
    V = 16; else why not."""
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    if device.platform != "gpu" or not capability.startswith("9"):
        return f"needs a Hopper GPU (compute capability 9.x), not {device.device_kind}"
    problems = unsupported(q, k, v, w, f, h0)
    return "; ".join(problems) if problems else None


def per_head_inputs(q, k, v, f, num_heads):
    """The kernels' input layout (XLA side): q/k expanded to L = lcm(Nq, Nk) groups, v to N
    heads, f to N heads as float32 ``(B, N, S)`` (one 1-D TMA per head and block)."""
    groups = math.lcm(q.shape[2], k.shape[2])
    fn = jnp.transpose(expand_heads(f, num_heads, axis=2).astype(F32), (0, 2, 1))
    return (groups, expand_heads(q, groups, axis=2), expand_heads(k, groups, axis=2),
            expand_heads(v, num_heads, axis=2), fn)


def launch(kernel, out_type, scratch, grid, no_auto_barriers, name):
    """``plgpu.kernel`` over the (batch, head) grid, one warpgroup per CTA, ``tanh.approx.f32``
    (relative error ~2⁻¹¹); the Mosaic GPU interpreter off a GPU."""
    return plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=("b", "n"),
        compiler_params=plgpu.CompilerParams(
            approx_math=True, unsafe_no_auto_barriers=no_auto_barriers,
            # Every layout is given where a value is made, so Mosaic GPU's layout inference
            # (most of the kernels' lowering time, paid by every compile) is not needed.
            lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=plgpu.InterpretGPUParams() if platforms.interpret("gpu") else None,
        kernel_name=name)


def _round_bits_to_bf16(x):
    """float32 ``x`` rounded to bf16 (ties away from zero) as a float32, by integer ops."""
    bits = lax.bitcast_convert_type(x, jnp.uint32) + jnp.uint32(_ROUND_TO_BF16)
    return lax.bitcast_convert_type(bits & jnp.uint32(0xFFFF0000), F32)


def hi_lo_by_bits(x):
    """bf16 ``(hi, lo)`` of float32 ``x`` by integer operations: hi = the upper 16 bits of
    (``x``'s bits + 0x8000), i.e. ``x`` rounded to bf16 with ties away from zero, lo = ``x`` − hi
    (exact in float32) rounded to bf16: ≈ 17 significant bits, with one conversion per register
    pair instead of two (``_hi_lo_pair_by_bits``). This jnp form is what the interpreter runs:
    the same values as the inline code."""
    hi = _round_bits_to_bf16(x)
    lo = x - hi
    return hi.astype(BF16), lo.astype(BF16)


def _hi_lo_pair_by_bits(reg):
    """One register pair (``vector<2xf32>``) of ``hi_lo_by_bits`` as two i32 registers (hi, lo),
    each two packed bf16 (element 0 in the low half): two integer ``add`` round, one ``prmt``
    packs the two upper halves (hi), two ``and`` + two ``sub`` + one ``cvt.rn.bf16x2`` make lo."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm, vector

    i32 = ir.IntegerType.get_signless(32)
    bits = vector.bitcast(ir.VectorType.get([2], i32), reg)
    a, b = (vector.extract(bits, dynamic_position=[],
                           static_position=ir.DenseI64ArrayAttr.get([i])) for i in (0, 1))
    ra, rb = (llvm.inline_asm(i32, [r], f"add.u32 $0, $1, {_ROUND_TO_BF16:#x};", "=r,r")
              for r in (a, b))
    # Element 0 of a bf16 pair is the low half of the 32-bit register.
    hi = llvm.inline_asm(i32, [ra, rb], "prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r")
    lo = llvm.inline_asm(
        i32, [a, b, ra, rb],
        "{ .reg .b32 ta, tb; and.b32 ta, $3, 0xffff0000; and.b32 tb, $4, 0xffff0000; "
        "sub.f32 ta, $1, ta; sub.f32 tb, $2, tb; cvt.rn.bf16x2.f32 $0, tb, ta; }",
        "=r,r,r,r,r")
    return hi, lo


def _hi_lo_by_bits_inline(ctx, x):
    """Mosaic GPU code for ``hi_lo_by_bits`` on a WGMMA-layout float32 array
    (``_hi_lo_pair_by_bits`` per register pair)."""
    del ctx
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    pair_bf16 = ir.VectorType.get([2], ir.BF16Type.get())
    his = np.empty(x.registers.shape, dtype=object)
    los = np.empty(x.registers.shape, dtype=object)
    for idx, reg in np.ndenumerate(x.registers):
        hi, lo = _hi_lo_pair_by_bits(reg)
        his[idx] = mgpu_utils.bitcast(hi, pair_bf16)
        los[idx] = mgpu_utils.bitcast(lo, pair_bf16)
    return (fa.FragmentedArray(_registers=his, _layout=x.layout, _is_signed=None),
            fa.FragmentedArray(_registers=los, _layout=x.layout, _is_signed=None))


def hi_lo_splitter(on_gpu):
    """``x -> [hi, lo]``, the bf16 A operands of ``x · W`` for a 64×16 float32 WGMMA-layout
    array ``x`` (``hi_lo_by_bits``): inline Mosaic GPU code on the GPU, jnp in the
    interpreter."""
    if not on_gpu:
        return lambda x: list(hi_lo_by_bits(x))
    part = plgpu.ShapeDtypeStruct((KEY_DIM, VALUE_DIM), BF16, layout=plgpu.Layout.WGMMA)
    inline = plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,), return_type=(part, part))(
        _hi_lo_by_bits_inline)
    return lambda x: list(inline(x))
