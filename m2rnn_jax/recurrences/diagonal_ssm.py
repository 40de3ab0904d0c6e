"""The diagonal state-space recurrence of Mamba-2 (scalar decay per head): the op and its scan.

Per batch row and head, with a state ``S ∈ R^{N×P}``::

    a_t = exp(log_decay_t)                 # decay in (0, 1]
    S_t = a_t S_{t-1} + dt_t B_t x_tᵀ      # B_t ∈ R^N, x_t ∈ R^P, step size dt_t
    y_t = S_tᵀ C_t                         # C_t ∈ R^N

The transition is a scalar times the identity, so the recurrence is linear and its steps
commute (unlike M²RNN's, it cannot represent non-commuting state updates). The layer adds its
skip term ``D ⊙ x`` itself.

Shapes: ``x`` ``(batch, S, H, P)``; ``dt``, ``log_decay`` ``(batch, S, H)``; ``B``, ``C``
``(batch, S, H, N)`` (already expanded from groups to heads); ``segment_ids`` ``(batch, S)``
int or None; ``initial_state`` ``(batch, H, N, P)`` or None (zeros). Both functions return
``y (batch, S, H, P)`` and the final state ``(batch, H, N, P)`` in float32, computing in float32
whatever the inputs' dtype.

Packed documents: where ``segment_ids`` changes at step t, ``S_{t-1}`` is replaced by zeros
before step t, so no document sees another. Step 0 always reads ``initial_state``.

``diagonal_ssm`` (the op layers call) works by chunks: within a chunk a masked,
decay-weighted ``C Bᵀ`` product, across chunks a short scan over chunk states, so a few
matmuls per chunk replace one sequential step per token. ``diagonal_ssm_scan`` is the
step-by-step reference it is tested against, and the decode step of the layer.
"""

import jax.numpy as jnp
from jax import lax

from m2rnn_jax.recurrences.chunking import check_shapes, chunk_layout, scan_steps, start_state
from m2rnn_jax.segments import keep_mask

_HIGHEST = lax.Precision.HIGHEST


def diagonal_ssm(x, dt, log_decay, B, C, *, segment_ids=None, initial_state=None,
                 chunk_size=64):
    """The diagonal recurrence by chunks of ``chunk_size`` steps (see the module docstring).

    The decay enters as its log, so no product of decays underflows. Within a chunk, with
    ``c_t = Σ_{r≤t} log a_r`` and ``S_start`` the state entering it: ``y_t = Σ_{s≤t}
    e^{c_t - c_s} dt_s (C_t·B_s) x_s + e^{c_t} S_startᵀ C_t``, dropping the terms that cross a
    document start.
    """
    _check(x, dt, log_decay, B, C, segment_ids, initial_state)
    batch, seq_len, heads, head_dim = x.shape
    state_dim = B.shape[-1]
    keep = keep_mask(segment_ids, (batch, seq_len))
    # Padded steps have dt = 0 and a = 1: they change nothing.
    to_chunks, starts, same = chunk_layout(keep, chunk_size)
    x, dt, log_a, B, C = (to_chunks(a) for a in (x, dt, log_decay, B, C))
    cum = jnp.cumsum(log_a, axis=2)  # (b, z, c, h)
    gap = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # (b, z, t, s, h): c_t - c_s
    weights = jnp.exp(jnp.where(same[..., None], gap, -jnp.inf))
    scores = jnp.einsum("bzthn,bzshn->bztsh", C, B, precision=_HIGHEST)
    y = jnp.einsum("bztsh,bzsh,bzshp->bzthp", weights * scores, dt, x, precision=_HIGHEST)

    # What each chunk adds to the state at its end, and how much of the state it received
    # survives to its end.
    to_end = jnp.where(starts == starts[..., -1:], 1.0, 0.0)[..., None] * jnp.exp(
        cum[:, :, -1:, :] - cum) * dt  # (b, z, s, h)
    added = jnp.einsum("bzsh,bzshn,bzshp->bzhnp", to_end, B, x, precision=_HIGHEST)
    survives = jnp.where(starts[..., -1] == 0, 1.0, 0.0)[..., None] * jnp.exp(cum[:, :, -1])

    def step(h, inputs):
        added_z, survives_z = inputs
        return survives_z[..., None, None] * h + added_z, h

    h0 = start_state(initial_state, (batch, heads, state_dim, head_dim))
    h_final, h_start = lax.scan(step, h0, (jnp.moveaxis(added, 1, 0),
                                           jnp.moveaxis(survives, 1, 0)))
    h_start = jnp.moveaxis(h_start, 0, 1)  # (b, z, h, n, p)
    reach = jnp.where(starts == 0, 1.0, 0.0)[..., None] * jnp.exp(cum)  # (b, z, t, h)
    y = y + reach[..., None] * jnp.einsum("bzthn,bzhnp->bzthp", C, h_start, precision=_HIGHEST)
    return y.reshape(batch, -1, heads, head_dim)[:, :seq_len], h_final


def diagonal_ssm_scan(x, dt, log_decay, B, C, *, segment_ids=None, initial_state=None):
    """The diagonal recurrence one step at a time (see the module docstring)."""
    _check(x, dt, log_decay, B, C, segment_ids, initial_state)
    batch, seq_len, heads, head_dim = x.shape
    state_dim = B.shape[-1]
    keep = keep_mask(segment_ids, (batch, seq_len))
    decay = jnp.exp(log_decay.astype(jnp.float32))
    h0 = start_state(initial_state, (batch, heads, state_dim, head_dim))

    def step(h, inputs):
        x_t, dt_t, a_t, b_t, c_t, keep_t = inputs
        h = (a_t * keep_t[:, None])[..., None, None] * h \
            + (dt_t[..., None] * b_t)[..., :, None] * x_t[..., None, :]
        return h, jnp.einsum("bhnp,bhn->bhp", h, c_t, precision=_HIGHEST)

    return scan_steps(step, h0, (x, dt, decay, B, C, keep))


def _check(x, dt, log_decay, B, C, segment_ids, initial_state):
    if x.ndim != 4 or B.ndim != 4:
        raise ValueError(f"diagonal_ssm: x and B must be 4-D (batch, S, H, P or N), got shapes "
                         f"{tuple(x.shape)} and {tuple(B.shape)}")
    batch, seq_len, heads, head_dim = x.shape
    state_dim = B.shape[-1]
    expected = {"dt": (dt, (batch, seq_len, heads)),
                "log_decay": (log_decay, (batch, seq_len, heads)),
                "B": (B, (batch, seq_len, heads, state_dim)),
                "C": (C, (batch, seq_len, heads, state_dim))}
    if segment_ids is not None:
        expected["segment_ids"] = (segment_ids, (batch, seq_len))
    if initial_state is not None:
        expected["initial_state"] = (initial_state, (batch, heads, state_dim, head_dim))
    check_shapes("diagonal_ssm", expected)
