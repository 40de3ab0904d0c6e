"""An independent float64 NumPy implementation of the M²RNN recurrence and its backward
(docs/math.md §1–2).

Written as plain per-step loops over heads, separately from the JAX code, so that both the scan
reference and the kernels are checked against something that shares none of their code.
"""

import numpy as np


def _group(n, num_heads, groups):
    return n // (num_heads // groups)


def forward(q, k, v, w, f, h0=None, segment_ids=None):
    q, k, v, w, f = (np.asarray(x, np.float64) for x in (q, k, v, w, f))
    batch, seq_len, nq, key_dim = q.shape
    value_dim = v.shape[-1]
    num_heads = max(nq, k.shape[2], v.shape[2], w.shape[0], f.shape[2])
    y = np.zeros((batch, seq_len, num_heads, value_dim))
    states = np.zeros((batch, seq_len + 1, num_heads, key_dim, value_dim))
    for b in range(batch):
        for n in range(num_heads):
            h = np.zeros((key_dim, value_dim)) if h0 is None else np.asarray(h0[b, n], np.float64)
            states[b, 0, n] = h
            wn = w[_group(n, num_heads, w.shape[0])]
            for t in range(seq_len):
                if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                    h = np.zeros_like(h)
                kt = k[b, t, _group(n, num_heads, k.shape[2])]
                vt = v[b, t, _group(n, num_heads, v.shape[2])]
                ft = f[b, t, _group(n, num_heads, f.shape[2])]
                z = np.tanh(h @ wn + np.outer(kt, vt))
                h = ft * h + (1 - ft) * z
                states[b, t + 1, n] = h
                y[b, t, n] = h.T @ q[b, t, _group(n, num_heads, nq)]
    return y, states[:, -1], states


def backward(q, k, v, w, f, dy, dh_final, h0=None, segment_ids=None, clip=None):
    """Gradients of <y, dy> + <H_S, dh_final>; returns dq, dk, dv, dw, df, dh0."""
    q, k, v, w, f, dy, dh_final = (np.asarray(x, np.float64) for x in (q, k, v, w, f, dy, dh_final))
    batch, seq_len, nq, key_dim = q.shape
    num_heads = dy.shape[2]
    grads = [np.zeros_like(x) for x in (q, k, v, w, f)]
    dq, dk, dv, dw, df = grads
    dh0 = np.zeros((batch, num_heads, key_dim, v.shape[-1]))
    _, _, states = forward(q, k, v, w, f, h0, segment_ids)
    for b in range(batch):
        for n in range(num_heads):
            gq, gk, gv, gf = (_group(n, num_heads, x.shape[2]) for x in (q, k, v, f))
            gw = _group(n, num_heads, w.shape[0])
            wn = w[gw]
            g_later = dh_final[b, n].copy()
            for t in range(seq_len - 1, -1, -1):
                reset = (segment_ids is not None and t > 0
                         and segment_ids[b, t] != segment_ids[b, t - 1])
                h_prev = np.zeros_like(g_later) if reset else states[b, t, n]
                h_t = states[b, t + 1, n]
                kt, vt, ft = k[b, t, gk], v[b, t, gv], f[b, t, gf]
                z = np.tanh(h_prev @ wn + np.outer(kt, vt))
                if clip is not None:
                    g_later = np.clip(g_later, -clip, clip)
                g = g_later + np.outer(q[b, t, gq], dy[b, t, n])
                dq[b, t, gq] += h_t @ dy[b, t, n]
                df[b, t, gf] += np.sum(g * (h_prev - z))
                du = (1 - ft) * g * (1 - z * z)
                dw[gw] += h_prev.T @ du
                dk[b, t, gk] += du @ vt
                dv[b, t, gv] += du.T @ kt
                g_later = ft * g + du @ wn.T
                if reset:
                    g_later = np.zeros_like(g_later)
            dh0[b, n] = g_later
    return dq, dk, dv, dw, df, dh0


# Float64 building blocks for the layer references in the tests.

def values(param):
    """A parameter's value as a float64 NumPy array."""
    return np.asarray(param[...], np.float64)


def silu(x):
    return x / (1 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def causal_conv(x, weight, segment_ids):
    """Depthwise causal conv ``x (B, S, C)`` with taps ``weight (taps, C)``, per-step loop: taps
    reach back only within the same document."""
    batch, seq_len, _ = x.shape
    taps = weight.shape[0]
    out = np.zeros_like(x)
    for b in range(batch):
        for t in range(seq_len):
            for lag in range(taps):
                s = t - lag
                if s >= 0 and (segment_ids is None or segment_ids[b, s] == segment_ids[b, t]):
                    out[b, t] += weight[taps - 1 - lag] * x[b, s]
    return out


def rounded(x, dtype):
    """``x`` rounded to ``dtype`` (through float32; e.g. bfloat16) and back, as float64."""
    return np.asarray(x, np.float32).astype(dtype).astype(np.float64)


def relative_error(got, want):
    """‖got − want‖ / ‖want‖ in float64; shapes must match and ``got`` must be finite."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.all(np.isfinite(got))
    return np.linalg.norm(got - want) / np.linalg.norm(want)
