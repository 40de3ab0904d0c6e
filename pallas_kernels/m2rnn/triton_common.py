"""What the two Triton-lowered backends (``gpu``, ``gpu_vector``) share: launch parameters,
padding, the float32 dots on bf16 tensor cores and the backward's time loop."""

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import platforms
from pallas_kernels.loops import fori_loop

F32 = jnp.float32
MATMUL = (((1,), (0,)), ((), ()))           # a @ b, for lax.dot_general
TRANSPOSED_LHS = (((0,), (0,)), ((), ()))   # aᵀ @ b
# One CTA of 4 warps per program, no software pipelining of loads (the loops are sequential).
COMPILER_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=1)


def next_pow2(n):
    return 1 << max(n - 1, 0).bit_length()


def padded_dim(dim):
    """A tile dimension (K or V) padded to a power of two >= 16, the Triton dot's minimum."""
    return max(16, next_pow2(dim))


def pad_last(x, size):
    """``x`` zero-padded along its last axis to ``size``."""
    pad = size - x.shape[-1]
    return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def split_bf16(x):
    """float32 ``x`` as bf16 ``(hi, lo)``: hi its rounding, lo the rounding of the rest."""
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(F32)).astype(jnp.bfloat16)


def dot(a, b, precision, dims=MATMUL, b_is_bf16=False):
    """``a·b`` in float32. ``precision="split"``: on the bf16 tensor cores with the float32
    operands split into hi + lo parts (hi·hi + lo·hi + hi·lo; lo·lo is below float32 rounding;
    ~16 significant bits per product). When ``b`` holds bfloat16 values (the weight of bfloat16
    inputs) its lo part is zero and skipped. Otherwise a ``lax.Precision``."""
    if precision != "split":
        return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)
    a_hi, a_lo = split_bf16(a)
    b_hi, b_lo = split_bf16(b)

    def part(x, y):
        return lax.dot_general(x, y, dims, preferred_element_type=F32)

    out = part(a_hi, b_hi) + part(a_lo, b_hi)
    return out if b_is_bf16 else out + part(a_hi, b_lo)


def walk_chunks_in_reverse(step, acc, *, num_chunks, chunk, subchunk, chunk_start,
                           store_scratch, load_scratch, walk_back_sub_chunk):
    """The backward kernels' time loop: two-level recomputation from the chunk checkpoints.

    Chunks in reverse. For each, the state at the start of every sub-chunk is recomputed from
    the chunk's checkpoint ``chunk_start(c)`` with ``step`` (``step.advance(h, step.load(t))``)
    into this program's scratch (``store_scratch(s, h)``; it stays in L2); then, sub-chunk by
    sub-chunk in reverse, ``walk_back_sub_chunk(t0, state at t0, acc) -> acc`` recomputes its
    ``subchunk`` states into registers and walks them back (``acc``: what the walk accumulates,
    the state gradient and dW). Returns the last ``acc``."""
    subs_per_chunk = chunk // subchunk
    on_gpu = not platforms.interpret("gpu")

    def barrier():
        if on_gpu:  # the interpreter runs a program's threads as one
            pltriton.debug_barrier()

    def chunk_body(i, acc):
        c = num_chunks - 1 - i
        t_chunk = c * chunk

        def record(s, h):
            store_scratch(s, h)
            for j in range(subchunk):
                _, _, h = step.advance(h, step.load(t_chunk + s * subchunk + j))
            return h

        h = fori_loop(0, subs_per_chunk - 1, record, chunk_start(c))
        store_scratch(subs_per_chunk - 1, h)
        barrier()  # other threads of the program read what this one wrote

        def walk_back(i2, acc):
            s = subs_per_chunk - 1 - i2
            return walk_back_sub_chunk(t_chunk + s * subchunk, load_scratch(s), acc)

        acc = fori_loop(0, subs_per_chunk, walk_back, acc)
        barrier()  # the next chunk overwrites the scratch
        return acc

    return fori_loop(0, num_chunks, chunk_body, acc)
