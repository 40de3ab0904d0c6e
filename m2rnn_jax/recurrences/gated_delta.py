"""The gated delta rule (Gated DeltaNet; Yang, Kautz, Hatamizadeh 2024): the op and its scan.

Per batch row and head, with a state ``S ∈ R^{K×V}``::

    α_t = exp(log_alpha_t)                                 # decay in (0, 1]
    S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ
        = α_t S_{t-1} + β_t k_t (v_t - α_t S_{t-1}ᵀ k_t)ᵀ  # a write towards v_t along k_t
    o_t = S_tᵀ q_t

The transition depends on the input but is linear in the state; with ``‖k_t‖ = 1`` and
``β_t ∈ [0, 1]`` its eigenvalues lie in ``[0, α_t]``, so the state stays bounded.

Shapes: ``q``, ``k`` ``(batch, S, H, K)``; ``v`` ``(batch, S, H, V)``; ``log_alpha``, ``beta``
``(batch, S, H)``; ``segment_ids`` ``(batch, S)`` int or None; ``initial_state``
``(batch, H, K, V)`` or None (zeros). Both functions return ``o (batch, S, H, V)`` and the
final state ``(batch, H, K, V)``, in float32, and compute in float32 whatever the inputs' dtype.

Packed documents: where ``segment_ids`` changes at step t, ``S_{t-1}`` is replaced by zeros
before step t, so no document sees another. Step 0 always reads ``initial_state``.

``gated_delta_rule`` (the op layers call) works by chunks: the writes of a chunk come from one
triangular solve and only one small matmul step per chunk is sequential.
``gated_delta_rule_scan`` is the step-by-step reference it is tested against, and the decode
step of the layer.
"""

import jax.numpy as jnp
from jax import lax

from m2rnn_jax.recurrences.chunking import check_shapes, chunk_layout, scan_steps, start_state
from m2rnn_jax.segments import keep_mask

_HIGHEST = lax.Precision.HIGHEST


def gated_delta_rule(q, k, v, log_alpha, beta, *, segment_ids=None, initial_state=None,
                     chunk_size=64):
    """The gated delta rule by chunks of ``chunk_size`` steps (see the module docstring).

    Per chunk with incoming state ``S0``, ``g_t = Σ_{r≤t} log α_r`` and
    ``Γ[t,s] = e^{g_t - g_s}`` (zero across a document start), the writes
    ``U_t = β_t (v_t - α_t S_{t-1}ᵀ k_t)`` solve the unit lower-triangular system
    ``(I + A) U = diag(β) (V - diag(e^g) K S0)`` with ``A[t,s] = β_t Γ[t,s] k_t·k_s`` (s < t);
    then ``o_t = e^{g_t} S0ᵀ q_t + Σ_{s≤t} Γ[t,s] (q_t·k_s) U_s`` and
    ``S_end = e^{g_last} S0 + Σ_s Γ[last,s] k_s U_sᵀ``. The solve is done
    once per chunk for the parts of ``U`` that do not depend on ``S0``.
    """
    _check(q, k, v, log_alpha, beta, segment_ids, initial_state)
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    keep = keep_mask(segment_ids, (batch, seq_len))
    to_chunks, starts, same = chunk_layout(keep, chunk_size)  # padded steps change nothing
    chunk = starts.shape[2]
    q, k, v, log_alpha, beta = (to_chunks(a) for a in (q, k, v, log_alpha, beta))
    g = jnp.cumsum(log_alpha, axis=2)  # (b, z, c, h)
    gap = jnp.moveaxis(g[:, :, :, None, :] - g[:, :, None, :, :], -1, 2)  # (b, z, h, t, s)
    decay = jnp.exp(jnp.where(same[:, :, None], gap, -jnp.inf))  # Γ, zero above the diagonal
    reach = jnp.moveaxis(jnp.where(starts == 0, 1.0, 0.0)[..., None] * jnp.exp(g), -1, 2)
    q, k, v, beta = (jnp.moveaxis(a, 3, 2) for a in (q, k, v, beta))  # heads before time

    kk = jnp.einsum("bzhtk,bzhsk->bzhts", k, k, precision=_HIGHEST)
    strict = jnp.tril(jnp.ones((chunk, chunk), bool), -1)
    system = jnp.eye(chunk) + jnp.where(strict, beta[..., None] * decay * kk, 0.0)
    rhs = jnp.concatenate([beta[..., None] * v, (beta * reach)[..., None] * k], axis=-1)
    solved = lax.linalg.triangular_solve(system, rhs, left_side=True, lower=True,
                                         unit_diagonal=True)
    writes_v, writes_s0 = solved[..., :value_dim], solved[..., value_dim:]  # U = U_v - W S0
    mixing = decay * jnp.einsum("bzhtk,bzhsk->bzhts", q, k, precision=_HIGHEST)
    to_end = decay[..., -1, :, None] * k  # Γ[last, s] k_s

    def step(state, inputs):
        q_z, writes_v_z, writes_s0_z, mixing_z, reach_z, to_end_z = inputs
        writes = writes_v_z - jnp.einsum("bhtk,bhkv->bhtv", writes_s0_z, state,
                                         precision=_HIGHEST)
        o = reach_z[..., None] * jnp.einsum("bhtk,bhkv->bhtv", q_z, state, precision=_HIGHEST)
        o = o + jnp.einsum("bhts,bhsv->bhtv", mixing_z, writes, precision=_HIGHEST)
        state = reach_z[..., -1, None, None] * state + jnp.einsum(
            "bhsk,bhsv->bhkv", to_end_z, writes, precision=_HIGHEST)
        return state, o

    h0 = start_state(initial_state, (batch, heads, key_dim, value_dim))
    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, writes_v, writes_s0, mixing, reach, to_end))
    h_final, o = lax.scan(step, h0, xs)  # o: (z, b, h, c, v)
    o = jnp.moveaxis(o, 0, 1).swapaxes(2, 3).reshape(batch, -1, heads, value_dim)
    return o[:, :seq_len], h_final


def gated_delta_rule_scan(q, k, v, log_alpha, beta, *, segment_ids=None, initial_state=None):
    """The gated delta rule one step at a time (see the module docstring)."""
    _check(q, k, v, log_alpha, beta, segment_ids, initial_state)
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    keep = keep_mask(segment_ids, (batch, seq_len))
    alpha = jnp.exp(log_alpha.astype(jnp.float32))
    h0 = start_state(initial_state, (batch, heads, key_dim, value_dim))

    def step(h, inputs):
        q_t, k_t, v_t, alpha_t, beta_t, keep_t = inputs
        h = (alpha_t * keep_t[:, None])[..., None, None] * h
        # α(I - β k kᵀ)S + β k vᵀ = αS + β k (v - kᵀ αS)ᵀ
        predicted = jnp.einsum("bhk,bhkv->bhv", k_t, h, precision=_HIGHEST)
        h = h + (beta_t[..., None] * k_t)[..., :, None] * (v_t - predicted)[..., None, :]
        return h, jnp.einsum("bhkv,bhk->bhv", h, q_t, precision=_HIGHEST)

    return scan_steps(step, h0, (q, k, v, alpha, beta, keep))


def _check(q, k, v, log_alpha, beta, segment_ids, initial_state):
    if q.ndim != 4 or v.ndim != 4:
        raise ValueError(f"gated_delta_rule: q and v must be 4-D (batch, S, H, K or V), got "
                         f"shapes {tuple(q.shape)} and {tuple(v.shape)}")
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    expected = {"k": (k, q.shape), "v": (v, (batch, seq_len, heads, value_dim)),
                "log_alpha": (log_alpha, (batch, seq_len, heads)),
                "beta": (beta, (batch, seq_len, heads))}
    if segment_ids is not None:
        expected["segment_ids"] = (segment_ids, (batch, seq_len))
    if initial_state is not None:
        expected["initial_state"] = (initial_state, (batch, heads, key_dim, value_dim))
    check_shapes("gated_delta_rule", expected)
