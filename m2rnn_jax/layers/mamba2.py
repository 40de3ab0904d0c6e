"""Mixer ``S``: a Mamba-2 style diagonal gated linear recurrence (baseline).

Per head ``h`` (``H = num_heads``, ``P = head_dim``, ``N = state_dim``) with state
``S ∈ R^{N×P}``::

    dt_t = softplus(dt_logit_t + dt_bias)                 # step size, > 0
    a_t  = exp(-exp(A_log) · dt_t)                        # scalar decay in (0, 1)
    S_t  = a_t · S_{t-1} + dt_t · B_t x_tᵀ                # B_t ∈ R^N, x_t ∈ R^P
    y_t  = S_tᵀ C_t + D · x_t

The transition is a scalar times the identity, so the recurrence is linear and associative
(a parallel scan exists) and, unlike M²RNN, cannot represent non-commuting state updates.

Layer (as in Mamba-2): ``in_proj`` -> ``[z | x | B | C | dt_logit]``; causal depthwise conv +
SiLU over ``x | B | C``; the recurrence (``B``, ``C`` shared by the heads of each of
``num_groups`` groups); ``RMSNorm(y ⊙ silu(z))`` over ``H·P``; ``out_proj``. Init:
``A ~ U[A_init_min, A_init_max]``, ``dt_bias`` = softplus⁻¹ of a log-uniform ``dt``, ``D = 1``.
The recurrence runs in float32 in its chunked form (``diagonal_recurrence_chunked``: within a
chunk of ``config.mamba2.chunk_size`` steps a masked, decay-weighted ``C Bᵀ`` product; across
chunks a short scan over chunk states), which is a few matmuls per chunk instead of one
sequential step per token; ``diagonal_recurrence`` is the step-by-step scan it is tested
against and the decode step.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from m2rnn_jax.layers.conv import causal_depthwise_conv, conv_window
from m2rnn_jax.layers.linear import Linear
from m2rnn_jax.layers.m2rnn import init_A_log, init_dt_bias
from m2rnn_jax.layers.norm import RMSNorm
from m2rnn_jax.layers.params import make_param, model_dtypes, out_proj_std
from m2rnn_jax.layers.registry import register_mixer
from m2rnn_jax.ops import keep_mask

_HIGHEST = lax.Precision.HIGHEST


def continues_document(segment_ids, batch, seq_len):
    """``(B, S)`` float32: 0 where a new document starts (the state resets), else 1."""
    if segment_ids is None:
        return jnp.ones((batch, seq_len), jnp.float32)
    return keep_mask(segment_ids)


def diagonal_recurrence(x, dt, decay, B, C, keep, initial_state=None):
    """The scan: ``x (B,S,H,P)``, ``dt``/``decay``/``keep`` ``(B,S,H)``/``(B,S)``, ``B``/``C``
    ``(B,S,H,N)`` (already expanded to heads) -> ``y (B,S,H,P)`` float32, final ``(B,H,N,P)``.
    """
    batch, _, heads, head_dim = x.shape
    state_dim = B.shape[-1]
    f32 = lambda a: jnp.moveaxis(a.astype(jnp.float32), 1, 0)  # time-major
    xs = (f32(x), f32(dt), f32(decay), f32(B), f32(C), f32(keep))
    h0 = (jnp.zeros((batch, heads, state_dim, head_dim), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))

    def step(h, inputs):
        x_t, dt_t, a_t, b_t, c_t, keep_t = inputs
        h = (a_t * keep_t[:, None])[..., None, None] * h \
            + (dt_t[..., None] * b_t)[..., :, None] * x_t[..., None, :]
        return h, jnp.einsum("bhnp,bhn->bhp", h, c_t, precision=_HIGHEST)

    h_final, y = lax.scan(step, h0, xs)
    return jnp.moveaxis(y, 0, 1), h_final


def chunk_layout(keep, chunk_size):
    """What the chunked baselines share: ``to_chunks`` (``(B, S, ...)`` -> float32
    ``(B, Z, C, ...)``, S zero-padded to a multiple of the chunk ``C = min(chunk_size, S)``),
    ``starts`` (documents begun so far in each chunk, a start at step t counting at t; padded
    steps continue the document) and ``same`` (``(B, Z, t, s)``: s ≤ t in one document)."""
    batch, seq_len = keep.shape
    chunk = min(chunk_size, seq_len)
    pad = -seq_len % chunk

    def to_chunks(a, fill=0.0):
        a = jnp.pad(a.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2),
                    constant_values=fill)
        return a.reshape((batch, -1, chunk) + a.shape[2:])

    starts = jnp.cumsum(1.0 - to_chunks(keep, 1.0), axis=2)  # (b, z, c)
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    return to_chunks, starts, (starts[..., :, None] == starts[..., None, :]) & causal


def diagonal_recurrence_chunked(x, dt, log_decay, B, C, keep, chunk_size):
    """Same result as ``diagonal_recurrence`` with ``decay = exp(log_decay)`` (zero initial
    state), by chunks of ``chunk_size``; the decay enters as its log so that no step underflows.

    Within a chunk, with ``c_t = Σ_{r≤t} log a_r``: ``y_t = Σ_{s≤t} e^{c_t - c_s} dt_s (C_t·B_s)
    x_s + e^{c_t} C_tᵀ S_start``, terms crossing a document start dropped.
    """
    batch, seq_len, heads, head_dim = x.shape
    state_dim = B.shape[-1]
    # Padded steps have dt = 0 and a = 1: they change nothing.
    to_chunks, starts, same = chunk_layout(keep, chunk_size)
    x, dt, log_a, B, C = (to_chunks(a) for a in (x, dt, log_decay, B, C))
    cum = jnp.cumsum(log_a, axis=2)  # (b, z, c, h)
    gap = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # (b, z, t, s, h): c_t - c_s
    weights = jnp.exp(jnp.where(same[..., None], gap, -jnp.inf))
    scores = jnp.einsum("bzthn,bzshn->bztsh", C, B, precision=_HIGHEST)
    y = jnp.einsum("bztsh,bzsh,bzshp->bzthp", weights * scores, dt, x, precision=_HIGHEST)

    # What each chunk adds to the state at its end, and how it decays the state it received.
    to_end = jnp.where(starts == starts[..., -1:], 1.0, 0.0)[..., None] * jnp.exp(
        cum[:, :, -1:, :] - cum) * dt  # (b, z, s, h)
    added = jnp.einsum("bzsh,bzshn,bzshp->bzhnp", to_end, B, x, precision=_HIGHEST)
    carried = jnp.where(starts[..., -1] == 0, 1.0, 0.0)[..., None] * jnp.exp(cum[:, :, -1])

    def step(h, inputs):
        added_z, carried_z = inputs
        return carried_z[..., None, None] * h + added_z, h

    h0 = jnp.zeros((batch, heads, state_dim, head_dim), jnp.float32)
    h_final, h_start = lax.scan(step, h0, (jnp.moveaxis(added, 1, 0),
                                           jnp.moveaxis(carried, 1, 0)))
    h_start = jnp.moveaxis(h_start, 0, 1)  # (b, z, h, n, p)
    reach = jnp.where(starts == 0, 1.0, 0.0)[..., None] * jnp.exp(cum)  # (b, z, t, h)
    y = y + reach[..., None] * jnp.einsum("bzthn,bzhnp->bzthp", C, h_start, precision=_HIGHEST)
    return y.reshape(batch, -1, heads, head_dim)[:, :seq_len], h_final


class Mamba2(nnx.Module):
    """Mixer ``S``. ``__call__(x (B, S, d_model), segment_ids=None) -> (B, S, d_model)``."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        """``config`` is a ``ModelConfig``; the layer reads ``config.mamba2``."""
        cfg = config.mamba2
        self.cfg = cfg
        dtype, param_dtype = model_dtypes(config)
        self.dtype = dtype
        self.inner = cfg.num_heads * cfg.head_dim
        self.conv_width = self.inner + 2 * cfg.num_groups * cfg.state_dim  # x | B | C
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = Linear(config.d_model, self.inner + self.conv_width + cfg.num_heads,
                              ("embed", "mixer"), std=config.init_std, **kw)
        bound = 1.0 / np.sqrt(cfg.conv_kernel)
        self.conv_weight = make_param(
            jax.random.uniform(rngs.params(), (cfg.conv_kernel, self.conv_width), jnp.float32,
                               -bound, bound).astype(param_dtype), ("conv", "mixer"))
        # Decay parameters stay float32 whatever param_dtype is.
        self.A_log = make_param(
            init_A_log(rngs.params(), cfg.num_heads, cfg.A_init_min, cfg.A_init_max),
            ("heads",), weight_decay=False)
        self.dt_bias = make_param(
            init_dt_bias(rngs.params(), cfg.num_heads, cfg.dt_init_min, cfg.dt_init_max,
                         cfg.dt_init_floor), ("heads",), weight_decay=False)
        self.D = make_param(jnp.ones((cfg.num_heads,), param_dtype), ("heads",),
                            weight_decay=False)
        self.out_norm = RMSNorm(self.inner, eps=config.norm_eps, dtype=dtype,
                                param_dtype=param_dtype)
        self.out_proj = Linear(self.inner, config.d_model, ("mixer", "embed"),
                               std=out_proj_std(config), **kw)

    def _split(self, projected):
        z, xbc, dt_logits = jnp.split(projected, [self.inner, self.inner + self.conv_width],
                                      axis=-1)
        return z, xbc, dt_logits

    def _heads(self, xbc):
        """Conv output -> ``x (..., H, P)``, ``B``/``C`` ``(..., H, N)`` (groups expanded)."""
        cfg = self.cfg
        group_width = cfg.num_groups * cfg.state_dim
        x, b, c = jnp.split(xbc, [self.inner, self.inner + group_width], axis=-1)
        lead = xbc.shape[:-1]
        per_group = cfg.num_heads // cfg.num_groups
        expand = lambda a: jnp.repeat(a.reshape(lead + (cfg.num_groups, cfg.state_dim)),
                                      per_group, axis=-2)
        return x.reshape(lead + (cfg.num_heads, cfg.head_dim)), expand(b), expand(c)

    def _gates(self, dt_logits):
        """Step sizes ``dt`` and ``log a = -exp(A_log) · dt`` (float32)."""
        dt = jax.nn.softplus(dt_logits.astype(jnp.float32) + self.dt_bias[...])
        return dt, -jnp.exp(self.A_log[...]) * dt

    def _output(self, y, x, z):
        y = y + self.D[...].astype(jnp.float32)[:, None] * x.astype(jnp.float32)
        y = y.reshape(y.shape[:-2] + (self.inner,)).astype(self.dtype)
        return self.out_proj(self.out_norm(y * jax.nn.silu(z)))

    def __call__(self, x, segment_ids=None):
        return self.prefill(x, segment_ids)[0]

    def prefill(self, x, segment_ids=None, max_len=None):
        """Full-sequence path: ``(out, cache)``; the cache is the float32 state ``(B, H, N, P)``
        after the last step and the conv window (``max_len`` is ignored: the cache has a fixed
        size)."""
        del max_len
        batch, seq_len = x.shape[:2]
        z, xbc_in, dt_logits = self._split(self.in_proj(x))
        xbc = jax.nn.silu(causal_depthwise_conv(xbc_in, self.conv_weight[...], None,
                                                segment_ids))
        xh, b, c = self._heads(xbc)
        dt, log_decay = self._gates(dt_logits)
        keep = continues_document(segment_ids, batch, seq_len)
        y, state = diagonal_recurrence_chunked(xh, dt, log_decay, b, c, keep,
                                               self.cfg.chunk_size)
        cache = {"state": state, "conv": conv_window(xbc_in, segment_ids, self.cfg.conv_kernel)}
        return self._output(y, xh, z), cache

    def decode_step(self, x, cache):
        """One token per row: ``x (B, 1, d_model)`` -> ``(y (B, 1, d_model), cache)``."""
        z, xbc_in, dt_logits = self._split(self.in_proj(x))
        window = jnp.concatenate([cache["conv"], xbc_in.astype(cache["conv"].dtype)], axis=1)
        xbc = jnp.einsum("bjc,jc->bc", window.astype(jnp.float32),
                         self.conv_weight[...].astype(jnp.float32))[:, None]
        xh, b, c = self._heads(jax.nn.silu(xbc.astype(xbc_in.dtype)))
        dt, log_decay = self._gates(dt_logits)
        keep = jnp.ones(x.shape[:2], jnp.float32)
        y, state = diagonal_recurrence(xh, dt, jnp.exp(log_decay), b, c, keep, cache["state"])
        return self._output(y, xh, z), {"state": state, "conv": window[:, 1:]}


register_mixer("S", Mamba2)
