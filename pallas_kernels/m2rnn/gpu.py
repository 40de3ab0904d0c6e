"""GPU Pallas kernels (Triton lowering) for the M²RNN recurrence: forward and backward.

Implements the backend interface documented in ``m2rnn_jax.reference`` (``forward``/``backward``
on validated inputs whose S is a multiple of the chunk size). On a machine without a GPU the same
kernels run with ``interpret=True``, which is how CI tests them.

Tiling (what lives where):
  * Grid ``(B, N / Hb)``: one program per batch row and block of ``Hb`` consecutive heads that
    share one query/key group. The program walks the whole sequence; the state never leaves it.
  * The state of the block is one float32 register tile ``(Kp, Hb·Vp)``: the heads' ``K×V``
    states side by side along columns (``Kp``, ``Vp``: K and V padded to powers of two). Then
    ``H W`` for all heads is one dot with the block-diagonal ``(Hb·Vp, Hb·Vp)`` weight, the
    write ``k vᵀ`` is one outer product (q/k are shared), and a step's ``y`` for all heads is one
    contiguous ``Hb·V`` row of ``y (B, S, N·V)``.
  * Forward: an ``scf.for`` loop over groups of ``unroll`` steps whose input loads are issued
    together (optionally one iteration ahead, ``prefetch``: measured slower on an H200). The
    state is stored every ``chunk`` steps when checkpoints are asked for (``S / chunk`` states:
    memory grows as S/C).
  * Backward: chunks in reverse. For each chunk, the states every ``subchunk`` steps are
    recomputed from the chunk's checkpoint into a small per-program scratch (it stays in L2);
    then, per sub-chunk in reverse, its ``subchunk`` states are recomputed into registers (a
    static unroll) and the backward steps walk them back. The clipping rule is SPEC §1's.
    ``dW`` accumulates in float32 registers; ``dq``/``dk`` (shared by the programs of a group)
    are summed with float32 atomics into ``qk_replicas`` buffers (fewer programs contend for
    one address; the buffers are summed afterwards), or plain stores when one program owns a
    whole group.

Precision: float32 inputs use exact float32 dots (Triton ``ieee``); bfloat16 inputs use bf16
tensor-core dots on hi/lo-split float32 operands (``KernelConfig.split_dots``, default), or else
``KernelConfig.bf16_precision`` (TF32 dots were faster than ``ieee`` but missed 1e-2 against the
scan at S=256). The state is float32 whatever the input dtype. Measurements and
the reasons for each default: ``benchmarks/RESULTS.md`` and ``benchmarks/KERNEL_NOTES.md``.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from m2rnn_jax.heads import expand_heads, sum_heads

DEFAULT_CHUNK_SIZE = 64
_F32 = jnp.float32
_PRECISIONS = {
    "ieee": lax.Precision.HIGHEST,
    "tf32": lax.Precision.DEFAULT,
    "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tuning knobs of the kernels (defaults are the measured best on an H200, see RESULTS.md)."""

    heads_per_program: int = 1   # upper bound on Hb; the block-diagonal dot wastes Hb× work
    num_warps: int = 4
    num_stages: int = 1
    unroll: int = 8              # forward steps per loop iteration
    prefetch: bool = False       # load the next iteration's inputs one iteration ahead
    subchunk: int = 4            # backward: states recomputed into registers at once
    recompute_z: bool = False    # backward: recompute tanh(.) per step instead of holding it
    qk_replicas: int = 1         # backward: dq/dk atomics spread over this many buffers
    bf16_precision: str = "ieee"  # dot precision for bfloat16 inputs: ieee | tf32 | tf32x3
    approx_tanh: bool = False    # bfloat16 inputs only: tanh.approx.f32 instead of libdevice
    # bfloat16 inputs only: dots on the tensor cores with float32 operands split into bf16
    # hi + lo parts (~16 mantissa bits; products exact, float32 accumulation). Measured on an
    # H200 at 8×4096×84: forward 7.56 -> 6.50 ms, fwd+bwd 60.7 -> 46.4 ms (KERNEL_NOTES.md).
    split_dots: bool = True

    def __post_init__(self):
        for name in ("heads_per_program", "num_warps", "unroll", "subchunk", "qk_replicas"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two, got {value!r}")
        if self.bf16_precision not in _PRECISIONS:
            raise ValueError(f"KernelConfig.bf16_precision must be one of {tuple(_PRECISIONS)}, "
                             f"got {self.bf16_precision!r}")


DEFAULT_CONFIG = KernelConfig()


def chunk_quantum(config=None):
    """Chunk sizes must be multiples of this (the forward unroll and the backward sub-chunk)."""
    config = config or DEFAULT_CONFIG
    return math.lcm(config.unroll, config.subchunk)


def choose_chunk_size(seq_len, requested, *, quantum=None, backend="pallas_gpu"):
    """The chunk for ``seq_len`` steps: ``requested`` (default 64) checked against the chunk
    quantum (this module's default configuration's unless given), at most S rounded up."""
    quantum = quantum or chunk_quantum()
    if requested is None:
        requested = DEFAULT_CHUNK_SIZE
    elif not isinstance(requested, int) or requested < 1 or requested % quantum:
        raise ValueError(f"chunk_size for the {backend} backend must be a positive multiple of "
                         f"{quantum}, got {requested!r}")
    return min(requested, -(-seq_len // quantum) * quantum)


def _interpret():
    return jax.default_backend() != "gpu"


def _next_pow2(n):
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Shapes of the padded, column-major-over-heads problem the kernels see."""

    batch: int
    seq_len: int
    num_heads: int      # N
    key_dim: int        # K
    value_dim: int      # V
    qk_groups: int      # L = lcm(Nq, Nk): q and k are expanded to L groups
    key_pad: int        # Kp
    value_pad: int      # Vp
    block_heads: int    # Hb

    @property
    def cols(self):
        return self.block_heads * self.value_pad

    @property
    def heads_per_group(self):
        return self.num_heads // self.qk_groups

    @property
    def programs_per_row(self):
        return self.num_heads // self.block_heads


def _plan(q, k, v, h0, config):
    batch, seq_len, nq, key_dim = q.shape
    num_heads, value_dim = h0.shape[1], v.shape[-1]
    qk_groups = math.lcm(nq, k.shape[2])
    heads_per_group = num_heads // qk_groups
    block_heads = 1
    while (block_heads * 2 <= config.heads_per_program
           and heads_per_group % (block_heads * 2) == 0):
        block_heads *= 2
    # Triton dots need every dimension >= 16.
    value_pad = max(_next_pow2(value_dim), 16 // block_heads)
    return _Layout(batch, seq_len, num_heads, key_dim, value_dim, qk_groups,
                   max(16, _next_pow2(key_dim)), value_pad, block_heads)


def _pad_last(x, size):
    pad = size - x.shape[-1]
    return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def _states_to_columns(x, lay):
    """(B, N, K, V) -> (B, Kp, N·Vp) float32: each head's state occupies Vp columns."""
    x = _pad_last(x.astype(_F32), lay.value_pad)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, lay.key_pad - lay.key_dim), (0, 0)))
    x = jnp.transpose(x, (0, 2, 1, 3))
    return x.reshape(lay.batch, lay.key_pad, lay.num_heads * lay.value_pad)


def _states_from_columns(x, lay):
    x = x.reshape(lay.batch, lay.key_pad, lay.num_heads, lay.value_pad)
    return jnp.transpose(x, (0, 2, 1, 3))[:, :, :lay.key_dim, :lay.value_dim]


def _prepare(q, k, v, w, f, lay):
    """Expands grouped tensors, pads K/V, and builds the block-diagonal weights."""
    n, vp, hb = lay.num_heads, lay.value_pad, lay.block_heads
    qg = _pad_last(expand_heads(q, lay.qk_groups, axis=2), lay.key_pad)
    kg = _pad_last(expand_heads(k, lay.qk_groups, axis=2), lay.key_pad)
    vc = _pad_last(expand_heads(v, n, axis=2), vp).reshape(lay.batch, lay.seq_len, n * vp)
    fn = expand_heads(f, n, axis=2)
    wn = expand_heads(w.astype(_F32), n, axis=0)
    wn = jnp.pad(wn, ((0, 0), (0, vp - lay.value_dim), (0, vp - lay.value_dim)))
    wn = wn.reshape(n // hb, hb, vp, vp)
    w_block = jnp.einsum("gavw,ab->gavbw", wn, jnp.eye(hb, dtype=_F32))
    return qg, kg, vc, fn, w_block.reshape(n // hb, lay.cols, lay.cols)


def _dot_precision(dtype, config, interpret):
    if jnp.dtype(dtype) == jnp.float32:
        return lax.Precision.HIGHEST
    if config.split_dots:
        return "split"  # also in interpret mode, so CI checks the split arithmetic
    if interpret:
        return lax.Precision.HIGHEST
    return _PRECISIONS[config.bf16_precision]


def _split_bf16(x):
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(_F32)).astype(jnp.bfloat16)


_MATMUL = (((1,), (0,)), ((), ()))      # a @ b
_TRANSPOSED_LHS = (((0,), (0,)), ((), ()))  # aᵀ @ b


def _dot(a, b, precision, dims=_MATMUL, b_is_bf16=False):
    """a·b in float32. ``precision="split"``: on the bf16 tensor cores with float32 operands
    split into hi + lo parts (hi·hi + lo·hi + hi·lo; lo·lo is below float32 rounding). When b
    holds bfloat16 values (the weight of bfloat16 inputs), its lo part is zero and skipped."""
    if precision != "split":
        return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)
    a_hi, a_lo = _split_bf16(a)
    b_hi, b_lo = _split_bf16(b)

    def dot(x, y):
        return lax.dot_general(x, y, dims, preferred_element_type=_F32)

    out = dot(a_hi, b_hi) + dot(a_lo, b_hi)
    return out if b_is_bf16 else out + dot(a_hi, b_lo)


def _tanh(x, approx):
    return pltriton.approx_tanh(x) if approx else jnp.tanh(x)


def _compiler_params(config):
    return pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


# ----------------------------------------------------------------------------- in-kernel pieces


class _Step:
    """Per-program view of the inputs: loads one time step, advances the state."""

    def __init__(self, lay, q_ref, k_ref, v_ref, f_ref, keep_ref, w, precision, approx_tanh,
                 w_is_bf16):
        self.lay, self.w, self.precision, self.approx_tanh = lay, w, precision, approx_tanh
        self.w_is_bf16 = w_is_bf16
        self.refs = (q_ref, k_ref, v_ref, f_ref, keep_ref)
        self.b = pl.program_id(0)
        self.p = pl.program_id(1)
        first_head = self.p * lay.block_heads
        # lax.div/rem: the lowering handles them directly (indices are non-negative).
        self.group = lax.div(first_head, lay.heads_per_group)
        self.first_head = first_head
        self.cols = pl.ds(first_head * lay.value_pad, lay.cols)
        # Column j of the tile belongs to head first_head + j // Vp (a gather index for f).
        self.col_heads = first_head + lax.div(
            lax.broadcasted_iota(jnp.int32, (lay.cols,), 0), jnp.int32(lay.value_pad))

    def load(self, t):
        q_ref, k_ref, v_ref, f_ref, keep_ref = self.refs
        b, g = self.b, self.group
        q = q_ref[b, t, g, :].astype(_F32)
        k = k_ref[b, t, g, :].astype(_F32)
        v = v_ref[b, t, self.cols].astype(_F32)
        f = f_ref[b, t, self.col_heads].astype(_F32)
        keep = None if keep_ref is None else keep_ref[b, t]
        return q, k, v, f, keep

    def advance(self, h, inputs):
        """H_{t-1} (before a reset) -> (reset H_{t-1}, Z_t, H_t)."""
        _, k, v, f, keep = inputs
        if keep is not None:
            h = h * keep
        u = _dot(h, self.w, self.precision, b_is_bf16=self.w_is_bf16)
        z = _tanh(u + k[:, None] * v[None, :], self.approx_tanh)
        return h, z, z + f[None, :] * (h - z)


def _forward_kernel(*refs, lay, chunk, config, has_keep, save_checkpoints, precision,
                    approx_tanh, w_is_bf16):
    q_ref, k_ref, v_ref, f_ref, w_ref, h0_ref, *rest = refs
    keep_ref = rest.pop(0) if has_keep else None
    y_ref, h_final_ref, *rest = rest
    ckpt_ref = rest[0] if save_checkpoints else None

    step = _Step(lay, q_ref, k_ref, v_ref, f_ref, keep_ref, w_ref[pl.program_id(1)],
                 precision, approx_tanh, w_is_bf16)
    b, cols, unroll = step.b, step.cols, config.unroll
    seq_len = lay.seq_len
    groups_per_chunk = chunk // unroll

    def load_group(t0):
        return [step.load(t0 + j) for j in range(unroll)]

    def run_group(i, h, inputs):
        t0 = i * unroll
        if save_checkpoints:
            @pl.when(lax.rem(i, groups_per_chunk) == 0)
            def _():
                ckpt_ref[b, lax.div(i, groups_per_chunk), :, cols] = h
        for j in range(unroll):
            _, _, h = step.advance(h, inputs[j])
            y = jnp.sum(h * inputs[j][0][:, None], axis=0)
            y_ref[b, t0 + j, cols] = y.astype(y_ref.dtype)
        return h

    h = h0_ref[b, :, cols]
    num_groups = seq_len // unroll
    if config.prefetch:
        def body(i, carry):
            h, inputs = carry
            # The last iteration re-reads the last group instead of reading past the end.
            upcoming = load_group(jnp.minimum((i + 1) * unroll, seq_len - unroll))
            return run_group(i, h, inputs), upcoming

        h, _ = lax.fori_loop(0, num_groups, body, (h, load_group(0)))
    else:
        h = lax.fori_loop(0, num_groups, lambda i, h: run_group(i, h, load_group(i * unroll)), h)
    h_final_ref[b, :, cols] = h


def _backward_kernel(*refs, lay, chunk, config, has_keep, precision, approx_tanh, w_is_bf16,
                     clip, exclusive_groups, replicas, interpret):
    q_ref, k_ref, v_ref, f_ref, w_ref, *rest = refs
    keep_ref = rest.pop(0) if has_keep else None
    ckpt_ref, dy_ref, dh_final_ref, *rest = rest
    if not exclusive_groups:
        rest = rest[2:]  # the zero-initialised dq/dk inputs, aliased to the outputs below
    dq_ref, dk_ref, dv_ref, df_ref, dw_ref, dh0_ref, scratch_ref = rest

    w = w_ref[pl.program_id(1)]
    step = _Step(lay, q_ref, k_ref, v_ref, f_ref, keep_ref, w, precision, approx_tanh,
                 w_is_bf16)
    w_t = w.T
    b, p, g_idx, cols = step.b, step.p, step.group, step.cols
    sub = config.subchunk
    num_chunks = lay.seq_len // chunk
    key_slice = pl.ds(0, lay.key_pad)

    def clamp(x):
        return x if clip is None else jnp.clip(x, -clip, clip)

    replica = lax.rem(p, replicas)

    def add_shared(ref, t, value):
        if exclusive_groups:
            ref[b, t, 0, g_idx, key_slice] = value
        else:
            pltriton.atomic_add(ref, (b, t, replica, g_idx, key_slice), value)

    def store_df(t, per_column):
        if lay.block_heads == 1:
            df_ref[b, t, step.first_head] = jnp.sum(per_column)
        else:
            per_head = jnp.sum(per_column.reshape(lay.block_heads, lay.value_pad), axis=1)
            df_ref[b, t, pl.ds(step.first_head, lay.block_heads)] = per_head

    def backward_sub_chunk(t0, h, carry):
        g_later, dw = carry
        inputs = [step.load(t0 + j) for j in range(sub)]
        dys = [dy_ref[b, t0 + j, cols].astype(_F32) for j in range(sub)]
        befores, zs = [h], []
        for j in range(sub):
            _, z, h = step.advance(h, inputs[j])
            befores.append(h)
            zs.append(None if config.recompute_z else z)
        for j in reversed(range(sub)):
            q, k, v, f, keep = inputs[j]
            dy, t = dys[j], t0 + j
            h_prev, z, _ = step.advance(befores[j], inputs[j]) if config.recompute_z else (
                befores[j] if keep is None else befores[j] * keep, zs[j], None)
            # SPEC §1: clamp what arrives from later steps, then add this step's read-out.
            g = clamp(g_later) + q[:, None] * dy[None, :]
            add_shared(dq_ref, t, jnp.sum(befores[j + 1] * dy[None, :], axis=1))
            du = (1.0 - f)[None, :] * g * (1.0 - z * z)
            store_df(t, jnp.sum(g * (h_prev - z), axis=0))
            g_later = f[None, :] * g + _dot(du, w_t, precision, b_is_bf16=w_is_bf16)
            if keep is not None:
                g_later = g_later * keep
            dw = dw + _dot(h_prev, du, precision, _TRANSPOSED_LHS)
            add_shared(dk_ref, t, jnp.sum(du * v[None, :], axis=1))
            dv_ref[b, t, cols] = jnp.sum(du * k[:, None], axis=0).astype(dv_ref.dtype)
        return g_later, dw

    def store_scratch(s, h):
        scratch_ref[b, p, s] = h

    dw0 = jnp.zeros((lay.cols, lay.cols), _F32)
    g, dw = walk_chunks_in_reverse(
        step, (dh_final_ref[b, :, cols], dw0), num_chunks=num_chunks, chunk=chunk, subchunk=sub,
        chunk_start=lambda c: ckpt_ref[b, c, :, cols], store_scratch=store_scratch,
        load_scratch=lambda s: scratch_ref[b, p, s], walk_back_sub_chunk=backward_sub_chunk,
        interpret=interpret)
    dh0_ref[b, :, cols] = g
    dw_ref[b, p] = dw


def walk_chunks_in_reverse(step, carry, *, num_chunks, chunk, subchunk, chunk_start,
                           store_scratch, load_scratch, walk_back_sub_chunk, interpret):
    """The backward kernels' time loop (two-level recomputation), shared with ``gpu_vector``.

    Chunks in reverse. For each, the state at the start of every sub-chunk is recomputed from
    the chunk's checkpoint ``chunk_start(c)`` with ``step`` (``step.advance(h, step.load(t))``)
    into this program's scratch (``store_scratch(s, h)``; it stays in L2); then, sub-chunk by
    sub-chunk in reverse, ``walk_back_sub_chunk(t0, state at t0, carry) -> carry`` recomputes
    its ``subchunk`` states into registers and walks them back. Returns the last carry."""
    subs_per_chunk = chunk // subchunk

    def barrier():
        if not interpret:  # the interpreter runs a program's threads as one
            pltriton.debug_barrier()

    def chunk_body(i, carry):
        c = num_chunks - 1 - i
        t_chunk = c * chunk

        def record(s, h):
            store_scratch(s, h)
            for j in range(subchunk):
                _, _, h = step.advance(h, step.load(t_chunk + s * subchunk + j))
            return h

        h = lax.fori_loop(0, subs_per_chunk - 1, record, chunk_start(c))
        store_scratch(subs_per_chunk - 1, h)
        barrier()  # other threads of the program read what this one wrote

        def walk_back(i2, carry):
            s = subs_per_chunk - 1 - i2
            return walk_back_sub_chunk(t_chunk + s * subchunk, load_scratch(s), carry)

        carry = lax.fori_loop(0, subs_per_chunk, walk_back, carry)
        barrier()  # the next chunk overwrites the scratch
        return carry

    return lax.fori_loop(0, num_chunks, chunk_body, carry)


# ----------------------------------------------------------------------------- backend interface


def _check_chunk(seq_len, chunk_size, config):
    quantum = chunk_quantum(config)
    if chunk_size % quantum or seq_len % chunk_size:
        raise ValueError(f"chunk_size must be a multiple of {quantum} dividing S = {seq_len}, "
                         f"got {chunk_size}")


def forward(q, k, v, w, f, h0, keep, *, chunk_size=DEFAULT_CHUNK_SIZE, save_checkpoints=True,
            config=None):
    config = config or DEFAULT_CONFIG
    lay = _plan(q, k, v, h0, config)
    _check_chunk(lay.seq_len, chunk_size, config)
    interpret = _interpret()
    qg, kg, vc, fn, w_block = _prepare(q, k, v, w, f, lay)
    inputs = [qg, kg, vc, fn, w_block, _states_to_columns(h0, lay)]
    if keep is not None:
        inputs.append(keep.astype(_F32))
    width = lay.num_heads * lay.value_pad
    out_shape = [jax.ShapeDtypeStruct((lay.batch, lay.seq_len, width), v.dtype),
                 jax.ShapeDtypeStruct((lay.batch, lay.key_pad, width), _F32)]
    if save_checkpoints:
        out_shape.append(jax.ShapeDtypeStruct(
            (lay.batch, lay.seq_len // chunk_size, lay.key_pad, width), _F32))
    kernel = functools.partial(
        _forward_kernel, lay=lay, chunk=chunk_size, config=config, has_keep=keep is not None,
        save_checkpoints=save_checkpoints, precision=_dot_precision(v.dtype, config, interpret),
        approx_tanh=config.approx_tanh and not interpret and v.dtype != jnp.float32,
        w_is_bf16=w.dtype == jnp.bfloat16)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(lay.batch, lay.programs_per_row),
        compiler_params=_compiler_params(config), interpret=interpret, name="m2rnn_forward",
    )(*inputs)
    y = outs[0].reshape(lay.batch, lay.seq_len, lay.num_heads, lay.value_pad)
    y = y[..., :lay.value_dim]
    h_final = _states_from_columns(outs[1], lay)
    checkpoints = outs[2] if save_checkpoints else None
    return y, h_final, checkpoints


def backward(q, k, v, w, f, h0, keep, checkpoints, dy, dh_final, *, gradient_clipping,
             chunk_size=DEFAULT_CHUNK_SIZE, config=None):
    del h0  # the checkpoints start with it
    config = config or DEFAULT_CONFIG
    lay = _plan(q, k, v, dh_final, config)
    _check_chunk(lay.seq_len, chunk_size, config)
    interpret = _interpret()
    qg, kg, vc, fn, w_block = _prepare(q, k, v, w, f, lay)
    n, vp, batch, seq_len = lay.num_heads, lay.value_pad, lay.batch, lay.seq_len
    dyc = _pad_last(dy, vp).reshape(batch, seq_len, n * vp)
    inputs = [qg, kg, vc, fn, w_block]
    if keep is not None:
        inputs.append(keep.astype(_F32))
    inputs += [checkpoints, dyc, _states_to_columns(dh_final, lay)]

    exclusive_groups = lay.block_heads == lay.heads_per_group
    replicas = 1 if exclusive_groups else min(config.qk_replicas,
                                              lay.heads_per_group // lay.block_heads)
    qk_grad = jax.ShapeDtypeStruct((batch, seq_len, replicas, lay.qk_groups, lay.key_pad), _F32)
    aliases = {}
    if not exclusive_groups:
        aliases = {len(inputs): 0, len(inputs) + 1: 1}
        inputs += [jnp.zeros(qk_grad.shape, _F32), jnp.zeros(qk_grad.shape, _F32)]
    # dv needs float32 only when heads that share a value group are summed afterwards.
    dv_dtype = v.dtype if v.shape[2] == n else _F32
    out_shape = [
        qk_grad, qk_grad,
        jax.ShapeDtypeStruct((batch, seq_len, n * vp), dv_dtype),
        jax.ShapeDtypeStruct((batch, seq_len, n), _F32),
        jax.ShapeDtypeStruct((batch, lay.programs_per_row, lay.cols, lay.cols), _F32),
        jax.ShapeDtypeStruct((batch, lay.key_pad, n * vp), _F32),
        # Per-program scratch: the sub-chunk start states of the chunk being walked back.
        jax.ShapeDtypeStruct((batch, lay.programs_per_row, chunk_size // config.subchunk,
                              lay.key_pad, lay.cols), _F32),
    ]
    kernel = functools.partial(
        _backward_kernel, lay=lay, chunk=chunk_size, config=config, has_keep=keep is not None,
        precision=_dot_precision(v.dtype, config, interpret),
        approx_tanh=config.approx_tanh and not interpret and v.dtype != jnp.float32,
        w_is_bf16=w.dtype == jnp.bfloat16, clip=gradient_clipping, exclusive_groups=exclusive_groups, replicas=replicas,
        interpret=interpret)
    dq, dk, dv, df, dw_block, dh0, _ = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(batch, lay.programs_per_row),
        input_output_aliases=aliases, compiler_params=_compiler_params(config),
        interpret=interpret, name="m2rnn_backward",
    )(*inputs)

    dq = sum_heads(jnp.sum(dq, axis=2)[..., :lay.key_dim], q.shape[2], axis=2)
    dk = sum_heads(jnp.sum(dk, axis=2)[..., :lay.key_dim], k.shape[2], axis=2)
    dv = dv.reshape(batch, seq_len, n, vp)[..., :lay.value_dim]
    dv = sum_heads(dv, v.shape[2], axis=2)
    df = sum_heads(df, f.shape[2], axis=2)
    hb = lay.block_heads
    dw_block = jnp.sum(dw_block, axis=0).reshape(n // hb, hb, vp, hb, vp)
    dw = jnp.einsum("gavaw->gavw", dw_block).reshape(n, vp, vp)
    dw = sum_heads(dw[:, :lay.value_dim, :lay.value_dim], w.shape[0], axis=0)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dw.astype(w.dtype),
            df.astype(f.dtype), _states_from_columns(dh0, lay))
