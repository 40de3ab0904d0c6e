"""The ``pallas_tpu`` backend: M²RNN forward and backward kernels in Pallas' Mosaic TPU lowering.

Heads packed side by side on the 128 lanes, the state in VMEM across the sequential chunk axis of
the grid, ``H W`` of all heads of a 128-lane tile as one MXU matmul with a block-diagonal weight;
inputs are cast to float32 on the way in. The layout of every block: docs/kernels.md
("pallas_tpu"). Off a TPU the kernels run in Mosaic TPU's interpreter.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import platforms
from pallas_kernels.loops import fori_loop
from pallas_kernels.m2rnn import contract
from pallas_kernels.m2rnn.heads import expand_heads, sum_heads

DEFAULT_CHUNK_SIZE = 32
_SUBLANES = 8  # steps per row tile: the time loop moves (8, lanes) tiles of v, f, y, ...
_LANES = 128
_MAX_BLOCK_LANES = 512  # heads per grid step: more tiles overlap more matmuls per step
_VMEM_LIMIT_BYTES = 32 * 2**20  # the backward at the defaults needs ~7 MiB (4 MiB of states)
_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


def _round_up(x, multiple):
    return -(-x // multiple) * multiple


def supports(q, k, v, w, f, h0):
    """Every input the op accepts."""
    del q, k, v, w, f, h0
    return None


def _runs_chunk(chunk):
    """8, 16, 32, 64 or a multiple of 128: whole (8, 128) row tiles, and time-on-lanes column
    blocks of ``max(C, 128)`` lanes that hold whole chunks."""
    return chunk % _SUBLANES == 0 and (_LANES % chunk == 0 or chunk % _LANES == 0)


def choose_chunk_size(seq_len, requested):
    """The contract's chunk rule: rounded up to 8, 16, 32, 64 or a multiple of 128."""
    return contract.fit_chunk_size(seq_len, requested, default=DEFAULT_CHUNK_SIZE,
                                   runs=_runs_chunk)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static sizes of the kernel layout (docs/kernels.md)."""
    batch: int
    seq_len: int
    chunk: int
    num_heads: int
    key_dim: int
    value_dim: int

    @property
    def key_pad(self):
        return _round_up(self.key_dim, _SUBLANES)

    @property
    def value_pad(self):
        if self.value_dim <= _LANES:
            return 1 << (self.value_dim - 1).bit_length()  # divides 128
        return _round_up(self.value_dim, _LANES)

    @property
    def tile_lanes(self):
        return max(_LANES, self.value_pad)

    @property
    def heads_per_tile(self):
        return self.tile_lanes // self.value_pad

    @property
    def tiles_per_block(self):
        """As many as fit in ``_MAX_BLOCK_LANES``, balanced over the blocks to pad few heads."""
        tiles = -(-self.num_heads // self.heads_per_tile)
        blocks = -(-tiles // max(1, _MAX_BLOCK_LANES // self.tile_lanes))
        return -(-tiles // blocks)

    @property
    def heads_per_block(self):
        return self.tiles_per_block * self.heads_per_tile

    @property
    def num_blocks(self):
        return -(-self.num_heads // self.heads_per_block)

    @property
    def padded_heads(self):
        return self.num_blocks * self.heads_per_block

    @property
    def block_lanes(self):
        return self.tiles_per_block * self.tile_lanes

    @property
    def num_chunks(self):
        return self.seq_len // self.chunk

    @property
    def column_lanes(self):
        """Time steps per column block (lanes): 128, or C when C is a multiple of 128."""
        return max(self.chunk, _LANES)

    @property
    def column_steps(self):
        """S padded to whole column blocks."""
        return _round_up(self.seq_len, self.column_lanes)


def _layout(q, v, h0, chunk_size):
    batch, seq_len, _, key_dim = q.shape
    contract.check_chunk_size("pallas_tpu", seq_len, chunk_size, _runs_chunk)
    return _Layout(batch, seq_len, chunk_size, h0.shape[1], key_dim, v.shape[-1])


# ----------------------------------------------------------------------------------------------
# Conversions between the op's (B, S, N, ...) tensors and the kernel layout.

def _group_index(layout, groups):
    """(blocks, G) indices of the q/k groups each block reads; G = 1 when a block shares one."""
    per_group = layout.num_heads // groups
    # Padding heads read the last real head's group: its block already reads it.
    heads = np.minimum(np.arange(layout.padded_heads), layout.num_heads - 1)
    index = (heads // per_group).reshape(layout.num_blocks, layout.heads_per_block)
    if np.all(index == index[:, :1]):
        return index[:, :1]
    return index


def _to_columns(x, index, layout):
    """(B, S, Nx, K) -> (B, blocks, G, Kp, S') float32, time on lanes (S' = ``column_steps``)."""
    x = x.astype(_F32)[:, :, index].transpose(0, 2, 3, 4, 1)
    return jnp.pad(x, ((0, 0),) * 3 + ((0, layout.key_pad - layout.key_dim),
                                       (0, layout.column_steps - layout.seq_len)))


def _from_columns(dx, index, groups, layout, dtype):
    """Inverse of ``_to_columns`` for gradients: sums the block columns into their groups."""
    dx = dx[..., :layout.key_dim, :layout.seq_len].transpose(0, 4, 1, 2, 3)
    out = jnp.zeros((layout.batch, layout.seq_len, groups, layout.key_dim), _F32)
    return out.at[:, :, index].add(dx).astype(dtype)


def _to_keep_lanes(keep, layout):
    """(B, S) -> (B, 1, S') float32, time on lanes."""
    keep = jnp.pad(keep.astype(_F32), ((0, 0), (0, layout.column_steps - layout.seq_len)))
    return keep[:, None, :]


def _to_rows(x, layout, head_fill=0.0):
    """(B, S, N, W) per-head lane values, W <= Vp -> (B, S, lanes) float32."""
    pads = ((0, 0), (0, 0), (0, layout.padded_heads - layout.num_heads), (0, 0))
    x = jnp.pad(x.astype(_F32), pads, constant_values=head_fill)
    x = jnp.pad(x, ((0, 0),) * 3 + ((0, layout.value_pad - x.shape[-1]),))
    return x.reshape(x.shape[:2] + (-1,))


def _from_rows(x, layout):
    """(B, S, lanes) -> (B, S, N, Vp)."""
    x = x.reshape(x.shape[:2] + (layout.padded_heads, layout.value_pad))
    return x[:, :, :layout.num_heads]


def _to_state(h, layout):
    """(B, N, K, V) -> (B, Kp, lanes) float32."""
    h = jnp.pad(h.astype(_F32), ((0, 0), (0, layout.padded_heads - layout.num_heads),
                                 (0, layout.key_pad - layout.key_dim),
                                 (0, layout.value_pad - layout.value_dim)))
    return h.transpose(0, 2, 1, 3).reshape(layout.batch, layout.key_pad, -1)


def _from_state(h, layout):
    """(B, Kp, lanes) -> (B, N, K, V)."""
    h = h.reshape(layout.batch, layout.key_pad, layout.padded_heads, layout.value_pad)
    return h.transpose(0, 2, 1, 3)[:, :layout.num_heads, :layout.key_dim, :layout.value_dim]


def _to_block_diagonal(w, layout):
    """(Nw, V, V) -> (tiles, 128, 128): each tile's heads' weights on its diagonal."""
    w = expand_heads(w.astype(_F32), layout.num_heads, axis=0)
    vpad = layout.value_pad - layout.value_dim
    w = jnp.pad(w, ((0, layout.padded_heads - layout.num_heads), (0, vpad), (0, vpad)))
    per_tile = layout.heads_per_tile
    w = w.reshape(-1, per_tile, layout.value_pad, layout.value_pad)
    eye = jnp.eye(per_tile, dtype=_F32)
    return jnp.einsum("thij,hg->thigj", w, eye).reshape(-1, layout.tile_lanes, layout.tile_lanes)


def _from_block_diagonal(dw, layout, groups, dtype):
    """(B, tiles, 128, 128) -> (Nw, V, V): the diagonal blocks summed over batch and groups."""
    per_tile, vp = layout.heads_per_tile, layout.value_pad
    dw = dw.sum(axis=0).reshape(-1, per_tile, vp, per_tile, vp)
    dw = jnp.einsum("thihj->thij", dw).reshape(layout.padded_heads, vp, vp)
    dw = dw[:layout.num_heads, :layout.value_dim, :layout.value_dim]
    return sum_heads(dw, groups, 0).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Per-step math inside the kernels. Arrays are (Kp, lanes) unless noted; rows are (1, lanes).

def _dot(a, b):
    return jnp.dot(a, b, precision=_HIGHEST, preferred_element_type=_F32)


def _dot_tn(a, b):
    """aᵀ b without materialising the transpose."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HIGHEST,
                           preferred_element_type=_F32)


@dataclasses.dataclass(frozen=True)
class _StepContext:
    """What every step of one grid step shares: weights and head-to-lane maps."""
    weights: tuple  # per tile (128, 128)
    tile_lanes: int
    q_spread: jax.Array | None  # (G, lanes) 0/1, or None when the block shares one q group
    k_spread: jax.Array | None

    def tilewise(self, x, weights):
        """x @ blockdiag(weights): one MXU matmul per 128-lane tile."""
        lanes = self.tile_lanes
        parts = [_dot(x[:, i * lanes:(i + 1) * lanes], w) for i, w in enumerate(weights)]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _head_spread(layout):
    """(heads per block, lanes) 0/1 matrix: row n is 1 on the lanes of the block's head n."""
    lanes = np.arange(layout.block_lanes)
    heads = np.arange(layout.heads_per_block)
    return jnp.asarray(lanes[None, :] // layout.value_pad == heads[:, None], _F32)


def _lane_is(shape, lane):
    return lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1) == lane


def _read_column(block, lane):
    """Column ``lane`` of a (rows, lanes) block as (rows, 1): a lane select and a lane sum."""
    return jnp.sum(jnp.where(_lane_is(block.shape, lane), block, 0.0), axis=1, keepdims=True)


def _spread_columns(ref, spread, lane):
    """One step's q (or k) for every lane: (Kp, 1) if the block shares one group, else
    (Kp, lanes)."""
    if spread is None:
        return _read_column(ref[0], lane)
    return sum(_read_column(ref[g], lane) * spread[g:g + 1, :] for g in range(spread.shape[0]))


def _write_columns(ref, spread, lane, x):
    """Sums per-lane ``x`` (Kp, lanes) over each group's lanes into column ``lane`` of ref[g]."""
    for g in range(1 if spread is None else spread.shape[0]):
        column = jnp.sum(x if spread is None else x * spread[g:g + 1, :], axis=1, keepdims=True)
        ref[g] = jnp.where(_lane_is(ref.shape[1:], lane), column, ref[g])


def _transition(ctx, h_before, keep_t, k_ref, lane, v_row, f_row):
    """One step: H_{t-1} before a possible reset -> (H_{t-1}, k on lanes, Z_t, H_t)."""
    h_prev = h_before if keep_t is None else h_before * keep_t
    k_lanes = _spread_columns(k_ref, ctx.k_spread, lane)
    z = jnp.tanh(ctx.tilewise(h_prev, ctx.weights) + k_lanes * v_row)
    return h_prev, k_lanes, z, f_row * h_prev + (1.0 - f_row) * z


def _set_row(tile, j, row):
    """Row j of an (8, lanes) tile replaced by ``row`` (a select: no unaligned stores)."""
    return jnp.where(lax.broadcasted_iota(jnp.int32, tile.shape, 0) == j, row, tile)


def _row_tiles(base, *refs):
    """The (8, lanes) tiles of rows [base, base + 8) of each ref (None passes through)."""
    rows = pl.ds(base, _SUBLANES)
    return [None if ref is None else ref[rows, :] for ref in refs]


def _row(tile, j):
    return None if tile is None else tile[j:j + 1, :]


def _load(ref):
    return None if ref is None else ref[...]


def _keep(keep_ref, lane):
    """(1, 1): 0 where a document starts at this step, else 1; None without segments."""
    return None if keep_ref is None else _read_column(keep_ref[...], lane)


# ----------------------------------------------------------------------------------------------
# Kernels.

def _forward_kernel(*refs, layout, has_keep, save_checkpoints, q_groups, k_groups):
    take = iter(refs).__next__
    q_ref, k_ref, v_ref, f_ref = take(), take(), take(), take()
    keep_ref = take() if has_keep else None
    q_spread_ref = take() if q_groups > 1 else None
    k_spread_ref = take() if k_groups > 1 else None
    w_ref, h0_ref, y_ref, h_final_ref = take(), take(), take(), take()
    checkpoint_ref = take() if save_checkpoints else None
    state_ref = take()

    chunk = pl.program_id(2)
    first_lane = lax.rem(chunk * layout.chunk, jnp.int32(layout.column_lanes))  # in its block

    @pl.when(chunk == 0)
    def _():
        state_ref[...] = h0_ref[...]

    if save_checkpoints:
        checkpoint_ref[...] = state_ref[...]
    ctx = _StepContext(tuple(w_ref[i] for i in range(layout.tiles_per_block)),
                       layout.tile_lanes, _load(q_spread_ref), _load(k_spread_ref))

    def eight_steps(i, h):
        base = pl.multiple_of(i * _SUBLANES, _SUBLANES)
        v_tile, f_tile = _row_tiles(base, v_ref, f_ref)
        y_tile = jnp.zeros(v_tile.shape, _F32)
        for j in range(_SUBLANES):
            lane = first_lane + base + j
            _, _, _, h = _transition(ctx, h, _keep(keep_ref, lane), k_ref, lane,
                                     _row(v_tile, j), _row(f_tile, j))
            q_lanes = _spread_columns(q_ref, ctx.q_spread, lane)
            y_tile = _set_row(y_tile, j, jnp.sum(q_lanes * h, axis=0, keepdims=True))
        y_ref[pl.ds(base, _SUBLANES), :] = y_tile
        return h

    h = fori_loop(0, layout.chunk // _SUBLANES, eight_steps, state_ref[...])
    state_ref[...] = h

    @pl.when(chunk == layout.num_chunks - 1)
    def _():
        h_final_ref[...] = h


def _backward_kernel(*refs, layout, has_keep, gradient_clipping, q_groups, k_groups):
    take = iter(refs).__next__
    q_ref, k_ref, v_ref, f_ref = take(), take(), take(), take()
    keep_ref = take() if has_keep else None
    q_spread_ref = take() if q_groups > 1 else None
    k_spread_ref = take() if k_groups > 1 else None
    w_ref, w_t_ref, checkpoint_ref, dy_ref, dh_final_ref = (take() for _ in range(5))
    dq_ref, dk_ref, dv_ref, df_ref, dw_ref, dh0_ref = (take() for _ in range(6))
    grad_ref, states_ref = take(), take()

    step = pl.program_id(2)
    chunk = layout.num_chunks - 1 - step
    first_lane = lax.rem(chunk * layout.chunk, jnp.int32(layout.column_lanes))  # in its block

    @pl.when(step == 0)
    def _():
        grad_ref[...] = dh_final_ref[...]
        dw_ref[...] = jnp.zeros(dw_ref.shape, _F32)

    # A dq/dk column block collects several chunks; clear it on its first (highest) chunk.
    @pl.when((step == 0) | (first_lane + layout.chunk == layout.column_lanes))
    def _():
        dq_ref[...] = jnp.zeros(dq_ref.shape, _F32)
        dk_ref[...] = jnp.zeros(dk_ref.shape, _F32)

    tiles, lanes = layout.tiles_per_block, layout.tile_lanes
    ctx = _StepContext(tuple(w_ref[i] for i in range(tiles)), lanes, _load(q_spread_ref),
                       _load(k_spread_ref))
    weights_t = tuple(w_t_ref[i] for i in range(tiles))
    groups_per_chunk = layout.chunk // _SUBLANES

    def recompute_eight_steps(i, h):
        base = pl.multiple_of(i * _SUBLANES, _SUBLANES)
        v_tile, f_tile = _row_tiles(base, v_ref, f_ref)
        for j in range(_SUBLANES):
            lane = first_lane + base + j
            states_ref[base + j] = h  # the state *before* step base + j
            _, _, _, h = _transition(ctx, h, _keep(keep_ref, lane), k_ref, lane,
                                     _row(v_tile, j), _row(f_tile, j))
        return h

    fori_loop(0, groups_per_chunk, recompute_eight_steps, checkpoint_ref[...])

    def eight_steps_back(i_reversed, acc):
        g_later, dw = acc
        base = pl.multiple_of((groups_per_chunk - 1 - i_reversed) * _SUBLANES, _SUBLANES)
        v_tile, f_tile, dy_tile = _row_tiles(base, v_ref, f_ref, dy_ref)
        dv_tile = jnp.zeros(v_tile.shape, _F32)
        df_tile = jnp.zeros(v_tile.shape, _F32)
        for j in reversed(range(_SUBLANES)):
            lane = first_lane + base + j
            keep_t = _keep(keep_ref, lane)
            v_row, f_row, dy_row = (_row(x, j) for x in (v_tile, f_tile, dy_tile))
            h_prev, k_lanes, z, h_t = _transition(ctx, states_ref[base + j], keep_t, k_ref,
                                                  lane, v_row, f_row)
            # docs/math.md §2: clamp what arrives from later steps, then add the read-out's.
            if gradient_clipping is not None:
                g_later = jnp.clip(g_later, -gradient_clipping, gradient_clipping)
            g = g_later + _spread_columns(q_ref, ctx.q_spread, lane) * dy_row
            _write_columns(dq_ref, ctx.q_spread, lane, h_t * dy_row)
            df_tile = _set_row(df_tile, j, jnp.sum(g * (h_prev - z), axis=0, keepdims=True))
            du = (1.0 - f_row) * g * (1.0 - z * z)
            dv_tile = _set_row(dv_tile, j, jnp.sum(du * k_lanes, axis=0, keepdims=True))
            _write_columns(dk_ref, ctx.k_spread, lane, du * v_row)
            dw = tuple(acc + _dot_tn(h_prev[:, i * lanes:(i + 1) * lanes],
                                     du[:, i * lanes:(i + 1) * lanes])
                       for i, acc in enumerate(dw))
            g_later = f_row * g + ctx.tilewise(du, weights_t)
            if keep_t is not None:
                g_later = g_later * keep_t
        rows = pl.ds(base, _SUBLANES)
        dv_ref[rows, :] = dv_tile
        df_ref[rows, :] = df_tile
        return g_later, dw

    dw_zero = tuple(jnp.zeros((lanes, lanes), _F32) for _ in range(tiles))
    grad, dw = fori_loop(0, groups_per_chunk, eight_steps_back, (grad_ref[...], dw_zero))
    grad_ref[...] = grad
    for i in range(tiles):
        dw_ref[i] += dw[i]

    @pl.when(step == layout.num_chunks - 1)
    def _():
        dh0_ref[...] = grad  # not clamped: docs/math.md §2


# ----------------------------------------------------------------------------------------------
# pallas_call plumbing.

def _interpret_params():
    return pltpu.InterpretParams() if platforms.interpret("tpu") else False


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                vmem_limit_bytes=_VMEM_LIMIT_BYTES)


class _Specs:
    """BlockSpecs of the grid (batch, head block, chunk); ``reverse`` walks chunks backwards."""

    def __init__(self, layout, reverse):
        self.layout = layout
        last = layout.num_chunks - 1
        self.chunk_of = (lambda c: last - c) if reverse else (lambda c: c)

    def column_block(self, c):
        return lax.div(self.chunk_of(c) * self.layout.chunk, jnp.int32(self.layout.column_lanes))

    def columns(self, groups):
        lay = self.layout
        return pl.BlockSpec((None, None, groups, lay.key_pad, lay.column_lanes),
                            lambda b, h, c: (b, h, 0, 0, self.column_block(c)))

    def rows(self):
        lay = self.layout
        return pl.BlockSpec((None, lay.chunk, lay.block_lanes),
                            lambda b, h, c: (b, self.chunk_of(c), h))

    def keep(self):
        return pl.BlockSpec((None, 1, self.layout.column_lanes),
                            lambda b, h, c: (b, 0, self.column_block(c)))

    def head_spread(self):
        lay = self.layout
        return pl.BlockSpec((lay.heads_per_block, lay.block_lanes), lambda b, h, c: (0, 0))

    def weights(self):
        lay = self.layout
        return pl.BlockSpec((lay.tiles_per_block, lay.tile_lanes, lay.tile_lanes),
                            lambda b, h, c: (h, 0, 0))

    def weight_grads(self):
        lay = self.layout
        return pl.BlockSpec((None, lay.tiles_per_block, lay.tile_lanes, lay.tile_lanes),
                            lambda b, h, c: (b, h, 0, 0))

    def state(self):
        lay = self.layout
        return pl.BlockSpec((None, lay.key_pad, lay.block_lanes), lambda b, h, c: (b, 0, h))

    def checkpoint(self):
        lay = self.layout
        return pl.BlockSpec((None, None, lay.key_pad, lay.block_lanes),
                            lambda b, h, c: (b, self.chunk_of(c), 0, h))


def _kernel_inputs(q, k, v, f, keep, layout, specs):
    """The inputs both kernels share, their BlockSpecs, and the q/k group indices."""
    q_index = _group_index(layout, q.shape[2])
    k_index = _group_index(layout, k.shape[2])
    v_rows = _to_rows(expand_heads(v, layout.num_heads, axis=2), layout)
    f_heads = expand_heads(f, layout.num_heads, axis=2)[..., None]
    # Padding heads keep f = 1: their (zero) state stays put.
    f_rows = _to_rows(jnp.broadcast_to(f_heads, f_heads.shape[:3] + (layout.value_pad,)),
                      layout, head_fill=1.0)
    inputs = [_to_columns(q, q_index, layout), _to_columns(k, k_index, layout), v_rows, f_rows]
    in_specs = [specs.columns(q_index.shape[1]), specs.columns(k_index.shape[1]), specs.rows(),
                specs.rows()]
    if keep is not None:
        inputs.append(_to_keep_lanes(keep, layout))
        in_specs.append(specs.keep())
    for index in (q_index, k_index):
        if index.shape[1] > 1:
            inputs.append(_head_spread(layout))
            in_specs.append(specs.head_spread())
    return inputs, in_specs, q_index, k_index


def _shape(*shape):
    return jax.ShapeDtypeStruct(shape, _F32)


def forward(q, k, v, w, f, h0, keep, *, chunk_size, save_checkpoints):
    lay = _layout(q, v, h0, chunk_size)
    specs = _Specs(lay, reverse=False)
    inputs, in_specs, q_index, k_index = _kernel_inputs(q, k, v, f, keep, lay, specs)
    groups = dict(q_groups=q_index.shape[1], k_groups=k_index.shape[1])
    inputs += [_to_block_diagonal(w, lay), _to_state(h0, lay)]
    in_specs += [specs.weights(), specs.state()]

    lanes = lay.padded_heads * lay.value_pad
    out_shape = [_shape(lay.batch, lay.seq_len, lanes), _shape(lay.batch, lay.key_pad, lanes)]
    out_specs = [specs.rows(), specs.state()]
    if save_checkpoints:
        out_shape.append(_shape(lay.batch, lay.num_chunks, lay.key_pad, lanes))
        out_specs.append(specs.checkpoint())

    kernel = functools.partial(_forward_kernel, layout=lay, has_keep=keep is not None,
                               save_checkpoints=save_checkpoints, **groups)
    outputs = pl.pallas_call(
        kernel,
        grid=(lay.batch, lay.num_blocks, lay.num_chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((lay.key_pad, lay.block_lanes), _F32)],
        compiler_params=_compiler_params(),
        interpret=_interpret_params(),
    )(*inputs)
    y_rows, h_final = outputs[:2]
    y = _from_rows(y_rows, lay)[..., :lay.value_dim].astype(v.dtype)
    checkpoints = outputs[2] if save_checkpoints else None
    return y, _from_state(h_final, lay), checkpoints


def backward(q, k, v, w, f, h0, keep, checkpoints, dy, dh_final, *, gradient_clipping,
             chunk_size):
    del h0  # the checkpoints hold every chunk's starting state
    lay = _layout(q, v, dh_final, chunk_size)
    specs = _Specs(lay, reverse=True)
    inputs, in_specs, q_index, k_index = _kernel_inputs(q, k, v, f, keep, lay, specs)
    groups = dict(q_groups=q_index.shape[1], k_groups=k_index.shape[1])
    w_block = _to_block_diagonal(w, lay)
    inputs += [w_block, w_block.transpose(0, 2, 1), checkpoints, _to_rows(dy, lay),
               _to_state(dh_final, lay)]
    in_specs += [specs.weights(), specs.weights(), specs.checkpoint(), specs.rows(),
                 specs.state()]

    b, s, kp = lay.batch, lay.seq_len, lay.key_pad
    lanes = lay.padded_heads * lay.value_pad
    tiles = lay.num_blocks * lay.tiles_per_block
    steps = lay.column_steps
    out_shape = [_shape(b, lay.num_blocks, groups["q_groups"], kp, steps),
                 _shape(b, lay.num_blocks, groups["k_groups"], kp, steps),
                 _shape(b, s, lanes), _shape(b, s, lanes),
                 _shape(b, tiles, lay.tile_lanes, lay.tile_lanes), _shape(b, kp, lanes)]
    out_specs = [specs.columns(groups["q_groups"]), specs.columns(groups["k_groups"]),
                 specs.rows(), specs.rows(), specs.weight_grads(), specs.state()]

    kernel = functools.partial(_backward_kernel, layout=lay, has_keep=keep is not None,
                               gradient_clipping=gradient_clipping, **groups)
    dq, dk, dv_rows, df_rows, dw, dh0 = pl.pallas_call(
        kernel,
        grid=(lay.batch, lay.num_blocks, lay.num_chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((kp, lay.block_lanes), _F32),
                        pltpu.VMEM((lay.chunk, kp, lay.block_lanes), _F32)],
        compiler_params=_compiler_params(),
        interpret=_interpret_params(),
    )(*inputs)

    dv = _from_rows(dv_rows, lay)[..., :lay.value_dim]
    df = _from_rows(df_rows, lay).sum(axis=-1)
    return (_from_columns(dq, q_index, q.shape[2], lay, q.dtype),
            _from_columns(dk, k_index, k.shape[2], lay, k.dtype),
            sum_heads(dv, v.shape[2], 2).astype(v.dtype),
            _from_block_diagonal(dw, lay, w.shape[0], w.dtype),
            sum_heads(df, f.shape[2], 2).astype(f.dtype),
            _from_state(dh0, lay))
