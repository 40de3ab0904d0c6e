"""Shared by the Mosaic GPU forward and backward: supported inputs, the XLA-side input layout,
the launch, the bf16 splitting of float32 operands."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from m2rnn_jax.heads import expand_heads

# The checkpoint interval. 32 measured faster than 64 on an H200 (8×4096×84 fwd+bwd 21.9 vs
# 30.0 ms) for 0.17 GiB more memory (1.20 vs 1.03 GiB); benchmarks/RESULTS.md.
DEFAULT_CHUNK_SIZE = 32
DEFAULT_STAGE_SIZE = 32  # bf16: ~25 KiB of SMEM per CTA (64: ~46 KiB, at most 4 CTAs per SM)
KEY_DIM = 64
VALUE_DIM = 16
_F32 = jnp.float32
_BF16 = jnp.bfloat16
_F16 = jnp.float16
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


HI_LO_SPLITS = ("cvt", "bits", "bits_lo")


_ROUND_TO_BF16 = 0x8000  # added to float32 bits before keeping the upper 16: rounds |x| half up


def _round_bits_to_bf16(x):
    """float32 ``x`` rounded to bf16 (ties away from zero) as a float32, by integer ops."""
    bits = lax.bitcast_convert_type(x, jnp.uint32) + jnp.uint32(_ROUND_TO_BF16)
    return lax.bitcast_convert_type(bits & jnp.uint32(0xFFFF0000), _F32)


def _hi_lo_by_bits(x, lo_by_bits=False):
    """bf16 (hi, lo) of float32 ``x`` by integer operations: hi = the upper 16 bits of
    (``x``'s bits + 0x8000), i.e. ``x`` rounded to bf16 with ties away from zero, lo = ``x`` − hi
    (exact in float32) rounded to bf16. As accurate as rounding's split (≈ 17 significant bits;
    truncating hi instead lost a bit, and measurably so where the recurrence amplifies errors),
    with one conversion per pair instead of two (``_hi_lo_by_bits_inline``). The jnp form: what
    the interpreter runs, the same values as the inline code. ``lo_by_bits``: lo rounded by the
    same integer add (ties away from zero; no conversion at all)."""
    hi = _round_bits_to_bf16(x)
    lo = x - hi
    if lo_by_bits:
        lo = _round_bits_to_bf16(lo)
    return hi.astype(_BF16), lo.astype(_BF16)


def _hi_lo_pair_by_bits(reg, lo_by_bits=False):
    """One register pair (``vector<2xf32>``) of ``_hi_lo_by_bits`` as two i32 registers
    (hi, lo), each two packed bf16 (element 0 in the low half): two integer ``add`` round, one
    ``prmt`` packs the two upper halves (hi), two ``and`` + two ``sub`` + one
    ``cvt.rn.bf16x2`` make lo — integer and float32 pipes instead of the second pair
    conversion (round, widen back, subtract, convert) of ``_bf16_parts``."""
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
    remainders = ("{ .reg .b32 ta, tb; and.b32 ta, $3, 0xffff0000; "
                  "and.b32 tb, $4, 0xffff0000; sub.f32 ta, $1, ta; sub.f32 tb, $2, tb; ")
    if lo_by_bits:  # the remainders rounded by the integer add, packed like hi
        pack = (f"add.u32 ta, ta, {_ROUND_TO_BF16:#x}; add.u32 tb, tb, {_ROUND_TO_BF16:#x}; "
                "prmt.b32 $0, ta, tb, 0x7632; }")
    else:
        pack = "cvt.rn.bf16x2.f32 $0, tb, ta; }"
    lo = llvm.inline_asm(i32, [a, b, ra, rb], remainders + pack, "=r,r,r,r,r")
    return hi, lo


def _hi_lo_by_bits_inline(ctx, x, lo_by_bits=False):
    """Mosaic GPU code for ``_hi_lo_by_bits`` on a WGMMA-layout float32 array
    (``_hi_lo_pair_by_bits`` per register pair)."""
    del ctx
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    pair_bf16 = ir.VectorType.get([2], ir.BF16Type.get())
    his = np.empty(x.registers.shape, dtype=object)
    los = np.empty(x.registers.shape, dtype=object)
    for idx, reg in np.ndenumerate(x.registers):
        hi, lo = _hi_lo_pair_by_bits(reg, lo_by_bits)
        his[idx] = mgpu_utils.bitcast(hi, pair_bf16)
        los[idx] = mgpu_utils.bitcast(lo, pair_bf16)
    return (fa.FragmentedArray(_registers=his, _layout=x.layout, _is_signed=None),
            fa.FragmentedArray(_registers=los, _layout=x.layout, _is_signed=None))


STATE_PRODUCTS = ("wgmma", "mma_sync", "mma_sync_tf32")
MMA_SYNC_PRODUCTS = ("mma_sync", "mma_sync_tf32")  # the warp-level ones (W's B fragments)
_MMA_BF16 = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
_MMA_TF32 = "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"
_TF32_MASK = 0xFFFFE000  # sign, exponent and the 10 mantissa bits tf32 keeps


def check_state_product(state_product, state_parts, weight_parts, f16_state, hi_lo_split):
    if state_product not in STATE_PRODUCTS:
        raise ValueError(f"state_product must be one of {STATE_PRODUCTS}, got {state_product!r}")
    if state_product == "mma_sync" and (state_parts != 2 or weight_parts != 1 or f16_state
                                        or hi_lo_split == "cvt"):
        raise ValueError("state_product='mma_sync' needs bfloat16 W and two bf16 state parts "
                         "split by bits (state_split=2, hi_lo_split 'bits' or 'bits_lo', no "
                         "f16_state)")
    if state_product == "mma_sync_tf32" and (state_parts != 2 or weight_parts != 1
                                             or f16_state):
        raise ValueError("state_product='mma_sync_tf32' needs bfloat16 W and state_split=2 "
                         "(two tf32 parts), no f16_state")


def check_mma_accumulators(mma_accumulators, state_product):
    if mma_accumulators not in (1, 2) or (mma_accumulators != 1
                                          and state_product != "mma_sync_tf32"):
        raise ValueError(f"mma_accumulators must be 1, or 2 with state_product="
                         f"'mma_sync_tf32' (got {mma_accumulators!r})")


def mma_weight_fragments(w):
    """``(..., 16, 16)`` W → ``(..., 64, 16)`` float32 (exact bf16 values) laid out so that,
    loaded in the WGMMA register layout, every warp's lanes hold the B fragments of
    ``mma.sync.m16n8k16`` for W.

    In that layout, lane ``l`` of warp ``w`` holds register (j, h) = elements
    ``[16w + l//4 + 8h, 8j + 2(l%4) + e]`` (e = 0, 1); the B fragment of output columns
    ``8n .. 8n+7`` is two registers, ``W[8h + 2(l%4) + e, 8n + l//4]`` for h = 0, 1. So
    ``M[8R + r, 8C + c] = W[8R + c, 8C + r]``: each 8×8 block of W transposed, the 16 rows
    repeated for the 4 warps (``tests/test_kernel_mosaic_gpu.py`` checks this against the PTX
    fragment definitions)."""
    lead = w.shape[:-2]
    blocks = jnp.swapaxes(w.astype(_F32).reshape(*lead, 2, 8, 2, 8), -1, -3)
    return jnp.tile(blocks.reshape(*lead, VALUE_DIM, VALUE_DIM), (1,) * len(lead) + (4, 1))


def _check_mma_registers(array):
    """The WGMMA register grid the mma.sync paths index: (column block j, row half h)."""
    shape = array.registers.shape
    if shape != (1, 2, 1, 1, 2, 1, 1, 1, 1):
        raise NotImplementedError(f"unexpected WGMMA register shape {shape}")


def _mma_register(array, j, half):
    """Register (column block ``j``, row half ``half``) of a 64×16 WGMMA-layout array: two
    values, rows g + 8·half, columns 8j + 2t + e of the thread's warp."""
    return array.registers[0, j, 0, 0, half, 0, 0, 0, 0]


def _mma_element(array, j, half, e):
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import vector

    return vector.extract(_mma_register(array, j, half), dynamic_position=[],
                          static_position=ir.DenseI64ArrayAttr.get([e]))


def _set_mma_block(out, n, acc):
    """Column block ``n`` of a WGMMA register grid ``out`` (``np.empty((1, 2, 1, 1, 2, 1, 1, 1,
    1), object)``) from an mma's four results ``acc`` (rows g, g+8 × columns 2t, 2t+1): its
    registers (n, 0), (n, 1)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    pair_f32 = ir.VectorType.get([2], ir.F32Type.get())
    i32 = ir.IntegerType.get_signless(32)
    for half in (0, 1):
        vec = llvm.mlir_undef(pair_f32)
        for e in (0, 1):
            vec = llvm.insertelement(vec, acc[2 * half + e], position=mgpu_utils.c(e, i32))
        out[0, n, 0, 0, half, 0, 0, 0, 0] = vec


def _mma_chain(asm, a_fragments, b_fragments, acc):
    """``acc`` through one inline mma per (A, B) fragment pair, each result the next addend
    (``b_fragments`` may be a generator: each B is then made just before its mma)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm

    f32 = ir.F32Type.get()
    result_type = llvm.StructType.get_literal([f32] * 4)
    for a, b in zip(a_fragments, b_fragments):
        regs = ["$" + str(i) for i in range(4 + len(a) + len(b) + 4)]
        groups = (regs[:4], regs[4:4 + len(a)], regs[4 + len(a):-4], regs[-4:])
        body = f"{asm} " + ", ".join("{" + ",".join(g) + "}" for g in groups) + ";"
        constraints = ",".join(["=f"] * 4 + ["r"] * (len(a) + len(b)) + ["f"] * 4)
        res = llvm.inline_asm(result_type, list(a) + list(b) + list(acc), body, constraints)
        acc = [llvm.extractvalue(f32, res, [i]) for i in range(4)]
    return acc


def _state_products_mma_inline(ctx, h, w_frag, kv, lo_by_bits=False):
    """``H W + k vᵀ`` for the 64×16 float32 WGMMA-layout ``H`` and ``kv`` by warp-level
    ``mma.sync.m16n8k16`` (no warpgroup rendezvous: each warp multiplies its own 16 rows):
    ``H`` split into bf16 hi/lo parts by ``_hi_lo_pair_by_bits``, whose registers are already
    the A fragments (the accumulator layout of a 16×16 tile is the A layout of a k16 operand);
    per 8 output columns one mma on lo with ``k vᵀ`` as the addend, then one on hi.
    ``w_frag``: ``mma_weight_fragments(W)`` as bf16 in the WGMMA layout (B fragments)."""
    del ctx
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    i32 = ir.IntegerType.get_signless(32)
    _check_mma_registers(h)
    parts = {(j, half): _hi_lo_pair_by_bits(_mma_register(h, j, half), lo_by_bits)
             for j in (0, 1) for half in (0, 1)}
    # A fragment a0..a3: (k 0-7, row g), (k 0-7, row g+8), (k 8-15, row g), (k 8-15, row g+8).
    a_hi = [parts[(j, half)][0] for j in (0, 1) for half in (0, 1)]
    a_lo = [parts[(j, half)][1] for j in (0, 1) for half in (0, 1)]
    out = np.empty(h.registers.shape, dtype=object)
    for n in (0, 1):
        b = [mgpu_utils.bitcast(_mma_register(w_frag, n, half), i32) for half in (0, 1)]
        kv_n = [_mma_element(kv, n, half, e) for half in (0, 1) for e in (0, 1)]
        _set_mma_block(out, n, _mma_chain(_MMA_BF16, [a_lo, a_hi], [b, b], kv_n))  # lo first
    return fa.FragmentedArray(_registers=out, _layout=h.layout, _is_signed=None)


def mma_state_products(hi_lo_split):
    """``(H, W fragments, k vᵀ) -> H W + k vᵀ`` by ``_state_products_mma_inline``."""
    out = plgpu.ShapeDtypeStruct((KEY_DIM, VALUE_DIM), _F32, layout=plgpu.Layout.WGMMA)
    return plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA,) * 3, return_type=out)(
        functools.partial(_state_products_mma_inline, lo_by_bits=hi_lo_split == "bits_lo"))


def tf32_hi_lo(x):
    """float32 ``x`` as hi + lo, both float32: hi = ``x`` truncated to tf32 (its low 13 bits
    cleared: one ``and``), lo = ``x`` − hi (exact). The tensor core reads lo as tf32 too, so
    hi + lo carries ≥ 21 significant bits (bf16 hi/lo: ≈ 17), with no conversion instruction."""
    bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(_TF32_MASK)
    hi = lax.bitcast_convert_type(bits, _F32)
    return hi, x - hi


def _state_products_tf32_inline(ctx, hi, lo, w_frag, kv, accumulators=1):
    """``H W + k vᵀ`` for the 64×16 WGMMA-layout float32 parts ``hi``, ``lo`` of ``H``
    (``tf32_hi_lo``) by warp-level ``mma.sync.m16n8k8`` tf32: per 8 output columns, lo's then
    hi's two k8 blocks, with ``k vᵀ`` as the first addend — one chain of four dependent mmas,
    or with ``accumulators=2`` one chain per k block (``k vᵀ`` and zero as addends; two mmas
    deep), added after. The A fragment of a k8 block (rows g, g+8 × k t, t+4) is taken from
    the thread's own accumulator-layout registers (rows g, g+8 × columns 2t, 2t+1 of the
    block) by reading k index t as column 2t and t+4 as 2t+1; W's rows are permuted the same
    way, which ``mma_weight_fragments(W)`` (float32 here)
    already does: its register (n, kb) holds W[8kb + 2t + e, 8n + g], e = 0, 1, exactly the
    b0, b1 of that k order (``tests/test_kernel_mosaic_gpu.py`` simulates it lane by lane)."""
    del ctx
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    f32, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(32)
    _check_mma_registers(hi)

    def as_b32(array, j, half, e):
        return mgpu_utils.bitcast(_mma_element(array, j, half, e), i32)

    # A fragment a0..a3 of k block kb: (row g, k t), (g+8, t), (g, t+4), (g+8, t+4).
    a_frags = {(part, kb): [as_b32(array, kb, half, e) for e in (0, 1) for half in (0, 1)]
               for part, array in (("lo", lo), ("hi", hi)) for kb in (0, 1)}
    zero = mgpu_utils.c(0.0, f32)
    out = np.empty(hi.registers.shape, dtype=object)
    for n in (0, 1):
        kv_n = [_mma_element(kv, n, half, e) for half in (0, 1) for e in (0, 1)]
        chains = [[(part, kb) for part in ("lo", "hi") for kb in (0, 1)]] if accumulators == 1 \
            else [[("lo", kb), ("hi", kb)] for kb in (0, 1)]  # the small part first
        sums = [_mma_chain(_MMA_TF32, [a_frags[link] for link in chain],
                           ([as_b32(w_frag, n, kb, e) for e in (0, 1)] for _, kb in chain),
                           kv_n if c == 0 else [zero] * 4)
                for c, chain in enumerate(chains)]
        _set_mma_block(out, n, sums[0] if len(sums) == 1
                       else [arith.addf(x, y) for x, y in zip(*sums)])
    return fa.FragmentedArray(_registers=out, _layout=hi.layout, _is_signed=None)


def mma_tf32_state_products(accumulators=1):
    """``(hi, lo, W fragments (float32), k vᵀ) -> H W + k vᵀ`` by
    ``_state_products_tf32_inline`` (``accumulators``: ``check_mma_accumulators``)."""
    out = plgpu.ShapeDtypeStruct((KEY_DIM, VALUE_DIM), _F32, layout=plgpu.Layout.WGMMA)
    return plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,) * 4, return_type=out)(
        functools.partial(_state_products_tf32_inline, accumulators=accumulators))


def check_hi_lo_split(hi_lo_split):
    if hi_lo_split not in HI_LO_SPLITS:
        raise ValueError(f"hi_lo_split must be one of {HI_LO_SPLITS}, got {hi_lo_split!r}")


def state_splitter(parts, f16_state, hi_lo_split, interpret):
    """``x -> [A operands of x · W]`` for a 64×16 float32 WGMMA-layout array ``x``.

    With ``f16_state`` one float16 part (11 significant bits; W is then float16 too): safe for
    the state, which the gated tanh update keeps within max(|H_0|, 1), not for gradients (their
    range needs bf16's exponent). Otherwise ``parts`` bf16 parts (``_bf16_parts``: each the
    rounding of what the previous left), two of them split as ``hi_lo_split`` says: "cvt"
    (that rounding), "bits" (``_hi_lo_by_bits``; inline Mosaic GPU code off the interpreter) or
    "bits_lo" (lo rounded by bits too).
    """
    check_hi_lo_split(hi_lo_split)
    if f16_state:
        return lambda x: [x.astype(_F16)]
    if parts != 2 or hi_lo_split == "cvt":
        return lambda x: _bf16_parts(x, parts)
    lo_by_bits = hi_lo_split == "bits_lo"
    if interpret:
        return lambda x: list(_hi_lo_by_bits(x, lo_by_bits))
    part = plgpu.ShapeDtypeStruct((KEY_DIM, VALUE_DIM), _BF16, layout=plgpu.Layout.WGMMA)
    inline = plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,), return_type=(part, part))(
        functools.partial(_hi_lo_by_bits_inline, lo_by_bits=lo_by_bits))
    return lambda x: list(inline(x))


def wgmma_products_apart(products_of):
    """Mosaic GPU: ``a · b_ref[part]`` for each ``(a, b_ref, part)`` of ``products_of`` (A in
    registers or SMEM, B in SMEM; ``part`` a static index into ``b_ref``, or None for all of
    it), each in its own zero-initialised 64×16 float32 accumulator: independent wgmmas
    instead of a chain through one accumulator. Their values, once all are done."""
    def products(*acc_refs):
        for acc_ref, (a, b_ref, part) in zip(acc_refs, products_of):
            plgpu.wgmma(acc_ref, a, b_ref if part is None else b_ref.at[part])
        return tuple(acc_ref[...] for acc_ref in acc_refs)  # waits for the wgmmas

    return pl.run_scoped(products, *[plgpu.ACC((KEY_DIM, VALUE_DIM), _F32) for _ in products_of])


def _tanh(u, f16_tanh):
    """tanh of a float32 array; with ``f16_tanh`` on float16 pairs (``tanh.approx.f16x2`` under
    approx math: one MUFU op per two values; its error ~2⁻¹¹ is that of ``tanh.approx.f32``)."""
    if f16_tanh:
        return jnp.tanh(u.astype(_F16)).astype(_F32)
    return jnp.tanh(u)


def _products(state_parts, weight_parts):
    """The (state part, weight part) products kept: those of total order < state_parts."""
    return [(i, j) for i in range(state_parts) for j in range(weight_parts)
            if i + j < state_parts]
