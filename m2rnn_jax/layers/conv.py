"""Causal depthwise convolution over time that does not mix packed documents.

``out[t] = Σ_j weight[K-1-j] · x[t-j]`` over the taps ``j < K`` whose step ``t-j`` lies in the
same document as ``t`` (``weight[K-1]`` multiplies the current step, as a left-padded conv1d).
Shared by every mixer that has a short conv (M²RNN, and the baselines if they want it).
"""

import jax
import jax.numpy as jnp


def _shift_right(x, lag, fill):
    """``x[:, t - lag]`` along axis 1, ``fill`` where ``t < lag``."""
    if lag == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (lag, 0)
    return jnp.pad(x, pad, constant_values=fill)[:, :x.shape[1]]


def causal_depthwise_conv(x, weight, bias=None, segment_ids=None):
    """``x (B, S, C)``, ``weight (K, C)``, ``bias (C,)``, ``segment_ids (B, S)`` -> ``(B, S, C)``.

    Computed in float32, returned in ``x``'s dtype.
    """
    taps = weight.shape[0]
    x32 = x.astype(jnp.float32)
    w32 = weight.astype(jnp.float32)
    out = x32 * w32[taps - 1]
    for lag in range(1, taps):
        shifted = _shift_right(x32, lag, 0.0)
        if segment_ids is not None:
            # Steps before the row start are zeros already; the fill value does not matter.
            same = _shift_right(segment_ids, lag, 0) == segment_ids
            shifted = shifted * same[..., None]
        out = out + shifted * w32[taps - 1 - lag]
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype)


def conv_window(x, segment_ids, taps):
    """The last ``taps - 1`` inputs of each row that belong to its last document, zero elsewhere.

    ``x (B, S, C)`` -> ``(B, taps - 1, C)`` (left-padded with zeros when ``S < taps - 1``): the
    conv history a decode step continues from.
    """
    history = taps - 1
    start = max(x.shape[1] - history, 0)
    window = x[:, start:]
    if segment_ids is not None:
        same = segment_ids[:, start:] == segment_ids[:, -1:]
        window = window * same[..., None].astype(window.dtype)
    missing = history - window.shape[1]
    return jnp.pad(window, ((0, 0), (missing, 0), (0, 0))) if missing else window


def conv_cache(x, segment_ids, taps):
    """A decode cache's conv part after the prompt ``x (B, S, C)``: the ring that
    ``conv_decode_step`` continues, ``{"conv": (B, taps, C), "conv_step": 0}``.

    The ring has ``taps`` slots: at ``conv_step = s`` the new input goes to slot
    ``(taps - 1 + s) % taps`` and the input ``j`` steps back sits in slot
    ``(taps - 1 + s - j) % taps``. After the prompt ``conv_window``'s ``taps - 1`` inputs fill
    slots ``0 .. taps - 2`` in order and slot ``taps - 1`` is unused (zero). The slot written at
    each step holds the one input that has left the window: a fused decode kernel whose programs
    share channels (M²RNN's q and k) may then write it while others still read the ring.
    """
    window = conv_window(x, segment_ids, taps)
    ring = jnp.pad(window, ((0, 0), (0, 1), (0, 0)))
    return {"conv": ring, "conv_step": jnp.zeros((), jnp.int32)}


def ring_slot(step, lag, taps):
    """The slot of the ring (``conv_cache``) holding the input ``lag`` steps back at
    ``conv_step = step`` (``lag = 0``: the slot the new input goes to)."""
    return (step + (taps - 1 - lag)) % taps


def conv_decode_step(x, cache, weight, bias=None):
    """One step of ``causal_depthwise_conv``: ``x (B, 1, C)`` and ``conv_cache``'s ring ->
    ``(out (B, 1, C) float32, the ring after x)``.

    The new input overwrites, in place, the slot whose input has left the window; shifting a
    window instead cost a slice and a copy kernel per layer and token.
    """
    taps = weight.shape[0]
    w32 = weight.astype(jnp.float32)
    history, step = cache["conv"], cache["conv_step"]
    # lag -> slot is i -> (c - i) mod taps, its own inverse: slot i holds the input lags[i] back.
    lags = ring_slot(step, jnp.arange(taps), taps)
    # Weighted by w[taps - 1 - lag]; the slot about to be written (lag 0) holds an input that
    # has left the window: weight zero.
    history_weights = w32.at[taps - 1].set(0.0)
    slot_weights = jnp.take(history_weights, taps - 1 - lags, axis=0)
    out = x[:, 0].astype(jnp.float32) * w32[taps - 1]
    out = out + jnp.einsum("bjc,jc->bc", history.astype(jnp.float32), slot_weights)
    history = jax.lax.dynamic_update_slice_in_dim(history, x.astype(history.dtype),
                                                  ring_slot(step, 0, taps), axis=1)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out[:, None], {"conv": history, "conv_step": step + 1}
