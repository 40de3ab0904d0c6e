"""One decode step of an M²RNN layer as one Triton-lowered kernel.

Decoding one token per row runs a few hundred small kernels: at batch 1 each does microseconds
of work or less, so what a token costs is mostly each kernel's fixed cost. Between the in-projection
and the output path, XLA ran a layer's decode step as separate kernels (the forget gate, the
conv input's convert, the conv ring's update, the state product ``H W``, the state update).
This kernel does that whole span at once:

* the causal depthwise conv of the new q|k|v input over the ring of earlier inputs (plus the
  optional bias), rounded to the compute dtype as the XLA path rounds it;
* SiLU on q and k, and on v unless the value activation is the identity;
* the forget gate ``f = exp(-exp(A_log) · softplus(logit + dt_bias))`` in float32;
* per head ``H = f H_prev + (1 - f) tanh(H_prev W + k vᵀ)`` (float32; ``H W`` at float32
  precision) and the read-out ``y[v] = Σ_k H[k, v] q[k]``;
* the output gate: ``(y + D ⊙ v) ⊙ silu(g)``, ``g`` read from the projection's last columns;
* the new state and the new conv input written in place (``input_output_aliases``).

It returns that gated read-out; the norm and out-projection after it are another kernel
(``pallas_kernels/row_product.py`` at batch 1). Grid: (rows, heads), one head per program,
which finds its group's channels of the grouped q/k/v/f/W/g (docs/math.md §1) at offsets
computed in the program. Blocks of 4 heads per program were slower at batch 1 than the XLA
kernels they replace (the heads' steps in series; docs/kernels.md).

The ring (``m2rnn_jax.layers.conv.conv_cache``) has ``taps`` slots, so the slot written holds
the input that has just left the window: no program reads it, and the heads that share
q/k channels cannot overwrite an input another head has yet to read. Each channel is written
once, by the first head of its group.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import platforms
from pallas_kernels.m2rnn import triton_common as common
from pallas_kernels.m2rnn.triton_common import F32


def supports(key_dim, value_dim):
    """Triton dots need power-of-two dims of at least 16: ``K`` and ``V`` must be such."""
    for name, dim in (("K", key_dim), ("V", value_dim)):
        if dim < 16 or dim != common.next_pow2(dim):
            return f"needs {name} a power of two >= 16 (got {name} = {dim})"
    return None


@dataclasses.dataclass(frozen=True)
class _Layout:
    num_heads: int        # N
    key_dim: int          # K
    value_dim: int        # V
    taps: int             # the conv's taps = the ring's slots
    groups: tuple         # head counts of (q, k, v, f, w, g)
    value_silu: bool
    has_bias: bool
    has_residual: bool    # the D ⊙ v term
    dtype: jnp.dtype      # the compute dtype: of the conv input, q|k|v, y and v

    def per_group(self, tensor):
        """Consecutive heads that share one group of ``tensor`` (an index into ``groups``)."""
        return self.num_heads // self.groups[tensor]

    @property
    def conv_width(self):
        """C: the q|k|v channels, the projection's first columns (the forget logits follow)."""
        nq, nk, nv = self.groups[:3]
        return (nq + nk) * self.key_dim + nv * self.value_dim

    def channel_offset(self, tensor, group):
        """The first conv channel of ``group`` of q (0), k (1) or v (2) in ``q|k|v``."""
        nq, nk = self.groups[:2]
        k_dim = self.key_dim
        starts = (0, nq * k_dim, (nq + nk) * k_dim)
        widths = (k_dim, k_dim, self.value_dim)
        return starts[tensor] + group * widths[tensor]


_Q, _K, _V, _F, _W, _G = range(6)


def _silu(x):
    return x / (1.0 + jnp.exp(-x))


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _kernel(*refs, lay):
    x_ref, ring_ref, step_ref, conv_w_ref, *rest = refs
    bias_ref = rest.pop(0) if lay.has_bias else None
    a_log_ref, dt_bias_ref, w_ref, *rest = rest
    d_ref = rest.pop(0) if lay.has_residual else None
    state_ref, gated_ref, state_out_ref, ring_out_ref = rest
    row, head = pl.program_id(0), pl.program_id(1)
    taps = lay.taps
    step = step_ref[0]

    def projection(cols):
        """Columns of the projection's row, rounded to the compute dtype as XLA's path has them."""
        return x_ref[row, cols].astype(lay.dtype)

    def slot(lag):  # m2rnn_jax.layers.conv.ring_slot (kernels import no layer code); step >= 0
        return lax.rem(step + (taps - 1 - lag), taps)

    def convolved(tensor, group, width):
        """The conv of one group's channels, activated, as the compute dtype's values."""
        cols = pl.ds(lay.channel_offset(tensor, group), width)
        out = projection(cols).astype(F32) * conv_w_ref[taps - 1, cols].astype(F32)
        for lag in range(1, taps):
            out += (ring_ref[row, slot(lag), cols].astype(F32)
                    * conv_w_ref[taps - 1 - lag, cols].astype(F32))
        if bias_ref is not None:
            out += bias_ref[cols].astype(F32)
        out = out.astype(lay.dtype).astype(F32)  # the XLA path activates the rounded conv
        if tensor != _V or lay.value_silu:
            out = _silu(out).astype(lay.dtype).astype(F32)
        return out

    def group_of(tensor):
        return lax.div(head, jnp.int32(lay.per_group(tensor)))

    def activated_and_stored(tensor, width):
        """One group's conv, activated; its first head writes the new input into the ring's
        free slot: every channel is written once."""
        group = group_of(tensor)
        activated = convolved(tensor, group, width)

        @pl.when(lax.rem(head, jnp.int32(lay.per_group(tensor))) == 0)
        def _():
            cols = pl.ds(lay.channel_offset(tensor, group), width)
            ring_out_ref[row, slot(0), cols] = projection(cols)

        return activated

    q = activated_and_stored(_Q, lay.key_dim)
    k = activated_and_stored(_K, lay.key_dim)
    v = activated_and_stored(_V, lay.value_dim)
    gf = group_of(_F)
    logit = projection(lay.conv_width + gf).astype(F32) + dt_bias_ref[gf].astype(F32)
    f = jnp.exp(-jnp.exp(a_log_ref[gf].astype(F32)) * _softplus(logit))
    # W rounded to the compute dtype, as the XLA path passes it to the op.
    w = w_ref[group_of(_W)].astype(lay.dtype).astype(F32)
    h_prev = state_ref[row, head].astype(F32)
    u = lax.dot_general(h_prev, w, common.MATMUL, precision=lax.Precision.HIGHEST,
                        preferred_element_type=F32)
    z = jnp.tanh(u + k[:, None] * v[None, :])
    h_new = f * h_prev + (1.0 - f) * z
    state_out_ref[row, head] = h_new

    def rounded(x):  # each operation's result in the compute dtype, as XLA's path has it
        return x.astype(lay.dtype).astype(F32)

    y = rounded(jnp.sum(h_new * q[:, None], axis=0))
    if d_ref is not None:
        y = rounded(y + rounded(d_ref[head].astype(lay.dtype).astype(F32) * v))
    g_start = lay.conv_width + lay.groups[_F] + group_of(_G) * lay.value_dim
    g = projection(pl.ds(g_start, lay.value_dim)).astype(F32)
    gated_ref[row, head, :] = (y * rounded(_silu(g))).astype(gated_ref.dtype)


def decode_step(projected, ring, conv_step, conv_weight, conv_bias, A_log, dt_bias, w, D, state,
                *, qkv_heads, gate_heads, dtype, value_silu=True):
    """One M²RNN decode step from the in-projection's output to the gated read-out.

    ``projected (B, P)``: the in-projection's row, ``q|k|v`` (C = (Nq + Nk)·K + Nv·V channels,
    the conv's input), the Nf forget logits, then the Ng·V gate logits ``g`` (whole: slicing
    the parts apart would cost a copy kernel each, as a kernel's operands are whole buffers),
    in any float dtype (float32 saves XLA a convert kernel); the kernel rounds it to ``dtype``,
    the compute dtype.
    ``ring (B, taps, C)`` and ``conv_step`` (int32 scalar): the conv cache (layers/conv.py);
    ``conv_weight (taps, C)``, ``conv_bias (C,)`` or None, ``A_log`` and ``dt_bias (Nf,)``,
    ``w (Nw, V, V)``, ``D (N, V)`` or None (no residual), ``state (B, N, K, V)`` float32;
    ``qkv_heads = (Nq, Nk, Nv)``, ``gate_heads = Ng``.

    Returns ``(gated (B, N, V), state, ring)``: ``(y + D ⊙ v) ⊙ silu(g)`` in ``dtype``; the
    new state and ring written over the old (donate them, or XLA copies them first). The
    caller counts ``conv_step`` on: written here, in place, it would race with the programs
    reading it, and as a new buffer it costs a copy into the loop's state.
    """
    batch, num_heads, key_dim, value_dim = state.shape
    reason = supports(key_dim, value_dim)
    if reason is not None:
        raise ValueError(f"the fused M²RNN decode step {reason}")
    lay = _Layout(num_heads, key_dim, value_dim, ring.shape[1],
                  (*qkv_heads, A_log.shape[0], w.shape[0], gate_heads), value_silu,
                  conv_bias is not None, D is not None, jnp.dtype(dtype))
    if ring.dtype != lay.dtype:  # a converted copy would not be written in place
        raise ValueError(f"the conv ring is {ring.dtype}, not the compute dtype {lay.dtype}")
    gate_end = lay.conv_width + A_log.shape[0] + gate_heads * value_dim
    if ring.shape[-1] != lay.conv_width or projected.shape[-1] != gate_end:
        raise ValueError(f"the conv ring's {ring.shape[-1]} channels and the projection's "
                         f"{projected.shape[-1]} columns do not fit q|k|v heads {qkv_heads} "
                         f"of K = {key_dim}, V = {value_dim}, {A_log.shape[0]} forget logits "
                         f"and {gate_heads} gate heads")
    inputs = [projected, ring, jnp.reshape(conv_step, (1,)), conv_weight]
    if conv_bias is not None:
        inputs.append(conv_bias)
    inputs += [A_log, dt_bias, w] + ([] if D is None else [D]) + [state]
    out_shape = [jax.ShapeDtypeStruct((batch, num_heads, value_dim), dtype),
                 jax.ShapeDtypeStruct(state.shape, F32),
                 jax.ShapeDtypeStruct(ring.shape, dtype)]
    state_index, ring_index = len(inputs) - 1, 1
    return pl.pallas_call(
        functools.partial(_kernel, lay=lay), out_shape=out_shape,
        grid=(batch, num_heads),
        input_output_aliases={state_index: 1, ring_index: 2},
        compiler_params=common.COMPILER_PARAMS, interpret=platforms.interpret("gpu"),
        name="m2rnn_decode_step")(*inputs)
