"""Products of one row with a weight, with their neighbours fused in: one Triton-lowered kernel.

At batch 1 a decode token runs a few hundred small kernels, each moving a few megabytes at most,
so a token costs mostly each kernel's fixed costs (its launch, its loads' latency), not its
bytes. XLA runs an RMSNorm, the product after it, a bias, an activation and a residual add as
separate kernels; here one kernel does

    out = [add +] (rms_norm(x) @ W [+ bias])                 or, with a second weight,
    out = silu(rms_norm(x) @ W) * (rms_norm(x) @ W2)         (the SwiGLU's hidden row)

where ``rms_norm(x) = x · scale / sqrt(mean(x²) + eps)`` is kept in two factors as XLA's folded
path keeps it (``m2rnn_jax.layers.linear.NormedRow``): the product takes ``x · scale`` rounded to
the compute dtype, and the row factor, summed by every program over the row it reads anyway,
scales the product after. Each step rounds where the XLA path rounds, so in float32 the two
differ only in the order of the sums; in bf16 also by XLA's own choices of where to round
inside its fusions (its SiLU is ``x · sigmoid(x)``, this one ``x / (1 + exp(-x))``).

The weight comes as ``(out, in)``, the layout in which ``m2rnn_jax.generation.Generator`` holds
its copies: a program's rows of the weight are contiguous. Grid: blocks of output columns.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import platforms
from pallas_kernels.loops import fori_loop

F32 = jnp.float32
_IN_BLOCK = 256        # the input row is read in blocks of this many values
_UNROLLED_BLOCKS = 32  # rows of up to 32 blocks are read by independent loads, all in flight
_NUM_WARPS = 8
_TILE_VALUES = 128 * 32 * _NUM_WARPS  # weight values a program holds at once: 128 per thread
_MIN_PROGRAMS = 128    # about one per SM: blocks shrink (to 1 output) until there are this many
_MAX_OUT_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class _Layout:
    width: int            # the input row's length
    out_features: int
    out_block: int
    eps: float | None     # None: no norm
    pair: bool            # a second weight: the SwiGLU's silu(x W) * (x W2)
    has_bias: bool
    has_add: bool
    dtype: jnp.dtype      # the compute dtype: the product's operands
    out_dtype: jnp.dtype


def _out_block(out_features, width, weights):
    """Outputs per program: at batch 1 a product is bound by the latency of its loads, so each
    program reads its rows of the ``weights`` weights at once (``_TILE_VALUES``), and there are
    enough programs to fill the GPU."""
    read = min(pl.cdiv(width, _IN_BLOCK), _UNROLLED_BLOCKS) * _IN_BLOCK
    block = _MAX_OUT_BLOCK
    while block > 1 and (pl.cdiv(out_features, block) < _MIN_PROGRAMS
                         or block * read * weights > _TILE_VALUES):
        block //= 2
    return block


def _kernel(*refs, lay):
    refs = list(refs)
    x_ref = refs.pop(0)
    scale_ref = refs.pop(0) if lay.eps is not None else None
    w_ref = refs.pop(0)
    w2_ref = refs.pop(0) if lay.pair else None
    bias_ref = refs.pop(0) if lay.has_bias else None
    add_ref = refs.pop(0) if lay.has_add else None
    (out_ref,) = refs
    rows = pl.program_id(0) * lay.out_block + jnp.arange(lay.out_block, dtype=jnp.int32)
    row_ok = rows < lay.out_features
    out_cols = pl.ds(pl.program_id(0) * lay.out_block, lay.out_block)
    # Input blocks start at traced offsets: Pallas rejects a constant slice that runs past the
    # row's end, as the masked loads of its last block do. (Read here, not in the loop body:
    # the interpreter cannot read a program id inside a loop.)
    traced_zero = pl.program_id(0) * 0

    # Products and squares are summed elementwise across blocks and reduced once at the end: a
    # reduction per block would put barriers between the loads, which then wait for each other.
    def block(i, sums):
        acc, acc2, squares = sums
        cols = i * _IN_BLOCK + jnp.arange(_IN_BLOCK, dtype=jnp.int32)
        col_ok = cols < lay.width
        in_cols = pl.ds(traced_zero + i * _IN_BLOCK, _IN_BLOCK)
        x = pltriton.load(x_ref.at[in_cols], mask=col_ok, other=0.0).astype(F32)
        if scale_ref is not None:
            squares += x * x
            scale = pltriton.load(scale_ref.at[in_cols], mask=col_ok, other=0.0).astype(F32)
            x = x * scale
        x = x.astype(lay.dtype).astype(F32)  # the product's operand, in the compute dtype
        mask = row_ok[:, None] & col_ok[None, :]

        def products(ref):
            w = pltriton.load(ref.at[out_cols, in_cols], mask=mask, other=0.0)
            return w.astype(lay.dtype).astype(F32) * x[None, :]

        acc += products(w_ref)
        if w2_ref is not None:
            acc2 += products(w2_ref)
        return acc, acc2, squares

    zeros = jnp.zeros((lay.out_block, _IN_BLOCK), F32)
    sums = (zeros, zeros if lay.pair else None, jnp.zeros((_IN_BLOCK,), F32))
    blocks = pl.cdiv(lay.width, _IN_BLOCK)
    if blocks <= _UNROLLED_BLOCKS:  # independent loads, issued together
        for i in range(blocks):
            sums = block(i, sums)
    else:
        sums = fori_loop(0, blocks, block, sums)
    products, products2, squares = sums
    acc = jnp.sum(products, axis=1)
    acc2 = jnp.sum(products2, axis=1) if lay.pair else None
    squares = jnp.sum(squares)
    if scale_ref is not None:
        row_factor = jax.lax.rsqrt(squares / lay.width + lay.eps)
        acc, acc2 = acc * row_factor, None if acc2 is None else acc2 * row_factor
    if lay.pair:  # XLA's path: gate and up in the compute dtype, then silu(gate) * up
        gate = acc.astype(lay.dtype).astype(F32)
        up = acc2.astype(lay.dtype).astype(F32)
        out = (gate / (1.0 + jnp.exp(-gate))).astype(lay.dtype).astype(F32) * up
    else:
        out = acc.astype(lay.out_dtype).astype(F32)
        if bias_ref is not None:
            bias = pltriton.load(bias_ref.at[out_cols], mask=row_ok, other=0.0)
            out += bias.astype(lay.out_dtype).astype(F32)
            out = out.astype(lay.out_dtype).astype(F32)
        if add_ref is not None:
            add = pltriton.load(add_ref.at[out_cols], mask=row_ok, other=0.0)
            out = out + add.astype(lay.out_dtype).astype(F32)
    pltriton.store(out_ref.at[out_cols], out.astype(out_ref.dtype), mask=row_ok)


def row_product(x, w, *, norm_scale=None, eps=None, w2=None, bias=None, add=None, dtype,
                out_dtype=None):
    """One row ``x (width,)`` times ``w (out, in = width)``, as the module docstring says:
    ``norm_scale (width,)`` and ``eps`` fold an RMSNorm of ``x`` in; ``w2`` makes it the
    SwiGLU's ``silu(x W) * (x W2)``; ``bias (out,)`` and ``add (out,)`` (a residual) are added
    after the product, each after rounding to ``out_dtype`` as XLA's path rounds. ``dtype`` is
    the compute dtype of the product's operands, ``out_dtype`` the output's (default ``dtype``;
    the pair's output is in ``dtype``). Off a GPU the kernel runs in Pallas' interpreter."""
    out_dtype = jnp.dtype(dtype if out_dtype is None or w2 is not None else out_dtype)
    if x.ndim != 1 or w.ndim != 2 or w.shape[1] != x.shape[0]:
        raise ValueError(f"row_product takes a row (width,) and a weight (out, width), got "
                         f"{x.shape} and {w.shape}")
    if (norm_scale is None) != (eps is None):
        raise ValueError("row_product: norm_scale and eps come together")
    if w2 is not None and (w2.shape != w.shape or bias is not None or add is not None):
        raise ValueError("row_product: the pair's w2 has w's shape and takes no bias or add")
    out_features = w.shape[0]
    for name, vector in (("bias", bias), ("add", add)):
        if vector is not None and vector.shape != (out_features,):
            raise ValueError(f"row_product: {name} must have shape ({out_features},), got "
                             f"{vector.shape}")
    weights = 1 if w2 is None else 2
    lay = _Layout(x.shape[0], out_features, _out_block(out_features, x.shape[0], weights),
                  None if eps is None else float(eps), w2 is not None, bias is not None,
                  add is not None, jnp.dtype(dtype), out_dtype)
    inputs = [x] + [v for v in (norm_scale, w, w2, bias, add) if v is not None]
    return pl.pallas_call(
        functools.partial(_kernel, lay=lay),
        out_shape=jax.ShapeDtypeStruct((out_features,), out_dtype),
        grid=(pl.cdiv(out_features, lay.out_block),),
        compiler_params=pltriton.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
        interpret=platforms.interpret("gpu"), name="row_product")(*inputs)
