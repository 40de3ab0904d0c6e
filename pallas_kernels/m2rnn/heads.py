"""Head grouping (docs/math.md §1): every input tensor carries its own head count, dividing N.

Head ``n`` reads group ``n // (N / N_x)`` of a tensor with ``N_x`` heads. Expanding repeats each
group over its consecutive heads; the gradient of a grouped tensor sums over those heads.
"""

import jax.numpy as jnp


def expand_heads(x, num_heads: int, axis: int):
    """Repeat each of the ``x.shape[axis]`` groups ``num_heads // groups`` times along ``axis``."""
    groups = x.shape[axis]
    if groups == num_heads:
        return x
    return jnp.repeat(x, num_heads // groups, axis=axis)


def sum_heads(dx, groups: int, axis: int):
    """Inverse of ``expand_heads`` for gradients: sum the heads that share one group."""
    num_heads = dx.shape[axis]
    if groups == num_heads:
        return dx
    axis = axis % dx.ndim
    shape = dx.shape[:axis] + (groups, num_heads // groups) + dx.shape[axis + 1:]
    return dx.reshape(shape).sum(axis=axis + 1)
