"""GPU Pallas kernels (Triton lowering) for vector-state heads (K = 1): forward and backward.

With K = 1 a head's state is one V-vector per sequence. ``gpu.py`` tiles by sequence (one
program per batch row, K padded to 16): 16× the arithmetic, spread over B·N tiny programs. Here
the batch is the row axis instead: every sequence of a head shares that head's W, so a block of
R sequences advances with one ``(R, Vp)·(Vp, Vp)`` dot per step. This is the shape of the
state-tracking models (``configs/state_tracking``), whose scan-backend steps are bound by the
scan's per-step kernel launches.

Implements the backend interface documented in ``m2rnn_jax.reference``. Off the GPU the kernels
run with ``interpret=True``, which is how CI tests them.

Tiling (what lives where):
  * Grid ``(N, Bp / R)``: one program per head and block of R batch rows (``Bp``: B padded to
    a multiple of R; padded rows carry zeros and add nothing to dW). The program walks the
    whole sequence; the state never leaves it.
  * The V-wide tensors (v, y and their gradients) stay in the op's ``(B, S, N, V)`` layout
    (padded to ``(Bp, S, N, Vp)`` only where B or V need it): a step's ``(R, Vp)`` tile is R
    rows of Vp contiguous values (rearranging them time-major cost a transpose each way: the
    forward at 512×1024×16×64 took 4.05 ms with them, 1.88 ms without; H200,
    benchmarks/RESULTS.md). So do the small per-head scalars q, k, f, keep and their gradients
    by default, ``(Bp, S, N_x)``: a step loads R strided scalars, and XLA keeps the layer's
    activations row-major (rearranged time-major, ``(N_x, S, Bp)``, their loads were contiguous
    but XLA transposed the whole 1026-wide ``q|k|v`` tensor of the S5 model to slice them: train
    step 8.12 -> 6.28 ms; ``VectorKernelConfig.scalar_layout``).
  * State: one float32 register tile ``(R, Vp)`` (Vp: V padded to a power of two >= 16, the
    Triton dot's minimum). The forward writes y and, when asked, the state every ``chunk``
    steps (memory grows as S/C).
  * Backward: chunks in reverse with ``gpu.py``'s two-level recomputation (sub-chunk start
    states in a per-program scratch, then ``subchunk`` states at a time in registers). dW
    accumulates in float32 registers per program (partial sums over the row blocks are added
    afterwards); dq, dk, df and dv are written per head and summed over shared groups
    afterwards: no atomics.

Precision as in ``gpu.py``: exact float32 dots for float32 inputs, hi/lo-split bf16 tensor-core
dots for bfloat16 inputs; the state is float32 whatever the input dtype.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from m2rnn_jax.heads import sum_heads
from pallas_kernels.m2rnn import gpu
from pallas_kernels.m2rnn.gpu import (_TRANSPOSED_LHS, _dot, _interpret, _next_pow2,
                                      _pad_last)

DEFAULT_CHUNK_SIZE = gpu.DEFAULT_CHUNK_SIZE
_F32 = jnp.float32
_FLOAT32_DOTS = {"ieee": lax.Precision.HIGHEST, "split": "split",
                 "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3}


@dataclasses.dataclass(frozen=True)
class VectorKernelConfig:
    """Tuning knobs (defaults measured on an H200, benchmarks/RESULTS.md: at the S5 model's
    512×64×16×64 float32 fwd+bwd 0.98 ms against 2.03 for the earlier R = 16, 8 warps,
    unroll 8, sub-chunk 2, exact dots, time-major scalars, whose backward spilled registers)."""

    block_rows: int = 16   # R, batch rows per program (>= 16: the Triton dot's minimum)
    num_warps: int = 4     # forward
    backward_num_warps: int = 4
    num_stages: int = 1
    unroll: int = 1        # forward steps per loop iteration (their loads issued together)
    subchunk: int = 1      # backward: states recomputed into registers at once
    # Dots of float32 inputs: "ieee" (exact float32 FMAs), "split" (bf16 tensor cores on hi/lo
    # parts, ~16 mantissa bits; relative error ~4e-6 against the scan at the S5 shape, 6e-7
    # for "ieee", whose 64×64 FMA tiles need the registers), "tf32x3" (three TF32
    # tensor-core products). bfloat16 inputs always take "split", as in gpu.py.
    float32_dots: str = "split"
    # The per-head scalars q, k, f, keep and the gradients dq, dk, df: "batch_major" (the op's
    # own (B, S, N_x): R strided scalars per step, no rearrangement) or "time_major"
    # (rearranged outside to (N_x, S, Bp): contiguous R-vectors per step, but XLA then
    # transposed the S5 model's whole 1026-wide q|k|v tensor to slice q and k). H200, S5
    # shape: op fwd+bwd 1.33 -> 0.98 ms, train step 8.12 -> 6.28 ms, forward at 512×1024
    # 1.95 -> 2.08 ms (benchmarks/RESULTS.md, ninth session).
    scalar_layout: str = "batch_major"

    def __post_init__(self):
        for name in ("block_rows", "num_warps", "backward_num_warps", "unroll", "subchunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"VectorKernelConfig.{name} must be a power of two, "
                                 f"got {value!r}")
        if self.block_rows < 16:
            raise ValueError(f"VectorKernelConfig.block_rows must be >= 16 (the Triton dot's "
                             f"minimum), got {self.block_rows}")
        if self.scalar_layout not in ("time_major", "batch_major"):
            raise ValueError(f"VectorKernelConfig.scalar_layout must be 'time_major' or "
                             f"'batch_major', got {self.scalar_layout!r}")
        if self.float32_dots not in _FLOAT32_DOTS:
            raise ValueError(f"VectorKernelConfig.float32_dots must be one of "
                             f"{tuple(_FLOAT32_DOTS)}, got {self.float32_dots!r}")


DEFAULT_CONFIG = VectorKernelConfig()


def chunk_quantum(config=None):
    """Chunk sizes must be multiples of this (the forward unroll and the backward sub-chunk)."""
    return gpu.chunk_quantum(config or DEFAULT_CONFIG)


def choose_chunk_size(seq_len, requested):
    return gpu.choose_chunk_size(seq_len, requested, quantum=chunk_quantum(),
                                 backend="pallas_gpu_vector")


def supports(query, key, value, weight, forget_input):
    """The kernels take any shape and dtype the op takes, as long as K = 1."""
    del key, value, weight, forget_input
    return query.shape[-1] == 1


@dataclasses.dataclass(frozen=True)
class _Layout:
    batch: int
    seq_len: int
    num_heads: int    # N
    value_dim: int    # V
    value_pad: int    # Vp
    block_rows: int   # R
    groups: tuple     # head counts of (q, k, v, f, w)
    scalars_batch_major: bool  # VectorKernelConfig.scalar_layout == "batch_major"

    @property
    def batch_pad(self):
        return -(-self.batch // self.block_rows) * self.block_rows

    @property
    def row_blocks(self):
        return self.batch_pad // self.block_rows


def _plan(q, k, v, w, f, state, config):
    batch, seq_len, _, key_dim = q.shape
    if key_dim != 1:
        raise ValueError(f"the pallas_gpu_vector kernels need K = 1, got K = {key_dim}")
    # Small batches get a smaller block (never below the dot's 16 rows) rather than padding.
    rows = max(16, min(config.block_rows, _next_pow2(batch)))
    groups = (q.shape[2], k.shape[2], v.shape[2], f.shape[2], w.shape[0])
    value_dim = v.shape[-1]
    return _Layout(batch, seq_len, state.shape[1], value_dim, max(16, _next_pow2(value_dim)),
                   rows, groups, config.scalar_layout == "batch_major")


def _pad_rows(x, lay, axis, value=0.0):
    pad = lay.batch_pad - lay.batch
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _scalars_in(x, lay, value=0.0):
    """A per-head scalar input (B, S[, G]) in the kernels' layout: (G, S, Bp) (keep: (S, Bp))
    time-major, (Bp, S[, G]) batch-major."""
    if lay.scalars_batch_major:
        return _pad_rows(x, lay, axis=0, value=value)
    x = x.T if x.ndim == 2 else jnp.swapaxes(jnp.moveaxis(x, 2, 0), 1, 2)
    return _pad_rows(x, lay, axis=x.ndim - 1, value=value)


def _scalars_out(x, lay):
    """A per-head scalar output of the kernels -> (B, S, N)."""
    if lay.scalars_batch_major:
        return x[:lay.batch]
    return jnp.moveaxis(jnp.swapaxes(x[:, :, :lay.batch], 1, 2), 0, 2)  # (N, S, B) -> (B, S, N)


def _scalars_shape(lay):
    n, s, bp = lay.num_heads, lay.seq_len, lay.batch_pad
    return (bp, s, n) if lay.scalars_batch_major else (n, s, bp)


def _padded(x, lay):
    """(B, S, G, V) -> (Bp, S, G, Vp); no copy when B and V need no padding."""
    return _pad_rows(_pad_last(x, lay.value_pad), lay, axis=0)


def _unpadded(x, lay):
    """(Bp, S, N, Vp) -> (B, S, N, V)."""
    return x[:lay.batch, ..., :lay.value_dim]


def _states_to_rows(x, lay):
    """(B, N, 1, V) -> (N, Bp, Vp) float32."""
    x = _pad_last(jnp.swapaxes(x[:, :, 0].astype(_F32), 0, 1), lay.value_pad)
    return _pad_rows(x, lay, axis=1)


def _states_from_rows(x, lay):
    return jnp.swapaxes(x[:, :lay.batch, :lay.value_dim], 0, 1)[:, :, None, :]


def _weights(w, lay):
    """(Nw, V, V) -> (Nw, Vp, Vp) float32, zero-padded (padded state columns stay 0)."""
    pad = lay.value_pad - lay.value_dim
    return jnp.pad(w.astype(_F32), ((0, 0), (0, pad), (0, pad)))


def _precision(dtype, config):
    if jnp.dtype(dtype) != jnp.float32:
        return "split"
    if config.float32_dots == "tf32x3" and _interpret():
        return lax.Precision.HIGHEST  # the CPU has no TF32 products
    return _FLOAT32_DOTS[config.float32_dots]


# ----------------------------------------------------------------------------- in-kernel pieces


class _Step:
    """One program's view: its head, its rows; loads a step's inputs and advances the state."""

    def __init__(self, lay, q_ref, k_ref, v_ref, f_ref, w_ref, keep_ref, precision, w_is_bf16):
        self.refs = (q_ref, k_ref, v_ref, f_ref, keep_ref)
        self.batch_major = lay.scalars_batch_major
        self.precision, self.w_is_bf16 = precision, w_is_bf16
        self.head = pl.program_id(0)
        self.block = pl.program_id(1)
        self.rows = pl.ds(self.block * lay.block_rows, lay.block_rows)
        # Head n reads group n // (N / N_x) of each tensor; lax.div lowers directly.
        self.group = [lax.div(self.head, jnp.int32(lay.num_heads // g)) for g in lay.groups]
        self.w = w_ref[self.group[4]]

    def load(self, t):
        q_ref, k_ref, v_ref, f_ref, keep_ref = self.refs
        gq, gk, gv, gf, _ = self.group
        rows = self.rows
        q = self.scalars(q_ref, gq, t).astype(_F32)
        k = self.scalars(k_ref, gk, t).astype(_F32)
        v = v_ref[rows, t, gv, :].astype(_F32)
        f = self.scalars(f_ref, gf, t).astype(_F32)
        keep = None if keep_ref is None else keep_ref[self.scalar_index(t)]
        return q, k, v, f, keep

    def scalar_index(self, t, group=None):
        """Where this program's R values of a per-head scalar tensor (of ``keep`` without a
        group) at step t are, in the layout of ``scalar_layout``."""
        head = () if group is None else (group,)
        return (self.rows, t, *head) if self.batch_major else (*head, t, self.rows)

    def scalars(self, ref, group, t):
        return ref[self.scalar_index(t, group)]

    def store_scalars(self, ref, t, values):
        ref[self.scalar_index(t, self.head)] = values

    def advance(self, h, inputs):
        """H_{t-1} (before a possible reset) -> (reset H_{t-1}, Z_t, H_t), all (R, Vp)."""
        _, k, v, f, keep = inputs
        if keep is not None:
            h = h * keep[:, None]
        u = _dot(h, self.w, self.precision, b_is_bf16=self.w_is_bf16)
        z = jnp.tanh(u + k[:, None] * v)
        return h, z, z + f[:, None] * (h - z)


def _forward_kernel(*refs, lay, chunk, unroll, has_keep, save_checkpoints, precision,
                    w_is_bf16):
    q_ref, k_ref, v_ref, f_ref, w_ref, h0_ref, *rest = refs
    keep_ref = rest.pop(0) if has_keep else None
    y_ref, h_final_ref, *rest = rest
    ckpt_ref = rest[0] if save_checkpoints else None
    step = _Step(lay, q_ref, k_ref, v_ref, f_ref, w_ref, keep_ref, precision, w_is_bf16)
    n, rows = step.head, step.rows
    groups_per_chunk = chunk // unroll

    def run_group(i, h):
        t0 = i * unroll
        if save_checkpoints:
            @pl.when(lax.rem(i, groups_per_chunk) == 0)
            def _():
                ckpt_ref[n, lax.div(i, groups_per_chunk), rows, :] = h
        inputs = [step.load(t0 + j) for j in range(unroll)]  # issued together
        for j in range(unroll):
            _, _, h = step.advance(h, inputs[j])
            y_ref[rows, t0 + j, n, :] = (inputs[j][0][:, None] * h).astype(y_ref.dtype)
        return h

    h = lax.fori_loop(0, lay.seq_len // unroll, run_group, h0_ref[n, rows, :])
    h_final_ref[n, rows, :] = h


def _backward_kernel(*refs, lay, chunk, subchunk, has_keep, precision, w_is_bf16, clip,
                     interpret):
    q_ref, k_ref, v_ref, f_ref, w_ref, *rest = refs
    keep_ref = rest.pop(0) if has_keep else None
    (ckpt_ref, dy_ref, dh_final_ref,
     dq_ref, dk_ref, dv_ref, df_ref, dw_ref, dh0_ref, scratch_ref) = rest
    step = _Step(lay, q_ref, k_ref, v_ref, f_ref, w_ref, keep_ref, precision, w_is_bf16)
    n, block, rows = step.head, step.block, step.rows
    w_t = step.w.T

    def clamp(x):
        return x if clip is None else jnp.clip(x, -clip, clip)

    def walk_back_sub_chunk(t0, h, carry):
        g_later, dw = carry
        inputs = [step.load(t0 + j) for j in range(subchunk)]
        dys = [dy_ref[rows, t0 + j, n, :].astype(_F32) for j in range(subchunk)]
        states, zs = [h], []
        for j in range(subchunk):
            _, z, h = step.advance(h, inputs[j])
            states.append(h)
            zs.append(z)
        for j in reversed(range(subchunk)):
            q, k, v, f, keep = inputs[j]
            t, dy, z = t0 + j, dys[j], zs[j]
            h_prev = states[j] if keep is None else states[j] * keep[:, None]
            # SPEC §1: clamp what arrives from later steps, then add this step's read-out.
            g = clamp(g_later) + q[:, None] * dy
            du = (1.0 - f)[:, None] * g * (1.0 - z * z)
            step.store_scalars(dq_ref, t, jnp.sum(states[j + 1] * dy, axis=1))
            step.store_scalars(df_ref, t, jnp.sum(g * (h_prev - z), axis=1))
            step.store_scalars(dk_ref, t, jnp.sum(du * v, axis=1))
            dv_ref[rows, t, n, :] = (du * k[:, None]).astype(dv_ref.dtype)
            dw = dw + _dot(h_prev, du, precision, _TRANSPOSED_LHS)
            g_later = f[:, None] * g + _dot(du, w_t, precision, b_is_bf16=w_is_bf16)
            if keep is not None:
                g_later = g_later * keep[:, None]
        return g_later, dw

    def store_scratch(s, h):
        scratch_ref[n, block, s] = h

    dw0 = jnp.zeros((lay.value_pad, lay.value_pad), _F32)
    g, dw = gpu.walk_chunks_in_reverse(
        step, (dh_final_ref[n, rows, :], dw0), num_chunks=lay.seq_len // chunk, chunk=chunk,
        subchunk=subchunk, chunk_start=lambda c: ckpt_ref[n, c, rows, :],
        store_scratch=store_scratch, load_scratch=lambda s: scratch_ref[n, block, s],
        walk_back_sub_chunk=walk_back_sub_chunk, interpret=interpret)
    dh0_ref[n, rows, :] = g
    dw_ref[n, block] = dw


# ----------------------------------------------------------------------------- backend interface


def _inputs(q, k, v, w, f, keep, lay):
    inputs = [_scalars_in(q[..., 0], lay), _scalars_in(k[..., 0], lay), _padded(v, lay),
              _scalars_in(f, lay), _weights(w, lay)]
    keep = None if keep is None else _scalars_in(keep.astype(_F32), lay, value=1.0)
    return inputs, keep


def _call(kernel, out_shape, lay, num_warps, config, name):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(lay.num_heads, lay.row_blocks),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps,
                                                num_stages=config.num_stages),
        interpret=_interpret(), name=name)


def forward(q, k, v, w, f, h0, keep, *, chunk_size=DEFAULT_CHUNK_SIZE, save_checkpoints=True,
            config=None):
    config = config or DEFAULT_CONFIG
    lay = _plan(q, k, v, w, f, h0, config)
    gpu._check_chunk(lay.seq_len, chunk_size, config)
    inputs, keep_rows = _inputs(q, k, v, w, f, keep, lay)
    inputs.append(_states_to_rows(h0, lay))
    if keep_rows is not None:
        inputs.append(keep_rows)
    n, s, bp, vp = lay.num_heads, lay.seq_len, lay.batch_pad, lay.value_pad
    out_shape = [jax.ShapeDtypeStruct((bp, s, n, vp), v.dtype),
                 jax.ShapeDtypeStruct((n, bp, vp), _F32)]
    if save_checkpoints:
        out_shape.append(jax.ShapeDtypeStruct((n, s // chunk_size, bp, vp), _F32))
    kernel = functools.partial(
        _forward_kernel, lay=lay, chunk=chunk_size, unroll=config.unroll,
        has_keep=keep is not None, save_checkpoints=save_checkpoints,
        precision=_precision(v.dtype, config),
        w_is_bf16=w.dtype == jnp.bfloat16)
    outs = _call(kernel, out_shape, lay, config.num_warps, config,
                 "m2rnn_vector_forward")(*inputs)
    checkpoints = outs[2] if save_checkpoints else None
    return _unpadded(outs[0], lay), _states_from_rows(outs[1], lay), checkpoints


def backward(q, k, v, w, f, h0, keep, checkpoints, dy, dh_final, *, gradient_clipping,
             chunk_size=DEFAULT_CHUNK_SIZE, config=None):
    del h0  # the checkpoints start with it
    config = config or DEFAULT_CONFIG
    lay = _plan(q, k, v, w, f, dh_final, config)
    gpu._check_chunk(lay.seq_len, chunk_size, config)
    inputs, keep_rows = _inputs(q, k, v, w, f, keep, lay)
    if keep_rows is not None:
        inputs.append(keep_rows)
    inputs += [checkpoints, _padded(dy, lay), _states_to_rows(dh_final, lay)]
    n, s, bp, vp = lay.num_heads, lay.seq_len, lay.batch_pad, lay.value_pad
    per_row = jax.ShapeDtypeStruct(_scalars_shape(lay), _F32)
    out_shape = [
        per_row, per_row,                                            # dq, dk
        jax.ShapeDtypeStruct((bp, s, n, vp), _F32),                  # dv
        per_row,                                                     # df
        jax.ShapeDtypeStruct((n, lay.row_blocks, vp, vp), _F32),     # dW per row block
        jax.ShapeDtypeStruct((n, bp, vp), _F32),                     # dh0
        # Per-program scratch: the sub-chunk start states of the chunk being walked back.
        jax.ShapeDtypeStruct((n, lay.row_blocks, chunk_size // config.subchunk,
                              lay.block_rows, vp), _F32),
    ]
    kernel = functools.partial(
        _backward_kernel, lay=lay, chunk=chunk_size, subchunk=config.subchunk,
        has_keep=keep is not None,
        precision=_precision(v.dtype, config),
        w_is_bf16=w.dtype == jnp.bfloat16, clip=gradient_clipping, interpret=_interpret())
    dq, dk, dv, df, dw, dh0, _ = _call(kernel, out_shape, lay, config.backward_num_warps,
                                       config, "m2rnn_vector_backward")(*inputs)
    nq, nk, nv, nf, nw = lay.groups
    dq = sum_heads(_scalars_out(dq, lay), nq, axis=2)[..., None]
    dk = sum_heads(_scalars_out(dk, lay), nk, axis=2)[..., None]
    dv = sum_heads(_unpadded(dv, lay), nv, axis=2)
    df = sum_heads(_scalars_out(df, lay), nf, axis=2)
    dw = sum_heads(jnp.sum(dw, axis=1)[:, :lay.value_dim, :lay.value_dim], nw, axis=0)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dw.astype(w.dtype),
            df.astype(f.dtype), _states_from_rows(dh0, lay))
