"""The ``pallas_gpu_vector`` backend: Triton-lowered kernels for vector-state heads (K = 1).

With K = 1 a head's state is one V-vector per sequence, and every sequence of a head shares its
W, so these kernels tile by batch rows instead of by sequence: one program per (head, block of
16 rows) advances its rows with one ``(16, Vp)·(Vp, Vp)`` dot per step (the shape of the
state-tracking models). Dots run on the bf16 tensor cores with hi/lo parts of the float32
operands for every input dtype; the state is float32. Layout and the measured choices behind
it: docs/kernels.md ("pallas_gpu_vector"). Off a GPU the kernels run in Pallas' interpreter.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import platforms
from pallas_kernels.loops import fori_loop
from pallas_kernels.m2rnn import contract
from pallas_kernels.m2rnn import triton_common as common
from pallas_kernels.m2rnn.heads import sum_heads
from pallas_kernels.m2rnn.triton_common import F32

DEFAULT_CHUNK_SIZE = 64
BLOCK_ROWS = 16  # R: batch rows per program (the Triton dot's minimum; more spilled registers)
_PRECISION = "split"  # common.dot on hi/lo bf16 parts (exact float32 FMAs needed the registers)


def supports(q, k, v, w, f, h0):
    """K = 1, any other shape and dtype."""
    del k, v, w, f, h0
    key_dim = q.shape[-1]
    return None if key_dim == 1 else f"needs K = 1 (got K = {key_dim})"


def choose_chunk_size(seq_len, requested):
    """The contract's chunk rule; these kernels run any chunk size (sub-chunks of one step)."""
    return contract.fit_chunk_size(seq_len, requested, default=DEFAULT_CHUNK_SIZE)


@dataclasses.dataclass(frozen=True)
class _Layout:
    batch: int
    seq_len: int
    num_heads: int    # N
    value_dim: int    # V
    value_pad: int    # Vp: V padded to a power of two >= 16 (the Triton dot's minimum)
    groups: tuple     # head counts of (q, k, v, f, w)

    @property
    def batch_pad(self):
        return -(-self.batch // BLOCK_ROWS) * BLOCK_ROWS

    @property
    def row_blocks(self):
        return self.batch_pad // BLOCK_ROWS


def _plan(q, k, v, w, f, state):
    batch, seq_len, _, key_dim = q.shape
    if key_dim != 1:
        raise ValueError(f"the pallas_gpu_vector kernels need K = 1, got K = {key_dim}")
    groups = (q.shape[2], k.shape[2], v.shape[2], f.shape[2], w.shape[0])
    value_dim = v.shape[-1]
    return _Layout(batch, seq_len, state.shape[1], value_dim,
                   common.padded_dim(value_dim), groups)


def _pad_rows(x, lay, axis=0, value=0.0):
    """``x`` padded along its batch axis to whole row blocks."""
    pad = lay.batch_pad - lay.batch
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _padded(x, lay):
    """(B, S, G, V) -> (Bp, S, G, Vp); no copy when B and V need no padding."""
    return _pad_rows(common.pad_last(x, lay.value_pad), lay)


def _unpadded(x, lay):
    """(Bp, S, N, Vp) -> (B, S, N, V)."""
    return x[:lay.batch, ..., :lay.value_dim]


def _states_to_rows(x, lay):
    """(B, N, 1, V) -> (N, Bp, Vp) float32."""
    x = common.pad_last(jnp.swapaxes(x[:, :, 0].astype(F32), 0, 1), lay.value_pad)
    return _pad_rows(x, lay, axis=1)


def _states_from_rows(x, lay):
    return jnp.swapaxes(x[:, :lay.batch, :lay.value_dim], 0, 1)[:, :, None, :]


def _weights(w, lay):
    """(Nw, V, V) -> (Nw, Vp, Vp) float32, zero-padded (padded state columns stay 0)."""
    pad = lay.value_pad - lay.value_dim
    return jnp.pad(w.astype(F32), ((0, 0), (0, pad), (0, pad)))


# ----------------------------------------------------------------------------- in-kernel pieces


class _Step:
    """One program's view: its head, its rows; loads a step's inputs and advances the state.

    The per-head scalars (q, k, f, keep and the gradients dq, dk, df) stay in the op's
    ``(B, S, N_x)`` layout: a step reads R strided values (docs/kernels.md says why)."""

    def __init__(self, lay, q_ref, k_ref, v_ref, f_ref, w_ref, keep_ref, w_is_bf16):
        self.refs = (q_ref, k_ref, v_ref, f_ref, keep_ref)
        self.w_is_bf16 = w_is_bf16
        self.head = pl.program_id(0)
        self.block = pl.program_id(1)
        self.rows = pl.ds(self.block * BLOCK_ROWS, BLOCK_ROWS)
        # Head n reads group n // (N / N_x) of each tensor; lax.div lowers directly.
        self.group = [lax.div(self.head, jnp.int32(lay.num_heads // g)) for g in lay.groups]
        self.w = w_ref[self.group[4]]

    def load(self, t):
        q_ref, k_ref, v_ref, f_ref, keep_ref = self.refs
        gq, gk, gv, gf, _ = self.group
        rows = self.rows
        q = q_ref[rows, t, gq].astype(F32)
        k = k_ref[rows, t, gk].astype(F32)
        v = v_ref[rows, t, gv, :].astype(F32)
        f = f_ref[rows, t, gf].astype(F32)
        keep = None if keep_ref is None else keep_ref[rows, t]
        return q, k, v, f, keep

    def advance(self, h, inputs):
        """H_{t-1} (before a possible reset) -> (reset H_{t-1}, Z_t, H_t), all (R, Vp)."""
        _, k, v, f, keep = inputs
        if keep is not None:
            h = h * keep[:, None]
        u = common.dot(h, self.w, _PRECISION, b_is_bf16=self.w_is_bf16)
        z = jnp.tanh(u + k[:, None] * v)
        return h, z, z + f[:, None] * (h - z)


def _forward_kernel(*refs, lay, chunk, has_keep, save_checkpoints, w_is_bf16):
    q_ref, k_ref, v_ref, f_ref, w_ref, h0_ref, *rest = refs
    keep_ref = rest.pop(0) if has_keep else None
    y_ref, h_final_ref, *rest = rest
    ckpt_ref = rest[0] if save_checkpoints else None
    step = _Step(lay, q_ref, k_ref, v_ref, f_ref, w_ref, keep_ref, w_is_bf16)
    n, rows = step.head, step.rows

    def one_step(t, h):
        if save_checkpoints:
            @pl.when(lax.rem(t, jnp.int32(chunk)) == 0)
            def _():
                ckpt_ref[n, lax.div(t, jnp.int32(chunk)), rows, :] = h
        inputs = step.load(t)
        _, _, h = step.advance(h, inputs)
        y_ref[rows, t, n, :] = (inputs[0][:, None] * h).astype(y_ref.dtype)
        return h

    h = fori_loop(0, lay.seq_len, one_step, h0_ref[n, rows, :])
    h_final_ref[n, rows, :] = h


def _backward_kernel(*refs, lay, chunk, has_keep, w_is_bf16, clip):
    q_ref, k_ref, v_ref, f_ref, w_ref, *rest = refs
    keep_ref = rest.pop(0) if has_keep else None
    (ckpt_ref, dy_ref, dh_final_ref,
     dq_ref, dk_ref, dv_ref, df_ref, dw_ref, dh0_ref, scratch_ref) = rest
    step = _Step(lay, q_ref, k_ref, v_ref, f_ref, w_ref, keep_ref, w_is_bf16)
    n, block, rows = step.head, step.block, step.rows
    w_t = step.w.T

    def clamp(x):
        return x if clip is None else jnp.clip(x, -clip, clip)

    def walk_back_one_step(t, h_before, acc):
        """The step back from t + 1 to t (sub-chunks of one step: no spilled registers)."""
        g_later, dw = acc
        inputs = step.load(t)
        dy = dy_ref[rows, t, n, :].astype(F32)
        _, z, h_t = step.advance(h_before, inputs)
        q, k, v, f, keep = inputs
        h_prev = h_before if keep is None else h_before * keep[:, None]
        # docs/math.md §2: clamp what arrives from later steps, then add the read-out's.
        g = clamp(g_later) + q[:, None] * dy
        du = (1.0 - f)[:, None] * g * (1.0 - z * z)
        dq_ref[rows, t, n] = jnp.sum(h_t * dy, axis=1)
        df_ref[rows, t, n] = jnp.sum(g * (h_prev - z), axis=1)
        dk_ref[rows, t, n] = jnp.sum(du * v, axis=1)
        dv_ref[rows, t, n, :] = (du * k[:, None]).astype(dv_ref.dtype)
        dw = dw + common.dot(h_prev, du, _PRECISION, common.TRANSPOSED_LHS)
        g_later = f[:, None] * g + common.dot(du, w_t, _PRECISION, b_is_bf16=w_is_bf16)
        if keep is not None:
            g_later = g_later * keep[:, None]
        return g_later, dw

    def store_scratch(s, h):
        scratch_ref[n, block, s] = h

    dw0 = jnp.zeros((lay.value_pad, lay.value_pad), F32)
    g, dw = common.walk_chunks_in_reverse(
        step, (dh_final_ref[n, rows, :], dw0), num_chunks=lay.seq_len // chunk, chunk=chunk,
        subchunk=1, chunk_start=lambda c: ckpt_ref[n, c, rows, :],
        store_scratch=store_scratch, load_scratch=lambda s: scratch_ref[n, block, s],
        walk_back_sub_chunk=walk_back_one_step)
    dh0_ref[n, rows, :] = g
    dw_ref[n, block] = dw


# ----------------------------------------------------------------------------- backend contract


def _inputs(q, k, v, w, f, keep, lay):
    inputs = [_pad_rows(q[..., 0], lay), _pad_rows(k[..., 0], lay), _padded(v, lay),
              _pad_rows(f, lay), _weights(w, lay)]
    keep = None if keep is None else _pad_rows(keep.astype(F32), lay, value=1.0)
    return inputs, keep


def _call(kernel, out_shape, lay, name):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(lay.num_heads, lay.row_blocks),
        compiler_params=common.COMPILER_PARAMS, interpret=platforms.interpret("gpu"), name=name)


def forward(q, k, v, w, f, h0, keep, *, chunk_size, save_checkpoints):
    lay = _plan(q, k, v, w, f, h0)
    contract.check_chunk_size("pallas_gpu_vector", lay.seq_len, chunk_size)
    inputs, keep_rows = _inputs(q, k, v, w, f, keep, lay)
    inputs.append(_states_to_rows(h0, lay))
    if keep_rows is not None:
        inputs.append(keep_rows)
    n, s, bp, vp = lay.num_heads, lay.seq_len, lay.batch_pad, lay.value_pad
    out_shape = [jax.ShapeDtypeStruct((bp, s, n, vp), v.dtype),
                 jax.ShapeDtypeStruct((n, bp, vp), F32)]
    if save_checkpoints:
        out_shape.append(jax.ShapeDtypeStruct((n, s // chunk_size, bp, vp), F32))
    kernel = functools.partial(
        _forward_kernel, lay=lay, chunk=chunk_size, has_keep=keep is not None,
        save_checkpoints=save_checkpoints, w_is_bf16=w.dtype == jnp.bfloat16)
    outs = _call(kernel, out_shape, lay, "m2rnn_vector_forward")(*inputs)
    checkpoints = outs[2] if save_checkpoints else None
    return _unpadded(outs[0], lay), _states_from_rows(outs[1], lay), checkpoints


def backward(q, k, v, w, f, h0, keep, checkpoints, dy, dh_final, *, gradient_clipping,
             chunk_size):
    del h0  # the checkpoints start with it
    lay = _plan(q, k, v, w, f, dh_final)
    contract.check_chunk_size("pallas_gpu_vector", lay.seq_len, chunk_size)
    inputs, keep_rows = _inputs(q, k, v, w, f, keep, lay)
    if keep_rows is not None:
        inputs.append(keep_rows)
    inputs += [checkpoints, _padded(dy, lay), _states_to_rows(dh_final, lay)]
    n, s, bp, vp = lay.num_heads, lay.seq_len, lay.batch_pad, lay.value_pad
    per_row = jax.ShapeDtypeStruct((bp, s, n), F32)
    out_shape = [
        per_row, per_row,                                            # dq, dk
        jax.ShapeDtypeStruct((bp, s, n, vp), F32),                  # dv
        per_row,                                                     # df
        jax.ShapeDtypeStruct((n, lay.row_blocks, vp, vp), F32),     # dW per row block
        jax.ShapeDtypeStruct((n, bp, vp), F32),                     # dh0
        # Per-program scratch: the state at each step of the chunk being walked back.
        jax.ShapeDtypeStruct((n, lay.row_blocks, chunk_size, BLOCK_ROWS, vp), F32),
    ]
    kernel = functools.partial(
        _backward_kernel, lay=lay, chunk=chunk_size, has_keep=keep is not None,
        w_is_bf16=w.dtype == jnp.bfloat16, clip=gradient_clipping)
    dq, dk, dv, df, dw, dh0, _ = _call(kernel, out_shape, lay, "m2rnn_vector_backward")(*inputs)
    nq, nk, nv, nf, nw = lay.groups
    dq = sum_heads(dq[:lay.batch], nq, axis=2)[..., None]
    dk = sum_heads(dk[:lay.batch], nk, axis=2)[..., None]
    dv = sum_heads(_unpadded(dv, lay), nv, axis=2)
    df = sum_heads(df[:lay.batch], nf, axis=2)
    dw = sum_heads(jnp.sum(dw, axis=1)[:, :lay.value_dim, :lay.value_dim], nw, axis=0)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dw.astype(w.dtype),
            df.astype(f.dtype), _states_from_rows(dh0, lay))
