"""What the linear recurrences share: the chunk layout, the step-by-step scan, the start state
and shape checks (document resets: ``m2rnn_jax.segments.keep_mask``)."""

import jax.numpy as jnp
from jax import lax


def chunk_layout(keep, chunk_size):
    """Splits time into chunks of ``C = min(chunk_size, S)`` steps (S zero-padded to a multiple).

    Returns ``(to_chunks, starts, same)``:

    * ``to_chunks(a, fill=0.0)``: ``(B, S, ...)`` -> float32 ``(B, Z, C, ...)``, padded with
      ``fill``;
    * ``starts (B, Z, C)``: how many documents have begun so far in each chunk (a start at step
      t counts at t; padded steps continue the document);
    * ``same (B, Z, C, C)``: ``same[..., t, s]`` is True where ``s <= t`` lie in one document.
    """
    batch, seq_len = keep.shape
    chunk = min(chunk_size, seq_len)
    pad = -seq_len % chunk

    def to_chunks(a, fill=0.0):
        a = jnp.pad(a.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2),
                    constant_values=fill)
        return a.reshape((batch, -1, chunk) + a.shape[2:])

    starts = jnp.cumsum(1.0 - to_chunks(keep, 1.0), axis=2)
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    return to_chunks, starts, (starts[..., :, None] == starts[..., None, :]) & causal


def scan_steps(step, h0, inputs):
    """``lax.scan`` of ``step(h, inputs_t) -> (h, out_t)`` over time from the state ``h0``:
    ``inputs`` are ``(B, S, ...)`` arrays, cast to float32 and fed time-major. Returns
    ``(outs (B, S, ...), final state)``."""
    xs = tuple(jnp.moveaxis(a.astype(jnp.float32), 1, 0) for a in inputs)
    h_final, outs = lax.scan(step, h0, xs)
    return jnp.moveaxis(outs, 0, 1), h_final


def start_state(initial, shape):
    """The float32 state a recurrence starts from: ``initial`` or zeros of ``shape``."""
    if initial is None:
        return jnp.zeros(shape, jnp.float32)
    return initial.astype(jnp.float32)


def check_shapes(op, expected):
    """Raises ``ValueError`` naming the first argument whose shape is not the one expected.

    ``expected`` maps argument names to ``(array, wanted shape)``.
    """
    for name, (value, want) in expected.items():
        if tuple(value.shape) != tuple(want):
            raise ValueError(f"{op}: {name} must have shape {tuple(want)}, got "
                             f"{tuple(value.shape)}")
