"""The kernels' time loops: ``lax.fori_loop`` with an int32 counter.

Program ids are int32. Under ``jax_enable_x64`` a ``lax.fori_loop`` over Python bounds counts
in int64, and index arithmetic mixing the two fails (in ``lax.div``, in the interpreters'
slicing, in Mosaic's verifier); there the loop below counts in int32 from the start. Without
x64 it is ``lax.fori_loop`` itself: the same program.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def fori_loop(lower: int, upper: int, body, init):
    """``lax.fori_loop(lower, upper, body, init)`` over Python bounds, ``body(i, carry)``
    receiving an int32 ``i`` whether or not x64 is enabled."""
    if jax.dtypes.canonicalize_dtype(np.int64) == np.int32:  # x64 off: already int32
        return lax.fori_loop(lower, upper, body, init)

    def step(carry, _):  # the pattern the Pallas lowerings turn into a counted loop
        i, x = carry
        return (i + 1, body(i, x)), None

    (_, out), _ = lax.scan(step, (jnp.int32(lower), init), None, length=max(upper - lower, 0))
    return out
