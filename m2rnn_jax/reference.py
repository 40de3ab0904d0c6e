"""The ``scan`` backend: the M²RNN recurrence as a chunked ``lax.scan`` (docs/math.md §1–2).

The portable backend and the semantic home of the recurrence: the Pallas kernels are judged
against it. It keeps the backend contract of ``pallas_kernels.m2rnn.contract`` (inputs validated
and padded by ``m2rnn_jax.ops``; the state is float32 whatever the input dtype). The forward
keeps only the state at each chunk start (``S / chunk_size`` states); the backward recomputes a
chunk's states from it, so memory grows as S/C rather than S.
"""

import jax.numpy as jnp
from jax import lax

from pallas_kernels.m2rnn import contract
from pallas_kernels.m2rnn.heads import expand_heads, sum_heads

DEFAULT_CHUNK_SIZE = 64
_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


def supports(q, k, v, w, f, h0):
    """Every input the op accepts, on every platform."""
    del q, k, v, w, f, h0
    return None


def choose_chunk_size(seq_len, requested):
    """The contract's chunk rule; the scan runs any chunk size."""
    return contract.fit_chunk_size(seq_len, requested, default=DEFAULT_CHUNK_SIZE)


def _to_chunks(x, chunk_size):
    """(B, S, ...) -> (S/C, C, B, ...): time-major chunks for the two nested scans."""
    if x is None:
        return None
    b, s = x.shape[:2]
    x = jnp.moveaxis(x, 1, 0)
    return x.reshape((s // chunk_size, chunk_size, b) + x.shape[2:])


def _from_chunks(x):
    """(S/C, C, B, ...) -> (B, S, ...)."""
    x = x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
    return jnp.moveaxis(x, 0, 1)


def _step_inputs(x, num_heads):
    """One time step's inputs, expanded to all heads and cast to float32."""
    q_t, k_t, v_t, f_t, keep_t = x
    q_n = expand_heads(q_t.astype(_F32), num_heads, axis=1)  # (B, N, K)
    k_n = expand_heads(k_t.astype(_F32), num_heads, axis=1)  # (B, N, K)
    v_n = expand_heads(v_t.astype(_F32), num_heads, axis=1)  # (B, N, V)
    f_n = expand_heads(f_t.astype(_F32), num_heads, axis=1)  # (B, N)
    return q_n, k_n, v_n, f_n, keep_t


def _transition(h_before, w_n, k_n, v_n, f_n, keep_t):
    """H_{t-1} (before a possible reset) -> (reset H_{t-1}, Z_t, H_t)."""
    h_prev = h_before if keep_t is None else h_before * keep_t[:, None, None, None]
    u = jnp.einsum("bnkv,nvw->bnkw", h_prev, w_n, precision=_HIGHEST)
    z = jnp.tanh(u + k_n[..., :, None] * v_n[..., None, :])
    f4 = f_n[..., None, None]
    return h_prev, z, f4 * h_prev + (1.0 - f4) * z


def forward(q, k, v, w, f, h0, keep, *, chunk_size, save_checkpoints):
    num_heads = h0.shape[1]
    w_n = expand_heads(w.astype(_F32), num_heads, axis=0)
    xs = tuple(_to_chunks(x, chunk_size) for x in (q, k, v, f, keep))

    def step(h, x):
        q_n, k_n, v_n, f_n, keep_t = _step_inputs(x, num_heads)
        _, _, h = _transition(h, w_n, k_n, v_n, f_n, keep_t)
        y = jnp.einsum("bnkv,bnk->bnv", h, q_n, precision=_HIGHEST)
        return h, y.astype(v.dtype)

    def chunk(h, xs_chunk):
        h_end, y = lax.scan(step, h, xs_chunk)
        return h_end, (y, h if save_checkpoints else None)

    h_final, (y, checkpoints) = lax.scan(chunk, h0.astype(_F32), xs)
    return _from_chunks(y), h_final, checkpoints


def backward(q, k, v, w, f, h0, keep, checkpoints, dy, dh_final, *, gradient_clipping,
             chunk_size):
    num_heads = h0.shape[1]
    groups = {name: x.shape[2] for name, x in zip("qkvf", (q, k, v, f))}
    w_n = expand_heads(w.astype(_F32), num_heads, axis=0)
    xs = tuple(_to_chunks(x, chunk_size) for x in (q, k, v, f, keep))
    dys = _to_chunks(dy, chunk_size)

    def clip(g):
        if gradient_clipping is None:
            return g
        return jnp.clip(g, -gradient_clipping, gradient_clipping)

    def recompute_step(h, x):
        _, k_n, v_n, f_n, keep_t = _step_inputs(x, num_heads)
        _, _, h_next = _transition(h, w_n, k_n, v_n, f_n, keep_t)
        return h_next, h  # keep the state *before* the step

    def backward_step(acc, inputs):
        g_later, dw = acc
        x, dy_t, h_before = inputs
        q_n, k_n, v_n, f_n, keep_t = _step_inputs(x, num_heads)
        h_prev, z, h_t = _transition(h_before, w_n, k_n, v_n, f_n, keep_t)
        dy_t = dy_t.astype(_F32)
        # docs/math.md §2: clamp what arrives from later steps, then add the read-out's.
        g = clip(g_later) + q_n[..., :, None] * dy_t[..., None, :]
        f4 = f_n[..., None, None]
        du = (1.0 - f4) * g * (1.0 - z * z)
        dh_prev = f4 * g + jnp.einsum("bnkw,nvw->bnkv", du, w_n, precision=_HIGHEST)
        if keep_t is not None:
            dh_prev = dh_prev * keep_t[:, None, None, None]
        dw = dw + jnp.einsum("bnkv,bnkw->nvw", h_prev, du, precision=_HIGHEST)
        dq = jnp.einsum("bnkv,bnv->bnk", h_t, dy_t, precision=_HIGHEST)
        dk = jnp.einsum("bnkw,bnw->bnk", du, v_n, precision=_HIGHEST)
        dv = jnp.einsum("bnkw,bnk->bnw", du, k_n, precision=_HIGHEST)
        df = jnp.sum(g * (h_prev - z), axis=(2, 3))
        grads = (sum_heads(dq, groups["q"], 1), sum_heads(dk, groups["k"], 1),
                 sum_heads(dv, groups["v"], 1), sum_heads(df, groups["f"], 1))
        return (dh_prev, dw), grads

    def chunk(acc, inputs):
        xs_chunk, dy_chunk, h_start = inputs
        _, h_befores = lax.scan(recompute_step, h_start, xs_chunk)
        return lax.scan(backward_step, acc, (xs_chunk, dy_chunk, h_befores), reverse=True)

    dw0 = jnp.zeros(w_n.shape, _F32)
    (dh0, dw), (dq, dk, dv, df) = lax.scan(
        chunk, (dh_final.astype(_F32), dw0), (xs, dys, checkpoints), reverse=True)
    dw = sum_heads(dw, w.shape[0], 0)
    return (_from_chunks(dq).astype(q.dtype), _from_chunks(dk).astype(k.dtype),
            _from_chunks(dv).astype(v.dtype), dw.astype(w.dtype), _from_chunks(df).astype(f.dtype),
            dh0)
