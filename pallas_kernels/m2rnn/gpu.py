"""The ``pallas_gpu`` backend: M²RNN forward and backward kernels in Pallas' Triton lowering.

Any shape and dtype; one program per (batch row, head) walks the whole sequence with the state in
registers. float32 inputs use exact float32 dots, bfloat16 inputs bf16 tensor-core dots on hi/lo
parts of the float32 operands; the state is float32 either way. Layout, tiling and the measured
choices behind them: docs/kernels.md ("pallas_gpu"). Off a GPU the kernels run in Pallas'
interpreter, which is how CI tests them.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import platforms
from pallas_kernels.loops import fori_loop
from pallas_kernels.m2rnn import contract
from pallas_kernels.m2rnn import triton_common as common
from pallas_kernels.m2rnn.heads import expand_heads, sum_heads
from pallas_kernels.m2rnn.triton_common import F32

DEFAULT_CHUNK_SIZE = 64
UNROLL = 8     # forward steps per loop iteration (their input loads issued together)
SUBCHUNK = 4   # backward: states recomputed into registers at once
CHUNK_QUANTUM = math.lcm(UNROLL, SUBCHUNK)  # chunk sizes are multiples of this
# A thread's registers: past them the backward's tiles spill, and the scan is faster
# (docs/kernels.md, "pallas_gpu"); backend="auto" runs the scan there.
MAX_REGISTERS_PER_THREAD = 255


def supports(q, k, v, w, f, h0):
    """Every input the op accepts."""
    del q, k, v, w, f, h0
    return None


def backward_registers_per_thread(key_pad, value_pad):
    """An estimate of the backward's float32 register tiles per thread of a program: about ten
    of the state's size (4 states, 4 Z, the state gradient, du) and three of W's (W, its
    transpose, dW). 416 at K = V = 64, where the scan was measured faster; 86 at 64×16."""
    threads = 32 * common.COMPILER_PARAMS.num_warps
    return (10 * key_pad * value_pad + 3 * value_pad * value_pad) / threads


def scan_is_faster(q, v):
    """Whether the scan outruns these kernels on inputs of these shapes (``"auto"`` asks)."""
    registers = backward_registers_per_thread(common.padded_dim(q.shape[-1]),
                                              common.padded_dim(v.shape[-1]))
    return registers > MAX_REGISTERS_PER_THREAD


def _runs_chunk(chunk):
    """Chunks of whole forward groups (``UNROLL``) and backward sub-chunks (``SUBCHUNK``)."""
    return chunk % CHUNK_QUANTUM == 0


def choose_chunk_size(seq_len, requested):
    """The contract's chunk rule: rounded up to a multiple of ``CHUNK_QUANTUM``."""
    return contract.fit_chunk_size(seq_len, requested, default=DEFAULT_CHUNK_SIZE,
                                   runs=_runs_chunk)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Shapes of the padded problem the kernels see."""

    batch: int
    seq_len: int
    num_heads: int      # N
    key_dim: int        # K
    value_dim: int      # V
    qk_groups: int      # L = lcm(Nq, Nk): q and k are expanded to L groups
    key_pad: int        # Kp: K padded to a power of two >= 16 (the Triton dot's minimum)
    value_pad: int      # Vp: likewise for V

    @property
    def heads_per_group(self):
        return self.num_heads // self.qk_groups


def _plan(q, k, v, h0):
    batch, seq_len, nq, key_dim = q.shape
    value_dim = v.shape[-1]
    return _Layout(batch, seq_len, h0.shape[1], key_dim, value_dim, math.lcm(nq, k.shape[2]),
                   common.padded_dim(key_dim), common.padded_dim(value_dim))


def _states_to_columns(x, lay):
    """(B, N, K, V) -> (B, Kp, N·Vp) float32: each head's state occupies Vp columns."""
    x = common.pad_last(x.astype(F32), lay.value_pad)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, lay.key_pad - lay.key_dim), (0, 0)))
    x = jnp.transpose(x, (0, 2, 1, 3))
    return x.reshape(lay.batch, lay.key_pad, lay.num_heads * lay.value_pad)


def _states_from_columns(x, lay):
    x = x.reshape(lay.batch, lay.key_pad, lay.num_heads, lay.value_pad)
    return jnp.transpose(x, (0, 2, 1, 3))[:, :, :lay.key_dim, :lay.value_dim]


def _prepare(q, k, v, w, f, lay):
    """Expands grouped tensors to their kernel groups and pads K and V."""
    n, vp = lay.num_heads, lay.value_pad
    qg = common.pad_last(expand_heads(q, lay.qk_groups, axis=2), lay.key_pad)
    kg = common.pad_last(expand_heads(k, lay.qk_groups, axis=2), lay.key_pad)
    vc = common.pad_last(expand_heads(v, n, axis=2), vp).reshape(lay.batch, lay.seq_len, n * vp)
    fn = expand_heads(f, n, axis=2)
    wn = expand_heads(w.astype(F32), n, axis=0)
    wn = jnp.pad(wn, ((0, 0), (0, vp - lay.value_dim), (0, vp - lay.value_dim)))
    return qg, kg, vc, fn, wn


def _precision(dtype):
    # bfloat16 inputs: split dots, also in interpret mode, so that CI checks their arithmetic.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else "split"


# ----------------------------------------------------------------------------- in-kernel pieces


class _Step:
    """One program's view of the inputs: loads one time step, advances the state."""

    def __init__(self, lay, q_ref, k_ref, v_ref, f_ref, keep_ref, w, precision, w_is_bf16):
        self.w, self.precision, self.w_is_bf16 = w, precision, w_is_bf16
        self.refs = (q_ref, k_ref, v_ref, f_ref, keep_ref)
        self.b = pl.program_id(0)
        self.head = pl.program_id(1)
        # lax.div: the lowering handles it directly (indices are non-negative). Constants are
        # int32 like the program ids, also under jax_enable_x64.
        self.group = lax.div(self.head, jnp.int32(lay.heads_per_group))
        self.cols = pl.ds(self.head * lay.value_pad, lay.value_pad)
        # f is gathered per state column: column j belongs to head ``head + j // Vp`` (this
        # one), so f arrives as a row that broadcasts over the state like v.
        self.column_heads = self.head + lax.div(
            lax.broadcasted_iota(jnp.int32, (lay.value_pad,), 0), jnp.int32(lay.value_pad))

    def load(self, t):
        q_ref, k_ref, v_ref, f_ref, keep_ref = self.refs
        b, g = self.b, self.group
        q = q_ref[b, t, g, :].astype(F32)
        k = k_ref[b, t, g, :].astype(F32)
        v = v_ref[b, t, self.cols].astype(F32)
        f = f_ref[b, t, self.column_heads].astype(F32)
        keep = None if keep_ref is None else keep_ref[b, t]
        return q, k, v, f, keep

    def advance(self, h, inputs):
        """H_{t-1} (before a reset) -> (reset H_{t-1}, Z_t, H_t)."""
        _, k, v, f, keep = inputs
        if keep is not None:
            h = h * keep
        u = common.dot(h, self.w, self.precision, b_is_bf16=self.w_is_bf16)
        z = jnp.tanh(u + k[:, None] * v[None, :])
        return h, z, z + f[None, :] * (h - z)


def _forward_kernel(*refs, lay, chunk, has_keep, save_checkpoints, precision, w_is_bf16):
    q_ref, k_ref, v_ref, f_ref, w_ref, h0_ref, *rest = refs
    keep_ref = rest.pop(0) if has_keep else None
    y_ref, h_final_ref, *rest = rest
    ckpt_ref = rest[0] if save_checkpoints else None

    step = _Step(lay, q_ref, k_ref, v_ref, f_ref, keep_ref, w_ref[pl.program_id(1)],
                 precision, w_is_bf16)
    b, cols = step.b, step.cols
    groups_per_chunk = chunk // UNROLL

    def run_group(i, h):
        t0 = i * UNROLL
        inputs = [step.load(t0 + j) for j in range(UNROLL)]
        if save_checkpoints:
            @pl.when(lax.rem(i, jnp.int32(groups_per_chunk)) == 0)
            def _():
                ckpt_ref[b, lax.div(i, jnp.int32(groups_per_chunk)), :, cols] = h
        for j in range(UNROLL):
            _, _, h = step.advance(h, inputs[j])
            y = jnp.sum(h * inputs[j][0][:, None], axis=0)
            y_ref[b, t0 + j, cols] = y.astype(y_ref.dtype)
        return h

    h = fori_loop(0, lay.seq_len // UNROLL, run_group, h0_ref[b, :, cols])
    h_final_ref[b, :, cols] = h


def _backward_kernel(*refs, lay, chunk, has_keep, precision, w_is_bf16, clip, shared_groups):
    q_ref, k_ref, v_ref, f_ref, w_ref, *rest = refs
    keep_ref = rest.pop(0) if has_keep else None
    ckpt_ref, dy_ref, dh_final_ref, *rest = rest
    if shared_groups:
        rest = rest[2:]  # the zero-initialised dq/dk inputs, aliased to the outputs below
    dq_ref, dk_ref, dv_ref, df_ref, dw_ref, dh0_ref, scratch_ref = rest

    w = w_ref[pl.program_id(1)]
    step = _Step(lay, q_ref, k_ref, v_ref, f_ref, keep_ref, w, precision, w_is_bf16)
    w_t = w.T
    b, head, g_idx, cols = step.b, step.head, step.group, step.cols
    # A static start on the GPU; an int32 one in the interpreter, whose atomic_add slices with
    # the indices as given (a Python 0 would be int64 under jax_enable_x64).
    key_slice = pl.ds(jnp.int32(0) if platforms.interpret("gpu") else 0, lay.key_pad)

    def clamp(x):
        return x if clip is None else jnp.clip(x, -clip, clip)

    def add_qk_grad(ref, t, value):
        """dq/dk of a q/k group: float32 atomics when several heads (programs) share it."""
        if shared_groups:
            pltriton.atomic_add(ref, (b, t, g_idx, key_slice), value)
        else:
            ref[b, t, g_idx, key_slice] = value

    def walk_back_sub_chunk(t0, h, acc):
        g_later, dw = acc
        inputs = [step.load(t0 + j) for j in range(SUBCHUNK)]
        dys = [dy_ref[b, t0 + j, cols].astype(F32) for j in range(SUBCHUNK)]
        befores, zs = [h], []
        for j in range(SUBCHUNK):
            _, z, h = step.advance(h, inputs[j])
            befores.append(h)
            zs.append(z)
        for j in reversed(range(SUBCHUNK)):
            q, k, v, f, keep = inputs[j]
            dy, t = dys[j], t0 + j
            h_prev = befores[j] if keep is None else befores[j] * keep
            z = zs[j]
            # docs/math.md §2: clamp what arrives from later steps, then add the read-out's.
            g = clamp(g_later) + q[:, None] * dy[None, :]
            add_qk_grad(dq_ref, t, jnp.sum(befores[j + 1] * dy[None, :], axis=1))
            du = (1.0 - f)[None, :] * g * (1.0 - z * z)
            df_ref[b, t, head] = jnp.sum(jnp.sum(g * (h_prev - z), axis=0))
            g_later = f[None, :] * g + common.dot(du, w_t, precision, b_is_bf16=w_is_bf16)
            if keep is not None:
                g_later = g_later * keep
            dw = dw + common.dot(h_prev, du, precision, common.TRANSPOSED_LHS)
            add_qk_grad(dk_ref, t, jnp.sum(du * v[None, :], axis=1))
            dv_ref[b, t, cols] = jnp.sum(du * k[:, None], axis=0).astype(dv_ref.dtype)
        return g_later, dw

    def store_scratch(s, h):
        scratch_ref[b, head, s] = h

    dw0 = jnp.zeros((lay.value_pad, lay.value_pad), F32)
    g, dw = common.walk_chunks_in_reverse(
        step, (dh_final_ref[b, :, cols], dw0), num_chunks=lay.seq_len // chunk, chunk=chunk,
        subchunk=SUBCHUNK, chunk_start=lambda c: ckpt_ref[b, c, :, cols],
        store_scratch=store_scratch, load_scratch=lambda s: scratch_ref[b, head, s],
        walk_back_sub_chunk=walk_back_sub_chunk)
    dh0_ref[b, :, cols] = g
    dw_ref[b, head] = dw


# ----------------------------------------------------------------------------- backend contract


def forward(q, k, v, w, f, h0, keep, *, chunk_size, save_checkpoints):
    lay = _plan(q, k, v, h0)
    contract.check_chunk_size("pallas_gpu", lay.seq_len, chunk_size, _runs_chunk)
    qg, kg, vc, fn, wn = _prepare(q, k, v, w, f, lay)
    inputs = [qg, kg, vc, fn, wn, _states_to_columns(h0, lay)]
    if keep is not None:
        inputs.append(keep.astype(F32))
    width = lay.num_heads * lay.value_pad
    out_shape = [jax.ShapeDtypeStruct((lay.batch, lay.seq_len, width), v.dtype),
                 jax.ShapeDtypeStruct((lay.batch, lay.key_pad, width), F32)]
    if save_checkpoints:
        out_shape.append(jax.ShapeDtypeStruct(
            (lay.batch, lay.seq_len // chunk_size, lay.key_pad, width), F32))
    kernel = functools.partial(
        _forward_kernel, lay=lay, chunk=chunk_size, has_keep=keep is not None,
        save_checkpoints=save_checkpoints, precision=_precision(v.dtype),
        w_is_bf16=w.dtype == jnp.bfloat16)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(lay.batch, lay.num_heads),
        compiler_params=common.COMPILER_PARAMS, interpret=platforms.interpret("gpu"),
        name="m2rnn_forward",
    )(*inputs)
    y = outs[0].reshape(lay.batch, lay.seq_len, lay.num_heads, lay.value_pad)
    y = y[..., :lay.value_dim]
    checkpoints = outs[2] if save_checkpoints else None
    return y, _states_from_columns(outs[1], lay), checkpoints


def backward(q, k, v, w, f, h0, keep, checkpoints, dy, dh_final, *, gradient_clipping,
             chunk_size):
    del h0  # the checkpoints start with it
    lay = _plan(q, k, v, dh_final)
    contract.check_chunk_size("pallas_gpu", lay.seq_len, chunk_size, _runs_chunk)
    qg, kg, vc, fn, wn = _prepare(q, k, v, w, f, lay)
    n, vp, batch, seq_len = lay.num_heads, lay.value_pad, lay.batch, lay.seq_len
    dyc = common.pad_last(dy, vp).reshape(batch, seq_len, n * vp)
    inputs = [qg, kg, vc, fn, wn]
    if keep is not None:
        inputs.append(keep.astype(F32))
    inputs += [checkpoints, dyc, _states_to_columns(dh_final, lay)]

    shared_groups = lay.heads_per_group > 1
    qk_grad = jax.ShapeDtypeStruct((batch, seq_len, lay.qk_groups, lay.key_pad), F32)
    aliases = {}
    if shared_groups:
        aliases = {len(inputs): 0, len(inputs) + 1: 1}
        inputs += [jnp.zeros(qk_grad.shape, F32), jnp.zeros(qk_grad.shape, F32)]
    # dv needs float32 only when heads that share a value group are summed afterwards.
    dv_dtype = v.dtype if v.shape[2] == n else F32
    out_shape = [
        qk_grad, qk_grad,
        jax.ShapeDtypeStruct((batch, seq_len, n * vp), dv_dtype),
        jax.ShapeDtypeStruct((batch, seq_len, n), F32),
        jax.ShapeDtypeStruct((batch, n, vp, vp), F32),
        jax.ShapeDtypeStruct((batch, lay.key_pad, n * vp), F32),
        # Per-program scratch: the sub-chunk start states of the chunk being walked back.
        jax.ShapeDtypeStruct((batch, n, chunk_size // SUBCHUNK, lay.key_pad, vp), F32),
    ]
    kernel = functools.partial(
        _backward_kernel, lay=lay, chunk=chunk_size, has_keep=keep is not None,
        precision=_precision(v.dtype), w_is_bf16=w.dtype == jnp.bfloat16,
        clip=gradient_clipping, shared_groups=shared_groups)
    dq, dk, dv, df, dw, dh0, _ = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(batch, n), input_output_aliases=aliases,
        compiler_params=common.COMPILER_PARAMS, interpret=platforms.interpret("gpu"),
        name="m2rnn_backward",
    )(*inputs)

    dq = sum_heads(dq[..., :lay.key_dim], q.shape[2], axis=2)
    dk = sum_heads(dk[..., :lay.key_dim], k.shape[2], axis=2)
    dv = dv.reshape(batch, seq_len, n, vp)[..., :lay.value_dim]
    dv = sum_heads(dv, v.shape[2], axis=2)
    df = sum_heads(df, f.shape[2], axis=2)
    dw = jnp.sum(dw, axis=0)[:, :lay.value_dim, :lay.value_dim]
    dw = sum_heads(dw, w.shape[0], axis=0)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dw.astype(w.dtype),
            df.astype(f.dtype), _states_from_columns(dh0, lay))
