"""Packed documents: where the recurrent state restarts, from ``segment_ids``."""

import jax.numpy as jnp


def keep_mask(segment_ids, shape=None):
    """``(B, S)`` float32: 0 where a new document starts (the state resets to zero before that
    step), 1 where step t continues step t-1's document. Step 0 always continues: it reads the
    initial state.

    ``segment_ids`` is ``(B, S)`` integer document ids, or ``None`` for one document per row:
    then ones of ``shape`` (``(B, S)``), or ``None`` when no shape is given (the M²RNN op
    passes no mask to its backends then).
    """
    if segment_ids is None:
        return None if shape is None else jnp.ones(shape, jnp.float32)
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    first = jnp.ones((segment_ids.shape[0], 1), bool)
    return jnp.concatenate([first, same], axis=1).astype(jnp.float32)
